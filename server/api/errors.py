"""The service's error vocabulary (AIP-193), and `translate`: any exception to one ServiceError."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TypeAlias

import grpc
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from temporalio.client import WorkflowQueryFailedError, WorkflowQueryRejectedError
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from infra import codec
from workflows import models
from workflows.rules import Refusal, RefusalKind

# (googleapis-common-protos ships .pyi files but no py.typed marker, so mypy sees
# google.rpc and google.type as untyped: hence the ignores on those imports.)

logger = logging.getLogger(__name__)

ERROR_DOMAIN = "orders.acme.example"
ORDER_RESOURCE_TYPE = "acme.orders.v1.Order"

# grpc-status-details-bin is a trailer, and clients refuse trailers beyond
# 8 KiB by default, so a BadRequest carries at most this many violations.
MAX_FIELD_VIOLATIONS = 25

FieldViolation: TypeAlias = error_details_pb2.BadRequest.FieldViolation


class ServiceError(Exception):
    """An error returned to the caller as a google.rpc.Status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = dict(metadata or {})

    def details(self) -> Sequence[Message]:
        """The detail messages besides ErrorInfo, which every error carries."""
        return []

    def to_status_proto(self) -> status_pb2.Status:
        status = status_pb2.Status(code=code_pb2.Code.Value(self.code.name), message=self.message)
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        for detail in [info, *self.details()]:
            status.details.add().Pack(detail)
        return status

    def to_grpc_status(self) -> grpc.Status:
        """The rich status: code, message and details in grpc-status-details-bin."""
        status: grpc.Status = rpc_status.to_status(self.to_status_proto())
        return status


class InvalidArgument(ServiceError):
    """INVALID_ARGUMENT with a BadRequest listing every field violation."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(
        self,
        violations: Sequence[error_details_pb2.BadRequest.FieldViolation],
        *,
        reason: str = "INVALID_ARGUMENT",
    ) -> None:
        if not violations:
            raise ValueError("InvalidArgument needs at least one violation")
        self.violations = list(violations)
        self.reason = reason
        first = self.violations[0]
        message = f"Invalid request: {first.field}: {first.description}"
        if len(self.violations) > 1:
            message += f" (and {len(self.violations) - 1} more; see the BadRequest details)"
        super().__init__(message, metadata={"violationCount": str(len(self.violations))})

    def details(self) -> Sequence[Message]:
        return [
            error_details_pb2.BadRequest(field_violations=self.violations[:MAX_FIELD_VIOLATIONS])
        ]


class _AboutAnOrder(ServiceError):
    """An error about one order, with a ResourceInfo naming it."""

    message_format = "Order {}."
    description = ""

    def __init__(self, order_id: str) -> None:
        self.order_id = order_id
        super().__init__(self.message_format.format(order_id), metadata={"orderId": order_id})

    def details(self) -> Sequence[Message]:
        return [
            error_details_pb2.ResourceInfo(
                resource_type=ORDER_RESOURCE_TYPE,
                resource_name=self.order_id,
                description=self.description,
            )
        ]


class OrderNotFound(_AboutAnOrder):
    """NOT_FOUND: a well-formed order id that no workflow has."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "ORDER_NOT_FOUND"
    message_format = "Order {} not found."
    description = "No order with this id exists."


class OrderAlreadyExists(_AboutAnOrder):
    """ALREADY_EXISTS: an order id is taken (80 random bits: practically never)."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ORDER_ALREADY_EXISTS"
    message_format = "Order {} already exists; retry to get a new order id."
    description = "An order with this id already exists."


class OrderStateForbids(ServiceError):
    """FAILED_PRECONDITION: the order's status does not allow the call.

    `why` completes "The order ...", e.g. "has shipped and can no longer be cancelled".
    """

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "ORDER_STATE_FORBIDS"

    def __init__(self, order_id: str, status: models.OrderStatus | None, why: str) -> None:
        self.order_id = order_id
        self.status = status
        metadata = {"orderId": order_id}
        self.description = f"The order {why}"
        if status is not None:
            metadata["orderStatus"] = status.value
            self.description += f" (current status: {status.value})"
        self.description += "."
        super().__init__(f"Order {order_id} {why}.", metadata=metadata)

    def details(self) -> Sequence[Message]:
        return [
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type="ORDER_STATUS",
                        subject=f"orders/{self.order_id}",
                        description=self.description,
                    )
                ]
            )
        ]


class TemporalUnavailable(ServiceError):
    """UNAVAILABLE: Temporal cannot be reached or no worker answers; worth a retry."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "TEMPORAL_UNAVAILABLE"
    retry_delay = timedelta(seconds=2)

    def details(self) -> Sequence[Message]:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromTimedelta(self.retry_delay)
        return [info]


