"""The gRPC server's Prometheus series, counted by a server interceptor.

The names and labels are those of go-grpc-prometheus (and py-grpc-prometheus),
so the usual dashboards and alerts work as they are:

- `grpc_server_started_total{grpc_type, grpc_service, grpc_method}`: RPCs begun;
- `grpc_server_handled_total{..., grpc_code}`: RPCs finished, by status code;
- `grpc_server_handling_seconds{...}`: a histogram of how long they took
  (a WatchOrder stream: how long it stayed open).

grpc_code is the status the caller got (`NOT_FOUND`, `UNAVAILABLE` ...): the
one the servicer aborted with, UNKNOWN for an exception it let escape, and
CANCELLED or DEADLINE_EXCEEDED when the caller went away first.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

# Prometheus' default buckets, then longer ones for streams and slow Temporal calls.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

_LABELS = ("grpc_type", "grpc_service", "grpc_method")

_Context = grpc.aio.ServicerContext[Any, Any]


class GrpcServerMetrics:
    """The series of one server, in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.started = Counter(
            "grpc_server_started",
            "Total number of RPCs started on the server.",
            _LABELS,
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*_LABELS, "grpc_code"),
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been "
            "application-level handled by the server.",
            _LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


def _status_code(context: _Context, error: BaseException | None) -> grpc.StatusCode:
    """The status the caller got: what the handler set or aborted with, else what grpc sends."""
    # None until set_code or abort; grpc-stubs leaves the None out.
    code: grpc.StatusCode | None = context.code()
    if code is not None:
        return code
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class _Rpc:
    """One RPC being measured."""

    def __init__(self, metrics: GrpcServerMetrics, labels: tuple[str, str, str]) -> None:
        self._metrics = metrics
        self._labels = labels
        self._started = time.perf_counter()
        metrics.started.labels(*labels).inc()

    def done(self, context: _Context, error: BaseException | None) -> None:
        code = _status_code(context, error)
        self._metrics.handled.labels(*self._labels, code.name).inc()
        self._metrics.handling_seconds.labels(*self._labels).observe(
            time.perf_counter() - self._started
        )


def _measured(
    behavior: Callable[..., Any],
    metrics: GrpcServerMetrics,
    labels: tuple[str, str, str],
) -> Callable[..., Any] | None:
    """`behavior` measured, of the same kind: grpc.aio serves an async generator
    function as a response stream and a coroutine function as a single answer
    (or a stream written with context.write). None for anything else."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: _Context) -> AsyncIterator[Any]:
            rpc = _Rpc(metrics, labels)
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as error:
                rpc.done(context, error)
                raise
            rpc.done(context, None)

        return stream
    if inspect.iscoroutinefunction(behavior):

        async def call(request: Any, context: _Context) -> Any:
            rpc = _Rpc(metrics, labels)
            try:
                response = await behavior(request, context)
            except BaseException as error:
                rpc.done(context, error)
                raise
            rpc.done(context, None)
            return response

        return call
    return None


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts and times every RPC of every service on the server (health and reflection too).

    Put it first among the interceptors, so it sees what the others answer as well.
    """

    def __init__(self, metrics: GrpcServerMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED, uncounted
            return None
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        if handler.unary_unary is not None:
            kind, behavior, wrap = "unary", handler.unary_unary, grpc.unary_unary_rpc_method_handler
        elif handler.unary_stream is not None:
            kind, behavior, wrap = (
                "server_stream",
                handler.unary_stream,
                grpc.unary_stream_rpc_method_handler,
            )
        elif handler.stream_unary is not None:
            kind, behavior, wrap = (
                "client_stream",
                handler.stream_unary,
                grpc.stream_unary_rpc_method_handler,
            )
        else:
            kind, behavior, wrap = (
                "bidi_stream",
                handler.stream_stream,
                grpc.stream_stream_rpc_method_handler,
            )
        measured = _measured(behavior, self._metrics, (kind, service, method))
        if measured is None:  # a synchronous handler: not ours to wrap
            return handler
        return wrap(
            measured,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
