"""The gRPC server's Prometheus series, named as go-grpc-prometheus names them; the endpoint."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

# Prometheus' default buckets, then longer ones for streams and slow Temporal calls.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

_LABELS = ("grpc_type", "grpc_service", "grpc_method")


class GrpcServerMetrics:
    """The series of one server, in a registry of its own.

    A registry per server rather than the global one: several servers in one
    process (the tests) each count their own RPCs. It holds the process's own
    series too (CPU, memory, open files, GC, Python version).
    """

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.started = Counter(
            "grpc_server_started",
            "Total number of RPCs started on the server.",
            _LABELS,
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*_LABELS, "grpc_code"),
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been "
            "application-level handled by the server.",
            _LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def started_rpc(self, labels: tuple[str, str, str]) -> None:
        self.started.labels(*labels).inc()

    def handled_rpc(
        self, labels: tuple[str, str, str], code: grpc.StatusCode, seconds: float
    ) -> None:
        self.handled.labels(*labels, code.name).inc()
        self.handling_seconds.labels(*labels).observe(seconds)


@dataclass
class MetricsEndpoint:
    """A running endpoint; `port` is the bound one (the chosen one when asked for 0)."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    async def stop(self) -> None:
        # shutdown() waits for the serving loop's next poll: off the event loop.
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint:
    """Starts serving on a thread of its own; raises OSError if host:port cannot be bound."""
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise OSError(f"cannot serve metrics on {host}:{port}: {err.strerror or err}") from err
    return MetricsEndpoint(host=host, port=server.server_port, _server=server, _thread=thread)
