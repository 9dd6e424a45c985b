"""A stack: a worker and a gRPC server on a task queue of their own, and a stub to call them.

`open_stack` runs both in this process, on a Temporal the caller connected to
(the suite's fixtures, the load test), encrypting every payload as the real
processes do (the test keys of tests/support/keys.py); `Cluster.stack()` (tests/support/cluster.py)
gives the same view of a worker and a server running as processes of their
own (the benchmark).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from temporalio.client import Client

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from activities.order_activities import OrderActivities
from activities.providers import ProviderSettings
from infra.keys import Keys
from server.platform.app import OrderServer, start_server
from server.platform.settings import ServerSettings
from tests.support.env import with_changes
from tests.support.keys import KEYS, key_settings, with_codec
from tests.support.polling import eventually
from worker.app import build_worker


def async_stub(channel: grpc.aio.Channel) -> pb_grpc.OrderServiceAsyncStub:
    """The generated stub on an aio channel (its .pyi types it as the async stub)."""
    return pb_grpc.OrderServiceStub(channel)


@dataclass
class Stack:
    """A worker and a gRPC server on their own task queue, a Temporal client and a stub."""

    # Encrypting and decrypting as the server's and the worker's clients do.
    client: Client
    task_queue: str
    target: str
    channel: grpc.aio.Channel
    stub: pb_grpc.OrderServiceAsyncStub
    outbox: Path
    # The worker's activities and the gRPC server, when they run in this process.
    local: tuple[OrderActivities, OrderServer] | None = None

    @property
    def activities(self) -> OrderActivities:
        """The simulated providers' records (inventory, payments, shipping, mail)."""
        assert self.local is not None, "the worker is a process of its own"
        return self.local[0]

    @property
    def server(self) -> OrderServer:
        assert self.local is not None, "the server is a process of its own"
        return self.local[1]


def bearer(token: str) -> tuple[tuple[str, str]]:
    """The metadata of a call made with `token` (a bearer token or a JWT)."""
    return (("authorization", f"Bearer {token}"),)


@asynccontextmanager
async def serving(stack: Stack, **changes: Any) -> AsyncIterator[OrderServer]:
    """Another gRPC server in front of the stack's worker, with the settings changed."""
    server = await start_server(
        with_changes(stack.server.settings, port=0, **changes), stack.client
    )
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


@asynccontextmanager
async def open_stack(
    client: Client,
    outbox: Path,
    *,
    simulation: ProviderSettings | None = None,
    payment_timeout_seconds: int = 24 * 60 * 60,
    keys: Keys = KEYS,
    task_queue: str = "",
) -> AsyncIterator[Stack]:
    """Starts a worker and a gRPC server in this process on a fresh task queue (or on
    `task_queue`, to go on with orders another stack started); stops both after.

    Both use `client`'s connection with the codec of `keys` (`client` itself may have none).
    """
    task_queue = task_queue or f"orders-test-{uuid.uuid4().hex[:8]}"
    client = with_codec(client, keys)
    activities = OrderActivities(simulation or ProviderSettings.instant(outbox))
    config = ServerSettings(
        host="127.0.0.1",
        port=0,
        temporal_address=client.service_client.config.target_host,
        temporal_namespace=client.namespace,
        task_queue=task_queue,
        payment_timeout=timedelta(seconds=payment_timeout_seconds),
        **key_settings(keys),
    )
    async with build_worker(client, task_queue, activities):
        server = await start_server(config, client=client)
        target = f"127.0.0.1:{server.port}"
        channel = grpc.aio.insecure_channel(target)
        stub = async_stub(channel)
        try:
            yield Stack(client, task_queue, target, channel, stub, outbox, (activities, server))
        finally:
            await channel.close(grace=None)
            await server.stop(grace=1.0)


async def order_reaching(
    stack: Stack, order_id: str, status: int, within: float = 30.0
) -> pb.Order:
    """Polls GetOrder until the order has the given status."""
    return await eventually(
        lambda: stack.stub.GetOrder(pb.GetOrderRequest(order_id=order_id)),
        lambda order: order.status == status,
        within=within,
    )


WatchCall = grpc.aio.UnaryStreamCall[pb.WatchOrderRequest, pb.Order]


def watch(stack: Stack, order_id: str, timeout: float | None = None) -> WatchCall:
    """A WatchOrder stream on the stack's server."""
    call: WatchCall = stack.stub.WatchOrder(
        pb.WatchOrderRequest(order_id=order_id), timeout=timeout
    )
    return call


async def next_message(call: WatchCall) -> pb.Order:
    """The stream's next order (within a minute); fails if the stream ended."""
    async with asyncio.timeout(60):
        message = await call.read()
    assert isinstance(message, pb.Order), "the stream ended"
    return message


async def rest_of(call: WatchCall) -> list[pb.Order]:
    """Every message until the stream ends (it must end within a minute)."""
    messages = []
    async with asyncio.timeout(60):
        while isinstance(message := await call.read(), pb.Order):
            messages.append(message)
    return messages
