"""The watch registry against an in-memory Temporal: sharing, ends, errors, cleanup.

tests/test_watch_order.py runs the same code against real workflows and gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import History, HistoryEvent
from temporalio.api.workflowservice.v1 import (
    GetWorkflowExecutionHistoryRequest,
    GetWorkflowExecutionHistoryResponse,
)
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from acme.orders.v1 import order_service_pb2 as pb
from server.api import errors
from server.temporal.watching import OrderWatchers, Subscription
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
    return models.OrderState(
        order_id=order_id,
        customer_id="CUST-1",
        customer_email="",
        items=[models.OrderItem("P", "Pen", 1, Money("USD", 1))],
        shipping=models.ShippingAddress("1 Main St", "Springfield", "12345", "USA"),
        status=models.OrderStatus.PENDING,
        total_amount=Money("USD", 1),
        created_at=NOW,
        updated_at=NOW,
    )


class FakeRun:
    def __init__(self, state: models.OrderState) -> None:
        self.state = state
        self.events = [E.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED, *TASK]
        self.closed = False
        self.changed = asyncio.Condition()


class FakeTemporal:
    """History long-polls and queries, as the watch uses them; counts both."""

    namespace = "default"
    # How long a long-poll waits for news before Temporal answers with none.
    long_poll = 0.05

    def __init__(self) -> None:
        self.runs: dict[str, FakeRun] = {}
        self.polls = 0
        self.queries = 0
        self.query_failure: BaseException | None = None

    @property
    def workflow_service(self) -> FakeTemporal:
        return self

    def start(self, order_id: str) -> FakeRun:
        run = FakeRun(new_state(order_id))
        self.runs[models.workflow_id_for(order_id)] = run
        return run

    async def step(
        self, order_id: str, change: Callable[[models.OrderState], None], *, close: bool = False
    ) -> None:
        """One workflow task: the state changes, the task completes, maybe the run closes."""
        run = self.runs[models.workflow_id_for(order_id)]
        change(run.state)
        run.events += TASK
        if close:
            run.events.append(E.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED)
            run.closed = True
        async with run.changed:
            run.changed.notify_all()

    async def get_workflow_execution_history(
        self, request: GetWorkflowExecutionHistoryRequest, **kwargs: object
    ) -> GetWorkflowExecutionHistoryResponse:
        self.polls += 1
        run = self.runs.get(request.execution.workflow_id)
        if run is None:
            raise RPCError("workflow not found", RPCStatusCode.NOT_FOUND, b"")
        position = int(request.next_page_token or b"0")
        if position >= len(run.events) and not run.closed:
            async with run.changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.changed.wait(), self.long_poll)
        events = [HistoryEvent(event_type=kind) for kind in run.events[position:]]
        token = b"" if run.closed else str(len(run.events)).encode()
        return GetWorkflowExecutionHistoryResponse(
            history=History(events=events), next_page_token=token
        )

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
    assert (temporal.polls, temporal.queries) == (1, 1)


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
