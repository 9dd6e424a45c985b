"""Customers calling with their own JWTs, beside the system callers of the tokens file.

Every caller (a token per role, and a customer's JWT) × every RPC, a customer's
calls on an order of its own ("own") and of another customer's ("other"), through
real gRPC against a server in front of the session stack's worker. A customer sees,
watches and cancels only its own orders (another's answers NOT_FOUND exactly as
a missing one does), creates and lists only for itself, never confirms a
payment. Then the JWT checks themselves: expiry, issuer, audience, unknown
keys, and HS256 "signed" with the public key.
"""

from __future__ import annotations

import functools
import json
import uuid
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from google.rpc import status_pb2
from grpc_status import rpc_status
from hypothesis import given, settings
from hypothesis import strategies as st

from acme.orders.v1 import order_service_pb2 as pb
from server.api import validation
from server.platform import jwt_auth
from server.platform.settings import ServerSettings
from tests.support.access import ALL_RPCS, ROLE_RPCS, code_of, error_info, failure, rpc_calls
from tests.support.env import settings_from
from tests.support.jwt import (
    Guarded,
    Issuer,
    SigningKey,
    base64url,
    guarded_fixture,
    guarded_server,
    hs256_signed_with,
)
from tests.support.orders import create_request, payment_request
from tests.support.polling import eventually
from tests.support.stack import Stack, bearer

Code = grpc.StatusCode
CUSTOMER = "customer"
CALLERS = [*ROLE_RPCS, CUSTOMER]
# The RPCs about one existing order, and those that name a customer instead.
ORDER_RPCS = ("GetOrder", "GetOrderStatus", "GetEstimatedDelivery", "WatchOrder", "CancelOrder")
CUSTOMER_RPCS = ("CreateOrder", "ListOrders")


def expected(caller: str, rpc: str, whose: str) -> Code:
    """The rule, as a table: what `caller` gets for `rpc` on an order (or a customer) that
    is the customer's own or another's."""
    if caller != CUSTOMER:  # a system caller: its role alone decides
        return Code.OK if rpc in ROLE_RPCS[caller] else Code.PERMISSION_DENIED
    if rpc == "ConfirmPayment":
        return Code.PERMISSION_DENIED
    if whose == "own":
        return Code.OK
    return Code.PERMISSION_DENIED if rpc in CUSTOMER_RPCS else Code.NOT_FOUND


# --- The server and two customers' orders ---------------------------------------------------


guarded = guarded_fixture("customer-access")


@pytest.fixture(scope="module")
def customers() -> tuple[str, str]:
    """Two customers of this run only (the dev server outlives one module)."""
    tag = uuid.uuid4().hex[:8].upper()
    return f"CUST-A-{tag}", f"CUST-B-{tag}"


async def new_order(guarded: Guarded, customer_id: str) -> str:
    created = await guarded.stub.CreateOrder(
        create_request(customer_id=customer_id), metadata=guarded.system("admin")
    )
    return created.order_id


# --- Every caller × every RPC × own or other ------------------------------------------------

# Whose order matters to the customer only: a system caller's role alone decides, so for
# it an order of the other customer would repeat the same case.
CASES = [
    (caller, rpc, whose)
    for caller in CALLERS
    for rpc in sorted(ALL_RPCS)
    for whose in (("own", "other") if caller == CUSTOMER else ("own",))
]


