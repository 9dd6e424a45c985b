"""Which caller may see which order: the one place a customer's scope is decided.

The auth interceptor binds the caller of each RPC (`bind`); the servicer asks
here before it answers with an order. System callers (tokens file) see every
order; a customer (end-user JWT) only its own (docs/decisions/0020).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

import grpc

from acme.orders.v1 import order_service_pb2 as pb
from infra import logs
from server.api import errors


@dataclass(frozen=True)
class Principal:
    """Who is calling, as the RPCs see it."""

    # How logs and the audit trail name it: a tokens-file name, or jwt:<keyed hash>.
    name: str
    # Full method names ("/acme.orders.v1.OrderService/GetOrder"); None: every method.
    methods: frozenset[str] | None = None
    # A customer, limited to its own orders; None: a system caller, every order.
    customer_id: str | None = None
    # A system caller's role in the tokens file, if its entry names one.
    role: str | None = None

    def may_call(self, method: str) -> bool:
        return self.methods is None or method in self.methods


# Without credentials configured every caller is this one, as before tokens existed.
ANONYMOUS = Principal("anonymous")

# grpc.aio serves each RPC in a task of its own: a value bound by the interceptor
# is seen by that RPC's handler only (grpc's examples/python/interceptors/async).
_principal: ContextVar[Principal] = ContextVar("order_principal", default=ANONYMOUS)


def bind(principal: Principal) -> None:
    """Makes `principal` the caller of the RPC being served, for access checks and logs."""
    _principal.set(principal)
    logs.set_caller(principal.name)


def current() -> Principal:
    """The caller of the RPC being served."""
    return _principal.get()


class CustomerMismatch(errors.ServiceError):
    """PERMISSION_DENIED: a customer asking for another customer's orders."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "CUSTOMER_MISMATCH"

    def __init__(self, field: str, what: str) -> None:
        super().__init__(
            f"A customer may {what} only for itself: {field} must be the customer id "
            "its token names.",
            metadata={"field": field},
        )


def ensure_visible(order_id: str, customer_id: str) -> None:
    """Nothing for a caller that may see the order; else the very NOT_FOUND of a missing
    order, so that another customer's order ids reveal nothing, not even that they exist."""
    own = current().customer_id
    if own is not None and own != customer_id:
        raise errors.OrderNotFound(order_id)


def ensure_own_customer(customer_id: str) -> None:
    """CreateOrder: a customer creates orders for itself only."""
    own = current().customer_id
    if own is not None and own != customer_id:
        raise CustomerMismatch("customer_id", "create orders")


def scoped_list_request(request: pb.ListOrdersRequest) -> pb.ListOrdersRequest:
    """ListOrders as the caller may ask it: a customer's filter is always itself.

    An empty customer_id becomes the customer's own before validation, so that page
    tokens are bound to the filter actually used; another customer's is refused.
    """
    own = current().customer_id
    if own is None or request.customer_id == own:
        return request
    if request.customer_id:
        raise CustomerMismatch("customer_id", "list orders")
    scoped = pb.ListOrdersRequest()
    scoped.CopyFrom(request)
    scoped.customer_id = own
    return scoped
