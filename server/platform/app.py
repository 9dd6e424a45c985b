"""Assembles and runs the gRPC server: OrderService, health and reflection."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from importlib import resources

import grpc
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from temporalio.client import Client

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from infra import temporal_client
from infra import tracing as otel
from infra.settings import format_duration
from server.api.servicer import SERVICE_NAME, OrderService
from server.platform import audit, limits, reflection, tls, tokens
from server.platform.auth import BearerTokenAuth
from server.platform.health import TemporalHealthProber
from server.platform.jwt_auth import JwtVerifier
from server.platform.metrics import GrpcServerMetrics, MetricsEndpoint, serve_metrics
from server.platform.request_path import RequestPath
from server.platform.settings import ServerSettings
from server.platform.slow_readers import SlowReaders
from server.platform.tracing import ServerSpans
from server.temporal.listing import OrderLister, PageTokens, TemporalVisibility
from server.temporal.orders import OrderWorkflows
from server.temporal.payloads import with_fast_json_client
from server.temporal.watching import OrderWatchers

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 5.0

# --- Limits (docs/operations.md) ---
# grpc's own default, kept explicit: the largest request is a CreateOrder well
# under 1 MiB; a bigger message is RESOURCE_EXHAUSTED before any code reads it.
MAX_RECEIVE_MESSAGE_BYTES = 4 * 1024 * 1024
# Answers are bounded by Temporal's 2 MB payload limit on an order's state.
MAX_SEND_MESSAGE_BYTES = 8 * 1024 * 1024
# Per HTTP/2 connection: room for many WatchOrder streams on one client
# channel, while one connection cannot open unbounded streams.
MAX_CONCURRENT_STREAMS = 1000
# Calls in progress per server: settings, per class of service (server/platform/limits.py).
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
    """A started server. `port` is the bound port (the chosen one when settings.port is 0)."""

    settings: ServerSettings
    port: int
    client: Client
    grpc_server: grpc.aio.Server
    prober: TemporalHealthProber
    # WatchOrder's shared watches: one per watched order.
    watchers: OrderWatchers
    # The Prometheus endpoint, if settings.metrics_port asked for one.
    metrics: MetricsEndpoint | None = None
    # The watchdog that disconnects clients that do not read (docs/decisions/0022).
    readers: SlowReaders | None = None

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Reports NOT_SERVING, refuses new RPCs, lets running ones finish for `grace` seconds.

        WatchOrder streams would outlive any grace: they end first, with
        UNAVAILABLE, so their clients know to watch again elsewhere.
        """
        await self.prober.stop()
        await self.watchers.stop()
        await self.grpc_server.stop(grace)
        if self.readers is not None:
            await self.readers.stop()
        if self.metrics is not None:
            await self.metrics.stop()


def api_descriptors() -> descriptor_pb2.FileDescriptorSet:
    """The API's descriptors with their comments, which `make proto` writes next to its modules."""
    data = resources.files("acme.orders.v1").joinpath("order_service.binpb").read_bytes()
    return descriptor_pb2.FileDescriptorSet.FromString(data)


