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
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Generic, TypeVar

from infra import logs, temporal_connection
from infra.temporal_connection import TemporalConnection
from server import tls, tokens
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
    # Address, namespace, TLS and API key of Temporal (infra/temporal_connection.py).
    temporal: TemporalConnection = field(default_factory=TemporalConnection)
    task_queue: str = models.DEFAULT_TASK_QUEUE
    # How long a new order waits for its payment before the workflow cancels it.
    payment_timeout_seconds: int = models.DEFAULT_PAYMENT_TIMEOUT_SECONDS
    # The cap on each Temporal call; an RPC's own deadline can shorten it further.
    temporal_rpc_timeout: timedelta = timedelta(seconds=10)
    # Prometheus metrics at http://<metrics_host>:<metrics_port>/metrics; None: not served,
    # 0: a free port (OrderServer.metrics_port). The host defaults to `host`.
    metrics_port: int | None = None
    metrics_host: str | None = None
    # For `python -m server`: text or JSON lines, and the level (infra/logs.py).
    log: logs.LogSettings = field(default_factory=logs.LogSettings)
    # TLS with a PEM certificate chain and its key; a client CA makes it mutual TLS.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Callers and their hashed bearer tokens (server/tokens.py); None: no tokens needed.
    auth_tokens_file: Path | None = None
    reflection: bool = True
    # Plain text on a non-loopback address, for when something else encrypts (a mesh).
    allow_insecure_remote: bool = False

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None


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


def _parse_file(text: str) -> Path:
    path = Path(_parse_nonempty(text)).expanduser()
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    return path


def _parse_tokens_file(text: str) -> Path:
    """A tokens file, read once here so a mistake in it stops the server before it starts."""
    path = _parse_file(text)
    tokens.load(path)
    return path


_ON = {"on", "true", "yes", "1"}
_OFF = {"off", "false", "no", "0"}


def _parse_switch(text: str) -> bool:
    cleaned = text.strip().lower()
    if cleaned not in _ON | _OFF:
        raise ValueError(f"invalid value {text!r}: use on or off (true/false, yes/no, 1/0)")
    return cleaned in _ON


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
_METRICS_PORT: _Setting[int | None] = _Setting(
    "--metrics-port",
    "ORDER_METRICS_PORT",
    _parse_port,
    "serve Prometheus metrics at http://<metrics host>:<port>/metrics; 0 picks a free port",
)
_METRICS_HOST: _Setting[str | None] = _Setting(
    "--metrics-host", "ORDER_METRICS_HOST", _parse_nonempty, "address the metrics listen on"
)
_TLS_CERT: _Setting[Path | None] = _Setting(
    "--tls-cert",
    "ORDER_TLS_CERT",
    _parse_file,
    "PEM certificate chain: serve TLS (needs --tls-key)",
)
_TLS_KEY: _Setting[Path | None] = _Setting(
    "--tls-key", "ORDER_TLS_KEY", _parse_file, "PEM private key of --tls-cert"
)
_TLS_CLIENT_CA: _Setting[Path | None] = _Setting(
    "--tls-client-ca",
    "ORDER_TLS_CLIENT_CA",
    _parse_file,
    "PEM CA bundle: require client certificates it signed (mutual TLS)",
)
_AUTH_TOKENS_FILE: _Setting[Path | None] = _Setting(
    "--auth-tokens-file",
    "ORDER_AUTH_TOKENS_FILE",
    _parse_tokens_file,
    "TOML file of callers, their hashed bearer tokens and roles; unset: no tokens needed",
)
_REFLECTION = _Setting(
    "--reflection", "ORDER_REFLECTION", _parse_switch, "serve gRPC reflection: on or off"
)
# A switch without a value; its environment variable takes on/off, true/false.
_ALLOW_INSECURE_REMOTE = _Setting(
    "--allow-insecure-remote",
    "ORDER_ALLOW_INSECURE_REMOTE",
    _parse_switch,
    "allow plain text on a non-loopback --host (when something else encrypts)",
)
_DEFAULTS = ServerConfig()
# Each setting with the default it shows in --help.
_SETTINGS: list[tuple[_Setting[Any], object]] = [
    (_HOST, _DEFAULTS.host),
    (_PORT, _DEFAULTS.port),
    (_TASK_QUEUE, _DEFAULTS.task_queue),
    (_PAYMENT_TIMEOUT, format_duration(timedelta(seconds=_DEFAULTS.payment_timeout_seconds))),
    (_TEMPORAL_RPC_TIMEOUT, format_duration(_DEFAULTS.temporal_rpc_timeout)),
    (_METRICS_PORT, "none: no metrics"),
    (_METRICS_HOST, "the --host"),
    (_TLS_CERT, "none: plain text"),
    (_TLS_KEY, "none"),
    (_TLS_CLIENT_CA, "none: no client certificates"),
    (_AUTH_TOKENS_FILE, "none"),
    (_REFLECTION, "on"),
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
    parser.add_argument(
        _ALLOW_INSECURE_REMOTE.flag,
        dest=_ALLOW_INSECURE_REMOTE.dest,
        action="store_const",
        const=True,
        default=None,
        help=f"{_ALLOW_INSECURE_REMOTE.help} (env {_ALLOW_INSECURE_REMOTE.env}=true)",
    )
    temporal_connection.add_arguments(parser)
    logs.add_arguments(parser)
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

    try:
        temporal = temporal_connection.from_arguments(args, env)
        log = logs.from_arguments(args, env)
    except ValueError as err:
        parser.error(str(err))
    config = ServerConfig(
        host=resolve(_HOST, _DEFAULTS.host),
        port=resolve(_PORT, _DEFAULTS.port),
        temporal=temporal,
        task_queue=resolve(_TASK_QUEUE, _DEFAULTS.task_queue),
        payment_timeout_seconds=resolve(_PAYMENT_TIMEOUT, _DEFAULTS.payment_timeout_seconds),
        temporal_rpc_timeout=resolve(_TEMPORAL_RPC_TIMEOUT, _DEFAULTS.temporal_rpc_timeout),
        metrics_port=resolve(_METRICS_PORT, _DEFAULTS.metrics_port),
        metrics_host=resolve(_METRICS_HOST, _DEFAULTS.metrics_host),
        log=log,
        tls_cert=resolve(_TLS_CERT, _DEFAULTS.tls_cert),
        tls_key=resolve(_TLS_KEY, _DEFAULTS.tls_key),
        tls_client_ca=resolve(_TLS_CLIENT_CA, _DEFAULTS.tls_client_ca),
        auth_tokens_file=resolve(_AUTH_TOKENS_FILE, _DEFAULTS.auth_tokens_file),
        reflection=resolve(_REFLECTION, _DEFAULTS.reflection),
        allow_insecure_remote=resolve(_ALLOW_INSECURE_REMOTE, _DEFAULTS.allow_insecure_remote),
    )
    try:
        check_security(config)
    except ValueError as err:
        parser.error(str(err))
    return config


def check_security(config: ServerConfig) -> None:
    """Raises ValueError if the TLS settings do not fit together or would expose plain text."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together: give both or neither")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS")
    if config.tls_cert is not None and config.tls_key is not None:
        tls.check_files(config.tls_cert, config.tls_key, config.tls_client_ca)
    tls.check_plaintext_host(
        config.host, tls=config.tls_enabled, allow_insecure_remote=config.allow_insecure_remote
    )