@pytest.mark.parametrize(("caller", "rpc", "whose"), CASES)
async def test_who_may_do_what_to_whose_order(
    guarded: Guarded, customers: tuple[str, str], caller: str, rpc: str, whose: str
) -> None:
    own, other = customers
    customer_id = own if whose == "own" else other
    # A fresh order for the writes, so that one case's cancel or payment is not another's.
    order_id = await new_order(guarded, customer_id)
    auth = guarded.customer(own) if caller == CUSTOMER else guarded.system(caller)
    calls = rpc_calls(
        guarded.stub,
        auth,
        order_id,
        create=create_request(customer_id=customer_id),
        listing=pb.ListOrdersRequest(customer_id=customer_id, page_size=10),
        payment=payment_request(order_id, f"TXN-{uuid.uuid4().hex[:8]}"),
        cancel=pb.CancelOrderRequest(order_id=order_id, reason="Changed my mind"),
    )
    assert set(calls) == ALL_RPCS, "a new RPC needs a row in rpc_calls"

    code = await code_of(calls[rpc]())
    assert code == expected(caller, rpc, whose)

    # What was allowed took effect; what was refused left the order untouched. (A signal
    # that arrives during a workflow task enters the history when the task completes.)
    if rpc in ("CancelOrder", "ConfirmPayment"):
        handle = guarded.server.client.get_workflow_handle(f"order-{order_id}")

        async def signalled() -> bool:
            history = await handle.fetch_history()
            return any(
                e.HasField("workflow_execution_signaled_event_attributes") for e in history.events
            )

        if code == Code.OK:
            await eventually(signalled, bool, within=10, what="the signal in the history")
        else:
            assert not await signalled()


async def test_a_customers_listing_holds_its_own_orders_only(
    guarded: Guarded, customers: tuple[str, str]
) -> None:
    own, other = customers
    mine = {await new_order(guarded, own) for _ in range(3)}
    theirs = {await new_order(guarded, other) for _ in range(2)}
    auth = guarded.customer(own)

    async def listed(request: pb.ListOrdersRequest) -> list[pb.OrderSummary]:
        """Every page, following next_page_token."""
        summaries: list[pb.OrderSummary] = []
        while True:
            page = await guarded.stub.ListOrders(request, metadata=auth)
            summaries.extend(page.orders)
            if not page.next_page_token:
                return summaries
            request.page_token = page.next_page_token

    # No customer_id: the customer's own, in pages of 1 whose tokens stay valid.
    everything = await eventually(
        lambda: listed(pb.ListOrdersRequest(page_size=1)),
        lambda found: mine <= {o.order_id for o in found},
        what="the customer's orders listed",
    )
    assert {o.customer_id for o in everything} == {own}
    assert not theirs & {o.order_id for o in everything}
    # The same through a status filter; and an admin sees the other customer's.
    pending = await listed(pb.ListOrdersRequest(status=pb.OrderStatus.ORDER_STATUS_PENDING))
    assert {o.customer_id for o in pending} <= {own}
    admin = await eventually(
        lambda: guarded.stub.ListOrders(
            pb.ListOrdersRequest(customer_id=other, page_size=1000),
            metadata=guarded.system("admin"),
        ),
        lambda page: theirs <= {o.order_id for o in page.orders},
        what="the other customer's orders listed for an admin",
    )
    assert {o.customer_id for o in admin.orders} == {other}

    # Another customer's filter is refused, and says why.
    err = await failure(
        guarded.stub.ListOrders(pb.ListOrdersRequest(customer_id=other), metadata=auth)
    )
    assert err.code() == Code.PERMISSION_DENIED
    assert "only for itself" in (err.details() or "")


async def test_creating_for_another_customer_says_why(
    guarded: Guarded, customers: tuple[str, str]
) -> None:
    own, other = customers
    err = await failure(
        guarded.stub.CreateOrder(create_request(customer_id=other), metadata=guarded.customer(own))
    )
    assert err.code() == Code.PERMISSION_DENIED
    assert err.details() == (
        "A customer may create orders only for itself: customer_id must be the customer id "
        "its token names."
    )
    assert error_info(err).reason == "CUSTOMER_MISMATCH"


# --- Another customer's order is indistinguishable from a missing one ------------------------


