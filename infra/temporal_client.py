"""How both processes reach Temporal: the connection settings, the client, and the SDK runtime.

The connection is read as the Temporal CLI reads it (temporalio.envconfig), our flags on top.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Self, TypeVar

from pydantic import PrivateAttr, SecretStr, model_validator
from temporalio.client import Client, Interceptor, PayloadLimitsConfig
from temporalio.converter import DataConverter
from temporalio.envconfig import (
    ClientConfigProfile,
    ClientConfigTLS,
    ClientConnectConfig,
    DataSource,
)
from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    MetricBuffer,
    MetricBufferDurationFormat,
    PrometheusConfig,
    Runtime,
    TelemetryConfig,
    TelemetryFilter,
)

from infra import codec
from infra.keys import Keys
from infra.settings import ExistingFile, Options, Text, secret_value, setting
from workflows.models import DEFAULT_TASK_QUEUE

DEFAULT_ADDRESS = "localhost:7233"
DEFAULT_NAMESPACE = "default"
CORE_LOGGER = "temporalio.core"
_T = TypeVar("_T")

_TLS_FILES = ("server_root_ca_cert", "client_cert", "client_private_key")


class TemporalSettings(Options):
    """Temporal connection: TOML profiles and TEMPORAL_* variables, as the Temporal CLI has them."""

    task_queue: Text = setting(
        DEFAULT_TASK_QUEUE, "ORDER_TASK_QUEUE", "task queue of the order workflows and activities"
    )
    temporal_address: Text | None = setting(
        None, "TEMPORAL_ADDRESS", "Temporal frontend host:port", shown=DEFAULT_ADDRESS
    )
    temporal_namespace: Text | None = setting(
        None, "TEMPORAL_NAMESPACE", "namespace", flags=["--namespace"], shown=DEFAULT_NAMESPACE
    )
    temporal_tls: bool | None = setting(
        None,
        "TEMPORAL_TLS",
        "TLS to Temporal; on by itself with an API key or any TLS setting",
        shown="off",
    )
    temporal_tls_ca_path: Path | None = setting(
        None,
        "TEMPORAL_TLS_SERVER_CA_CERT_PATH",
        "PEM file of the CA that signed Temporal's certificate",
        shown="the system's CAs",
    )
    temporal_tls_cert_path: Path | None = setting(
        None, "TEMPORAL_TLS_CLIENT_CERT_PATH", "PEM client certificate, for mutual TLS"
    )
    temporal_tls_key_path: Path | None = setting(
        None, "TEMPORAL_TLS_CLIENT_KEY_PATH", "PEM key of the client certificate"
    )
    temporal_tls_server_name: Text | None = setting(
        None,
        "TEMPORAL_TLS_SERVER_NAME",
        "name to verify Temporal's certificate against (and SNI), if not the address's host",
    )
    temporal_api_key: SecretStr | None = setting(
        None,
        "TEMPORAL_API_KEY",
        "API key, e.g. for Temporal Cloud; implies TLS. Prefer the variable: flags show in `ps`",
    )
    temporal_profile: Text | None = setting(
        None, "TEMPORAL_PROFILE", "profile of the TOML config file", shown="default"
    )
    temporal_config_file: ExistingFile | None = setting(
        None,
        "TEMPORAL_CONFIG_FILE",
        "TOML file of connection profiles",
        shown="~/.config/temporalio/temporal.toml, if there",
    )
    _profile: ClientConfigProfile = PrivateAttr(default_factory=ClientConfigProfile)

    @model_validator(mode="after")
    def _load_profile(self) -> Self:
        """The envconfig profile with the flags on top, checked once, here."""
        try:
            profile = ClientConfigProfile.load(
                self.temporal_profile, config_source=self.temporal_config_file
            )
        except RuntimeError as err:  # temporalio's ConfigError: no such profile, bad TOML
            raise ValueError(f"Temporal config: {err}") from None
        old = profile.tls or ClientConfigTLS()
        tls = ClientConfigTLS(
            disabled=old.disabled if self.temporal_tls is None else not self.temporal_tls,
            server_name=self.temporal_tls_server_name or _given(old.server_name),
            server_root_ca_cert=_file(self.temporal_tls_ca_path, old.server_root_ca_cert),
            client_cert=_file(self.temporal_tls_cert_path, old.client_cert),
            client_private_key=_file(self.temporal_tls_key_path, old.client_private_key),
        )
        if (tls.client_cert is None) != (tls.client_private_key is None):
            raise ValueError(
                "a TLS client certificate and its key go together: give both "
                "(--temporal-tls-cert-path and --temporal-tls-key-path)"
            )
        configured = any(getattr(tls, name) for name in ("server_name", *_TLS_FILES))
        if tls.disabled and configured:
            raise ValueError("Temporal TLS settings were given but TLS is turned off")
        self._profile = dataclasses.replace(
            profile,
            address=self.temporal_address or _given(profile.address) or DEFAULT_ADDRESS,
            namespace=self.temporal_namespace or _given(profile.namespace) or DEFAULT_NAMESPACE,
            api_key=secret_value(self.temporal_api_key) or _given(profile.api_key),
            tls=tls if configured or tls.disabled is not None else None,
        )
        return self

    @property
    def temporal_connection(self) -> ClientConfigProfile:
        """Where Temporal is and how to authenticate, every source applied."""
        return self._profile

    def temporal_connect_config(self) -> ClientConnectConfig:
        """`Client.connect` keyword arguments, with the TLS files read now.

        Raises OSError naming the file that cannot be read.
        """
        try:
            config = self._profile.to_client_connect_config()
        except OSError as err:
            raise OSError(f"cannot read a Temporal TLS file: {err}") from err
        # Explicit, so that a profile without TLS stays plain text whatever the SDK's default.
        config.setdefault("tls", False)
        return config

    def describe_temporal(self) -> str:
        """For log lines: never the API key, only whether there is one."""
        profile = self._profile
        tls = profile.tls
        security = "plain text"
        if (tls is not None and not tls.disabled) or (tls is None and profile.api_key):
            security = "mTLS" if tls is not None and tls.client_cert else "TLS"
        if profile.api_key:
            security += ", API key"
        return f"{profile.address} (namespace {profile.namespace}, {security})"


# Well above an order's state (about 1 KiB; 16 KiB with 100 items), well below
# the server's memo limit (2 MiB by default).
MEMO_WARN_SIZE = 64 * 1024
# Core drops metric updates past this many between two drains (two or three per Temporal call).
METRIC_BUFFER_SIZE = 100_000


def _given(value: _T) -> _T | None:
    """None for what the CLI's variables leave when set empty ("" or the path ".")."""
    return None if value in ("", Path(".")) else value


