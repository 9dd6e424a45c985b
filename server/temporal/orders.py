"""The order workflows as the API uses them: start, query, signal, within the caller's deadline."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

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

# Our own deadline on a Temporal call runs this much past the rpc_timeout we
# give temporalio, so its more specific error normally arrives first. It is
# still needed: the core client retries a refused connection past rpc_timeout.
TIMEOUT_SLACK_SECONDS = 0.5
# How long before the caller's deadline the server gives up on Temporal, so
# that its answer (UNAVAILABLE) still reaches the caller.
_ANSWER_MARGIN_SECONDS = 0.2
_MIN_TIMEOUT_SECONDS = 0.01

_R = TypeVar("_R")


async def within_deadline(cap: timedelta, operation: Callable[[timedelta], Awaitable[_R]]) -> _R:
    """`operation(rpc_timeout)` within the cap and the caller's deadline; TimeoutError if not."""
    guard = cap.total_seconds() + TIMEOUT_SLACK_SECONDS
    remaining = time_remaining()
    if remaining is not None:
        guard = min(guard, max(remaining - _ANSWER_MARGIN_SECONDS, _MIN_TIMEOUT_SECONDS))
    async with asyncio.timeout(guard):
        return await operation(min(cap, timedelta(seconds=guard)))


class OrderWorkflows:
    """Starts, queries and signals order workflows on one task queue."""

    def __init__(self, client: Client, *, task_queue: str, rpc_timeout: timedelta) -> None:
        self._client = client
        self._task_queue = task_queue
        self.rpc_timeout = rpc_timeout

    def _handle(self, order_id: str) -> WorkflowHandle[object, object]:
        return self._client.get_workflow_handle(models.workflow_id_for(order_id))

    async def start(self, order: models.OrderInput) -> None:
        """Starts the order's workflow; WorkflowAlreadyStartedError if its id was ever used."""
        total = models.order_total(order.items)
        created_at = datetime.now(UTC)
        order = dataclasses.replace(order, created_at=created_at)
        await within_deadline(
            self.rpc_timeout,
            lambda timeout: self._client.start_workflow(
                models.WORKFLOW_NAME,
                order,
                id=models.workflow_id_for(order.order_id),
                task_queue=self._task_queue,
                # One workflow per order id, ever: a retried request_id cannot
                # start a second workflow even after the first has closed.
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                # Listable at once, before any worker has run the order's first task.
                search_attributes=TypedSearchAttributes(
                    search_attributes.for_listing(
                        order.customer_id, models.OrderStatus.PENDING, created_at, total
                    )
                ),
                # Readable at once too: the state reads answer from (see `state`).
                memo={
                    search_attributes.MEMO_TOTAL_AMOUNT: total,
                    search_attributes.MEMO_ORDER_STATE: models.initial_state(order, created_at),
                },
                rpc_timeout=timeout,
            ),
        )

    async def state(self, order_id: str) -> models.OrderState:
        """The order as its workflow's last completed task left it, from the memo: no worker
        needed. Orders started before the state was kept there are queried instead."""
        handle = self._handle(order_id)
        described = await within_deadline(
            self.rpc_timeout, lambda timeout: handle.describe(rpc_timeout=timeout)
        )
        try:
            state: models.OrderState = await described.memo_value(
                search_attributes.MEMO_ORDER_STATE, type_hint=models.OrderState
            )
        except KeyError:
            return await self._query(order_id, models.GET_FULL_STATE_QUERY, models.OrderState)
        return state

    async def _query(self, order_id: str, query: str, result_type: type[_R]) -> _R:
        handle = self._handle(order_id)
        return await within_deadline(
            self.rpc_timeout,
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