def shape(err: grpc.aio.AioRpcError, order_id: str) -> tuple[Code, str, str]:
    """The code, message and full google.rpc.Status, with the order id made anonymous."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert isinstance(status, status_pb2.Status)
    # Order ids all have the same length, so a serialized detail keeps its own.
    anonymous = "ORD-" + "X" * (len(order_id) - 4)
    return (
        err.code(),
        (err.details() or "").replace(order_id, anonymous),
        str(status).replace(order_id, anonymous),
    )


@pytest.mark.parametrize("rpc", ORDER_RPCS)
async def test_another_customers_order_answers_exactly_like_a_missing_one(
    guarded: Guarded, customers: tuple[str, str], rpc: str
) -> None:
    own, other = customers
    theirs = await new_order(guarded, other)
    missing = "ORD-0000000000000000"
    auth = guarded.customer(own)

    async def refused(order_id: str) -> grpc.aio.AioRpcError:
        cancel = pb.CancelOrderRequest(order_id=order_id)
        return await failure(rpc_calls(guarded.stub, auth, order_id, cancel=cancel)[rpc]())

    not_theirs, not_there = await refused(theirs), await refused(missing)
    assert not_there.code() == Code.NOT_FOUND
    assert shape(not_theirs, theirs) == shape(not_there, missing)
    assert error_info(not_theirs).reason == "ORDER_NOT_FOUND"


# --- The JWT checks ---------------------------------------------------------------------------


def forged(issuer: Issuer, customer_id: str) -> dict[str, str]:
    """Tokens each failing one check, by name."""
    claims = issuer.claims(customer_id)
    stranger = SigningKey.ec("stranger")
    none_header = {"alg": "none", "typ": "JWT", "kid": issuer.ec_key.kid}
    unsigned = ".".join(base64url(json.dumps(part).encode()) for part in (none_header, claims))
    return {
        "expired": issuer.token(customer_id, expires_in=-120),
        "wrong audience": issuer.token(customer_id, claims={"aud": "someone-else"}),
        "wrong issuer": issuer.token(customer_id, claims={"iss": "https://evil.example/"}),
        "unknown kid": issuer.token(customer_id, key=stranger),
        "a known kid, another key": issuer.token(customer_id, key=SigningKey.ec(issuer.ec_key.kid)),
        "HS256 with the EC public key": hs256_signed_with(
            issuer.ec_key.public_pem(), claims, issuer.ec_key.kid
        ),
        "HS256 with the RSA public key": hs256_signed_with(
            issuer.rsa_key.public_pem(), claims, issuer.rsa_key.kid
        ),
        "alg none": unsigned + ".",
        "no exp": issuer.token(customer_id, claims={"exp": None}),
        "not a customer id": issuer.token("two words"),
        "garbage in three parts": "abc.def.ghi",
    }


async def test_a_jwt_from_each_key_is_accepted(
    guarded: Guarded, customers: tuple[str, str]
) -> None:
    own, _ = customers
    order_id = await new_order(guarded, own)
    for key in (guarded.issuer.ec_key, guarded.issuer.rsa_key):
        token = guarded.issuer.token(own, key=key)
        order = await guarded.stub.GetOrder(
            pb.GetOrderRequest(order_id=order_id), metadata=bearer(token)
        )
        assert order.customer_id == own


async def test_every_bad_jwt_is_unauthenticated(
    guarded: Guarded, customers: tuple[str, str]
) -> None:
    own, _ = customers
    order_id = await new_order(guarded, own)
    reasons = {}
    for name, token in forged(guarded.issuer, own).items():
        err = await failure(
            guarded.stub.GetOrder(pb.GetOrderRequest(order_id=order_id), metadata=bearer(token))
        )
        assert err.code() == Code.UNAUTHENTICATED, name
        reasons[name] = error_info(err).reason
    assert reasons.pop("expired") == "ACCESS_TOKEN_EXPIRED"
    assert set(reasons.values()) == {"ACCESS_TOKEN_INVALID"}


async def test_a_jwt_says_which_check_failed(guarded: Guarded) -> None:
    issuer = guarded.issuer
    cases = {
        issuer.token("C1", expires_in=-120): "The JWT has expired; get a new one.",
        issuer.token("C1", claims={"aud": "x"}): "not for this service (aud)",
        issuer.token("C1", claims={"iss": "x"}): "its issuer (iss) is not the one",
        hs256_signed_with(issuer.ec_key.public_pem(), issuer.claims("C1"), "ec-1"): (
            "alg 'HS256' is refused"
        ),
    }
    for token, message in cases.items():
        err = await failure(
            guarded.stub.GetOrderStatus(
                pb.GetOrderStatusRequest(order_id="ORD-0000000000000000"), metadata=bearer(token)
            )
        )
        assert message in (err.details() or "")


async def test_a_jwt_within_the_leeway_is_accepted(guarded: Guarded) -> None:
    token = guarded.issuer.token("CUST-LEEWAY", expires_in=-5)
    code = await code_of(
        guarded.stub.GetOrderStatus(
            pb.GetOrderStatusRequest(order_id="ORD-0000000000000000"), metadata=bearer(token)
        )
    )
    assert code == Code.NOT_FOUND  # past authentication


async def test_the_customer_claim_is_a_setting(
    stack: Stack, tmp_path: Path, customers: tuple[str, str]
) -> None:
    own, other = customers
    async with guarded_server(stack, tmp_path, jwt_customer_claim="customer_id") as server:
        order_id = await new_order(server, own)
        # The end user "user-7" acts for the customer `own`.
        token = server.issuer.token("user-7", customer_claim="customer_id", customer_id=own)
        order = await server.stub.GetOrder(
            pb.GetOrderRequest(order_id=order_id), metadata=bearer(token)
        )
        assert order.customer_id == own
        theirs = server.issuer.token("user-7", customer_claim="customer_id", customer_id=other)
        assert await code_of(
            server.stub.GetOrder(pb.GetOrderRequest(order_id=order_id), metadata=bearer(theirs))
        ) == (Code.NOT_FOUND)
        # Without the claim, no customer: refused at the door.
        bare = server.issuer.token("user-7")
        err = await failure(
            server.stub.GetOrder(pb.GetOrderRequest(order_id=order_id), metadata=bearer(bare))
        )
        assert err.code() == Code.UNAUTHENTICATED


async def test_system_tokens_still_work_beside_jwts(guarded: Guarded) -> None:
    err = await failure(
        guarded.stub.GetOrderStatus(
            pb.GetOrderStatusRequest(order_id="ORD-0000000000000000"),
            metadata=bearer("ord_not-a-token-we-know"),
        )
    )
    assert (err.code(), error_info(err).reason) == (Code.UNAUTHENTICATED, "ACCESS_TOKEN_INVALID")
    status = await code_of(
        guarded.stub.GetOrderStatus(
            pb.GetOrderStatusRequest(order_id="ORD-0000000000000000"),
            metadata=guarded.system("storefront"),
        )
    )
    assert status == Code.NOT_FOUND


# --- Any token at all: accepted or UNAUTHENTICATED, never an error -----------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
HEADER_NAMES = st.sampled_from(["alg", "kid", "typ", "crit", "jku", "x5u"]) | st.text(max_size=4)
CLAIM_NAMES = st.sampled_from(["iss", "aud", "sub", "exp", "nbf", "iat"]) | st.text(max_size=4)


@functools.cache
def verifier_and_issuer() -> tuple[jwt_auth.JwtVerifier, Issuer]:
    issuer = Issuer()
    keys = jwt_auth.parse_jwks(json.dumps(issuer.jwks()))
    verifier = jwt_auth.JwtVerifier(
        keys, issuer=issuer.issuer, audience=issuer.audience, customer_claim="sub"
    )
    return verifier, issuer


def accepted_or_rejected(token: str) -> None:
    """The verifier's only two answers: a customer, or JwtRejected (UNAUTHENTICATED)."""
    verifier, _ = verifier_and_issuer()
    reason = ""
    try:
        verified = verifier.verify(token)
    except jwt_auth.JwtRejected as rejected:
        reason = rejected.reason
    else:
        assert validation.is_identifier("customer_id", verified.customer_id)
    assert reason in ("", "ACCESS_TOKEN_INVALID", "ACCESS_TOKEN_EXPIRED")


