"""How much the worker keeps and does at once: cache size, slots and pollers.

The defaults are what `make run` uses; docs/performance/results.md measures
them against temporalio's own defaults (`make bench`). Each setting is a flag
with an ORDER_WORKER_* environment fallback.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Workflows kept in memory between their tasks. temporalio's default is 1,000:
# an order evicted from the cache is replayed from its history before a query
# or an update can answer, so the cache holds every order that may still be
# read, parked ones (waiting for payment) included.
DEFAULT_MAX_CACHED_WORKFLOWS = 20_000
DEFAULT_MAX_CONCURRENT_WORKFLOW_TASKS = 100
DEFAULT_MAX_CONCURRENT_ACTIVITIES = 200
DEFAULT_WORKFLOW_TASK_POLLERS = 5
DEFAULT_ACTIVITY_TASK_POLLERS = 5

_SETTINGS = {
    # attribute: (flag, environment variable, help)
    "max_cached_workflows": (
        "--max-cached-workflows",
        "ORDER_WORKER_MAX_CACHED_WORKFLOWS",
        "workflows kept in memory, so queries and updates need no replay",
    ),
    "max_concurrent_workflow_tasks": (
        "--max-concurrent-workflow-tasks",
        "ORDER_WORKER_MAX_CONCURRENT_WORKFLOW_TASKS",
        "workflow tasks processed at once",
    ),
    "max_concurrent_activities": (
        "--max-concurrent-activities",
        "ORDER_WORKER_MAX_CONCURRENT_ACTIVITIES",
        "activities run at once",
    ),
    "workflow_task_pollers": (
        "--workflow-task-pollers",
        "ORDER_WORKER_WORKFLOW_TASK_POLLERS",
        "concurrent polls for workflow tasks",
    ),
    "activity_task_pollers": (
        "--activity-task-pollers",
        "ORDER_WORKER_ACTIVITY_TASK_POLLERS",
        "concurrent polls for activity tasks",
    ),
}


@dataclass(frozen=True)
class WorkerTuning:
    max_cached_workflows: int = DEFAULT_MAX_CACHED_WORKFLOWS
    max_concurrent_workflow_tasks: int = DEFAULT_MAX_CONCURRENT_WORKFLOW_TASKS
    max_concurrent_activities: int = DEFAULT_MAX_CONCURRENT_ACTIVITIES
    workflow_task_pollers: int = DEFAULT_WORKFLOW_TASK_POLLERS
    activity_task_pollers: int = DEFAULT_ACTIVITY_TASK_POLLERS

    def __post_init__(self) -> None:
        for name in _SETTINGS:
            if getattr(self, name) < 1:
                raise ValueError(f"{_SETTINGS[name][0]} must be at least 1")
        # temporalio needs two workflow task slots at least when the cache is on.
        if self.max_concurrent_workflow_tasks < 2:
            raise ValueError("--max-concurrent-workflow-tasks must be at least 2")

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


def _positive_int(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tuning")
    defaults = WorkerTuning()
    for name, (flag, variable, help_text) in _SETTINGS.items():
        group.add_argument(
            flag,
            dest=f"tuning_{name}",
            metavar="N",
            type=_positive_int,
            default=None,
            help=f"{help_text} (env {variable}; default {getattr(defaults, name)})",
        )


def from_arguments(args: argparse.Namespace, env: Mapping[str, str]) -> WorkerTuning:
    """The flags, else their environment variables, else the defaults; ValueError if invalid."""
    values: dict[str, int] = {}
    for name, (_flag, variable, _help) in _SETTINGS.items():
        value: int | None = getattr(args, f"tuning_{name}")
        if value is None and env.get(variable, "").strip():
            try:
                value = _positive_int(env[variable])
            except argparse.ArgumentTypeError as err:
                raise ValueError(f"environment variable {variable}: {err}") from None
        if value is not None:
            values[name] = value
    return WorkerTuning(**values)
