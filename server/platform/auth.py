"""Bearer tokens: who is calling (UNAUTHENTICATED) and whether it may (PERMISSION_DENIED)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc

from server.api import errors
from server.platform.request_path import handler_of_the_same_kind
from server.platform.tokens import Caller, TokenStore, format_time

logger = logging.getLogger(__name__)

_BEARER = "bearer"


class Unauthenticated(errors.ServiceError):
    """UNAUTHENTICATED: no token, not a bearer token, an unknown or an expired one."""

    code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self, reason: str, message: str, **metadata: str) -> None:
        self.reason = reason
        super().__init__(message, metadata=metadata)


class PermissionDenied(errors.ServiceError):
    """PERMISSION_DENIED: a known caller whose entry does not allow this RPC."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "METHOD_NOT_ALLOWED"

    def __init__(self, caller: Caller, method: str) -> None:
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

    No request deserializer: an unauthenticated request is never decoded.
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
    return handler_of_the_same_kind(handler, refuse)


class BearerTokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Lets through only the RPCs the caller's token allows; open services need none."""

    def __init__(
        self,
        tokens: TokenStore,
        *,
        open_services: Iterable[str],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._tokens = tokens
        self._open_prefixes = tuple(f"/{name}/" for name in open_services)
        self._clock = clock

    def authenticate(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None
    ) -> Caller:
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
        caller = self._tokens.identify(token.strip())
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
        return caller

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
            return _refusal(handler, error)
        if not caller.may_call(method):
            return _refusal(handler, PermissionDenied(caller, method))
        return handler
