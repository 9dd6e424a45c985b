"""Channels to the OrderService: retries, deadlines, keepalive and credentials set up once.

`connect(target)` gives a `grpc.aio.Channel`, `connect_sync(target)` a
`grpc.Channel`, both with `SERVICE_CONFIG`:

- every RPC is retried on UNAVAILABLE, up to 5 attempts, backoff 0.2 s
  doubling to 5 s (randomised by gRPC), throttled per channel once many fail;
- every unary RPC has a 10 s deadline unless the call sets a shorter one (it
  covers all attempts); WatchOrder has none: it lasts until the order is final.

Why each RPC is safe to retry (docs/client.md#what-retries): reads are; a
ConfirmPayment with the same transaction_id is processed once; a cancel is
cancelled once (a repeat may answer FAILED_PRECONDITION "already
cancelled"); a CreateOrder with the same request_id returns the first order,
and the channel gives every CreateOrder that has none a fresh one, so its
retries reach the same order. (The server answers UNAVAILABLE when Temporal
did not answer in time, which may have got the write all the same.) gRPC
retries a call only until it gets response headers or a message, so a
WatchOrder is retried only before its first message; the `watch_order`
iterator resumes one that drops later.

The server's RetryInfo is not honoured by these retries (gRPC honours only
the `grpc-retry-pushback-ms` trailer); `OrderServiceError.retry_delay` has it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from acme.orders.v1 import order_service_pb2 as pb
from acme_orders_client._version import __version__
from acme_orders_client.credentials import Tls

SERVICE = "acme.orders.v1.OrderService"
UNARY_METHODS = (
    "CreateOrder",
    "ConfirmPayment",
    "CancelOrder",
    "GetOrder",
    "GetOrderStatus",
    "GetEstimatedDelivery",
    "ListOrders",
)
STREAMING_METHODS = ("WatchOrder",)

# The channel's retries back off so, and so does watch_order's reopening of a stream.
INITIAL_BACKOFF_SECONDS = 0.2
MAX_BACKOFF_SECONDS = 5.0
BACKOFF_MULTIPLIER = 2
RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 5,
    "initialBackoff": f"{INITIAL_BACKOFF_SECONDS:g}s",
    "maxBackoff": f"{MAX_BACKOFF_SECONDS:g}s",
    "backoffMultiplier": BACKOFF_MULTIPLIER,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
# The deadline of each unary call. OrderServiceClient also passes it with every
# call: gRPC Python may start a service-config timeout from a stale clock, so a
# process's first calls can time out early (grpc/grpc issues 34547, 40633).
UNARY_TIMEOUT_SECONDS = 10.0
UNARY_TIMEOUT = f"{UNARY_TIMEOUT_SECONDS:g}s"

# https://github.com/grpc/grpc/blob/master/doc/service_config.md
SERVICE_CONFIG: dict[str, Any] = {
    "methodConfig": [
        {
            "name": [{"service": SERVICE, "method": m} for m in UNARY_METHODS],
            "timeout": UNARY_TIMEOUT,
            "retryPolicy": RETRY_POLICY,
        },
        {
            # No timeout: a watch lasts as long as the order is in flight.
            "name": [{"service": SERVICE, "method": m} for m in STREAMING_METHODS],
            "retryPolicy": RETRY_POLICY,
        },
    ],
    # Retries stop while more than half of this channel's recent calls failed:
    # each failure costs a token, each success gives back 0.1; no retry storm
    # when a server is down for good.
    "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
}

# The server pings idle connections after 60 s and accepts client pings every
# 10 s or more (docs/operations.md, Limits): 30 s finds a dead connection under
# a quiet WatchOrder within 40 s, well clear of "too_many_pings".
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
# The server sends answers up to 8 MiB (an order's state); gRPC's default is 4 MiB.
MAX_RECEIVE_MESSAGE_BYTES = 8 * 1024 * 1024

Options = Sequence[tuple[str, Any]]


def channel_options(
    service_config: Mapping[str, Any] | None = SERVICE_CONFIG,
    *,
    tls: Tls | None = None,
    options: Options = (),
) -> list[tuple[str, Any]]:
    """The channel arguments `connect` uses; `options` are added last and win."""
    base: list[tuple[str, Any]] = [
        ("grpc.primary_user_agent", f"acme-orders-client/{__version__}"),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # Keep pinging while a watch receives nothing (gRPC's default stops after 2 pings).
        ("grpc.http2.max_pings_without_data", 0),
        # No pings without an open call: an idle channel reconnects when next used.
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
    ]
    if service_config is not None:
        base += [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(service_config)),
            # Ours, never one from a DNS TXT record.
            ("grpc.service_config_disable_resolution", 1),
        ]
    else:
        base.append(("grpc.enable_retries", 0))
    if tls is not None and tls.server_name:
        base.append(("grpc.ssl_target_name_override", tls.server_name))
    return _merged(base, options)


def _merged(base: list[tuple[str, Any]], extra: Options) -> list[tuple[str, Any]]:
    overridden = {key for key, _ in extra}
    return [(k, v) for k, v in base if k not in overridden] + list(extra)


def _channel_credentials(
    tls: Tls | None, credentials: grpc.CallCredentials | None
) -> grpc.ChannelCredentials | None:
    """None for a plain-text channel without call credentials."""
    if tls is not None:
        channel = tls.channel_credentials()
    elif credentials is not None:
        # Plain text, yet call credentials allowed: only to a loopback address.
        channel = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    else:
        return None
    if credentials is not None:
        channel = grpc.composite_channel_credentials(channel, credentials)
    return channel


def _with_request_id(request: Any) -> Any:
    """A CreateOrder request with a request_id (a fresh UUID if it had none): retries are safe."""
    if not isinstance(request, pb.CreateOrderRequest) or request.request_id:
        return request
    copy = pb.CreateOrderRequest()
    copy.CopyFrom(request)  # the caller's message stays as it was
    copy.request_id = str(uuid.uuid4())
    return copy


if TYPE_CHECKING:  # generic in grpc-stubs only
    _AioInterceptor = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _SyncInterceptor = grpc.UnaryUnaryClientInterceptor[Any, Any]
else:
    _AioInterceptor = grpc.aio.UnaryUnaryClientInterceptor
    _SyncInterceptor = grpc.UnaryUnaryClientInterceptor


class _RequestIdAio(_AioInterceptor):
    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(client_call_details, _with_request_id(request))


class _RequestIdSync(_SyncInterceptor):
    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        return continuation(client_call_details, _with_request_id(request))


def connect(
    target: str,
    *,
    tls: Tls | None = None,
    credentials: grpc.CallCredentials | None = None,
    service_config: Mapping[str, Any] | None = SERVICE_CONFIG,
    options: Options = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """An asyncio channel to the OrderService at `target` ("host:port").

    tls: None for plain text (a local server, or a sidecar that encrypts).
    credentials: `bearer_token(...)` or `jwt_credentials(...)`; without TLS
    only to a loopback address. service_config: None turns retries and
    default deadlines off. Use it as `async with connect(...) as channel:`,
    or close it with `await channel.close()`.
    """
    args = channel_options(service_config, tls=tls, options=options)
    chain: list[Any] = [_RequestIdAio(), *interceptors]
    channel_credentials = _channel_credentials(tls, credentials)
    if channel_credentials is None:
        return grpc.aio.insecure_channel(target, options=args, interceptors=chain)
    return grpc.aio.secure_channel(target, channel_credentials, options=args, interceptors=chain)


def connect_sync(
    target: str,
    *,
    tls: Tls | None = None,
    credentials: grpc.CallCredentials | None = None,
    service_config: Mapping[str, Any] | None = SERVICE_CONFIG,
    options: Options = (),
) -> grpc.Channel:
    """The same channel as `connect`, for synchronous code (`grpc.Channel`)."""
    args = channel_options(service_config, tls=tls, options=options)
    channel_credentials = _channel_credentials(tls, credentials)
    if channel_credentials is None:
        channel = grpc.insecure_channel(target, options=args)
    else:
        channel = grpc.secure_channel(target, channel_credentials, options=args)
    return grpc.intercept_channel(channel, _RequestIdSync())
