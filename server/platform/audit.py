"""The audit trail: one line on the logger `audit` for every write, refused ones included.

Who (the caller bound by the auth interceptor), what (the RPC), which order,
and the outcome (the gRPC status code's name), e.g.
`audit: caller=storefront rpc=CancelOrder order_id=ORD-... code=OK peer=ipv4:...`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from google.protobuf.message import Message

from infra import logs
from server.api import access
from server.platform.request_path import HandlerWrapper, handler_of_the_same_kind
from server.platform.tokens import ORDER_METHODS

logger = logging.getLogger("audit")

# The RPCs that change an order.
WRITES = ("CreateOrder", "ConfirmPayment", "CancelOrder")

_Context = grpc.aio.ServicerContext[Any, Any]


class AuditTrail(HandlerWrapper):
    """Wraps the writes' handlers; first among the interceptors, so it sees every outcome,
    those the request path and the token check give included."""

    def __init__(self) -> None:
        super().__init__()
        # Full method names, e.g. "/acme.orders.v1.OrderService/CreateOrder".
        self._writes = frozenset(ORDER_METHODS[rpc] for rpc in WRITES)

    def wrap(self, method: str, handler: Any) -> Any:
        # The writes are unary: a streaming handler is not one of them.
        if method not in self._writes or handler.unary_unary is None:
            return handler
        return self._audited(method, handler)

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
