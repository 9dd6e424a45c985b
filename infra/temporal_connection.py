"""How the server and the worker reach Temporal: address, namespace, TLS, mTLS, API key.

The flags mirror the Temporal CLI's connection options, and the environment
variables are the CLI's own (`temporal options`), so one environment
configures `temporal`, `python -m server` and `python -m worker` alike. As in
the CLI, TLS turns on by itself when an API key or any TLS setting is given;
`--no-temporal-tls` (TEMPORAL_TLS=false) forces plain text, e.g. to a local
proxy that terminates TLS.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

from temporalio.client import Client
from temporalio.runtime import Runtime
from temporalio.service import TLSConfig

DEFAULT_ADDRESS = "localhost:7233"
DEFAULT_NAMESPACE = "default"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class TemporalConnection:
    """Where Temporal is and how to authenticate; the defaults are the local dev server."""

    address: str = DEFAULT_ADDRESS
    namespace: str = DEFAULT_NAMESPACE
    # None: on when an API key or any TLS setting is given, as the Temporal CLI does.
    tls: bool | None = None
    # PEM files: the CA to trust instead of the system's, and a client pair for mTLS.
    tls_ca_path: Path | None = None
    tls_cert_path: Path | None = None
    tls_key_path: Path | None = None
    # The name the server's certificate is checked against, and the SNI, when it
    # differs from the host dialled (e.g. through a load balancer).
    tls_server_name: str | None = None
    # Sent as "authorization: Bearer <key>"; repr=False keeps it out of logs and tracebacks.
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            raise ValueError("a TLS client certificate and its key go together: give both")
        if self.tls is False and self.has_tls_settings:
            raise ValueError("TLS settings were given but TLS is turned off")

    @property
    def has_tls_settings(self) -> bool:
        return any(
            value is not None
            for value in (
                self.tls_ca_path,
                self.tls_cert_path,
                self.tls_key_path,
                self.tls_server_name,
            )
        )

    @property
    def uses_tls(self) -> bool:
        if self.tls is not None:
            return self.tls
        return self.api_key is not None or self.has_tls_settings

    def describe(self) -> str:
        """For log lines: never the API key, only whether there is one."""
        security = "plain text"
        if self.uses_tls:
            security = "mTLS" if self.tls_cert_path is not None else "TLS"
        if self.api_key is not None:
            security += ", API key"
        return f"{self.address} (namespace {self.namespace}, {security})"


class ConnectOptions(TypedDict):
    """The keyword arguments of `Client.connect` that a TemporalConnection decides."""

    namespace: str
    tls: bool | TLSConfig
    api_key: str | None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise OSError(f"cannot read the Temporal {what} {path}: {err.strerror}") from err


def connect_options(connection: TemporalConnection) -> ConnectOptions:
    """`Client.connect` keyword arguments, with the TLS files read now.

    Raises OSError naming the file that cannot be read.
    """
    tls: bool | TLSConfig = connection.uses_tls
    if tls and connection.has_tls_settings:
        tls = TLSConfig(
            server_root_ca_cert=(
                _read(connection.tls_ca_path, "server CA certificate")
                if connection.tls_ca_path is not None
                else None
            ),
            client_cert=(
                _read(connection.tls_cert_path, "client certificate")
                if connection.tls_cert_path is not None
                else None
            ),
            client_private_key=(
                _read(connection.tls_key_path, "client key")
                if connection.tls_key_path is not None
                else None
            ),
            domain=connection.tls_server_name,
        )
    # tls is always explicit: False must stay plain text even with an API key.
    return ConnectOptions(namespace=connection.namespace, tls=tls, api_key=connection.api_key)


async def connect(
    connection: TemporalConnection, *, lazy: bool = False, runtime: Runtime | None = None
) -> Client:
    """A client for `connection`; lazy clients connect on first use (not for workers)."""
    return await Client.connect(
        connection.address, **connect_options(connection), lazy=lazy, runtime=runtime
    )


# --- Flags and environment -------------------------------------------------------


@dataclass(frozen=True)
class _Option:
    flags: tuple[str, ...]
    env: str
    help: str

    @property
    def dest(self) -> str:
        return "temporal_" + self.flags[-1].removeprefix("--temporal-").replace("-", "_")


_ADDRESS = _Option(("--temporal-address",), "TEMPORAL_ADDRESS", "Temporal frontend host:port")
_NAMESPACE = _Option(("--namespace", "--temporal-namespace"), "TEMPORAL_NAMESPACE", "namespace")
_TLS = _Option(
    ("--temporal-tls",),
    "TEMPORAL_TLS",
    "TLS to Temporal; on by itself with an API key or any TLS setting",
)
_CA = _Option(
    ("--temporal-tls-ca-path",),
    "TEMPORAL_TLS_SERVER_CA_CERT_PATH",
    "PEM file of the CA that signed Temporal's certificate; default: the system's CAs",
)
_CERT = _Option(
    ("--temporal-tls-cert-path",),
    "TEMPORAL_TLS_CLIENT_CERT_PATH",
    "PEM client certificate, for mutual TLS",
)
_KEY = _Option(
    ("--temporal-tls-key-path",),
    "TEMPORAL_TLS_CLIENT_KEY_PATH",
    "PEM key of the client certificate",
)
_SERVER_NAME = _Option(
    ("--temporal-tls-server-name",),
    "TEMPORAL_TLS_SERVER_NAME",
    "name to verify Temporal's certificate against (and SNI), if not the address's host",
)
_API_KEY = _Option(
    ("--temporal-api-key",),
    "TEMPORAL_API_KEY",
    "API key, e.g. for Temporal Cloud; implies TLS. Prefer the variable: flags show in `ps`",
)
OPTIONS = (_ADDRESS, _NAMESPACE, _TLS, _CA, _CERT, _KEY, _SERVER_NAME, _API_KEY)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the connection flags; `from_arguments` resolves them against the environment."""
    group = parser.add_argument_group(
        "Temporal connection", "Flags win over the variables (the Temporal CLI's own names)."
    )
    defaults = {_ADDRESS: DEFAULT_ADDRESS, _NAMESPACE: DEFAULT_NAMESPACE}
    for option in OPTIONS:
        shown = f"; default {defaults[option]}" if option in defaults else ""
        help_text = f"{option.help} (env {option.env}{shown})"
        # None means "not given", so the environment variable can fill in.
        if option is _TLS:
            group.add_argument(
                *option.flags,
                dest=option.dest,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            group.add_argument(
                *option.flags,
                dest=option.dest,
                default=None,
                metavar=option.env.removeprefix("TEMPORAL_"),
                help=help_text,
            )


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"invalid boolean {text!r}: use true or false")


