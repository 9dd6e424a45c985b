"""The Temporal calls each OrderService RPC makes (issue 11), counted by a CountingProxy.

The gRPC server reaches Temporal through the proxy; the worker does not, so
the counts are the API's alone. Each RPC is measured alone: the proxy is reset
before it and read once it has answered (a call is counted when it arrives,
before its answer). The health prober's calls every 2 s are left out.

`tests/test_call_counts.py` pins the counts; `python -m tests.bench.call_counts`
(`make bench`) prints them.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from activities.order_activities import OrderActivities
from activities.providers import ProviderSettings
from infra import temporal_client
from server.platform.app import OrderServer, start_server
from server.platform.settings import ServerSettings
from tests.support import counting_proxy as methods
from tests.support.counting_proxy import CountingProxy
from tests.support.keys import key_settings, with_codec
from tests.support.orders import create_request, money, payment_request
from tests.support.polling import eventually
from tests.support.stack import async_stub, next_message, rest_of
from worker.app import build_worker
from workflows import search_attributes

# What the server's health prober calls every 2 s, whatever the RPCs do.
BACKGROUND = frozenset({methods.SYSTEM_INFO, methods.DESCRIBE_TASK_QUEUE})
# Calls Temporal answers only once a worker has run a workflow task for them.
WAITS_ON_WORKER = frozenset({methods.QUERY, methods.UPDATE})

WATCH_ORDER = "WatchOrder (a whole order life)"


@dataclass(frozen=True)
class Measured:
    """What one RPC cost Temporal: calls per full method name."""

    rpc: str
    calls: Counter[str]
    # WatchOrder only: the messages its stream got; from the order's history
    # once the stream had ended, the states it carries (the start's memo and
    # each upsert of it: the order's state changes) and its events.
    messages: int = 0
    states: int = 0
    events: int = 0

    @property
    def waiting_on_worker(self) -> Counter[str]:
        return Counter({m: n for m, n in self.calls.items() if m in WAITS_ON_WORKER})


def foreground(counts: Counter[str]) -> Counter[str]:
    """The counts without the health prober's calls."""
    return Counter({m: n for m, n in counts.items() if m not in BACKGROUND})


@dataclass
class CountedStack:
    """A worker, a gRPC server whose Temporal client goes through `proxy`, and a stub."""

    proxy: CountingProxy
    server: OrderServer
    stub: pb_grpc.OrderServiceAsyncStub
    client: Client  # straight to Temporal: what it does is not counted


@asynccontextmanager
async def counted_stack(client: Client, outbox: Path) -> AsyncIterator[CountedStack]:
    """A worker on `client` and a server through a proxy, on a task queue of their own."""
    task_queue = f"orders-counted-{uuid.uuid4().hex[:8]}"
    activities = OrderActivities(ProviderSettings.instant(outbox))
    client = with_codec(client)  # the worker encrypts as the server does
    async with CountingProxy(client.service_client.config.target_host) as proxy:
        settings = ServerSettings(
            host="127.0.0.1",
            port=0,
            temporal_address=proxy.address,
            temporal_namespace=client.namespace,
            task_queue=task_queue,
            **key_settings(),
        )
        proxied = await temporal_client.connect(settings, keys=settings.keys)
        async with build_worker(client, task_queue, activities):
            server = await start_server(settings, client=proxied)
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                    yield CountedStack(proxy, server, async_stub(channel), client)
            finally:
                await server.stop(grace=1.0)


async def measure_all(stack: CountedStack) -> list[Measured]:
    """Every RPC once, on orders of a customer of their own; WatchOrder last."""
    measured = await measure_rpcs(stack)
    [payment] = [m.calls for m in measured if m.rpc == "ConfirmPayment"]
    return [*measured, await measure_watch(stack, payment)]


