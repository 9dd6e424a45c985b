"""server.errors: the statuses and details of each error, and the single translation."""

from __future__ import annotations

import logging
from typing import TypeVar

import grpc
import pytest
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from temporalio.api.common.v1 import GrpcStatus
from temporalio.api.errordetails.v1 import NamespaceNotFoundFailure, WorkflowNotReadyFailure
from temporalio.client import WorkflowQueryFailedError
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from infra import codec
from server.api import errors
from workflows import models

M = TypeVar("M", bound=Message)


def unpack(status: status_pb2.Status, kind: type[M]) -> M:
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            return message
    raise AssertionError(f"no {kind.DESCRIPTOR.name} in {status}")


def error_info(error: errors.ServiceError) -> error_details_pb2.ErrorInfo:
    info = unpack(error.to_status_proto(), error_details_pb2.ErrorInfo)
    assert info.domain == "orders.acme.example"
    return info


def rpc_error(status: RPCStatusCode, message: str = "boom", *details: Message) -> RPCError:
    packed = []
    for detail in details:
        any_detail = AnyProto()
        any_detail.Pack(detail)
        packed.append(any_detail)
    raw = GrpcStatus(code=int(status), message=message, details=packed).SerializeToString()
    return RPCError(message, status, raw)


def test_invalid_argument_carries_a_bad_request() -> None:
    error = errors.InvalidArgument(
        [
            errors.field_violation("items[2].price.nanos", "Out of range.", "OUT_OF_RANGE"),
            errors.field_violation("shipping_city", "Required.", "REQUIRED"),
        ]
    )
    status = error.to_status_proto()
    assert status.code == code_pb2.INVALID_ARGUMENT
    assert status.message == (
        "Invalid request: items[2].price.nanos: Out of range."
        " (and 1 more; see the BadRequest details)"
    )
    bad = unpack(status, error_details_pb2.BadRequest)
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [v.field for v in bad.field_violations] == ["items[2].price.nanos", "shipping_city"]
    assert error_info(error).reason == "INVALID_ARGUMENT"
    assert error_info(error).metadata["violationCount"] == "2"


def test_invalid_argument_caps_the_violations_it_sends() -> None:
    many = [errors.field_violation(f"items[{i}].quantity", "x", "R") for i in range(500)]
    error = errors.InvalidArgument(many)
    bad = unpack(error.to_status_proto(), error_details_pb2.BadRequest)
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert len(bad.field_violations) == errors.MAX_FIELD_VIOLATIONS
    assert error_info(error).metadata["violationCount"] == "500"
    # Well under the 8 KiB that clients accept in trailers.
    assert len(error.to_status_proto().SerializeToString()) < 4096


def test_invalid_argument_needs_a_violation() -> None:
    with pytest.raises(ValueError, match="at least one violation"):
        errors.InvalidArgument([])


def test_not_found_carries_resource_info() -> None:
    error = errors.OrderNotFound("ORD-1")
    status = error.to_status_proto()
    assert status.code == code_pb2.NOT_FOUND
    assert "ORD-1" in status.message
    info = unpack(status, error_details_pb2.ResourceInfo)
    assert isinstance(info, error_details_pb2.ResourceInfo)
    assert (info.resource_type, info.resource_name) == ("acme.orders.v1.Order", "ORD-1")
    assert error_info(error).reason == "ORDER_NOT_FOUND"


def test_failed_precondition_carries_the_status() -> None:
    error = errors.OrderStateForbids(
        "ORD-1", models.OrderStatus.SHIPPED, "has shipped and can no longer be cancelled"
    )
    status = error.to_status_proto()
    assert status.code == code_pb2.FAILED_PRECONDITION
    assert status.message == "Order ORD-1 has shipped and can no longer be cancelled."
    failure = unpack(status, error_details_pb2.PreconditionFailure)
    assert isinstance(failure, error_details_pb2.PreconditionFailure)
    [violation] = failure.violations
    assert (violation.type, violation.subject) == ("ORDER_STATUS", "orders/ORD-1")
    assert violation.description == (
        "The order has shipped and can no longer be cancelled (current status: shipped)."
    )
    assert error_info(error).reason == "ORDER_STATE_FORBIDS"
    assert error_info(error).metadata["orderStatus"] == "shipped"


def test_unavailable_suggests_a_retry_delay() -> None:
    error = errors.TemporalUnavailable(errors.UNREACHABLE_MESSAGE)
    status = error.to_status_proto()
    assert status.code == code_pb2.UNAVAILABLE
    retry = unpack(status, error_details_pb2.RetryInfo)
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.seconds == 2
    assert error_info(error).reason == "TEMPORAL_UNAVAILABLE"


