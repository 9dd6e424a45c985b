"""A stream whose caller goes away is ended at once, whatever the server was doing.

grpc.aio drives a handler's response generator and does not close it when the call is
cancelled while a message is on its way: the generator, and what it holds (a shared
watch, a stream slot of the limits), waited for the garbage collector. CI once waited
over 30 s for a WatchOrder's CANCELLED. The request path writes the messages itself.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from tests.support.logs import captured_logs
from tests.support.polling import eventually
from tests.support.spans import in_memory_tracer, traced_server

# Far beyond what HTTP/2 flow control lets out before the caller reads: the write waits.
BIG = 32 * 2**20


@contextmanager
def no_garbage_collection() -> Iterator[None]:
    """Only what the server closes itself counts, not what a collection happens to find."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_a_stream_cancelled_while_a_message_is_on_its_way_is_closed_and_counted() -> None:
    closed = asyncio.Event()

    async def big_then_wait(request: bytes, context: Any) -> AsyncIterator[bytes]:
        try:
            yield b"x" * BIG
            await asyncio.Event().wait()
        finally:
            closed.set()

    method = grpc.unary_stream_rpc_method_handler(
        big_then_wait, request_deserializer=bytes, response_serializer=bytes
    )
    options = [("grpc.max_receive_message_length", -1)]
    with in_memory_tracer() as (provider, exporter):
        async with traced_server(provider, "Watch", method) as target:
            with no_garbage_collection(), captured_logs("text") as (logged,):
                async with grpc.aio.insecure_channel(target, options=options) as channel:
                    call = channel.unary_stream("/test.Orders/Watch", bytes, bytes)(b"")
                    await call.initial_metadata()  # sent with the first message: on its way
                    await asyncio.sleep(0.5)
                    call.cancel()
                    await asyncio.wait_for(closed.wait(), 10)
                # The request path logs as the call unwinds, after the generator closed.
                await eventually(
                    lambda: asyncio.sleep(0, logged.getvalue()),
                    lambda text: "code=CANCELLED" in text,
                    within=10,
                    interval=0.01,
                    what="the request path's line for the cancelled call",
                )
        (span,) = exporter.get_finished_spans()
    assert "rpc=Watch" in logged.getvalue()
    assert "code=CANCELLED" in logged.getvalue(), logged.getvalue()
    assert " ERROR " not in logged.getvalue(), logged.getvalue()  # a caller going away is no fault
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
