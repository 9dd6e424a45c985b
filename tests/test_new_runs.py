"""Resets and continue-as-new on the real dev server: WatchOrder and ListOrders follow the new run.

`temporal workflow reset` and continue-as-new give an order's workflow id a
new run, and visibility keeps a row for every run. What these tests check of
those rows is what docs/decisions/0007 and 0012 rely on. Visibility lags the
workflows, so every expectation on it is polled with `eventually`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime

import grpc
import pytest_asyncio
from temporalio import workflow
from temporalio.api.common.v1 import WorkflowExecution as Execution
from temporalio.api.enums.v1 import EventType, ResetReapplyExcludeType
from temporalio.api.workflowservice.v1 import ResetWorkflowExecutionRequest
from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from acme.orders.v1 import order_service_pb2 as pb
from server.api import ids
from tests.support.env import clean_environ, run, venv_binary
from tests.support.orders import create_request, payment_request, pending_state
from tests.support.polling import eventually
from tests.support.stack import Stack, next_message, order_reaching, rest_of, watch
from workflows import models, search_attributes

S = pb.OrderStatus
Status = WorkflowExecutionStatus
EVERY_STATUS = [status for status in S.values() if status != S.ORDER_STATUS_UNSPECIFIED]


# --- The API -----------------------------------------------------------------------------------


def new_customer() -> str:
    """A customer of its own, so other tests' orders never show in the listings."""
    return f"RUNS-{uuid.uuid4().hex[:12].upper()}"


async def listed(stack: Stack, **fields: object) -> pb.ListOrdersResponse:
    return await stack.stub.ListOrders(pb.ListOrdersRequest(**fields))  # type: ignore[arg-type]


def listed_ids(response: pb.ListOrdersResponse) -> list[str]:
    return [order.order_id for order in response.orders]


# --- Runs ------------------------------------------------------------------------------------


async def current_run(client: Client, workflow_id: str) -> str:
    return (await client.get_workflow_handle(workflow_id).describe()).run_id


async def visibility_rows(client: Client, workflow_id: str, count: int) -> list[WorkflowExecution]:
    """Visibility's rows for the workflow id, oldest run first, once there are `count` and
    only the last may be running (visibility lags)."""

    async def rows() -> list[WorkflowExecution]:
        found = [row async for row in client.list_workflows(f"WorkflowId = '{workflow_id}'")]
        return sorted(found, key=lambda row: row.start_time)

    return await eventually(
        rows,
        lambda found: len(found) == count and Status.RUNNING not in {r.status for r in found[:-1]},
        what=f"{count} visibility rows",
    )


async def has_run_a_task(client: Client, workflow_id: str, run_id: str) -> bool:
    """Whether the run completed a workflow task of its own (after any task a reset failed)."""
    history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
    kinds = [event.event_type for event in history.events]
    failed = EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED
    since = len(kinds) - kinds[::-1].index(failed) if failed in kinds else 0
    return EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED in kinds[since:]


async def new_run_running(client: Client, workflow_id: str, old_run: str) -> str:
    """Waits until the workflow's current run is another than old_run and has run a task."""

    async def probe() -> str:
        run_id = await current_run(client, workflow_id)
        if run_id != old_run and await has_run_a_task(client, workflow_id, run_id):
            return run_id
        return ""

    return await eventually(probe, bool, what="a new run that has run a task")


async def first_task_completed(client: Client, workflow_id: str, run_id: str) -> None:
    """Waits for the run's first task to complete: an order reads PENDING from the
    memo its start wrote (decision 0016) before any worker has run it, and a reset to
    FirstWorkflowTask needs that task done."""
    await eventually(
        lambda: has_run_a_task(client, workflow_id, run_id),
        bool,
        within=30,
        what="the first workflow task completed",
    )


