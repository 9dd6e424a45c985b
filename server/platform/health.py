"""grpc.health.v1 status that follows Temporal's reachability, and whether any worker polls."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import temporalio.api.workflowservice.v1 as workflowservice
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined, unused-ignore]
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.client import Client

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# The empty name is the whole server's health, as grpc.health.v1 defines it.
OVERALL = ""
# SERVING while some worker polls the order task queue. Not part of OVERALL: the
# API answers without a worker (docs/decisions/0016); orders only wait for one.
WORKERS = "workers"
# An idle worker's long poll lasts up to 60 s and Temporal records its start, so a
# poller seen within this window may still be alive; a dead one drops out after it.
POLLER_SEEN_WITHIN = timedelta(seconds=75)


class TemporalHealthProber:
    """`health`, the standard aio health servicer: `services` follow Temporal's
    reachability, `WORKERS` whether a worker polls `task_queue`."""

    def __init__(
        self,
        client: Client,
        services: Sequence[str],
        task_queue: str,
        *,
        interval: timedelta = timedelta(seconds=2),
        probe_timeout: timedelta = timedelta(milliseconds=1500),
    ) -> None:
        self._client = client
        self.health = health_aio.HealthServicer()
        self._services = [OVERALL, *(name for name in services if name != OVERALL)]
        self._interval = interval
        self._probe_timeout = probe_timeout
        self._task_queue = task_queue
        self._serving: bool | None = None
        self._workers: bool | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Marks every service NOT_SERVING, then starts probing in the background."""
        for service in [*self._services, WORKERS]:
            await self.health.set(service, NOT_SERVING)
        self._task = asyncio.create_task(self._run(), name="temporal-health-prober")

    async def stop(self) -> None:
        """Stops probing and marks every service NOT_SERVING for good (graceful shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.health.enter_graceful_shutdown()

    async def probe(self) -> str | None:
        """None if Temporal's frontend answered a cheap call, else what went wrong."""
        seconds = self._probe_timeout.total_seconds()
        try:
            # asyncio.timeout too: the lazy client's first connect has no timeout of its own.
            async with asyncio.timeout(seconds + 0.5):
                await self._client.workflow_service.get_system_info(
                    workflowservice.GetSystemInfoRequest(),
                    retry=False,
                    timeout=self._probe_timeout,
                )
        except Exception as err:
            return str(err) or type(err).__name__
        return None

    async def workers_polling(self) -> bool:
        """Whether some worker polled the task queue for workflow tasks lately."""
        seconds = self._probe_timeout.total_seconds()
        try:
            async with asyncio.timeout(seconds + 0.5):
                described = await self._client.workflow_service.describe_task_queue(
                    workflowservice.DescribeTaskQueueRequest(
                        namespace=self._client.namespace,
                        task_queue=TaskQueue(name=self._task_queue),
                        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                    ),
                    retry=False,
                    timeout=self._probe_timeout,
                )
        except Exception:
            return False
        now = datetime.now(UTC)
        return any(
            now - poller.last_access_time.ToDatetime(UTC) < POLLER_SEEN_WITHIN
            for poller in described.pollers
        )

    async def _run(self) -> None:
        while True:
            problem = await self.probe()
            serving = problem is None
            if serving != self._serving:
                if serving:
                    logger.info("Temporal is reachable: health SERVING")
                else:
                    logger.warning("Temporal is unreachable (%s): health NOT_SERVING", problem)
                self._serving = serving
                for service in self._services:
                    await self.health.set(service, SERVING if serving else NOT_SERVING)
            workers = serving and await self.workers_polling()
            if workers != self._workers:
                if workers:
                    logger.info("A worker polls %s: health %r SERVING", self._task_queue, WORKERS)
                else:
                    logger.warning(
                        "No worker polls %s: orders wait until one does; health %r NOT_SERVING",
                        self._task_queue,
                        WORKERS,
                    )
                self._workers = workers
                await self.health.set(WORKERS, SERVING if workers else NOT_SERVING)
            await asyncio.sleep(self._interval.total_seconds())