@settings(max_examples=300, deadline=None, database=None)
@given(
    header=st.dictionaries(HEADER_NAMES, JSON, max_size=5),
    claims=st.dictionaries(CLAIM_NAMES, JSON, max_size=8),
    signature=st.binary(max_size=80),
)
def test_any_unsigned_token_is_refused_cleanly(
    header: dict[str, Any], claims: dict[str, Any], signature: bytes
) -> None:
    parts = [json.dumps(header).encode(), json.dumps(claims).encode(), signature]
    accepted_or_rejected(".".join(base64url(part) for part in parts))


@settings(max_examples=200, deadline=None, database=None)
@given(claims=st.dictionaries(CLAIM_NAMES, JSON, max_size=6))
def test_any_claims_under_a_good_signature_are_judged_cleanly(claims: dict[str, Any]) -> None:
    """Odd claim values (an exp that is a list, an aud of numbers...) past the signature."""
    _, issuer = verifier_and_issuer()
    payload = {**issuer.claims("CUST-FUZZ"), **claims}
    # PyJWS: signs any bytes, where jwt.encode would refuse some claims itself.
    token = jwt.PyJWS().encode(
        json.dumps(payload).encode(), issuer.ec_key.private, "ES256", headers={"kid": "ec-1"}
    )
    accepted_or_rejected(token)


