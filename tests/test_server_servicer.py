"""The OrderService over real gRPC, with an in-memory stand-in for the Temporal client
(tests/support/fake_temporal.py).

These check the servicer's own logic (idempotent create, the courtesy checks
before a signal, the error mapping, timeouts, health, reflection) in
milliseconds; tests/test_errors.py and friends run the same paths against
a real Temporal server and the real workflow.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import TypeVar, cast

import grpc
import pytest
import pytest_asyncio
from google.protobuf import descriptor_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from google.type.money_pb2 import Money as PbMoney
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from server.api import ids
from server.platform.app import OrderServer, start_server
from server.platform.health import WORKERS, TemporalHealthProber
from tests.support.env import with_changes
from tests.support.fake_temporal import CONFIG, NOW, FakeTemporal
from tests.support.orders import money
from tests.support.polling import eventually
from workflows import models
from workflows.money import Money

M = TypeVar("M", bound=Message)

LAPTOP = Money("USD", 999, 990_000_000)


# --- Fixtures and helpers -------------------------------------------------------------


@dataclass
class Harness:
    temporal: FakeTemporal
    server: OrderServer
    channel: grpc.aio.Channel
    stub: pb_grpc.OrderServiceAsyncStub


@pytest_asyncio.fixture
async def harness() -> AsyncIterator[Harness]:
    temporal = FakeTemporal()
    server = await start_server(CONFIG, client=cast(Client, temporal))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Harness(temporal, server, channel, pb_grpc.OrderServiceStub(channel))
    finally:
        await channel.close(grace=None)
        await server.stop(0.5)


def create_request(**fields: object) -> pb.CreateOrderRequest:
    values: dict[str, object] = {
        "customer_id": "CUST-001",
        "items": [
            pb.OrderItem(
                product_id="PROD-123",
                product_name="Laptop",
                quantity=3,
                price=money(999, 990_000_000),
            )
        ],
        "shipping_address": "123 Main St",
        "shipping_city": "San Francisco",
        "shipping_postal_code": "94102",
        "shipping_country": "USA",
    }
    values.update(fields)
    return pb.CreateOrderRequest(**values)  # type: ignore[arg-type]


TOTAL = money(2999, 970_000_000)  # 3 x 999.99


def pay(
    order_id: str, transaction_id: str = "TXN-1", amount: PbMoney = TOTAL
) -> pb.ConfirmPaymentRequest:
    return pb.ConfirmPaymentRequest(
        order_id=order_id, transaction_id=transaction_id, amount=amount, payment_method="card"
    )


def status_of(err: grpc.aio.AioRpcError) -> status_pb2.Status:
    # At run time an aio error's trailing metadata is (key, value) pairs.
    metadata = cast(Iterable[tuple[str, bytes]], err.trailing_metadata() or ())
    for key, value in metadata:
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no status details in {err}")


def detail(err: grpc.aio.AioRpcError, kind: type[M]) -> M:
    for any_detail in status_of(err).details:
        if any_detail.Is(kind.DESCRIPTOR):
            message = kind()
            any_detail.Unpack(message)
            return message
    raise AssertionError(f"no {kind.DESCRIPTOR.name} in {err}")


def violated_fields(err: grpc.aio.AioRpcError) -> set[str]:
    bad = detail(err, error_details_pb2.BadRequest)
    assert isinstance(bad, error_details_pb2.BadRequest)
    return {violation.field for violation in bad.field_violations}


def reason(err: grpc.aio.AioRpcError) -> str:
    info = detail(err, error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.domain == "orders.acme.example"
    return str(info.reason)


async def create(h: Harness, **fields: object) -> pb.CreateOrderResponse:
    return await h.stub.CreateOrder(create_request(**fields))


# --- CreateOrder ------------------------------------------------------------------------


async def test_create_order_starts_one_workflow(harness: Harness) -> None:
    created = await create(harness)
    assert created.status == pb.ORDER_STATUS_PENDING
    assert created.workflow_id == f"order-{created.order_id}"
    assert created.total_amount == TOTAL
    assert created.message == "Order created successfully. Awaiting payment confirmation."

    [start] = harness.temporal.starts
    assert start["workflow"] == models.WORKFLOW_NAME
    assert start["id"] == created.workflow_id
    assert start["task_queue"] == "orders-unit"
    assert start["id_reuse_policy"] == WorkflowIDReusePolicy.REJECT_DUPLICATE
    assert start["id_conflict_policy"] == WorkflowIDConflictPolicy.FAIL
    order_input = start["arg"]
    assert isinstance(order_input, models.OrderInput)
    assert order_input.order_id == created.order_id
    assert order_input.payment_timeout_seconds == 600
    rpc_timeout = start["rpc_timeout"]
    assert isinstance(rpc_timeout, timedelta)
    assert timedelta(seconds=1) < rpc_timeout <= CONFIG.temporal_rpc_timeout


async def test_retry_with_the_request_id_returns_the_same_order(harness: Harness) -> None:
    request_id = str(uuid.uuid4())
    first = await create(harness, request_id=request_id)
    harness.temporal.order(first.order_id).state.status = models.OrderStatus.PAYMENT_CONFIRMED

    again = await create(harness, request_id=request_id.upper())
    assert (again.order_id, again.workflow_id) == (first.order_id, first.workflow_id)
    assert again.total_amount == first.total_amount
    assert again.status == pb.ORDER_STATUS_PAYMENT_CONFIRMED  # as it is now
    assert again.message == "Order already created for this request_id."
    assert len(harness.temporal.workflows) == 1


async def test_a_request_id_reused_for_another_order_is_invalid(harness: Harness) -> None:
    request_id = str(uuid.uuid4())
    await create(harness, request_id=request_id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(harness, request_id=request_id, customer_id="SOMEONE-ELSE")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == {"request_id"}
    assert reason(caught.value) == "REQUEST_ID_REUSED"


async def test_an_invalid_create_starts_nothing(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(harness, customer_id="", shipping_city="")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == {"customer_id", "shipping_city"}
    assert harness.temporal.starts == []


async def test_a_taken_random_order_id_is_already_exists(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = await create(harness)
    # 80 random bits never collide in practice; force the next id onto the existing one.
    monkeypatch.setattr(ids, "new_order_id", lambda request_id: created.order_id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(harness)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert reason(caught.value) == "ORDER_ALREADY_EXISTS"


# --- ConfirmPayment -----------------------------------------------------------------------


async def test_payment_is_signalled(harness: Harness) -> None:
    created = await create(harness)
    reply = await harness.stub.ConfirmPayment(pay(created.order_id))
    assert reply.order_id == created.order_id
    assert reply.status == pb.ORDER_STATUS_PENDING
    assert reply.message == "Payment received. The order is being processed."
    assert harness.temporal.order(created.order_id).signals == [
        (
            models.CONFIRM_PAYMENT_SIGNAL,
            models.PaymentRequest("TXN-1", Money("USD", 2999, 970_000_000), "card"),
        )
    ]


@pytest.mark.parametrize(
    "amount",
    [money(2999, 960_000_000), money(2999, 970_000_000, "EUR"), money(3000)],
)
async def test_a_wrong_amount_is_refused_before_the_signal(
    harness: Harness, amount: PbMoney
) -> None:
    created = await create(harness)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.ConfirmPayment(pay(created.order_id, amount=amount))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == {"amount"}
    assert "USD 2999.97" in (caught.value.details() or "")
    assert reason(caught.value) == "PAYMENT_AMOUNT_MISMATCH"
    assert harness.temporal.order(created.order_id).signals == []


async def test_the_same_transaction_again_is_ok_without_a_signal(harness: Harness) -> None:
    created = await create(harness)
    state = harness.temporal.order(created.order_id).state
    state.status = models.OrderStatus.SHIPPED
    state.payment_info = models.PaymentInfo("TXN-1", Money("USD", 2999, 970_000_000), "card", NOW)
    reply = await harness.stub.ConfirmPayment(pay(created.order_id, "TXN-1"))
    assert reply.status == pb.ORDER_STATUS_SHIPPED
    assert "already recorded" in reply.message
    assert harness.temporal.order(created.order_id).signals == []


@pytest.mark.parametrize(
    ("status", "words"),
    [
        (models.OrderStatus.PAYMENT_CONFIRMED, "already paid by another transaction"),
        (models.OrderStatus.PREPARING, "already paid"),
        (models.OrderStatus.SHIPPED, "has shipped"),
        (models.OrderStatus.DELIVERED, "was delivered"),
        (models.OrderStatus.CANCELLED, "is cancelled"),
    ],
)
async def test_paying_an_order_that_is_not_pending_fails_the_precondition(
    harness: Harness, status: models.OrderStatus, words: str
) -> None:
    created = await create(harness)
    state = harness.temporal.order(created.order_id).state
    state.status = status
    if status != models.OrderStatus.CANCELLED:
        state.payment_info = models.PaymentInfo("TXN-0", LAPTOP, "card", NOW)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.ConfirmPayment(pay(created.order_id, "TXN-2"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert words in (caught.value.details() or "")
    failure = detail(caught.value, error_details_pb2.PreconditionFailure)
    assert isinstance(failure, error_details_pb2.PreconditionFailure)
    assert failure.violations[0].subject == f"orders/{created.order_id}"
    assert f"current status: {status.value}" in failure.violations[0].description
    assert reason(caught.value) == "ORDER_STATE_FORBIDS"
    assert harness.temporal.order(created.order_id).signals == []


async def test_a_transaction_the_order_refused_before_stays_refused(harness: Harness) -> None:
    created = await create(harness)
    harness.temporal.order(created.order_id).state.rejected_payments.append(
        models.RejectedPayment(
            "TXN-1", Money("USD", 1), "card", "Amount USD 1.00 does not equal the total", NOW
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.ConfirmPayment(pay(created.order_id, "TXN-1"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "refused transaction TXN-1: Amount USD 1.00" in (caught.value.details() or "")
    assert harness.temporal.order(created.order_id).signals == []
    # A new transaction is fine.
    await harness.stub.ConfirmPayment(pay(created.order_id, "TXN-2"))


async def test_an_order_that_closes_before_the_signal_fails_the_precondition(
    harness: Harness,
) -> None:
    created = await create(harness)
    harness.temporal.order(created.order_id).closed = True  # the memo still says PENDING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.ConfirmPayment(pay(created.order_id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "closed before the payment arrived" in (caught.value.details() or "")


# --- CancelOrder ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status",
    [
        models.OrderStatus.PENDING,
        models.OrderStatus.PAYMENT_CONFIRMED,
        models.OrderStatus.PREPARING,
    ],
)
async def test_cancel_is_signalled_until_shipment(
    harness: Harness, status: models.OrderStatus
) -> None:
    created = await create(harness)
    harness.temporal.order(created.order_id).state.status = status
    reply = await harness.stub.CancelOrder(pb.CancelOrderRequest(order_id=created.order_id))
    assert reply.status == convert_status(status)
    assert reply.message.startswith("Cancellation requested.")
    assert harness.temporal.order(created.order_id).signals == [
        (models.CANCEL_ORDER_SIGNAL, models.CancelRequest("Cancelled at the customer's request"))
    ]


def convert_status(status: models.OrderStatus) -> pb.OrderStatus.ValueType:
    return pb.OrderStatus.Value(f"ORDER_STATUS_{status.name}")


@pytest.mark.parametrize(
    ("status", "words"),
    [
        (models.OrderStatus.SHIPPED, "has shipped and can no longer be cancelled"),
        (models.OrderStatus.DELIVERED, "was delivered"),
        (models.OrderStatus.CANCELLED, "already cancelled"),
    ],
)
async def test_cancel_after_shipment_fails_the_precondition(
    harness: Harness, status: models.OrderStatus, words: str
) -> None:
    created = await create(harness)
    harness.temporal.order(created.order_id).state.status = status
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.CancelOrder(
            pb.CancelOrderRequest(order_id=created.order_id, reason="Too late")
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert words in (caught.value.details() or "")
    assert harness.temporal.order(created.order_id).signals == []


async def test_cancel_passes_the_reason(harness: Harness) -> None:
    created = await create(harness)
    await harness.stub.CancelOrder(
        pb.CancelOrderRequest(order_id=created.order_id, reason="Changed my mind")
    )
    assert harness.temporal.order(created.order_id).signals == [
        (models.CANCEL_ORDER_SIGNAL, models.CancelRequest("Changed my mind"))
    ]


# --- Reads ------------------------------------------------------------------------------------


async def test_reads(harness: Harness) -> None:
    created = await create(harness, customer_email="a@b.co")
    order_id = created.order_id

    order = await harness.stub.GetOrder(pb.GetOrderRequest(order_id=order_id))
    assert (order.order_id, order.workflow_id) == (order_id, created.workflow_id)
    assert order.customer_email == "a@b.co"
    assert order.total_amount == TOTAL
    assert order.created_at.ToDatetime(tzinfo=UTC) == NOW

    status = await harness.stub.GetOrderStatus(pb.GetOrderStatusRequest(order_id=order_id))
    assert (status.order_id, status.status) == (order_id, pb.ORDER_STATUS_PENDING)

    eta_request = pb.GetEstimatedDeliveryRequest(order_id=order_id)
    eta = await harness.stub.GetEstimatedDelivery(eta_request)
    assert eta.order_id == order_id
    assert not eta.HasField("estimated_delivery")

    harness.temporal.order(order_id).state.estimated_delivery = NOW + timedelta(days=3)
    eta = await harness.stub.GetEstimatedDelivery(eta_request)
    assert eta.estimated_delivery.ToDatetime(tzinfo=UTC) == NOW + timedelta(days=3)


async def test_an_unknown_order_is_not_found_everywhere(harness: Harness) -> None:
    unknown = "ORD-0000000000000000"
    calls: list[Awaitable[object]] = [
        harness.stub.GetOrder(pb.GetOrderRequest(order_id=unknown)),
        harness.stub.GetOrderStatus(pb.GetOrderStatusRequest(order_id=unknown)),
        harness.stub.GetEstimatedDelivery(pb.GetEstimatedDeliveryRequest(order_id=unknown)),
        harness.stub.CancelOrder(pb.CancelOrderRequest(order_id=unknown)),
        harness.stub.ConfirmPayment(pay(unknown)),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        info = detail(caught.value, error_details_pb2.ResourceInfo)
        assert isinstance(info, error_details_pb2.ResourceInfo)
        assert (info.resource_type, info.resource_name) == ("acme.orders.v1.Order", unknown)
        assert reason(caught.value) == "ORDER_NOT_FOUND"


async def test_a_malformed_order_id_never_reaches_temporal(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.GetOrder(pb.GetOrderRequest(order_id="ORD 1; DROP"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == {"order_id"}
    assert harness.temporal.rpc_timeouts == []


# --- Temporal trouble ---------------------------------------------------------------------------


async def test_temporal_unreachable_is_unavailable(harness: Harness) -> None:
    harness.temporal.failure = RuntimeError("Failed client connect: Server connection error")
    for call in (
        harness.stub.CreateOrder(create_request()),
        harness.stub.GetOrder(pb.GetOrderRequest(order_id="ORD-1")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "cannot be reached" in (caught.value.details() or "")
        assert reason(caught.value) == "TEMPORAL_UNAVAILABLE"


async def test_a_hanging_temporal_call_is_cut_before_the_caller_deadline(
    harness: Harness,
) -> None:
    harness.temporal.hang = True
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.GetOrder(pb.GetOrderRequest(order_id="ORD-1"), timeout=1.0)
    # The server gives up on Temporal early enough to say why, within the deadline.
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 1.0
    [rpc_timeout] = harness.temporal.rpc_timeouts
    assert rpc_timeout is not None
    # The caller's 1 s less the answer margin, not the configured 10 s cap.
    assert rpc_timeout <= timedelta(seconds=0.85)


async def test_a_hanging_temporal_call_is_cut_at_the_configured_cap() -> None:
    temporal = FakeTemporal()
    temporal.hang = True
    config = with_changes(CONFIG, temporal_rpc_timeout=timedelta(milliseconds=200))
    server = await start_server(config, client=cast(Client, temporal))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.OrderServiceStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetOrder(pb.GetOrderRequest(order_id="ORD-1"), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "did not answer in time" in (caught.value.details() or "")
            assert time.monotonic() - started < 2
    finally:
        await server.stop(0.5)


async def test_a_bug_is_internal_with_a_generic_message(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.temporal.failure = ValueError("secret internals")
    with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.GetOrder(pb.GetOrderRequest(order_id="ORD-1"))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (caught.value.details() or "")
    assert "secret internals" in caplog.text  # with its traceback, for us


async def test_one_log_line_per_rpc(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="server.rpc"):
        created = await create(harness)
        with pytest.raises(grpc.aio.AioRpcError):
            await harness.stub.GetOrder(pb.GetOrderRequest(order_id="ORD-NOPE"))
    lines = [r.getMessage() for r in caplog.records if r.name == "server.rpc"]
    assert len(lines) == 2
    assert lines[0].startswith(
        f"rpc=CreateOrder order_id={created.order_id} workflow_id={created.workflow_id} code=OK "
    )
    assert lines[1].startswith(
        "rpc=GetOrder order_id=ORD-NOPE workflow_id=order-ORD-NOPE code=NOT_FOUND "
    )


# --- Health, reflection, lifecycle ---------------------------------------------------------------


async def test_health_follows_temporal() -> None:
    temporal = FakeTemporal()
    temporal.healthy = False
    prober = TemporalHealthProber(
        cast(Client, temporal),
        ["acme.orders.v1.OrderService"],
        CONFIG.task_queue,
        interval=timedelta(milliseconds=20),
    )
    health = prober.health

    async def status(service: str) -> int:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), None)
        return int(reply.status)

    async def becomes(service: str, expected: int) -> None:
        await eventually(
            lambda: status(service), lambda s: s == expected, within=2.0, interval=0.01
        )

    await prober.start()
    try:
        for service in ("", "acme.orders.v1.OrderService"):
            assert await status(service) == health_pb2.HealthCheckResponse.NOT_SERVING
        temporal.healthy = True
        await becomes("acme.orders.v1.OrderService", health_pb2.HealthCheckResponse.SERVING)
        await becomes("", health_pb2.HealthCheckResponse.SERVING)
        # The API serves without a worker; "workers" says whether one polls.
        assert await status(WORKERS) == health_pb2.HealthCheckResponse.NOT_SERVING
        temporal.poller_seen_ago = timedelta(seconds=1)
        await becomes(WORKERS, health_pb2.HealthCheckResponse.SERVING)
        temporal.poller_seen_ago = timedelta(seconds=80)  # a worker that died
        await becomes(WORKERS, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await status("") == health_pb2.HealthCheckResponse.SERVING
        temporal.poller_seen_ago = timedelta(seconds=1)
        await becomes(WORKERS, health_pb2.HealthCheckResponse.SERVING)
        temporal.healthy = False
        await becomes("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await becomes(WORKERS, health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        await prober.stop()
    assert await status("") == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_health_over_grpc(harness: Harness) -> None:
    stub = health_pb2_grpc.HealthStub(harness.channel)
    request = health_pb2.HealthCheckRequest(service="acme.orders.v1.OrderService")
    for _ in range(200):
        reply = await stub.Check(request)
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            break
        await asyncio.sleep(0.01)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_sends_json_names(harness: Harness) -> None:
    """So grpcurl prints proto3 JSON (orderId), not the proto field names (order_id)."""
    stub = reflection_pb2_grpc.ServerReflectionStub(harness.channel)
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="acme.orders.v1.Order")
    files: list[descriptor_pb2.FileDescriptorProto] = []
    async for response in stub.ServerReflectionInfo(iter([request])):
        for raw in response.file_descriptor_response.file_descriptor_proto:
            files.append(descriptor_pb2.FileDescriptorProto.FromString(raw))
    names = {file.name for file in files}
    assert {"acme/orders/v1/order_service.proto", "google/type/money.proto"} <= names
    [orders] = [file for file in files if file.name == "acme/orders/v1/order_service.proto"]
    [order] = [message for message in orders.message_type if message.name == "Order"]
    json_names = {field.name: field.json_name for field in order.field}
    assert json_names["order_id"] == "orderId"
    assert json_names["total_amount"] == "totalAmount"


async def test_port_zero_binds_a_free_port_and_stop_closes_it() -> None:
    server = await start_server(CONFIG, client=cast(Client, FakeTemporal()))
    assert server.port > 0
    await server.stop(0.1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.OrderServiceStub(channel).GetOrder(
                pb.GetOrderRequest(order_id="ORD-1"), timeout=1
            )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_taken_port_is_an_error() -> None:
    first = await start_server(CONFIG, client=cast(Client, FakeTemporal()))
    try:
        with pytest.raises(OSError, match="cannot listen"):
            await start_server(
                with_changes(CONFIG, port=first.port), client=cast(Client, FakeTemporal())
            )
    finally:
        await first.stop(0.1)
