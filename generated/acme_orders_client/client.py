"""`OrderServiceClient`: the generated async stub, raising typed errors instead of RpcError."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from acme_orders_client.channel import UNARY_TIMEOUT_SECONDS, connect
from acme_orders_client.errors import from_rpc_error
from acme_orders_client.watch import watch_order

Request = TypeVar("Request")
Response = TypeVar("Response")
Metadata = Sequence[tuple[str, str | bytes]]


async def _call(
    method: grpc.aio.UnaryUnaryMultiCallable[Request, Response],
    request: Request,
    timeout: float | None,
    metadata: Metadata | None,
) -> Response:
    if timeout is None:
        timeout = UNARY_TIMEOUT_SECONDS  # the service config's, set here too: see channel.py
    try:
        response: Response = await method(request, timeout=timeout, metadata=metadata)
    except grpc.RpcError as err:
        raise from_rpc_error(err) from err
    return response


class OrderServiceClient:
    """The OrderService's RPCs as async methods taking and returning the generated messages.

    Each raises an `OrderServiceError` subclass (errors.py) where the stub
    raises `grpc.aio.AioRpcError`. `timeout`: the call's deadline in seconds,
    10 unless given (retries included); `metadata` adds headers. The channel's retries and
    deadlines apply (channel.py); `stub` is the raw stub for anything else.
    """

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.stub: pb_grpc.OrderServiceAsyncStub = pb_grpc.OrderServiceStub(channel)

    @classmethod
    def connect(cls, target: str, **kwargs: Any) -> OrderServiceClient:
        """A client on a new `connect(target, **kwargs)` channel, which `close` closes."""
        return cls(connect(target, **kwargs))

    async def close(self, grace: float | None = None) -> None:
        await self.channel.close(grace)

    async def __aenter__(self) -> OrderServiceClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def create_order(
        self,
        request: pb.CreateOrderRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> pb.CreateOrderResponse:
        """Creates an order. Without a request_id, a `connect` channel adds one (safe retries)."""
        return await _call(self.stub.CreateOrder, request, timeout, metadata)

    async def confirm_payment(
        self,
        request: pb.ConfirmPaymentRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> pb.ConfirmPaymentResponse:
        return await _call(self.stub.ConfirmPayment, request, timeout, metadata)

    async def cancel_order(
        self,
        request: pb.CancelOrderRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> pb.CancelOrderResponse:
        return await _call(self.stub.CancelOrder, request, timeout, metadata)

    async def get_order(
        self,
        request: pb.GetOrderRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> pb.Order:
        return await _call(self.stub.GetOrder, request, timeout, metadata)

    async def get_order_status(
        self,
        request: pb.GetOrderStatusRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> pb.GetOrderStatusResponse:
        return await _call(self.stub.GetOrderStatus, request, timeout, metadata)

    async def get_estimated_delivery(
        self,
        request: pb.GetEstimatedDeliveryRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> pb.GetEstimatedDeliveryResponse:
        return await _call(self.stub.GetEstimatedDelivery, request, timeout, metadata)

    async def list_orders(
        self,
        request: pb.ListOrdersRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> pb.ListOrdersResponse:
        return await _call(self.stub.ListOrders, request, timeout, metadata)

    def watch_order(self, order_id: str, **kwargs: Any) -> AsyncIterator[pb.Order]:
        """`watch_order(self, order_id, **kwargs)`: the order's states until it is final."""
        return watch_order(self.stub, order_id, **kwargs)
