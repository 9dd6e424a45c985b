"""Every failure ends in a settled order: compensated before the hand-over, recorded after it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.client import WorkflowFailureError, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from acme.orders.v1 import order_service_pb2 as pb
from activities.providers import ProviderSettings
from tests.support.orders import create_request, payment_request
from tests.support.polling import eventually
from tests.support.stack import Stack, open_stack, order_reaching
from workflows.models import OrderState, OrderStatus
from workflows.order_workflow import STEP_GIVE_UP

S = pb.OrderStatus


@pytest_asyncio.fixture
async def failing(
    temporal: WorkflowEnvironment, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Stack]:
    """A stack whose providers refuse, for good, the activities the test is parametrized with."""
    simulation = ProviderSettings.instant(
        tmp_path, sim_prepare_seconds=2.0, sim_fail_for_good=frozenset(request.param)
    )
    async with open_stack(temporal.client, tmp_path, simulation=simulation) as stack:
        yield stack


async def paid_order(stack: Stack) -> WorkflowHandle[object, OrderState]:
    created = await stack.stub.CreateOrder(create_request())
    await stack.stub.ConfirmPayment(payment_request(created.order_id, "TXN-SETTLE"))
    return stack.client.get_workflow_handle(created.workflow_id, result_type=OrderState)


@pytest.mark.parametrize("failing", [{"prepare_shipment"}], indirect=True)
async def test_packing_that_fails_for_good_cancels_and_compensates(failing: Stack) -> None:
    state = await (await paid_order(failing)).result()
    assert state.status == OrderStatus.CANCELLED
    assert state.cancellation_reason is not None
    assert state.cancellation_reason.startswith("Packing failed: ")
    assert state.refund_info is not None
    assert state.refund_info.amount == state.total_amount
    assert state.inventory_info.released
    assert state.failures == []


@pytest.mark.parametrize("failing", [{"deliver_order"}], indirect=True)
async def test_a_failure_after_the_hand_over_is_recorded_never_refunded(failing: Stack) -> None:
    state = await (await paid_order(failing)).result()
    assert state.status == OrderStatus.SHIPPED  # the parcel is with the carrier
    assert [failure.step for failure in state.failures] == ["deliver_order"]
    assert "refuses it for good" in state.failures[0].error
    assert state.refund_info is None
    assert not state.inventory_info.released
    order = await failing.stub.GetOrder(pb.GetOrderRequest(order_id=state.order_id))
    assert [failure.step for failure in order.failures] == ["deliver_order"]


@pytest.mark.parametrize("failing", [{"refund_payment"}], indirect=True)
async def test_a_refund_refused_for_good_is_recorded_and_the_release_still_runs(
    failing: Stack,
) -> None:
    handle = await paid_order(failing)
    order_id = handle.id.removeprefix("order-")
    await order_reaching(failing, order_id, S.ORDER_STATUS_PREPARING)
    await failing.stub.CancelOrder(pb.CancelOrderRequest(order_id=order_id))
    state = await handle.result()
    assert state.status == OrderStatus.CANCELLED
    assert [failure.step for failure in state.failures] == ["refund_payment"]
    assert state.refund_info is None
    assert state.inventory_info.released  # the rest of the compensation ran
    # Settled: a watch of the order ends.
    updates = [u async for u in failing.stub.WatchOrder(pb.WatchOrderRequest(order_id=order_id))]
    assert updates[-1].status == S.ORDER_STATUS_CANCELLED


async def test_a_workflow_cancel_cancels_the_packing_in_flight(slow_stack: Stack) -> None:
    handle = await paid_order(slow_stack)
    order_id = handle.id.removeprefix("order-")
    await order_reaching(slow_stack, order_id, S.ORDER_STATUS_PREPARING)
    await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    history = await handle.fetch_history()
    assert any(
        e.HasField("activity_task_cancel_requested_event_attributes") for e in history.events
    )
    order = await eventually(
        lambda: slow_stack.stub.GetOrder(pb.GetOrderRequest(order_id=order_id)),
        lambda o: o.inventory_info.released,
        within=10,
    )
    assert order.status == S.ORDER_STATUS_CANCELLED
    assert order.refund_info.amount == order.total_amount


async def test_forward_steps_give_up_after_a_day(stack: Stack) -> None:
    """The retry limit of the forward steps is what its comment says."""
    handle = await paid_order(stack)
    await handle.result()
    limits = {
        e.activity_task_scheduled_event_attributes.activity_type.name: (
            e.activity_task_scheduled_event_attributes.schedule_to_close_timeout.ToTimedelta()
        )
        for e in (await handle.fetch_history()).events
        if e.HasField("activity_task_scheduled_event_attributes")
    }
    assert timedelta(days=1) == STEP_GIVE_UP
    for step in ("reserve_inventory", "prepare_shipment", "ship_order", "deliver_order"):
        assert limits[step] == STEP_GIVE_UP, step
    assert limits["charge_payment"] == timedelta(hours=1)
