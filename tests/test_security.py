"""TLS, mutual TLS, bearer tokens and roles, through the generated stubs and grpcurl.

The servers here are extra gRPC servers in front of the session `stack`'s
worker, each with its own security settings, on free loopback ports. The
certificates are made at test time by trustme: one CA, a server certificate
for 127.0.0.1 and localhost, a client certificate, and a client certificate
from another CA that mutual TLS must refuse.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from server import tokens as tokens_cli
from server.platform import tokens
from server.platform.app import OrderServer
from server.platform.settings import ServerSettings
from tests.support.access import (
    ALL_RPCS,
    ROLE_RPCS,
    code_of,
    error_info,
    failure,
    first_watched,
    rpc_calls,
)
from tests.support.env import run, settings_from, venv_binary, with_changes
from tests.support.orders import create_request, payment_request
from tests.support.polling import eventually
from tests.support.stack import Stack, async_stub, bearer, serving

SERVICE = "acme.orders.v1.OrderService"


# --- Certificates and tokens ------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    # A client certificate signed by another CA.
    rogue_cert: Path
    rogue_key: Path


def _write(cert: trustme.LeafCert, directory: Path, name: str) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    for blob in cert.cert_chain_pems:
        blob.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, rogue_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    server_cert, server_key = _write(ca.issue_cert("127.0.0.1", "localhost"), directory, "server")
    client_cert, client_key = _write(
        ca.issue_cert("storefront.clients.acme.example"), directory, "client"
    )
    rogue_cert, rogue_key = _write(
        rogue_ca.issue_cert("storefront.clients.acme.example"), directory, "rogue"
    )
    return Pki(
        directory / "ca.pem",
        server_cert,
        server_key,
        client_cert,
        client_key,
        rogue_cert,
        rogue_key,
    )


@dataclass(frozen=True)
class Tokens:
    path: Path
    by_role: dict[str, str]
    expired: str
    # A caller with an explicit method list instead of a role.
    status_reader: str


@pytest.fixture(scope="session")
def auth_tokens(tmp_path_factory: pytest.TempPathFactory) -> Tokens:
    by_role = {role: tokens.new_token() for role in tokens.ROLES}
    expired, status_reader = tokens.new_token(), tokens.new_token()
    entries = [tokens_cli.entry_toml(role, token, role=role) for role, token in by_role.items()]
    entries.append(
        tokens_cli.entry_toml(
            "old-storefront",
            expired,
            role="storefront",
            expires=tokens.parse_expiry("2020-01-01T00:00:00Z"),
        )
    )
    entries.append(tokens_cli.entry_toml("status-board", status_reader, methods=["GetOrderStatus"]))
    path = tmp_path_factory.mktemp("auth") / "tokens.toml"
    path.write_text("\n".join(entries))
    return Tokens(path, by_role, expired, status_reader)


def tls_credentials(pki: Pki, *, client_cert: bool = False) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes() if client_cert else None,
        certificate_chain=pki.client_cert.read_bytes() if client_cert else None,
    )


@dataclass
class Secured:
    """A server with TLS and tokens, and a TLS channel to it."""

    server: OrderServer
    channel: grpc.aio.Channel
    stub: pb_grpc.OrderServiceAsyncStub

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@pytest_asyncio.fixture(scope="module")
async def secured(stack: Stack, pki: Pki, auth_tokens: Tokens) -> AsyncIterator[Secured]:
    async with serving(
        stack, tls_cert=pki.server_cert, tls_key=pki.server_key, auth_tokens_file=auth_tokens.path
    ) as server:
        channel = grpc.aio.secure_channel(f"127.0.0.1:{server.port}", tls_credentials(pki))
        try:
            yield Secured(server, channel, async_stub(channel))
        finally:
            await channel.close(grace=None)


# --- TLS and mutual TLS -----------------------------------------------------------------


async def test_tls_with_the_generated_stubs(
    secured: Secured, pki: Pki, auth_tokens: Tokens
) -> None:
    created = await secured.stub.CreateOrder(
        create_request(), metadata=bearer(auth_tokens.by_role["storefront"])
    )
    status = await secured.stub.GetOrderStatus(
        pb.GetOrderStatusRequest(order_id=created.order_id),
        metadata=bearer(auth_tokens.by_role["storefront"]),
    )
    assert status.status == pb.OrderStatus.ORDER_STATUS_PENDING

    # grpc's own way: call credentials add the header to every call on the channel.
    credentials = grpc.composite_channel_credentials(
        tls_credentials(pki), grpc.access_token_call_credentials(auth_tokens.by_role["admin"])
    )
    async with grpc.aio.secure_channel(secured.target, credentials) as channel:
        order = await async_stub(channel).GetOrder(pb.GetOrderRequest(order_id=created.order_id))
        assert order.customer_id == "CUST-001"

    # A plain-text client gets no answer from a TLS port.
    async with grpc.aio.insecure_channel(secured.target) as plain:
        refused = await failure(
            async_stub(plain).GetOrderStatus(
                pb.GetOrderStatusRequest(order_id=created.order_id),
                metadata=bearer(auth_tokens.by_role["storefront"]),
                timeout=5,
            )
        )
    assert refused.code() == grpc.StatusCode.UNAVAILABLE


async def test_tls_with_grpcurl(secured: Secured, pki: Pki, auth_tokens: Tokens) -> None:
    grpcurl = venv_binary("grpcurl")
    token = auth_tokens.by_role["storefront"]
    created = await run(
        grpcurl, "-cacert", str(pki.ca), "-H", f"authorization: Bearer {token}",
        "-d", json.dumps({
            "customer_id": "CUST-TLS",
            "items": [{"product_id": "PROD-123", "product_name": "Laptop", "quantity": 1,
                       "price": {"currency_code": "USD", "units": 999, "nanos": 990000000}}],
            "shipping_address": "123 Main St", "shipping_city": "San Francisco",
            "shipping_postal_code": "94102", "shipping_country": "USA",
        }),
        secured.target, f"{SERVICE}/CreateOrder",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["status"] == "ORDER_STATUS_PENDING"

    # Reflection is on, and open: listing needs no token.
    listed = await run(grpcurl, "-cacert", str(pki.ca), secured.target, "list")
    assert listed.returncode == 0, listed.stderr
    assert SERVICE in listed.stdout.split()

    # Without the CA, grpcurl does not trust the server's certificate.
    untrusted = await run(grpcurl, secured.target, "list")
    assert untrusted.returncode != 0
    assert "certificate" in untrusted.stderr

    # A token the server does not know, through grpcurl.
    unknown = await run(
        grpcurl, "-cacert", str(pki.ca), "-H", "authorization: Bearer ord_nope",
        "-d", json.dumps({"order_id": "ORD-0000000000000000"}),
        secured.target, f"{SERVICE}/GetOrderStatus",
    )  # fmt: skip
    assert unknown.returncode != 0
    assert "Code: Unauthenticated" in unknown.stderr


async def test_mutual_tls_refuses_a_client_without_a_certificate(
    stack: Stack, pki: Pki, auth_tokens: Tokens
) -> None:
    token = auth_tokens.by_role["storefront"]
    async with serving(
        stack,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
        auth_tokens_file=auth_tokens.path,
    ) as server:
        target = f"127.0.0.1:{server.port}"
        request = create_request(customer_id="CUST-MTLS")

        async with grpc.aio.secure_channel(target, tls_credentials(pki, client_cert=True)) as ok:
            created = await async_stub(ok).CreateOrder(request, metadata=bearer(token), timeout=10)
            assert created.status == pb.OrderStatus.ORDER_STATUS_PENDING

        async with grpc.aio.secure_channel(target, tls_credentials(pki)) as no_cert:
            refused = await failure(
                async_stub(no_cert).CreateOrder(request, metadata=bearer(token), timeout=5)
            )
            assert refused.code() == grpc.StatusCode.UNAVAILABLE

        rogue = grpc.ssl_channel_credentials(
            root_certificates=pki.ca.read_bytes(),
            private_key=pki.rogue_key.read_bytes(),
            certificate_chain=pki.rogue_cert.read_bytes(),
        )
        async with grpc.aio.secure_channel(target, rogue) as other_ca:
            refused = await failure(
                async_stub(other_ca).CreateOrder(request, metadata=bearer(token), timeout=5)
            )
            assert refused.code() == grpc.StatusCode.UNAVAILABLE

        grpcurl = venv_binary("grpcurl")
        health = [target, "grpc.health.v1.Health/Check"]
        with_cert = await run(
            grpcurl, "-cacert", str(pki.ca), "-cert", str(pki.client_cert),
            "-key", str(pki.client_key), *health,
        )  # fmt: skip
        assert with_cert.returncode == 0, with_cert.stderr
        without_cert = await run(grpcurl, "-cacert", str(pki.ca), *health)
        assert without_cert.returncode != 0


# --- Roles -----------------------------------------------------------------------------


@pytest.mark.parametrize("role", list(ROLE_RPCS))
async def test_each_role_calls_exactly_its_rpcs(
    secured: Secured, auth_tokens: Tokens, role: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    stub, token = secured.stub, auth_tokens.by_role[role]
    admin = bearer(auth_tokens.by_role["admin"])
    to_pay = await stub.CreateOrder(create_request(customer_id=f"CUST-{role}"), metadata=admin)
    to_cancel = await stub.CreateOrder(create_request(customer_id=f"CUST-{role}"), metadata=admin)
    order_id = to_pay.order_id
    auth = bearer(token)

    calls = rpc_calls(
        stub,
        auth,
        order_id,
        create=create_request(),
        listing=pb.ListOrdersRequest(customer_id="CUST-1", page_size=1),
        payment=payment_request(order_id, f"TXN-{role}"),
        cancel=pb.CancelOrderRequest(order_id=to_cancel.order_id, reason="Changed my mind"),
    )
    assert set(calls) == ALL_RPCS, "a new RPC needs a row in rpc_calls"
    codes = {rpc: await code_of(call()) for rpc, call in calls.items()}
    expected = {
        rpc: grpc.StatusCode.OK if rpc in ROLE_RPCS[role] else grpc.StatusCode.PERMISSION_DENIED
        for rpc in ALL_RPCS
    }
    assert codes == expected

    # An allowed cancel cancels; a refused write never reached the order.
    if "CancelOrder" in ROLE_RPCS[role]:
        await eventually(
            lambda: stub.GetOrderStatus(
                pb.GetOrderStatusRequest(order_id=to_cancel.order_id), metadata=admin
            ),
            lambda status: status.status == pb.OrderStatus.ORDER_STATUS_CANCELLED,
        )
    else:
        client = secured.server.client
        history = await client.get_workflow_handle(to_cancel.workflow_id).fetch_history()
        assert not any(
            e.HasField("workflow_execution_signaled_event_attributes") for e in history.events
        )
    assert token not in caplog.text


async def test_permission_denied_names_the_caller_and_the_rpc(
    secured: Secured, auth_tokens: Tokens
) -> None:
    err = await failure(
        secured.stub.ConfirmPayment(
            pb.ConfirmPaymentRequest(order_id="ORD-0000000000000000"),
            metadata=bearer(auth_tokens.by_role["storefront"]),
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == f"Caller storefront may not call {SERVICE}/ConfirmPayment."
    info = error_info(err)
    assert info.reason == "METHOD_NOT_ALLOWED"
    assert dict(info.metadata) == {"caller": "storefront", "method": f"{SERVICE}/ConfirmPayment"}


async def test_a_caller_with_a_method_list(secured: Secured, auth_tokens: Tokens) -> None:
    auth = bearer(auth_tokens.status_reader)
    request = pb.GetOrderStatusRequest(order_id="ORD-0000000000000000")
    assert await code_of(secured.stub.GetOrderStatus(request, metadata=auth)) == (
        grpc.StatusCode.NOT_FOUND
    )
    get = pb.GetOrderRequest(order_id="ORD-0000000000000000")
    assert await code_of(secured.stub.GetOrder(get, metadata=auth)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )


# --- Who is calling ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "reason", "message"),
    [
        ((), "CREDENTIALS_MISSING", "Missing credentials"),
        ((("authorization", "Basic c3RvcmVmcm9udA=="),), "CREDENTIALS_MALFORMED", "Bearer"),
        ((("authorization", "Bearer"),), "CREDENTIALS_MALFORMED", "Bearer"),
        ((("authorization", "Bearer ord_not-a-token-we-know"),), "ACCESS_TOKEN_INVALID", "not"),
    ],
)
async def test_missing_malformed_or_unknown_token_is_unauthenticated(
    secured: Secured, metadata: tuple[tuple[str, str], ...], reason: str, message: str
) -> None:
    request = pb.GetOrderStatusRequest(order_id="ORD-0000000000000000")
    err = await failure(secured.stub.GetOrderStatus(request, metadata=metadata))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert message in (err.details() or "")
    assert error_info(err).reason == reason


async def test_an_expired_token_is_unauthenticated_and_says_so(
    secured: Secured, auth_tokens: Tokens, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    request = pb.GetOrderStatusRequest(order_id="ORD-0000000000000000")
    err = await failure(secured.stub.GetOrderStatus(request, metadata=bearer(auth_tokens.expired)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details() == ("The bearer token expired at 2020-01-01T00:00:00Z; ask for a new one.")
    info = error_info(err)
    assert info.reason == "ACCESS_TOKEN_EXPIRED"
    assert info.metadata["expireTime"] == "2020-01-01T00:00:00Z"
    assert "caller=old-storefront" in caplog.text
    assert auth_tokens.expired not in caplog.text


async def test_watch_order_needs_a_valid_token_too(secured: Secured, auth_tokens: Tokens) -> None:
    order_id = "ORD-0000000000000000"
    assert await code_of(first_watched(secured.stub, order_id, bearer("ord_unknown"))) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert await code_of(first_watched(secured.stub, order_id, bearer(auth_tokens.expired))) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    call = secured.stub.WatchOrder(pb.WatchOrderRequest(order_id=order_id))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_needs_no_token(secured: Secured, pki: Pki) -> None:
    health = health_pb2_grpc.HealthStub(secured.channel)
    response = await eventually(
        lambda: health.Check(health_pb2.HealthCheckRequest(service=SERVICE)),
        lambda reply: reply.status == health_pb2.HealthCheckResponse.SERVING,
        within=10,
    )
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    checked = await run(
        venv_binary("grpcurl"), "-cacert", str(pki.ca), secured.target,
        "grpc.health.v1.Health/Check",
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout) == {"status": "SERVING"}


# --- Reflection, and no tokens at all -------------------------------------------------------


async def test_reflection_off(stack: Stack, auth_tokens: Tokens) -> None:
    async with serving(stack, reflection=False, auth_tokens_file=auth_tokens.path) as server:
        target = f"127.0.0.1:{server.port}"
        listed = await run(venv_binary("grpcurl"), "-plaintext", target, "list")
        assert listed.returncode != 0
        assert "does not support the reflection API" in listed.stderr
        # The RPCs still work, for callers that have the protos.
        async with grpc.aio.insecure_channel(target) as channel:
            token = auth_tokens.by_role["storefront"]
            request = pb.GetOrderStatusRequest(order_id="ORD-0000000000000000")
            code = await code_of(
                async_stub(channel).GetOrderStatus(request, metadata=bearer(token))
            )
            assert code == grpc.StatusCode.NOT_FOUND


async def test_no_tokens_configured_works_like_before(stack: Stack) -> None:
    """The default: loopback, plain text, no token needed, reflection open."""
    assert stack.server.settings.auth_tokens_file is None
    created = await stack.stub.CreateOrder(create_request())
    assert created.status == pb.OrderStatus.ORDER_STATUS_PENDING
    listed = await run(venv_binary("grpcurl"), "-plaintext", stack.target, "list")
    assert listed.returncode == 0, listed.stderr


def test_settings_built_in_code_refuse_plain_text_beyond_loopback(stack: Stack) -> None:
    with pytest.raises(ValueError, match=r"refusing to listen on 0\.0\.0\.0 without TLS"):
        with_changes(stack.server.settings, host="0.0.0.0", port=0)


# --- Configuration ------------------------------------------------------------------------


def from_args(argv: list[str], environ: dict[str, str]) -> ServerSettings:
    return settings_from(ServerSettings, argv, environ)


def test_security_defaults() -> None:
    config = from_args([], {})
    assert (config.tls_cert, config.tls_key, config.tls_client_ca) == (None, None, None)
    assert config.auth_tokens_file is None
    assert config.reflection is True
    assert config.allow_insecure_remote is False


def test_security_flags(pki: Pki, auth_tokens: Tokens) -> None:
    config = from_args(
        [
            "--host", "0.0.0.0",
            "--tls-cert", str(pki.server_cert),
            "--tls-key", str(pki.server_key),
            "--tls-client-ca", str(pki.ca),
            "--auth-tokens-file", str(auth_tokens.path),
            "--reflection", "off",
        ],
        {},
    )  # fmt: skip
    assert config == ServerSettings(
        host="0.0.0.0",
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
        auth_tokens_file=auth_tokens.path,
        reflection=False,
    )


def test_security_environment(pki: Pki, auth_tokens: Tokens) -> None:
    environment = {
        "ORDER_SERVICE_HOST": "::",
        "ORDER_TLS_CERT": str(pki.server_cert),
        "ORDER_TLS_KEY": str(pki.server_key),
        "ORDER_TLS_CLIENT_CA": str(pki.ca),
        "ORDER_AUTH_TOKENS_FILE": str(auth_tokens.path),
        "ORDER_REFLECTION": "false",
    }
    assert from_args([], environment) == ServerSettings(
        host="::",
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
        auth_tokens_file=auth_tokens.path,
        reflection=False,
    )


@pytest.mark.parametrize(
    ("argv", "environ"),
    [
        (["--host", "0.0.0.0", "--allow-insecure-remote"], {}),
        (["--host", "0.0.0.0"], {"ORDER_ALLOW_INSECURE_REMOTE": "true"}),
        ([], {"ORDER_SERVICE_HOST": "10.0.0.7", "ORDER_ALLOW_INSECURE_REMOTE": "1"}),
    ],
)
def test_plain_text_beyond_loopback_when_asked(argv: list[str], environ: dict[str, str]) -> None:
    assert from_args(argv, environ).allow_insecure_remote is True


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.0.0.2", "::1", "[::1]"])
def test_plain_text_on_loopback_needs_nothing(host: str) -> None:
    assert from_args(["--host", host], {}).host == host


def bad_configurations(pki: Pki, tokens_path: Path, tmp: Path) -> list[tuple[list[str], str]]:
    broken_tokens = tmp / "broken.toml"
    broken_tokens.write_text('[[callers]]\nname = "x"\nrole = "storefront"\n')
    cert, key, ca = str(pki.server_cert), str(pki.server_key), str(pki.ca)
    return [
        (["--host", "0.0.0.0"], "refusing to listen on 0.0.0.0 without TLS"),
        (["--host", "orders.internal"], "refusing to listen on orders.internal without TLS"),
        (["--host", "::", "--allow-insecure-remote", "--tls-cert", cert], "go together"),
        (["--tls-key", key], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", ca], "--tls-client-ca needs --tls-cert"),
        (["--tls-cert", str(tmp / "missing.pem"), "--tls-key", key], "no such file"),
        (["--tls-cert", str(pki.client_cert), "--tls-key", key], "cannot use certificate"),
        (["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", str(tokens_path)], "client CA"),
        (["--auth-tokens-file", str(broken_tokens)], "token_sha256 must be 64 hex digits"),
        (["--reflection", "maybe"], "--reflection / ORDER_REFLECTION ('maybe'): Input should be"),
    ]


def test_bad_security_settings_exit_2_with_a_clear_message(
    pki: Pki, auth_tokens: Tokens, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, message in bad_configurations(pki, auth_tokens.path, tmp_path):
        with pytest.raises(SystemExit) as caught:
            from_args(argv, {})
        assert caught.value.code == 2, argv
        assert message in capsys.readouterr().err, argv


def test_a_bad_environment_value_names_the_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        from_args([], {"ORDER_AUTH_TOKENS_FILE": "/nonexistent/tokens.toml"})
    err = capsys.readouterr().err
    assert "--auth-tokens-file / ORDER_AUTH_TOKENS_FILE ('/nonexistent/tokens.toml')" in err
    assert "no such file" in err
