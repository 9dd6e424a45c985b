"""The worker's sandbox refuses non-deterministic calls in workflow code and isolates each run."""

from __future__ import annotations

import uuid

import pytest
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from tests.sandbox_probe import CallsDatetimeNow, CountsRuns
from tests.support.polling import eventually
from worker.app import WORKFLOW_RUNNER


@pytest.mark.parametrize("call", ["datetime.now", "time.time", "random.random", "uuid.uuid4"])
async def test_a_non_deterministic_call_fails_the_workflow_task(
    temporal: WorkflowEnvironment, call: str
) -> None:
    task_queue = f"sandbox-{uuid.uuid4().hex[:8]}"
    async with Worker(
        temporal.client,
        task_queue=task_queue,
        workflows=[CallsDatetimeNow],
        workflow_runner=WORKFLOW_RUNNER,
    ):
        handle = await temporal.client.start_workflow(
            CallsDatetimeNow.run, call, id=f"sandbox-{uuid.uuid4().hex}", task_queue=task_queue
        )
        history = await eventually(
            handle.fetch_history,
            lambda h: any(e.HasField("workflow_task_failed_event_attributes") for e in h.events),
            within=15,
            what="a failed workflow task",
        )
        await handle.terminate()
    [failure] = [
        e.workflow_task_failed_event_attributes.failure.message
        for e in history.events
        if e.HasField("workflow_task_failed_event_attributes")
    ][:1]
    assert "RestrictedWorkflowAccessError" in failure or "Cannot access" in failure, failure


async def test_module_state_is_not_shared_between_runs(temporal: WorkflowEnvironment) -> None:
    task_queue = f"sandbox-{uuid.uuid4().hex[:8]}"
    async with Worker(
        temporal.client,
        task_queue=task_queue,
        workflows=[CountsRuns],
        workflow_runner=WORKFLOW_RUNNER,
    ):
        counts = [
            await temporal.client.execute_workflow(
                CountsRuns.run, id=f"sandbox-{uuid.uuid4().hex}", task_queue=task_queue
            )
            for _ in range(3)
        ]
    assert counts == [1, 1, 1]
