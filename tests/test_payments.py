"""Money that an order cannot take is never kept; the same transaction counts once.

Through gRPC the server refuses such payments up front with a clear status.
Signals sent straight to Temporal (as `temporal workflow signal` does) skip
the server, so the workflow checks every payment again itself and records
each one it refused.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from acme.orders.v1 import order_service_pb2 as pb
from tests.support.money import assert_money_moved
from tests.support.orders import LAPTOP_PRICE, create_request, money
from tests.support.polling import eventually
from tests.support.stack import Stack, order_reaching
from workflows.models import CONFIRM_PAYMENT_SIGNAL, OrderState, PaymentRequest
from workflows.money import Money

S = pb.OrderStatus
LAPTOP = Money("USD", 999, 990_000_000)


def pay(
    order_id: str, transaction_id: str, amount: object = LAPTOP_PRICE
) -> pb.ConfirmPaymentRequest:
    return pb.ConfirmPaymentRequest(
        order_id=order_id,
        transaction_id=transaction_id,
        amount=amount or LAPTOP_PRICE,
        payment_method="card",
    )


def bad_request_fields(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


async def test_wrong_amount_is_invalid_argument(stack: Stack) -> None:
    created = await stack.stub.CreateOrder(create_request())
    for amount in (money(999, 980_000_000), money(999, 990_000_000, currency="EUR")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub.ConfirmPayment(pay(created.order_id, "TXN-W", amount))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "amount" in " ".join(bad_request_fields(caught.value))
    order = await stack.stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))
    assert order.status == S.ORDER_STATUS_PENDING
    assert not order.HasField("payment_info")
    await stack.stub.CancelOrder(pb.CancelOrderRequest(order_id=created.order_id))
    await stack.client.get_workflow_handle(created.workflow_id).result()
    await assert_money_moved(stack.activities, created.order_id, captured=None)


async def test_same_transaction_twice_is_charged_once(stack: Stack) -> None:
    created = await stack.stub.CreateOrder(create_request())
    first = await stack.stub.ConfirmPayment(pay(created.order_id, "TXN-DUP"))
    second = await stack.stub.ConfirmPayment(pay(created.order_id, "TXN-DUP"))
    assert first.order_id == second.order_id == created.order_id
    await stack.client.get_workflow_handle(created.workflow_id).result()
    order = await stack.stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))
    assert order.status == S.ORDER_STATUS_DELIVERED
    assert order.payment_info.transaction_id == "TXN-DUP"
    assert list(order.rejected_payments) == []
    assert f"{created.order_id}/charge/TXN-DUP" in stack.activities.payments.charges
    await assert_money_moved(stack.activities, created.order_id, captured=LAPTOP)


async def test_second_transaction_for_paid_order_is_refused(stack: Stack) -> None:
    created = await stack.stub.CreateOrder(create_request())
    await stack.stub.ConfirmPayment(pay(created.order_id, "TXN-A"))
    # Once the order's recorded state shows the payment, the server refuses another.
    await eventually(
        lambda: stack.stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id)),
        lambda order: order.HasField("payment_info"),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.ConfirmPayment(pay(created.order_id, "TXN-B"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await stack.client.get_workflow_handle(created.workflow_id).result()
    assert f"{created.order_id}/charge/TXN-B" not in stack.activities.payments.charges
    await assert_money_moved(stack.activities, created.order_id, captured=LAPTOP)


async def test_a_second_transaction_before_the_order_recorded_the_first_is_judged_by_it(
    stack: Stack,
) -> None:
    """The server cannot know yet: it accepts, the workflow refuses, the order shows it."""
    created = await stack.stub.CreateOrder(create_request())
    await asyncio.gather(
        stack.stub.ConfirmPayment(pay(created.order_id, "TXN-FIRST")),
        stack.stub.ConfirmPayment(pay(created.order_id, "TXN-SECOND")),
    )
    state = await stack.client.get_workflow_handle(
        created.workflow_id, result_type=OrderState
    ).result()
    assert state.payment_info is not None
    [refused] = state.rejected_payments
    assert {state.payment_info.transaction_id, refused.transaction_id} == {
        "TXN-FIRST",
        "TXN-SECOND",
    }
    assert refused.reason.startswith("Order is already paid by transaction")
    await assert_money_moved(stack.activities, created.order_id, captured=LAPTOP)


async def test_payment_for_cancelled_or_delivered_order_is_refused(stack: Stack) -> None:
    cancelled = await stack.stub.CreateOrder(create_request())
    await stack.stub.CancelOrder(pb.CancelOrderRequest(order_id=cancelled.order_id))
    await order_reaching(stack, cancelled.order_id, S.ORDER_STATUS_CANCELLED)
    delivered = await stack.stub.CreateOrder(create_request())
    await stack.stub.ConfirmPayment(pay(delivered.order_id, "TXN-D1"))
    await stack.client.get_workflow_handle(delivered.workflow_id).result()

    for order_id in (cancelled.order_id, delivered.order_id):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub.ConfirmPayment(pay(order_id, "TXN-LATE"))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"{order_id}/charge/TXN-LATE" not in stack.activities.payments.charges
    await stack.client.get_workflow_handle(cancelled.workflow_id).result()
    await assert_money_moved(stack.activities, cancelled.order_id, captured=None)
    await assert_money_moved(stack.activities, delivered.order_id, captured=LAPTOP)


async def test_raw_signals_are_checked_by_the_workflow(stack: Stack) -> None:
    """The CLI path: signals bypass the server, and the order records what it refused."""
    created = await stack.stub.CreateOrder(create_request())
    handle = stack.client.get_workflow_handle(created.workflow_id)

    await handle.signal(
        CONFIRM_PAYMENT_SIGNAL, PaymentRequest("TXN-SHORT", Money("USD", 5), "card")
    )
    await handle.signal(
        CONFIRM_PAYMENT_SIGNAL, PaymentRequest("TXN-EUR", Money("EUR", 999, 990_000_000), "card")
    )
    order = await eventually(
        lambda: stack.stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id)),
        lambda order: len(order.rejected_payments) == 2,
    )
    assert order.status == S.ORDER_STATUS_PENDING
    assert [r.transaction_id for r in order.rejected_payments] == ["TXN-SHORT", "TXN-EUR"]
    assert "does not equal the order total" in order.rejected_payments[0].reason

    await handle.signal(CONFIRM_PAYMENT_SIGNAL, PaymentRequest("TXN-OK", LAPTOP, "card"))
    await handle.signal(CONFIRM_PAYMENT_SIGNAL, PaymentRequest("TXN-OK", LAPTOP, "card"))
    await handle.signal(CONFIRM_PAYMENT_SIGNAL, PaymentRequest("TXN-SECOND", LAPTOP, "card"))
    await handle.result()

    order = await stack.stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))
    assert order.status == S.ORDER_STATUS_DELIVERED
    assert order.payment_info.transaction_id == "TXN-OK"
    rejected = {r.transaction_id: r.reason for r in order.rejected_payments}
    assert rejected.keys() == {"TXN-SHORT", "TXN-EUR", "TXN-SECOND"}
    assert "already paid by transaction TXN-OK" in rejected["TXN-SECOND"]
    for txn in ("TXN-SHORT", "TXN-EUR", "TXN-SECOND"):
        assert f"{created.order_id}/charge/{txn}" not in stack.activities.payments.charges
    assert f"{created.order_id}/charge/TXN-OK" in stack.activities.payments.charges
    await assert_money_moved(stack.activities, created.order_id, captured=LAPTOP)


async def test_raw_payment_after_cancel_is_refused(slow_stack: Stack) -> None:
    """A payment that reaches a cancelled order still compensating is recorded, not charged."""
    stack = slow_stack
    created = await stack.stub.CreateOrder(create_request())
    handle = stack.client.get_workflow_handle(created.workflow_id)
    await stack.stub.CancelOrder(pb.CancelOrderRequest(order_id=created.order_id))
    await handle.signal(CONFIRM_PAYMENT_SIGNAL, PaymentRequest("TXN-AFTER", LAPTOP, "card"))
    await handle.result()
    order = await stack.stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))
    assert order.status == S.ORDER_STATUS_CANCELLED
    assert not order.HasField("payment_info")
    assert [r.transaction_id for r in order.rejected_payments] == ["TXN-AFTER"]
    assert f"{created.order_id}/charge/TXN-AFTER" not in stack.activities.payments.charges
    await assert_money_moved(stack.activities, created.order_id, captured=None)


async def test_refused_and_repeated_payments_write_nothing_to_history(stack: Stack) -> None:
    """The check before the signal keeps what the order would refuse out of its history."""
    created = await stack.stub.CreateOrder(create_request())
    with pytest.raises(grpc.aio.AioRpcError):
        await stack.stub.ConfirmPayment(pay(created.order_id, "TXN-LOW", money(1)))
    first = await stack.stub.ConfirmPayment(pay(created.order_id, "TXN-1"))
    handle = stack.client.get_workflow_handle(created.workflow_id)
    await handle.result()
    again = await stack.stub.ConfirmPayment(pay(created.order_id, "TXN-1"))
    assert "already recorded" not in first.message
    assert "already recorded" in again.message

    signalled = [
        event.workflow_execution_signaled_event_attributes.signal_name
        async for event in handle.fetch_history_events()
        if event.HasField("workflow_execution_signaled_event_attributes")
    ]
    assert signalled == [CONFIRM_PAYMENT_SIGNAL]
    order = await stack.stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))
    assert list(order.rejected_payments) == []
    assert f"{created.order_id}/charge/TXN-1" in stack.activities.payments.charges
    await assert_money_moved(stack.activities, created.order_id, captured=LAPTOP)
