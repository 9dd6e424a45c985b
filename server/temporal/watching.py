"""WatchOrder: one shared watch per order, following its history (docs/decisions/0012)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from temporalio.api.common.v1 import Payload, WorkflowExecution
from temporalio.api.enums.v1 import EventType, WorkflowExecutionStatus
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.workflowservice.v1 import (
    GetWorkflowExecutionHistoryRequest,
    GetWorkflowExecutionHistoryResponse,
)
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from acme.orders.v1 import order_service_pb2 as pb
from server.api import convert, errors
from server.temporal.orders import TIMEOUT_SLACK_SECONDS, decode_state, describe
from workflows import models, rules, search_attributes

logger = logging.getLogger(__name__)

# Well past Temporal's long-poll interval (20 s by default), so a quiet order
# normally ends a poll with Temporal's empty answer rather than our timeout.
DEFAULT_POLL_TIMEOUT = timedelta(seconds=70)


@dataclass(frozen=True)
class _End:
    """The end of a stream: normal, or with the error to return."""

    error: errors.ServiceError | None = None


class Subscription:
    """One stream's view of a shared watch: an async iterator of Order messages."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[pb.Order | _End] = asyncio.Queue()

    def push(self, update: pb.Order | _End) -> None:
        self._queue.put_nowait(update)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> pb.Order:
        update = await self._queue.get()
        if isinstance(update, _End):
            self._queue.put_nowait(update)  # every later call ends the same way
            if update.error is not None:
                raise update.error
            raise StopAsyncIteration
        return update


class _SharedWatch:
    """The one task following one order, and the streams it feeds."""

    def __init__(
        self,
        order_id: str,
        client: Client,
        *,
        query_timeout: timedelta,
        poll_timeout: timedelta,
        on_end: Callable[[_SharedWatch], None],
    ) -> None:
        self.order_id = order_id
        self._client = client
        self._query_timeout = query_timeout
        self._poll_timeout = poll_timeout
        self._on_end = on_end
        self._subscriptions: list[Subscription] = []
        self._latest: pb.Order | None = None
        self._end: _End | None = None
        self.task = asyncio.create_task(self._run(), name=f"watch-order-{order_id}")

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    def subscribe(self) -> Subscription:
        subscription = Subscription()
        if self._latest is not None:
            subscription.push(self._latest)
        if self._end is not None:
            subscription.push(self._end)
        self._subscriptions.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.remove(subscription)

    def stop(self, end: _End) -> None:
        """Ends every stream with `end` and cancels the task."""
        self._finish(end)
        self.task.cancel()

    # --- The task ---------------------------------------------------------------------------

    async def _run(self) -> None:
        logger.debug("Watching order %s", self.order_id)
        try:
            await self._follow()
        except asyncio.CancelledError:
            raise  # whoever cancelled has dealt with the streams
        except Exception as exc:
            self._finish(_End(errors.translate(exc, order_id=self.order_id)))
        else:
            self._finish(_End())

    async def _follow(self) -> None:
        run_id = ""  # "": whichever run is current when the first read arrives
        token = b""
        in_memo = False  # whether the order keeps its state in the memo (not the oldest ones)
        while True:
            response = await self._poll(run_id, token)
            if response is None:
                continue  # our timeout, not Temporal's answer: ask again
            token = response.next_page_token
            closed = not token  # no more events will ever come in this run
            if closed:
                events = response.history.events
                next_run = await self._next_run(events[-1] if events else None, run_id)
                if next_run:
                    # A reset or continue-as-new: the order goes on in another run.
                    logger.debug("Order %s goes on in run %s", self.order_id, next_run)
                    run_id, token = next_run, b""
                    continue
            # The state as the last workflow task in these events left it, from the
            # memo: no query needed. (Catching up, the earlier states are history.)
            state = None
            if (latest := latest_memo_state(response.history.events)) is not None:
                state, in_memo = await decode_state(self._client, latest), True
            elif not in_memo and (
                closed
                or any(
                    event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
                    for event in response.history.events
                )
            ):
                state = await self._query()
            if state is not None:
                self._publish(convert.order_to_proto(state))
            if closed or (state is not None and rules.is_settled(state)):
                return

    async def _poll(self, run_id: str, token: bytes) -> GetWorkflowExecutionHistoryResponse | None:
        """The run's next events (from its start when token is empty); None if our timeout
        hit first. A page token stays on the run it came from, whatever became current."""
        request = GetWorkflowExecutionHistoryRequest(
            namespace=self._client.namespace,
            execution=WorkflowExecution(
                workflow_id=models.workflow_id_for(self.order_id), run_id=run_id
            ),
            next_page_token=token,
            wait_new_event=True,
        )
        seconds = self._poll_timeout.total_seconds() + TIMEOUT_SLACK_SECONDS
        try:
            async with asyncio.timeout(seconds):
                return await self._client.workflow_service.get_workflow_execution_history(
                    request, retry=True, timeout=self._poll_timeout
                )
        except TimeoutError:
            return None
        except RPCError as err:
            if err.status in (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED):
                return None
            raise

    async def _next_run(self, closing: HistoryEvent | None, closed_run_id: str) -> str:
        """The run the order goes on in after the followed one closed; "" if none.

        Continue-as-new (and a retry or cron run) names it in the closing event;
        a reset does not (the old run just ends terminated, or stays completed),
        so then one describe of the workflow id asks which run is current.
        """
        named = _named_next_run(closing)
        if named:
            return named
        seconds = self._query_timeout.total_seconds() + TIMEOUT_SLACK_SECONDS
        async with asyncio.timeout(seconds):
            described = await describe(self._client, self.order_id, rpc_timeout=self._query_timeout)
        current = described.workflow_execution_info
        # The followed run has closed, so a running current run is another one.
        if (
            current.status == WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING
            and current.execution.run_id != closed_run_id
        ):
            return current.execution.run_id
        return ""  # closed for good: its last state is the order's final one

    async def _query(self) -> models.OrderState:
        """The state from the workflow, for orders started before it was kept in the memo."""
        handle = self._client.get_workflow_handle(models.workflow_id_for(self.order_id))
        seconds = self._query_timeout.total_seconds() + TIMEOUT_SLACK_SECONDS
        async with asyncio.timeout(seconds):
            state: models.OrderState = await handle.query(
                models.GET_FULL_STATE_QUERY,
                result_type=models.OrderState,
                rpc_timeout=self._query_timeout,
            )
        return state

    def _publish(self, order: pb.Order) -> None:
        if order == self._latest:
            return  # a workflow task that changed nothing the order shows
        self._latest = order
        for subscription in self._subscriptions:
            subscription.push(order)

    def _finish(self, end: _End) -> None:
        if self._end is not None:
            return
        logger.debug("Watch of order %s ended: %s", self.order_id, end.error or "final state")
        self._end = end
        for subscription in self._subscriptions:
            subscription.push(end)
        self._on_end(self)


