"""Tracing: one order followed from the gRPC server into the worker, across processes.

A real Temporal dev server, `python -m worker` and `python -m server` as processes of
their own, exporting over OTLP to a small collector this test runs: the worker over
gRPC, the server over HTTP (both protocols the settings offer). What Temporal's
TracingInterceptor gives, asserted exactly (docs/decisions/0019-tracing.md):

- CreateOrder's server span is the child of the caller's traceparent, StartWorkflow its
  child, and every span of the workflow (RunWorkflow, each StartActivity / RunActivity,
  the signal's handling, CompleteWorkflow) in that same trace, under StartWorkflow;
- ConfirmPayment is a trace of its own (the server span, then SignalWorkflow), and the
  workflow's HandleSignal span, in the order's trace, links to that SignalWorkflow span.

Also here: the Temporal client's metrics on the server's /metrics (scraped from the
process, and their sums with a stand-in buffer), and in-process the server span's
status and parent, trace ids on log lines, the exporter settings.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
import threading
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import grpc
import pytest
import pytest_asyncio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.trace import StatusCode
from temporalio.runtime import (
    BUFFERED_METRIC_KIND_COUNTER,
    BUFFERED_METRIC_KIND_HISTOGRAM,
    MetricBuffer,
)

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from infra import logs, tracing
from server.api import errors
from server.platform.metrics import GrpcServerMetrics
from tests.support.cluster import Cluster, ServerProcess, Simulation, open_cluster
from tests.support.env import free_port
from tests.support.orders import create_request, payment_request
from tests.support.polling import eventually
from tests.support.spans import in_memory_tracer, traced_server

SERVICE = "acme.orders.v1.OrderService"
# Orders go through in about a second: no simulated provider waits.
INSTANT = Simulation(inventory=0, payment=0, prepare=0, ship=0, deliver=0, email=0)
# Spans leave the processes within 0.1 s of ending, not the SDK's default 5 s.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}


# --- The collector ----------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """An exported span, as a test reads it: ids in hex, as trace backends show them."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int  # trace_pb2.Span.SpanKind
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...]  # (trace_id, span_id)
    status: int  # trace_pb2.Status.StatusCode


def _spans(request: trace_service_pb2.ExportTraceServiceRequest) -> list[Span]:
    found = []
    for resource_spans in request.resource_spans:
        resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                attributes = {
                    a.key: getattr(a.value, a.value.WhichOneof("value") or "string_value")
                    for a in span.attributes
                }
                found.append(
                    Span(
                        service=resource["service.name"],
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(),
                        kind=span.kind,
                        attributes=attributes,
                        links=tuple((ln.trace_id.hex(), ln.span_id.hex()) for ln in span.links),
                        status=span.status.code,
                    )
                )
    return found


@dataclass
class Collector:
    """What the processes exported, over OTLP/gRPC and OTLP/HTTP alike."""

    spans: list[Span] = field(default_factory=list)
    grpc_endpoint: str = ""
    http_endpoint: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._lock:
            self.spans.extend(_spans(request))

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def named(self, name: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.name == name]


