"""End-user JWTs: their keys (a JWKS file), their checks, and the customer each one names.

Why and how: docs/decisions/0020 and docs/security.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Self

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import PrivateAttr, model_validator

from infra.settings import ExistingFile, Options, Text, load_file, setting
from server.api import validation
from workflows import search_attributes

# Asymmetric only: the server holds no secret that could mint a token. HS* and
# "none" are never accepted, whatever a token's header says.
ALGORITHMS = ("RS256", "ES256")
# Clocks of the issuer and of the servers may differ a little.
LEEWAY = timedelta(seconds=30)
MIN_RSA_BITS = 2048
# How the auth interceptor tells a JWT from a tokens-file token (ord_ + base64url):
# three base64url parts separated by dots.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Members of a JWK that only a private key has.
_PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


def looks_like_jwt(token: str) -> bool:
    """Whether a bearer token has a JWT's shape; a tokens-file token never has a dot."""
    return _JWT_SHAPE.fullmatch(token) is not None


class JwksError(ValueError):
    """The JWKS file cannot be read or holds a key this server refuses; the message says why."""


def _key(entry: object, number: int) -> jwt.PyJWK:
    if not isinstance(entry, dict):
        raise JwksError(f"key {number}: must be a JSON object")
    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid:
        raise JwksError(f"key {number}: needs a kid (tokens name their key by it)")
    where = f"key {kid!r}"
    private = sorted(_PRIVATE_MEMBERS & set(entry))
    if private:
        raise JwksError(
            f"{where}: holds private or symmetric key material ({', '.join(private)}); "
            "publish public keys only"
        )
    kty, crv = entry.get("kty"), entry.get("crv")
    if kty == "RSA":
        algorithm = "RS256"
    elif kty == "EC" and crv == "P-256":
        algorithm = "ES256"
    else:
        raise JwksError(f"{where}: kty {kty!r} (crv {crv!r}) is neither RSA nor EC P-256")
    if entry.get("alg", algorithm) != algorithm:
        raise JwksError(f"{where}: alg {entry.get('alg')!r}; accepted: {' or '.join(ALGORITHMS)}")
    if entry.get("use", "sig") != "sig":
        raise JwksError(f"{where}: use {entry.get('use')!r} is not sig")
    try:
        key = jwt.PyJWK(entry, algorithm)
    except jwt.PyJWTError as err:
        raise JwksError(f"{where}: {err}") from None
    if isinstance(key.key, rsa.RSAPublicKey) and key.key.key_size < MIN_RSA_BITS:
        raise JwksError(f"{where}: {key.key.key_size}-bit RSA; at least {MIN_RSA_BITS} bits")
    return key


