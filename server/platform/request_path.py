"""The one path every RPC takes: log context, deadline, timing, metrics, errors as rich statuses.

Servicer methods stay plain and raise; docs/decisions/0013 walks one CreateOrder through it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from infra import logs
from server.api import errors
from server.platform import audit
from server.platform.metrics import GrpcServerMetrics
from workflows import models

logger = logging.getLogger("server.rpc")

_Context = grpc.aio.ServicerContext[Any, Any]
_MALFORMED = errors.field_violation(
    "request",
    "Not a valid protobuf encoding of this method's request message.",
    "MALFORMED_REQUEST",
)
# A bug is an error; Temporal or the workers down, a warning; the rest, what callers do.
_LOG_LEVELS = {
    grpc.StatusCode.INTERNAL: logging.ERROR,
    grpc.StatusCode.UNAVAILABLE: logging.WARNING,
}
# time.monotonic() by which the caller of the RPC being served stops listening.
_deadline: ContextVar[float | None] = ContextVar("rpc_deadline", default=None)


def outcome_code(context: _Context, error: BaseException | None = None) -> grpc.StatusCode:
    """The status an RPC ended with, as its caller saw it: DEADLINE_EXCEEDED or CANCELLED
    if the caller left first (`error` a CancelledError), else the code the call set, or OK
    (UNKNOWN after an error that set none)."""
    if isinstance(error, asyncio.CancelledError):
        left = context.time_remaining()
        late = left is not None and left <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED
    code: grpc.StatusCode | None = context.code()
    return code or (grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN)


def time_remaining() -> float | None:
    """Seconds before the caller of the RPC being served gives up; None: it set no deadline."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


class _Undecodable:
    """Stands in for a request whose bytes did not parse."""


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError:
            return _Undecodable()

    return parse


