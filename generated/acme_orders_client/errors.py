"""Typed exceptions for the OrderService's errors, with their google.rpc details decoded.

The server answers every error with a canonical status code and a
`google.rpc.Status` in the `grpc-status-details-bin` trailer: an `ErrorInfo`
(domain "orders.acme.example", a `reason` such as "ORDER_NOT_FOUND") first,
then what the code calls for: `BadRequest` with INVALID_ARGUMENT,
`ResourceInfo` with NOT_FOUND and ALREADY_EXISTS, `PreconditionFailure` with
FAILED_PRECONDITION, `RetryInfo` with UNAVAILABLE. `from_rpc_error` turns a
`grpc.RpcError` into the matching `OrderServiceError` subclass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# The ErrorInfo.domain of the errors the OrderService itself raises.
ERROR_DOMAIN = "orders.acme.example"

# The google.rpc detail types decoded into messages; any other stays a google.protobuf.Any.
_DETAIL_TYPES: dict[str, type[Message]] = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (
        error_details_pb2.ErrorInfo,
        error_details_pb2.RetryInfo,
        error_details_pb2.BadRequest,
        error_details_pb2.PreconditionFailure,
        error_details_pb2.ResourceInfo,
        error_details_pb2.QuotaFailure,
        error_details_pb2.DebugInfo,
        error_details_pb2.RequestInfo,
        error_details_pb2.Help,
        error_details_pb2.LocalizedMessage,
    )
}

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request (google.rpc.BadRequest.FieldViolation)."""

    field: str  # a path such as "items[0].quantity"
    description: str
    reason: str = ""  # e.g. "OUT_OF_RANGE", "REQUIRED"


@dataclass(frozen=True)
class PreconditionViolation:
    """Why the order's state forbids the call (google.rpc.PreconditionFailure.Violation)."""

    type: str  # "ORDER_STATUS"
    subject: str  # "orders/<order_id>"
    description: str


@dataclass(frozen=True)
class Resource:
    """The resource an error is about (google.rpc.ResourceInfo)."""

    resource_type: str  # "acme.orders.v1.Order"
    resource_name: str  # the order id
    owner: str = ""
    description: str = ""


class OrderServiceError(Exception):
    """An RPC of the OrderService failed. Subclasses per status code; this class for the rest.

    code: the gRPC status code. message: the status message, for people.
    reason and domain: from the ErrorInfo, the stable machine-readable cause
    (e.g. "ORDER_NOT_FOUND", "ORDER_STATE_FORBIDS", "TEMPORAL_UNAVAILABLE").
    metadata: the ErrorInfo's metadata (e.g. {"orderId": ...}).
    details: every detail message of the status, decoded.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        details: Sequence[Message] = (),
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.details = list(details)

    def __str__(self) -> str:
        reason = f" [{self.reason}]" if self.reason else ""
        return f"{self.code.name}: {self.message}{reason}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"

    def detail(self, kind: type[M]) -> M | None:
        """The first detail message of this type, if the status carries one."""
        return next((d for d in self.details if isinstance(d, kind)), None)

    @property
    def retry_delay(self) -> timedelta | None:
        """How long the server asks to wait before a retry (google.rpc.RetryInfo), if it does."""
        info = self.detail(error_details_pb2.RetryInfo)
        if info is None:
            return None
        delay: timedelta = info.retry_delay.ToTimedelta()
        return delay

    @property
    def field_violations(self) -> list[FieldViolation]:
        """Every bad field of the request (google.rpc.BadRequest); empty if none was sent."""
        bad = self.detail(error_details_pb2.BadRequest)
        if bad is None:
            return []
        return [FieldViolation(v.field, v.description, v.reason) for v in bad.field_violations]

    @property
    def precondition_violations(self) -> list[PreconditionViolation]:
        """Why the resource's state forbids the call (google.rpc.PreconditionFailure)."""
        failure = self.detail(error_details_pb2.PreconditionFailure)
        if failure is None:
            return []
        return [PreconditionViolation(v.type, v.subject, v.description) for v in failure.violations]

    @property
    def resource(self) -> Resource | None:
        """The resource the error is about (google.rpc.ResourceInfo), if named."""
        info = self.detail(error_details_pb2.ResourceInfo)
        if info is None:
            return None
        return Resource(info.resource_type, info.resource_name, info.owner, info.description)

    @property
    def order_id(self) -> str:
        """The order the error is about, or "" if it names none."""
        if "orderId" in self.metadata:
            return self.metadata["orderId"]
        resource = self.resource
        return resource.resource_name if resource is not None else ""


