"""The client package for other services: `make dist`'s wheel, `acme_orders_client` in it.

In this process, against a small real grpc.aio server on loopback whose
answers each test scripts: the channel's retries and deadlines, the
request_id that makes CreateOrder safe to retry, the typed errors with the
server's own google.rpc details, bearer tokens and JWTs, watch_order resuming
a dropped stream. Against the real server (the session `stack`): mutual TLS
and tokens, and, from the wheel installed into a fresh venv on the oldest
Python the package claims, the seed's happy path and two typed errors.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
import warnings
import zipfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import trustme
from google.protobuf.message import Message
from google.rpc import error_details_pb2

import acme_orders_client
from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from acme_orders_client import (
    SERVICE_CONFIG,
    OrderServiceClient,
    Tls,
    bearer_token,
    channel_options,
    connect,
    connect_sync,
    errors,
    from_rpc_error,
    jwt_credentials,
    watch_order,
)
from server import tokens as tokens_cli
from server.api import errors as server_errors
from server.platform import app, tokens
from server.platform.app import OrderServer, start_server
from server.platform.auth import Unauthenticated as ServerUnauthenticated
from tests.support.env import ROOT, clean_environ, free_port, with_changes
from tests.support.orders import create_request, payment_request
from tests.support.proxy import Proxy
from tests.support.stack import Stack, order_reaching, serving
from workflows import models

SERVICE = pb.DESCRIPTOR.services_by_name["OrderService"]

# --- A scripted server -----------------------------------------------------------------

# What a scripted call does before answering: fail with a status code, or with one of
# the server's own errors (its google.rpc details included).
Failure = grpc.StatusCode | server_errors.ServiceError
Context = grpc.aio.ServicerContext[Any, Any]


async def _fail(context: Context, failure: Failure) -> None:
    if isinstance(failure, server_errors.ServiceError):
        await context.abort_with_status(failure.to_grpc_status())  # type: ignore[attr-defined]
    else:
        await context.abort(failure, f"scripted {failure}")


@dataclass
class Call:
    method: str
    request: Message
    metadata: dict[str, str]
    # Seconds left until the call's deadline, None without one.
    deadline: float | None


@dataclass
class FakeOrders(pb_grpc.OrderServiceServicer):
    """Answers each unary call after failing with `failures` first (one per call), and each
    WatchOrder open with the next of `opens`: orders to send, then an optional failure."""

    failures: list[Failure] = field(default_factory=list)
    opens: list[list[pb.Order | Failure]] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)

    async def _unary(self, name: str, request: Message, context: Context) -> None:
        metadata = {k: str(v) for k, v in context.invocation_metadata() or ()}
        self.calls.append(Call(name, request, metadata, context.time_remaining()))
        if self.failures:
            await _fail(context, self.failures.pop(0))

    def calls_of(self, method: str) -> list[Call]:
        return [call for call in self.calls if call.method == method]

    async def CreateOrder(
        self, request: pb.CreateOrderRequest, context: Context
    ) -> pb.CreateOrderResponse:
        await self._unary("CreateOrder", request, context)
        return pb.CreateOrderResponse(order_id="ORD-1", status=pb.ORDER_STATUS_PENDING)

    async def GetOrderStatus(
        self, request: pb.GetOrderStatusRequest, context: Context
    ) -> pb.GetOrderStatusResponse:
        await self._unary("GetOrderStatus", request, context)
        return pb.GetOrderStatusResponse(order_id=request.order_id, status=pb.ORDER_STATUS_PENDING)

    async def WatchOrder(
        self, request: pb.WatchOrderRequest, context: Context
    ) -> AsyncIterator[pb.Order]:
        await self._unary("WatchOrder", request, context)
        for step in self.opens.pop(0) if self.opens else []:
            if isinstance(step, pb.Order):
                yield step
            else:
                await _fail(context, step)


@dataclass
class Fake:
    orders: FakeOrders
    target: str


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[Fake]:
    server = grpc.aio.server()
    orders = FakeOrders()  # type: ignore[abstract]  # the RPCs not scripted: UNIMPLEMENTED
    pb_grpc.add_OrderServiceServicer_to_server(orders, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Fake(orders, f"127.0.0.1:{port}")
    finally:
        await server.stop(None)


def status_request(order_id: str = "ORD-1") -> pb.GetOrderStatusRequest:
    return pb.GetOrderStatusRequest(order_id=order_id)


# --- The service config -----------------------------------------------------------------


def test_service_config_gives_every_rpc_a_policy_and_watch_order_no_deadline() -> None:
    """Each RPC listed once (a new RPC must be judged safe to retry, or not, here)."""
    listed = {
        name["method"]: entry
        for entry in SERVICE_CONFIG["methodConfig"]
        for name in entry["name"]
        if name["service"] == SERVICE.full_name
    }
    names = [n["method"] for e in SERVICE_CONFIG["methodConfig"] for n in e["name"]]
    assert sorted(names) == sorted(m.name for m in SERVICE.methods)
    for method in SERVICE.methods:
        entry = listed[method.name]
        assert entry["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
        if method.server_streaming:
            assert "timeout" not in entry, "a watch lasts until the order is final"
        else:
            assert entry["timeout"] == "10s"
    options = dict(channel_options())
    assert json.loads(options["grpc.service_config"]) == SERVICE_CONFIG
    assert options["grpc.enable_retries"] == 1


def test_channel_fits_the_servers_limits() -> None:
    """Client pings no faster than the server allows; answers as big as it sends fit."""
    client, server = dict(channel_options()), dict(app.SERVER_OPTIONS)
    assert (
        client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    )
    assert client["grpc.max_receive_message_length"] >= server["grpc.max_send_message_length"]


def test_version_follows_the_api() -> None:
    """1.x is acme.orders.v1; the wheel's version is the package's."""
    assert acme_orders_client.API_PACKAGE == pb.DESCRIPTOR.package == "acme.orders.v1"
    major = acme_orders_client.__version__.split(".")[0]
    assert f"v{major}" == pb.DESCRIPTOR.package.rsplit(".", 1)[1]


# --- Retries --------------------------------------------------------------------------------


async def test_unavailable_is_retried_until_it_works(fake: Fake) -> None:
    fake.orders.failures = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    async with OrderServiceClient.connect(fake.target) as orders:
        answer = await orders.get_order_status(status_request())
    assert answer.status == pb.ORDER_STATUS_PENDING
    assert len(fake.orders.calls_of("GetOrderStatus")) == 3


async def test_without_the_service_config_nothing_is_retried(fake: Fake) -> None:
    fake.orders.failures = [grpc.StatusCode.UNAVAILABLE]
    async with OrderServiceClient.connect(fake.target, service_config=None) as orders:
        with pytest.raises(errors.Unavailable):
            await orders.get_order_status(status_request())
    assert len(fake.orders.calls_of("GetOrderStatus")) == 1


async def test_retries_stop_after_five_attempts_with_the_servers_retry_delay(fake: Fake) -> None:
    unavailable = server_errors.TemporalUnavailable(server_errors.UNREACHABLE_MESSAGE)
    fake.orders.failures = [unavailable] * 6
    async with OrderServiceClient.connect(fake.target) as orders:
        with pytest.raises(errors.Unavailable) as caught:
            await orders.get_order_status(status_request())
    assert len(fake.orders.calls_of("GetOrderStatus")) == 5
    assert caught.value.reason == "TEMPORAL_UNAVAILABLE"
    assert caught.value.retry_delay is not None
    assert caught.value.retry_delay.total_seconds() == 2


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED],
)
async def test_other_errors_are_not_retried(fake: Fake, code: grpc.StatusCode) -> None:
    fake.orders.failures = [code]
    async with OrderServiceClient.connect(fake.target) as orders:
        with pytest.raises(errors.OrderServiceError) as caught:
            await orders.get_order_status(status_request())
    assert caught.value.code == code
    assert len(fake.orders.calls_of("GetOrderStatus")) == 1


async def test_unary_calls_get_the_default_deadline_and_watches_none(fake: Fake) -> None:
    """10 s, unless the call sets a shorter one; WatchOrder none.

    The client passes the 10 s itself: gRPC Python does not send a service
    config's timeout to the server, and may count it from a stale clock.
    """
    fake.orders.opens = [[order(DELIVERED)]]
    async with OrderServiceClient.connect(fake.target) as orders:
        await orders.get_order_status(status_request())
        await orders.get_order_status(status_request(), timeout=2)
        await watched(orders)
    default, shorter, watch = (call.deadline for call in fake.orders.calls)
    assert default is not None
    assert 9 < default <= 10.1  # grpc-timeout rounds up
    assert shorter is not None
    assert shorter <= 2.1
    assert watch is None or watch > 10**6, watch


async def test_create_order_without_request_id_gets_one_kept_across_retries(fake: Fake) -> None:
    """So the retry reaches the order the first attempt created, not a second order."""
    fake.orders.failures = [grpc.StatusCode.UNAVAILABLE]
    request = create_request()
    async with OrderServiceClient.connect(fake.target) as orders:
        await orders.create_order(request)
        await orders.create_order(create_request(request_id="5f0c6f7e-1111-4222-8333-444455556666"))
    first, retried, own = (call.request for call in fake.orders.calls_of("CreateOrder"))
    assert isinstance(first, pb.CreateOrderRequest)
    assert isinstance(retried, pb.CreateOrderRequest)
    assert uuid.UUID(first.request_id)
    assert retried.request_id == first.request_id
    assert request.request_id == "", "the caller's message is left as it was"
    assert isinstance(own, pb.CreateOrderRequest)
    assert own.request_id == "5f0c6f7e-1111-4222-8333-444455556666"


def _sync_call(target: str, method: str, request: Message) -> None:
    """One call on a `connect_sync` channel (in a thread: the fake serves on the event loop)."""
    with connect_sync(target) as channel:
        getattr(pb_grpc.OrderServiceStub(channel), method)(request)


async def test_the_sync_channel_retries_and_adds_the_request_id_too(fake: Fake) -> None:
    fake.orders.failures = [grpc.StatusCode.UNAVAILABLE]
    await asyncio.to_thread(_sync_call, fake.target, "CreateOrder", create_request())
    first, retried = (call.request for call in fake.orders.calls_of("CreateOrder"))
    assert isinstance(first, pb.CreateOrderRequest)
    assert isinstance(retried, pb.CreateOrderRequest)
    assert first.request_id
    assert retried.request_id == first.request_id


# --- Typed errors ----------------------------------------------------------------------------


QUANTITY = "Must be between 1 and 10,000."


def _violations() -> list[error_details_pb2.BadRequest.FieldViolation]:
    return [
        server_errors.field_violation("items[0].quantity", QUANTITY, "OUT_OF_RANGE"),
        server_errors.field_violation("shipping_city", "Required.", "REQUIRED"),
    ]


async def test_the_servers_errors_arrive_typed_with_their_details(fake: Fake) -> None:
    fake.orders.failures = [
        server_errors.InvalidArgument(_violations()),
        server_errors.OrderNotFound("ORD-0000000000000000"),
        server_errors.OrderStateForbids(
            "ORD-1", models.OrderStatus.SHIPPED, "has shipped and can no longer be cancelled"
        ),
        server_errors.OrderAlreadyExists("ORD-2"),
        ServerUnauthenticated("CREDENTIALS_MISSING", "Missing credentials."),
        server_errors.InternalError(),
    ]
    caught: list[errors.OrderServiceError] = []
    async with OrderServiceClient.connect(fake.target) as orders:
        for _ in range(6):
            with pytest.raises(errors.OrderServiceError) as raised:
                await orders.get_order_status(status_request())
            caught.append(raised.value)
    invalid, missing, forbidden, exists, unauthenticated, internal = caught

    assert isinstance(invalid, errors.InvalidArgument)
    assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (invalid.reason, invalid.domain) == ("INVALID_ARGUMENT", errors.ERROR_DOMAIN)
    assert invalid.metadata == {"violationCount": "2"}
    assert invalid.field_violations == [
        errors.FieldViolation("items[0].quantity", QUANTITY, "OUT_OF_RANGE"),
        errors.FieldViolation("shipping_city", "Required.", "REQUIRED"),
    ]
    assert str(invalid).startswith("INVALID_ARGUMENT: Invalid request: items[0].quantity")
    assert isinstance(invalid.__cause__, grpc.aio.AioRpcError)

    assert isinstance(missing, errors.NotFound)
    assert missing.reason == "ORDER_NOT_FOUND"
    assert missing.order_id == "ORD-0000000000000000"
    assert missing.resource == errors.Resource(
        "acme.orders.v1.Order", "ORD-0000000000000000", "", "No order with this id exists."
    )

    assert isinstance(forbidden, errors.FailedPrecondition)
    assert forbidden.reason == "ORDER_STATE_FORBIDS"
    assert (forbidden.order_id, forbidden.order_status) == ("ORD-1", "shipped")
    [violation] = forbidden.precondition_violations
    assert (violation.type, violation.subject) == ("ORDER_STATUS", "orders/ORD-1")

    assert isinstance(exists, errors.AlreadyExists)
    assert isinstance(unauthenticated, errors.Unauthenticated)
    assert unauthenticated.reason == "CREDENTIALS_MISSING"
    assert isinstance(internal, errors.Internal)
    assert internal.retry_delay is None
    assert internal.field_violations == []


async def test_an_error_without_details_still_gets_its_class(fake: Fake) -> None:
    fake.orders.failures = [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED]
    async with OrderServiceClient.connect(fake.target) as orders:
        with pytest.raises(errors.PermissionDenied) as denied:
            await orders.get_order_status(status_request())
        with pytest.raises(errors.OrderServiceError) as other:
            await orders.get_order_status(status_request())
    assert (denied.value.reason, denied.value.details) == ("", [])
    assert type(other.value) is errors.OrderServiceError
    assert other.value.code == grpc.StatusCode.UNIMPLEMENTED


async def test_from_rpc_error_reads_a_sync_error_too(fake: Fake) -> None:
    fake.orders.failures = [server_errors.OrderNotFound("ORD-0000000000000000")]
    with pytest.raises(grpc.RpcError) as caught:
        await asyncio.to_thread(_sync_call, fake.target, "GetOrderStatus", status_request())
    error = from_rpc_error(caught.value)
    assert isinstance(error, errors.NotFound)
    assert error.order_id == "ORD-0000000000000000"


# --- Credentials -----------------------------------------------------------------------------


async def test_bearer_token_over_plain_text_on_loopback(fake: Fake) -> None:
    async with OrderServiceClient.connect(
        fake.target, credentials=bearer_token("ord_secret")
    ) as orders:
        await orders.get_order_status(status_request())
    assert fake.orders.calls[0].metadata["authorization"] == "Bearer ord_secret"


async def test_jwt_credentials_ask_for_the_token_on_every_call(fake: Fake) -> None:
    issued = iter(["jwt-1", "jwt-2"])
    async with OrderServiceClient.connect(
        fake.target, credentials=jwt_credentials(lambda: next(issued))
    ) as orders:
        await orders.get_order_status(status_request())
        await orders.get_order_status(status_request())
    assert [c.metadata["authorization"] for c in fake.orders.calls] == [
        "Bearer jwt-1",
        "Bearer jwt-2",
    ]


def test_a_token_with_spaces_is_refused() -> None:
    with pytest.raises(ValueError, match="one non-empty word"):
        bearer_token("Bearer ord_x")
    with pytest.raises(ValueError, match="both"):
        Tls(certificate_chain=b"cert")


# --- watch_order -----------------------------------------------------------------------------


def order(status: int, *, updated: int = 0) -> pb.Order:
    message = pb.Order(order_id="ORD-1", status=status)  # type: ignore[arg-type]
    message.updated_at.FromSeconds(1_700_000_000 + updated)
    return message


async def watched(stub_source: Any, **kwargs: Any) -> list[int]:
    statuses: list[int] = []
    async for state in watch_order(stub_source, "ORD-1", initial_backoff=0.01, **kwargs):
        statuses.append(state.status)
    return statuses


PENDING, PAID = pb.ORDER_STATUS_PENDING, pb.ORDER_STATUS_PAYMENT_CONFIRMED
PREPARING, SHIPPED = pb.ORDER_STATUS_PREPARING, pb.ORDER_STATUS_SHIPPED
DELIVERED, CANCELLED = pb.ORDER_STATUS_DELIVERED, pb.ORDER_STATUS_CANCELLED


async def test_watch_order_resumes_a_dropped_stream_and_skips_the_repeat(fake: Fake) -> None:
    fake.orders.opens = [
        [order(PENDING), order(PAID, updated=1), grpc.StatusCode.UNAVAILABLE],
        [order(PAID, updated=1), order(PREPARING, updated=2), order(SHIPPED, updated=3)],
        [order(SHIPPED, updated=3), order(DELIVERED, updated=4)],
    ]
    async with OrderServiceClient.connect(fake.target) as orders:
        statuses = await watched(orders)
    assert statuses == [PENDING, PAID, PREPARING, SHIPPED, DELIVERED]
    assert len(fake.orders.calls_of("WatchOrder")) == 3


async def test_watch_order_stops_on_a_final_state(fake: Fake) -> None:
    fake.orders.opens = [[order(PENDING), order(CANCELLED, updated=1)]]
    async with connect(fake.target) as channel:
        assert await watched(channel) == [PENDING, CANCELLED]
    assert len(fake.orders.calls_of("WatchOrder")) == 1


async def test_watch_order_ends_when_a_new_stream_brings_nothing_new(fake: Fake) -> None:
    """A workflow closed before its order was final (terminated): the server has no more."""
    fake.orders.opens = [[order(PENDING)], [order(PENDING)], [order(PAID, updated=1)]]
    async with connect(fake.target) as channel:
        assert await watched(pb_grpc.OrderServiceStub(channel)) == [PENDING]
    assert len(fake.orders.calls_of("WatchOrder")) == 2


async def test_watch_order_raises_what_resuming_cannot_fix(fake: Fake) -> None:
    fake.orders.opens = [[server_errors.OrderNotFound("ORD-1")]]
    async with OrderServiceClient.connect(fake.target) as orders:
        with pytest.raises(errors.NotFound):
            await watched(orders)
    assert len(fake.orders.calls_of("WatchOrder")) == 1


async def test_watch_order_gives_up_after_max_attempts_in_a_row(fake: Fake) -> None:
    drop: list[pb.Order | Failure] = [grpc.StatusCode.UNAVAILABLE]
    fake.orders.opens = [drop, drop, [order(PENDING)], drop, drop, drop, drop]
    statuses: list[int] = []

    async def follow(orders: OrderServiceClient) -> None:
        async for state in orders.watch_order("ORD-1", initial_backoff=0.01, max_attempts=3):
            statuses.append(state.status)

    async with OrderServiceClient.connect(fake.target, service_config=None) as orders:
        with pytest.raises(errors.Unavailable):
            await follow(orders)
    assert statuses == [PENDING]
    # Two failures, a stream that worked (the count starts again), three failures.
    assert len(fake.orders.calls_of("WatchOrder")) == 6


async def test_watch_order_gives_up_after_max_attempts_without_a_server() -> None:
    async with OrderServiceClient.connect(
        f"127.0.0.1:{free_port()}", service_config=None
    ) as orders:
        started = time.monotonic()
        with pytest.raises(errors.Unavailable):
            await watched(orders, max_attempts=3)
    assert time.monotonic() - started < 5


async def test_leaving_watch_order_early_cancels_its_stream(fake: Fake) -> None:
    fake.orders.opens = [[order(PENDING), order(PAID, updated=1)]]
    async with OrderServiceClient.connect(fake.target) as orders:
        states = orders.watch_order("ORD-1")
        first = await anext(states)
        await states.aclose()  # type: ignore[attr-defined]
    assert first.status == PENDING
    assert len(fake.orders.calls_of("WatchOrder")) == 1


# --- Against the real server: mutual TLS, a server name, tokens -------------------------------


@dataclass(frozen=True)
class Secured:
    server: OrderServer
    tls: Tls
    by_role: dict[str, str]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


SERVER_NAME = "orders.internal.example"


@pytest_asyncio.fixture(scope="module")
async def secured(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Secured]:
    """A server with mutual TLS, for a name other than its address, and bearer tokens."""
    directory = tmp_path_factory.mktemp("client-pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    server_cert = ca.issue_cert(SERVER_NAME)
    client_cert = ca.issue_cert("storefront.clients.acme.example")
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(directory / "server.pem"))
    server_cert.private_key_pem.write_to_path(str(directory / "server.key"))
    client_cert.private_key_pem.write_to_path(str(directory / "client.key"))
    for blob in client_cert.cert_chain_pems:
        blob.write_to_path(str(directory / "client.pem"), append=True)
    by_role = {role: tokens.new_token() for role in ("storefront", "payment-gateway")}
    tokens_file = directory / "tokens.toml"
    tokens_file.write_text(
        "\n".join(tokens_cli.entry_toml(r, t, role=r) for r, t in by_role.items())
    )
    tls = Tls.from_files(
        ca=directory / "ca.pem",
        cert=directory / "client.pem",
        key=directory / "client.key",
        server_name=SERVER_NAME,
    )
    async with serving(
        stack,
        tls_cert=directory / "server.pem",
        tls_key=directory / "server.key",
        tls_client_ca=directory / "ca.pem",
        auth_tokens_file=tokens_file,
    ) as server:
        yield Secured(server, tls, by_role)


async def test_mutual_tls_and_a_bearer_token_reach_the_real_server(secured: Secured) -> None:
    token = bearer_token(secured.by_role["storefront"])
    async with OrderServiceClient.connect(
        secured.target, tls=secured.tls, credentials=token
    ) as orders:
        created = await orders.create_order(create_request())
        status = await orders.get_order_status(status_request(created.order_id))
        assert status.order_id == created.order_id
        with pytest.raises(errors.PermissionDenied) as denied:  # storefront may not pay
            await orders.confirm_payment(pb.ConfirmPaymentRequest(order_id=created.order_id))
    assert denied.value.reason == "METHOD_NOT_ALLOWED"
    assert denied.value.metadata["method"] == f"{SERVICE.full_name}/ConfirmPayment"


async def test_the_real_server_says_why_a_caller_is_refused(secured: Secured) -> None:
    async with OrderServiceClient.connect(secured.target, tls=secured.tls) as orders:
        with pytest.raises(errors.Unauthenticated) as missing:
            await orders.get_order_status(status_request())
    assert missing.value.reason == "CREDENTIALS_MISSING"
    unknown_token = jwt_credentials(lambda: "ord_not-a-known-token")
    async with OrderServiceClient.connect(
        secured.target, tls=secured.tls, credentials=unknown_token
    ) as orders:
        with pytest.raises(errors.Unauthenticated) as unknown:
            await orders.get_order_status(status_request())
    assert unknown.value.reason == "ACCESS_TOKEN_INVALID"
    no_client_cert = Tls(root_certificates=secured.tls.root_certificates, server_name=SERVER_NAME)
    async with OrderServiceClient.connect(
        secured.target, tls=no_client_cert, service_config=None
    ) as orders:
        with pytest.raises(errors.Unavailable):  # the handshake fails: mutual TLS
            await orders.get_order_status(status_request(), timeout=5)


# --- watch_order across a real drop: a connection cut, a server stopped -------------------


async def _watch_in_background(
    orders: OrderServiceClient, order_id: str
) -> tuple[asyncio.Task[None], list[pb.Order], asyncio.Event]:
    """Follows the order into a list; the event is set once its first state arrived."""
    states: list[pb.Order] = []
    first = asyncio.Event()

    async def follow() -> None:
        async for state in orders.watch_order(order_id, initial_backoff=0.05, max_backoff=0.5):
            states.append(state)
            first.set()

    task = asyncio.create_task(follow())
    async with asyncio.timeout(30):
        await first.wait()
    return task, states, first


async def _paid_and_delivered_meanwhile(stack: Stack, order_id: str) -> None:
    """The rest of the order's life, on the stack's own server, while the watch is cut off."""
    await stack.stub.ConfirmPayment(payment_request(order_id))
    await order_reaching(stack, order_id, pb.ORDER_STATUS_DELIVERED)


async def test_watch_order_resumes_after_its_connection_is_cut(stack: Stack) -> None:
    """A proxy between client and server drops every connection (no status, no goodbye);
    the order is paid and delivered while the watch is cut off; it comes back on DELIVERED."""
    async with Proxy(stack.target) as proxy, OrderServiceClient.connect(proxy.address) as orders:
        created = await orders.create_order(create_request())
        task, states, _ = await _watch_in_background(orders, created.order_id)
        await proxy.close()  # every connection reset, and nothing listens any more
        await _paid_and_delivered_meanwhile(stack, created.order_id)
        assert not task.done(), "watch_order keeps trying while the server is unreachable"
        async with Proxy(stack.target, port=proxy.port):
            async with asyncio.timeout(30):
                await task
    assert [s.status for s in states] == [PENDING, DELIVERED]


async def test_watch_order_resumes_after_the_server_is_stopped_and_started(stack: Stack) -> None:
    """The server's graceful stop ends the stream with UNAVAILABLE; a new one on the same port
    serves the rest."""
    settings = with_changes(stack.server.settings, port=free_port())
    server = await start_server(settings, stack.client)
    restarted: OrderServer | None = None
    try:
        async with OrderServiceClient.connect(f"127.0.0.1:{settings.port}") as orders:
            created = await orders.create_order(create_request())
            task, states, _ = await _watch_in_background(orders, created.order_id)
            await server.stop(grace=1.0)
            await _paid_and_delivered_meanwhile(stack, created.order_id)
            assert not task.done(), "watch_order keeps trying while the server is down"
            restarted = await start_server(settings, stack.client)
            async with asyncio.timeout(30):
                await task
    finally:
        await server.stop(grace=0)
        if restarted is not None:
            await restarted.stop(grace=0.5)
    assert [s.status for s in states] == [PENDING, DELIVERED]


# --- The wheel, installed alone into a fresh venv --------------------------------------------

GENERATED = ROOT / "generated"


def _oldest_python() -> tuple[str, str]:
    """An interpreter of the oldest Python the package claims, else this one (with a
    warning), and its version ("3.10")."""
    claimed = tomllib.loads((GENERATED / "pyproject.toml").read_text())["project"]
    oldest = claimed["requires-python"].removeprefix(">=").strip()
    name = f"python{oldest}"
    candidates = [
        shutil.which(name),
        *sorted(Path.home().glob(f".pyenv/versions/{oldest}.*/bin/{name}")),
    ]
    for candidate in filter(None, candidates):
        probe = subprocess.run(
            [str(candidate), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if probe.returncode == 0 and probe.stdout.strip() == oldest:
            return str(candidate), oldest
    warnings.warn(f"no Python {oldest} here: the wheel is tried on {sys.version}", stacklevel=1)
    return sys.executable, f"{sys.version_info.major}.{sys.version_info.minor}"


def _outside_this_checkout(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for the venv's processes: nothing from this checkout on their path."""
    env = clean_environ(extra)
    env.pop("PYTHONPATH", None)
    return env