def _file(flag: Path | None, profile: DataSource | None) -> DataSource | None:
    if flag is not None:
        return flag
    return _given(profile)


async def connect(
    settings: TemporalSettings,
    *,
    keys: Keys | None = None,
    lazy: bool = False,
    runtime: Runtime | None = None,
    config: ClientConnectConfig | None = None,
    interceptors: Sequence[Interceptor] = (),
) -> Client:
    """A client for the settings; lazy clients connect on first use (not for workers).

    With `keys` every payload is encrypted (infra/codec.py): the server and the
    worker always give them; without, payloads are read and written as they are
    (tests looking at raw histories). `config`: the settings' connect config, read already.
    `interceptors` (tracing's, infra/tracing.py) apply to a worker made with this client too.
    """
    return await Client.connect(
        **(config if config is not None else settings.temporal_connect_config()),
        lazy=lazy,
        runtime=runtime,
        interceptors=interceptors,
        data_converter=DataConverter.default if keys is None else codec.data_converter(keys),
        # Orders keep their state in the memo (docs/decisions/0016): a few KiB is
        # normal here, not the misuse the SDK's 2 KiB warning is for.
        payload_limits=PayloadLimitsConfig(memo_warn_size=MEMO_WARN_SIZE),
    )


def bind_address(host: str, port: int) -> str:
    """ip:port as Core wants it (it parses a socket address, not a name), IPv6 bracketed.

    A host name is resolved here, to its first address; OSError if it does not resolve.
    """
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise OSError(f"cannot resolve the metrics host {host!r}: {err}") from err
        ip = ipaddress.ip_address(found[0][4][0])
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def metric_buffer() -> MetricBuffer:
    """Where a runtime records its metrics for the process to export itself (the server's /metrics).

    Durations in seconds, as Prometheus has them; room for thousands of RPCs between two drains.
    """
    return MetricBuffer(METRIC_BUFFER_SIZE, MetricBufferDurationFormat.SECONDS)


def new_runtime(
    *, metrics_address: str | None = None, metrics: MetricBuffer | None = None
) -> Runtime:
    """A runtime forwarding Core's logs to Python logging; its metrics served on an address, or
    recorded into a buffer (`metric_buffer`), or neither.

    Raises OSError if the metrics address cannot be bound.
    """
    telemetry = TelemetryConfig(
        # The SDK's default levels: Core warnings, other crates' errors.
        logging=LoggingConfig(
            filter=TelemetryFilter(core_level="WARN", other_level="ERROR"),
            forwarding=LogForwardingConfig(logger=logging.getLogger(CORE_LOGGER)),
        ),
        metrics=PrometheusConfig(bind_address=metrics_address) if metrics_address else metrics,
    )
    try:
        return Runtime(telemetry=telemetry)
    except Exception as err:  # Core reports a failed bind as a plain exception
        if metrics_address is None:
            raise
        raise OSError(f"cannot serve Temporal metrics on {metrics_address}: {err}") from err
