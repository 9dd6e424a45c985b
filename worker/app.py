"""Builds and runs the worker: the order workflow and its activities on one task queue."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from datetime import timedelta

from temporalio.client import Client
from temporalio.runtime import Runtime
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.order_activities import OrderActivities
from infra.temporal_connection import TemporalConnection, connect_options
from infra.temporal_runtime import bind_address, new_runtime
from worker.config import WorkerConfig
from worker.tuning import WorkerTuning
from workflows.order_workflow import OrderWorkflow

logger = logging.getLogger(__name__)

# How long a stopping worker lets running activities finish before cancelling
# them; short, because Temporal retries anything cut off on the next worker.
GRACEFUL_SHUTDOWN_TIMEOUT = timedelta(seconds=5)
STICKY_QUEUE_TIMEOUT = timedelta(seconds=3)


class ConnectStopped(Exception):
    """The stop event was set before Temporal could be reached."""


def build_worker(
    client: Client,
    task_queue: str,
    activities: OrderActivities,
    *,
    graceful_shutdown_timeout: timedelta = GRACEFUL_SHUTDOWN_TIMEOUT,
    tuning: WorkerTuning | None = None,
) -> Worker:
    """A worker for `OrderWorkflow` and every activity of `activities`, not yet started."""
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[OrderWorkflow],
        activities=activities.all(),
        graceful_shutdown_timeout=graceful_shutdown_timeout,
        # After a worker dies, its cached workflows' tasks (queries among them)
        # move to the other workers after this instead of the default 10 s.
        sticky_queue_schedule_to_start_timeout=STICKY_QUEUE_TIMEOUT,
        # The sandbox still refuses non-deterministic calls, but no longer
        # re-imports every module for each workflow run: about half the memory
        # per cached order and a quarter less worker CPU per order (docs/
        # performance). Safe because the workflow's modules keep no mutable
        # global state; a module that did would be shared by all orders.
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_all_modules()
        ),
        **(tuning or WorkerTuning()).worker_options(),
    )


async def connect_with_retry(
    connection: TemporalConnection,
    *,
    runtime: Runtime | None = None,
    stop: asyncio.Event | None = None,
    initial_backoff: float = 0.5,
    max_backoff: float = 5.0,
) -> Client:
    """Connects to Temporal, retrying with exponential backoff until it answers.

    So the worker can start before the Temporal dev server is ready. Each
    failure is logged. Raises ConnectStopped as soon as `stop` is set, even
    in the middle of an attempt. Raises OSError at once if a TLS file cannot be read.
    """
    # Read once: a missing certificate is not worth retrying.
    options = connect_options(connection)
    address = connection.describe()
    stop = stop if stop is not None else asyncio.Event()
    backoff = initial_backoff
    attempt = 0
    while not stop.is_set():
        attempt += 1
        connecting = asyncio.create_task(
            Client.connect(connection.address, **options, runtime=runtime)
        )
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not connecting.done():
                connecting.cancel()
        if connecting.done() and not connecting.cancelled():
            error = connecting.exception()
            if error is None:
                logger.info("Connected to Temporal at %s", address)
                return connecting.result()
            logger.warning(
                "Temporal at %s not reachable (attempt %d): %s; retrying in %.1f s",
                address,
                attempt,
                error,
                backoff,
            )
        # Sleep for the backoff, but wake up at once if asked to stop.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=backoff)
        backoff = min(backoff * 2, max_backoff)
    raise ConnectStopped(f"stopped before Temporal at {connection.address} could be reached")


async def run_worker(
    config: WorkerConfig, *, stop: asyncio.Event | None = None, handle_signals: bool = True
) -> None:
    """Connects, then runs the worker until SIGINT/SIGTERM (or `stop`), then shuts down gracefully.

    A first signal lets running activities finish for up to
    GRACEFUL_SHUTDOWN_TIMEOUT; a second one gets the default behaviour and
    ends the process at once. Raises if the worker fails fatally.
    """
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = _install_signal_handlers(loop, stop) if handle_signals else []
    try:
        metrics_address = None
        if config.metrics_port is not None:
            metrics_address = bind_address(config.metrics_host, config.metrics_port)
        # The SDK's own metrics endpoint lives in the runtime the client is made with.
        runtime = new_runtime(metrics_address=metrics_address)
        if metrics_address is not None:
            logger.info("Temporal SDK metrics at http://%s/metrics", metrics_address)
        try:
            client = await connect_with_retry(config.temporal, runtime=runtime, stop=stop)
        except ConnectStopped:
            logger.info("Stopped before connecting to Temporal")
            return
        worker = build_worker(
            client, config.task_queue, OrderActivities(config.simulation), tuning=config.tuning
        )
        running = asyncio.create_task(worker.run())
        logger.info(
            "Worker polling task queue %r at Temporal %s",
            config.task_queue,
            config.temporal.describe(),
        )
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not running.done():
            logger.info(
                "Shutting down: running activities get up to %.0f s to finish",
                GRACEFUL_SHUTDOWN_TIMEOUT.total_seconds(),
            )
            await worker.shutdown()
        await running  # re-raises a fatal worker error
        logger.info("Worker stopped")
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def _install_signal_handlers(
    loop: asyncio.AbstractEventLoop, stop: asyncio.Event
) -> list[signal.Signals]:
    signals = [signal.SIGINT, signal.SIGTERM]

    def on_signal(sig: signal.Signals) -> None:
        logger.info("Received %s: shutting down (send it again to stop at once)", sig.name)
        stop.set()
        # Back to the default handlers, so a second signal is not ignored.
        for s in signals:
            loop.remove_signal_handler(s)

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    return signals