def test_deeply_nested_or_huge_tokens_are_refused_cleanly() -> None:
    for text in (b"[" * 5000, b"{" * 5000, b'{"a":' * 2000, b"x" * 6000):
        accepted_or_rejected(f"{base64url(text)}.e30.")
        accepted_or_rejected(f"eyJhbGciOiJFUzI1NiJ9.{base64url(text)}.")


# --- Settings ----------------------------------------------------------------------------------


def jwks_problems(tmp: Path, issuer: Issuer) -> list[tuple[list[str], str]]:
    def write(name: str, document: object) -> str:
        path = tmp / name
        path.write_text(document if isinstance(document, str) else json.dumps(document))
        return str(path)

    good = write("good.json", issuer.jwks())
    ec_jwk = issuer.ec_key.public_jwk()
    oct_jwk = {"kty": "oct", "k": "c2VjcmV0", "kid": "s"}
    both = ["--jwt-issuer", issuer.issuer, "--jwt-audience", issuer.audience]
    return [
        (["--jwt-jwks-file", good], "needs --jwt-issuer and --jwt-audience"),
        (["--jwt-jwks-file", good, "--jwt-issuer", issuer.issuer], "needs --jwt-issuer"),
        (["--jwt-issuer", issuer.issuer], "need --jwt-jwks-file"),
        (["--jwt-jwks-file", write("bad.json", "{not json"), *both], "not valid JSON"),
        (["--jwt-jwks-file", write("empty.json", {"keys": []}), *both], "at least one key"),
        (
            ["--jwt-jwks-file", write("hs.json", {"keys": [{**ec_jwk, "alg": "HS256"}]}), *both],
            "alg 'HS256'",
        ),
        (
            ["--jwt-jwks-file", write("oct.json", {"keys": [oct_jwk]}), *both],
            "symmetric key material",
        ),
        (
            ["--jwt-jwks-file", write("private.json", {"keys": [{**ec_jwk, "d": "AAAA"}]}), *both],
            "private or symmetric key material",
        ),
        (
            [
                "--jwt-jwks-file",
                write("small.json", {"keys": [SigningKey.rsa("small", 1024).public_jwk()]}),
                *both,
            ],
            "1024-bit RSA",
        ),
        (["--jwt-jwks-file", str(tmp / "missing.json"), *both], "no such file"),
    ]


def test_a_bad_jwt_configuration_stops_the_server_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    issuer = Issuer()
    for argv, message in jwks_problems(tmp_path, issuer):
        with pytest.raises(SystemExit) as caught:
            settings_from(ServerSettings, argv, {})
        assert caught.value.code == 2, argv
        assert message in capsys.readouterr().err, argv


def test_jwt_settings_from_the_environment(tmp_path: Path) -> None:
    issuer = Issuer()
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    settings = settings_from(
        ServerSettings,
        [],
        {
            "ORDER_JWT_JWKS_FILE": str(jwks),
            "ORDER_JWT_ISSUER": issuer.issuer,
            "ORDER_JWT_AUDIENCE": issuer.audience,
            "ORDER_JWT_CUSTOMER_CLAIM": "customer_id",
        },
    )
    assert (settings.jwt_issuer, settings.jwt_audience) == (issuer.issuer, issuer.audience)
    assert settings.jwt_customer_claim == "customer_id"
    assert settings.jwt_keys is not None
    assert set(settings.jwt_keys) == {"ec-1", "rsa-1"}
    assert settings_from(ServerSettings, [], {}).jwt_customer_claim == "sub"
