"""The activities against their simulated providers, outside any workflow."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.email import TITLES
from activities.order_activities import OrderActivities
from activities.providers import ProviderSettings
from activities.providers.faults import ALL_ACTIVITIES, COMPENSATION_ACTIVITIES, FORWARD_ACTIVITIES
from activities.providers.ledger import EffectKind, Ledger, canonical
from activities.providers.mail import OutboxMailer
from infra.settings import ProcessSettings
from tests.support.emails import body_of, read_email
from tests.support.env import settings_from
from workflows.models import (
    OUT_OF_STOCK_ERROR,
    PAYMENT_DECLINED_ERROR,
    ChargePaymentInput,
    DeliverOrderInput,
    Notification,
    NotificationKind,
    OrderItem,
    PrepareShipmentInput,
    RefundPaymentInput,
    ReleaseInventoryInput,
    ReserveInventoryInput,
    Shipment,
    ShipOrderInput,
    ShippingAddress,
)
from workflows.money import Money

LAPTOP = Money("USD", 999, 990_000_000)
ITEMS = [OrderItem("PROD-123", "Laptop", 1, LAPTOP), OrderItem("PROD-9", "Mouse", 2, LAPTOP)]
ORDER_CANCELLED = NotificationKind.ORDER_CANCELLED
ADDRESS = ShippingAddress("123 Main St", "San Francisco", "94102", "USA")
# The Date header comes from the activity's first schedule time.
SCHEDULED = datetime(2025, 1, 31, 14, 30, 22, tzinfo=UTC)


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    return tmp_path / "outbox"


@pytest.fixture
def acts(outbox: Path) -> OrderActivities:
    return OrderActivities(ProviderSettings.instant(outbox))


@pytest.fixture
def env() -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, scheduled_time=SCHEDULED)
    return env


def charge_input(
    key: str = "ORD-1/charge/TXN-1", amount: Money = LAPTOP, order_id: str = "ORD-1"
) -> ChargePaymentInput:
    return ChargePaymentInput(order_id, "TXN-1", amount, "credit_card", key)


def notification(kind: NotificationKind, **changes: object) -> Notification:
    base = Notification(
        kind=kind,
        order_id="ORD-1",
        customer_id="CUST-001",
        recipient="cust-001@example.com",
        total_amount=LAPTOP,
        tracking_number="FEDEX-ORD-1-PKG-1",
        estimated_delivery=datetime(2025, 2, 3, 14, 30, tzinfo=UTC),
        reason="Customer requested cancellation",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def emails_in(outbox: Path) -> list[Path]:
    return sorted(outbox.rglob("*.eml"))


# --- Registration ------------------------------------------------------------------


def test_all_lists_every_activity_by_the_name_the_workflow_uses(acts: OrderActivities) -> None:
    names = []
    for fn in acts.all():
        defn = activity._Definition.from_callable(fn)
        assert defn is not None
        names.append(defn.name)
    assert names == [
        "reserve_inventory",
        "release_inventory",
        "charge_payment",
        "refund_payment",
        "prepare_shipment",
        "ship_order",
        "deliver_order",
        "send_notification",
    ]


# --- Inventory --------------------------------------------------------------------


async def test_reserve_is_once_per_order(acts: OrderActivities, env: ActivityEnvironment) -> None:
    first = await env.run(acts.reserve_inventory, ReserveInventoryInput("ORD-1", ITEMS))
    again = await env.run(acts.reserve_inventory, ReserveInventoryInput("ORD-1", ITEMS))
    assert first == again == "RSV-ORD-1"
    assert list(acts.inventory.reservations) == ["ORD-1"]
    assert acts.inventory.reservations["ORD-1"].quantity == 3


async def test_reserve_without_items_is_not_retryable(
    acts: OrderActivities, env: ActivityEnvironment
) -> None:
    with pytest.raises(ApplicationError) as caught:
        await env.run(acts.reserve_inventory, ReserveInventoryInput("ORD-1", []))
    assert caught.value.non_retryable
    assert caught.value.type == "InvalidOrder"
    assert acts.inventory.reservations == {}


async def test_release_is_idempotent(acts: OrderActivities, env: ActivityEnvironment) -> None:
    reservation_id = await env.run(acts.reserve_inventory, ReserveInventoryInput("ORD-1", ITEMS))
    await env.run(acts.release_inventory, ReleaseInventoryInput("ORD-1", reservation_id))
    await env.run(acts.release_inventory, ReleaseInventoryInput("ORD-1", reservation_id))
    assert acts.inventory.reservations["ORD-1"].released
    # Compensation for a reservation that never happened is a no-op, not an error.
    await env.run(acts.release_inventory, ReleaseInventoryInput("ORD-2", ""))
    assert "ORD-2" not in acts.inventory.reservations


# --- Payment ----------------------------------------------------------------------


async def test_charge_twice_with_one_key_charges_once(
    acts: OrderActivities, env: ActivityEnvironment
) -> None:
    first = await env.run(acts.charge_payment, charge_input())
    again = await env.run(acts.charge_payment, charge_input())
    assert first == again == "CAP-TXN-1"
    assert len(acts.payments.charges) == 1
    assert "ORD-1/charge/TXN-1" in acts.payments.charges
    assert "ORD-1/charge/TXN-2" not in acts.payments.charges
    assert acts.payments.charges["ORD-1/charge/TXN-1"].amount == LAPTOP


@pytest.mark.parametrize(
    "changed",
    [{"amount": Money("USD", 1)}, {"amount": Money("EUR", 999, 990_000_000)}, {"order_id": "X"}],
)
async def test_charge_key_reused_for_another_charge_is_not_retryable(
    acts: OrderActivities, env: ActivityEnvironment, changed: dict[str, object]
) -> None:
    await env.run(acts.charge_payment, charge_input())
    with pytest.raises(ApplicationError) as caught:
        await env.run(acts.charge_payment, dataclasses.replace(charge_input(), **changed))  # type: ignore[arg-type]
    assert caught.value.type == "IdempotencyKeyReused"
    assert caught.value.non_retryable
    assert acts.payments.charges["ORD-1/charge/TXN-1"].amount == LAPTOP


async def test_charges_under_different_keys_get_different_ids(
    acts: OrderActivities, env: ActivityEnvironment
) -> None:
    # Two orders paid with the same (client-chosen) transaction id.
    first = await env.run(acts.charge_payment, charge_input("ORD-1/charge/TXN-1"))
    second = await env.run(
        acts.charge_payment, charge_input("ORD-2/charge/TXN-1", order_id="ORD-2")
    )
    assert first != second
    assert len(acts.payments.charges) == 2


async def test_the_book_lists_every_capture_and_refund_of_an_order(
    acts: OrderActivities, env: ActivityEnvironment
) -> None:
    """Per order, under any key, with amounts: a second capture under another key shows."""
    half = Money("USD", 499, 995_000_000)
    await env.run(acts.charge_payment, charge_input("ORD-1/charge/TXN-1"))
    await env.run(acts.charge_payment, charge_input("ORD-1/charge/TXN-1"))  # a retry
    await env.run(acts.charge_payment, charge_input("ORD-1/charge/TXN-1/again"))
    await env.run(acts.charge_payment, charge_input("ORD-2/charge/TXN-1", order_id="ORD-2"))
    await env.run(
        acts.refund_payment, RefundPaymentInput("ORD-1", "TXN-1", half, "ORD-1/refund/TXN-1")
    )
    assert await acts.payments.captured("ORD-1") == [LAPTOP, LAPTOP]
    assert await acts.payments.refunded("ORD-1") == [half]
    assert await acts.payments.captured("ORD-2") == [LAPTOP]
    assert await acts.payments.refunded("ORD-2") == []
    assert await acts.payments.captured("ORD-3") == []


async def test_non_positive_charge_is_not_retryable(
    acts: OrderActivities, env: ActivityEnvironment
) -> None:
    with pytest.raises(ApplicationError) as caught:
        await env.run(acts.charge_payment, charge_input(amount=Money("USD")))
    assert caught.value.non_retryable
    assert acts.payments.charges == {}


async def test_refund_is_once_per_key(acts: OrderActivities, env: ActivityEnvironment) -> None:
    refund = RefundPaymentInput("ORD-1", "TXN-1", LAPTOP, "ORD-1/refund/TXN-1")
    first = await env.run(acts.refund_payment, refund)
    again = await env.run(acts.refund_payment, refund)
    assert first == again == "RFD-TXN-1"
    assert "ORD-1/refund/TXN-1" in acts.payments.refunds
    with pytest.raises(ApplicationError) as caught:
        await env.run(acts.refund_payment, dataclasses.replace(refund, amount=Money("USD", 1)))
    assert caught.value.type == "IdempotencyKeyReused"
    assert caught.value.non_retryable


# --- Shipping ---------------------------------------------------------------------


async def test_prepare_ship_deliver(acts: OrderActivities, env: ActivityEnvironment) -> None:
    package_id = await env.run(acts.prepare_shipment, PrepareShipmentInput("ORD-1", ITEMS))
    assert package_id.startswith("PKG-")
    assert await env.run(acts.prepare_shipment, PrepareShipmentInput("ORD-1", ITEMS)) == package_id
    other = await env.run(acts.prepare_shipment, PrepareShipmentInput("ORD-2", ITEMS))
    assert other != package_id

    shipment = await env.run(acts.ship_order, ShipOrderInput("ORD-1", package_id, ADDRESS))
    assert shipment == Shipment(f"FEDEX-ORD-1-{package_id}", "fedex")
    assert await env.run(acts.ship_order, ShipOrderInput("ORD-1", package_id, ADDRESS)) == shipment
    assert list(acts.shipping.shipments) == ["ORD-1"]

    deliver = DeliverOrderInput("ORD-1", shipment.tracking_number)
    await env.run(acts.deliver_order, deliver)
    await env.run(acts.deliver_order, deliver)
    assert list(acts.shipping.deliveries) == [shipment.tracking_number]


# --- Email ------------------------------------------------------------------------


async def test_email_is_written_to_the_outbox(
    acts: OrderActivities, env: ActivityEnvironment, outbox: Path
) -> None:
    await env.run(acts.send_notification, notification(NotificationKind.ORDER_RECEIVED))

    path = outbox / "ORD-1" / "order_received.eml"
    message = read_email(path)
    assert message["From"] == "orders@acme.example"
    assert message["To"] == "cust-001@example.com"
    assert "Order Received" in message["Subject"]
    assert "ORD-1" in message["Subject"]
    assert message["Message-ID"].startswith("<")
    assert message["Message-ID"].endswith(">")
    assert message["Date"].datetime == SCHEDULED
    body = body_of(message)
    assert "ORD-1" in body
    assert "USD 999.99" in body
    # Written through a temporary file that is gone once the message is in place.
    assert [p.name for p in path.parent.iterdir()] == ["order_received.eml"]


async def test_an_email_write_killed_half_way_leaves_the_orders_folder_whole(
    acts: OrderActivities, env: ActivityEnvironment, outbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker SIGKILLed between writing and renaming cleans nothing up; what it leaves
    stays out of the order's folder, which the retry fills with the email alone."""
    note = notification(NotificationKind.ORDER_RECEIVED)

    class Killed(BaseException):
        pass

    def killed(*_: object) -> None:
        raise Killed

    with monkeypatch.context() as patched:
        patched.setattr(os, "replace", killed)
        patched.setattr(os, "unlink", lambda *_: None)  # a killed process runs no cleanup
        with pytest.raises(Killed):
            await env.run(acts.send_notification, note)
    assert len(list((outbox / ".tmp").iterdir())) == 1
    assert not (outbox / "ORD-1").exists() or not any((outbox / "ORD-1").iterdir())

    await env.run(acts.send_notification, note)
    assert [p.name for p in (outbox / "ORD-1").iterdir()] == ["order_received.eml"]


