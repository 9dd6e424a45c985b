"""Bearer tokens: who is calling (UNAUTHENTICATED) and whether it may (PERMISSION_DENIED).

A token is a tokens-file token (a system caller) or an end user's JWT (a customer);
the caller is bound for the RPC's handler and logs (server/api/access.py).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc

from server.api import access, errors
from server.platform import jwt_auth
from server.platform.request_path import handler_of_the_same_kind
from server.platform.tokens import CUSTOMER_RPCS, ORDER_METHODS, TokenStore, format_time

logger = logging.getLogger(__name__)

_BEARER = "bearer"
_CUSTOMER_METHODS = frozenset(ORDER_METHODS[rpc] for rpc in CUSTOMER_RPCS)
# Who a refused call names when its credentials named no one.
_NOBODY = "-"


class Unauthenticated(errors.ServiceError):
    """UNAUTHENTICATED: no token, not a bearer token, an unknown or an expired one."""

    code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self, reason: str, message: str, **metadata: str) -> None:
        self.reason = reason
        super().__init__(message, metadata=metadata)


class PermissionDenied(errors.ServiceError):
    """PERMISSION_DENIED: a known caller (tokens-file entry or customer) not allowed this RPC."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "METHOD_NOT_ALLOWED"

    def __init__(self, caller: access.Principal, method: str) -> None:
        rpc = method.lstrip("/")
        super().__init__(
            f"Caller {caller.name} may not call {rpc}.",
            metadata={"caller": caller.name, "method": rpc},
        )


def _authorization(metadata: Sequence[tuple[str, str | bytes]] | None) -> list[str]:
    return [str(value) for key, value in metadata or () if key == "authorization"]


def _refusal(
    handler: grpc.RpcMethodHandler[Any, Any], error: errors.ServiceError
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind as `handler` that ends the call with `error`.

    An unauthenticated request is never decoded; a known caller's is, so that
    the log and audit lines of a refused call name its order.
    """

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        level = logging.INFO if error.reason == "CREDENTIALS_MISSING" else logging.WARNING
        # The caller's name, never its token.
        logger.log(
            level,
            "rpc=%s code=%s reason=%s caller=%s peer=%s",
            error.metadata.get("method", "-"),
            error.code.name,
            error.reason,
            error.metadata.get("caller", "-"),
            context.peer(),
        )
        raise error  # the request path turns it into the status

    # grpc.aio runs a plain coroutine for a streaming response too: it just sends none.
    known = isinstance(error, PermissionDenied) and not handler.request_streaming
    deserialize = handler.request_deserializer if known else None
    return handler_of_the_same_kind(handler, refuse, deserialize)


class BearerTokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Lets through only the RPCs the caller's token allows; open services need none.

    `jwt`, when given, also accepts end users' JWTs: customers, limited to
    CUSTOMER_RPCS and, through server/api/access.py, to their own orders.
    `customer_id_key` keys the hash that names an end user in logs.
    """

    def __init__(
        self,
        tokens: TokenStore,
        *,
        open_services: Iterable[str],
        jwt: jwt_auth.JwtVerifier | None = None,
        customer_id_key: bytes = b"",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if jwt is not None and not customer_id_key:
            raise ValueError("JWTs need the customer-id key, which names their callers in logs")
        self._tokens = tokens
        self._jwt = jwt
        self._customer_id_key = customer_id_key
        self._open_prefixes = tuple(f"/{name}/" for name in open_services)
        self._clock = clock

    def _customer(self, verifier: jwt_auth.JwtVerifier, token: str, rpc: str) -> access.Principal:
        try:
            verified = verifier.verify(token)
        except jwt_auth.JwtRejected as rejected:
            raise Unauthenticated(rejected.reason, rejected.message, method=rpc) from None
        name = jwt_auth.caller_name(verified.subject, self._customer_id_key)
        return access.Principal(name, _CUSTOMER_METHODS, verified.customer_id)

    def authenticate(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None
    ) -> access.Principal:
        """The caller, or Unauthenticated saying what is wrong with its credentials."""
        rpc = method.lstrip("/")
        values = _authorization(metadata)
        if not values:
            raise Unauthenticated(
                "CREDENTIALS_MISSING",
                "Missing credentials: send the metadata `authorization: Bearer <token>`.",
                method=rpc,
            )
        scheme, _, token = values[0].strip().partition(" ")
        if len(values) > 1 or scheme.lower() != _BEARER or not token.strip():
            raise Unauthenticated(
                "CREDENTIALS_MALFORMED",
                "Malformed credentials: send one `authorization: Bearer <token>`.",
                method=rpc,
            )
        token = token.strip()
        if self._jwt is not None and jwt_auth.looks_like_jwt(token):
            return self._customer(self._jwt, token, rpc)
        caller = self._tokens.identify(token)
        if caller is None:
            raise Unauthenticated(
                "ACCESS_TOKEN_INVALID", "The bearer token is not valid.", method=rpc
            )
        if caller.expires is not None and caller.expired(self._clock()):
            expired_at = format_time(caller.expires)
            raise Unauthenticated(
                "ACCESS_TOKEN_EXPIRED",
                f"The bearer token expired at {expired_at}; ask for a new one.",
                method=rpc,
                caller=caller.name,
                expireTime=expired_at,
            )
        return caller.principal

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        # An unknown method stays UNIMPLEMENTED, as grpc answers it before any
        # interceptor in other languages; reflection lists the methods anyway.
        if handler is None or method.startswith(self._open_prefixes):
            return handler
        try:
            caller = self.authenticate(method, handler_call_details.invocation_metadata)
        except Unauthenticated as error:
            # An expired token still names its caller; other refusals name no one.
            access.bind(access.Principal(error.metadata.get("caller", _NOBODY), frozenset()))
            return _refusal(handler, error)
        # Bound here, in the RPC's own task, before its handler runs.
        access.bind(caller)
        if not caller.may_call(method):
            return _refusal(handler, PermissionDenied(caller, method))
        return handler
