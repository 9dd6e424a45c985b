"""Every error a caller can meet: the right canonical code, with details, never UNKNOWN."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from server.platform.app import start_server
from server.platform.settings import ServerSettings
from tests.support.env import free_port
from tests.support.keys import key_settings
from tests.support.orders import LAPTOP_PRICE, create_request, money
from tests.support.polling import eventually
from tests.support.stack import Stack, open_stack, order_reaching

S = pb.OrderStatus
UNKNOWN_ORDER = "ORD-0000000000000000"


def details(err: grpc.aio.AioRpcError) -> dict[str, object]:
    """The google.rpc details of an error, by type name."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    found: dict[str, object] = {}
    if status is None:
        return found
    for kind in (
        error_details_pb2.BadRequest,
        error_details_pb2.PreconditionFailure,
        error_details_pb2.ResourceInfo,
        error_details_pb2.ErrorInfo,
    ):
        for any_detail in status.details:
            if any_detail.Is(kind.DESCRIPTOR):
                message = kind()
                any_detail.Unpack(message)
                found[kind.DESCRIPTOR.name] = message
    return found


def violations(err: grpc.aio.AioRpcError) -> set[str]:
    bad = details(err).get("BadRequest")
    assert isinstance(bad, error_details_pb2.BadRequest), f"no BadRequest in {err}"
    return {v.field for v in bad.field_violations}


def item(**fields: object) -> pb.OrderItem:
    values: dict[str, object] = dict(
        product_id="PROD-1", product_name="Thing", quantity=1, price=LAPTOP_PRICE
    )
    values.update(fields)
    return pb.OrderItem(**values)  # type: ignore[arg-type]


BAD_CREATES: dict[str, tuple[Callable[[], pb.CreateOrderRequest], str]] = {
    "no items": (lambda: create_request(items=[]), "items"),
    "zero quantity": (lambda: create_request(items=[item(quantity=0)]), "items[0].quantity"),
    "negative quantity": (lambda: create_request(items=[item(quantity=-2)]), "items[0].quantity"),
    "negative price": (lambda: create_request(items=[item(price=money(-1))]), "items[0].price"),
    "nanos out of range": (
        lambda: create_request(items=[item(price=money(1, 1_000_000_000))]),
        "items[0].price",
    ),
    "units and nanos of opposite signs": (
        lambda: create_request(items=[item(price=money(1, -5))]),
        "items[0].price",
    ),
    "malformed currency": (
        lambda: create_request(items=[item(price=money(1, 0, currency="usd"))]),
        "items[0].price",
    ),
    "missing price": (
        lambda: create_request(items=[pb.OrderItem(product_id="P", product_name="N", quantity=1)]),
        "items[0].price",
    ),
    "mixed currencies": (
        lambda: create_request(items=[item(), item(price=money(1, 0, currency="EUR"))]),
        "items[1].price",
    ),
    "missing customer": (lambda: create_request(customer_id=""), "customer_id"),
    "missing product id": (
        lambda: create_request(items=[item(product_id="")]),
        "items[0].product_id",
    ),
    "missing city": (lambda: create_request(shipping_city=""), "shipping_city"),
    "too many items": (lambda: create_request(items=[item()] * 101), "items"),
    "absurd quantity": (
        lambda: create_request(items=[item(quantity=2_000_000_000)]),
        "items[0].quantity",
    ),
    "huge name": (
        lambda: create_request(items=[item(product_name="x" * 10_000)]),
        "items[0].product_name",
    ),
    "absurd total": (
        lambda: create_request(items=[item(price=money(900_000_000_000), quantity=10_000)]),
        "items",
    ),
    "request_id not a UUID": (lambda: create_request(request_id="abc"), "request_id"),
}


async def test_bad_creates_are_invalid_argument_and_start_nothing(stack: Stack) -> None:
    # A stack of its own, so counting its task queue's workflows is exact.
    async with open_stack(stack.client, stack.outbox) as fresh:
        for name, (build, field) in BAD_CREATES.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await fresh.stub.CreateOrder(build())
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert any(v.startswith(field) for v in violations(caught.value)), (
                name,
                violations(caught.value),
            )

        # One good order as a marker: once visibility shows it, it shows the rest too.
        good = await fresh.stub.CreateOrder(create_request())
        query = f"TaskQueue = '{fresh.task_queue}' AND WorkflowType = 'OrderWorkflow'"
        count = await eventually(
            lambda: fresh.client.count_workflows(query), lambda c: c.count >= 1
        )
        assert count.count == 1
        assert [w.id async for w in fresh.client.list_workflows(query)] == [good.workflow_id]
        await fresh.stub.CancelOrder(pb.CancelOrderRequest(order_id=good.order_id))


async def test_all_violations_reported_at_once(stack: Stack) -> None:
    request = create_request(customer_id="", shipping_country="", items=[item(quantity=0)])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.CreateOrder(request)
    assert {"customer_id", "shipping_country", "items[0].quantity"} <= violations(caught.value)


