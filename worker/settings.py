"""The worker's settings: one model, a flag and an environment variable for each field."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import Field

from activities.providers import ProviderSettings
from infra.keys import KeySettings
from infra.logs import LogSettings
from infra.settings import FixedPort, Options, ProcessSettings, Text, setting
from infra.temporal_client import TemporalSettings

AtLeastOne = Annotated[int, Field(ge=1)]


class WorkerTuning(Options):
    """How much the worker keeps and does at once (docs/performance measures the defaults)."""

    # temporalio's default is 1,000: an order evicted from the cache is replayed
    # from its history before a query can answer, so the cache holds every order
    # that may still be read, parked ones (waiting for payment) included.
    max_cached_workflows: AtLeastOne = setting(
        20_000,
        "ORDER_WORKER_MAX_CACHED_WORKFLOWS",
        "workflows kept in memory, so queries need no replay",
    )
    max_concurrent_workflow_tasks: Annotated[int, Field(ge=2)] = setting(
        100,
        "ORDER_WORKER_MAX_CONCURRENT_WORKFLOW_TASKS",
        "workflow tasks processed at once (at least 2: temporalio needs two with a cache)",
    )
    max_concurrent_activities: AtLeastOne = setting(
        200, "ORDER_WORKER_MAX_CONCURRENT_ACTIVITIES", "activities run at once"
    )
    workflow_task_pollers: AtLeastOne = setting(
        5, "ORDER_WORKER_WORKFLOW_TASK_POLLERS", "concurrent polls for workflow tasks"
    )
    activity_task_pollers: AtLeastOne = setting(
        5, "ORDER_WORKER_ACTIVITY_TASK_POLLERS", "concurrent polls for activity tasks"
    )
    metrics_port: FixedPort | None = setting(
        None,
        "ORDER_WORKER_METRICS_PORT",
        "serve the Temporal SDK's Prometheus metrics at http://<metrics host>:<port>/metrics",
        shown="off",
    )
    metrics_host: Text = setting(
        "localhost", "ORDER_WORKER_METRICS_HOST", "address the metrics listen on"
    )

    def worker_options(self) -> dict[str, Any]:
        """Keyword arguments for temporalio.worker.Worker."""
        from temporalio.worker import PollerBehaviorSimpleMaximum

        return {
            "max_cached_workflows": self.max_cached_workflows,
            "max_concurrent_workflow_tasks": self.max_concurrent_workflow_tasks,
            "max_concurrent_activities": self.max_concurrent_activities,
            "workflow_task_poller_behavior": PollerBehaviorSimpleMaximum(
                self.workflow_task_pollers
            ),
            "activity_task_poller_behavior": PollerBehaviorSimpleMaximum(
                self.activity_task_pollers
            ),
        }


class WorkerSettings(
    ProcessSettings, WorkerTuning, TemporalSettings, KeySettings, LogSettings, ProviderSettings
):
    """Every setting of `python -m worker`."""

    prog: ClassVar[str] = "python -m worker"
    description: ClassVar[str] = (
        "Runs the Temporal worker for the order workflow and its activities."
    )