# (request streaming, response streaming): the kind's label, the handler's attribute
# holding the behaviour, and grpc's factory for a handler of that kind.
_KINDS: dict[tuple[bool, bool], tuple[str, str, Callable[..., Any]]] = {
    (False, False): ("unary", "unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("server_stream", "unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("client_stream", "stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("bidi_stream", "stream_stream", grpc.stream_stream_rpc_method_handler),
}


def behavior_of(handler: grpc.RpcMethodHandler[Any, Any]) -> Callable[..., Any]:
    """The handler's behaviour: its unary_unary, unary_stream ... as it streams."""
    behavior: Callable[..., Any] = getattr(
        handler, _KINDS[handler.request_streaming, handler.response_streaming][1]
    )
    return behavior


def handler_of_the_same_kind(
    handler: grpc.RpcMethodHandler[Any, Any],
    behavior: Callable[..., Any],
    deserialize: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler for `behavior`, streaming as `handler` does."""
    new_handler = _KINDS[handler.request_streaming, handler.response_streaming][2]
    handler_of_kind: grpc.RpcMethodHandler[Any, Any] = new_handler(
        behavior, request_deserializer=deserialize, response_serializer=handler.response_serializer
    )
    return handler_of_kind


@dataclass(frozen=True)
class _Method:
    kind: str  # unary, server_stream, client_stream, bidi_stream
    service: str
    name: str
    logged: bool  # one line per RPC: the services of this server, not health or reflection
    audited: bool  # and an audit line: the writes

    @property
    def labels(self) -> tuple[str, str, str]:
        return (self.kind, self.service, self.name)


@dataclass
class _Outcome:
    code: grpc.StatusCode = grpc.StatusCode.OK
    order_id: str = ""
    messages: int | None = None  # on a stream: how many were sent


class HandlerWrapper(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """An interceptor that wraps each method's handler once, in `wrap`, and reuses the
    wrapping while grpc hands it the same handler: grpc asks again for every RPC.

    Unknown methods (no handler) are never kept, so this holds at most one entry per
    method served.
    """

    def __init__(self) -> None:
        # Method -> (the handler grpc gave, ours for it).
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        ours = self.wrap(method, handler)
        self._wrapped[method] = (handler, ours)
        return ours

    def wrap(self, method: str, handler: Any) -> Any:
        """The handler to serve `method` with: `handler` itself, or one wrapping it."""
        raise NotImplementedError


class RequestPath(HandlerWrapper):
    """Puts every RPC of every service through `_serving`; outside the token check and
    the limits, so it sees what they refuse too. `audited_methods` (full names) get an
    audit line each (server/platform/audit.py)."""

    def __init__(
        self,
        metrics: GrpcServerMetrics | None,
        *,
        logged_services: list[str],
        audited_methods: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        self._metrics = metrics
        self._logged = frozenset(logged_services)
        self._audited = audited_methods

    def wrap(self, method_name: str, handler: Any) -> Any:
        service, _, name = method_name.lstrip("/").rpartition("/")
        kind = _KINDS[handler.request_streaming, handler.response_streaming][0]
        behavior = behavior_of(handler)
        method = _Method(kind, service, name, service in self._logged, method_name in self._audited)
        deserialize = handler.request_deserializer
        if deserialize is not None and not handler.request_streaming:
            deserialize = _tolerant(deserialize)
        serving = self._serving

        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: _Context) -> None:
                # Written here, not yielded to grpc: a caller that goes away while a
                # message is on its way cancels this coroutine, which closes the handlers'
                # generators now. grpc leaves a generator it drives to the garbage
                # collector, which closes it later in another context (decision 0013).
                async with serving(method, request, context) as outcome:
                    outcome.messages = 0
                    async with aclosing(behavior(request, context)) as responses:
                        async for response in responses:
                            try:
                                await context.write(response)
                            except grpc.aio.InternalError as gone:
                                # The call ended under the write, as a cancel ends it.
                                raise asyncio.CancelledError from gone
                            outcome.messages += 1

            wrapped: Callable[..., Any] = stream
        elif inspect.iscoroutinefunction(behavior):

            async def unary(request: Any, context: _Context) -> Any:
                async with serving(method, request, context) as outcome:
                    response = await behavior(request, context)
                    outcome.order_id = outcome.order_id or getattr(response, "order_id", "")
                    return response

            wrapped = unary
        else:  # a synchronous handler: not ours to wrap
            return handler
        return handler_of_the_same_kind(handler, wrapped, deserialize)

    @asynccontextmanager
    async def _serving(
        self, method: _Method, request: Any, context: _Context
    ) -> AsyncIterator[_Outcome]:
        order_id = getattr(request, "order_id", "") if isinstance(request, Message) else ""
        outcome = _Outcome(order_id=order_id)
        remaining = context.time_remaining()
        deadline = _deadline.set(None if remaining is None else time.monotonic() + remaining)
        started = time.perf_counter()
        if self._metrics is not None:
            self._metrics.started_rpc(method.labels)
        try:
            with logs.rpc_context(method.name, order_id):
                try:
                    if isinstance(request, _Undecodable):
                        raise errors.InvalidArgument([_MALFORMED])
                    yield outcome
                    outcome.code = outcome_code(context)
                except (asyncio.CancelledError, grpc.aio.AbortError) as ended:
                    # The caller went away or its deadline passed, or a handler ended the
                    # call itself: gRPC has answered already.
                    outcome.code = outcome_code(context, ended)
                    raise
                except Exception as exc:
                    error = errors.translate(exc, order_id=order_id)
                    outcome.code = error.code
                    # grpc-stubs lacks the aio context's abort_with_status.
                    await context.abort_with_status(error.to_grpc_status())  # type: ignore[attr-defined]
        finally:
            _deadline.reset(deadline)
            self._record(method, outcome, time.perf_counter() - started, context)

    def _record(
        self, method: _Method, outcome: _Outcome, seconds: float, context: _Context
    ) -> None:
        if self._metrics is not None:
            self._metrics.handled_rpc(method.labels, outcome.code, seconds)
        if not method.logged:
            return
        level = _LOG_LEVELS.get(outcome.code, logging.INFO)
        line = "rpc=%s order_id=%s workflow_id=%s code=%s duration_ms=%d"
        args: list[object] = [
            method.name,
            outcome.order_id or "-",
            models.workflow_id_for(outcome.order_id) if outcome.order_id else "-",
            outcome.code.name,
            seconds * 1000,
        ]
        if outcome.messages is not None:
            line += " messages=%d"
            args.append(outcome.messages)
        with logs.rpc_context(method.name, outcome.order_id):
            logger.log(level, line, *args)
            if method.audited:
                audit.record(method.name, outcome.order_id, outcome.code, context.peer())