def _listen_address(host: str, port: int) -> str:
    """host:port, with an IPv6 literal bracketed."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _open_services(settings: ServerSettings) -> list[str]:
    """What anyone may call without a token, counted apart from the OrderService's calls:
    health, so probes need no secret, and reflection when it is served."""
    return [grpc_health.SERVICE_NAME, *(reflection.SERVICE_NAMES if settings.reflection else ())]


def _interceptors(
    settings: ServerSettings,
    metrics: GrpcServerMetrics | None,
    readers: SlowReaders,
    tracing: otel.Tracing | None,
) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    """Every RPC's path, outermost first: its span, so every line it logs carries the
    span's ids; the request path (with the writes' audit lines), so it sees what the
    others refuse; the token check; the limits, which know the caller the token check bound."""
    interceptors: list[grpc.aio.ServerInterceptor] = []  # type: ignore[type-arg]
    if tracing is not None:
        interceptors.append(ServerSpans(tracing.tracer(__name__), traced_services=[SERVICE_NAME]))
    interceptors.append(
        RequestPath(metrics, logged_services=[SERVICE_NAME], audited_methods=audit.AUDITED_METHODS)
    )
    open_services = _open_services(settings)
    verifier = JwtVerifier.from_settings(settings)
    if settings.auth_tokens_file is not None or verifier is not None:
        tokens_file = settings.auth_tokens_file
        store = tokens.TokenStore([]) if tokens_file is None else tokens.load(tokens_file)
        # End users are named in logs by a hash keyed like visibility's customer ids.
        key = settings.keys.customer_id_key if verifier is not None else b""
        interceptors.append(
            BearerTokenAuth(store, open_services=open_services, jwt=verifier, customer_id_key=key)
        )
    interceptors.append(limits.Limits(settings, open_services=open_services, readers=readers))
    return interceptors


async def start_server(
    settings: ServerSettings, client: Client | None = None, tracing: otel.Tracing | None = None
) -> OrderServer:
    """Builds, binds and starts the server; the caller stops it with `OrderServer.stop`.

    Without a client it makes a lazy one, which connects on first use, so the
    server starts while Temporal is down, encrypting with the settings' keys
    (ValueError without keys); OSError if a TLS file cannot be read. Its metrics,
    if served, go to the server's /metrics. With `tracing`, every RPC is a span,
    and so is every Temporal call the lazy client makes.
    """
    buffer = None
    if client is None:
        buffer = temporal_client.metric_buffer() if settings.metrics_port is not None else None
        client = await temporal_client.connect(
            settings,
            keys=settings.keys,
            lazy=True,
            runtime=temporal_client.new_runtime(metrics=buffer),
            interceptors=tracing.temporal_interceptors() if tracing is not None else (),
        )
    metrics = GrpcServerMetrics(temporal=buffer) if settings.metrics_port is not None else None
    readers = SlowReaders(settings.write_timeout.total_seconds(), settings.max_unsent_bytes)
    server = grpc.aio.server(
        interceptors=_interceptors(settings, metrics, readers, tracing),
        options=SERVER_OPTIONS,
        # A backstop: the limits' own caps, per class of service, refuse first.
        maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
    )
    # The same payloads as temporalio's default converter, for a fraction of its CPU.
    client = with_fast_json_client(client)
    # What visibility holds instead of a customer id is keyed with it (docs/decisions/0017).
    customer_id_key = settings.keys.customer_id_key
    orders = OrderWorkflows(
        client,
        task_queue=settings.task_queue,
        rpc_timeout=settings.temporal_rpc_timeout,
        customer_id_key=customer_id_key,
    )
    watchers = OrderWatchers(client, query_timeout=settings.temporal_rpc_timeout)
    service = OrderService(
        orders,
        OrderLister(TemporalVisibility(client, customer_id_key=customer_id_key)),
        watchers,
        page_tokens=PageTokens.for_keys(settings.keys.page_token_keys),
        payment_timeout_seconds=settings.payment_timeout_seconds,
    )
    pb_grpc.add_OrderServiceServicer_to_server(service, server)
    # NOT_SERVING before the first RPC can arrive, until Temporal answers a probe.
    prober = TemporalHealthProber(client, [SERVICE_NAME], settings.task_queue)
    health_pb2_grpc.add_HealthServicer_to_server(prober.health, server)
    if settings.reflection:
        reflection.enable_reflection(
            server,
            [SERVICE_NAME, grpc_health.SERVICE_NAME],
            # status, error_details: so grpcurl and GUIs decode the errors' google.rpc details.
            [
                pb.DESCRIPTOR,
                health_pb2.DESCRIPTOR,
                status_pb2.DESCRIPTOR,
                error_details_pb2.DESCRIPTOR,
            ],
            api_descriptors(),
        )
    address = _listen_address(settings.host, settings.port)
    try:
        if settings.tls_cert is not None and settings.tls_key is not None:
            credentials = tls.server_credentials(
                settings.tls_cert, settings.tls_key, settings.tls_client_ca
            )
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as err:  # grpc raises this when the address cannot be bound
        raise OSError(f"cannot listen on {address}: {err}") from err
    if port == 0:  # older grpc versions report a failed bind this way
        raise OSError(f"cannot listen on {address}")
    await prober.start()
    try:
        await server.start()
        readers.start([port])
        endpoint = None
        if metrics is not None and settings.metrics_port is not None:
            metrics_host = settings.metrics_host or settings.host
            endpoint = serve_metrics(
                metrics.registry, metrics_host, settings.metrics_port, drain=metrics.drain
            )
    except BaseException:
        await prober.stop()
        await readers.stop()
        await server.stop(None)
        raise
    return OrderServer(settings, port, client, server, prober, watchers, endpoint, readers)


def _log_security(settings: ServerSettings) -> None:
    """Says how callers are checked, and warns where anyone on the network gets in."""
    transport = "TLS" if settings.tls_enabled else "plain text"
    if settings.tls_client_ca is not None:
        transport = "mutual TLS (client certificates required)"
    tokens_file = settings.auth_tokens_file
    callers = f"bearer tokens from {tokens_file}" if tokens_file is not None else "no tokens"
    if settings.jwt_jwks_file is not None:
        callers += f", end-user JWTs signed by the keys in {settings.jwt_jwks_file}"
    reflection = "on" if settings.reflection else "off"
    logger.info("Security: %s, %s, reflection %s", transport, callers, reflection)
    host = settings.host
    if not settings.tls_enabled and not tls.is_loopback(host):
        logger.warning(
            "Plain text on %s (--allow-insecure-remote): tokens and orders cross the "
            "network unencrypted unless something else encrypts them",
            host,
        )
    if (
        tokens_file is None
        and settings.jwt_jwks_file is None
        and settings.tls_client_ca is None
        and not tls.is_loopback(host)
    ):
        logger.warning("No --auth-tokens-file: anyone who reaches %s may call every RPC", host)


async def serve(settings: ServerSettings, stop: asyncio.Event) -> None:
    """Runs the server until `stop` is set, then shuts it down gracefully."""
    async with otel.installed(otel.SERVER_SERVICE_NAME) as tracing:
        server = await start_server(settings, tracing=tracing)
        logger.info(
            "OrderService listening on %s (Temporal %s, task queue %s, "
            "payment timeout %s, Temporal RPC timeout %s)",
            _listen_address(settings.host, server.port),
            settings.describe_temporal(),
            settings.task_queue,
            format_duration(settings.payment_timeout),
            format_duration(settings.temporal_rpc_timeout),
        )
        _log_security(settings)
        if tracing is not None:
            logger.info("Tracing: %s", tracing.describe())
        if server.metrics is not None:
            logger.info(
                "Metrics at http://%s/metrics",
                _listen_address(server.metrics.host, server.metrics.port),
            )
        try:
            await stop.wait()
            logger.info("Shutting down (grace %ss)", SHUTDOWN_GRACE_SECONDS)
        finally:
            await server.stop(SHUTDOWN_GRACE_SECONDS)
    logger.info("OrderService stopped")