async def measure_rpcs(stack: CountedStack) -> list[Measured]:
    """Every unary RPC, each alone, with its expected outcome checked."""
    proxy, stub = stack.proxy, stack.stub
    customer = f"CUST-COUNT-{uuid.uuid4().hex[:8]}"
    since = Timestamp()
    since.FromDatetime(datetime.now(UTC) - timedelta(seconds=5))
    results: list[Measured] = []

    async def measure(
        rpc: str, call: Callable[[], Awaitable[object]], code: grpc.StatusCode = grpc.StatusCode.OK
    ) -> None:
        proxy.reset()
        try:
            await call()
            answered = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as error:
            answered = error.code()
        assert answered == code, f"{rpc} answered {answered.name}, not {code.name}"
        results.append(Measured(rpc, foreground(proxy.counts())))

    proxy.reset()
    created = await stub.CreateOrder(create_request(customer_id=customer))
    results.append(Measured("CreateOrder", foreground(proxy.counts())))
    order_id = created.order_id
    await measure("GetOrder", lambda: stub.GetOrder(pb.GetOrderRequest(order_id=order_id)))
    await measure(
        "GetOrderStatus", lambda: stub.GetOrderStatus(pb.GetOrderStatusRequest(order_id=order_id))
    )
    await measure(
        "GetEstimatedDelivery",
        lambda: stub.GetEstimatedDelivery(pb.GetEstimatedDeliveryRequest(order_id=order_id)),
    )
    wrong = payment_request(order_id, "TXN-WRONG", amount=money(5))
    await measure(
        "ConfirmPayment (refused: wrong amount)",
        lambda: stub.ConfirmPayment(wrong),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await measure("ConfirmPayment", lambda: stub.ConfirmPayment(payment_request(order_id)))
    cancelled = await stub.CreateOrder(create_request(customer_id=customer))
    await measure(
        "CancelOrder",
        lambda: stub.CancelOrder(pb.CancelOrderRequest(order_id=cancelled.order_id)),
    )
    unknown = pb.GetOrderRequest(order_id=f"ORD-20250101-{uuid.uuid4().hex[:5].upper()}")
    await measure("GetOrder (NOT_FOUND)", lambda: stub.GetOrder(unknown), grpc.StatusCode.NOT_FOUND)
    # One page of the customer's two orders, once visibility has both. Created
    # after `since`, within the first window: read, then the other runs' check.
    listing = pb.ListOrdersRequest(customer_id=customer, created_after=since, page_size=10)
    await eventually(lambda: stub.ListOrders(listing), lambda page: len(page.orders) == 2)
    await measure("ListOrders (one page)", lambda: stub.ListOrders(listing))
    return results


async def measure_watch(stack: CountedStack, payment: Counter[str]) -> Measured:
    """One stream over an order's whole life: from PENDING, paid, until it ends DELIVERED.

    The payment is made while the stream runs, through the same server: its own
    calls (`payment`, as ConfirmPayment measured them) are taken out.
    """
    proxy, stub = stack.proxy, stack.stub
    created = await stub.CreateOrder(create_request())
    proxy.reset()
    call = stub.WatchOrder(pb.WatchOrderRequest(order_id=created.order_id), timeout=60)
    first = await next_message(call)
    assert first.status == pb.ORDER_STATUS_PENDING, first
    await stub.ConfirmPayment(payment_request(created.order_id, "TXN-WATCH"))
    messages = [first, *await rest_of(call)]
    assert await call.code() == grpc.StatusCode.OK
    assert messages[-1].status == pb.ORDER_STATUS_DELIVERED, messages[-1]
    window = foreground(proxy.counts())
    assert window & payment == payment, f"the payment's calls are missing: {window}"
    history = await stack.client.get_workflow_handle(created.workflow_id).fetch_history()
    states = sum(1 for event in history.events if _carries_state(event))
    return Measured(WATCH_ORDER, window - payment, len(messages), states, len(history.events))


def _carries_state(event: HistoryEvent) -> bool:
    """Whether the event holds a state of the order (decision 0016)."""
    if event.HasField("workflow_execution_started_event_attributes"):
        memo = event.workflow_execution_started_event_attributes.memo
    elif event.HasField("workflow_properties_modified_event_attributes"):
        memo = event.workflow_properties_modified_event_attributes.upserted_memo
    else:
        return False
    return search_attributes.MEMO_ORDER_STATE in memo.fields


def _calls(counts: Counter[str]) -> str:
    listed = [f"{m.rsplit('/', 1)[-1]}×{n}" for m, n in sorted(counts.items()) if n]
    return ", ".join(listed) or "none"


def table(results: list[Measured]) -> str:
    """A markdown table: RPC | Temporal calls | calls that wait on a worker."""
    lines = [
        "| RPC | Temporal calls (method×count) | calls that wait on a worker |",
        "|---|---|---|",
    ]
    for m in results:
        rpc = m.rpc
        if m.messages:
            rpc += f": {m.messages} messages; {m.states} states, {m.events} events in its history"
        lines.append(f"| {rpc} | {_calls(m.calls)} | {_calls(m.waiting_on_worker)} |")
    return "\n".join(lines)
