"""The gRPC server's Prometheus series, named as go-grpc-prometheus names them, beside its
Temporal client's own (temporal_request, temporal_request_latency...); the endpoint."""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from temporalio.runtime import (
    BUFFERED_METRIC_KIND_COUNTER,
    BUFFERED_METRIC_KIND_HISTOGRAM,
    BufferedMetricUpdate,
    MetricBuffer,
)

logger = logging.getLogger(__name__)

# Prometheus' default buckets, then longer ones for streams and slow Temporal calls.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

_LABELS = ("grpc_type", "grpc_service", "grpc_method")
# How often the Temporal client's buffered metrics are drained between scrapes.
DRAIN_SECONDS = 1.0


class GrpcServerMetrics:
    """The series of one server, in a registry of its own.

    A registry per server rather than the global one: several servers in one
    process (the tests) each count their own RPCs. It holds the process's own
    series too (CPU, memory, open files, GC, Python version).
    """

    def __init__(self, temporal: MetricBuffer | None = None) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.temporal = TemporalClientMetrics(temporal) if temporal is not None else None
        if self.temporal is not None:
            registry.register(self.temporal)
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

    def drain(self) -> None:
        """Moves what the Temporal client recorded since the last drain into the series."""
        if self.temporal is not None:
            self.temporal.drain()


_Labels = tuple[tuple[str, str], ...]


@dataclass
class _Series:
    """One Temporal metric, every label set it was recorded with."""

    kind: int  # temporalio.runtime.BUFFERED_METRIC_KIND_*
    description: str
    values: dict[_Labels, float] = field(default_factory=dict)  # counters' totals, gauges' last
    buckets: dict[_Labels, list[int]] = field(default_factory=dict)  # histograms: per bucket
    sums: dict[_Labels, float] = field(default_factory=dict)


class TemporalClientMetrics(Collector):
    """The Temporal client's metrics, which Core records into a MetricBuffer, as Prometheus series.

    Core's own Prometheus exporter would need a port of its own; drained here, the
    series are on the server's one /metrics, in its conventions: counters end in
    `_total`, durations are seconds in LATENCY_BUCKETS (as Core's exporter names them
    with counters_total_suffix and durations_as_seconds; the worker's endpoint keeps
    Core's defaults). Label sets differ within a metric (GetSystemInfo has no
    namespace, failures a status_code), so the series are kept per label set rather
    than in fixed-label prometheus_client metrics.
    """

    def __init__(self, buffer: MetricBuffer) -> None:
        self._buffer = buffer
        self._series: dict[str, _Series] = {}
        # Drained every DRAIN_SECONDS by the endpoint's thread and on each scrape.
        self._lock = threading.Lock()

    def drain(self) -> None:
        with self._lock:
            for update in self._buffer.retrieve_updates():
                self._apply(update)

    def _apply(self, update: BufferedMetricUpdate) -> None:
        metric = update.metric
        series = self._series.get(metric.name)
        if series is None:
            series = self._series[metric.name] = _Series(metric.kind, metric.description or "")
        labels = _labels(update.attributes)
        if series.kind == BUFFERED_METRIC_KIND_COUNTER:
            series.values[labels] = series.values.get(labels, 0) + update.value
        elif series.kind == BUFFERED_METRIC_KIND_HISTOGRAM:
            counts = series.buckets.setdefault(labels, [0] * (len(LATENCY_BUCKETS) + 1))
            counts[bisect.bisect_left(LATENCY_BUCKETS, update.value)] += 1
            series.sums[labels] = series.sums.get(labels, 0) + update.value
        else:  # a gauge: the last value
            series.values[labels] = update.value

    def describe(self) -> Iterable[Metric]:
        return []  # names unknown until Core records them; no drain at registration

    def collect(self) -> Iterable[Metric]:
        self.drain()
        with self._lock:
            return [_family(name, series) for name, series in self._series.items()]


def _labels(attributes: Mapping[str, object]) -> _Labels:
    return tuple(sorted((key, str(value)) for key, value in attributes.items()))


def _family(name: str, series: _Series) -> Metric:
    if series.kind == BUFFERED_METRIC_KIND_COUNTER:
        family = Metric(name, series.description, "counter")
        for labels, value in series.values.items():
            family.add_sample(f"{name}_total", dict(labels), value)
    elif series.kind == BUFFERED_METRIC_KIND_HISTOGRAM:
        family = Metric(name, series.description, "histogram")
        for labels, counts in series.buckets.items():
            cumulative = 0
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                cumulative += count
                le = "+Inf" if bound == float("inf") else str(bound)
                family.add_sample(f"{name}_bucket", {**dict(labels), "le": le}, cumulative)
            family.add_sample(f"{name}_count", dict(labels), cumulative)
            family.add_sample(f"{name}_sum", dict(labels), series.sums[labels])
    else:
        family = Metric(name, series.description, "gauge")
        for labels, value in series.values.items():
            family.add_sample(name, dict(labels), value)
    return family


@dataclass
class MetricsEndpoint:
    """A running endpoint; `port` is the bound one (the chosen one when asked for 0)."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread
    _drainer: _Drainer | None = None

    async def stop(self) -> None:
        # shutdown() waits for the serving loop's next poll: off the event loop.
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()
        self._thread.join(timeout=5)
        if self._drainer is not None:
            await asyncio.to_thread(self._drainer.stop)


class _Drainer:
    """Calls `drain` every DRAIN_SECONDS on a thread, so that no buffer fills between scrapes."""

    def __init__(self, drain: Callable[[], None]) -> None:
        self._drain = drain
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-drain", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(DRAIN_SECONDS):
            try:
                self._drain()
            except Exception:  # a metric lost must not stop the next drains
                logger.exception("Draining the Temporal client's metrics failed")

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)


def serve_metrics(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    drain: Callable[[], None] | None = None,
) -> MetricsEndpoint:
    """Starts serving on a thread of its own, and calling `drain` regularly on another.

    Raises OSError if host:port cannot be bound.
    """
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise OSError(f"cannot serve metrics on {host}:{port}: {err.strerror or err}") from err
    drainer = _Drainer(drain) if drain is not None else None
    return MetricsEndpoint(host, server.server_port, server, thread, drainer)
