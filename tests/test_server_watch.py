"""The watch registry against an in-memory Temporal: sharing, ends, errors, cleanup.

tests/test_watch_order.py runs the same code against real workflows and gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType, WorkflowExecutionStatus
from temporalio.api.history.v1 import (
    History,
    HistoryEvent,
    WorkflowExecutionContinuedAsNewEventAttributes,
)
from temporalio.api.workflow.v1 import WorkflowExecutionInfo
from temporalio.api.workflowservice.v1 import (
    DescribeWorkflowExecutionRequest,
    DescribeWorkflowExecutionResponse,
    GetWorkflowExecutionHistoryRequest,
    GetWorkflowExecutionHistoryResponse,
)
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from acme.orders.v1 import order_service_pb2 as pb
from server.api import errors
from server.temporal.watching import OrderWatchers, Subscription
from tests.support.orders import pending_state
from workflows import models
from workflows.money import Money
from workflows.rules import is_settled

NOW = datetime(2025, 1, 31, 14, 30, tzinfo=UTC)
E = EventType
TASK = [
    E.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
    E.EVENT_TYPE_WORKFLOW_TASK_STARTED,
    E.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
]


def new_state(order_id: str) -> models.OrderState:
    return pending_state(order_id, "CUST-1", NOW)


_run_ids = (f"run-{n}" for n in itertools.count(1))


class FakeRun:
    def __init__(self, state: models.OrderState) -> None:
        self.run_id = next(_run_ids)
        self.state = state
        self.events = [E.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED, *TASK]
        self.closed = False
        # The run its continue-as-new event names.
        self.continued_as = ""
        self.changed = asyncio.Condition()

    def event(self, kind: EventType.ValueType) -> HistoryEvent:
        if kind == E.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
            attributes = WorkflowExecutionContinuedAsNewEventAttributes(
                new_execution_run_id=self.continued_as
            )
            return HistoryEvent(
                event_type=kind, workflow_execution_continued_as_new_event_attributes=attributes
            )
        return HistoryEvent(event_type=kind)

    async def close(self, kind: EventType.ValueType) -> None:
        self.events.append(kind)
        self.closed = True
        async with self.changed:
            self.changed.notify_all()


class FakeTemporal:
    """History long-polls, describes and queries, as the watch uses them; counts them."""

    namespace = "default"
    # How long a long-poll waits for news before Temporal answers with none.
    long_poll = 0.05

    def __init__(self) -> None:
        # Workflow id -> its current run, and every run by run id.
        self.runs: dict[str, FakeRun] = {}
        self.by_run_id: dict[str, FakeRun] = {}
        self.polls = 0
        self.describes = 0
        self.queries = 0
        self.query_failure: BaseException | None = None

    @property
    def workflow_service(self) -> FakeTemporal:
        return self

    def start(self, order_id: str) -> FakeRun:
        return self._new_run(order_id, new_state(order_id))

    def _new_run(self, order_id: str, state: models.OrderState) -> FakeRun:
        run = FakeRun(state)
        self.runs[models.workflow_id_for(order_id)] = run
        self.by_run_id[run.run_id] = run
        return run

    async def reset(
        self, order_id: str, change: Callable[[models.OrderState], None] = lambda _: None
    ) -> FakeRun:
        """What `temporal workflow reset` does: a new current run, from a copy of the old
        one's history; the old run, if still running, ends terminated (naming no run)."""
        old = self.runs[models.workflow_id_for(order_id)]
        new = self._new_run(order_id, copy.deepcopy(old.state))
        change(new.state)
        if not old.closed:
            await old.close(E.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED)
        return new

    async def continue_as_new(self, order_id: str) -> FakeRun:
        old = self.runs[models.workflow_id_for(order_id)]
        new = self._new_run(order_id, copy.deepcopy(old.state))
        new.events = [E.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED]  # its first task is to come
        old.continued_as = new.run_id
        await old.close(E.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW)
        return new

    async def step(
        self, order_id: str, change: Callable[[models.OrderState], None], *, close: bool = False
    ) -> None:
        """One workflow task: the state changes, the task completes, maybe the run closes."""
        run = self.runs[models.workflow_id_for(order_id)]
        change(run.state)
        run.events += TASK
        if close:
            await run.close(E.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED)
            return
        async with run.changed:
            run.changed.notify_all()

    async def get_workflow_execution_history(
        self, request: GetWorkflowExecutionHistoryRequest, **kwargs: object
    ) -> GetWorkflowExecutionHistoryResponse:
        self.polls += 1
        if request.execution.run_id:
            run = self.by_run_id.get(request.execution.run_id)
        else:
            run = self.runs.get(request.execution.workflow_id)
        if run is None:
            raise RPCError("workflow not found", RPCStatusCode.NOT_FOUND, b"")
        position = int(request.next_page_token or b"0")
        if position >= len(run.events) and not run.closed:
            async with run.changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.changed.wait(), self.long_poll)
        events = [run.event(kind) for kind in run.events[position:]]
        token = b"" if run.closed else str(len(run.events)).encode()
        return GetWorkflowExecutionHistoryResponse(
            history=History(events=events), next_page_token=token
        )

    async def describe_workflow_execution(
        self, request: DescribeWorkflowExecutionRequest, **kwargs: object
    ) -> DescribeWorkflowExecutionResponse:
        """The current run of the workflow id (the only way to find a reset's new run)."""
        self.describes += 1
        assert not request.execution.run_id
        run = self.runs.get(request.execution.workflow_id)
        if run is None:
            raise RPCError("workflow not found", RPCStatusCode.NOT_FOUND, b"")
        status = WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING
        if run.closed:
            status = WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_COMPLETED
        info = WorkflowExecutionInfo(
            execution=WorkflowExecution(
                workflow_id=request.execution.workflow_id, run_id=run.run_id
            ),
            status=status,
        )
        return DescribeWorkflowExecutionResponse(workflow_execution_info=info)

    def get_workflow_handle(self, workflow_id: str) -> FakeHandle:
        return FakeHandle(self, workflow_id)


