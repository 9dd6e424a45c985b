"""The Temporal SDK runtime of a process: where its Core logs and metrics go.

Core (the SDK's Rust engine) writes its own log lines to stderr by default,
which would break one-JSON-object-per-line logs: they are forwarded to the
Python logger `temporalio.core` instead, in whatever format logging has. With
a metrics address, Core serves its own Prometheus endpoint there (the
`temporal_*` series: requests to Temporal, workflow and activity task
latencies, slots, sticky cache, completed and failed workflows).
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    PrometheusConfig,
    Runtime,
    TelemetryConfig,
    TelemetryFilter,
)

CORE_LOGGER = "temporalio.core"


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


def new_runtime(*, metrics_address: str | None = None) -> Runtime:
    """A runtime forwarding Core's logs to Python logging; serving metrics if given an address.

    Raises OSError if the metrics address cannot be bound.
    """
    telemetry = TelemetryConfig(
        # The SDK's default levels: Core warnings, other crates' errors.
        logging=LoggingConfig(
            filter=TelemetryFilter(core_level="WARN", other_level="ERROR"),
            forwarding=LogForwardingConfig(logger=logging.getLogger(CORE_LOGGER)),
        ),
        metrics=PrometheusConfig(bind_address=metrics_address) if metrics_address else None,
    )
    try:
        return Runtime(telemetry=telemetry)
    except Exception as err:  # Core reports a failed bind as a plain exception
        if metrics_address is None:
            raise
        raise OSError(f"cannot serve Temporal metrics on {metrics_address}: {err}") from err
