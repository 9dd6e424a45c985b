"""grpc.health.v1 status that follows Temporal's reachability."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import timedelta

import temporalio.api.workflowservice.v1 as workflowservice
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined, unused-ignore]
from temporalio.client import Client

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# The empty name is the whole server's health, as grpc.health.v1 defines it.
OVERALL = ""


class TemporalHealthProber:
    """`health`, the standard aio health servicer, with `services` following Temporal."""

    def __init__(
        self,
        client: Client,
        services: Sequence[str],
        *,
        interval: timedelta = timedelta(seconds=2),
        probe_timeout: timedelta = timedelta(milliseconds=1500),
    ) -> None:
        self._client = client
        self.health = health_aio.HealthServicer()
        self._services = [OVERALL, *(name for name in services if name != OVERALL)]
        self._interval = interval
        self._probe_timeout = probe_timeout
        self._serving: bool | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Marks every service NOT_SERVING, then starts probing in the background."""
        for service in self._services:
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
            await asyncio.sleep(self._interval.total_seconds())