async def test_retried_email_is_written_once(
    acts: OrderActivities, env: ActivityEnvironment, outbox: Path
) -> None:
    note = notification(NotificationKind.PAYMENT_CONFIRMED)
    await env.run(acts.send_notification, note)
    path = outbox / "ORD-1" / "payment_confirmed.eml"
    first = path.stat()
    content = path.read_bytes()

    await env.run(acts.send_notification, note)
    # A worker that restarted has forgotten what it sent, but the outbox has not.
    retry_env = ActivityEnvironment()
    retry_env.info = dataclasses.replace(env.info, attempt=2)
    restarted = OrderActivities(ProviderSettings.instant(outbox))
    await retry_env.run(restarted.send_notification, note)

    assert path.stat().st_ino == first.st_ino
    assert path.stat().st_mtime_ns == first.st_mtime_ns
    assert path.read_bytes() == content
    assert len(list(path.parent.iterdir())) == 1
    assert acts.mail.sent == {note.idempotency_key: read_email(path)["Message-ID"]}


async def test_message_id_is_the_same_for_every_retry(
    env: ActivityEnvironment, tmp_path: Path
) -> None:
    ids = []
    for n in range(2):
        acts = OrderActivities(ProviderSettings.instant(tmp_path / str(n)))
        await env.run(acts.send_notification, notification(NotificationKind.ORDER_SHIPPED))
        ids.append(read_email(tmp_path / str(n) / "ORD-1" / "order_shipped.eml")["Message-ID"])
    assert ids[0] == ids[1]
    other = OrderActivities(ProviderSettings.instant(tmp_path / "other"))
    await env.run(other.send_notification, notification(NotificationKind.ORDER_DELIVERED))
    delivered = read_email(tmp_path / "other" / "ORD-1" / "order_delivered.eml")
    assert delivered["Message-ID"] != ids[0]