class FakeHandle:
    def __init__(self, temporal: FakeTemporal, workflow_id: str) -> None:
        self._temporal = temporal
        self._workflow_id = workflow_id

    async def query(self, name: str, **kwargs: object) -> models.OrderState:
        assert name == models.GET_FULL_STATE_QUERY
        self._temporal.queries += 1
        if self._temporal.query_failure is not None:
            raise self._temporal.query_failure
        return copy.deepcopy(self._temporal.runs[self._workflow_id].state)


def registry(temporal: FakeTemporal) -> OrderWatchers:
    return OrderWatchers(cast(Client, temporal), query_timeout=timedelta(seconds=1))


def set_status(status: models.OrderStatus) -> Callable[[models.OrderState], None]:
    def change(state: models.OrderState) -> None:
        state.status = status
        state.updated_at += timedelta(seconds=1)

    return change


def nothing(state: models.OrderState) -> None:
    """A workflow task that changes nothing an order shows (an email was sent)."""


async def drain(subscription: Subscription) -> list[int]:
    async with asyncio.timeout(5):
        return [order.status async for order in subscription]


async def settled() -> None:
    """Lets the watch tasks run until they wait on Temporal again."""
    for _ in range(20):
        await asyncio.sleep(0)


S = pb.OrderStatus
LIFE = [
    models.OrderStatus.PREPARING,
    models.OrderStatus.SHIPPED,
    models.OrderStatus.DELIVERED,
]


async def test_streams_of_one_order_share_one_watch() -> None:
    temporal = FakeTemporal()
    temporal.start("ORD-1")
    watchers = registry(temporal)
    async with (
        watchers.watch("ORD-1") as first,
        watchers.watch("ORD-1") as second,
        watchers.watch("ORD-1") as third,
    ):
        assert len(watchers) == 1
        assert watchers.subscribers("ORD-1") == 3
        readers = [asyncio.create_task(drain(s)) for s in (first, second, third)]
        await settled()
        for status in LIFE:
            await temporal.step("ORD-1", nothing)
            await settled()
            await temporal.step("ORD-1", set_status(status))
            await settled()
        results = await asyncio.gather(*readers)
    expected = [S.ORDER_STATUS_PENDING, S.ORDER_STATUS_PREPARING, S.ORDER_STATUS_SHIPPED]
    assert results == [[*expected, S.ORDER_STATUS_DELIVERED]] * 3
    # One query to start and at most one per workflow task, for all three streams
    # together; the tasks that changed nothing sent nothing.
    assert temporal.queries <= 1 + 2 * len(LIFE)
    assert len(watchers) == watchers.running_tasks == 0