async def reset_with_the_cli(address: str, workflow_id: str, reset_type: str) -> None:
    """`temporal workflow reset`, as an operator runs it."""
    result = await run(
        venv_binary("temporal"), "workflow", "reset", "--address", address,
        "--workflow-id", workflow_id, "--type", reset_type, "--reason", "test",
        env=clean_environ(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


async def reset_to_the_first_task_without_signals(client: Client, workflow_id: str) -> str:
    """Resets the workflow to its first workflow task without replaying the signals that
    came after (the payment): the new run is a pending order again. Returns its run id."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    first_task = next(
        event.event_id
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    )
    reset = await client.workflow_service.reset_workflow_execution(
        ResetWorkflowExecutionRequest(
            namespace=client.namespace,
            workflow_execution=Execution(workflow_id=workflow_id),
            reason="test",
            workflow_task_finish_event_id=first_task,
            request_id=str(uuid.uuid4()),
            reset_reapply_exclude_types=[ResetReapplyExcludeType.RESET_REAPPLY_EXCLUDE_TYPE_SIGNAL],
        )
    )
    return reset.run_id


async def listed_once_as(
    stack: Stack, customer: str, order_id: str, status: pb.OrderStatus.ValueType
) -> None:
    """Waits until the customer's only order is listed with `status`, then checks that it
    is listed under that status filter and no other."""
    await eventually(
        lambda: listed(stack, customer_id=customer),
        lambda page: [(o.order_id, o.status) for o in page.orders] == [(order_id, status)],
        what=f"{order_id} listed once as {S.Name(status)}",
    )
    for other in EVERY_STATUS:
        page = await listed(stack, customer_id=customer, status=other)
        assert listed_ids(page) == ([order_id] if other == status else []), S.Name(other)


# --- Reset -------------------------------------------------------------------------------------


async def test_a_watch_open_across_a_reset_streams_the_new_run(
    slow_stack: Stack, temporal_address: str
) -> None:
    """Reset while pending: the old run ends terminated, the stream goes on with the new run."""
    stack, client = slow_stack, slow_stack.client
    customer = new_customer()
    created = await stack.stub.CreateOrder(create_request(customer_id=customer))
    await order_reaching(stack, created.order_id, S.ORDER_STATUS_PENDING)
    call = watch(stack, created.order_id)
    first = await next_message(call)
    assert first.status == S.ORDER_STATUS_PENDING
    old_run = await current_run(client, created.workflow_id)

    await first_task_completed(client, created.workflow_id, old_run)
    await reset_with_the_cli(temporal_address, created.workflow_id, "FirstWorkflowTask")
    new_run = await new_run_running(client, created.workflow_id, old_run)
    old = await client.get_workflow_handle(created.workflow_id, run_id=old_run).describe()
    assert old.status == Status.TERMINATED
    # Listed once, pending: the old run's row (terminated, "pending") is not the order.
    await listed_once_as(stack, customer, created.order_id, S.ORDER_STATUS_PENDING)

    # The stream is still open: paying the new run moves it along, to the end.
    await stack.stub.ConfirmPayment(payment_request(created.order_id, "TXN-RESET"))
    messages = [first, *await rest_of(call)]
    statuses = [message.status for message in messages]
    assert S.ORDER_STATUS_PREPARING in statuses
    assert statuses[-1] == S.ORDER_STATUS_DELIVERED
    assert await call.code() == grpc.StatusCode.OK
    await client.get_workflow_handle(created.workflow_id, run_id=new_run).result()
    assert messages[-1] == await stack.stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))
    await listed_once_as(stack, customer, created.order_id, S.ORDER_STATUS_DELIVERED)

    # What visibility holds: a row per run, the reset run started after the old one closed.
    rows = await visibility_rows(client, created.workflow_id, 2)
    assert [(row.run_id, row.status) for row in rows] == [
        (old_run, Status.TERMINATED),
        (new_run, Status.COMPLETED),
    ]
    assert rows[0].close_time is not None
    assert rows[1].start_time >= rows[0].close_time


async def test_a_delivered_order_reset_to_its_first_task_is_pending_everywhere(
    stack: Stack,
) -> None:
    """Reset after delivery: the old run stays COMPLETED ("delivered") in visibility."""
    client = stack.client
    customer = new_customer()
    created = await stack.stub.CreateOrder(create_request(customer_id=customer))
    await stack.stub.ConfirmPayment(payment_request(created.order_id, "TXN-DELIVERED"))
    await client.get_workflow_handle(created.workflow_id).result()
    await listed_once_as(stack, customer, created.order_id, S.ORDER_STATUS_DELIVERED)
    old_run = await current_run(client, created.workflow_id)

    new_run = await reset_to_the_first_task_without_signals(client, created.workflow_id)
    assert await new_run_running(client, created.workflow_id, old_run) == new_run
    order = await order_reaching(stack, created.order_id, S.ORDER_STATUS_PENDING)
    await listed_once_as(stack, customer, created.order_id, S.ORDER_STATUS_PENDING)
    rows = await visibility_rows(client, created.workflow_id, 2)
    assert [(row.run_id, row.status) for row in rows] == [
        (old_run, Status.COMPLETED),
        (new_run, Status.RUNNING),
    ]
    assert rows[0].close_time is not None
    assert rows[1].start_time > rows[0].close_time
    # The time filters see the new run's creation time only (once visibility has it).

    async def by_time() -> tuple[list[str], list[str]]:
        since = await listed(stack, customer_id=customer, created_after=order.created_at)
        before = await listed(stack, customer_id=customer, created_before=order.created_at)
        return listed_ids(since), listed_ids(before)

    await eventually(by_time, lambda found: found == ([created.order_id], []))

    # A stream on it now is a pending order's: it stays open until the order is settled.
    call = watch(stack, created.order_id)
    assert (await next_message(call)).status == S.ORDER_STATUS_PENDING
    await stack.stub.CancelOrder(pb.CancelOrderRequest(order_id=created.order_id, reason="Reset"))
    last = (await rest_of(call))[-1]
    assert last.status == S.ORDER_STATUS_CANCELLED
    assert await call.code() == grpc.StatusCode.OK
    await listed_once_as(stack, customer, created.order_id, S.ORDER_STATUS_CANCELLED)


# --- Continue-as-new ----------------------------------------------------------------------------

ADVANCE_SIGNAL = "advance"


@workflow.defn(name=models.WORKFLOW_NAME)
class ContinuingOrder:
    """Stands in for the order workflow, which never continues as new: each `advance`
    signal gives the order a new status, in a new run while it is not yet preparing."""

    @workflow.init
    def __init__(self, state: models.OrderState) -> None:
        self._state = state
        self._next: models.OrderStatus | None = None

    @workflow.run
    async def run(self, state: models.OrderState) -> models.OrderState:
        workflow.upsert_search_attributes(
            [
                search_attributes.ORDER_CUSTOMER_ID.value_set(state.customer_id),
                search_attributes.ORDER_STATUS.value_set(state.status.value),
                search_attributes.ORDER_CREATED_AT.value_set(state.created_at),
            ]
        )
        workflow.upsert_memo({search_attributes.MEMO_TOTAL_AMOUNT: state.total_amount})
        await workflow.wait_condition(lambda: self._next is not None)
        assert self._next is not None
        following = replace(state, status=self._next, updated_at=workflow.now())
        if self._next == models.OrderStatus.PREPARING:
            workflow.continue_as_new(following)
        self._state = following
        workflow.upsert_search_attributes(
            [search_attributes.ORDER_STATUS.value_set(following.status.value)]
        )
        return following

    @workflow.signal(name=ADVANCE_SIGNAL)
    def advance(self, status: models.OrderStatus) -> None:
        self._next = status

    @workflow.query(name=models.GET_FULL_STATE_QUERY)
    def get_full_state(self) -> models.OrderState:
        return self._state


@pytest_asyncio.fixture
async def continuing_orders(stack: Stack) -> AsyncIterator[str]:
    """A worker for ContinuingOrder on a task queue of its own; yields the queue."""
    task_queue = f"continuing-{uuid.uuid4().hex[:8]}"
    async with Worker(
        stack.client,
        task_queue=task_queue,
        workflows=[ContinuingOrder],
        workflow_runner=UnsandboxedWorkflowRunner(),
    ):
        yield task_queue


async def test_continue_as_new_is_followed_and_listed_once(
    stack: Stack, continuing_orders: str
) -> None:
    client = stack.client
    customer = new_customer()
    order_id = ids.new_order_id(None)
    workflow_id = models.workflow_id_for(order_id)
    state = pending_state(order_id, customer, datetime.now(UTC))
    handle = await client.start_workflow(
        models.WORKFLOW_NAME,
        state,
        id=workflow_id,
        task_queue=continuing_orders,
        search_attributes=TypedSearchAttributes(
            [SearchAttributePair(search_attributes.ORDER_CUSTOMER_ID, customer)]
        ),
    )
    first_run = handle.result_run_id
    await listed_once_as(stack, customer, order_id, S.ORDER_STATUS_PENDING)
    call = watch(stack, order_id)
    assert (await next_message(call)).status == S.ORDER_STATUS_PENDING

    await handle.signal(ADVANCE_SIGNAL, models.OrderStatus.PREPARING)
    # The first run continued as new; the stream follows the run it named.
    assert (await next_message(call)).status == S.ORDER_STATUS_PREPARING
    second_run = await current_run(client, workflow_id)
    assert second_run != first_run
    await listed_once_as(stack, customer, order_id, S.ORDER_STATUS_PREPARING)
    rows = await visibility_rows(client, workflow_id, 2)
    assert [(row.run_id, row.status) for row in rows] == [
        (first_run, Status.CONTINUED_AS_NEW),
        (second_run, Status.RUNNING),
    ]

    await handle.signal(ADVANCE_SIGNAL, models.OrderStatus.DELIVERED)
    assert [message.status for message in await rest_of(call)] == [S.ORDER_STATUS_DELIVERED]
    assert await call.code() == grpc.StatusCode.OK
    await listed_once_as(stack, customer, order_id, S.ORDER_STATUS_DELIVERED)
