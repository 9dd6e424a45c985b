"""The seed's four scenarios and the payment timeout, end to end through gRPC."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from email import message_from_bytes
from pathlib import Path
from typing import Any

import grpc
import pytest
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle

from acme.orders.v1 import order_service_pb2 as pb
from tests.support.emails import body_of, read_email
from tests.support.money import assert_money_moved
from tests.support.orders import (
    LAPTOP_PRICE,
    create_request,
    email_workflows,
    money,
    payment_request,
)
from tests.support.polling import eventually
from tests.support.stack import Stack, open_stack, order_reaching
from workflows.models import CANCEL_ORDER_SIGNAL, CancelRequest

S = pb.OrderStatus


def email_subjects(outbox: Path, order_id: str) -> dict[str, str]:
    """Kind of email → its subject, for every email written for one order."""
    subjects = {}
    for path in sorted((outbox / order_id).glob("*.eml")):
        subjects[path.stem] = str(message_from_bytes(path.read_bytes())["Subject"])
    return subjects


async def test_happy_path(stack: Stack) -> None:
    created = await stack.stub.CreateOrder(create_request())
    assert created.order_id.startswith("ORD-")
    assert created.workflow_id == f"order-{created.order_id}"
    assert created.status == S.ORDER_STATUS_PENDING
    assert created.total_amount == LAPTOP_PRICE
    assert created.message == "Order created successfully. Awaiting payment confirmation."

    status = await stack.stub.GetOrderStatus(pb.GetOrderStatusRequest(order_id=created.order_id))
    assert status.status == S.ORDER_STATUS_PENDING

    paid = await stack.stub.ConfirmPayment(payment_request(created.order_id, "TXN-12345"))
    assert paid.order_id == created.order_id

    order = await order_reaching(stack, created.order_id, S.ORDER_STATUS_DELIVERED)
    assert order.customer_id == "CUST-001"
    assert order.payment_info.transaction_id == "TXN-12345"
    assert order.payment_info.amount == LAPTOP_PRICE
    assert order.payment_info.payment_method == "credit_card"
    tracking = order.shipment_info.tracking_number
    assert tracking.startswith(f"FEDEX-{created.order_id}-")
    assert order.shipment_info.provider == "fedex"
    # As in the seed: delivery is estimated three days after the payment.
    paid_at = order.payment_info.timestamp.ToDatetime()
    assert order.estimated_delivery.ToDatetime() - paid_at == timedelta(days=3)
    assert order.shipment_info.estimated_delivery == order.estimated_delivery
    assert order.delivered_at.ToDatetime() >= order.shipment_info.shipped_at.ToDatetime()
    assert order.cancellation_reason == ""
    assert not order.HasField("refund_info")
    assert order.inventory_info.reservation_id
    assert not order.inventory_info.released
    assert list(order.rejected_payments) == []

    eta = await stack.stub.GetEstimatedDelivery(
        pb.GetEstimatedDeliveryRequest(order_id=created.order_id)
    )
    assert eta.estimated_delivery == order.estimated_delivery

    await email_workflows(stack.client, created.workflow_id)
    await assert_money_moved(stack.activities, created.order_id, captured=LAPTOP_PRICE)
    await email_workflows(stack.client, created.workflow_id)
    assert email_subjects(stack.outbox, created.order_id).keys() == {
        "order_received",
        "payment_confirmed",
        "order_shipped",
        "order_delivered",
    }


async def test_cancel_before_payment(stack: Stack) -> None:
    created = await stack.stub.CreateOrder(create_request())
    cancelled = await stack.stub.CancelOrder(
        pb.CancelOrderRequest(order_id=created.order_id, reason="Customer requested cancellation")
    )
    assert cancelled.order_id == created.order_id

    order = await order_reaching(stack, created.order_id, S.ORDER_STATUS_CANCELLED)
    assert order.cancellation_reason == "Customer requested cancellation"
    await email_workflows(stack.client, created.workflow_id)
    order = await stack.stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))
    # Nothing was paid, so nothing is refunded; the reservation is released.
    assert not order.HasField("payment_info")
    assert not order.HasField("refund_info")
    assert order.inventory_info.released
    await assert_money_moved(stack.activities, created.order_id, captured=None)
    await email_workflows(stack.client, created.workflow_id)
    assert "order_cancelled" in email_subjects(stack.outbox, created.order_id)


async def test_cancel_after_payment_refunds_and_releases(slow_stack: Stack) -> None:
    stack = slow_stack
    created = await stack.stub.CreateOrder(create_request())
    await stack.stub.ConfirmPayment(payment_request(created.order_id, "TXN-12345"))
    await order_reaching(stack, created.order_id, S.ORDER_STATUS_PREPARING)
    await stack.stub.CancelOrder(
        pb.CancelOrderRequest(order_id=created.order_id, reason="Changed my mind")
    )

    await stack.client.get_workflow_handle(created.workflow_id).result()
    order = await stack.stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))
    assert order.status == S.ORDER_STATUS_CANCELLED
    assert order.cancellation_reason == "Changed my mind"
    assert order.payment_info.transaction_id == "TXN-12345"
    assert order.refund_info.transaction_id == "TXN-12345"
    assert order.refund_info.amount == LAPTOP_PRICE
    assert order.refund_info.refund_id
    await assert_money_moved(
        stack.activities, created.order_id, captured=LAPTOP_PRICE, refunded=LAPTOP_PRICE
    )
    assert order.inventory_info.released
    assert not order.HasField("shipment_info")
    # The cancel did not wait for the 3 s packaging step to finish: it interrupted it.
    captured, refunded = order.payment_info.timestamp, order.refund_info.refunded_at
    assert refunded.ToDatetime() - captured.ToDatetime() < timedelta(seconds=3)
    await email_workflows(stack.client, created.workflow_id)
    subjects = email_subjects(stack.outbox, created.order_id)
    assert {"order_received", "payment_confirmed", "order_cancelled"} <= subjects.keys()
    assert "order_shipped" not in subjects


async def test_a_reason_signalled_straight_to_temporal_is_emailed_harmless(stack: Stack) -> None:
    """CancelOrder refuses a reason with a line break or a bidirectional control; a signal
    sent past the server still gets it into the order, never verbatim into the email."""
    created = await stack.stub.CreateOrder(create_request())
    reason = 'Refund "now"\r\nBcc: x@evil.example \u202eexe.pdf'
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.stub.CancelOrder(
            pb.CancelOrderRequest(order_id=created.order_id, reason=reason)
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    handle = stack.client.get_workflow_handle(created.workflow_id)
    await handle.signal(CANCEL_ORDER_SIGNAL, CancelRequest(reason))
    order = await order_reaching(stack, created.order_id, S.ORDER_STATUS_CANCELLED)
    assert order.cancellation_reason == reason
    await email_workflows(stack.client, created.workflow_id)
    path = stack.outbox / created.order_id / "order_cancelled.eml"
    message = read_email(path)
    body = body_of(message)
    assert 'Reason: "Refund \\"now\\"  Bcc: x@evil.example \ufffdexe.pdf"' in body.splitlines()
    assert "\u202e" not in body
    assert message["Bcc"] is None


async def pending_activities(handle: WorkflowHandle[Any, Any]) -> list[str]:
    """The names of the activities the workflow is waiting for right now."""
    described = await handle.describe()
    return [a.activity_type.name for a in described.raw_description.pending_activities]


async def cancel_taken(handle: WorkflowHandle[Any, Any]) -> bool:
    """Whether the workflow has run a workflow task since the cancel signal reached it."""
    signalled: int | None = None
    async for event in handle.fetch_history_events():
        if event.HasField("workflow_execution_signaled_event_attributes"):
            if event.workflow_execution_signaled_event_attributes.signal_name == (
                CANCEL_ORDER_SIGNAL
            ):
                signalled = event.event_id
        elif signalled is not None and event.HasField("workflow_task_completed_event_attributes"):
            return True
    return False


async def cancel_code(stack: Stack, order_id: str) -> grpc.StatusCode:
    """CancelOrder's status code."""
    try:
        await stack.stub.CancelOrder(pb.CancelOrderRequest(order_id=order_id, reason="Too late"))
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_cancel_during_the_hand_over_to_the_carrier_is_refused(
    stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Decision 0006: a cancel that arrives once ship_order has begun is refused; delivered.

    The status still reads PREPARING then, so the server passes the cancel on;
    the workflow must refuse it itself. The carrier holds the hand-over (a gate
    on this stack's Shipping) until the workflow has taken the signal, so the
    cancel lands inside the window on every run.
    """
    caplog.set_level(logging.WARNING, logger="temporalio.workflow")
    async with open_stack(stack.client, tmp_path / "outbox") as own:
        gate = asyncio.Event()
        own.activities.shipping.hand_over_gate = gate
        created = await own.stub.CreateOrder(create_request())
        handle = own.client.get_workflow_handle(created.workflow_id)
        try:
            await own.stub.ConfirmPayment(payment_request(created.order_id, "TXN-HAND-OVER"))
            await eventually(
                lambda: pending_activities(handle),
                lambda names: "ship_order" in names,
                what="the hand-over to the carrier under way",
            )
            code = await cancel_code(own, created.order_id)
            # Refused up front is as good; passed on, the workflow must refuse it.
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION), code
            refused_up_front = code == grpc.StatusCode.FAILED_PRECONDITION
            if not refused_up_front:
                await eventually(lambda: cancel_taken(handle), bool, what="the cancel signal taken")
            assert "ship_order" in await pending_activities(handle)  # still held
        finally:
            gate.set()
        await handle.result()
        order = await own.stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))
        assert order.status == S.ORDER_STATUS_DELIVERED
        assert order.cancellation_reason == ""
        assert not order.HasField("refund_info")
        assert order.shipment_info.tracking_number
        assert not order.inventory_info.released
        await assert_money_moved(own.activities, created.order_id, captured=LAPTOP_PRICE)
    if refused_up_front:
        return
    # A signal has no caller to answer: the workflow's refusal is its log line.
    refusals = [
        record.getMessage()
        for record in caplog.records
        if record.name == "temporalio.workflow"
        and created.workflow_id in record.getMessage()
        and "cancellation refused" in record.getMessage().lower()
    ]
    assert len(refusals) == 1, f"the workflow did not refuse the cancel: {refusals}"


async def test_query_completed_order(stack: Stack) -> None:
    created = await stack.stub.CreateOrder(create_request())
    await stack.stub.ConfirmPayment(payment_request(created.order_id, "TXN-12345"))
    handle = stack.client.get_workflow_handle(created.workflow_id)
    await handle.result()
    assert (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED
    await assert_money_moved(stack.activities, created.order_id, captured=LAPTOP_PRICE)

    # Queries still answer once the workflow has closed.
    order = await stack.stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))
    assert order.status == S.ORDER_STATUS_DELIVERED
    status = await stack.stub.GetOrderStatus(pb.GetOrderStatusRequest(order_id=created.order_id))
    assert status.status == S.ORDER_STATUS_DELIVERED
    eta = await stack.stub.GetEstimatedDelivery(
        pb.GetEstimatedDeliveryRequest(order_id=created.order_id)
    )
    assert eta.HasField("estimated_delivery")


async def test_payment_timeout_cancels_and_compensates(stack: Stack, tmp_path: Path) -> None:
    async with open_stack(stack.client, tmp_path / "outbox", payment_timeout_seconds=2) as short:
        created = await short.stub.CreateOrder(create_request())
        await short.client.get_workflow_handle(created.workflow_id).result()
        order = await short.stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))
        assert order.status == S.ORDER_STATUS_CANCELLED
        assert order.cancellation_reason == "Payment not received within 2 s"
        assert order.inventory_info.released
        await assert_money_moved(short.activities, created.order_id, captured=None)
        await email_workflows(short.client, created.workflow_id)
        assert "order_cancelled" in email_subjects(short.outbox, created.order_id)


async def test_total_is_exact_for_many_items(stack: Stack) -> None:
    items = [
        pb.OrderItem(product_id="P1", product_name="Pen", quantity=3, price=money(0, 100_000_000)),
        pb.OrderItem(product_id="P2", product_name="Pad", quantity=7, price=money(19, 990_000_000)),
    ]
    created = await stack.stub.CreateOrder(create_request(items=items))
    # 3 × 0.10 + 7 × 19.99 = 140.23, exactly.
    assert created.total_amount == money(140, 230_000_000)
    order = await stack.stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))
    assert order.total_amount == money(140, 230_000_000)
    assert [(i.product_id, i.quantity) for i in order.items] == [("P1", 3), ("P2", 7)]
    await stack.stub.CancelOrder(pb.CancelOrderRequest(order_id=created.order_id))