class ServerShuttingDown(TemporalUnavailable):
    """UNAVAILABLE: this server is stopping; the same call to another instance (or later) works."""

    reason = "SERVER_SHUTTING_DOWN"
    retry_delay = timedelta(seconds=1)

    def __init__(self) -> None:
        super().__init__("The server is shutting down. Retry the call.")


class InternalError(ServiceError):
    """INTERNAL: a bug or a misconfiguration; the message deliberately says nothing more."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"

    def __init__(self) -> None:
        super().__init__("Internal error. It has been logged; please retry later.")


def field_violation(field: str, description: str, reason: str) -> FieldViolation:
    return FieldViolation(field=field, description=description, reason=reason)


def refused(order_id: str, status: models.OrderStatus, refusal: Refusal) -> ServiceError:
    """What the caller gets for a payment or cancel the order refuses (workflows/rules.py)."""
    if refusal.kind == RefusalKind.AMOUNT_MISMATCH:
        return InvalidArgument(
            [field_violation("amount", f"{refusal.reason}.", "AMOUNT_MISMATCH")],
            reason="PAYMENT_AMOUNT_MISMATCH",
        )
    return OrderStateForbids(order_id, status, refusal.why)


UNREACHABLE_MESSAGE = "The order backend (Temporal) cannot be reached. Retry later."
TIMEOUT_MESSAGE = (
    "The order backend did not answer in time: Temporal is down or overloaded, "
    "or no order worker is running. Retry later."
)


def _has_detail(err: RPCError, name: str) -> bool:
    """Whether Temporal attached a temporal.api.errordetails.v1.<name> to the error."""
    try:
        details = err.grpc_status.details
    except Exception:  # an unparsable status has no details worth reading
        return False
    return any(detail.type_url.endswith(f".{name}") for detail in details)


def _translate_rpc_error(err: RPCError, order_id: str) -> ServiceError:
    if err.status == RPCStatusCode.NOT_FOUND:
        if _has_detail(err, "NamespaceNotFoundFailure"):
            logger.error("Temporal namespace not found, check --namespace: %s", err.message)
            return InternalError()
        if order_id:
            return OrderNotFound(order_id)
    elif err.status == RPCStatusCode.UNAVAILABLE:
        return TemporalUnavailable(UNREACHABLE_MESSAGE)
    elif err.status == RPCStatusCode.RESOURCE_EXHAUSTED:  # Temporal's rate limits
        return TemporalUnavailable("The order backend is overloaded. Retry later.")
    elif err.status in (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED):
        # The core client reports its own rpc_timeout as CANCELLED "Timeout expired";
        # a query to a workflow whose worker is down ends this way.
        return TemporalUnavailable(TIMEOUT_MESSAGE)
    elif err.status == RPCStatusCode.FAILED_PRECONDITION and _has_detail(
        err, "WorkflowNotReadyFailure"
    ):
        # No worker has run the workflow's first task yet, so it cannot answer queries.
        return TemporalUnavailable(
            "The order is not ready to be read yet: no order worker has picked it up. Retry later."
        )
    logger.error("Unexpected Temporal error %s: %s", err.status.name, err.message, exc_info=err)
    return InternalError()


def translate(exc: BaseException, *, order_id: str = "") -> ServiceError:
    """Maps any exception raised while serving an RPC to the ServiceError to return.

    order_id is the order the failed call was about, if any: a NOT_FOUND from
    Temporal then means that order does not exist.
    """
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, RPCError):
        return _translate_rpc_error(exc, order_id)
    if isinstance(exc, TimeoutError):
        # Our own cap on a Temporal call (asyncio.timeout): the core client's
        # retries of a refused connection outlast its per-attempt rpc_timeout.
        return TemporalUnavailable(TIMEOUT_MESSAGE)
    if isinstance(exc, RuntimeError) and str(exc).startswith("Failed client connect"):
        # The lazy client connects on first use and raises this while Temporal is down.
        return TemporalUnavailable(UNREACHABLE_MESSAGE)
    if isinstance(exc, WorkflowAlreadyStartedError) and order_id:
        return OrderAlreadyExists(order_id)
    if isinstance(exc, codec.UndecryptablePayload):
        # A key missing from this server's ring (docs/decisions/0017): one line naming
        # the key id is what the operator needs; a traceback adds nothing.
        logger.error("Order %s cannot be decrypted here: %s", order_id, exc)
        return InternalError()
    if isinstance(exc, WorkflowQueryFailedError | WorkflowQueryRejectedError):
        # The workflow's query handler failed or does not exist: a worker-side
        # bug or a worker/server version mismatch, never the caller's doing.
        logger.error("Order %s: query failed in the workflow: %s", order_id, exc, exc_info=exc)
        return InternalError()
    logger.error("Unexpected error for order %r", order_id, exc_info=exc)
    return InternalError()