def from_arguments(args: argparse.Namespace, env: Mapping[str, str]) -> TemporalConnection:
    """The connection from parsed flags, then environment variables, then defaults.

    Raises ValueError naming the flag or variable at fault.
    """

    def text(option: _Option) -> str | None:
        given: str | None = getattr(args, option.dest)
        source = option.flags[0]
        if given is None:
            # An empty variable counts as unset, as everywhere else in our settings.
            given, source = env.get(option.env) or None, f"environment variable {option.env}"
        if given is None:
            return None
        if not given.strip():
            raise ValueError(f"{source} must not be empty")
        return given.strip()

    def path(option: _Option) -> Path | None:
        value = text(option)
        return None if value is None else Path(value).expanduser()

    tls: bool | None = getattr(args, _TLS.dest)
    if tls is None and env.get(_TLS.env):
        try:
            tls = _parse_bool(env[_TLS.env])
        except ValueError as err:
            raise ValueError(f"environment variable {_TLS.env}: {err}") from None
    try:
        return TemporalConnection(
            address=text(_ADDRESS) or DEFAULT_ADDRESS,
            namespace=text(_NAMESPACE) or DEFAULT_NAMESPACE,
            tls=tls,
            tls_ca_path=path(_CA),
            tls_cert_path=path(_CERT),
            tls_key_path=path(_KEY),
            tls_server_name=text(_SERVER_NAME),
            api_key=text(_API_KEY),
        )
    except ValueError as err:
        raise ValueError(f"Temporal connection: {err}") from None
