"""Order ids (from the request_id when there is one, so retries agree) and request fingerprints."""

from __future__ import annotations

import base64
import hashlib
import secrets

from acme.orders.v1 import order_service_pb2 as pb

ORDER_ID_PREFIX = "ORD-"
# Crockford's base32: no I, L, O or U, so ids survive being read aloud or retyped.
CROCKFORD_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# RFC 4648 base32 digit by digit, the same 5-bit groups: 10 bytes are 16 characters.
_TO_CROCKFORD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", CROCKFORD_ALPHABET)
ORDER_ID_BYTES = 10

# Separates this use of SHA-256 from any other hash of the same request_id.
_REQUEST_ID_DOMAIN = b"acme.orders.v1.CreateOrder.request_id\x00"


def normalize_request_id(request_id: str) -> str:
    """The canonical form of a request_id: a UUID is case-insensitive, so lowercase."""
    return request_id.strip().lower()


def new_order_id(request_id: str | None) -> str:
    """A new order id: random, or derived from the request_id so that retries agree."""
    if request_id:
        digest = hashlib.sha256(_REQUEST_ID_DOMAIN + normalize_request_id(request_id).encode())
        raw = digest.digest()[:ORDER_ID_BYTES]
    else:
        raw = secrets.token_bytes(ORDER_ID_BYTES)
    return ORDER_ID_PREFIX + base64.b32encode(raw).decode().translate(_TO_CROCKFORD)


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