class InvalidArgument(OrderServiceError):
    """INVALID_ARGUMENT: the request is malformed; `field_violations` lists every bad field.

    Also a payment whose amount is not the order's total (reason PAYMENT_AMOUNT_MISMATCH).
    """

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(OrderServiceError):
    """NOT_FOUND: no order with that id; `resource` and `order_id` name it."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(OrderServiceError):
    """ALREADY_EXISTS: the new order's id is taken (practically never); retrying works."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(OrderServiceError):
    """FAILED_PRECONDITION: the order's state forbids the call; see `precondition_violations`."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    @property
    def order_status(self) -> str:
        """The order's status as the server judged it ("shipped", "cancelled" ...), or ""."""
        return self.metadata.get("orderStatus", "")


class PermissionDenied(OrderServiceError):
    """PERMISSION_DENIED: the caller's token does not allow this RPC (reason METHOD_NOT_ALLOWED),
    or a customer's JWT names another customer (reason CUSTOMER_MISMATCH)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(OrderServiceError):
    """UNAUTHENTICATED: no token, a malformed, unknown or expired one (see `reason`)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(OrderServiceError):
    """RESOURCE_EXHAUSTED: a limit (the caller's rate, its ListOrders in progress, the
    server's calls in progress; `retry_delay` says when to retry), or a message too big."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(OrderServiceError):
    """UNAVAILABLE: the server or Temporal cannot be reached; `retry_delay` says when to retry.

    The channel from `connect` already retried it (docs/client.md#what-retries).
    """

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(OrderServiceError):
    """DEADLINE_EXCEEDED: the call's deadline passed (retries included) before an answer."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(OrderServiceError):
    """INTERNAL: a bug or misconfiguration on the server, logged there."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[OrderServiceError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Internal,
    )
}


def _decode(detail: Any) -> Message:
    """A google.protobuf.Any of the status, as its own message type when it is a known one."""
    kind = _DETAIL_TYPES.get(detail.TypeName())
    if kind is None:
        copy = any_pb2.Any()
        copy.CopyFrom(detail)
        return copy
    message = kind()
    detail.Unpack(message)
    return message


def from_rpc_error(err: grpc.RpcError) -> OrderServiceError:
    """The typed exception for a failed call, sync (`grpc.RpcError`) or async (`AioRpcError`).

    Use as `except grpc.RpcError as err: raise from_rpc_error(err) from err`.
    A status without (or with unreadable) details still gives the right
    class, with the code and message only.
    """
    code_of = getattr(err, "code", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    details_of = getattr(err, "details", None)
    message = (details_of() if callable(details_of) else None) or str(err)
    details: list[Message] = []
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]  # an aio error is one too
    except (ValueError, AttributeError, TypeError):
        # A status that contradicts the call's code or message, or no call at all.
        status = None
    if status is not None:
        details = [_decode(detail) for detail in status.details]
    info = next((d for d in details if isinstance(d, error_details_pb2.ErrorInfo)), None)
    cls = _BY_CODE.get(code, OrderServiceError)
    error = cls(
        message,
        code=code,
        reason=info.reason if info is not None else "",
        domain=info.domain if info is not None else "",
        metadata=dict(info.metadata) if info is not None else None,
        details=details,
    )
    error.__cause__ = err
    return error
