"""Who may call what: each role's RPCs, a call of every RPC, and what a call answered.

The role table is written out by hand rather than read from server.platform.tokens,
so that widening a role there by mistake fails the tests that use it (the tokens
file's unit tests, the roles through TLS, and customers beside system callers).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from server.platform import tokens

Metadata = tuple[tuple[str, str], ...]
Call = Callable[[], Awaitable[object]]

# Every RPC of OrderService (read from its descriptor: the service's, not a role's).
ALL_RPCS = frozenset(tokens.ORDER_METHODS)
# What each role may call, spelt out here rather than read from server.platform.tokens,
# so that widening a role by mistake fails.
ROLE_RPCS: Mapping[str, frozenset[str]] = {
    "storefront": frozenset(
        {
            "CreateOrder",
            "GetOrder",
            "GetOrderStatus",
            "GetEstimatedDelivery",
            "ListOrders",
            "WatchOrder",
            "CancelOrder",
        }
    ),
    "payment-gateway": frozenset({"ConfirmPayment"}),
    "operator": ALL_RPCS,
    "admin": ALL_RPCS,
}


async def code_of(call: Awaitable[object]) -> grpc.StatusCode:
    """The call's status code: OK, or the code of the error it raised."""
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def failure(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    """The error the call must raise."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail of the error's google.rpc.Status."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


async def first_watched(
    stub: pb_grpc.OrderServiceAsyncStub, order_id: str, metadata: Metadata
) -> pb.Order:
    """Opens WatchOrder, reads the first message (the order now), and leaves.

    A refused watch raises its error from the read, as a unary call would, so that
    `code_of` and `failure` take a watch like any other call.
    """
    call = stub.WatchOrder(pb.WatchOrderRequest(order_id=order_id), metadata=metadata)
    try:
        order = await call.read()
        assert isinstance(order, pb.Order)
        assert order.order_id == order_id
        return order
    finally:
        call.cancel()


def rpc_calls(
    stub: pb_grpc.OrderServiceAsyncStub,
    metadata: Metadata,
    order_id: str,
    *,
    create: pb.CreateOrderRequest | None = None,
    listing: pb.ListOrdersRequest | None = None,
    payment: pb.ConfirmPaymentRequest | None = None,
    cancel: pb.CancelOrderRequest | None = None,
) -> dict[str, Call]:
    """A call of each RPC with `metadata`: the reads and the watch of `order_id`, and the
    others with the request given (whose customer, which payment, which cancel and why);
    an RPC whose request is not given has no call.

    In this order, so that a test making them all on one order reads it before paying it.
    """
    calls: dict[str, Call | None] = {
        "CreateOrder": (
            None if create is None else lambda: stub.CreateOrder(create, metadata=metadata)
        ),
        "GetOrder": lambda: stub.GetOrder(pb.GetOrderRequest(order_id=order_id), metadata=metadata),
        "GetOrderStatus": lambda: stub.GetOrderStatus(
            pb.GetOrderStatusRequest(order_id=order_id), metadata=metadata
        ),
        "GetEstimatedDelivery": lambda: stub.GetEstimatedDelivery(
            pb.GetEstimatedDeliveryRequest(order_id=order_id), metadata=metadata
        ),
        "ListOrders": (
            None if listing is None else lambda: stub.ListOrders(listing, metadata=metadata)
        ),
        "WatchOrder": lambda: first_watched(stub, order_id, metadata),
        "ConfirmPayment": (
            None if payment is None else lambda: stub.ConfirmPayment(payment, metadata=metadata)
        ),
        "CancelOrder": (
            None if cancel is None else lambda: stub.CancelOrder(cancel, metadata=metadata)
        ),
    }
    return {rpc: call for rpc, call in calls.items() if call is not None}
