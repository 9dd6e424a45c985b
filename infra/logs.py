"""Logging for both processes: text lines for people, JSON lines for log pipelines.

`--log-format json` (ORDER_LOG_FORMAT=json) writes one JSON object per line
with time, level, logger and message, and, on every line about an order, its
order_id and workflow_id: in the server from the RPC being served (`rpc` too;
the servicer binds it with `bind_rpc`), in the worker from the activity or
workflow that logged it (the Temporal SDK knows which one is running).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TextIO, get_args

from temporalio import activity

from workflows import models

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = get_args(LogFormat)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

FORMAT_ENV = "ORDER_LOG_FORMAT"
LEVEL_ENV = "ORDER_LOG_LEVEL"

_FIELD_ORDER = (
    "rpc",
    "order_id",
    "workflow_id",
    "run_id",
    "workflow_type",
    "activity",
    "activity_id",
    "attempt",
)
# The order's workflow id is this prefix and the order id (models.workflow_id_for).
_WORKFLOW_ID_PREFIX = models.workflow_id_for("")


@dataclass(frozen=True)
class LogSettings:
    format: LogFormat = "text"
    level: str = "INFO"


# --- What a line is about --------------------------------------------------------


class RpcLogContext(Protocol):
    """The RPC being served, read when each line is written (the order id comes later)."""

    @property
    def rpc(self) -> str: ...

    @property
    def order_id(self) -> str: ...

    @property
    def workflow_id(self) -> str: ...


# grpc.aio serves each RPC in a task of its own, so a value set while serving
# one RPC is seen by its own lines only (and by tasks it starts).
_current_rpc: ContextVar[RpcLogContext | None] = ContextVar("order_rpc", default=None)


def bind_rpc(call: RpcLogContext) -> None:
    """Marks every line logged from here on in this task as about `call`."""
    _current_rpc.set(call)


def order_id_from_workflow_id(workflow_id: str) -> str | None:
    if workflow_id.startswith(_WORKFLOW_ID_PREFIX) and len(workflow_id) > len(_WORKFLOW_ID_PREFIX):
        return workflow_id.removeprefix(_WORKFLOW_ID_PREFIX)
    return None


def _temporal_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The workflow or activity a worker line comes from, as the Temporal SDK tells it.

    workflow.logger and activity.logger put `temporal_workflow` / `temporal_activity`
    on the record; lines from plain loggers inside an activity (ours) get the
    same from the running activity's context.
    """
    details: Mapping[str, Any] | None = getattr(record, "temporal_activity", None)
    if details is None and activity.in_activity():
        info = activity.info()
        details = {
            "activity_id": info.activity_id,
            "activity_type": info.activity_type,
            "attempt": info.attempt,
            "workflow_id": info.workflow_id,
            "workflow_run_id": info.workflow_run_id,
            "workflow_type": info.workflow_type,
        }
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
        if call.order_id:
            fields["order_id"] = call.order_id
            fields["workflow_id"] = call.workflow_id
    for key, value in _temporal_fields(record).items():
        if value is not None and value != "":
            fields.setdefault(key, value)
    workflow_id = fields.get("workflow_id")
    if "order_id" not in fields and isinstance(workflow_id, str):
        order_id = order_id_from_workflow_id(workflow_id)
        if order_id is not None:
            fields["order_id"] = order_id
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


def configure(settings: LogSettings, stream: TextIO | None = None) -> None:
    """Sends every logger's lines to `stream` (stderr) in the chosen format and level."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.addFilter(OrderContextFilter())
    handler.setFormatter(
        JsonFormatter() if settings.format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level)


# --- Flags and environment --------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Logging")
    group.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=None,
        help=f"text, or json for one JSON object per line (env {FORMAT_ENV}; default text)",
    )
    group.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        type=str.upper,
        default=None,
        help=f"lowest level logged (env {LEVEL_ENV}; default INFO)",
    )


def from_arguments(args: argparse.Namespace, env: Mapping[str, str]) -> LogSettings:
    """Flags, then ORDER_LOG_FORMAT / ORDER_LOG_LEVEL, then text at INFO.

    Raises ValueError naming the variable at fault.
    """
    log_format: str = args.log_format or env.get(FORMAT_ENV, "").strip().lower() or "text"
    if log_format not in LOG_FORMATS:
        raise ValueError(f"environment variable {FORMAT_ENV}: use one of {', '.join(LOG_FORMATS)}")
    level: str = args.log_level or env.get(LEVEL_ENV, "").strip().upper() or "INFO"
    if level not in LOG_LEVELS:
        raise ValueError(f"environment variable {LEVEL_ENV}: use one of {', '.join(LOG_LEVELS)}")
    return LogSettings(format=log_format, level=level)
