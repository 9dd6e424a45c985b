"""Assembles and runs the gRPC server: OrderService, health and reflection."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from datetime import timedelta

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from temporalio.client import Client

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from server.config import ServerConfig, format_duration
from server.decoding import RejectUndecodableRequests
from server.health import TemporalHealthProber, new_health_servicer
from server.reflection import enable_reflection
from server.servicer import SERVICE_NAME, OrderServiceServicer
from server.watch import OrderWatchers

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 5.0


@dataclass
class OrderServer:
    """A started server. `port` is the bound port (the chosen one when config.port is 0)."""

    config: ServerConfig
    port: int
    client: Client
    grpc_server: grpc.aio.Server
    prober: TemporalHealthProber
    # WatchOrder's shared watches: one per watched order.
    watchers: OrderWatchers

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Reports NOT_SERVING, refuses new RPCs, lets running ones finish for `grace` seconds.

        WatchOrder streams would outlive any grace: they end first, with
        UNAVAILABLE, so their clients know to watch again elsewhere.
        """
        await self.prober.stop()
        await self.watchers.stop()
        await self.grpc_server.stop(grace)

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


def _listen_address(host: str, port: int) -> str:
    """host:port, with an IPv6 literal bracketed."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


async def connect_temporal(config: ServerConfig) -> Client:
    """A lazy client: it connects on first use, so the server starts while Temporal is down."""
    return await Client.connect(config.temporal_address, namespace=config.namespace, lazy=True)


async def start_server(config: ServerConfig, client: Client | None = None) -> OrderServer:
    """Builds, binds and starts the server; the caller stops it with `OrderServer.stop`."""
    if client is None:
        client = await connect_temporal(config)
    # Without SO_REUSEPORT a second server on the same port fails to start
    # instead of silently sharing the port (and its traffic) with the first.
    server = grpc.aio.server(
        interceptors=[RejectUndecodableRequests(SERVICE_NAME)],
        options=[("grpc.so_reuseport", 0)],
    )
    watchers = OrderWatchers(client, query_timeout=config.temporal_rpc_timeout)
    pb_grpc.add_OrderServiceServicer_to_server(
        OrderServiceServicer(client, config, watchers=watchers), server
    )
    health = new_health_servicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    enable_reflection(
        server,
        [SERVICE_NAME, grpc_health.SERVICE_NAME],
        # error_details: so grpcurl and GUIs can decode the google.rpc error details.
        [pb.DESCRIPTOR, health_pb2.DESCRIPTOR, error_details_pb2.DESCRIPTOR],
    )
    address = _listen_address(config.host, config.port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as err:  # grpc raises this when the address cannot be bound
        raise OSError(f"cannot listen on {address}: {err}") from err
    if port == 0:  # older grpc versions report a failed bind this way
        raise OSError(f"cannot listen on {address}")
    # NOT_SERVING before the first RPC can arrive, until Temporal answers a probe.
    prober = TemporalHealthProber(client, health, [SERVICE_NAME])
    await prober.start()
    try:
        await server.start()
    except BaseException:
        await prober.stop()
        raise
    return OrderServer(
        config=config,
        port=port,
        client=client,
        grpc_server=server,
        prober=prober,
        watchers=watchers,
    )


async def serve(config: ServerConfig) -> None:
    """Runs the server until SIGINT or SIGTERM, then shuts it down gracefully."""
    server = await start_server(config)
    logger.info(
        "OrderService listening on %s (Temporal %s, namespace %s, task queue %s, "
        "payment timeout %s, Temporal RPC timeout %s)",
        _listen_address(config.host, server.port),
        config.temporal_address,
        config.namespace,
        config.task_queue,
        format_duration(timedelta(seconds=config.payment_timeout_seconds)),
        format_duration(config.temporal_rpc_timeout),
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    try:
        await stopping.wait()
        logger.info("Shutting down (grace %ss)", SHUTDOWN_GRACE_SECONDS)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await server.stop(SHUTDOWN_GRACE_SECONDS)
    logger.info("OrderService stopped")
