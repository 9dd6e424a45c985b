"""The audit trail: one line on the logger `audit` for every write, refused ones included.

Who (the caller bound by the auth interceptor), what (the RPC), which order,
and the outcome (the gRPC status code's name), e.g.
`audit: caller=storefront rpc=CancelOrder order_id=ORD-... code=OK peer=ipv4:...`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from infra import logs
from server.api import access
from server.platform.request_path import handler_of_the_same_kind
from server.platform.tokens import ORDER_METHODS

logger = logging.getLogger("audit")

# The RPCs that change an order.
WRITES = ("CreateOrder", "ConfirmPayment", "CancelOrder")

_Context = grpc.aio.ServicerContext[Any, Any]


class AuditTrail(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps the writes' handlers; first among the interceptors, so it sees every outcome,
    those the request path and the token check give included."""

    def __init__(self) -> None:
        # Full method names, e.g. "/acme.orders.v1.OrderService/CreateOrder".
        self._writes = frozenset(ORDER_METHODS[rpc] for rpc in WRITES)
        # Write method -> (the handler grpc gave, ours for it).
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        # The writes are unary: a streaming handler is not one of them.
        if handler is None or method not in self._writes or handler.unary_unary is None:
            return handler
        # Wrapped once per method while grpc gives the same handler, as the request path does.
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        ours = self._audited(method, handler)
        self._wrapped[method] = (handler, ours)
        return ours

    def _audited(self, method: str, handler: Any) -> Any:
        rpc = method.rpartition("/")[2]
        behavior = handler.unary_unary

        async def audited(request: Any, context: _Context) -> Any:
            order_id = getattr(request, "order_id", "") if isinstance(request, Message) else ""
            code = grpc.StatusCode.UNKNOWN
            try:
                response = await behavior(request, context)
                order_id = order_id or getattr(response, "order_id", "")
                code = context.code() or grpc.StatusCode.OK
                return response
            except grpc.aio.AbortError:  # how the request path ends a failed call
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:
                left = context.time_remaining()
                expired = left is not None and left <= 0
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                raise
            finally:
                _record(rpc, order_id, code, context)

        return handler_of_the_same_kind(handler, audited, handler.request_deserializer)


def _record(rpc: str, order_id: str, code: grpc.StatusCode, context: _Context) -> None:
    with logs.rpc_context(rpc, order_id):
        logger.info(
            "caller=%s rpc=%s order_id=%s code=%s peer=%s",
            access.current().name,
            rpc,
            order_id or "-",
            code.name,
            context.peer(),
        )
