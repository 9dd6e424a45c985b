"""The audit trail: one line on the logger `audit` for every write, refused ones included.

Who (the caller bound by the auth interceptor), what (the RPC), which order,
and the outcome (the gRPC status code's name), e.g.
`audit: caller=storefront rpc=CancelOrder order_id=ORD-... code=OK peer=ipv4:...`.
"""

from __future__ import annotations

import logging

import grpc

from server.api import access
from server.platform.tokens import ORDER_METHODS

logger = logging.getLogger("audit")

# The RPCs that change an order, and their full names, as the request path sees them:
# it writes their lines, once it knows the outcome (server/platform/request_path.py).
WRITES = ("CreateOrder", "ConfirmPayment", "CancelOrder")
AUDITED_METHODS = frozenset(ORDER_METHODS[rpc] for rpc in WRITES)


def record(rpc: str, order_id: str, code: grpc.StatusCode, peer: str) -> None:
    """The audit line of one write; the caller is the one the token check bound."""
    logger.info(
        "caller=%s rpc=%s order_id=%s code=%s peer=%s",
        access.current().name,
        rpc,
        order_id or "-",
        code.name,
        peer,
    )