async def test_a_late_stream_gets_the_latest_state_at_once() -> None:
    temporal = FakeTemporal()
    temporal.start("ORD-1")
    watchers = registry(temporal)
    async with watchers.watch("ORD-1") as early:
        assert (await anext(early)).status == S.ORDER_STATUS_PENDING
        await temporal.step("ORD-1", set_status(models.OrderStatus.PREPARING))
        assert (await anext(early)).status == S.ORDER_STATUS_PREPARING
        async with watchers.watch("ORD-1") as late:
            assert (await anext(late)).status == S.ORDER_STATUS_PREPARING
            assert temporal.queries == 2  # the late stream cost nothing
    await settled()
    assert len(watchers) == watchers.running_tasks == 0


async def test_the_last_stream_to_leave_cancels_the_watch() -> None:
    temporal = FakeTemporal()
    temporal.start("ORD-1")
    watchers = registry(temporal)
    async with watchers.watch("ORD-1") as first:
        await anext(first)
        async with watchers.watch("ORD-1"):
            pass
        assert len(watchers) == 1  # one stream still watches
    assert len(watchers) == 0  # forgotten at once
    await settled()
    assert watchers.running_tasks == 0
    polls = temporal.polls
    await asyncio.sleep(3 * temporal.long_poll)
    assert temporal.polls == polls  # nothing polls Temporal any more


async def test_polls_that_time_out_are_asked_again() -> None:
    temporal = FakeTemporal()
    temporal.start("ORD-1")
    watchers = registry(temporal)
    async with watchers.watch("ORD-1") as stream:
        await anext(stream)
        await asyncio.sleep(5 * temporal.long_poll)  # several empty long-polls
        await temporal.step("ORD-1", set_status(models.OrderStatus.PREPARING))
        assert (await anext(stream)).status == S.ORDER_STATUS_PREPARING
    assert temporal.queries == 2


async def test_a_closed_order_sends_one_state() -> None:
    temporal = FakeTemporal()
    run = temporal.start("ORD-1")
    run.state.status = models.OrderStatus.DELIVERED
    run.events.append(E.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED)
    run.closed = True
    watchers = registry(temporal)
    async with watchers.watch("ORD-1") as stream:
        assert await drain(stream) == [S.ORDER_STATUS_DELIVERED]
    # A closed run costs one describe: is it the order's last one?
    assert (temporal.polls, temporal.describes, temporal.queries) == (1, 1, 1)


async def test_a_workflow_closed_in_any_state_ends_the_streams() -> None:
    temporal = FakeTemporal()
    temporal.start("ORD-1")
    watchers = registry(temporal)
    async with watchers.watch("ORD-1") as stream:
        reader = asyncio.create_task(drain(stream))
        await settled()
        # Terminated by an operator while preparing: the last state, then the end.
        await temporal.step("ORD-1", set_status(models.OrderStatus.PREPARING), close=True)
        assert await reader == [S.ORDER_STATUS_PENDING, S.ORDER_STATUS_PREPARING]
    assert temporal.describes == 1


# --- New runs: reset and continue-as-new ---------------------------------------------------


async def test_a_reset_goes_on_with_the_new_run() -> None:
    temporal = FakeTemporal()
    temporal.start("ORD-1")
    watchers = registry(temporal)
    async with watchers.watch("ORD-1") as stream:
        assert (await anext(stream)).status == S.ORDER_STATUS_PENDING
        await temporal.step("ORD-1", set_status(models.OrderStatus.PREPARING))
        assert (await anext(stream)).status == S.ORDER_STATUS_PREPARING
        # Reset to before the payment: the new run is pending again, and watched.
        await temporal.reset("ORD-1", set_status(models.OrderStatus.PENDING))
        assert (await anext(stream)).status == S.ORDER_STATUS_PENDING
        await temporal.step("ORD-1", set_status(models.OrderStatus.SHIPPED))
        assert (await anext(stream)).status == S.ORDER_STATUS_SHIPPED
        await temporal.step("ORD-1", set_status(models.OrderStatus.DELIVERED))
        assert await drain(stream) == [S.ORDER_STATUS_DELIVERED]
    # One describe when the old run closed; the new run's own polls after it.
    assert temporal.describes == 1
    await settled()
    assert len(watchers) == watchers.running_tasks == 0


async def test_a_reset_that_changes_nothing_sends_nothing_and_keeps_watching() -> None:
    temporal = FakeTemporal()
    temporal.start("ORD-1")
    watchers = registry(temporal)
    async with watchers.watch("ORD-1") as stream:
        assert (await anext(stream)).status == S.ORDER_STATUS_PENDING
        await temporal.reset("ORD-1")
        await temporal.reset("ORD-1")  # twice: each new run closes the one before
        await temporal.step("ORD-1", set_status(models.OrderStatus.PREPARING))
        assert (await anext(stream)).status == S.ORDER_STATUS_PREPARING
    # One describe per closed run the watch followed: it may skip the middle one.
    assert temporal.describes in (1, 2)


