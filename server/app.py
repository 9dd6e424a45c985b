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
from grpc_reflection.v1alpha.reflection import SERVICE_NAME as REFLECTION_SERVICE_NAME
from temporalio.client import Client

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from infra import temporal_connection
from infra.metrics_http import MetricsEndpoint, new_registry, serve_metrics
from infra.temporal_runtime import new_runtime
from server import tls, tokens
from server.auth import BearerTokenAuth
from server.config import ServerConfig, check_security, format_duration
from server.decoding import RejectUndecodableRequests
from server.health import TemporalHealthProber, new_health_servicer
from server.metrics import GrpcServerMetrics, MetricsInterceptor
from server.reflection import enable_reflection
from server.servicer import SERVICE_NAME, OrderServiceServicer
from server.watch import OrderWatchers

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 5.0

# --- Limits (README "Operations") ---
# grpc's own default, kept explicit: the largest request is a CreateOrder well
# under 1 MiB; a bigger message is RESOURCE_EXHAUSTED before any code reads it.
MAX_RECEIVE_MESSAGE_BYTES = 4 * 1024 * 1024
# Answers are bounded by Temporal's 2 MB payload limit on an order's state.
MAX_SEND_MESSAGE_BYTES = 8 * 1024 * 1024
# Per HTTP/2 connection: room for many WatchOrder streams on one client
# channel, while one connection cannot open unbounded streams.
MAX_CONCURRENT_STREAMS = 1000
# Per server: beyond this grpc answers RESOURCE_EXHAUSTED at once, instead of
# queueing RPCs until memory runs out; WatchOrder streams count while open.
MAXIMUM_CONCURRENT_RPCS = 10_000
SERVER_OPTIONS: list[tuple[str, int]] = [
    # Without SO_REUSEPORT a second server on the same port fails to start
    # instead of silently sharing the port (and its traffic) with the first.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
    ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
    # Ping an idle client after 60 s, drop it if no answer in 20 s: a vanished
    # WatchOrder caller frees its stream in minutes, not at the OS's TCP timeout.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    # Accept clients' own keepalive pings every 10 s or more, also between
    # calls, rather than closing their connection with "too_many_pings".
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # Close connections idle for 5 min; make clients reconnect every 30 min so
    # that, behind a load balancer, new servers get their share. RPCs running
    # then finish on the old connection (no grace limit: watches are not cut).
    ("grpc.max_connection_idle_ms", 5 * 60_000),
    ("grpc.max_connection_age_ms", 30 * 60_000),
]


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
    # The Prometheus endpoint, if config.metrics_port asked for one.
    metrics: MetricsEndpoint | None = None

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.port if self.metrics is not None else None

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Reports NOT_SERVING, refuses new RPCs, lets running ones finish for `grace` seconds.

        WatchOrder streams would outlive any grace: they end first, with
        UNAVAILABLE, so their clients know to watch again elsewhere.
        """
        await self.prober.stop()
        await self.watchers.stop()
        await self.grpc_server.stop(grace)
        if self.metrics is not None:
            await self.metrics.stop()

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


def _listen_address(host: str, port: int) -> str:
    """host:port, with an IPv6 literal bracketed."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


async def connect_temporal(config: ServerConfig) -> Client:
    """A lazy client: it connects on first use, so the server starts while Temporal is down.

    Raises OSError if a TLS file of the connection cannot be read.
    """
    return await temporal_connection.connect(config.temporal, lazy=True, runtime=new_runtime())


