"""Logging for both processes: text lines for people, JSON lines naming the RPC and the order."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TextIO

from temporalio import activity

from infra import tracing
from infra.settings import Lowercase, Options, Uppercase, setting
from workflows import models

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_FIELD_ORDER = (
    "rpc",
    "caller",
    "order_id",
    "workflow_id",
    "run_id",
    "workflow_type",
    "activity",
    "activity_id",
    "attempt",
    "trace_id",
    "span_id",
)
# The order's workflow id is this prefix and the order id (models.workflow_id_for).
_WORKFLOW_ID_PREFIX = models.workflow_id_for("")


class LogSettings(Options):
    """Logging."""

    log_format: Annotated[Literal["text", "json"], Lowercase] = setting(
        "text", "ORDER_LOG_FORMAT", "text, or json for one JSON object per line"
    )
    log_level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], Uppercase] = setting(
        "INFO", "ORDER_LOG_LEVEL", "lowest level logged: DEBUG, INFO, WARNING or ERROR"
    )


# --- What a line is about --------------------------------------------------------


@dataclass(frozen=True)
class RpcContext:
    """The RPC being served: every line it logs names it, and its order if the request has one."""

    rpc: str
    order_id: str = ""


# grpc.aio serves each RPC in a task of its own, so a value set while serving
# one RPC is seen by its own lines only (and by tasks it starts).
_current_rpc: ContextVar[RpcContext | None] = ContextVar("order_rpc", default=None)
# Who is calling (a tokens-file name, jwt:<hash>); "" where nothing authenticates. Set
# by the auth interceptor before the RPC's handler runs, in the RPC's own task.
_current_caller: ContextVar[str] = ContextVar("order_caller", default="")


def set_caller(name: str) -> None:
    """Names the caller of the RPC being served on every line it logs from here on."""
    _current_caller.set(name)


@contextmanager
def rpc_context(rpc: str, order_id: str = "") -> Iterator[None]:
    """Marks every line logged inside the block, in this task, as about this RPC."""
    token = _current_rpc.set(RpcContext(rpc, order_id))
    try:
        yield
    finally:
        _current_rpc.reset(token)


def order_id_from_workflow_id(workflow_id: str) -> str | None:
    """The order of an order's workflow, or of one of its email workflows ("<id>/email/...")."""
    order_id = workflow_id.removeprefix(_WORKFLOW_ID_PREFIX).partition("/")[0]
    return order_id if workflow_id.startswith(_WORKFLOW_ID_PREFIX) and order_id else None


def _temporal_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The workflow or activity a worker line comes from, as the Temporal SDK tells it.

    workflow.logger and activity.logger put `temporal_workflow` / `temporal_activity`
    on the record; lines from plain loggers inside an activity (ours) get the
    same from the running activity's context.
    """
    details: Mapping[str, Any] | None = getattr(record, "temporal_activity", None)
    if details is None and activity.in_activity():
        details = vars(activity.info())  # the same keys as the SDK's own
    if details is not None:
        return {
            "workflow_id": details.get("workflow_id"),
            "run_id": details.get("workflow_run_id"),
            "workflow_type": details.get("workflow_type"),
            "activity": details.get("activity_type"),
            "activity_id": details.get("activity_id"),
            "attempt": details.get("attempt"),
        }
    workflow: Mapping[str, Any] | None = getattr(record, "temporal_workflow", None)
    if workflow is not None:
        return {
            "workflow_id": workflow.get("workflow_id"),
            "run_id": workflow.get("run_id"),
            "workflow_type": workflow.get("workflow_type"),
        }
    return {}


def context_fields(record: logging.LogRecord) -> dict[str, Any]:
    """order_id, workflow_id and rpc / activity / workflow details of a line, when known."""
    fields: dict[str, Any] = {}
    call = _current_rpc.get()
    if call is not None:
        fields["rpc"] = call.rpc
        caller = _current_caller.get()
        if caller:
            fields["caller"] = caller
        if call.order_id:
            fields["order_id"] = call.order_id
            fields["workflow_id"] = models.workflow_id_for(call.order_id)
    for key, value in _temporal_fields(record).items():
        if value is not None and value != "":
            fields.setdefault(key, value)
    workflow_id = fields.get("workflow_id")
    if "order_id" not in fields and isinstance(workflow_id, str):
        order_id = order_id_from_workflow_id(workflow_id)
        if order_id is not None:
            fields["order_id"] = order_id
    fields.update(tracing.current_ids())  # the span current when the line was logged
    # The same order of keys on every line, the most useful first.
    return {key: fields[key] for key in _FIELD_ORDER if key in fields}


class OrderContextFilter(logging.Filter):
    """Puts `context_fields` on each record as `order_context`, while the context is current.

    A handler filter runs in the thread and task that logged the line, before
    any formatter, so the RPC or activity is still the one the line is about.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "order_context"):
            record.order_context = context_fields(record)
        return True


# --- Formats ----------------------------------------------------------------------


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, then `caller=<name>` on the lines of an RPC whose caller is known, and
    `trace_id=... span_id=...` on lines logged while a span was current."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        context: dict[str, Any] | None = getattr(record, "order_context", None)
        fields = context if context is not None else context_fields(record)
        caller = fields.get("caller")
        # The audit's and the auth refusals' messages name the caller themselves.
        if caller and f"caller={caller}" not in text:
            text += f" caller={caller}"
        if "trace_id" in fields:
            text += f" trace_id={fields['trace_id']} span_id={fields['span_id']}"
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the order's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context: dict[str, Any] | None = getattr(record, "order_context", None)
        entry.update(context if context is not None else context_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a field of an unexpected type must not lose the line.
        return json.dumps(entry, ensure_ascii=False, default=str)


def handler(log_format: str, stream: TextIO) -> logging.Handler:
    """Writes lines to `stream` as the processes do: "json" or text, with the order's context."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(OrderContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    return handler


def configure(settings: LogSettings, stream: TextIO | None = None) -> None:
    """Sends every logger's lines to `stream` (stderr) in the chosen format and level."""
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler(settings.log_format, sys.stderr if stream is None else stream))
    root.setLevel(settings.log_level)
    # Neither format shows where a line was logged from, nor its thread or process: not
    # looking them up saves a quarter of a line's cost, about 7 µs (logging HOWTO,
    # "Optimization"; docs/performance/README.md).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