@pytest.mark.parametrize("kind", list(NotificationKind))
async def test_every_kind_has_its_seed_subject(
    acts: OrderActivities, env: ActivityEnvironment, outbox: Path, kind: NotificationKind
) -> None:
    await env.run(acts.send_notification, notification(kind))
    message = read_email(outbox / "ORD-1" / f"{kind.value}.eml")
    assert message["Subject"] == f"{TITLES[kind]}: ORD-1"
    body = body_of(message)
    assert "ORD-1" in body
    assert "USD 999.99" in body
    if kind is NotificationKind.ORDER_SHIPPED:
        assert "FEDEX-ORD-1-PKG-1" in body
        assert "03 February 2025" in body
    if kind is NotificationKind.ORDER_CANCELLED:
        assert "Customer requested cancellation" in body


def test_the_seed_names() -> None:
    assert set(TITLES.values()) == {
        "Order Received",
        "Payment Confirmed",
        "Order Shipped",
        "Order Delivered",
        "Order Cancelled",
    }


async def test_email_without_recipient_goes_to_a_placeholder(
    acts: OrderActivities, env: ActivityEnvironment, outbox: Path
) -> None:
    await env.run(
        acts.send_notification, notification(NotificationKind.ORDER_RECEIVED, recipient="")
    )
    message = read_email(outbox / "ORD-1" / "order_received.eml")
    assert message["To"] == "CUST-001@customers.invalid"


@pytest.mark.parametrize(
    "recipient", ["a@b.example\r\nBcc: all@b.example", "a@b.example, c@d.example", "nobody"]
)
async def test_bad_recipient_is_not_retryable(
    acts: OrderActivities, env: ActivityEnvironment, outbox: Path, recipient: str
) -> None:
    with pytest.raises(ApplicationError) as caught:
        await env.run(
            acts.send_notification,
            notification(NotificationKind.ORDER_RECEIVED, recipient=recipient),
        )
    assert caught.value.type == "InvalidRecipient"
    assert caught.value.non_retryable
    assert emails_in(outbox) == []
    # The failure is logged and kept in the history: the address masked, on one line.
    assert recipient not in caught.value.message
    assert "\n" not in caught.value.message


