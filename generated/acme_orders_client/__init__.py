"""A client for acme.orders.v1.OrderService: channels, credentials, typed errors, watch_order.

    from acme_orders_client import OrderServiceClient, bearer_token, errors
    from acme.orders.v1 import order_service_pb2 as pb

    async with OrderServiceClient.connect("localhost:50051") as orders:
        created = await orders.create_order(pb.CreateOrderRequest(...))
        async for order in orders.watch_order(created.order_id):
            ...

docs/client.md in the repository tells the rest.
"""

from acme_orders_client import errors
from acme_orders_client._version import API_PACKAGE, __version__
from acme_orders_client.channel import (
    SERVICE_CONFIG,
    channel_options,
    connect,
    connect_sync,
)
from acme_orders_client.client import OrderServiceClient
from acme_orders_client.credentials import Tls, bearer_token, jwt_credentials
from acme_orders_client.errors import OrderServiceError, from_rpc_error
from acme_orders_client.watch import watch_order

__all__ = [
    "API_PACKAGE",
    "SERVICE_CONFIG",
    "OrderServiceClient",
    "OrderServiceError",
    "Tls",
    "__version__",
    "bearer_token",
    "channel_options",
    "connect",
    "connect_sync",
    "errors",
    "from_rpc_error",
    "jwt_credentials",
    "watch_order",
]
