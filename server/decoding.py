"""Requests whose bytes are not a valid protobuf get INVALID_ARGUMENT, not UNKNOWN.

grpc-python deserializes a request before any servicer code runs and answers
a DecodeError with UNKNOWN ("Unexpected <class DecodeError>..."), which blames
the server for the caller's bytes and names an internal class. This
interceptor wraps each method's deserializer: bytes that do not parse become
a marker, and the call ends with INVALID_ARGUMENT and a BadRequest instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from server import errors

_VIOLATION = errors.field_violation(
    "request",
    "Not a valid protobuf encoding of this method's request message.",
    "MALFORMED_REQUEST",
)


@dataclass(frozen=True)
class _Undecodable:
    """Stands in for a request whose bytes did not parse."""


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError:
            return _Undecodable()

    return parse


async def _reject(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await errors.abort(context, errors.InvalidArgument([_VIOLATION]))  # type: ignore[arg-type]


class RejectUndecodableRequests(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Turns undecodable requests to one service into INVALID_ARGUMENT.

    Only unary-request methods (all of OrderService's); the health and
    reflection services are grpc's own and left as they are.
    """

    def __init__(self, service_name: str) -> None:
        self._prefix = f"/{service_name}/"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or not handler_call_details.method.startswith(self._prefix)
            or handler.request_deserializer is None
            or handler.request_streaming
        ):
            return handler
        parse = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            # grpc-stubs types handlers as sync; on an aio server they are coroutines.
            unary: Any = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if isinstance(request, _Undecodable):
                    await _reject(context)
                return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream: Any = handler.unary_stream

            async def unary_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                if isinstance(request, _Undecodable):
                    await _reject(context)
                async for response in stream(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        return handler