async def test_log_lines_hold_no_email_address_nor_street_address(
    acts: OrderActivities, env: ActivityEnvironment, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await env.run(acts.send_notification, notification(NotificationKind.ORDER_RECEIVED))
    # No email address: the placeholder, made of the customer id, is masked too.
    placeholder = notification(NotificationKind.PAYMENT_CONFIRMED, recipient="")
    await env.run(acts.send_notification, placeholder)
    await env.run(acts.ship_order, ShipOrderInput("ORD-1", "PKG-1", ADDRESS))

    assert "emailed 'Order Received: ORD-1' to c***@example.com" in caplog.text
    assert "emailed 'Payment Confirmed: ORD-1' to C***@customers.invalid" in caplog.text
    for personal in ["cust-001@", "CUST-001", *dataclasses.astuple(ADDRESS)]:
        assert personal not in caplog.text, personal


@pytest.mark.parametrize(
    ("reason", "shown"),
    [
        ("Found it cheaper elsewhere", '"Found it cheaper elsewhere"'),
        # Quoted plain text: its own quotes and backslashes escaped.
        ('Say "refund" \\ now', '"Say \\"refund\\" \\\\ now"'),
        # Sent straight to Temporal, past CancelOrder's check: made harmless here.
        ("invoice\u202efdp.exe", '"invoice\ufffdfdp.exe"'),
        ("\u2066call\u2069 \u200fus\u061c", '"\ufffdcall\ufffd \ufffdus\ufffd"'),
        ("one\r\nBcc: x\ttab", '"one  Bcc: x tab"'),
        ("\x1b[31mred\x00", '"\ufffd[31mred\ufffd"'),
        ("", "not given"),
    ],
)
async def test_the_cancellation_email_quotes_the_reason_on_a_line_of_its_own(
    acts: OrderActivities, env: ActivityEnvironment, outbox: Path, reason: str, shown: str
) -> None:
    await env.run(acts.send_notification, notification(ORDER_CANCELLED, reason=reason))
    message = read_email(outbox / "ORD-1" / "order_cancelled.eml")
    assert message.get_content_type() == "text/plain"
    assert not message.is_multipart()
    assert f"Reason: {shown}" in body_of(message).splitlines()


async def test_hostile_order_id_stays_inside_the_outbox(
    acts: OrderActivities, env: ActivityEnvironment, outbox: Path
) -> None:
    note = notification(NotificationKind.ORDER_RECEIVED, order_id="../../escaped")
    await env.run(acts.send_notification, note)
    written = emails_in(outbox)
    assert len(written) == 1
    assert written[0].parent.parent == outbox
    assert written[0] == OutboxMailer(outbox).path_for(note)


# --- Simulated durations ----------------------------------------------------------


async def test_instant_config_is_fast(acts: OrderActivities, env: ActivityEnvironment) -> None:
    started = time.monotonic()
    await env.run(acts.reserve_inventory, ReserveInventoryInput("ORD-1", ITEMS))
    await env.run(acts.charge_payment, charge_input())
    package_id = await env.run(acts.prepare_shipment, PrepareShipmentInput("ORD-1", ITEMS))
    shipment = await env.run(acts.ship_order, ShipOrderInput("ORD-1", package_id, ADDRESS))
    await env.run(acts.deliver_order, DeliverOrderInput("ORD-1", shipment.tracking_number))
    await env.run(acts.send_notification, notification(NotificationKind.ORDER_DELIVERED))
    assert time.monotonic() - started < 0.5


async def test_durations_are_honoured_with_heartbeats(outbox: Path) -> None:
    settings = ProviderSettings.instant(outbox, sim_payment_seconds=0.3, sim_deliver_seconds=1.5)
    acts = OrderActivities(settings)
    env = ActivityEnvironment()
    heartbeats: list[float] = []
    env.on_heartbeat = lambda *details: heartbeats.append(time.monotonic())

    started = time.monotonic()
    await env.run(acts.charge_payment, charge_input())
    assert 0.3 <= time.monotonic() - started < 1.0

    heartbeats.clear()
    started = time.monotonic()
    await env.run(acts.deliver_order, DeliverOrderInput("ORD-1", "FEDEX-ORD-1-PKG-1"))
    assert 1.5 <= time.monotonic() - started < 2.5
    # At least once a second, so a cancelled or timed-out attempt finds out.
    assert len(heartbeats) >= 2


async def test_cancelled_delivery_stops_and_has_no_effect(
    outbox: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="activities")
    acts = OrderActivities(ProviderSettings.instant(outbox, sim_deliver_seconds=30.0))
    env = ActivityEnvironment()
    heartbeat = asyncio.Event()
    env.on_heartbeat = lambda *details: heartbeat.set()

    task = asyncio.create_task(env.run(acts.deliver_order, DeliverOrderInput("ORD-1", "T-1")))
    await asyncio.wait_for(heartbeat.wait(), timeout=5)
    started = time.monotonic()
    env.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 1.0
    assert acts.shipping.deliveries == {}
    assert any("ORD-1: delivery interrupted" in r.getMessage() for r in caplog.records)


# --- Settings ------------------------------------------------------------------------


class _Env(ProcessSettings, ProviderSettings):
    """The providers' settings as the worker reads them: flags, then ORDER_* variables."""


def from_env(env: dict[str, str]) -> ProviderSettings:
    return settings_from(_Env, [], env)


def refused(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> str:
    """The usage error the worker would exit with (status 2) for these variables."""
    with pytest.raises(SystemExit) as exited:
        from_env(env)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_instant_settings_are_all_zero(tmp_path: Path) -> None:
    settings = ProviderSettings.instant(str(tmp_path))
    durations = {k: v for k, v in settings.model_dump().items() if k.endswith("_seconds")}
    assert list(durations.values()) == [0.0] * 6
    assert settings.outbox_dir == tmp_path


def test_settings_from_env() -> None:
    default = from_env({})
    assert default.model_dump() == ProviderSettings().model_dump()
    assert default.outbox_dir == Path("outbox")
    settings = from_env(
        {
            "ORDER_SIM_DELIVER_SECONDS": "1.5",
            "ORDER_SIM_EMAIL_SECONDS": "0",
            "ORDER_OUTBOX_DIR": "/x",
        }
    )
    assert settings.sim_deliver_seconds == 1.5
    assert settings.sim_email_seconds == 0.0
    assert settings.sim_payment_seconds == default.sim_payment_seconds
    assert settings.outbox_dir == Path("/x")


def test_demo_defaults_deliver_within_30_s_and_leave_time_to_cancel() -> None:
    s = ProviderSettings()
    after_payment = (
        s.sim_payment_seconds
        + s.sim_prepare_seconds
        + s.sim_ship_seconds
        + s.sim_deliver_seconds
        + 3 * s.sim_email_seconds
    )
    assert after_payment < 30
    assert s.sim_payment_seconds + s.sim_prepare_seconds >= 5


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_bad_duration_names_the_variable(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    error = refused({"ORDER_SIM_SHIP_SECONDS": value}, capsys)
    assert "--sim-ship-seconds / ORDER_SIM_SHIP_SECONDS" in error


# --- Simulated stock ----------------------------------------------------------------


def limited(outbox: Path, **changes: Any) -> OrderActivities:
    return OrderActivities(ProviderSettings.instant(outbox, **changes))


def levels(acts: OrderActivities) -> tuple[int | None, int | None]:
    """Units of PROD-123 and PROD-9 in stock (ITEMS: 1 × PROD-123 and 2 × PROD-9)."""
    return acts.inventory.stock_level("PROD-123"), acts.inventory.stock_level("PROD-9")


async def test_stock_is_taken_once_and_given_back_once(
    outbox: Path, env: ActivityEnvironment
) -> None:
    acts = limited(outbox, sim_stock={"PROD-123": 5, "PROD-9": 2})
    # ITEMS: 1 × PROD-123 and 2 × PROD-9.
    reservation_id = await env.run(acts.reserve_inventory, ReserveInventoryInput("ORD-1", ITEMS))
    await env.run(acts.reserve_inventory, ReserveInventoryInput("ORD-1", ITEMS))  # a retry
    assert levels(acts) == (4, 0)
    assert acts.inventory.stock_level("PROD-OTHER") is None  # not listed: unlimited

    release = ReleaseInventoryInput("ORD-1", reservation_id)
    await env.run(acts.release_inventory, release)
    await env.run(acts.release_inventory, release)
    assert levels(acts) == (5, 2)


async def test_out_of_stock_is_final_and_reserves_nothing(
    outbox: Path, env: ActivityEnvironment
) -> None:
    acts = limited(outbox, sim_stock={"PROD-123": 5, "PROD-9": 1})
    items = [*ITEMS, OrderItem("PROD-9", "Mouse", 1, LAPTOP)]  # 3 × PROD-9 in all
    with pytest.raises(ApplicationError) as caught:
        await env.run(acts.reserve_inventory, ReserveInventoryInput("ORD-1", items))
    assert caught.value.type == OUT_OF_STOCK_ERROR
    assert caught.value.non_retryable
    assert caught.value.message == "Out of stock: PROD-9 (requested 3, available 1)"
    assert acts.inventory.reservations == {}
    assert levels(acts) == (5, 1)


async def test_default_stock_covers_unlisted_products(
    outbox: Path, env: ActivityEnvironment
) -> None:
    acts = limited(outbox, sim_stock={"PROD-9": 10, "*": 1})
    await env.run(acts.reserve_inventory, ReserveInventoryInput("ORD-1", ITEMS))
    assert levels(acts) == (0, 8)
    assert acts.inventory.stock_level("PROD-NEW") == 1
    with pytest.raises(ApplicationError, match=r"PROD-123 \(requested 1, available 0\)"):
        await env.run(acts.reserve_inventory, ReserveInventoryInput("ORD-2", ITEMS))


# --- Simulated declines ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["declined_card", "Declined_Card"])
async def test_declined_method_is_final_and_charges_nothing(
    outbox: Path, env: ActivityEnvironment, method: str
) -> None:
    acts = limited(outbox, sim_decline_methods=frozenset({"declined_card"}))
    declined = dataclasses.replace(charge_input(), payment_method=method)
    with pytest.raises(ApplicationError) as caught:
        await env.run(acts.charge_payment, declined)
    assert caught.value.type == PAYMENT_DECLINED_ERROR
    assert caught.value.non_retryable
    assert caught.value.message == f"Card declined by the gateway (payment method {method!r})"
    assert acts.payments.charges == {}
    assert await env.run(acts.charge_payment, charge_input("ORD-1/charge/TXN-2")) == "CAP-TXN-1"


@pytest.mark.parametrize(
    ("limit", "amount", "declined"),
    [
        ("999.99", Money("USD", 999, 990_000_000), False),  # at the limit: accepted
        ("999.99", Money("USD", 999, 990_000_001), True),  # one nano above
        ("999.9899999999", Money("USD", 999, 990_000_000), True),  # finer than nanos
        ("1000", Money("JPY", 1000), False),
        ("0", Money("USD", 0, 1), True),
    ],
)
async def test_decline_over_compares_exactly(
    outbox: Path, env: ActivityEnvironment, limit: str, amount: Money, declined: bool
) -> None:
    acts = limited(outbox, sim_decline_over=Decimal(limit))
    if not declined:
        await env.run(acts.charge_payment, charge_input(amount=amount))
        return
    with pytest.raises(ApplicationError) as caught:
        await env.run(acts.charge_payment, charge_input(amount=amount))
    assert caught.value.type == PAYMENT_DECLINED_ERROR
    assert caught.value.message == (
        f"Charge of {amount} declined by the gateway: above the limit of {limit}"
    )
    assert acts.payments.charges == {}


# --- Simulated outages --------------------------------------------------------------------


def attempt(env: ActivityEnvironment, n: int) -> ActivityEnvironment:
    retry = ActivityEnvironment()
    retry.info = dataclasses.replace(env.info, attempt=n)
    return retry


def every_activity(acts: OrderActivities) -> dict[str, Callable[[ActivityEnvironment], Any]]:
    """Each activity, called with inputs that succeed: name → (environment → awaitable)."""
    refund = RefundPaymentInput("ORD-1", "TXN-1", LAPTOP, "ORD-1/refund/TXN-1")
    return {
        "reserve_inventory": lambda e: e.run(
            acts.reserve_inventory, ReserveInventoryInput("ORD-1", ITEMS)
        ),
        "release_inventory": lambda e: e.run(
            acts.release_inventory, ReleaseInventoryInput("ORD-1", "RSV-ORD-1")
        ),
        "charge_payment": lambda e: e.run(acts.charge_payment, charge_input()),
        "refund_payment": lambda e: e.run(acts.refund_payment, refund),
        "prepare_shipment": lambda e: e.run(
            acts.prepare_shipment, PrepareShipmentInput("ORD-1", ITEMS)
        ),
        "ship_order": lambda e: e.run(acts.ship_order, ShipOrderInput("ORD-1", "PKG-1", ADDRESS)),
        "deliver_order": lambda e: e.run(acts.deliver_order, DeliverOrderInput("ORD-1", "T-1")),
        "send_notification": lambda e: e.run(
            acts.send_notification, notification(NotificationKind.ORDER_RECEIVED)
        ),
    }


def test_the_configurable_activity_names_are_the_registered_ones(acts: OrderActivities) -> None:
    registered = set()
    for fn in acts.all():
        defn = activity._Definition.from_callable(fn)
        assert defn is not None
        registered.add(defn.name)
    assert registered == ALL_ACTIVITIES == set(every_activity(acts))
    assert registered == FORWARD_ACTIVITIES | COMPENSATION_ACTIVITIES | {"send_notification"}


async def test_first_attempts_fail_without_effect_then_succeed(
    outbox: Path, env: ActivityEnvironment
) -> None:
    acts = limited(
        outbox,
        sim_stock={"PROD-123": 1},
        sim_fail_first_attempts=2,
        sim_fail_activities=ALL_ACTIVITIES,
    )
    calls = every_activity(acts)
    for name, call in calls.items():
        for n in (1, 2):
            with pytest.raises(ApplicationError) as caught:
                await call(attempt(env, n))
            assert caught.value.type == "ProviderUnavailable"
            assert not caught.value.non_retryable  # retried, each failure one more attempt
            assert f"attempt {n}, the first 2 attempt(s) fail" in caught.value.message
        # Nothing happened yet: a failed attempt never reaches the provider.
        if name == "reserve_inventory":
            assert acts.inventory.reservations == {}
            assert acts.inventory.stock_level("PROD-123") == 1
        if name == "charge_payment":
            assert acts.payments.charges == {}
        await call(attempt(env, 3))
        await call(attempt(env, 4))  # a retry of a success changes nothing
    assert "ORD-1/charge/TXN-1" in acts.payments.charges
    assert "ORD-1/refund/TXN-1" in acts.payments.refunds
    assert acts.inventory.stock_level("PROD-123") == 1  # taken once, given back once
    assert len(emails_in(outbox)) == 1


async def test_outages_hit_the_forward_steps_by_default(
    outbox: Path, env: ActivityEnvironment
) -> None:
    acts = limited(outbox, sim_fail_first_attempts=1)
    for name, call in every_activity(acts).items():
        if name in FORWARD_ACTIVITIES:
            with pytest.raises(ApplicationError, match="unavailable"):
                await call(env)
        else:
            await call(env)


async def test_failure_rate_fails_that_share_of_attempts(
    outbox: Path, env: ActivityEnvironment
) -> None:
    never = limited(outbox, sim_failure_rate=0.0)
    always = limited(outbox, sim_failure_rate=1.0)
    await every_activity(never)["ship_order"](attempt(env, 1))
    for n in (1, 2, 50):
        with pytest.raises(ApplicationError, match=r"100% of attempts fail"):
            await every_activity(always)["ship_order"](attempt(env, n))

    settings = ProviderSettings.instant(outbox, sim_failure_rate=0.3)
    acts = OrderActivities(settings, rng=random.Random(7))
    failed = 0
    for n in range(1, 201):
        try:
            await attempt(env, n).run(acts.prepare_shipment, PrepareShipmentInput(f"O-{n}", ITEMS))
        except ApplicationError:
            failed += 1
    assert 40 <= failed <= 80


# --- Failure and email settings ------------------------------------------------------------


def test_failure_settings_from_env() -> None:
    settings = from_env(
        {
            "ORDER_SIM_STOCK": " PROD-123=5, PROD-9=0 ,*=100",
            "ORDER_SIM_DECLINE_METHODS": "declined_card, Expired_Card",
            "ORDER_SIM_DECLINE_OVER": "999.99",
            "ORDER_SIM_FAILURE_RATE": "0.25",
            "ORDER_SIM_FAIL_FIRST_ATTEMPTS": "2",
            "ORDER_SIM_FAIL_ACTIVITIES": "charge_payment,refund_payment",
        }
    )
    assert settings.sim_stock == {"PROD-123": 5, "PROD-9": 0, "*": 100}
    assert settings.sim_decline_methods == {"declined_card", "expired_card"}
    assert settings.sim_decline_over == Decimal("999.99")
    assert settings.sim_failure_rate == 0.25
    assert settings.sim_fail_first_attempts == 2
    assert settings.sim_fail_activities == {"charge_payment", "refund_payment"}
    assert settings.describe_failures() == (
        "stock PROD-123=5, PROD-9=0, *=100; declining declined_card, expired_card; "
        "declining charges over 999.99; failing first 2 attempt(s) and 25% of attempts "
        "of charge_payment, refund_payment"
    )
    every = from_env({"ORDER_SIM_FAIL_ACTIVITIES": "ALL"})
    assert every.sim_fail_activities == ALL_ACTIVITIES


def test_no_failures_by_default() -> None:
    settings = from_env({})
    assert settings.sim_stock == {}
    assert settings.sim_decline_methods == frozenset()
    assert settings.sim_decline_over is None
    assert (settings.sim_failure_rate, settings.sim_fail_first_attempts) == (0.0, 0)
    assert settings.sim_fail_activities == FORWARD_ACTIVITIES
    assert settings.describe_failures() == ""
    assert settings.email_from == "orders@acme.example"
    assert settings.smtp_host is None


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("ORDER_SIM_STOCK", "PROD-1"),
        ("ORDER_SIM_STOCK", "PROD-1=-1"),
        ("ORDER_SIM_STOCK", "PROD-1=+1"),
        ("ORDER_SIM_STOCK", "PROD-1=2.5"),
        ("ORDER_SIM_STOCK", "=3"),
        ("ORDER_SIM_STOCK", "PROD-1=1,PROD-1=2"),
        ("ORDER_SIM_DECLINE_OVER", "lots"),
        ("ORDER_SIM_DECLINE_OVER", "-5"),
        ("ORDER_SIM_DECLINE_OVER", "Infinity"),
        ("ORDER_SIM_FAILURE_RATE", "1.5"),
        ("ORDER_SIM_FAILURE_RATE", "nan"),
        ("ORDER_SIM_FAIL_FIRST_ATTEMPTS", "-1"),
        ("ORDER_SIM_FAIL_FIRST_ATTEMPTS", "+2"),
        ("ORDER_SIM_FAIL_FIRST_ATTEMPTS", "2.0"),
        ("ORDER_SIM_FAIL_FIRST_ATTEMPTS", "two"),
        ("ORDER_SIM_FAIL_ACTIVITIES", "charge_payment,pack"),
        ("ORDER_EMAIL_FROM", "a@b.example, c@d.example"),
        ("ORDER_EMAIL_FROM", "orders"),
    ],
)
def test_bad_failure_or_email_setting_names_the_variable(
    var: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert f" / {var} " in refused({var: value}, capsys)


async def test_email_from_is_the_sender(outbox: Path, env: ActivityEnvironment) -> None:
    settings = from_env(
        {"ORDER_EMAIL_FROM": "Acme Shop <shop@acme.example>", "ORDER_OUTBOX_DIR": str(outbox)}
    )
    acts = OrderActivities(settings)
    await env.run(acts.send_notification, notification(NotificationKind.ORDER_RECEIVED))
    message = read_email(outbox / "ORD-1" / "order_received.eml")
    assert message["From"] == "Acme Shop <shop@acme.example>"


def test_smtp_settings_from_env(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = from_env(
        {
            "ORDER_SMTP_HOST": "mail.example",
            "ORDER_SMTP_PORT": "2525",
            "ORDER_SMTP_TLS": "TLS",
            "ORDER_SMTP_USERNAME": "acme",
            "ORDER_SMTP_PASSWORD": " pass word ",
            "ORDER_SMTP_TIMEOUT": "2.5",
            "ORDER_SMTP_CA_FILE": str(ca),
        }
    )
    assert (settings.smtp_host, settings.smtp_port, settings.smtp_tls) == (
        "mail.example",
        2525,
        "tls",
    )
    assert (settings.smtp_username, settings.smtp_timeout, settings.smtp_ca_file) == (
        "acme",
        2.5,
        ca,
    )
    assert settings.smtp_password is not None
    assert settings.smtp_password.get_secret_value() == " pass word "
    # Never the password, wherever the settings are shown.
    assert "pass word" not in repr(settings) + str(settings)


@pytest.mark.parametrize(
    ("env", "security", "port"),
    [
        ({}, "none", 25),
        ({"ORDER_SMTP_TLS": "starttls"}, "starttls", 587),
        ({"ORDER_SMTP_TLS": "tls"}, "tls", 465),
        ({"ORDER_SMTP_TLS": "none", "ORDER_SMTP_PORT": "1025"}, "none", 1025),
        # Credentials: STARTTLS unless told otherwise.
        ({"ORDER_SMTP_USERNAME": "u", "ORDER_SMTP_PASSWORD": "p"}, "starttls", 587),
    ],
)
def test_smtp_defaults(env: dict[str, str], security: str, port: int) -> None:
    settings = from_env({"ORDER_SMTP_HOST": "mail.example", **env})
    assert (settings.smtp_security, settings.smtp_effective_port) == (security, port)
    assert settings.smtp_timeout == 10.0


@pytest.mark.parametrize(
    ("env", "var"),
    [
        ({"ORDER_SMTP_PORT": "587"}, "ORDER_SMTP_HOST"),
        ({"ORDER_SMTP_HOST": "mail.example", "ORDER_SMTP_PORT": "0"}, "ORDER_SMTP_PORT"),
        ({"ORDER_SMTP_HOST": "mail.example", "ORDER_SMTP_PORT": "+25"}, "ORDER_SMTP_PORT"),
        ({"ORDER_SMTP_HOST": "mail.example", "ORDER_SMTP_PORT": "smtp"}, "ORDER_SMTP_PORT"),
        ({"ORDER_SMTP_HOST": "mail.example", "ORDER_SMTP_TLS": "ssl"}, "ORDER_SMTP_TLS"),
        ({"ORDER_SMTP_HOST": "mail.example", "ORDER_SMTP_TIMEOUT": "0"}, "ORDER_SMTP_TIMEOUT"),
        ({"ORDER_SMTP_HOST": "mail.example", "ORDER_SMTP_USERNAME": "u"}, "ORDER_SMTP_PASSWORD"),
        ({"ORDER_SMTP_HOST": "mail.example", "ORDER_SMTP_CA_FILE": "/no/such"}, "CA_FILE"),
        ({"ORDER_SMTP_HOST": "mail example"}, "ORDER_SMTP_HOST"),
    ],
)
def test_bad_smtp_setting_names_the_variable(
    env: dict[str, str], var: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert var in refused(env, capsys)


# --- The ledger: the providers' memory across processes ------------------------------------


def with_ledger(outbox: Path, ledger: Path, **changes: Any) -> OrderActivities:
    """Activities keeping the providers' memory in `ledger`: a new worker process, in effect."""
    return OrderActivities(ProviderSettings.instant(outbox, sim_ledger=ledger, **changes))


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger" / "providers.sqlite"


def test_ledger_setting_from_env(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert from_env({}).sim_ledger is None
    assert ProviderSettings().sim_ledger is None
    path = tmp_path / "l.sqlite"
    assert from_env({"ORDER_SIM_LEDGER": str(path)}).sim_ledger == path
    assert "ORDER_SIM_LEDGER" in refused({"ORDER_SIM_LEDGER": str(tmp_path)}, capsys)


def test_without_a_ledger_nothing_is_written(acts: OrderActivities) -> None:
    assert acts.ledger is None


async def test_ledger_first_effect_wins_and_attempts_are_counted_apart(ledger_path: Path) -> None:
    ledger = Ledger(ledger_path)
    assert await ledger.attempt(EffectKind.CHARGE, "O-1/charge/T", "O-1") is None
    first, created = await ledger.record(
        EffectKind.CHARGE, "O-1/charge/T", "O-1", {"b": 1, "a": [1, 2]}, "CAP-T"
    )
    assert created
    assert first.request == '{"a":[1,2],"b":1}' == canonical({"a": [1, 2], "b": 1})
    assert first.params() == {"a": [1, 2], "b": 1}
    assert first.pid == os.getpid()
    again, created = await ledger.record(
        EffectKind.CHARGE, "O-1/charge/T", "O-1", {"other": True}, "CAP-X"
    )
    assert not created
    assert again == first
    assert await ledger.attempt(EffectKind.CHARGE, "O-1/charge/T", "O-1") == first
    # Another kind with the same key is another effect.
    _, created = await ledger.record(EffectKind.REFUND, "O-1/charge/T", "O-1", {}, "RFD-T")
    assert created

    # A second handle on the file (another process, in effect) sees the same.
    reopened = Ledger(ledger_path)
    assert [e.kind for e in await reopened.effects()] == [EffectKind.CHARGE, EffectKind.REFUND]
    assert await reopened.effects(EffectKind.CHARGE, order_id="O-2") == []
    assert await reopened.find(EffectKind.CHARGE, "O-1/charge/T") == first
    assert len(await reopened.attempts(EffectKind.CHARGE, "O-1")) == 2
    assert await reopened.attempts(EffectKind.REFUND) == []
    with sqlite3.connect(ledger_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_ledger_unique_results(ledger_path: Path) -> None:
    ledger = Ledger(ledger_path)
    results = []
    for order in ("O-1", "O-2", "O-3"):
        effect, _ = await ledger.record(
            EffectKind.CHARGE, f"{order}/charge/T", order, {}, "CAP-T", unique_result=True
        )
        results.append(effect.result)
    assert results == ["CAP-T", "CAP-T-2", "CAP-T-3"]
    # Not asked for: a result may repeat (a reservation id is the order's own).
    effect, _ = await ledger.record(EffectKind.RELEASE, "O-1", "O-1", {}, "CAP-T")
    assert effect.result == "CAP-T"


async def test_ledger_records_once_under_concurrent_writers(ledger_path: Path) -> None:
    # Separate handles, as separate processes would have; each record runs in its own thread.
    handles = [Ledger(ledger_path) for _ in range(8)]
    outcomes = await asyncio.gather(
        *(
            h.record(EffectKind.CHARGE, "O-1/charge/T", "O-1", {"n": n}, f"CAP-{n}")
            for n, h in enumerate(handles)
        )
    )
    assert sum(created for _, created in outcomes) == 1
    assert len({effect for effect, _ in outcomes}) == 1
    assert len(await handles[0].effects()) == 1


async def test_ledger_charges_once_across_workers(
    tmp_path: Path, ledger_path: Path, env: ActivityEnvironment
) -> None:
    # A worker charges, then dies before reporting it; the retry runs on a fresh worker.
    first = with_ledger(tmp_path / "a", ledger_path)
    capture = await env.run(first.charge_payment, charge_input())
    restarted = with_ledger(tmp_path / "b", ledger_path)
    assert await attempt(env, 2).run(restarted.charge_payment, charge_input()) == capture
    assert "ORD-1/charge/TXN-1" in restarted.payments.charges
    ledger = Ledger(ledger_path)
    assert [e.result for e in await ledger.effects(EffectKind.CHARGE)] == [capture]
    assert len(await ledger.attempts(EffectKind.CHARGE, "ORD-1")) == 2

    # The same key for another charge is refused, whichever worker sees it.
    with pytest.raises(ApplicationError) as caught:
        await env.run(restarted.charge_payment, charge_input(amount=Money("USD", 1)))
    assert caught.value.type == "IdempotencyKeyReused"
    assert caught.value.non_retryable
    # Without the ledger, the restarted worker would have charged a second time.
    forgetful = OrderActivities(ProviderSettings.instant(tmp_path / "c"))
    await env.run(forgetful.charge_payment, charge_input())
    assert "ORD-1/charge/TXN-1" in forgetful.payments.charges  # its own, second, charge
    assert len(await ledger.effects(EffectKind.CHARGE)) == 1  # the gateway saw one


async def test_ledger_capture_and_refund_ids_are_unique_across_workers(
    tmp_path: Path, ledger_path: Path, env: ActivityEnvironment
) -> None:
    # Two orders paid with the same client-chosen transaction id, on two workers.
    one = with_ledger(tmp_path / "a", ledger_path)
    two = with_ledger(tmp_path / "b", ledger_path)
    first = await env.run(one.charge_payment, charge_input("ORD-1/charge/TXN-1"))
    second = await env.run(two.charge_payment, charge_input("ORD-2/charge/TXN-1", order_id="ORD-2"))
    assert (first, second) == ("CAP-TXN-1", "CAP-TXN-1-2")
    refunds = [
        await env.run(
            acts.refund_payment, RefundPaymentInput(order, "TXN-1", LAPTOP, f"{order}/refund/TXN-1")
        )
        for acts, order in ((two, "ORD-1"), (one, "ORD-2"))
    ]
    assert refunds == ["RFD-TXN-1", "RFD-TXN-1-2"]


async def test_the_book_reads_every_workers_payments_from_the_ledger(
    tmp_path: Path, ledger_path: Path, env: ActivityEnvironment
) -> None:
    first = with_ledger(tmp_path / "a", ledger_path)
    second = with_ledger(tmp_path / "b", ledger_path)
    await env.run(first.charge_payment, charge_input("ORD-1/charge/TXN-1"))
    await env.run(second.charge_payment, charge_input("ORD-1/charge/TXN-2"))
    await env.run(
        second.refund_payment, RefundPaymentInput("ORD-1", "TXN-1", LAPTOP, "ORD-1/refund/TXN-1")
    )
    for worker in (first, second, with_ledger(tmp_path / "c", ledger_path)):
        assert await worker.payments.captured("ORD-1") == [LAPTOP, LAPTOP]
        assert await worker.payments.refunded("ORD-1") == [LAPTOP]


async def test_ledger_refunds_once_across_workers(
    tmp_path: Path, ledger_path: Path, env: ActivityEnvironment
) -> None:
    refund = RefundPaymentInput("ORD-1", "TXN-1", LAPTOP, "ORD-1/refund/TXN-1")
    first = await env.run(with_ledger(tmp_path / "a", ledger_path).refund_payment, refund)
    restarted = with_ledger(tmp_path / "b", ledger_path)
    assert await env.run(restarted.refund_payment, refund) == first
    with pytest.raises(ApplicationError) as caught:
        await env.run(restarted.refund_payment, dataclasses.replace(refund, amount=Money("USD", 1)))
    assert caught.value.type == "IdempotencyKeyReused"
    ledger = Ledger(ledger_path)
    assert len(await ledger.effects(EffectKind.REFUND)) == 1
    assert len(await ledger.attempts(EffectKind.REFUND)) == 3


async def test_ledger_reserves_and_releases_once_across_workers(
    tmp_path: Path, ledger_path: Path, env: ActivityEnvironment
) -> None:
    stock = {"PROD-123": 5, "PROD-9": 2}
    first = with_ledger(tmp_path / "a", ledger_path, sim_stock=stock)
    reservation_id = await env.run(first.reserve_inventory, ReserveInventoryInput("ORD-1", ITEMS))
    assert levels(first) == (4, 0)

    # A fresh worker: the retried reservation is the same one and takes none of its stock.
    second = with_ledger(tmp_path / "b", ledger_path, sim_stock=stock)
    again = await env.run(second.reserve_inventory, ReserveInventoryInput("ORD-1", ITEMS))
    assert again == reservation_id
    assert levels(second) == (5, 2)
    assert second.inventory.reservations["ORD-1"].quantity == 3

    # Released on the second worker: once, giving back none of the stock it never took.
    release = ReleaseInventoryInput("ORD-1", reservation_id)
    await env.run(second.release_inventory, release)
    assert levels(second) == (5, 2)
    # The first worker, retrying the release, learns it is done and gets its stock back.
    await env.run(first.release_inventory, release)
    await env.run(first.release_inventory, release)
    assert first.inventory.reservations["ORD-1"].released
    assert levels(first) == (5, 2)
    # Nothing reserved, nothing released.
    await env.run(second.release_inventory, ReleaseInventoryInput("ORD-2", ""))

    ledger = Ledger(ledger_path)
    assert [(e.kind, e.key) for e in await ledger.effects()] == [
        (EffectKind.RESERVE, "ORD-1"),
        (EffectKind.RELEASE, "ORD-1"),
    ]
    assert (await ledger.effects(EffectKind.RESERVE))[0].params()["quantity"] == 3
    assert len(await ledger.attempts(EffectKind.RELEASE, "ORD-1")) == 3
    assert len(await ledger.attempts(EffectKind.RELEASE, "ORD-2")) == 1


async def test_ledger_emails_once_across_workers(
    tmp_path: Path, ledger_path: Path, env: ActivityEnvironment
) -> None:
    # Each worker with its own outbox, so only the ledger can stop the second email.
    note = notification(NotificationKind.ORDER_SHIPPED)
    await env.run(with_ledger(tmp_path / "a", ledger_path).send_notification, note)
    restarted = with_ledger(tmp_path / "b", ledger_path)
    await env.run(restarted.send_notification, note)
    assert len(emails_in(tmp_path / "a")) == 1
    assert emails_in(tmp_path / "b") == []
    ledger = Ledger(ledger_path)
    (sent,) = await ledger.effects(EffectKind.EMAIL)
    assert sent.key == note.idempotency_key == "ORD-1/order_shipped"
    assert sent.result == read_email(emails_in(tmp_path / "a")[0])["Message-ID"]
    assert sent.params() == {"order_id": "ORD-1", "kind": "order_shipped", "to": note.recipient}
    assert restarted.mail.sent == {note.idempotency_key: sent.result}


async def test_ledger_keeps_nothing_of_a_cut_off_or_failed_attempt(
    tmp_path: Path, ledger_path: Path, env: ActivityEnvironment
) -> None:
    # Cut off in the middle of the gateway call (the worker stopping): no charge.
    slow = with_ledger(tmp_path / "a", ledger_path, sim_payment_seconds=30.0)
    heartbeat = asyncio.Event()
    slow_env = ActivityEnvironment()
    slow_env.on_heartbeat = lambda *details: heartbeat.set()
    task = asyncio.create_task(slow_env.run(slow.charge_payment, charge_input()))
    await asyncio.wait_for(heartbeat.wait(), timeout=5)
    slow_env.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Declined: counted as an attempt, never charged.
    declining = with_ledger(
        tmp_path / "b", ledger_path, sim_decline_methods=frozenset({"declined_card"})
    )
    with pytest.raises(ApplicationError, match="declined"):
        await env.run(
            declining.charge_payment,
            dataclasses.replace(
                charge_input("ORD-2/charge/TXN-1", order_id="ORD-2"), payment_method="declined_card"
            ),
        )
    # A simulated outage fails before the provider: not even an attempt.
    outage = with_ledger(tmp_path / "c", ledger_path, sim_fail_first_attempts=1)
    with pytest.raises(ApplicationError, match="unavailable"):
        await env.run(outage.charge_payment, charge_input())
    ledger = Ledger(ledger_path)
    assert await ledger.effects() == []
    assert [a.order_id for a in await ledger.attempts(EffectKind.CHARGE)] == ["ORD-1", "ORD-2"]

    # The retry, on yet another worker, charges once.
    await attempt(env, 2).run(
        with_ledger(tmp_path / "d", ledger_path).charge_payment, charge_input()
    )
    assert len(await ledger.effects(EffectKind.CHARGE)) == 1


async def test_ledger_concurrent_attempts_on_two_workers_charge_once(
    tmp_path: Path, ledger_path: Path
) -> None:
    # A retry started while the first attempt still runs (a timed-out, not dead, worker).
    workers = [
        with_ledger(tmp_path / str(n), ledger_path, sim_payment_seconds=0.2) for n in range(2)
    ]
    captures = await asyncio.gather(
        *(ActivityEnvironment().run(w.charge_payment, charge_input()) for w in workers)
    )
    assert captures == ["CAP-TXN-1", "CAP-TXN-1"]
    ledger = Ledger(ledger_path)
    assert len(await ledger.effects(EffectKind.CHARGE)) == 1
    assert len(await ledger.attempts(EffectKind.CHARGE)) == 2
