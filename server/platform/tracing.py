"""The gRPC server span of each RPC: a child of the caller's W3C traceparent, if it sent one.

Our own rather than opentelemetry-instrumentation-grpc's aio interceptor: that one
learns the status only from `context.abort`, so every error the request path sends
with `abort_with_status` showed as OK (docs/decisions/0019-tracing.md).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from server.platform.request_path import (
    HandlerWrapper,
    behavior_of,
    handler_of_the_same_kind,
    outcome_code,
)

_Context = grpc.aio.ServicerContext[Any, Any]
# The codes OpenTelemetry's gRPC conventions count as the server's error; the
# others (NOT_FOUND, INVALID_ARGUMENT...) are the caller's and leave the span unset.
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class ServerSpans(HandlerWrapper):
    """One SERVER span per RPC of `traced_services` (not health probes), current while it runs.

    First among the interceptors, so that every line the RPC logs, its refusals
    included, carries the span's ids, and the Temporal calls it makes are its children.
    """

    def __init__(self, tracer: trace.Tracer, *, traced_services: list[str]) -> None:
        super().__init__()
        self._tracer = tracer
        self._traced = frozenset(traced_services)

    def wrap(self, method_name: str, handler: Any) -> Any:
        full_name = method_name.lstrip("/")
        service, _, method = full_name.rpartition("/")
        if service not in self._traced:
            return handler
        behavior = behavior_of(handler)
        span = self._span

        if not inspect.iscoroutinefunction(behavior):  # synchronous, or not behind a request path
            return handler

        # Streams too: the request path, inside, has made them coroutines that write.
        async def traced(request: Any, context: _Context) -> Any:
            with span(full_name, service, method, context):
                return await behavior(request, context)

        return handler_of_the_same_kind(handler, traced, handler.request_deserializer)

    @contextmanager
    def _span(self, name: str, service: str, method: str, context: _Context) -> Iterator[None]:
        # W3C traceparent / tracestate and baggage, as the global propagator reads them.
        metadata = context.invocation_metadata() or ()
        carrier = {key: value for key, value in metadata if isinstance(value, str)}
        parent = propagate.extract(carrier)
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        with self._tracer.start_as_current_span(
            name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as current:
            code = grpc.StatusCode.UNKNOWN
            try:
                yield
                code = outcome_code(context)
            # The caller left, an abort (the request path's errors) or a bug.
            except (asyncio.CancelledError, Exception) as ended:
                code = outcome_code(context, ended)
                raise
            finally:
                current.set_attribute("rpc.grpc.status_code", code.value[0])
                if code in SERVER_ERRORS:
                    current.set_status(Status(StatusCode.ERROR, code.name))