def latest_memo_state(events: Sequence[HistoryEvent]) -> Payload | None:
    """The last order state the events carry: the start's memo or an upsert of it."""
    for event in reversed(events):
        if event.HasField("workflow_properties_modified_event_attributes"):
            fields = event.workflow_properties_modified_event_attributes.upserted_memo.fields
        elif event.HasField("workflow_execution_started_event_attributes"):
            fields = event.workflow_execution_started_event_attributes.memo.fields
        else:
            continue
        if search_attributes.MEMO_ORDER_STATE in fields:
            return fields[search_attributes.MEMO_ORDER_STATE]
    return None


def _named_next_run(closing: HistoryEvent | None) -> str:
    """The run a closing event says comes next (continue-as-new, retry, cron); "" if none."""
    if closing is None:
        return ""
    for attributes in (
        closing.workflow_execution_continued_as_new_event_attributes,
        closing.workflow_execution_completed_event_attributes,
        closing.workflow_execution_failed_event_attributes,
        closing.workflow_execution_timed_out_event_attributes,
    ):
        if attributes.new_execution_run_id:
            return attributes.new_execution_run_id
    return ""


class OrderWatchers:
    """The registry of shared watches, one per watched order."""

    def __init__(
        self,
        client: Client,
        *,
        query_timeout: timedelta,
        poll_timeout: timedelta = DEFAULT_POLL_TIMEOUT,
    ) -> None:
        self._client = client
        self._query_timeout = query_timeout
        self._poll_timeout = poll_timeout
        self._watches: dict[str, _SharedWatch] = {}
        # Tasks still running, including cancelled ones that have not finished yet.
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = False

    def __len__(self) -> int:
        """How many orders are being watched."""
        return len(self._watches)

    @property
    def running_tasks(self) -> int:
        return len(self._tasks)

    def subscribers(self, order_id: str) -> int:
        """How many streams watch the order (0 if none)."""
        watch = self._watches.get(order_id)
        return watch.subscribers if watch else 0

    @contextlib.asynccontextmanager
    async def watch(self, order_id: str) -> AsyncIterator[Subscription]:
        """The order's updates, for as long as the `async with` block runs.

        Leaving the block (normally, by error or by cancellation) unsubscribes;
        the last stream to leave cancels and forgets the shared watch.
        """
        if self._stopped:
            raise errors.ServerShuttingDown()
        watch = self._watches.get(order_id)
        if watch is None:
            watch = _SharedWatch(
                order_id,
                self._client,
                query_timeout=self._query_timeout,
                poll_timeout=self._poll_timeout,
                on_end=self._forget,
            )
            self._watches[order_id] = watch
            self._tasks.add(watch.task)
            watch.task.add_done_callback(self._tasks.discard)
        subscription = watch.subscribe()
        try:
            yield subscription
        finally:
            watch.unsubscribe(subscription)
            if not watch.subscribers and not watch.task.done():
                watch.task.cancel()
                self._forget(watch)

    async def stop(self) -> None:
        """Ends every stream with UNAVAILABLE, cancels every watch, waits for them; no new ones."""
        self._stopped = True
        for watch in list(self._watches.values()):
            watch.stop(_End(errors.ServerShuttingDown()))
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _forget(self, watch: _SharedWatch) -> None:
        if self._watches.get(watch.order_id) is watch:
            del self._watches[watch.order_id]
