"""The Temporal calls each RPC makes, counted and pinned (issue 11; docs/decisions/0016).

The gRPC server reaches the Temporal dev server through a counting proxy; the
worker connects directly, so only the API's calls are counted. Each RPC runs
alone (tests/support/call_counts.py), the health prober's calls left out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from tests.support.call_counts import WATCH_ORDER, Measured, counted_stack, measure_all
from tests.support.counting_proxy import (
    DESCRIBE,
    HISTORY,
    LIST,
    QUERY,
    SIGNAL,
    START,
)

# Every RPC but WatchOrder: exactly these calls, nothing else.
PINNED = {
    "CreateOrder": {START: 1},
    "GetOrder": {DESCRIBE: 1},
    "GetOrderStatus": {DESCRIBE: 1},
    "GetEstimatedDelivery": {DESCRIBE: 1},
    # The memo's state answers for the order; the signal only once it is accepted.
    "ConfirmPayment (refused: wrong amount)": {DESCRIBE: 1},
    "ConfirmPayment": {DESCRIBE: 1, SIGNAL: 1},
    "CancelOrder": {DESCRIBE: 1, SIGNAL: 1},
    "GetOrder (NOT_FOUND)": {DESCRIBE: 1},
    # The first window holds the customer's two orders: one read, then one list of
    # their other runs (docs/decisions/0007); no count, as the window reaches the floor.
    "ListOrders (one page)": {LIST: 2},
}
# An order's life from PENDING to DELIVERED with the instant providers: about 75
# history events, 8 to 18 history reads measured (the watcher reads batches of
# events, so fewer when it lags); about 30 if every batch were read alone.
MAX_WATCH_HISTORY_READS = 40


@pytest_asyncio.fixture(scope="module")
async def measured(
    temporal: WorkflowEnvironment, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Measured]]:
    """Every RPC measured once, on a worker and server of their own."""
    async with counted_stack(temporal.client, tmp_path_factory.mktemp("outbox")) as stack:
        yield {m.rpc: m for m in await measure_all(stack)}


def test_each_rpc_makes_exactly_the_calls_pinned(measured: dict[str, Measured]) -> None:
    counts = {rpc: dict(m.calls) for rpc, m in measured.items() if rpc != WATCH_ORDER}
    assert counts == PINNED


def test_create_order_makes_one_call(measured: dict[str, Measured]) -> None:
    assert measured["CreateOrder"].calls.total() == 1


def test_no_rpc_makes_a_call_that_waits_on_a_worker(measured: dict[str, Measured]) -> None:
    waiting = {rpc: dict(m.waiting_on_worker) for rpc, m in measured.items()}
    assert waiting == {rpc: {} for rpc in measured}


def test_watch_order_queries_nothing_and_reads_the_history_once_per_batch(
    measured: dict[str, Measured],
) -> None:
    watch = measured[WATCH_ORDER]
    # No more queries than the order has state changes: none at all, its states
    # come from the history it long-polls.
    assert watch.calls[QUERY] == 0
    assert 2 <= watch.messages <= watch.states, watch
    # The history, long-polled, and nothing else. A describe only if the run closed in
    # the last batch read (is there a run after it? docs/decisions/0012); it does not
    # close before the stream ends, so normally none.
    assert set(watch.calls) <= {HISTORY, DESCRIBE}, watch.calls
    assert watch.calls[DESCRIBE] <= 1, watch.calls
    # One read from the start, then one long poll per batch of new events: every
    # poll but the first brings at least one event (the stream lasts well under
    # the 20 s after which Temporal answers an idle long poll empty). Reads follow
    # batches, not state changes: activities and workflow tasks add events too.
    reads = watch.calls[HISTORY]
    assert 1 <= reads <= watch.events, watch
    assert reads <= MAX_WATCH_HISTORY_READS, watch
