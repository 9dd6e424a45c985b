"""The order workflows as the API uses them: start, read, signal, within the caller's deadline."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from temporalio.api.common.v1 import Payload, WorkflowExecution
from temporalio.api.workflowservice.v1 import (
    DescribeWorkflowExecutionRequest,
    DescribeWorkflowExecutionResponse,
)
from temporalio.client import Client, WorkflowHandle
from temporalio.common import (
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.service import RPCError

from server.api import errors
from server.platform.request_path import time_remaining
from workflows import models, search_attributes
from workflows.money import Money

# Our own deadline on a Temporal call runs this much past the rpc_timeout we
# give temporalio, so its more specific error normally arrives first. It is
# still needed: the core client retries a refused connection past rpc_timeout.
TIMEOUT_SLACK_SECONDS = 0.5
# How long before the caller's deadline the server gives up on Temporal, so
# that its answer (UNAVAILABLE) still reaches the caller.
_ANSWER_MARGIN_SECONDS = 0.2
_MIN_TIMEOUT_SECONDS = 0.01

_R = TypeVar("_R")


# Orders started before the state was kept in the memo (decision 0016) are read with a
# query, which only a worker answers. A worker answers in milliseconds; with none, the
# caller gets UNAVAILABLE with RetryInfo after this, not after the whole Temporal timeout.
QUERY_CAP = timedelta(seconds=1)


async def within_deadline(cap: timedelta, operation: Callable[[timedelta], Awaitable[_R]]) -> _R:
    """`operation(rpc_timeout)` within the cap and the caller's deadline; TimeoutError if not."""
    guard = cap.total_seconds() + TIMEOUT_SLACK_SECONDS
    remaining = time_remaining()
    if remaining is not None:
        guard = min(guard, max(remaining - _ANSWER_MARGIN_SECONDS, _MIN_TIMEOUT_SECONDS))
    async with asyncio.timeout(guard):
        return await operation(min(cap, timedelta(seconds=guard)))


async def describe(
    client: Client, order_id: str, *, rpc_timeout: timedelta
) -> DescribeWorkflowExecutionResponse:
    """DescribeWorkflowExecution of the order's workflow as handle.describe() makes it, less
    the decoding of every search attribute it would do: callers read what they need (about
    250 µs of CPU saved per read, docs/performance/README.md)."""
    request = DescribeWorkflowExecutionRequest(
        namespace=client.namespace,
        execution=WorkflowExecution(workflow_id=models.workflow_id_for(order_id)),
    )
    return await client.workflow_service.describe_workflow_execution(
        request, retry=True, timeout=rpc_timeout
    )


async def decode_state(client: Client, payload: Payload) -> models.OrderState:
    """An order state the workflow keeps in its memo, decoded (and decrypted) by `client`."""
    [state] = await client.data_converter.decode([payload], [models.OrderState])
    assert isinstance(state, models.OrderState)
    return state


@dataclasses.dataclass(frozen=True)
class StartArguments:
    """start_workflow's input, memo and search attributes for one order, and its total."""

    order: models.OrderInput
    total: Money
    memo: dict[str, object]
    search_attributes: TypedSearchAttributes


def start_arguments(order: models.OrderInput, customer_id_key: bytes) -> StartArguments:
    """What an order's workflow is started with: its input, stamped with the creation time and
    the customer key (`customer_id_key`'s hash of its customer id, docs/decisions/0017)."""
    total = models.order_total(order.items)
    created_at = datetime.now(UTC)
    customer = search_attributes.customer_key(customer_id_key, order.customer_id)
    order = dataclasses.replace(order, created_at=created_at, customer_key=customer)
    return StartArguments(
        order=order,
        total=total,
        # Readable at once: the state reads answer from (see `OrderWorkflows.state`), and
        # the customer id ListOrders shows (visibility holds only its hash).
        memo={
            search_attributes.MEMO_TOTAL_AMOUNT: total,
            search_attributes.MEMO_CUSTOMER_ID: order.customer_id,
            search_attributes.MEMO_ORDER_STATE: models.initial_state(order, created_at),
        },
        # Listable at once, before any worker has run the order's first task.
        search_attributes=TypedSearchAttributes(
            search_attributes.for_listing(customer, models.OrderStatus.PENDING, created_at, total)
        ),
    )


class OrderWorkflows:
    """Starts, reads and signals order workflows on one task queue."""

    def __init__(
        self,
        client: Client,
        *,
        task_queue: str,
        rpc_timeout: timedelta,
        customer_id_key: bytes,
    ) -> None:
        self._client = client
        # Keys the customer-id hash that visibility holds instead of the id (docs/decisions/0017).
        self._customer_id_key = customer_id_key
        self._task_queue = task_queue
        self.rpc_timeout = rpc_timeout

    def _handle(self, order_id: str) -> WorkflowHandle[object, object]:
        return self._client.get_workflow_handle(models.workflow_id_for(order_id))

    async def start(self, order: models.OrderInput) -> Money:
        """Starts the order's workflow and returns the order's total; WorkflowAlreadyStartedError
        if its id was ever used."""
        start = start_arguments(order, self._customer_id_key)
        await within_deadline(
            self.rpc_timeout,
            lambda timeout: self._client.start_workflow(
                models.WORKFLOW_NAME,
                start.order,
                id=models.workflow_id_for(start.order.order_id),
                task_queue=self._task_queue,
                # One workflow per order id, ever: a retried request_id cannot
                # start a second workflow even after the first has closed.
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                search_attributes=start.search_attributes,
                memo=start.memo,
                rpc_timeout=timeout,
            ),
        )
        return start.total

    async def state(self, order_id: str) -> models.OrderState:
        """The order as its workflow's last completed task left it, from the memo: no worker
        needed. Orders started before the state was kept there are queried instead."""
        described = await within_deadline(
            self.rpc_timeout, lambda timeout: describe(self._client, order_id, rpc_timeout=timeout)
        )
        memo = described.workflow_execution_info.memo.fields
        if search_attributes.MEMO_ORDER_STATE not in memo:
            return await self._query(order_id, models.GET_FULL_STATE_QUERY, models.OrderState)
        return await decode_state(self._client, memo[search_attributes.MEMO_ORDER_STATE])

    async def _query(self, order_id: str, query: str, result_type: type[_R]) -> _R:
        handle = self._handle(order_id)
        return await within_deadline(
            min(self.rpc_timeout, QUERY_CAP),
            lambda timeout: handle.query(query, result_type=result_type, rpc_timeout=timeout),
        )

    async def signal(self, order_id: str, signal: str, arg: object, *, if_closed: str) -> None:
        """Sends a signal; a workflow that has closed is FAILED_PRECONDITION."""
        handle = self._handle(order_id)
        try:
            await within_deadline(
                self.rpc_timeout,
                lambda timeout: handle.signal(signal, arg, rpc_timeout=timeout),
            )
        except RPCError as err:
            error = errors.translate(err, order_id=order_id)
            if isinstance(error, errors.OrderNotFound):
                raise errors.OrderStateForbids(order_id, None, if_closed) from err
            raise error from err
