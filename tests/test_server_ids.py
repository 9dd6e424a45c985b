"""server.ids: order id format, uniqueness, determinism; request fingerprints."""

from __future__ import annotations

import re

from google.type.money_pb2 import Money

from acme.orders.v1 import order_service_pb2 as pb
from server.api import ids
from workflows import models

ORDER_ID = re.compile(r"ORD-[0-9ABCDEFGHJKMNPQRSTVWXYZ]{16}")
REQUEST_ID = "123e4567-e89b-12d3-a456-426614174000"
# The order id REQUEST_ID maps to, computed once by the implementation.
PINNED = "ORD-BH6BTRPHHPGZJ5JD"


def test_format_is_prefix_and_16_crockford_characters() -> None:
    for request_id in (None, "", REQUEST_ID):
        order_id = ids.new_order_id(request_id)
        assert ORDER_ID.fullmatch(order_id), order_id
        assert len(order_id) == 20


def test_the_alphabet_leaves_out_i_l_o_u() -> None:
    assert len(ids.CROCKFORD_ALPHABET) == 32
    assert not set("ILOU") & set(ids.CROCKFORD_ALPHABET)


def test_ten_thousand_random_ids_are_distinct() -> None:
    generated = {ids.new_order_id(None) for _ in range(10_000)}
    assert len(generated) == 10_000
    # 80 random bits: every position takes many values, the first one included.
    assert len({order_id[4] for order_id in generated}) == 32


def test_a_request_id_always_maps_to_the_same_order_id() -> None:
    first = ids.new_order_id(REQUEST_ID)
    assert ids.new_order_id(REQUEST_ID) == first
    assert ids.new_order_id(REQUEST_ID.upper()) == first
    assert ids.new_order_id(f"  {REQUEST_ID} ") == first
    # ... hence the same workflow: Temporal refuses to start it twice.
    assert models.workflow_id_for(ids.new_order_id(REQUEST_ID)) == f"order-{first}"


def test_different_request_ids_map_to_different_order_ids() -> None:
    derived = {ids.new_order_id(f"123e4567-e89b-12d3-a456-{n:012d}") for n in range(10_000)}
    assert len(derived) == 10_000


def test_derived_id_is_pinned() -> None:
    # Changing the derivation would orphan every retry of an order made before it.
    assert ids.new_order_id(REQUEST_ID) == PINNED


def request(**fields: object) -> pb.CreateOrderRequest:
    values: dict[str, object] = {
        "customer_id": "CUST-001",
        "items": [
            pb.OrderItem(
                product_id="P",
                product_name="N",
                quantity=1,
                price=Money(currency_code="USD", units=1),
            )
        ],
        "shipping_address": "a",
        "shipping_city": "b",
        "shipping_postal_code": "c",
        "shipping_country": "d",
    }
    values.update(fields)
    return pb.CreateOrderRequest(**values)  # type: ignore[arg-type]


def test_fingerprint_ignores_the_request_id() -> None:
    assert ids.request_fingerprint(request(request_id=REQUEST_ID)) == ids.request_fingerprint(
        request()
    )


def test_fingerprint_does_not_modify_the_request() -> None:
    original = request(request_id=REQUEST_ID)
    ids.request_fingerprint(original)
    assert original.request_id == REQUEST_ID


def test_fingerprint_is_sha256_hex_and_stable() -> None:
    fingerprint = ids.request_fingerprint(request())
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint)
    assert ids.request_fingerprint(request()) == fingerprint


def test_fingerprint_changes_with_any_field() -> None:
    base = ids.request_fingerprint(request())
    for changed in (
        request(customer_id="CUST-002"),
        request(shipping_city="B"),
        request(customer_email="a@b.co"),
        request(items=[]),
    ):
        assert ids.request_fingerprint(changed) != base
