"""The server's JSON payloads (server/temporal/payloads.py): what temporalio's default gives."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.converter import DataConverter

from infra.codec import data_converter
from server.api import validation
from server.temporal.payloads import with_fast_json
from tests.support.keys import KEYS
from tests.support.orders import create_request
from workflows import models
from workflows.money import Money

NOW = datetime(2026, 12, 5, 8, 0, tzinfo=UTC)


def _order() -> models.OrderInput:
    return dataclasses.replace(
        validation.validate_create_order(create_request()), created_at=NOW, customer_key="k"
    )


def _states() -> list[models.OrderState]:
    """A new order, then one with every optional part filled and every list non-empty."""
    new = models.initial_state(_order(), NOW)
    amount = new.total_amount
    full = dataclasses.replace(
        new,
        status=models.OrderStatus.CANCELLED,
        payment_info=models.PaymentInfo("TXN-1", amount, "card", NOW),
        shipment_info=models.ShipmentInfo("TRK-1", "carrier", NOW + timedelta(days=3), NOW),
        estimated_delivery=NOW + timedelta(days=3),
        cancellation_reason="changed my mind",
        refund_info=models.RefundInfo("REF-1", "TXN-1", amount, NOW),
        inventory_info=models.InventoryInfo("RES-1", released=True),
        rejected_payments=[models.RejectedPayment("TXN-0", Money("USD", 1), "card", "wrong", NOW)],
        delivered_at=None,
        failures=[models.StepFailure("ship", "boom", NOW)],
    )
    return [new, full]


async def _both(payload: Payload) -> tuple[Any, Any]:
    standard = data_converter(KEYS)
    [expected] = await standard.decode([payload], [models.OrderState])
    [decoded] = await with_fast_json(standard).decode([payload], [models.OrderState])
    return expected, decoded


@pytest.mark.parametrize("index", [0, 1])
async def test_decodes_states_as_temporalio_does(index: int) -> None:
    state = _states()[index]
    [payload] = await data_converter(KEYS).encode([state])
    expected, decoded = await _both(payload)
    assert decoded == expected == state
    assert type(decoded.status) is models.OrderStatus


async def test_refuses_what_temporalio_refuses() -> None:
    """A wrong type, a missing required field: TypeError, as the standard decoding raises."""
    plain = json.loads(DataConverter.default.payload_converter.to_payload(_states()[1]).data)
    for broken in (
        {**plain, "status": 3},
        {key: value for key, value in plain.items() if key != "order_id"},
        {**plain, "payment_info": {"transaction_id": "TXN-1"}},
    ):
        payload = Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(broken).encode())
        standard = DataConverter.default
        with pytest.raises(TypeError):
            await standard.decode([payload], [models.OrderState])
        with pytest.raises(TypeError):
            await with_fast_json(standard).decode([payload], [models.OrderState])


def test_keeps_a_custom_payload_converter() -> None:
    """A client with a payload converter of its own keeps it: only the default is replaced."""
    own = type("Own", (DataConverter.default.payload_converter_class,), {})
    custom = dataclasses.replace(DataConverter.default, payload_converter_class=own)
    assert with_fast_json(custom) is custom
    assert with_fast_json(DataConverter.default) is not DataConverter.default


def test_encodes_the_same_bytes_as_temporalio() -> None:
    """Every value the server sends: the order's input and memo, the signals' arguments."""
    standard = DataConverter.default.payload_converter
    fast = with_fast_json(DataConverter.default).payload_converter
    state = _states()[1]
    values: list[Any] = [
        *_states(),
        _order(),
        state.total_amount,
        state.customer_id,
        models.PaymentRequest("TXN-1", state.total_amount, "card"),
        models.CancelRequest("because"),
        None,
        b"bytes",
        {"a": [state.total_amount, NOW]},
    ]
    for value in values:
        assert fast.to_payloads([value]) == standard.to_payloads([value]), value