async def start_server(config: ServerConfig, client: Client | None = None) -> OrderServer:
    """Builds, binds and starts the server; the caller stops it with `OrderServer.stop`."""
    # from_args checked this already; a config built in code gets the same rules.
    check_security(config)
    interceptors: list[grpc.aio.ServerInterceptor] = []  # type: ignore[type-arg]
    if config.auth_tokens_file is not None:
        # Health stays open so probes need no secret; reflection, when served, too.
        open_services = [grpc_health.SERVICE_NAME]
        if config.reflection:
            open_services.append(REFLECTION_SERVICE_NAME)
        store = tokens.load(config.auth_tokens_file)
        # First, so an unauthenticated request is refused before anything reads it.
        interceptors.append(BearerTokenAuth(store, open_services=open_services))
    metrics: GrpcServerMetrics | None = None
    if config.metrics_port is not None:
        metrics = GrpcServerMetrics(new_registry())
        # First of all, so it counts what the others refuse too.
        interceptors.insert(0, MetricsInterceptor(metrics))
    if client is None:
        client = await connect_temporal(config)
    server = grpc.aio.server(
        interceptors=[*interceptors, RejectUndecodableRequests(SERVICE_NAME)],
        options=SERVER_OPTIONS,
        maximum_concurrent_rpcs=MAXIMUM_CONCURRENT_RPCS,
    )
    watchers = OrderWatchers(client, query_timeout=config.temporal_rpc_timeout)
    pb_grpc.add_OrderServiceServicer_to_server(
        OrderServiceServicer(client, config, watchers=watchers), server
    )
    health = new_health_servicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if config.reflection:
        enable_reflection(
            server,
            [SERVICE_NAME, grpc_health.SERVICE_NAME],
            # error_details: so grpcurl and GUIs can decode the google.rpc error details.
            [pb.DESCRIPTOR, health_pb2.DESCRIPTOR, error_details_pb2.DESCRIPTOR],
        )
    address = _listen_address(config.host, config.port)
    try:
        if config.tls_cert is not None and config.tls_key is not None:
            credentials = tls.server_credentials(
                config.tls_cert, config.tls_key, config.tls_client_ca
            )
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as err:  # grpc raises this when the address cannot be bound
        raise OSError(f"cannot listen on {address}: {err}") from err
    if port == 0:  # older grpc versions report a failed bind this way
        raise OSError(f"cannot listen on {address}")
    endpoint = None
    if metrics is not None and config.metrics_port is not None:
        metrics_host = config.metrics_host or config.host
        endpoint = serve_metrics(metrics.registry, metrics_host, config.metrics_port)
    # NOT_SERVING before the first RPC can arrive, until Temporal answers a probe.
    prober = TemporalHealthProber(client, health, [SERVICE_NAME])
    await prober.start()
    try:
        await server.start()
    except BaseException:
        await prober.stop()
        if endpoint is not None:
            await endpoint.stop()
        raise
    return OrderServer(
        config=config,
        port=port,
        client=client,
        grpc_server=server,
        prober=prober,
        watchers=watchers,
        metrics=endpoint,
    )


def _log_security(config: ServerConfig) -> None:
    """Says how callers are checked, and warns where anyone on the network gets in."""
    if config.tls_client_ca is not None:
        transport = "mutual TLS (client certificates required)"
    elif config.tls_enabled:
        transport = "TLS"
    else:
        transport = "plain text"
    callers = (
        f"bearer tokens from {config.auth_tokens_file}"
        if config.auth_tokens_file is not None
        else "no tokens"
    )
    reflection = "on" if config.reflection else "off"
    logger.info("Security: %s, %s, reflection %s", transport, callers, reflection)
    if tls.is_loopback(config.host):
        return
    if not config.tls_enabled:
        logger.warning(
            "Plain text on %s (--allow-insecure-remote): tokens and orders cross the "
            "network unencrypted unless something else encrypts them",
            config.host,
        )
    if config.auth_tokens_file is None and config.tls_client_ca is None:
        logger.warning(
            "No --auth-tokens-file: anyone who reaches %s may call every RPC", config.host
        )


async def serve(config: ServerConfig) -> None:
    """Runs the server until SIGINT or SIGTERM, then shuts it down gracefully."""
    server = await start_server(config)
    logger.info(
        "OrderService listening on %s (Temporal %s, task queue %s, "
        "payment timeout %s, Temporal RPC timeout %s)",
        _listen_address(config.host, server.port),
        config.temporal.describe(),
        config.task_queue,
        format_duration(timedelta(seconds=config.payment_timeout_seconds)),
        format_duration(config.temporal_rpc_timeout),
    )
    _log_security(config)
    if server.metrics is not None:
        logger.info(
            "Metrics at http://%s/metrics",
            _listen_address(server.metrics.host, server.metrics.port),
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