class _GrpcTraces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, collector: Collector) -> None:
        self._collector = collector

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._collector.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def _http_handler(collector: Collector) -> type[BaseHTTPRequestHandler]:
    class Traces(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            collector.add(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
            answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: pytest shows the processes' logs on failure

    return Traces


@asynccontextmanager
async def running_collector() -> AsyncIterator[Collector]:
    """OTLP/gRPC on one loopback port, OTLP/HTTP on another, both into one Collector."""
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        _GrpcTraces(collector), server
    )
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    http = ThreadingHTTPServer(("127.0.0.1", 0), _http_handler(collector))
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    collector.grpc_endpoint = f"http://127.0.0.1:{grpc_port}"
    collector.http_endpoint = f"http://127.0.0.1:{http.server_address[1]}"
    try:
        yield collector
    finally:
        await asyncio.to_thread(http.shutdown)
        http.server_close()
        await server.stop(None)


# --- The processes ----------------------------------------------------------------------


@dataclass
class Traced:
    cluster: Cluster
    server: ServerProcess
    collector: Collector
    metrics_url: str
    stub: pb_grpc.OrderServiceAsyncStub


@pytest_asyncio.fixture(scope="module")
async def traced(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Traced]:
    """Temporal, a worker exporting over OTLP/gRPC, a server over OTLP/HTTP, one collector."""
    root = tmp_path_factory.mktemp("tracing")
    async with running_collector() as collector, open_cluster(root, simulation=INSTANT) as cluster:
        await cluster.start_temporal()
        await cluster.start_worker(
            env={
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_ENDPOINT": collector.grpc_endpoint,
                **FAST_EXPORT,
            }
        )
        metrics_port = free_port()
        server_env = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.http_endpoint,
            **FAST_EXPORT,
        }
        server = await cluster.start_server(
            flags=["--metrics-port", str(metrics_port)], env=server_env, name="server-traced"
        )
        stack = await cluster.stack(server)
        yield Traced(
            cluster, server, collector, f"http://127.0.0.1:{metrics_port}/metrics", stack.stub
        )


