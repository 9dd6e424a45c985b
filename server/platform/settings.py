"""The server's settings: one model, a flag and an environment variable for each field."""

from __future__ import annotations

from datetime import timedelta
from typing import ClassVar, Self

from pydantic import model_validator

from infra.keys import KeySettings
from infra.logs import LogSettings
from infra.settings import (
    Duration,
    ExistingFile,
    Options,
    Port,
    ProcessSettings,
    Text,
    WholeSeconds,
    setting,
)
from infra.temporal_client import TemporalSettings
from server.platform import tls, tokens
from server.platform.jwt_auth import JwtSettings
from server.platform.limits import LimitSettings
from workflows import models


class ServiceSettings(Options):
    """The OrderService."""

    host: Text = setting("localhost", "ORDER_SERVICE_HOST", "address to listen on")
    port: Port = setting(50051, "ORDER_SERVICE_PORT", "port; 0 picks a free one")
    payment_timeout: WholeSeconds = setting(
        timedelta(seconds=models.DEFAULT_PAYMENT_TIMEOUT_SECONDS),
        "ORDER_PAYMENT_TIMEOUT",
        "how long an order waits for its payment, e.g. 24h, 30m, 90s",
    )
    temporal_rpc_timeout: Duration = setting(
        timedelta(seconds=10),
        "ORDER_TEMPORAL_RPC_TIMEOUT",
        "cap on each Temporal call, e.g. 10s, 500ms; an RPC's own deadline can shorten it",
    )
    metrics_port: Port | None = setting(
        None,
        "ORDER_METRICS_PORT",
        "serve Prometheus metrics at http://<metrics host>:<port>/metrics; 0 picks a free port",
        shown="none: no metrics",
    )
    metrics_host: Text | None = setting(
        None, "ORDER_METRICS_HOST", "address the metrics listen on", shown="the --host"
    )

    @property
    def payment_timeout_seconds(self) -> int:
        return int(self.payment_timeout.total_seconds())


class SecuritySettings(Options):
    """Security: TLS, bearer tokens, reflection."""

    tls_cert: ExistingFile | None = setting(
        None, "ORDER_TLS_CERT", "PEM certificate chain: serve TLS (needs --tls-key)", shown="none"
    )
    tls_key: ExistingFile | None = setting(None, "ORDER_TLS_KEY", "PEM private key of --tls-cert")
    tls_client_ca: ExistingFile | None = setting(
        None,
        "ORDER_TLS_CLIENT_CA",
        "PEM CA bundle: require client certificates it signed (mutual TLS)",
    )
    auth_tokens_file: tokens.TokensFile | None = setting(
        None,
        "ORDER_AUTH_TOKENS_FILE",
        "TOML file of callers, their hashed bearer tokens and roles",
        shown="none: no tokens needed",
    )
    reflection: bool = setting(True, "ORDER_REFLECTION", "serve gRPC reflection: on or off")
    allow_insecure_remote: bool = setting(
        False,
        "ORDER_ALLOW_INSECURE_REMOTE",
        "allow plain text on a non-loopback --host (when something else encrypts)",
    )

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None


class ServerSettings(
    ProcessSettings,
    ServiceSettings,
    TemporalSettings,
    SecuritySettings,
    JwtSettings,
    LimitSettings,
    KeySettings,
    LogSettings,
):
    """Every setting of `python -m server`."""

    prog: ClassVar[str] = "python -m server"
    description: ClassVar[str] = (
        "The acme.orders.v1.OrderService gRPC server, in front of Temporal."
    )

    @model_validator(mode="after")
    def _check_security(self) -> Self:
        """The TLS settings fit together and plain text stays on loopback unless allowed."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS")
        if self.tls_cert is not None and self.tls_key is not None:
            tls.check_files(self.tls_cert, self.tls_key, self.tls_client_ca)
        tls.check_plaintext_host(
            self.host, tls=self.tls_enabled, allow_insecure_remote=self.allow_insecure_remote
        )
        return self