async def test_continue_as_new_is_followed_without_a_describe() -> None:
    temporal = FakeTemporal()
    temporal.start("ORD-1")
    watchers = registry(temporal)
    async with watchers.watch("ORD-1") as stream:
        assert (await anext(stream)).status == S.ORDER_STATUS_PENDING
        new = await temporal.continue_as_new("ORD-1")
        await settled()
        # The new run has no completed workflow task yet: no state to ask it for.
        queries = temporal.queries
        await asyncio.sleep(3 * temporal.long_poll)
        assert temporal.queries == queries
        await temporal.step("ORD-1", set_status(models.OrderStatus.PREPARING), close=True)
        assert await drain(stream) == [S.ORDER_STATUS_PREPARING]
    assert new.closed
    # The continue-as-new event named the new run; the describe is for its own close.
    assert temporal.describes == 1


async def test_a_reset_run_that_closed_already_ends_the_streams() -> None:
    temporal = FakeTemporal()
    temporal.start("ORD-1")
    watchers = registry(temporal)
    async with watchers.watch("ORD-1") as stream:
        assert (await anext(stream)).status == S.ORDER_STATUS_PENDING
        # The new run is current and closed by the time the watch asks: its state, the end.
        old = temporal.runs[models.workflow_id_for("ORD-1")]
        new = FakeRun(copy.deepcopy(old.state))
        new.state.status = models.OrderStatus.CANCELLED
        new.closed = True
        temporal.runs[models.workflow_id_for("ORD-1")] = temporal.by_run_id[new.run_id] = new
        await old.close(E.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED)
        assert await drain(stream) == [S.ORDER_STATUS_CANCELLED]
    assert (temporal.describes, temporal.queries) == (1, 2)


async def test_an_unknown_order_is_not_found() -> None:
    watchers = registry(FakeTemporal())
    async with watchers.watch("ORD-NOPE") as stream:
        with pytest.raises(errors.OrderNotFound):
            await anext(stream)
        with pytest.raises(errors.OrderNotFound):  # and stays so
            await anext(stream)
    await settled()
    assert len(watchers) == watchers.running_tasks == 0


async def test_a_failing_query_ends_every_stream_with_unavailable() -> None:
    temporal = FakeTemporal()
    temporal.start("ORD-1")
    watchers = registry(temporal)
    async with watchers.watch("ORD-1") as first, watchers.watch("ORD-1") as second:
        await anext(first)
        await anext(second)
        temporal.query_failure = RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b"")
        await temporal.step("ORD-1", set_status(models.OrderStatus.PREPARING))
        for stream in (first, second):
            with pytest.raises(errors.TemporalUnavailable):
                await anext(stream)
        assert len(watchers) == 0  # the next WatchOrder starts afresh


async def test_stop_ends_streams_with_unavailable_and_refuses_new_ones() -> None:
    temporal = FakeTemporal()
    temporal.start("ORD-1")
    watchers = registry(temporal)
    async with watchers.watch("ORD-1") as stream:
        await anext(stream)
        await watchers.stop()
        with pytest.raises(errors.ServerShuttingDown):
            await anext(stream)
    assert len(watchers) == watchers.running_tasks == 0
    with pytest.raises(errors.ServerShuttingDown):
        async with watchers.watch("ORD-1"):
            pass


def test_final_states() -> None:
    state = new_state("ORD-1")
    assert not is_settled(state)
    assert is_settled(replace(state, status=models.OrderStatus.DELIVERED))
    assert not is_settled(replace(state, status=models.OrderStatus.SHIPPED))
    cancelled = replace(state, status=models.OrderStatus.CANCELLED)
    assert is_settled(cancelled)  # nothing paid, nothing reserved
    reserved = replace(cancelled, inventory_info=models.InventoryInfo("RES-1"))
    assert not is_settled(reserved)
    assert is_settled(replace(reserved, inventory_info=models.InventoryInfo("RES-1", True)))
    payment = models.PaymentInfo("TXN-1", Money("USD", 1), "card", NOW)
    paid = replace(cancelled, payment_info=payment)
    assert not is_settled(paid)  # the refund is still to come
    refund = models.RefundInfo("REF-1", "TXN-1", Money("USD", 1), NOW)
    assert is_settled(replace(paid, refund_info=refund))
