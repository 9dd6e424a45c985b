"""An identity provider for tests: throwaway EC and RSA keys, their JWKS file, and JWTs;
and a server that takes them beside a tokens file.

`Issuer.token(...)` mints what a real provider would; its keyword arguments
change one thing at a time (expired, wrong audience, another key...), for
the tests that each check must refuse.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from server import tokens as tokens_cli
from server.platform import tokens
from server.platform.app import OrderServer
from tests.support.stack import Stack, async_stub, bearer, serving

ISSUER = "https://id.acme.example/"
AUDIENCE = "orders.acme.example"


@dataclass
class SigningKey:
    """One key pair: its kid, its algorithm, and the private half that signs."""

    kid: str
    algorithm: str
    private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

    @classmethod
    def ec(cls, kid: str) -> SigningKey:
        return cls(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def rsa(cls, kid: str, bits: int = 2048) -> SigningKey:
        return cls(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=bits))

    def public_jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            entry = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            entry = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
        return {**entry, "kid": self.kid, "alg": self.algorithm, "use": "sig"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@dataclass
class Issuer:
    """Signs JWTs as a provider with an EC and an RSA key would; `jwks` publishes both."""

    ec_key: SigningKey = field(default_factory=lambda: SigningKey.ec("ec-1"))
    rsa_key: SigningKey = field(default_factory=lambda: SigningKey.rsa("rsa-1"))
    issuer: str = ISSUER
    audience: str = AUDIENCE

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.ec_key.public_jwk(), self.rsa_key.public_jwk()]}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks(), indent=2))
        return path

    def claims(self, subject: str, *, expires_in: float = 300) -> dict[str, Any]:
        """The claims of a valid token for `subject`, its customer (claim `sub`) too."""
        now = int(time.time())
        return {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "iat": now,
            "exp": now + int(expires_in),
        }

    def token(
        self,
        subject: str,
        *,
        key: SigningKey | None = None,
        customer_claim: str = "sub",
        customer_id: str | None = None,
        expires_in: float = 300,
        claims: dict[str, Any] | None = None,
        headers: dict[str, Any] | None = None,
    ) -> str:
        """A JWT for `subject`, by default valid for 5 minutes and signed by the EC key.

        `claims` overrides or adds claims (None as a value removes one).
        """
        key = key or self.ec_key
        payload = self.claims(subject, expires_in=expires_in)
        if customer_claim != "sub" or customer_id is not None:
            payload[customer_claim] = customer_id if customer_id is not None else subject
        for name, value in (claims or {}).items():
            if value is None:
                payload.pop(name, None)
            else:
                payload[name] = value
        return jwt.encode(
            payload,
            key.private,
            algorithm=key.algorithm,
            headers={"kid": key.kid, **(headers or {})},
        )


def base64url(data: bytes) -> str:
    """Base64url without padding, as JWTs (RFC 7515) and ListOrders page tokens write it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_signed_with(secret: bytes, payload: dict[str, Any], kid: str) -> str:
    """A JWT whose header says HS256, its MAC keyed with `secret`: with a public key
    as the secret, the algorithm confusion an RS256/ES256 verifier must refuse.
    (PyJWT itself refuses to make one, hence by hand.)"""
    header = {"alg": "HS256", "typ": "JWT", "kid": kid}
    signing_input = ".".join(base64url(json.dumps(part).encode()) for part in (header, payload))
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64url(mac)}"


# --- A server that takes both kinds of caller --------------------------------------------


@dataclass
class Guarded:
    """A server in front of a stack's worker taking tokens-file tokens and JWTs, a channel."""

    server: OrderServer
    channel: grpc.aio.Channel
    stub: pb_grpc.OrderServiceAsyncStub
    # A token per role of the tokens file, the caller named after its role.
    tokens: dict[str, str]
    issuer: Issuer

    def system(self, role: str) -> tuple[tuple[str, str]]:
        """The metadata of a call with the token of `role`."""
        return bearer(self.tokens[role])

    def customer(self, customer_id: str) -> tuple[tuple[str, str]]:
        """The metadata of a call with a fresh JWT of the end user `customer_id`."""
        return bearer(self.issuer.token(customer_id))


@asynccontextmanager
async def guarded_server(stack: Stack, directory: Path, **changes: Any) -> AsyncIterator[Guarded]:
    """Another gRPC server for the stack's worker, with a tokens file (a caller per role)
    and the JWKS of a fresh Issuer; `changes` changes other settings.

    A test's one customer makes far more calls than a person would: no rate for customers
    unless `changes` gives one.
    """
    changes = {"rate_limits": "customer=off", **changes}
    by_role = {role: tokens.new_token() for role in tokens.ROLES}
    entries = [tokens_cli.entry_toml(role, token, role=role) for role, token in by_role.items()]
    tokens_file = directory / "tokens.toml"
    tokens_file.write_text("\n".join(entries))
    issuer = Issuer()
    async with serving(
        stack,
        auth_tokens_file=tokens_file,
        jwt_jwks_file=issuer.write_jwks(directory / "jwks.json"),
        jwt_issuer=issuer.issuer,
        jwt_audience=issuer.audience,
        **changes,
    ) as server:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        try:
            yield Guarded(server, channel, async_stub(channel), by_role, issuer)
        finally:
            await channel.close(grace=None)


def guarded_fixture(
    name: str,
) -> Callable[[Stack, pytest.TempPathFactory], AsyncIterator[Guarded]]:
    """A module's `guarded` fixture (`guarded = guarded_fixture(...)`): a guarded_server
    with the default settings, its files in a temporary folder called `name`.

    Module-scoped, so each module has a server of its own: one module's calls never
    show in another's captured logs.
    """

    @pytest_asyncio.fixture(scope="module")
    async def guarded(
        stack: Stack, tmp_path_factory: pytest.TempPathFactory
    ) -> AsyncIterator[Guarded]:
        async with guarded_server(stack, tmp_path_factory.mktemp(name)) as server:
            yield server

    return guarded
