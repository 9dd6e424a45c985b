"""The interceptors wrap a method's handler once and reuse it while grpc hands them the same one.

grpc.aio asks every interceptor for the handler on every RPC; building a new wrapper each
time cost a few µs per RPC and interceptor (docs/performance/README.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health as grpc_health

from server.platform import limits
from server.platform.request_path import RequestPath
from server.platform.settings import ServerSettings

CREATE = "/acme.orders.v1.OrderService/CreateOrder"


async def _behavior(request: Any, context: Any) -> None:
    return None


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def _interceptors() -> list[Any]:
    return [
        RequestPath(None, logged_services=["acme.orders.v1.OrderService"]),
        limits.Limits(ServerSettings(), open_services=[grpc_health.SERVICE_NAME]),
    ]


async def _intercept(interceptor: Any, handler: Any) -> Any:
    async def continuation(_details: grpc.HandlerCallDetails) -> Any:
        return handler

    call: Callable[..., Awaitable[Any]] = interceptor.intercept_service
    return await call(continuation, _Details(CREATE))


@pytest.mark.parametrize("index", [0, 1], ids=["request path", "limits"])
async def test_the_same_handler_is_wrapped_once(index: int) -> None:
    interceptor = _interceptors()[index]
    handler = grpc.unary_unary_rpc_method_handler(_behavior)
    first = await _intercept(interceptor, handler)
    assert first is not handler
    assert await _intercept(interceptor, handler) is first


@pytest.mark.parametrize("index", [0, 1], ids=["request path", "limits"])
async def test_another_handler_for_the_method_is_wrapped_anew(index: int) -> None:
    """A handler another interceptor made for this call (a refusal) is never given the
    wrapper of the one before."""
    interceptor = _interceptors()[index]
    usual = grpc.unary_unary_rpc_method_handler(_behavior)
    refusal = grpc.unary_unary_rpc_method_handler(_behavior)
    wrapped = await _intercept(interceptor, usual)
    other = await _intercept(interceptor, refusal)
    assert other is not wrapped
    assert other.unary_unary is not wrapped.unary_unary
