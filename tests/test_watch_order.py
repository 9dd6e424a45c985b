"""WatchOrder end to end: real workflows, real gRPC streams, the server's watch registry."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from server.platform.app import start_server
from server.platform.settings import ServerSettings
from server.temporal.watching import OrderWatchers
from tests.support.env import free_port
from tests.support.keys import key_settings
from tests.support.orders import create_request, payment_request
from tests.support.polling import eventually
from tests.support.stack import Stack, next_message, open_stack, rest_of, watch

S = pb.OrderStatus
# The order an order's statuses go in.
LIFE = [
    S.ORDER_STATUS_PENDING,
    S.ORDER_STATUS_PAYMENT_CONFIRMED,
    S.ORDER_STATUS_PREPARING,
    S.ORDER_STATUS_SHIPPED,
    S.ORDER_STATUS_DELIVERED,
]


def assert_in_order(messages: list[pb.Order]) -> None:
    """Statuses never go back, and every message is a newer state than the one before."""
    ranks = [LIFE.index(m.status) if m.status in LIFE else len(LIFE) for m in messages]
    assert ranks == sorted(ranks), [S.Name(m.status) for m in messages]
    updated = [m.updated_at.ToDatetime() for m in messages]
    assert updated == sorted(updated)
    assert all(a != b for a, b in itertools.pairwise(messages))


async def released(watchers: OrderWatchers, order_id: str) -> None:
    """Waits until nothing on the server watches the order any more."""

    async def state() -> tuple[int, int, int]:
        return (watchers.subscribers(order_id), len(watchers), watchers.running_tasks)

    await eventually(state, lambda counts: counts == (0, 0, 0), within=10)


async def test_watchers_share_one_watch_and_see_every_change_until_delivered(
    slow_stack: Stack,
) -> None:
    stack = slow_stack
    created = await stack.stub.CreateOrder(create_request())
    calls = [watch(stack, created.order_id) for _ in range(3)]
    firsts = [await next_message(call) for call in calls]
    assert [first.status for first in firsts] == [S.ORDER_STATUS_PENDING] * 3
    # Three streams, one watch: Temporal is polled and queried once for all of them.
    assert len(stack.server.watchers) == 1
    assert stack.server.watchers.subscribers(created.order_id) == 3

    await stack.stub.ConfirmPayment(payment_request(created.order_id, "TXN-WATCH"))
    streams = [[first, *await rest_of(call)] for first, call in zip(firsts, calls, strict=True)]

    assert streams[0] == streams[1] == streams[2]
    messages = streams[0]
    assert_in_order(messages)
    statuses = [m.status for m in messages]
    # Payment and packaging start in one workflow task, so PAYMENT_CONFIRMED is
    # never a state of its own; the slow steps make the others observable.
    assert {S.ORDER_STATUS_PREPARING, S.ORDER_STATUS_SHIPPED} <= set(statuses)
    assert statuses[-1] == S.ORDER_STATUS_DELIVERED
    assert statuses.count(S.ORDER_STATUS_DELIVERED) == 1  # the stream ended right after
    assert messages[-1] == await stack.stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))
    for call in calls:
        assert await call.code() == grpc.StatusCode.OK
    await released(stack.server.watchers, created.order_id)


async def test_a_cancelled_order_streams_its_compensation_then_ends(stack: Stack) -> None:
    created = await stack.stub.CreateOrder(create_request())
    call = watch(stack, created.order_id)
    first = await next_message(call)
    assert first.status == S.ORDER_STATUS_PENDING

    await stack.stub.CancelOrder(pb.CancelOrderRequest(order_id=created.order_id, reason="No"))
    messages = [first, *await rest_of(call)]
    assert_in_order(messages)
    last = messages[-1]
    assert last.status == S.ORDER_STATUS_CANCELLED
    assert last.cancellation_reason == "No"
    assert last.inventory_info.released  # it ends once the compensation is done
    assert await call.code() == grpc.StatusCode.OK
    await released(stack.server.watchers, created.order_id)


async def test_a_closed_order_sends_its_state_once(stack: Stack) -> None:
    created = await stack.stub.CreateOrder(create_request())
    await stack.stub.ConfirmPayment(payment_request(created.order_id, "TXN-WATCH"))
    await stack.client.get_workflow_handle(created.workflow_id).result()

    messages = await rest_of(watch(stack, created.order_id))
    assert len(messages) == 1
    assert messages[0].status == S.ORDER_STATUS_DELIVERED
    assert messages[0] == await stack.stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))
    await released(stack.server.watchers, created.order_id)


async def test_a_client_that_cancels_releases_the_watch(stack: Stack) -> None:
    created = await stack.stub.CreateOrder(create_request())
    first_call, second_call = watch(stack, created.order_id), watch(stack, created.order_id)
    await next_message(first_call)
    await next_message(second_call)
    assert stack.server.watchers.subscribers(created.order_id) == 2

    first_call.cancel()

    async def streams() -> int:
        return stack.server.watchers.subscribers(created.order_id)

    # One stream left: the shared watch stays for it.
    await eventually(streams, lambda count: count == 1)
    assert len(stack.server.watchers) == 1
    second_call.cancel()
    await released(stack.server.watchers, created.order_id)
    await stack.stub.CancelOrder(pb.CancelOrderRequest(order_id=created.order_id))


async def test_a_deadline_ends_the_stream_and_releases_the_watch(stack: Stack) -> None:
    created = await stack.stub.CreateOrder(create_request())
    call = watch(stack, created.order_id, timeout=1.0)
    assert (await next_message(call)).status == S.ORDER_STATUS_PENDING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rest_of(call)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await released(stack.server.watchers, created.order_id)
    await stack.stub.CancelOrder(pb.CancelOrderRequest(order_id=created.order_id))


async def test_unknown_and_malformed_orders(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rest_of(watch(stack, "ORD-0000000000000000"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    assert any(d.Is(error_details_pb2.ResourceInfo.DESCRIPTOR) for d in status.details)

    for malformed in ("", "ORD 1", "x" * 65):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await rest_of(watch(stack, malformed))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await released(stack.server.watchers, "ORD-0000000000000000")


async def test_stopping_the_server_ends_streams_with_unavailable(
    stack: Stack, tmp_path: Path
) -> None:
    async with open_stack(stack.client, tmp_path / "outbox") as own:
        created = await own.stub.CreateOrder(create_request())
        call = watch(own, created.order_id)
        await next_message(call)
        started = time.monotonic()
        await own.server.stop(grace=10.0)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await rest_of(call)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert reason(caught.value) == "SERVER_SHUTTING_DOWN"
        # The stream ended at once, not when the grace period ran out.
        assert time.monotonic() - started < 5
        assert len(own.server.watchers) == own.server.watchers.running_tasks == 0
    # Its worker is gone with its stack.
    await stack.client.get_workflow_handle(created.workflow_id).terminate("test over")


def reason(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    raise AssertionError(f"no ErrorInfo in {err}")


async def test_temporal_down_is_unavailable() -> None:
    config = ServerSettings(
        host="127.0.0.1", port=0, temporal_address=f"127.0.0.1:{free_port()}", **key_settings()
    )
    server = await start_server(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.OrderServiceStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await rest_of(stub.WatchOrder(pb.WatchOrderRequest(order_id="ORD-1"), timeout=15))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ListOrders(pb.ListOrdersRequest(), timeout=15)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 25
        await released(server.watchers, "ORD-1")
    finally:
        await server.stop(grace=1.0)
