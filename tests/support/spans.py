"""An in-memory tracer, and a one-method server behind the span and the request path."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from server.platform.request_path import RequestPath
from server.platform.tracing import ServerSpans

SERVICE = "test.Orders"


@contextmanager
def in_memory_tracer() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A provider of the test's own: the global one stays unset, as with tracing off."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield provider, exporter
    finally:
        provider.shutdown()


@asynccontextmanager
async def traced_server(
    provider: TracerProvider, name: str, handler: grpc.RpcMethodHandler[bytes, bytes]
) -> AsyncIterator[str]:
    """Serves `handler` as test.Orders/<name>, behind the server span and the request
    path as the server has them; yields the target to call."""
    spans = ServerSpans(provider.get_tracer("test"), traced_services=[SERVICE])
    server = grpc.aio.server(interceptors=[spans, RequestPath(None, logged_services=[SERVICE])])
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, {name: handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