def parse_jwks(text: str) -> dict[str, jwt.PyJWK]:
    """The keys of a JWKS document by kid; JwksError for anything it would be unsafe to use."""
    try:
        document = json.loads(text)
    except ValueError as err:
        raise JwksError(f"not valid JSON: {err}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise JwksError('must be a JSON Web Key Set: {"keys": [...]} with at least one key')
    keys: dict[str, jwt.PyJWK] = {}
    for number, entry in enumerate(entries, start=1):
        key = _key(entry, number)
        kid = str(key.key_id)
        if kid in keys:
            raise JwksError(f"key {kid!r} is listed twice")
        keys[kid] = key
    return keys


def load_jwks(path: Path) -> dict[str, jwt.PyJWK]:
    """The keys of a JWKS file by kid; JwksError names the file and the problem."""
    return load_file(path, parse_jwks, JwksError)


class JwtSettings(Options):
    """End-user JWTs: customers calling for themselves, limited to their own orders."""

    jwt_jwks_file: ExistingFile | None = setting(
        None,
        "ORDER_JWT_JWKS_FILE",
        "JSON Web Key Set of the RS256/ES256 public keys that sign end-user JWTs "
        "(needs --jwt-issuer and --jwt-audience)",
        shown="none: no JWTs accepted",
    )
    jwt_issuer: Text | None = setting(
        None, "ORDER_JWT_ISSUER", "the iss every JWT must hold, exactly", shown="none"
    )
    jwt_audience: Text | None = setting(
        None, "ORDER_JWT_AUDIENCE", "the aud every JWT must hold (this service)", shown="none"
    )
    jwt_customer_claim: Text = setting(
        "sub", "ORDER_JWT_CUSTOMER_CLAIM", "the JWT claim that holds the caller's customer id"
    )
    _jwks: dict[str, jwt.PyJWK] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _load_jwks(self) -> Self:
        """A bad JWKS file, or one without issuer and audience, stops the server at start."""
        if self.jwt_jwks_file is None:
            if self.jwt_issuer is not None or self.jwt_audience is not None:
                raise ValueError("--jwt-issuer and --jwt-audience need --jwt-jwks-file")
            return self
        if self.jwt_issuer is None or self.jwt_audience is None:
            raise ValueError(
                "--jwt-jwks-file needs --jwt-issuer and --jwt-audience: a JWT is accepted "
                "only from the expected issuer and for this service"
            )
        self._jwks = load_jwks(self.jwt_jwks_file)
        return self

    @property
    def jwt_keys(self) -> Mapping[str, jwt.PyJWK] | None:
        """The JWKS file's keys by kid; None when no JWTs are accepted."""
        return self._jwks


class JwtRejected(ValueError):
    """A JWT this server does not accept; `reason` is the ErrorInfo reason, the message why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class CustomerToken:
    """What a verified JWT says: who the end user is and which customer it acts for."""

    subject: str
    customer_id: str


_INVALID = "ACCESS_TOKEN_INVALID"
# The check that failed, said for the caller (no secret in any of them).
_WHY: list[tuple[type[jwt.PyJWTError], str]] = [
    (jwt.InvalidAudienceError, "it is not for this service (aud)"),
    (jwt.InvalidIssuerError, "its issuer (iss) is not the one this service trusts"),
    (jwt.ImmatureSignatureError, "it is not valid yet (nbf or iat in the future)"),
    (jwt.MissingRequiredClaimError, "it lacks a required claim"),
    (jwt.InvalidAlgorithmError, f"its alg is not its key's ({' or '.join(ALGORITHMS)})"),
    (jwt.InvalidSignatureError, "its signature does not verify"),
]


class JwtVerifier:
    """Checks end-user JWTs against the JWKS keys, the issuer, the audience and the clock."""

    def __init__(
        self,
        keys: Mapping[str, jwt.PyJWK],
        *,
        issuer: str,
        audience: str,
        customer_claim: str,
        leeway: timedelta = LEEWAY,
    ) -> None:
        if not keys:
            raise ValueError("a JwtVerifier needs at least one key")
        self._keys = dict(keys)
        self._issuer = issuer
        self._audience = audience
        self._customer_claim = customer_claim
        self._leeway = leeway
        # A token without a kid is tried against the one key, when there is one.
        self._only_key = next(iter(self._keys.values())) if len(self._keys) == 1 else None
        self._required = sorted({"exp", "iss", "aud", "sub", customer_claim})

    @classmethod
    def from_settings(cls, settings: JwtSettings) -> JwtVerifier | None:
        """The verifier the settings describe; None when they accept no JWTs."""
        keys = settings.jwt_keys
        if keys is None or settings.jwt_issuer is None or settings.jwt_audience is None:
            return None
        return cls(
            keys,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            customer_claim=settings.jwt_customer_claim,
        )

    def _key_for(self, token: str) -> jwt.PyJWK:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise JwtRejected(_INVALID, "The JWT is malformed.") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS:
            raise JwtRejected(
                _INVALID, f"The JWT's alg {alg!r} is refused; accepted: {', '.join(ALGORITHMS)}."
            )
        if kid is None and self._only_key is not None:
            return self._only_key
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise JwtRejected(_INVALID, "The JWT's kid names no key this service trusts.")
        return key

    def verify(self, token: str) -> CustomerToken:
        """The end user and customer of a valid JWT; JwtRejected says what is wrong."""
        key = self._key_for(token)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                # The key's own algorithm only: a token cannot pick another (HS256 with
                # the public key as its secret is the classic confusion).
                algorithms=[key.algorithm_name],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": self._required},
            )
        except jwt.ExpiredSignatureError:
            expired = "The JWT has expired; get a new one."
            raise JwtRejected("ACCESS_TOKEN_EXPIRED", expired) from None
        except jwt.PyJWTError as err:
            why = next((text for kind, text in _WHY if isinstance(err, kind)), "it is malformed")
            raise JwtRejected(_INVALID, f"The JWT is not valid: {why}.") from None
        except (ValueError, TypeError, OverflowError):
            # PyJWT 2.15 wraps every odd value the tests fuzz; this keeps a future one
            # from turning a bad token into INTERNAL.
            raise JwtRejected(_INVALID, "The JWT is not valid: it is malformed.") from None
        customer = claims.get(self._customer_claim)
        # What CreateOrder accepts as a customer_id, so the customer can order for itself.
        if not isinstance(customer, str) or not validation.is_identifier("customer_id", customer):
            raise JwtRejected(
                _INVALID,
                f"The JWT's {self._customer_claim} claim is not a customer id "
                "(1-64 letters, digits and . _ : @ -).",
            )
        return CustomerToken(subject=str(claims["sub"]), customer_id=customer)


def caller_name(subject: str, key: bytes) -> str:
    """How logs name an end user: jwt: and the keyed hash of its subject, never the subject.

    A subject is often the customer id, which no log line holds in clear
    (docs/decisions/0017); with the customer claim `sub` the hash is the very
    OrderCustomerId that visibility holds for the customer's orders.
    """
    return "jwt:" + search_attributes.customer_key(key, subject)
