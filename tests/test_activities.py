"""The activities against their simulated providers, outside any workflow."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest
from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.config import SimulationConfig
from activities.email import TITLES
from activities.mailer import OutboxMailer
from activities.order_activities import OrderActivities
from workflows.models import (
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
ADDRESS = ShippingAddress("123 Main St", "San Francisco", "94102", "USA")
# The Date header comes from the activity's first schedule time.
SCHEDULED = datetime(2025, 1, 31, 14, 30, 22, tzinfo=UTC)


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    return tmp_path / "outbox"


@pytest.fixture
def acts(outbox: Path) -> OrderActivities:
    return OrderActivities(SimulationConfig.instant(outbox))


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


def read_email(path: Path) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
    assert isinstance(message, EmailMessage)
    return message


def emails_in(outbox: Path) -> list[Path]:
    return sorted(outbox.rglob("*.eml"))


def body_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert isinstance(part, EmailMessage)
    return str(part.get_content())


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
    assert list(acts.reservations) == ["ORD-1"]
    assert acts.reservations["ORD-1"].quantity == 3


async def test_reserve_without_items_is_not_retryable(
    acts: OrderActivities, env: ActivityEnvironment
) -> None:
    with pytest.raises(ApplicationError) as caught:
        await env.run(acts.reserve_inventory, ReserveInventoryInput("ORD-1", []))
    assert caught.value.non_retryable
    assert caught.value.type == "InvalidOrder"
    assert acts.reservations == {}


async def test_release_is_idempotent(acts: OrderActivities, env: ActivityEnvironment) -> None:
    reservation_id = await env.run(acts.reserve_inventory, ReserveInventoryInput("ORD-1", ITEMS))
    await env.run(acts.release_inventory, ReleaseInventoryInput("ORD-1", reservation_id))
    await env.run(acts.release_inventory, ReleaseInventoryInput("ORD-1", reservation_id))
    assert acts.reservations["ORD-1"].released
    # Compensation for a reservation that never happened is a no-op, not an error.
    await env.run(acts.release_inventory, ReleaseInventoryInput("ORD-2", ""))
    assert "ORD-2" not in acts.reservations


# --- Payment ----------------------------------------------------------------------


async def test_charge_twice_with_one_key_charges_once(
    acts: OrderActivities, env: ActivityEnvironment
) -> None:
    first = await env.run(acts.charge_payment, charge_input())
    again = await env.run(acts.charge_payment, charge_input())
    assert first == again == "CAP-TXN-1"
    assert len(acts.charges) == 1
    assert acts.charge_count("ORD-1/charge/TXN-1") == 1
    assert acts.charge_count("ORD-1/charge/TXN-2") == 0
    assert acts.charges["ORD-1/charge/TXN-1"].amount == LAPTOP


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
    assert acts.charges["ORD-1/charge/TXN-1"].amount == LAPTOP


async def test_charges_under_different_keys_get_different_ids(
    acts: OrderActivities, env: ActivityEnvironment
) -> None:
    # Two orders paid with the same (client-chosen) transaction id.
    first = await env.run(acts.charge_payment, charge_input("ORD-1/charge/TXN-1"))
    second = await env.run(
        acts.charge_payment, charge_input("ORD-2/charge/TXN-1", order_id="ORD-2")
    )
    assert first != second
    assert len(acts.charges) == 2


async def test_non_positive_charge_is_not_retryable(
    acts: OrderActivities, env: ActivityEnvironment
) -> None:
    with pytest.raises(ApplicationError) as caught:
        await env.run(acts.charge_payment, charge_input(amount=Money("USD")))
    assert caught.value.non_retryable
    assert acts.charges == {}


async def test_refund_is_once_per_key(acts: OrderActivities, env: ActivityEnvironment) -> None:
    refund = RefundPaymentInput("ORD-1", "TXN-1", LAPTOP, "ORD-1/refund/TXN-1")
    first = await env.run(acts.refund_payment, refund)
    again = await env.run(acts.refund_payment, refund)
    assert first == again == "RFD-TXN-1"
    assert acts.refund_count("ORD-1/refund/TXN-1") == 1
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
    assert list(acts.shipments) == ["ORD-1"]

    deliver = DeliverOrderInput("ORD-1", shipment.tracking_number)
    await env.run(acts.deliver_order, deliver)
    await env.run(acts.deliver_order, deliver)
    assert list(acts.deliveries) == [shipment.tracking_number]


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
    restarted = OrderActivities(SimulationConfig.instant(outbox))
    await retry_env.run(restarted.send_notification, note)

    assert path.stat().st_ino == first.st_ino
    assert path.stat().st_mtime_ns == first.st_mtime_ns
    assert path.read_bytes() == content
    assert len(list(path.parent.iterdir())) == 1
    assert acts.sent_emails == {note.idempotency_key: read_email(path)["Message-ID"]}


async def test_message_id_is_the_same_for_every_retry(
    env: ActivityEnvironment, tmp_path: Path
) -> None:
    ids = []
    for n in range(2):
        acts = OrderActivities(SimulationConfig.instant(tmp_path / str(n)))
        await env.run(acts.send_notification, notification(NotificationKind.ORDER_SHIPPED))
        ids.append(read_email(tmp_path / str(n) / "ORD-1" / "order_shipped.eml")["Message-ID"])
    assert ids[0] == ids[1]
    other = OrderActivities(SimulationConfig.instant(tmp_path / "other"))
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
    config = dataclasses.replace(SimulationConfig.instant(outbox), payment=0.3, deliver=1.5)
    acts = OrderActivities(config)
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
    acts = OrderActivities(dataclasses.replace(SimulationConfig.instant(outbox), deliver=30.0))
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
    assert acts.deliveries == {}
    assert any("ORD-1: delivery interrupted" in r.getMessage() for r in caplog.records)


# --- Configuration ----------------------------------------------------------------


def test_instant_config_is_all_zero(tmp_path: Path) -> None:
    config = SimulationConfig.instant(str(tmp_path))
    assert (config.inventory, config.payment, config.prepare) == (0.0, 0.0, 0.0)
    assert (config.ship, config.deliver, config.email) == (0.0, 0.0, 0.0)
    assert config.outbox_dir == tmp_path


def test_config_from_env() -> None:
    default = SimulationConfig.from_env({})
    assert default == SimulationConfig()
    assert default.outbox_dir == Path("outbox")
    config = SimulationConfig.from_env(
        {
            "ORDER_SIM_DELIVER_SECONDS": "1.5",
            "ORDER_SIM_EMAIL_SECONDS": "0",
            "ORDER_OUTBOX_DIR": "/x",
        }
    )
    assert config.deliver == 1.5
    assert config.email == 0.0
    assert config.payment == default.payment
    assert config.outbox_dir == Path("/x")


def test_demo_defaults_deliver_within_30_s_and_leave_time_to_cancel() -> None:
    c = SimulationConfig()
    after_payment = c.payment + c.prepare + c.ship + c.deliver + 3 * c.email
    assert after_payment < 30
    assert c.payment + c.prepare >= 5


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_bad_duration_names_the_variable(value: str) -> None:
    with pytest.raises(ValueError, match="ORDER_SIM_SHIP_SECONDS"):
        SimulationConfig.from_env({"ORDER_SIM_SHIP_SECONDS": value})