def traceparent() -> tuple[str, str, tuple[tuple[str, str]]]:
    """A caller's trace id, span id and the W3C metadata that carries them."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, (("traceparent", f"00-{trace_id}-{span_id}-01"),)


def only(spans: list[Span], name: str) -> Span:
    named = [s for s in spans if s.name == name]
    assert len(named) == 1, f"{len(named)} spans {name!r} in {[s.name for s in spans]}"
    return named[0]


# --- One order, end to end -----------------------------------------------------------------


async def test_one_order_is_one_trace_across_the_server_and_the_worker(traced: Traced) -> None:
    trace_id, caller_span, metadata = traceparent()
    created = await traced.stub.CreateOrder(create_request(), metadata=metadata)
    order_id = created.order_id
    await traced.stub.ConfirmPayment(payment_request(order_id))
    await eventually(
        lambda: traced.stub.GetOrder(pb.GetOrderRequest(order_id=order_id)),
        lambda order: order.status == pb.ORDER_STATUS_DELIVERED,
        within=60,
        what=f"{order_id} delivered",
    )
    # The workflow's last span, exported after the order was delivered.
    await eventually(
        lambda: asyncio.sleep(0, traced.collector.trace(trace_id)),
        lambda spans: any(s.name == "CompleteWorkflow:OrderWorkflow" for s in spans),
        within=20,
        what="the order's CompleteWorkflow span",
    )
    spans = traced.collector.trace(trace_id)

    # The server: the caller's span is CreateOrder's parent, StartWorkflow its child.
    create = only(spans, f"{SERVICE}/CreateOrder")
    assert (create.service, create.parent_id) == ("order-service", caller_span)
    assert create.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert create.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    start = only(spans, "StartWorkflow:OrderWorkflow")
    assert (start.service, start.parent_id) == ("order-service", create.span_id)
    assert start.attributes["temporalWorkflowID"] == f"order-{order_id}"

    # The worker, in the same trace: the workflow's spans under StartWorkflow...
    worker = [s for s in spans if s.service == "order-worker"]
    run = only(worker, "RunWorkflow:OrderWorkflow")
    complete = only(worker, "CompleteWorkflow:OrderWorkflow")
    handled = only(worker, "HandleSignal:confirm_payment")
    for span in (run, complete, handled):
        assert span.parent_id == start.span_id, span
    # ...and each activity run under the workflow's StartActivity of it.
    by_id = {s.span_id: s for s in spans}
    ran = {
        s.name.removeprefix("RunActivity:"): s for s in worker if s.name.startswith("RunActivity:")
    }
    assert {"reserve_inventory", "charge_payment", "ship_order", "deliver_order"} <= set(ran)
    for activity, span in ran.items():
        scheduled = by_id[span.parent_id]
        assert scheduled.name == f"StartActivity:{activity}"
        assert scheduled.parent_id == start.span_id
    assert all(s.trace_id == trace_id for s in spans)
    assert {s.service for s in spans} == {"order-service", "order-worker"}

    # ConfirmPayment: a trace of its own, which the workflow's handling of it links to.
    (pay,) = [
        s for s in traced.collector.named(f"{SERVICE}/ConfirmPayment") if s.trace_id != trace_id
    ]
    assert pay.parent_id == ""  # its caller sent no traceparent
    signal = only(traced.collector.trace(pay.trace_id), "SignalWorkflow:confirm_payment")
    assert signal.parent_id == pay.span_id
    assert handled.links == ((signal.trace_id, signal.span_id),)


async def test_the_server_logs_each_rpc_with_its_trace_id(traced: Traced) -> None:
    trace_id, _, metadata = traceparent()
    created = await traced.stub.CreateOrder(create_request(), metadata=metadata)
    spans = await eventually(
        lambda: asyncio.sleep(0, traced.collector.trace(trace_id)),
        lambda spans: any(s.name == f"{SERVICE}/CreateOrder" for s in spans),
        what="the CreateOrder span",
    )
    span = only(spans, f"{SERVICE}/CreateOrder")
    lines = await eventually(
        lambda: asyncio.sleep(0, traced.server.process.log_text().splitlines()),
        lambda lines: any(f"rpc=CreateOrder order_id={created.order_id}" in ln for ln in lines),
        what="the CreateOrder line",
    )
    about = [ln for ln in lines if created.order_id in ln]
    assert any("rpc=CreateOrder" in ln for ln in about)
    # Every line the RPC logged (its own, and any other component's) names its span.
    for line in about:
        assert line.endswith(f" trace_id={trace_id} span_id={span.span_id}"), line


async def test_the_temporal_client_metrics_are_beside_the_grpc_metrics(traced: Traced) -> None:
    await traced.stub.CreateOrder(create_request())

    def scrape() -> str:
        with urllib.request.urlopen(traced.metrics_url, timeout=5) as answer:
            text: str = answer.read().decode()
            return text

    text = await asyncio.to_thread(scrape)
    lines = text.splitlines()
    # The gRPC series and the Temporal client's, on the one endpoint.
    assert any(
        ln.startswith("grpc_server_handled_total{") and 'grpc_method="CreateOrder"' in ln
        for ln in lines
    ), text
    started = [
        ln
        for ln in lines
        if ln.startswith("temporal_request_total{") and 'operation="StartWorkflowExecution"' in ln
    ]
    assert started, text
    assert float(started[0].rsplit(" ", 1)[1]) >= 1, text
    assert any(
        ln.startswith("temporal_request_latency_bucket{")
        and 'operation="StartWorkflowExecution"' in ln
        for ln in lines
    ), text


# --- In-process: the server span, the log fields, the settings --------------------------


async def _refuse(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    order_id = request.decode()
    if order_id == "bug":
        raise RuntimeError("a bug")  # the request path answers INTERNAL
    raise errors.OrderNotFound(order_id)


@pytest.mark.parametrize(
    ("order_id", "code", "status"),
    [
        # The caller's mistake: the span records the code, its status stays unset.
        ("ORD-1", grpc.StatusCode.NOT_FOUND, StatusCode.UNSET),
        ("bug", grpc.StatusCode.INTERNAL, StatusCode.ERROR),
    ],
)
async def test_the_server_span_has_the_rpcs_status_and_the_callers_parent(
    order_id: str, code: grpc.StatusCode, status: StatusCode
) -> None:
    # Behind the request path, which answers with abort_with_status: the status that
    # opentelemetry-instrumentation-grpc's interceptor missed.
    with in_memory_tracer() as (provider, exporter):
        method = grpc.unary_unary_rpc_method_handler(
            _refuse, request_deserializer=bytes, response_serializer=bytes
        )
        trace_id, caller_span, metadata = traceparent()
        async with (
            traced_server(provider, "Get", method) as target,
            grpc.aio.insecure_channel(target) as channel,
        ):
            call = channel.unary_unary("/test.Orders/Get", bytes, bytes)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call(order_id.encode(), metadata=metadata)
        assert raised.value.code() == code
        (span,) = exporter.get_finished_spans()
    assert span.name == "test.Orders/Get"
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == code.value[0]
    assert span.status.status_code == status
    assert span.parent is not None
    assert (format(span.parent.trace_id, "032x"), format(span.parent.span_id, "016x")) == (
        trace_id,
        caller_span,
    )


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_log_lines_carry_the_current_spans_ids(log_format: str) -> None:
    stream = io.StringIO()
    # The handler logs.configure makes, on a logger of the test's own.
    handler = logs.handler(log_format, stream)
    logger = logging.getLogger(f"tests.tracing.{log_format}")
    logger.addHandler(handler)
    logger.propagate = False
    with in_memory_tracer() as (provider, _):
        logger.warning("outside any span")
        with provider.get_tracer("test").start_as_current_span("work") as span:
            logger.warning("inside a span")
        context = span.get_span_context()
    logger.removeHandler(handler)
    trace_id, span_id = format(context.trace_id, "032x"), format(context.span_id, "016x")
    outside, inside = stream.getvalue().splitlines()
    if log_format == "json":
        assert "trace_id" not in json.loads(outside)
        entry = json.loads(inside)
        assert (entry["trace_id"], entry["span_id"]) == (trace_id, span_id)
    else:
        assert "trace_id" not in outside
        assert inside.endswith(f"inside a span trace_id={trace_id} span_id={span_id}")


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        ({}, []),  # off unless asked: no exporter, nothing installed
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp_proto_grpc"]),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            ["otlp_proto_http"],
        ),
        (
            {
                "OTEL_TRACES_EXPORTER": "otlp,console",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",  # the traces' own wins
            },
            ["otlp_proto_grpc", "console"],
        ),
    ],
)
def test_the_exporters_come_from_the_otel_variables(
    environ: dict[str, str], names: list[str]
) -> None:
    assert tracing.exporter_names(environ) == names


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTLP protocol 'http/json'",
        ),
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "no span exporter 'jaeger'"),
    ],
)
def test_a_bad_otel_variable_is_a_clear_error(environ: dict[str, str], message: str) -> None:
    with pytest.raises(tracing.TracingSetupError, match=message):
        tracing.from_environment("order-service", environ)


def test_tracing_off_installs_nothing() -> None:
    assert tracing.from_environment("order-service", {}) is None


@dataclass(frozen=True)
class _Metric:
    name: str
    kind: int
    description: str = ""
    unit: str | None = None


@dataclass(frozen=True)
class _Update:
    metric: _Metric
    value: float
    attributes: dict[str, str]


class _FakeBuffer:
    """Stands in for Core's MetricBuffer: the updates recorded since the last drain."""

    def __init__(self) -> None:
        self.pending: list[_Update] = []

    def retrieve_updates(self) -> list[_Update]:
        drained, self.pending = self.pending, []
        return drained


