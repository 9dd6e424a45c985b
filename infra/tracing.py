"""OpenTelemetry tracing of both processes, from the standard OTEL_* variables; off by default.

`OTEL_TRACES_EXPORTER` picks the exporters (otlp, console, none; default none:
nothing is installed, so tracing costs nothing). Everything else is the SDK's
to read: the OTLP endpoint, headers and protocol, `OTEL_SERVICE_NAME`, the
sampler, the batch processor's delays (docs/decisions/0019-tracing.md).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from temporalio.contrib.opentelemetry import TracingInterceptor

SERVER_SERVICE_NAME = "order-service"
WORKER_SERVICE_NAME = "order-worker"
EXPORTER_VARIABLE = "OTEL_TRACES_EXPORTER"
# The SDK's own names: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL first, then the general one.
PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
# Where exporter packages register their span exporters (console, otlp_proto_grpc, ...).
_ENTRY_POINT_GROUP = "opentelemetry_traces_exporter"
# "otlp" is one of these by the protocol, grpc unless told (as the Python SDK has it).
_OTLP_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}


class TracingSetupError(OSError):
    """A bad OTEL_* variable; an OSError, so that the process says it in one line."""


@dataclass(frozen=True)
class Tracing:
    """The process's tracer provider, exporting as the environment asked."""

    provider: TracerProvider
    exporters: tuple[str, ...]

    def describe(self) -> str:
        """For the log: where spans go, and as which service."""
        name = self.provider.resource.attributes.get(SERVICE_NAME)
        return f"spans of service {name} exported with {', '.join(self.exporters)}"

    def tracer(self, name: str) -> trace.Tracer:
        return self.provider.get_tracer(name)

    def temporal_interceptors(self) -> list[TracingInterceptor]:
        """For the Temporal client: its calls' spans; on a worker, workflows' and activities'."""
        return [TracingInterceptor(self.tracer("temporalio"))]

    async def shutdown(self) -> None:
        """Exports the spans still batched: the processes leave with os._exit, skipping atexit."""
        await asyncio.to_thread(self.provider.shutdown)


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """The span exporters (entry point names) OTEL_TRACES_EXPORTER asks for; [] for none.

    Raises TracingSetupError for an OTLP protocol other than grpc and http/protobuf.
    """
    names = [n.strip() for n in environ.get(EXPORTER_VARIABLE, "").split(",") if n.strip()]
    if not names or names == ["none"]:
        return []
    protocol = next((environ[v] for v in PROTOCOL_VARIABLES if environ.get(v)), "grpc").strip()
    if "otlp" in names and protocol not in _OTLP_BY_PROTOCOL:
        raise TracingSetupError(
            f"OTLP protocol {protocol!r} ({' or '.join(PROTOCOL_VARIABLES)}): "
            f"use {' or '.join(_OTLP_BY_PROTOCOL)}"
        )
    return [_OTLP_BY_PROTOCOL[protocol] if name == "otlp" else name for name in names]


def from_environment(
    default_service_name: str, environ: Mapping[str, str] | None = None
) -> Tracing | None:
    """A tracer provider exporting as OTEL_TRACES_EXPORTER says, also set as the global one.

    None when no exporter is asked for: nothing is installed. Raises TracingSetupError
    for an exporter that is not installed or a bad protocol.
    """
    environ = os.environ if environ is None else environ
    names = exporter_names(environ)
    if not names:
        return None
    installed = {e.name: e for e in entry_points(group=_ENTRY_POINT_GROUP)}
    exporters: list[SpanExporter] = []
    for name in names:
        if name not in installed:
            raise TracingSetupError(
                f"{EXPORTER_VARIABLE}: no span exporter {name!r}; "
                f"use otlp, console or none (installed: {', '.join(sorted(installed))})"
            )
        # Built with no arguments, each exporter reads its own OTEL_EXPORTER_* variables.
        exporters.append(installed[name].load()())
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over our default name.
    resource = Resource.create({SERVICE_NAME: default_service_name}).merge(
        OTELResourceDetector().detect()
    )
    provider = TracerProvider(resource=resource)  # reads OTEL_TRACES_SAMPLER itself
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))  # reads OTEL_BSP_*
    trace.set_tracer_provider(provider)
    return Tracing(provider, tuple(names))


@asynccontextmanager
async def installed(default_service_name: str) -> AsyncIterator[Tracing | None]:
    """`from_environment`'s tracing while the block runs; shut down after it, so the
    spans still batched are exported before the process exits."""
    tracing = from_environment(default_service_name)
    try:
        yield tracing
    finally:
        if tracing is not None:
            await tracing.shutdown()


def current_ids() -> dict[str, str]:
    """The current span's trace_id and span_id in hex, as trace backends show them; {} if none."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {
        "trace_id": trace.format_trace_id(context.trace_id),
        "span_id": trace.format_span_id(context.span_id),
    }
