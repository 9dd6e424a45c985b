"""With no worker running, the API still answers at once (docs/decisions/0016).

Writes are signals that Temporal records alone; the clear answers and the reads
come from the state the workflow keeps in its memo. When a worker returns, the
orders act on what was written. Health says, under "workers", whether one polls.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from temporalio.testing import WorkflowEnvironment

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from activities.order_activities import OrderActivities
from activities.providers import ProviderSettings
from server.api import validation
from server.platform.app import OrderServer, start_server
from server.platform.health import WORKERS
from server.platform.settings import ServerSettings
from tests.support.keys import key_settings
from tests.support.money import assert_money_moved
from tests.support.orders import LAPTOP_PRICE, create_request, money
from tests.support.polling import eventually
from tests.support.stack import async_stub, next_message, rest_of
from worker.app import build_worker
from workflows import models
from workflows.money import Money

T = TypeVar("T")
S = pb.OrderStatus
LAPTOP = Money("USD", 999, 990_000_000)
# The API's figure is under 1 s (make bench); the test's bound is generous, yet
# far below the 10 s a query would wait for a worker.
WITHIN = 5.0


def pay(order_id: str, transaction_id: str, amount: object = None) -> pb.ConfirmPaymentRequest:
    return pb.ConfirmPaymentRequest(
        order_id=order_id,
        transaction_id=transaction_id,
        amount=amount or LAPTOP_PRICE,
        payment_method="card",
    )


async def answer(call: Awaitable[T]) -> T:
    started = time.monotonic()
    try:
        return await call
    finally:
        assert time.monotonic() - started < WITHIN, "waited as if for a worker"


async def refused(call: Awaitable[object]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await answer(call)
    code: grpc.StatusCode = caught.value.code()
    return code


@pytest_asyncio.fixture
async def server(temporal: WorkflowEnvironment) -> AsyncIterator[OrderServer]:
    """A server on a task queue of its own, which no worker polls yet."""
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        temporal_address=temporal.client.service_client.config.target_host,
        task_queue=f"orders-no-worker-{uuid.uuid4().hex[:8]}",
        temporal_rpc_timeout=timedelta(seconds=10),  # what a query would wait for a worker
        **key_settings(),
    )
    server = await start_server(settings, client=temporal.client)
    yield server
    await server.stop(grace=1.0)


async def test_writes_and_reads_need_no_worker_and_orders_act_on_them_when_one_returns(
    temporal: WorkflowEnvironment, server: OrderServer, tmp_path: Path
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = async_stub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        async def health_of(service: str) -> int:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            return int(reply.status)

        # The API serves; "workers" says no worker polls.
        await eventually(
            lambda: health_of(""), lambda s: s == health_pb2.HealthCheckResponse.SERVING
        )
        assert await health_of(WORKERS) == health_pb2.HealthCheckResponse.NOT_SERVING

        paid = await answer(stub.CreateOrder(create_request()))
        twice = await answer(stub.CreateOrder(create_request()))
        cancelled = await answer(stub.CreateOrder(create_request()))
        await answer(stub.ConfirmPayment(pay(paid.order_id, "TXN-PAID")))
        await answer(stub.ConfirmPayment(pay(paid.order_id, "TXN-PAID")))  # a client's retry
        await answer(stub.ConfirmPayment(pay(twice.order_id, "TXN-FIRST")))
        # Only the workflow knows the first payment yet: accepted, judged there.
        await answer(stub.ConfirmPayment(pay(twice.order_id, "TXN-SECOND")))
        await answer(stub.CancelOrder(pb.CancelOrderRequest(order_id=cancelled.order_id)))
        # The clear answers stay.
        wrong = pay(paid.order_id, "TXN-WRONG", money(5))
        assert await refused(stub.ConfirmPayment(wrong)) == grpc.StatusCode.INVALID_ARGUMENT
        unknown = pay("ORD-20250101-NONE0", "TXN-NONE")
        assert await refused(stub.ConfirmPayment(unknown)) == grpc.StatusCode.NOT_FOUND

        # Reads answer from the last recorded state, which has not seen the writes yet.
        await read_everything(stub, paid.order_id, S.ORDER_STATUS_PENDING)
        watching = stub.WatchOrder(pb.WatchOrderRequest(order_id=paid.order_id))
        assert (await answer(next_message(watching))).status == S.ORDER_STATUS_PENDING

        activities = OrderActivities(ProviderSettings.instant(tmp_path))
        async with build_worker(temporal.client, server.settings.task_queue, activities):
            await eventually(
                lambda: health_of(WORKERS), lambda s: s == health_pb2.HealthCheckResponse.SERVING
            )
            for created in (paid, twice, cancelled):
                await temporal.client.get_workflow_handle(created.workflow_id).result()
            # The watch opened with no worker follows the order to its end.
            assert (await rest_of(watching))[-1].status == S.ORDER_STATUS_DELIVERED

        # The worker is gone again; the orders ended as the writes said.
        final = await read_everything(stub, paid.order_id, S.ORDER_STATUS_DELIVERED)
        assert final.payment_info.transaction_id == "TXN-PAID"
        both = await answer(stub.GetOrder(pb.GetOrderRequest(order_id=twice.order_id)))
        assert both.status == S.ORDER_STATUS_DELIVERED
        assert both.payment_info.transaction_id == "TXN-FIRST"
        assert [r.transaction_id for r in both.rejected_payments] == ["TXN-SECOND"]
        gone = await answer(stub.GetOrder(pb.GetOrderRequest(order_id=cancelled.order_id)))
        assert gone.status == S.ORDER_STATUS_CANCELLED
        await assert_money_moved(activities, paid.order_id, captured=LAPTOP)
        await assert_money_moved(activities, twice.order_id, captured=LAPTOP)
        await assert_money_moved(activities, cancelled.order_id, captured=None)

        # Late writes are refused from the recorded state, still with no worker.
        late_cancel = pb.CancelOrderRequest(order_id=paid.order_id)
        assert await refused(stub.CancelOrder(late_cancel)) == grpc.StatusCode.FAILED_PRECONDITION
        late_pay = pay(cancelled.order_id, "TXN-LATE")
        assert await refused(stub.ConfirmPayment(late_pay)) == grpc.StatusCode.FAILED_PRECONDITION
        again = await answer(stub.ConfirmPayment(pay(paid.order_id, "TXN-PAID")))
        assert "already recorded" in again.message


async def read_everything(
    stub: pb_grpc.OrderServiceAsyncStub, order_id: str, status: pb.OrderStatus.ValueType
) -> pb.Order:
    order = await answer(stub.GetOrder(pb.GetOrderRequest(order_id=order_id)))
    assert order.status == status
    reply = await answer(stub.GetOrderStatus(pb.GetOrderStatusRequest(order_id=order_id)))
    assert reply.status == status
    delivery = await answer(
        stub.GetEstimatedDelivery(pb.GetEstimatedDeliveryRequest(order_id=order_id))
    )
    assert delivery.HasField("estimated_delivery") == (status == S.ORDER_STATUS_DELIVERED)
    return order


async def test_an_order_without_a_state_in_its_memo_is_unavailable_at_once(
    temporal: WorkflowEnvironment, server: OrderServer
) -> None:
    """An order from before decision 0016 (or started by hand, as the seed's REST API did)
    holds no state in its memo: its read is a query, which only a worker answers. With none,
    UNAVAILABLE with RetryInfo after about a second (QUERY_CAP), not the 10 s Temporal
    timeout."""
    order = validation.validate_create_order(create_request(), payment_timeout_seconds=3600)
    await temporal.client.start_workflow(
        models.WORKFLOW_NAME,
        order,
        id=models.workflow_id_for(order.order_id),
        task_queue=server.settings.task_queue,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = async_stub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetOrder(pb.GetOrderRequest(order_id=order.order_id), timeout=30)
        waited = time.monotonic() - started
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    assert any(detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for detail in status.details)
    # QUERY_CAP plus the slack of within_deadline; generous for a loaded machine.
    assert waited < 4.0, f"waited {waited:.1f} s, as if for the whole Temporal timeout"
