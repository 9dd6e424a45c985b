"""Who may call what: the callers of the tokens file, their hashed bearer tokens and roles.

The file's format and rotation: docs/security.md and docs/decisions/0010.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from acme.orders.v1 import order_service_pb2 as pb
from infra.settings import ExistingFile, load_file
from server.api import access

_SERVICE = pb.DESCRIPTOR.services_by_name["OrderService"]
# "GetOrder" -> "/acme.orders.v1.OrderService/GetOrder", the name gRPC routes by.
ORDER_METHODS: Mapping[str, str] = {
    method.name: f"/{_SERVICE.full_name}/{method.name}" for method in _SERVICE.methods
}

# A shop's RPCs: everything but recording payments.
_STOREFRONT_RPCS = frozenset(
    {
        "CreateOrder",
        "GetOrder",
        "GetOrderStatus",
        "GetEstimatedDelivery",
        "ListOrders",
        "WatchOrder",
        "CancelOrder",
    }
)
# An end user's JWT (server/platform/jwt_auth.py): the storefront's RPCs, each on
# the customer's own orders only (server/api/access.py); never ConfirmPayment.
CUSTOMER_RPCS = _STOREFRONT_RPCS
# Each role: the OrderService RPCs it may call, or None for every RPC of every
# service on the server (those added later included).
ROLES: Mapping[str, frozenset[str] | None] = {
    "storefront": _STOREFRONT_RPCS,
    "payment-gateway": frozenset({"ConfirmPayment"}),
    "operator": frozenset(ORDER_METHODS),
    "admin": None,
}

# A prefix makes a leaked token recognisable to secret scanners and people.
TOKEN_PREFIX = "ord_"
_TOKEN_BYTES = 32
CALLER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_ENTRY_KEYS = {"name", "token_sha256", "role", "methods", "expires"}


class TokenFileError(ValueError):
    """The tokens file cannot be read or is not valid; the message says where and why."""


def new_token() -> str:
    """A fresh bearer token: 256 random bits, URL-safe, with a recognisable prefix."""
    return TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES)


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token, as the tokens file stores it.

    A plain hash, not a slow password hash: tokens are 256 random bits, so there
    is no dictionary to try, and a slow hash would only cost CPU on every RPC.
    """
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    """One entry of the tokens file: a caller, one of its tokens, and what it may call."""

    name: str
    token_sha256: bytes
    # Full method names ("/acme.orders.v1.OrderService/GetOrder"); None: every method.
    methods: frozenset[str] | None
    expires: datetime | None = None
    # The entry's role, if it names one (rate limits are set per role).
    role: str | None = None

    @functools.cached_property
    def principal(self) -> access.Principal:
        """The caller as the RPCs see it: made once, not on every call."""
        return access.Principal(self.name, self.methods, role=self.role)

    def expired(self, now: datetime) -> bool:
        return self.expires is not None and now >= self.expires


class TokenStore:
    """The known callers, looked up by token."""

    def __init__(self, callers: Sequence[Caller]) -> None:
        seen: set[bytes] = set()
        for caller in callers:
            if caller.token_sha256 in seen:
                raise TokenFileError(f"caller {caller.name}: the same token is listed twice")
            seen.add(caller.token_sha256)
        self._callers = tuple(callers)

    def __len__(self) -> int:
        return len(self._callers)

    @property
    def callers(self) -> tuple[Caller, ...]:
        return self._callers

    def identify(self, token: str) -> Caller | None:
        """The caller holding this token, or None for an unknown one.

        Compares every entry in constant time instead of a dict lookup, so the
        time taken says nothing about the stored hashes; a handful of entries
        cost microseconds.
        """
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for caller in self._callers:
            if hmac.compare_digest(digest, caller.token_sha256):
                found = caller
        return found


def parse_expiry(value: object) -> datetime:
    """An RFC 3339 timestamp with an offset, as a TOML datetime or a string, in UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"{value!r} is not an RFC 3339 timestamp") from None
    if not isinstance(value, datetime):
        raise ValueError(f"{value!r} is not an RFC 3339 timestamp, e.g. 2027-01-01T00:00:00Z")
    if value.tzinfo is None:
        raise ValueError(f"{value.isoformat()} has no UTC offset: add Z or e.g. +01:00")
    return value.astimezone(UTC)


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with a Z, e.g. 2027-01-01T00:00:00Z."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _methods(value: object) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError("methods must be a list of OrderService RPC names")
    unknown = [name for name in value if name not in ORDER_METHODS]
    if unknown:
        raise ValueError(
            f"unknown RPC {unknown[0]!r} in methods; OrderService has {', '.join(ORDER_METHODS)}"
        )
    return frozenset(ORDER_METHODS[name] for name in value)


def _caller(entry: object) -> Caller:
    if not isinstance(entry, dict):
        raise ValueError("must be a table")
    # A misspelt key (say `expire`) must not silently drop a restriction.
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; keys are {', '.join(sorted(_ENTRY_KEYS))}")
    name = entry.get("name")
    if not isinstance(name, str) or not CALLER_NAME.fullmatch(name):
        raise ValueError("name must be 1-64 letters, digits or ._@- (it appears in logs)")
    digest = entry.get("token_sha256")
    if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
        raise ValueError(f"caller {name}: token_sha256 must be 64 hex digits")
    if "role" not in entry and "methods" not in entry:
        raise ValueError(f"caller {name}: give a role, methods, or both")
    methods: frozenset[str] | None = frozenset()
    role = None
    if "role" in entry:
        role = entry["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise ValueError(f"caller {name}: unknown role {role!r}; roles are {', '.join(ROLES)}")
        allowed = ROLES[role]
        methods = None if allowed is None else frozenset(ORDER_METHODS[rpc] for rpc in allowed)
    if "methods" in entry:
        try:
            extra = _methods(entry["methods"])
        except ValueError as err:
            raise ValueError(f"caller {name}: {err}") from None
        methods = None if methods is None else methods | extra
    expires = None
    if "expires" in entry:
        try:
            expires = parse_expiry(entry["expires"])
        except ValueError as err:
            raise ValueError(f"caller {name}: expires: {err}") from None
    return Caller(name, bytes.fromhex(digest), methods, expires, role)


def parse(text: str) -> TokenStore:
    """The token store from the text of a tokens file; ValueError says what is wrong."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise TokenFileError(f"not valid TOML: {err}") from None
    extra = sorted(set(document) - {"callers"})
    if extra:
        raise TokenFileError(f"unknown key {extra[0]!r}: list callers as [[callers]] tables")
    entries = document.get("callers", [])
    if not isinstance(entries, list) or not entries:
        # An empty file would refuse every call: surely not what was meant.
        raise TokenFileError("lists no callers: add [[callers]] tables")
    callers = []
    for number, entry in enumerate(entries, start=1):
        try:
            callers.append(_caller(entry))
        except ValueError as err:
            raise TokenFileError(f"callers entry {number}: {err}") from None
    return TokenStore(callers)


def load(path: Path) -> TokenStore:
    """The token store from a tokens file; TokenFileError names the file and the problem."""
    return load_file(path, parse, TokenFileError)


def _loadable(path: Path) -> Path:
    load(path)  # a mistake in it stops the process before it starts
    return path


# The type of a setting naming a tokens file: read and checked with the settings.
TokensFile = Annotated[ExistingFile, AfterValidator(_loadable)]