@dataclass(frozen=True)
class Installed:
    wheel: Path
    python: Path
    version: str  # the venv's Python, "3.10"


def _run(command: Sequence[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """`make dist` into a temporary folder, and its wheel pip-installed into a fresh venv."""
    tmp = tmp_path_factory.mktemp("client-wheel")
    env = _outside_this_checkout({"PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    # -o install: the venv this test runs in is installed already; not `uv sync` under it.
    _run(["make", "-s", "-o", "install", "dist", f"DIST_DIR={tmp / 'dist'}"], ROOT, env)
    [wheel] = (tmp / "dist").glob("acme_orders_api-*-py3-none-any.whl")
    assert list((tmp / "dist").glob("acme_orders_api-*.tar.gz")), "make dist makes an sdist too"
    venv = tmp / "venv"
    interpreter, version = _oldest_python()
    _run([interpreter, "-m", "venv", str(venv)], tmp, env)
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], tmp, env)
    return Installed(wheel, python, version)


def test_the_wheel_holds_the_api_and_the_client_typed(installed_wheel: Installed) -> None:
    version = acme_orders_client.__version__
    assert installed_wheel.wheel.name == f"acme_orders_api-{version}-py3-none-any.whl"
    with zipfile.ZipFile(installed_wheel.wheel) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(f"acme_orders_api-{version}.dist-info/METADATA").decode()
    assert {
        "acme/py.typed",
        "acme/orders/v1/order_service_pb2.py",
        "acme/orders/v1/order_service_pb2_grpc.pyi",
        "acme_orders_client/py.typed",
        "acme_orders_client/errors.py",
    } <= names
    assert "Requires-Python: >=3.10" in metadata
    assert "Requires-Dist: grpcio-status" in metadata


# Run by the fresh venv's Python, with the installed wheel only: the seed's happy path.
_HAPPY_PATH = """
import asyncio, json, sys
from google.type.money_pb2 import Money
import acme_orders_client
from acme.orders.v1 import order_service_pb2 as pb
from acme_orders_client import OrderServiceClient, errors

PRICE = Money(currency_code="USD", units=999, nanos=990000000)
LAPTOP = pb.OrderItem(product_id="PROD-123", product_name="Laptop", quantity=1, price=PRICE)


async def main(target):
    async with OrderServiceClient.connect(target) as orders:
        created = await orders.create_order(pb.CreateOrderRequest(
            customer_id="CUST-001", items=[LAPTOP], shipping_address="123 Main St",
            shipping_city="San Francisco", shipping_postal_code="94102", shipping_country="USA"))
        order_id = created.order_id
        status = await orders.get_order_status(pb.GetOrderStatusRequest(order_id=order_id))
        await orders.confirm_payment(pb.ConfirmPaymentRequest(
            order_id=order_id, transaction_id="TXN-12345", amount=PRICE,
            payment_method="credit_card"))
        states = [state async for state in orders.watch_order(order_id)]
        eta = await orders.get_estimated_delivery(
            pb.GetEstimatedDeliveryRequest(order_id=order_id))
        try:
            await orders.get_order(pb.GetOrderRequest(order_id="ORD-0000000000000000"))
        except errors.NotFound as err:
            not_found = [type(err).__name__, err.reason, err.order_id]
        try:
            await orders.create_order(pb.CreateOrderRequest(customer_id="CUST-001"))
        except errors.InvalidArgument as err:
            invalid = [type(err).__name__, [v.field for v in err.field_violations]]
    print(json.dumps({
        "python": "%d.%d" % sys.version_info[:2],
        "module": acme_orders_client.__file__,
        "created": pb.OrderStatus.Name(created.status),
        "status": pb.OrderStatus.Name(status.status),
        "watched": [pb.OrderStatus.Name(state.status) for state in states],
        "repeats": sum(a == b for a, b in zip(states, states[1:])),
        "eta": eta.HasField("estimated_delivery"),
        "not_found": not_found,
        "invalid": invalid,
    }))


asyncio.run(main(sys.argv[1]))
"""


async def test_the_installed_wheel_runs_the_happy_path(
    installed_wheel: Installed, stack: Stack
) -> None:
    venv = installed_wheel.python.parent.parent
    env = _outside_this_checkout()
    done = await asyncio.to_thread(
        subprocess.run,
        [str(installed_wheel.python), "-c", _HAPPY_PATH, stack.target],
        capture_output=True, text=True, cwd=venv, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout)
    assert Path(found["module"]).is_relative_to(venv), found["module"]  # not this checkout's
    assert found["python"] == installed_wheel.version
    assert (found["created"], found["status"]) == ("ORDER_STATUS_PENDING", "ORDER_STATUS_PENDING")
    watched = [pb.OrderStatus.Value(name) for name in found["watched"]]
    assert watched[0] == pb.ORDER_STATUS_PENDING
    assert watched[-1] == pb.ORDER_STATUS_DELIVERED
    assert watched == sorted(watched), found["watched"]  # in the order's life, nothing undone
    assert found["repeats"] == 0, "the same state yielded twice in a row"
    assert found["eta"] is True
    assert found["not_found"] == ["NotFound", "ORDER_NOT_FOUND", "ORD-0000000000000000"]
    name, fields = found["invalid"]
    assert name == "InvalidArgument"
    assert {"items", "shipping_address"} <= set(fields)
