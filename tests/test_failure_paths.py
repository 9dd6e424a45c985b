"""The failure paths, end to end through gRPC, made happen by the simulated providers.

Out of stock and a declined card end the order, compensated; transient
outages are retried (each one an attempt in the workflow's history) and the
order completes; compensation that fails is retried until it succeeds, also
when the workflow itself is cancelled or the payment times out.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from email import message_from_bytes
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import CancelledError
from temporalio.testing import WorkflowEnvironment

from acme.orders.v1 import order_service_pb2 as pb
from activities.providers import ProviderSettings
from tests.support.money import assert_money_moved
from tests.support.orders import (
    LAPTOP_PRICE,
    activity_attempts,
    create_request,
    email_workflows,
    failure_message,
    money,
    payment_request,
)
from tests.support.polling import eventually
from tests.support.stack import Stack, open_stack, order_reaching

S = pb.OrderStatus
# On the `rules` stack every product has 10 units in stock, except this one.
SOLD_OUT = "PROD-SOLD-OUT"


def item(product_id: str, quantity: int = 1, price: object = LAPTOP_PRICE) -> pb.OrderItem:
    return pb.OrderItem(
        product_id=product_id, product_name="Laptop", quantity=quantity, price=price
    )


def new_product() -> str:
    """A product of its own for one test, so that tests sharing a stack share no stock."""
    return f"PROD-{uuid.uuid4().hex[:8]}"


def emails(outbox: Path, order_id: str) -> dict[str, str]:
    """Kind → body of each email written for the order."""
    found = {}
    for path in sorted((outbox / order_id).glob("*.eml")):
        message = message_from_bytes(path.read_bytes())
        payload = message.get_payload(decode=True)
        assert isinstance(payload, bytes)
        found[path.stem] = payload.decode()
    return found


async def reserved(stack: Stack, order_id: str) -> pb.Order:
    """The order once its inventory is reserved (PENDING alone comes before that)."""
    return await eventually(
        lambda: stack.stub.GetOrder(pb.GetOrderRequest(order_id=order_id)),
        lambda order: bool(order.inventory_info.reservation_id),
    )


async def finished(stack: Stack, order_id: str) -> pb.Order:
    """The order once its workflow has completed (all compensation and emails done)."""
    await stack.client.get_workflow_handle(f"order-{order_id}").result()
    return await stack.stub.GetOrder(pb.GetOrderRequest(order_id=order_id))


# --- Stock and decline rules: final failures -------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def rules(
    temporal: WorkflowEnvironment, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """Instant providers with limited stock and a gateway that declines some payments."""
    outbox = tmp_path_factory.mktemp("rules-outbox")
    simulation = ProviderSettings.instant(
        outbox,
        sim_stock={SOLD_OUT: 0, "*": 10},
        sim_decline_methods=frozenset({"declined_card"}),
        sim_decline_over=Decimal("5000"),
    )
    async with open_stack(temporal.client, outbox, simulation=simulation) as stack:
        yield stack


async def test_out_of_stock_cancels_and_charges_nothing(rules: Stack) -> None:
    product = new_product()
    created = await rules.stub.CreateOrder(create_request(items=[item(product, 3), item(SOLD_OUT)]))
    order = await finished(rules, created.order_id)

    assert order.status == S.ORDER_STATUS_CANCELLED
    assert order.cancellation_reason == (
        f"Inventory not reserved: Out of stock: {SOLD_OUT} (requested 1, available 0)"
    )
    # Nothing reserved, so nothing held and nothing to release; no stock taken.
    assert order.inventory_info.reservation_id == ""
    assert created.order_id not in rules.activities.inventory.reservations
    assert rules.activities.inventory.stock_level(product) == 10
    await assert_money_moved(rules.activities, created.order_id, captured=None)
    # The customer is told why; no "order received" was ever sent.
    await email_workflows(rules.client, created.workflow_id)
    sent = emails(rules.outbox, created.order_id)
    assert set(sent) == {"order_cancelled"}
    assert f"{SOLD_OUT} (requested 1, available 0)" in sent["order_cancelled"]


async def test_stock_is_taken_and_given_back(rules: Stack) -> None:
    product = new_product()
    # Two lines of the same product count together.
    first = await rules.stub.CreateOrder(create_request(items=[item(product, 4), item(product, 5)]))
    await reserved(rules, first.order_id)
    assert rules.activities.inventory.stock_level(product) == 1

    # Only 1 left: the next order for 2 cannot be reserved.
    second = await rules.stub.CreateOrder(create_request(items=[item(product, 2)]))
    order = await finished(rules, second.order_id)
    assert order.cancellation_reason.endswith(f"{product} (requested 2, available 1)")

    # Cancelling the first gives its 9 back.
    await rules.stub.CancelOrder(pb.CancelOrderRequest(order_id=first.order_id))
    order = await finished(rules, first.order_id)
    assert order.inventory_info.released
    assert rules.activities.inventory.stock_level(product) == 10
    for order_id in (first.order_id, second.order_id):
        await assert_money_moved(rules.activities, order_id, captured=None)


async def test_declined_card_cancels_and_compensates(rules: Stack) -> None:
    product = new_product()
    created = await rules.stub.CreateOrder(create_request(items=[item(product, 2)]))
    await reserved(rules, created.order_id)
    assert rules.activities.inventory.stock_level(product) == 8

    await rules.stub.ConfirmPayment(
        payment_request(
            created.order_id, payment_method="declined_card", amount=money(1999, 980_000_000)
        )
    )
    order = await finished(rules, created.order_id)

    reason = "Payment failed: Card declined by the gateway (payment method 'declined_card')"
    assert order.status == S.ORDER_STATUS_CANCELLED
    assert order.cancellation_reason == reason
    [rejected] = order.rejected_payments
    assert (rejected.transaction_id, rejected.reason) == ("TXN-1", reason)
    assert rejected.payment_method == "declined_card"
    # Never captured, so nothing to refund; the items go back on the shelf.
    assert not order.HasField("payment_info")
    assert not order.HasField("refund_info")
    await assert_money_moved(rules.activities, created.order_id, captured=None)
    assert order.inventory_info.released
    assert rules.activities.inventory.stock_level(product) == 10
    await email_workflows(rules.client, created.workflow_id)
    sent = emails(rules.outbox, created.order_id)
    assert set(sent) == {"order_received", "order_cancelled"}
    assert "Card declined by the gateway" in sent["order_cancelled"]


async def test_charge_over_the_limit_is_declined(rules: Stack) -> None:
    # 6 × 999.99 = 5999.94, over the 5000 limit.
    created = await rules.stub.CreateOrder(create_request(items=[item(new_product(), 6)]))
    await rules.stub.ConfirmPayment(
        payment_request(created.order_id, amount=money(5999, 940_000_000))
    )
    order = await finished(rules, created.order_id)
    assert order.status == S.ORDER_STATUS_CANCELLED
    assert order.cancellation_reason == (
        "Payment failed: Charge of USD 5999.94 declined by the gateway: above the limit of 5000"
    )
    assert order.inventory_info.released
    await assert_money_moved(rules.activities, created.order_id, captured=None)


async def test_orders_within_the_rules_go_through(rules: Stack) -> None:
    product = new_product()
    # 5 × 999.99 = 4999.95: under the limit, and the last 10 units of the product.
    created = await rules.stub.CreateOrder(create_request(items=[item(product, 5)]))
    await rules.stub.ConfirmPayment(
        payment_request(created.order_id, amount=money(4999, 950_000_000))
    )
    await order_reaching(rules, created.order_id, S.ORDER_STATUS_DELIVERED)
    second = await rules.stub.CreateOrder(create_request(items=[item(product, 5)]))
    await rules.stub.ConfirmPayment(
        payment_request(second.order_id, amount=money(4999, 950_000_000))
    )
    for order_id in (created.order_id, second.order_id):
        order = await finished(rules, order_id)
        assert order.status == S.ORDER_STATUS_DELIVERED
        assert f"{order_id}/charge/TXN-1" in rules.activities.payments.charges
        await assert_money_moved(
            rules.activities, order_id, captured=money(4999, 950_000_000), refunded=None
        )
    assert rules.activities.inventory.stock_level(product) == 0  # delivered goods stay taken


# --- Transient failures: retried, and the order completes ------------------------------


async def test_transient_failures_are_retried_and_the_order_is_delivered(
    stack: Stack, tmp_path: Path
) -> None:
    # Two steps only, to keep it short: 2 failures are 1 s + 2 s of backoff each.
    simulation = ProviderSettings.instant(
        tmp_path / "outbox",
        sim_fail_first_attempts=2,
        sim_fail_activities=frozenset({"charge_payment", "ship_order"}),
    )
    async with open_stack(stack.client, tmp_path / "outbox", simulation=simulation) as flaky:
        created = await flaky.stub.CreateOrder(create_request())
        await flaky.stub.ConfirmPayment(payment_request(created.order_id))
        order = await order_reaching(flaky, created.order_id, S.ORDER_STATUS_DELIVERED)
        handle = flaky.client.get_workflow_handle(created.workflow_id)
        await handle.result()
        history = await handle.fetch_history()

        assert order.payment_info.transaction_id == "TXN-1"
        assert order.shipment_info.tracking_number
        # Charged once, however often the gateway was tried.
        assert f"{created.order_id}/charge/TXN-1" in flaky.activities.payments.charges
        await assert_money_moved(flaky.activities, created.order_id, captured=LAPTOP_PRICE)
        assert len(flaky.activities.shipping.shipments) == 1
        attempts = activity_attempts(history)
        assert attempts["charge_payment"] == [3]
        assert attempts["ship_order"] == [3]
        assert attempts["reserve_inventory"] == attempts["deliver_order"] == [1]
        # The failure each retry rode out is in the history too (sealed, read with the keys).
        failures = [
            await failure_message(
                flaky.client, e.activity_task_started_event_attributes.last_failure
            )
            for e in history.events
            if e.HasField("activity_task_started_event_attributes")
            and e.activity_task_started_event_attributes.attempt > 1
        ]
        simulated = "(simulated: attempt 2, the first 2 attempt(s) fail)"
        assert failures == [
            f"The payment gateway is unavailable {simulated}",
            f"The carrier is unavailable {simulated}",
        ]
        await email_workflows(flaky.client, created.workflow_id)
        assert set(emails(flaky.outbox, created.order_id)) == {
            "order_received",
            "payment_confirmed",
            "order_shipped",
            "order_delivered",
        }


# --- Compensation: retried until it succeeds, never skipped -------------------------------


async def test_compensation_is_retried_when_the_workflow_is_cancelled(
    stack: Stack, tmp_path: Path
) -> None:
    """`temporal workflow cancel` while packing; refund and release each fail twice first."""
    product = new_product()
    simulation = ProviderSettings.instant(
        tmp_path / "outbox",
        sim_prepare_seconds=30.0,
        sim_stock={product: 2},
        sim_fail_first_attempts=2,
        sim_fail_activities=frozenset({"refund_payment", "release_inventory"}),
    )
    async with open_stack(stack.client, tmp_path / "outbox", simulation=simulation) as flaky:
        created = await flaky.stub.CreateOrder(create_request(items=[item(product, 2)]))
        await flaky.stub.ConfirmPayment(
            payment_request(created.order_id, amount=money(1999, 980_000_000))
        )
        await order_reaching(flaky, created.order_id, S.ORDER_STATUS_PREPARING)
        assert flaky.activities.inventory.stock_level(product) == 0

        handle = flaky.client.get_workflow_handle(created.workflow_id)
        await handle.cancel()
        with pytest.raises(WorkflowFailureError) as caught:
            await handle.result()
        assert isinstance(caught.value.cause, CancelledError)
        assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED

        order = await flaky.stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))
        assert order.status == S.ORDER_STATUS_CANCELLED
        assert order.cancellation_reason == "Order workflow was cancelled"
        assert order.refund_info.transaction_id == "TXN-1"
        assert order.inventory_info.released
        assert f"{created.order_id}/refund/TXN-1" in flaky.activities.payments.refunds
        paid = money(1999, 980_000_000)
        await assert_money_moved(flaky.activities, created.order_id, captured=paid, refunded=paid)
        # Given back once, not three times.
        assert flaky.activities.inventory.stock_level(product) == 2
        attempts = activity_attempts(await handle.fetch_history())
        assert attempts["refund_payment"] == [3]
        assert attempts["release_inventory"] == [3]


async def test_compensation_is_retried_after_the_payment_timeout(
    stack: Stack, tmp_path: Path
) -> None:
    # One failure is enough to show the retry (the test above shows two).
    simulation = ProviderSettings.instant(
        tmp_path / "outbox",
        sim_fail_first_attempts=1,
        sim_fail_activities=frozenset({"release_inventory"}),
    )
    async with open_stack(
        stack.client, tmp_path / "outbox", simulation=simulation, payment_timeout_seconds=1
    ) as flaky:
        created = await flaky.stub.CreateOrder(create_request())
        order = await finished(flaky, created.order_id)
        assert order.status == S.ORDER_STATUS_CANCELLED
        assert order.cancellation_reason == "Payment not received within 1 s"
        assert order.inventory_info.released
        assert flaky.activities.inventory.reservations[created.order_id].released
        await assert_money_moved(flaky.activities, created.order_id, captured=None)
        handle = flaky.client.get_workflow_handle(created.workflow_id)
        assert activity_attempts(await handle.fetch_history())["release_inventory"] == [2]
        await email_workflows(flaky.client, created.workflow_id)
        assert "order_cancelled" in emails(flaky.outbox, created.order_id)


async def test_workflow_cancelled_before_payment_still_emails_the_customer(rules: Stack) -> None:
    created = await rules.stub.CreateOrder(create_request(items=[item(new_product())]))
    await reserved(rules, created.order_id)
    handle = rules.client.get_workflow_handle(created.workflow_id)
    await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    order = await rules.stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))
    assert order.inventory_info.released
    await assert_money_moved(rules.activities, created.order_id, captured=None)
    await eventually(
        lambda: asyncio.sleep(0, emails(rules.outbox, created.order_id)),
        lambda sent: "order_cancelled" in sent,
        within=2,
    )
