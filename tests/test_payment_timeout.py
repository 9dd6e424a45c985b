"""The default 24-hour payment window, on Temporal's time-skipping test server."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from activities.order_activities import OrderActivities
from activities.providers import ProviderSettings
from tests.support.money import assert_money_moved
from tests.support.orders import email_workflows
from worker.app import build_worker
from workflows.models import (
    CONFIRM_PAYMENT_SIGNAL,
    WORKFLOW_NAME,
    OrderInput,
    OrderItem,
    OrderState,
    OrderStatus,
    PaymentRequest,
    ShippingAddress,
    workflow_id_for,
)
from workflows.money import Money

PRICE = Money("USD", 999, 990_000_000)


async def start_order(
    env: WorkflowEnvironment, task_queue: str
) -> WorkflowHandle[object, OrderState]:
    order_id = f"ORD-TS{uuid.uuid4().hex[:14].upper()}"
    order = OrderInput(
        order_id=order_id,
        customer_id="CUST-001",
        items=[OrderItem("PROD-123", "Laptop", 1, PRICE)],
        shipping=ShippingAddress("123 Main St", "San Francisco", "94102", "USA"),
    )
    return await env.client.start_workflow(
        WORKFLOW_NAME,
        order,
        id=workflow_id_for(order_id),
        task_queue=task_queue,
        result_type=OrderState,
    )


async def test_no_payment_in_24_hours_cancels(
    skipping: WorkflowEnvironment, tmp_path: Path
) -> None:
    task_queue = f"ts-{uuid.uuid4().hex[:8]}"
    activities = OrderActivities(ProviderSettings.instant(tmp_path))
    async with build_worker(skipping.client, task_queue, activities):
        handle = await start_order(skipping, task_queue)
        state = await handle.result()  # the server skips the 24 hours
        # The emails are workflows of their own, sent while this worker runs.
        await email_workflows(skipping.client, handle.id)
    assert state.status == OrderStatus.CANCELLED
    assert state.cancellation_reason == "Payment not received within 24 h"
    assert state.inventory_info.released
    assert state.payment_info is None
    assert state.updated_at - state.created_at >= timedelta(hours=24)
    await assert_money_moved(activities, state.order_id, captured=None)


async def test_payment_within_24_hours_completes(
    skipping: WorkflowEnvironment, tmp_path: Path
) -> None:
    task_queue = f"ts-{uuid.uuid4().hex[:8]}"
    activities = OrderActivities(ProviderSettings.instant(tmp_path))
    async with build_worker(skipping.client, task_queue, activities):
        handle = await start_order(skipping, task_queue)
        await skipping.sleep(timedelta(hours=23, minutes=59))
        await handle.signal(CONFIRM_PAYMENT_SIGNAL, PaymentRequest("TXN-LATE", PRICE, "card"))
        state = await handle.result()
        await email_workflows(skipping.client, handle.id)
    assert state.status == OrderStatus.DELIVERED
    assert state.payment_info is not None
    assert state.payment_info.transaction_id == "TXN-LATE"
    await assert_money_moved(activities, state.order_id, captured=PRICE)


async def test_gateway_without_verdict_for_an_hour_cancels_and_refunds(
    skipping: WorkflowEnvironment, tmp_path: Path
) -> None:
    """A charge that keeps failing may have gone through: the order refunds it to be sure."""
    task_queue = f"ts-{uuid.uuid4().hex[:8]}"
    simulation = ProviderSettings.instant(
        tmp_path, sim_failure_rate=1.0, sim_fail_activities=frozenset({"charge_payment"})
    )
    activities = OrderActivities(simulation)
    async with build_worker(skipping.client, task_queue, activities):
        handle = await start_order(skipping, task_queue)
        await handle.signal(CONFIRM_PAYMENT_SIGNAL, PaymentRequest("TXN-LIMBO", PRICE, "card"))
        state = await handle.result()  # the hour of retries is skipped
        await email_workflows(skipping.client, handle.id)
    assert state.status == OrderStatus.CANCELLED
    assert state.cancellation_reason is not None
    assert state.cancellation_reason.startswith("Payment failed: ")
    assert state.refund_info is not None
    assert state.refund_info.transaction_id == "TXN-LIMBO"
    assert state.inventory_info.released
    # No attempt reached the gateway, so nothing was captured; the refund by the
    # charge's key, to be sure, is of exactly the amount that could have been.
    await assert_money_moved(activities, state.order_id, captured=None, refunded=PRICE)
