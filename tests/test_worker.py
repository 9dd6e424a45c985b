"""The worker: its settings, connecting to Temporal, running and stopping."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
from temporalio.client import Client

from activities.providers import ProviderSettings
from tests.support.env import ROOT, free_port, settings_from
from tests.support.keys import key_settings, key_variables, with_codec
from tests.support.orders import email_workflows
from tests.support.proxy import Proxy
from worker.app import connect_with_retry, run_worker
from worker.settings import WorkerSettings
from workflows.models import (
    CONFIRM_PAYMENT_SIGNAL,
    DEFAULT_TASK_QUEUE,
    OrderInput,
    OrderItem,
    OrderState,
    OrderStatus,
    PaymentRequest,
    ShippingAddress,
)
from workflows.money import Money
from workflows.order_workflow import OrderWorkflow

LAPTOP = Money("USD", 999, 990_000_000)


# --- Settings ---------------------------------------------------------------------


def from_args(argv: list[str], environ: dict[str, str]) -> WorkerSettings:
    return settings_from(WorkerSettings, argv, environ)


def test_defaults() -> None:
    settings = from_args([], environ={})
    assert settings.describe_temporal() == "localhost:7233 (namespace default, plain text)"
    assert settings.task_queue == DEFAULT_TASK_QUEUE
    assert settings.sim_deliver_seconds == 10.0
    assert settings.max_cached_workflows == 20_000


def test_environment_then_flags() -> None:
    env = {
        "TEMPORAL_ADDRESS": "temporal:7233",
        "TEMPORAL_NAMESPACE": "shop",
        "ORDER_TASK_QUEUE": "orders-env",
        "ORDER_SIM_DELIVER_SECONDS": "1",
        "ORDER_OUTBOX_DIR": "/tmp/mail",
        "ORDER_WORKER_MAX_CACHED_WORKFLOWS": "50",
    }
    settings = from_args([], environ=env)
    assert settings.describe_temporal() == "temporal:7233 (namespace shop, plain text)"
    assert settings.task_queue == "orders-env"
    assert settings.sim_deliver_seconds == 1.0
    assert settings.outbox_dir == Path("/tmp/mail")
    assert settings.max_cached_workflows == 50

    flags = ["--temporal-address", "h:1", "--namespace", "n", "--task-queue", "q"]
    settings = from_args([*flags, "--max-cached-workflows", "7"], environ=env)
    assert settings.describe_temporal() == "h:1 (namespace n, plain text)"
    assert (settings.task_queue, settings.max_cached_workflows) == ("q", 7)


@pytest.mark.parametrize(
    ("argv", "environ"),
    [
        ([], {"ORDER_SIM_PAYMENT_SECONDS": "fast"}),
        ([], {"ORDER_SIM_STOCK": "PROD-1=many"}),
        ([], {"ORDER_SMTP_HOST": "mail.example", "ORDER_SMTP_TLS": "ssl"}),
        ([], {"ORDER_WORKER_MAX_CONCURRENT_WORKFLOW_TASKS": "1"}),
        (["--max-cached-workflows", "0"], {}),
        (["--task-queue", ""], {}),
        (["--no-such-flag"], {}),
    ],
)
def test_bad_settings_exit_with_usage(argv: list[str], environ: dict[str, str]) -> None:
    with pytest.raises(SystemExit) as caught:
        from_args(argv, environ=environ)
    assert caught.value.code == 2


def test_failure_and_email_settings_come_from_the_environment(tmp_path: Path) -> None:
    env = {
        "ORDER_SIM_STOCK": "PROD-123=5",
        "ORDER_SIM_DECLINE_METHODS": "declined_card",
        "ORDER_SIM_FAIL_FIRST_ATTEMPTS": "2",
        "ORDER_EMAIL_FROM": "shop@acme.example",
        "ORDER_SMTP_HOST": "mail.example",
        "ORDER_SMTP_USERNAME": "acme",
        "ORDER_SMTP_PASSWORD": "secret",
    }
    settings = from_args([], environ=env)
    assert settings.sim_stock == {"PROD-123": 5}
    assert settings.sim_decline_methods == {"declined_card"}
    assert settings.sim_fail_first_attempts == 2
    assert settings.email_from == "shop@acme.example"
    assert (settings.smtp_host, settings.smtp_effective_port) == ("mail.example", 587)


# --- Connecting -------------------------------------------------------------------


async def test_connect_retries_until_cancelled(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="worker.app")
    started = time.monotonic()
    settings = from_args(["--temporal-address", f"127.0.0.1:{free_port()}"], {})
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.0):
            await connect_with_retry(settings, initial_backoff=0.1)
    assert time.monotonic() - started < 3.0
    failures = [r for r in caplog.records if "not reachable" in r.getMessage()]
    assert len(failures) >= 2


async def test_run_worker_stops_while_temporal_is_unreachable(tmp_path: Path) -> None:
    settings = from_args(
        ["--temporal-address", f"127.0.0.1:{free_port()}", "--outbox-dir", str(tmp_path)],
        key_variables(),
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.5, stop.set)
    await asyncio.wait_for(run_worker(settings, stop), timeout=5)


async def test_connect_waits_for_a_late_server(
    temporal_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="worker.app")
    port = free_port()
    # A late server: the proxy listens on `port` only after a second.
    async with Proxy(temporal_address, port=port, after=1.0):
        client = await asyncio.wait_for(
            connect_with_retry(
                from_args(["--temporal-address", f"127.0.0.1:{port}"], {}), initial_backoff=0.2
            ),
            timeout=10,
        )
        assert await client.service_client.check_health()
    messages = [r.getMessage() for r in caplog.records]
    assert any("not reachable" in m for m in messages)
    assert any(m.startswith("Connected to Temporal") for m in messages)


# --- Running ----------------------------------------------------------------------


def order_input(order_id: str) -> OrderInput:
    return OrderInput(
        order_id=order_id,
        customer_id="CUST-001",
        items=[OrderItem("PROD-123", "Laptop", 1, LAPTOP)],
        shipping=ShippingAddress("123 Main St", "San Francisco", "94102", "USA"),
        customer_email="cust-001@example.com",
    )


async def test_run_worker_runs_an_order_and_stops(temporal_address: str, tmp_path: Path) -> None:
    task_queue = f"orders-worker-test-{uuid.uuid4().hex[:8]}"
    settings = WorkerSettings(
        temporal_address=temporal_address,
        task_queue=task_queue,
        **key_settings(),
        **ProviderSettings.instant(tmp_path / "outbox").model_dump(),
    )
    stop = asyncio.Event()
    running = asyncio.create_task(run_worker(settings, stop))
    try:
        # The worker encrypts what it writes: reading the result takes the same keys.
        client = with_codec(await Client.connect(temporal_address))
        order_id = f"ORD-W-{uuid.uuid4().hex[:8]}"
        handle = await client.start_workflow(
            OrderWorkflow.run, order_input(order_id), id=f"order-{order_id}", task_queue=task_queue
        )
        await handle.signal(CONFIRM_PAYMENT_SIGNAL, PaymentRequest("TXN-1", LAPTOP, "card"))
        state = await asyncio.wait_for(handle.result(), timeout=30)
        assert isinstance(state, OrderState)
        assert state.status == OrderStatus.DELIVERED
        assert state.shipment_info is not None
        assert state.shipment_info.tracking_number.startswith(f"FEDEX-{order_id}-PKG-")
        await email_workflows(client, handle.id)
        sent = sorted(p.name for p in (tmp_path / "outbox" / order_id).iterdir())
        assert sent == [
            "order_delivered.eml",
            "order_received.eml",
            "order_shipped.eml",
            "payment_confirmed.eml",
        ]
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=15)


# --- python -m worker -------------------------------------------------------------


async def start_worker_process(
    address: str, outbox: Path, **settings: str
) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "ORDER_OUTBOX_DIR": str(outbox),
        "PYTHONUNBUFFERED": "1",
        **key_variables(),
        **settings,
    }
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "--temporal-address",
        address,
        "--task-queue",
        f"orders-worker-test-{uuid.uuid4().hex[:8]}",
        cwd=ROOT,
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )


async def read_until(process: asyncio.subprocess.Process, text: str) -> str:
    """stderr up to and including the first line containing `text`."""
    assert process.stderr is not None
    seen = ""
    while text not in seen:
        line = await process.stderr.readline()
        if not line:
            raise AssertionError(f"worker exited before logging {text!r}:\n{seen}")
        seen += line.decode()
    return seen


async def stop_process(process: asyncio.subprocess.Process, sig: signal.Signals) -> tuple[int, str]:
    """Sends `sig`; returns the exit status and the rest of stderr."""
    assert process.stderr is not None
    process.send_signal(sig)
    rest = await process.stderr.read()
    return await process.wait(), rest.decode()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_worker_process_stops_cleanly_on_signal(
    temporal_address: str, tmp_path: Path, sig: signal.Signals
) -> None:
    process = await start_worker_process(temporal_address, tmp_path / "outbox")
    try:
        async with asyncio.timeout(30):
            log = await read_until(process, "Worker polling")
        async with asyncio.timeout(15):
            code, rest = await stop_process(process, sig)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == 0, log + rest
    assert "Worker stopped" in rest
    # Timestamped lines on stderr.
    assert log.splitlines()[-1][:4].isdigit()
    assert f"Emails go to the outbox folder {tmp_path / 'outbox'}" in log


async def test_worker_process_logs_its_mailer_and_simulated_failures(
    temporal_address: str, tmp_path: Path
) -> None:
    process = await start_worker_process(
        temporal_address,
        tmp_path / "outbox",
        ORDER_SMTP_HOST="127.0.0.1",
        ORDER_SMTP_PORT="2525",
        ORDER_SMTP_USERNAME="acme",
        ORDER_SMTP_PASSWORD="hunter2-secret",
        ORDER_SIM_DECLINE_METHODS="declined_card",
    )
    try:
        async with asyncio.timeout(30):
            log = await read_until(process, "Worker polling")
        async with asyncio.timeout(15):
            code, rest = await stop_process(process, signal.SIGTERM)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == 0, log + rest
    assert "Emails go to the SMTP server acme@127.0.0.1:2525 (TLS: starttls" in log
    assert "Simulated failures: declining declined_card" in log
    assert "hunter2" not in log + rest


async def test_worker_process_stops_while_waiting_for_temporal(tmp_path: Path) -> None:
    process = await start_worker_process(f"127.0.0.1:{free_port()}", tmp_path / "outbox")
    try:
        async with asyncio.timeout(30):
            await read_until(process, "not reachable")
        async with asyncio.timeout(15):
            code, rest = await stop_process(process, signal.SIGTERM)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == 0, rest
    assert "Stopped before connecting" in rest