async def test_unknown_order_is_not_found(stack: Stack) -> None:
    calls: list[Awaitable[object]] = [
        stack.stub.GetOrder(pb.GetOrderRequest(order_id=UNKNOWN_ORDER)),
        stack.stub.GetOrderStatus(pb.GetOrderStatusRequest(order_id=UNKNOWN_ORDER)),
        stack.stub.GetEstimatedDelivery(pb.GetEstimatedDeliveryRequest(order_id=UNKNOWN_ORDER)),
        stack.stub.CancelOrder(pb.CancelOrderRequest(order_id=UNKNOWN_ORDER)),
        stack.stub.ConfirmPayment(
            pb.ConfirmPaymentRequest(
                order_id=UNKNOWN_ORDER,
                transaction_id="TXN-1",
                amount=LAPTOP_PRICE,
                payment_method="card",
            )
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert UNKNOWN_ORDER in (caught.value.details() or "")
        info = details(caught.value)["ResourceInfo"]
        assert isinstance(info, error_details_pb2.ResourceInfo)
        assert info.resource_name == UNKNOWN_ORDER


@pytest.mark.parametrize("order_id", ["", "x' OR 'a'='a", "ORD\n1", "Ö" * 10, "x" * 65])
async def test_missing_or_malformed_ids_are_invalid_argument(stack: Stack, order_id: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.GetOrder(pb.GetOrderRequest(order_id=order_id))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == {"order_id"}


async def test_bad_payments_are_invalid_argument(stack: Stack) -> None:
    created = await stack.stub.CreateOrder(create_request())
    cases = {
        "transaction_id": pb.ConfirmPaymentRequest(
            order_id=created.order_id, amount=LAPTOP_PRICE, payment_method="card"
        ),
        "amount": pb.ConfirmPaymentRequest(
            order_id=created.order_id, transaction_id="TXN-1", payment_method="card"
        ),
        "payment_method": pb.ConfirmPaymentRequest(
            order_id=created.order_id, transaction_id="TXN-1", amount=LAPTOP_PRICE
        ),
    }
    cases["amount.negative"] = pb.ConfirmPaymentRequest(
        order_id=created.order_id, transaction_id="TXN-1", amount=money(-999), payment_method="card"
    )
    for expected, request in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub.ConfirmPayment(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert any(v.startswith(expected.split(".")[0]) for v in violations(caught.value))
    await stack.stub.CancelOrder(pb.CancelOrderRequest(order_id=created.order_id))


async def test_cancel_after_shipment_is_failed_precondition(slow_stack: Stack) -> None:
    stack = slow_stack
    created = await stack.stub.CreateOrder(create_request())
    await stack.stub.ConfirmPayment(
        pb.ConfirmPaymentRequest(
            order_id=created.order_id,
            transaction_id="TXN-SHIP",
            amount=LAPTOP_PRICE,
            payment_method="card",
        )
    )
    await order_reaching(stack, created.order_id, S.ORDER_STATUS_SHIPPED)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.CancelOrder(pb.CancelOrderRequest(order_id=created.order_id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "PreconditionFailure" in details(caught.value)

    await stack.client.get_workflow_handle(created.workflow_id).result()
    order = await stack.stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))
    assert order.status == S.ORDER_STATUS_DELIVERED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.CancelOrder(pb.CancelOrderRequest(order_id=created.order_id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_cancel_twice_is_failed_precondition(stack: Stack) -> None:
    created = await stack.stub.CreateOrder(create_request())
    await stack.stub.CancelOrder(pb.CancelOrderRequest(order_id=created.order_id))
    await order_reaching(stack, created.order_id, S.ORDER_STATUS_CANCELLED)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.CancelOrder(pb.CancelOrderRequest(order_id=created.order_id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_temporal_down_is_unavailable_fast_and_not_serving() -> None:
    config = ServerSettings(
        host="127.0.0.1",
        port=0,
        temporal_address=f"127.0.0.1:{free_port()}",
        task_queue="orders-nowhere",
        **key_settings(),
    )
    server = await start_server(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.OrderServiceStub(channel)
            for call in (
                lambda: stub.CreateOrder(create_request(), timeout=15),
                lambda: stub.GetOrder(pb.GetOrderRequest(order_id=UNKNOWN_ORDER), timeout=15),
            ):
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call()
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - started < 12
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "acme.orders.v1.OrderService"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await server.stop(grace=1.0)


async def test_health_is_serving_with_temporal_up(stack: Stack) -> None:
    health = health_pb2_grpc.HealthStub(stack.channel)
    reply = await eventually(
        lambda: health.Check(health_pb2.HealthCheckRequest(service="acme.orders.v1.OrderService")),
        lambda r: r.status == health_pb2.HealthCheckResponse.SERVING,
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_idempotent_create(stack: Stack) -> None:
    request_id = str(uuid.uuid4())
    first = await stack.stub.CreateOrder(create_request(request_id=request_id))
    again = await stack.stub.CreateOrder(create_request(request_id=request_id))
    assert (again.order_id, again.workflow_id) == (first.order_id, first.workflow_id)
    assert again.total_amount == first.total_amount
    # Upper case is the same UUID.
    upper = await stack.stub.CreateOrder(create_request(request_id=request_id.upper()))
    assert upper.order_id == first.order_id

    # One workflow run for the three requests.
    runs = await eventually(
        lambda: stack.client.count_workflows(f"WorkflowId = '{first.workflow_id}'"),
        lambda c: c.count >= 1,
    )
    assert runs.count == 1

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.CreateOrder(create_request(request_id=request_id, customer_id="OTHER"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == {"request_id"}
    await stack.stub.CancelOrder(pb.CancelOrderRequest(order_id=first.order_id))