def test_the_grpc_status_carries_the_details_in_the_trailer() -> None:
    status = errors.OrderNotFound("ORD-1").to_grpc_status()
    assert status.code == grpc.StatusCode.NOT_FOUND
    assert status.details == "Order ORD-1 not found."
    trailers = dict(status.trailing_metadata)
    decoded = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert decoded == errors.OrderNotFound("ORD-1").to_status_proto()
    assert rpc_status.to_status(decoded).code == grpc.StatusCode.NOT_FOUND


# --- translate ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (rpc_error(RPCStatusCode.NOT_FOUND, "workflow not found"), errors.OrderNotFound),
        (rpc_error(RPCStatusCode.UNAVAILABLE, "tcp connect error"), errors.TemporalUnavailable),
        (rpc_error(RPCStatusCode.RESOURCE_EXHAUSTED), errors.TemporalUnavailable),
        (rpc_error(RPCStatusCode.DEADLINE_EXCEEDED), errors.TemporalUnavailable),
        (rpc_error(RPCStatusCode.CANCELLED, "Timeout expired"), errors.TemporalUnavailable),
        (
            rpc_error(RPCStatusCode.FAILED_PRECONDITION, "not ready", WorkflowNotReadyFailure()),
            errors.TemporalUnavailable,
        ),
        (RuntimeError("Failed client connect: refused"), errors.TemporalUnavailable),
        (TimeoutError(), errors.TemporalUnavailable),
        (WorkflowAlreadyStartedError("order-ORD-1", "OrderWorkflow"), errors.OrderAlreadyExists),
    ],
)  # fmt: skip
def test_translate(exc: BaseException, expected: type[errors.ServiceError]) -> None:
    assert type(errors.translate(exc, order_id="ORD-1")) is expected


def test_not_found_names_the_order() -> None:
    error = errors.translate(rpc_error(RPCStatusCode.NOT_FOUND), order_id="ORD-42")
    assert isinstance(error, errors.OrderNotFound)
    assert error.order_id == "ORD-42"


def test_timeouts_and_refusals_say_so() -> None:
    timeout = errors.translate(rpc_error(RPCStatusCode.CANCELLED, "Timeout expired"))
    assert "did not answer in time" in timeout.message
    assert "no order worker" in timeout.message
    refused = errors.translate(RuntimeError("Failed client connect: refused"))
    assert "cannot be reached" in refused.message


def test_service_errors_pass_through() -> None:
    error = errors.OrderNotFound("ORD-1")
    assert errors.translate(error) is error


@pytest.mark.parametrize(
    "exc",
    [
        rpc_error(RPCStatusCode.PERMISSION_DENIED),
        rpc_error(RPCStatusCode.INVALID_ARGUMENT, "bad start request"),
        rpc_error(RPCStatusCode.FAILED_PRECONDITION, "something else"),
        WorkflowQueryFailedError("Query handler for 'get_full_state' expected but not found"),
        RuntimeError("some other runtime error"),
        ValueError("bug"),
        KeyError("bug"),
    ],
)  # fmt: skip
def test_everything_else_is_internal_and_logged(
    exc: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="server.errors"):
        error = errors.translate(exc, order_id="ORD-1")
    assert isinstance(error, errors.InternalError)
    assert error.to_status_proto().code == code_pb2.INTERNAL
    # The caller learns nothing about the cause; the log has it, traceback included.
    assert str(exc) not in error.message
    assert caplog.records
    assert caplog.records[-1].exc_info is not None


def test_a_payload_without_its_key_is_one_line_naming_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A key missing from the ring (docs/decisions/0017): INTERNAL, and a log line that
    names the key id, with no traceback."""
    exc = codec.UndecryptablePayload("no key 'k-2025' in this key ring")
    with caplog.at_level(logging.ERROR, logger="server.errors"):
        error = errors.translate(exc, order_id="ORD-1")
    assert isinstance(error, errors.InternalError)
    [record] = caplog.records
    assert "k-2025" in record.getMessage()
    assert "ORD-1" in record.getMessage()
    assert record.exc_info is None


def test_not_found_without_an_order_is_internal() -> None:
    assert isinstance(errors.translate(rpc_error(RPCStatusCode.NOT_FOUND)), errors.InternalError)


def test_a_missing_namespace_is_internal_not_an_unknown_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Temporal says NOT_FOUND for both; only the detail tells them apart."""
    exc = rpc_error(
        RPCStatusCode.NOT_FOUND, "Namespace nope is not found.", NamespaceNotFoundFailure()
    )
    with caplog.at_level(logging.ERROR, logger="server.errors"):
        error = errors.translate(exc, order_id="ORD-1")
    assert isinstance(error, errors.InternalError)
    assert "--namespace" in caplog.text
