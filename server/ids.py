"""Order ids and request fingerprints.

An order id is "ORD-" and 16 Crockford base32 characters: 80 bits, random when
the request has no request_id. With a request_id the bits come from its
SHA-256, so a retried CreateOrder maps to the same order id, hence the same
workflow id, and Temporal itself refuses to start the order twice.
"""

from __future__ import annotations

import hashlib
import secrets

from acme.orders.v1 import order_service_pb2 as pb

ORDER_ID_PREFIX = "ORD-"
# Crockford's base32: no I, L, O or U, so ids survive being read aloud or retyped.
CROCKFORD_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ORDER_ID_BITS = 80
ORDER_ID_CHARS = ORDER_ID_BITS // 5

# Separates this use of SHA-256 from any other hash of the same request_id.
_REQUEST_ID_DOMAIN = b"acme.orders.v1.CreateOrder.request_id\x00"


def _crockford(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, digit = divmod(value, 32)
        chars.append(CROCKFORD_ALPHABET[digit])
    return "".join(reversed(chars))


def normalize_request_id(request_id: str) -> str:
    """The canonical form of a request_id: a UUID is case-insensitive, so lowercase."""
    return request_id.strip().lower()


def new_order_id(request_id: str | None) -> str:
    """A new order id: random, or derived from the request_id so that retries agree."""
    if request_id:
        digest = hashlib.sha256(_REQUEST_ID_DOMAIN + normalize_request_id(request_id).encode())
        bits = int.from_bytes(digest.digest()[: ORDER_ID_BITS // 8], "big")
    else:
        bits = secrets.randbits(ORDER_ID_BITS)
    return ORDER_ID_PREFIX + _crockford(bits, ORDER_ID_CHARS)


def request_fingerprint(request: pb.CreateOrderRequest) -> str:
    """SHA-256 (hex) of the request without its request_id.

    Stored in the workflow, it tells a true retry (same fingerprint) from a
    different order that reuses a request_id. Deterministic serialization
    writes fields in field-number order and map entries sorted, so equal
    requests give equal bytes.
    """
    copy = pb.CreateOrderRequest()
    copy.CopyFrom(request)
    copy.ClearField("request_id")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()
