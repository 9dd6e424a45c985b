"""The server's settings: command-line flags, each with an environment fallback.

A flag wins over its environment variable, which wins over the default, so
`make server` works with no flags and a container can be configured by
environment alone. A bad value exits with status 2 and names its source.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, TypeVar

from workflows import models

_T = TypeVar("_T")

# One or more <integer><unit> parts, as in Go's time.ParseDuration: "24h", "1h30m", "500ms".
_DURATION_PART = re.compile(r"(\d+)(ms|d|h|m|s)")
_UNIT_MILLISECONDS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


@dataclass(frozen=True)
class ServerConfig:
    """Everything `start_server` needs; the defaults are those of `make run`."""

    host: str = "localhost"
    # 0 asks the OS for a free port; OrderServer.port tells which one it chose.
    port: int = 50051
    temporal_address: str = "localhost:7233"
    namespace: str = "default"
    task_queue: str = models.DEFAULT_TASK_QUEUE
    # How long a new order waits for its payment before the workflow cancels it.
    payment_timeout_seconds: int = models.DEFAULT_PAYMENT_TIMEOUT_SECONDS
    # The cap on each Temporal call; an RPC's own deadline can shorten it further.
    temporal_rpc_timeout: timedelta = timedelta(seconds=10)


def parse_duration(text: str) -> timedelta:
    """Parses "24h", "90s", "30m", "1h30m", "500ms" or "2d"; a bare integer means seconds.

    Raises ValueError unless the text is a positive duration.
    """
    cleaned = text.strip().lower()
    if cleaned.isdigit():
        cleaned += "s"
    position = 0
    milliseconds = 0
    for match in _DURATION_PART.finditer(cleaned):
        if match.start() != position:
            break
        milliseconds += int(match.group(1)) * _UNIT_MILLISECONDS[match.group(2)]
        position = match.end()
    if not cleaned or position != len(cleaned):
        raise ValueError(
            f"invalid duration {text!r}: use a number with a unit, e.g. 24h, 90s, 30m, 1h30m"
        )
    if milliseconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be greater than zero")
    return timedelta(milliseconds=milliseconds)


def format_duration(duration: timedelta) -> str:
    """The inverse of parse_duration, for help texts and logs: 5400 s is "1h30m"."""
    milliseconds = duration // timedelta(milliseconds=1)
    parts = []
    for unit in ("h", "m", "s", "ms"):
        count, milliseconds = divmod(milliseconds, _UNIT_MILLISECONDS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def _parse_whole_seconds(text: str) -> int:
    """A duration that must be a whole number of seconds (the workflow's timer unit)."""
    duration = parse_duration(text)
    if duration % timedelta(seconds=1):
        raise ValueError(f"invalid duration {text!r}: must be a whole number of seconds")
    return int(duration.total_seconds())


def _parse_port(text: str) -> int:
    try:
        port = int(text.strip())
    except ValueError:
        raise ValueError(f"invalid port {text!r}: must be an integer") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"invalid port {text!r}: must be 0 to 65535 (0 picks a free port)")
    return port


def _parse_nonempty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


@dataclass(frozen=True)
class _Setting(Generic[_T]):
    """One setting: its flag, its environment variable and how to parse either."""

    flag: str
    env: str
    parse: Callable[[str], _T]
    help: str

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


_HOST = _Setting("--host", "ORDER_SERVICE_HOST", _parse_nonempty, "address to listen on")
_PORT = _Setting("--port", "ORDER_SERVICE_PORT", _parse_port, "port; 0 picks a free one")
_TEMPORAL_ADDRESS = _Setting(
    "--temporal-address", "TEMPORAL_ADDRESS", _parse_nonempty, "Temporal frontend host:port"
)
_NAMESPACE = _Setting("--namespace", "TEMPORAL_NAMESPACE", _parse_nonempty, "Temporal namespace")
_TASK_QUEUE = _Setting(
    "--task-queue", "ORDER_TASK_QUEUE", _parse_nonempty, "task queue of the order workers"
)
_PAYMENT_TIMEOUT = _Setting(
    "--payment-timeout",
    "ORDER_PAYMENT_TIMEOUT",
    _parse_whole_seconds,
    "how long an order waits for its payment, e.g. 24h, 30m, 90s",
)
_TEMPORAL_RPC_TIMEOUT = _Setting(
    "--temporal-rpc-timeout",
    "ORDER_TEMPORAL_RPC_TIMEOUT",
    parse_duration,
    "cap on each Temporal call, e.g. 10s, 500ms",
)
_DEFAULTS = ServerConfig()
# Each setting with the default it shows in --help.
_SETTINGS: list[tuple[_Setting[Any], object]] = [
    (_HOST, _DEFAULTS.host),
    (_PORT, _DEFAULTS.port),
    (_TEMPORAL_ADDRESS, _DEFAULTS.temporal_address),
    (_NAMESPACE, _DEFAULTS.namespace),
    (_TASK_QUEUE, _DEFAULTS.task_queue),
    (_PAYMENT_TIMEOUT, format_duration(timedelta(seconds=_DEFAULTS.payment_timeout_seconds))),
    (_TEMPORAL_RPC_TIMEOUT, format_duration(_DEFAULTS.temporal_rpc_timeout)),
]


def _argparse_type(parse: Callable[[str], _T]) -> Callable[[str], _T]:
    """Adapts a parser so argparse reports its ValueError text, not just "invalid value"."""

    def convert(text: str) -> _T:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="The acme.orders.v1.OrderService gRPC server, in front of Temporal.",
    )
    for setting, default in _SETTINGS:
        parser.add_argument(
            setting.flag,
            dest=setting.dest,
            type=_argparse_type(setting.parse),
            # None means "not given", so the environment variable can fill in.
            default=None,
            help=f"{setting.help} (env {setting.env}; default {default})",
        )
    return parser


def from_args(argv: Sequence[str] | None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """The configuration from flags, then environment variables, then defaults.

    Exits with status 2 and a message naming the flag or variable on a bad value.
    """
    env = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)

    def resolve(setting: _Setting[_T], default: _T) -> _T:
        given: _T | None = getattr(args, setting.dest)
        if given is not None:
            return given
        text = env.get(setting.env, "")
        if text == "":
            return default
        try:
            return setting.parse(text)
        except ValueError as err:
            parser.error(f"environment variable {setting.env}: {err}")

    return ServerConfig(
        host=resolve(_HOST, _DEFAULTS.host),
        port=resolve(_PORT, _DEFAULTS.port),
        temporal_address=resolve(_TEMPORAL_ADDRESS, _DEFAULTS.temporal_address),
        namespace=resolve(_NAMESPACE, _DEFAULTS.namespace),
        task_queue=resolve(_TASK_QUEUE, _DEFAULTS.task_queue),
        payment_timeout_seconds=resolve(_PAYMENT_TIMEOUT, _DEFAULTS.payment_timeout_seconds),
        temporal_rpc_timeout=resolve(_TEMPORAL_RPC_TIMEOUT, _DEFAULTS.temporal_rpc_timeout),
    )
