"""Serves a prometheus_client registry at http://host:port/metrics, on a thread of its own."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector


def new_registry() -> CollectorRegistry:
    """A registry with the process's own series (CPU, memory, open files, GC, Python version).

    A registry per server rather than the global one: several servers in one
    process (the tests) each count their own RPCs.
    """
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


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
    """Starts serving; raises OSError if host:port cannot be bound."""
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise OSError(f"cannot serve metrics on {host}:{port}: {err.strerror or err}") from err
    return MetricsEndpoint(host=host, port=server.server_port, _server=server, _thread=thread)
