"""`watch_order`: follow an order until it is final, across dropped streams.

WatchOrder sends the order's current state when it opens, then each new
state, and ends (status OK) once the order is final: DELIVERED, or CANCELLED
with its compensation done. A stream can also end early: the server stops
(UNAVAILABLE, with a RetryInfo), the connection drops, or a deadline the
caller gave each stream passes. `watch_order` then opens it again, after a
backoff, and skips the state it already yielded, so the caller sees each
state once, in order.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import grpc

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from acme_orders_client.channel import (
    BACKOFF_MULTIPLIER,
    INITIAL_BACKOFF_SECONDS,
    MAX_BACKOFF_SECONDS,
)
from acme_orders_client.errors import OrderServiceError, from_rpc_error

if TYPE_CHECKING:
    from acme_orders_client.client import OrderServiceClient

FINAL_STATUSES = frozenset({pb.ORDER_STATUS_DELIVERED, pb.ORDER_STATUS_CANCELLED})
# A stream that ends with one of these is opened again; any other error is raised.
RESUMABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def _stub(
    source: OrderServiceClient | pb_grpc.OrderServiceAsyncStub | grpc.aio.Channel,
) -> pb_grpc.OrderServiceAsyncStub:
    if isinstance(source, grpc.aio.Channel):
        return pb_grpc.OrderServiceStub(source)
    if isinstance(source, pb_grpc.OrderServiceStub):
        return source
    return source.stub


async def watch_order(
    source: OrderServiceClient | pb_grpc.OrderServiceAsyncStub | grpc.aio.Channel,
    order_id: str,
    *,
    initial_backoff: float = INITIAL_BACKOFF_SECONDS,
    max_backoff: float = MAX_BACKOFF_SECONDS,
    multiplier: float = BACKOFF_MULTIPLIER,
    max_attempts: int | None = 20,
    stream_timeout: float | None = None,
    metadata: Sequence[tuple[str, str | bytes]] | None = None,
) -> AsyncIterator[pb.Order]:
    """Yields the order's states until it is final; resumes a stream that drops.

    source: an `OrderServiceClient`, an async stub or a `grpc.aio.Channel`.
    max_attempts: how many opens in a row may fail (UNAVAILABLE or
    DEADLINE_EXCEEDED before any message) before the last error is raised as
    `Unavailable` / `DeadlineExceeded`; None: no limit. A stream that
    delivered a message counts as a success. stream_timeout: a deadline for
    each stream (a resumable DEADLINE_EXCEEDED); None: none.
    Any other error (NotFound, InvalidArgument, PermissionDenied ...) is raised at once.

    Ends after the stream ends normally on a final state. A stream that ends
    normally on another state (the order's workflow was closed without
    finishing, e.g. terminated) is opened once more; if that one brings
    nothing new either, the iterator ends on the last state.

    Leaving the loop early cancels the open stream once the generator is
    closed: `async with contextlib.aclosing(watch_order(...)) as states:`.
    """
    stub = _stub(source)
    request = pb.WatchOrderRequest(order_id=order_id)
    last: pb.Order | None = None
    failures = 0  # opens in a row that failed before any message
    backoff = initial_backoff
    while True:
        call = stub.WatchOrder(request, timeout=stream_timeout, metadata=metadata)
        received = progressed = False
        error: OrderServiceError | None = None
        try:
            async for order in call:
                received = True
                if order == last:
                    continue  # the state every new stream starts with, seen already
                last, progressed = order, True
                yield order
        except grpc.RpcError as err:
            error = from_rpc_error(err)
            if error.code not in RESUMABLE_CODES:
                raise error from err
        finally:
            call.cancel()  # a no-op once the stream is over; else the caller left early
        if error is None:  # the server ended the stream
            if last is not None and last.status in FINAL_STATUSES:
                return
            if not progressed:
                return  # nothing new since the last normal end: there is no more
        if received:
            failures, backoff = 0, initial_backoff
        else:
            failures += 1
            if error is not None and max_attempts is not None and failures >= max_attempts:
                raise error
        delay = random.uniform(backoff / 2, backoff)
        if error is not None and error.retry_delay is not None:
            delay = max(delay, error.retry_delay.total_seconds())
        await asyncio.sleep(delay)
        backoff = min(backoff * multiplier, max_backoff)
