"""Builds and runs the worker: the order workflow and its activities on one task queue."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from datetime import timedelta

from temporalio.client import Client, Interceptor
from temporalio.runtime import Runtime
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.order_activities import OrderActivities
from infra import tracing as otel
from infra.keys import Keys
from infra.temporal_client import TemporalSettings, bind_address, connect, new_runtime
from worker.settings import WorkerSettings, WorkerTuning
from workflows.notification_workflow import NotificationWorkflow
from workflows.order_workflow import OrderWorkflow

logger = logging.getLogger(__name__)

# How long a stopping worker lets running activities finish before cancelling
# them; short, because Temporal retries anything cut off on the next worker.
GRACEFUL_SHUTDOWN_TIMEOUT = timedelta(seconds=5)
STICKY_QUEUE_TIMEOUT = timedelta(seconds=3)
# The SDK's default sandbox: workflow code that calls datetime.now(), random,
# os.environ... fails its workflow task instead of running silently
# (docs/decisions/0015 measures what it costs). OpenTelemetry passes through, as
# temporalio's own OpenTelemetryPlugin has it: the tracing interceptor's spans and
# context inside the workflow are then the worker's, not a copy imported per run.
WORKFLOW_RUNNER = SandboxedWorkflowRunner(
    restrictions=SandboxRestrictions.default.with_passthrough_modules("opentelemetry")
)


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
        workflows=[OrderWorkflow, NotificationWorkflow],
        activities=activities.all(),
        graceful_shutdown_timeout=graceful_shutdown_timeout,
        # After a worker dies, its cached workflows' tasks (queries among them)
        # move to the other workers after this instead of the default 10 s.
        sticky_queue_schedule_to_start_timeout=STICKY_QUEUE_TIMEOUT,
        workflow_runner=WORKFLOW_RUNNER,
        **(tuning or WorkerTuning()).worker_options(),
    )


async def connect_with_retry(
    settings: TemporalSettings,
    *,
    keys: Keys | None = None,
    runtime: Runtime | None = None,
    interceptors: Sequence[Interceptor] = (),
    initial_backoff: float = 0.5,
    max_backoff: float = 5.0,
) -> Client:
    """Connects to Temporal, retrying with exponential backoff until it answers (or cancelled).

    So the worker can start before the Temporal dev server is ready. Each
    failure is logged. Raises OSError at once if a TLS file cannot be read.
    With `keys`, every payload is encrypted (infra/codec.py); `interceptors` (tracing's)
    apply to the worker made with the client too.
    """
    # Read once: a missing certificate is not worth retrying.
    options = settings.temporal_connect_config()
    address = settings.describe_temporal()
    backoff = initial_backoff
    for attempt in itertools.count(1):
        try:
            client = await connect(
                settings, keys=keys, runtime=runtime, config=options, interceptors=interceptors
            )
        except Exception as error:
            logger.warning(
                "Temporal at %s not reachable (attempt %d): %s; retrying in %.1f s",
                address,
                attempt,
                error,
                backoff,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff)
        else:
            logger.info("Connected to Temporal at %s", address)
            return client
    raise AssertionError("unreachable")


async def run_worker(settings: WorkerSettings, stop: asyncio.Event) -> None:
    """Connects, then runs the worker until `stop` is set, then shuts down gracefully.

    Running activities get up to GRACEFUL_SHUTDOWN_TIMEOUT to finish. Raises
    if the worker fails fatally. Traces workflows and activities if OTEL_TRACES_EXPORTER asks.
    """
    async with otel.installed(otel.WORKER_SERVICE_NAME) as tracing:
        metrics_address = None
        if settings.metrics_port is not None:
            metrics_address = bind_address(settings.metrics_host, settings.metrics_port)
        # The SDK's own metrics endpoint lives in the runtime the client is made with.
        runtime = new_runtime(metrics_address=metrics_address)
        if metrics_address is not None:
            logger.info("Temporal SDK metrics at http://%s/metrics", metrics_address)
        if tracing is not None:
            logger.info("Tracing: %s", tracing.describe())
        stopping = asyncio.create_task(stop.wait())
        try:
            connecting = asyncio.create_task(
                connect_with_retry(
                    settings,
                    keys=settings.keys,
                    runtime=runtime,
                    interceptors=tracing.temporal_interceptors() if tracing is not None else (),
                )
            )
            await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not connecting.done():
                connecting.cancel()
                logger.info("Stopped before connecting to Temporal")
                return
            activities = OrderActivities(settings)
            worker = build_worker(
                connecting.result(), settings.task_queue, activities, tuning=settings
            )
            running = asyncio.create_task(worker.run())
            logger.info(
                "Worker polling task queue %r at Temporal %s",
                settings.task_queue,
                settings.describe_temporal(),
            )
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