def test_temporal_client_metrics_add_up_per_label_set() -> None:
    buffer = _FakeBuffer()
    metrics = GrpcServerMetrics(temporal=cast(MetricBuffer, buffer))
    request = _Metric("temporal_request", BUFFERED_METRIC_KIND_COUNTER)
    latency = _Metric("temporal_request_latency", BUFFERED_METRIC_KIND_HISTOGRAM)
    start = {"operation": "StartWorkflowExecution"}
    buffer.pending = [
        _Update(request, 1, start),
        _Update(request, 1, {"operation": "GetSystemInfo"}),  # another label set
        _Update(latency, 0.02, start),
        _Update(latency, 0.3, start),
    ]
    metrics.drain()  # as the endpoint's thread does between scrapes
    buffer.pending = [_Update(request, 1, start)]
    registry = metrics.registry

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("temporal_request_total", **start) == 2
    assert value("temporal_request_total", operation="GetSystemInfo") == 1
    assert value("temporal_request_latency_bucket", le="0.01", **start) == 0
    assert value("temporal_request_latency_bucket", le="0.025", **start) == 1
    assert value("temporal_request_latency_bucket", le="0.5", **start) == 2
    assert value("temporal_request_latency_bucket", le="+Inf", **start) == 2
    assert value("temporal_request_latency_count", **start) == 2
    assert value("temporal_request_latency_sum", **start) == pytest.approx(0.32)
