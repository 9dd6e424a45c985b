"""Request validation: pure functions that report every violation at once, as a BadRequest."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from google.protobuf import timestamp_pb2
from google.type import money_pb2

from acme.orders.v1 import order_service_pb2 as pb
from server.api import convert, ids
from server.api.errors import FieldViolation, InvalidArgument, field_violation
from server.temporal import listing
from workflows import models, rules
from workflows.money import NANOS_PER_UNIT, Money

MAX_ITEMS = 100
MAX_QUANTITY = 10_000
MAX_ORDER_TOTAL_UNITS = 10**12
MAX_NANOS = NANOS_PER_UNIT - 1
MAX_ID_LENGTH = 64
MAX_PRODUCT_NAME_LENGTH = 200
MAX_SHIPPING_FIELD_LENGTH = 200
MAX_EMAIL_LENGTH = 254
MAX_TRANSACTION_ID_LENGTH = 128
MAX_PAYMENT_METHOD_LENGTH = 64
MAX_CANCEL_REASON_LENGTH = 500

# Each kind of identifier: the characters it may hold, said for people, and its longest length.
_IDENTIFIERS = {
    "customer_id": ("A-Za-z0-9._:@-", "letters, digits and . _ : @ -", MAX_ID_LENGTH),
    "product_id": ("A-Za-z0-9._:@-", "letters, digits and . _ : @ -", MAX_ID_LENGTH),
    "order_id": ("A-Za-z0-9._-", "letters, digits and . _ -", MAX_ID_LENGTH),
    "transaction_id": ("A-Za-z0-9._:-", "letters, digits and . _ : -", MAX_TRANSACTION_ID_LENGTH),
    "payment_method": ("A-Za-z0-9._-", "letters, digits and . _ -", MAX_PAYMENT_METHOD_LENGTH),
}
_PATTERNS = {kind: re.compile(f"[{chars}]+") for kind, (chars, *_) in _IDENTIFIERS.items()}
_CURRENCY_CODE = re.compile(r"[A-Z]{3}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799


class _Violations:
    """Collects violations; raises them together at the end."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str, reason: str) -> None:
        self.items.append(field_violation(field, description, reason))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)


_CONTROL_CHARS = re.compile(f"[{rules.CONTROL_CHARS}]")  # Cc, Zl and Zp


def _has_control_chars(text: str) -> bool:
    """Control characters (Cc) and line/paragraph separators (Zl, Zp)."""
    return _CONTROL_CHARS.search(text) is not None


def is_identifier(kind: str, value: str) -> bool:
    """Whether `value` is a valid identifier of `kind` ("customer_id" ...), as requests check it."""
    _, _, max_length = _IDENTIFIERS[kind]
    return 0 < len(value) <= max_length and _PATTERNS[kind].fullmatch(value) is not None


def _check_identifier(v: _Violations, field: str, value: str) -> None:
    """`field` ("items[0].product_id" too) holds an identifier of the kind its last name says."""
    kind = field.rpartition(".")[2]
    _, chars, max_length = _IDENTIFIERS[kind]
    if not value:
        v.add(field, "Required.", "REQUIRED")
    elif len(value) > max_length:
        v.add(field, f"Must be at most {max_length} characters.", "TOO_LONG")
    elif not _PATTERNS[kind].fullmatch(value):
        v.add(field, f"May contain only {chars}.", "INVALID_CHARACTERS")


def _check_text(v: _Violations, field: str, value: str, max_length: int) -> None:
    if not value.strip():
        v.add(field, "Required.", "REQUIRED")
    elif len(value) > max_length:
        v.add(field, f"Must be at most {max_length} characters.", "TOO_LONG")
    elif _has_control_chars(value):
        v.add(field, "Must not contain control characters.", "INVALID_CHARACTERS")


def _check_reason(v: _Violations, reason: str) -> None:
    """The cancellation reason: optional, one line, nothing that reorders text (rules.py)."""
    if len(reason) > MAX_CANCEL_REASON_LENGTH:
        v.add("reason", f"Must be at most {MAX_CANCEL_REASON_LENGTH} characters.", "TOO_LONG")
    elif not rules.is_safe_reason(reason):
        v.add(
            "reason",
            "Must be one line of text, without control characters (line breaks and tabs "
            "included) or bidirectional formatting characters (U+061C, U+200E, U+200F, "
            "U+202A to U+202E, U+2066 to U+2069).",
            "INVALID_CHARACTERS",
        )


def _check_money(v: _Violations, field: str, money: money_pb2.Money) -> Money | None:
    """Checks google.type.Money's own rules; returns the amount if they hold."""
    valid = True
    if not _CURRENCY_CODE.fullmatch(money.currency_code):
        v.add(
            f"{field}.currency_code",
            "Must be a 3-letter ISO 4217 code in upper case, e.g. USD.",
            "INVALID_CURRENCY",
        )
        valid = False
    if not -MAX_NANOS <= money.nanos <= MAX_NANOS:
        v.add(f"{field}.nanos", f"Must be between -{MAX_NANOS} and {MAX_NANOS}.", "OUT_OF_RANGE")
        valid = False
    elif (money.units > 0 and money.nanos < 0) or (money.units < 0 and money.nanos > 0):
        v.add(f"{field}.nanos", "Must have the same sign as units.", "SIGN_MISMATCH")
        valid = False
    return convert.money_from_proto(money) if valid else None


def _check_item(v: _Violations, index: int, item: pb.OrderItem) -> models.OrderItem | None:
    field = f"items[{index}]"
    errors_before = len(v.items)
    _check_identifier(v, f"{field}.product_id", item.product_id)
    _check_text(v, f"{field}.product_name", item.product_name, MAX_PRODUCT_NAME_LENGTH)
    if not 1 <= item.quantity <= MAX_QUANTITY:
        v.add(f"{field}.quantity", f"Must be between 1 and {MAX_QUANTITY:,}.", "OUT_OF_RANGE")
    price: Money | None = None
    if not item.HasField("price"):
        v.add(f"{field}.price", "Required.", "REQUIRED")
    else:
        price = _check_money(v, f"{field}.price", item.price)
        if price is not None and price.total_nanos < 0:
            v.add(f"{field}.price", "Must not be negative.", "OUT_OF_RANGE")
    if price is None or len(v.items) > errors_before:
        return None
    return models.OrderItem(
        product_id=item.product_id,
        product_name=item.product_name,
        quantity=item.quantity,
        price=price,
    )


def _check_items(v: _Violations, items: Sequence[pb.OrderItem]) -> list[models.OrderItem]:
    if not items:
        v.add("items", "At least one item is required.", "REQUIRED")
        return []
    if len(items) > MAX_ITEMS:
        # Skip the per-item checks: their violations would be too many to return.
        v.add("items", f"At most {MAX_ITEMS} items per order; got {len(items)}.", "TOO_MANY")
        return []
    errors_before = len(v.items)
    checked = [_check_item(v, index, item) for index, item in enumerate(items)]
    currency = next((item.price.currency_code for item in checked if item is not None), None)
    for index, item in enumerate(checked):
        if item is not None and item.price.currency_code != currency:
            v.add(
                f"items[{index}].price.currency_code",
                f"All items must use one currency; the first item uses {currency}.",
                "CURRENCY_MISMATCH",
            )
    valid = [item for item in checked if item is not None]
    if len(v.items) > errors_before:
        return valid  # a total of invalid items means nothing
    total = models.order_total(valid)
    if total.total_nanos <= 0:
        v.add("items", "The order total must be greater than zero.", "OUT_OF_RANGE")
    elif total.total_nanos > MAX_ORDER_TOTAL_UNITS * NANOS_PER_UNIT:
        v.add(
            "items",
            f"The order total {total} exceeds the maximum of {MAX_ORDER_TOTAL_UNITS:,} units.",
            "OUT_OF_RANGE",
        )
    return valid


def _check_request_id(v: _Violations, request_id: str) -> str | None:
    """The normalized request_id, or None when absent or invalid."""
    if not request_id:
        return None
    if not _UUID.fullmatch(request_id):
        v.add(
            "request_id",
            "Must be a UUID such as 123e4567-e89b-12d3-a456-426614174000.",
            "INVALID_FORMAT",
        )
        return None
    return ids.normalize_request_id(request_id)


def _check_email(v: _Violations, email: str) -> None:
    if not email:
        return
    if len(email) > MAX_EMAIL_LENGTH:
        v.add("customer_email", f"Must be at most {MAX_EMAIL_LENGTH} characters.", "TOO_LONG")
    elif _has_control_chars(email) or not _mailable(email):
        v.add("customer_email", "Must be an email address like name@example.com.", "INVALID_FORMAT")


def _mailable(email: str) -> bool:
    """The mailer's own rule, so an accepted address is one the emails can go to."""
    try:
        rules.parse_email_address(email)
    except rules.InvalidEmailAddress:
        return False
    return True


def validate_create_order(
    request: pb.CreateOrderRequest,
    *,
    payment_timeout_seconds: int = models.DEFAULT_PAYMENT_TIMEOUT_SECONDS,
) -> models.OrderInput:
    """The workflow input for a valid CreateOrder; raises InvalidArgument otherwise.

    The order id is derived from the request_id when there is one (so a retry
    gets the same id), random otherwise.
    """
    v = _Violations()
    _check_identifier(v, "customer_id", request.customer_id)
    items = _check_items(v, request.items)
    for field in ("shipping_address", "shipping_city", "shipping_postal_code", "shipping_country"):
        _check_text(v, field, getattr(request, field), MAX_SHIPPING_FIELD_LENGTH)
    request_id = _check_request_id(v, request.request_id)
    _check_email(v, request.customer_email)
    v.raise_if_any()
    return models.OrderInput(
        order_id=ids.new_order_id(request_id),
        customer_id=request.customer_id,
        items=items,
        shipping=models.ShippingAddress(
            address=request.shipping_address,
            city=request.shipping_city,
            postal_code=request.shipping_postal_code,
            country=request.shipping_country,
        ),
        customer_email=request.customer_email,
        payment_timeout_seconds=payment_timeout_seconds,
        request_fingerprint=ids.request_fingerprint(request),
    )


def validate_order_id(order_id: str) -> str:
    """A well-formed order id (whether it exists is Temporal's to say: NOT_FOUND)."""
    v = _Violations()
    _check_identifier(v, "order_id", order_id)
    v.raise_if_any()
    return order_id


def validate_confirm_payment(
    request: pb.ConfirmPaymentRequest,
) -> tuple[str, models.PaymentRequest]:
    """The order id and the `confirm_payment` signal's argument."""
    v = _Violations()
    _check_identifier(v, "order_id", request.order_id)
    _check_identifier(v, "transaction_id", request.transaction_id)
    amount: Money | None = None
    if not request.HasField("amount"):
        v.add("amount", "Required.", "REQUIRED")
    else:
        amount = _check_money(v, "amount", request.amount)
        if amount is not None and amount.total_nanos <= 0:
            v.add("amount", "Must be greater than zero.", "OUT_OF_RANGE")
    _check_identifier(v, "payment_method", request.payment_method)
    v.raise_if_any()
    assert amount is not None  # no violation means the amount was checked
    return request.order_id, models.PaymentRequest(
        transaction_id=request.transaction_id,
        amount=amount,
        payment_method=request.payment_method,
    )


def validate_cancel_order(request: pb.CancelOrderRequest) -> tuple[str, models.CancelRequest]:
    """The order id and the `cancel_order` signal's argument (with a default reason)."""
    v = _Violations()
    _check_identifier(v, "order_id", request.order_id)
    _check_reason(v, request.reason)
    v.raise_if_any()
    reason = request.reason.strip() or models.DEFAULT_CANCEL_REASON
    return request.order_id, models.CancelRequest(reason=reason)


def _check_timestamp(
    v: _Violations, field: str, timestamp: timestamp_pb2.Timestamp
) -> datetime | None:
    """The instant as an aware datetime, rounded up to the microsecond.

    Order times have microseconds, so rounding up keeps both `>=` and `<`
    exact for them.
    """
    if not MIN_TIMESTAMP_SECONDS <= timestamp.seconds <= MAX_TIMESTAMP_SECONDS:
        v.add(
            field, "Must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z.", "OUT_OF_RANGE"
        )
        return None
    if not 0 <= timestamp.nanos <= MAX_NANOS:
        v.add(f"{field}.nanos", f"Must be between 0 and {MAX_NANOS}.", "OUT_OF_RANGE")
        return None
    micros = -(-timestamp.nanos // 1000)
    try:
        return convert.EPOCH + timedelta(seconds=timestamp.seconds, microseconds=micros)
    except OverflowError:  # rounding up past 9999-12-31T23:59:59.999999
        return datetime.max.replace(tzinfo=UTC)


def _check_page_size(v: _Violations, page_size: int) -> int:
    if page_size < 0:
        v.add("page_size", "Must not be negative.", "OUT_OF_RANGE")
    if page_size == 0:
        return listing.DEFAULT_PAGE_SIZE
    return min(page_size, listing.MAX_PAGE_SIZE)


def _check_page_token(
    v: _Violations,
    text: str,
    list_filter: listing.ListFilter | None,
    tokens: listing.PageTokens,
) -> listing.PageToken | None:
    if not text:
        return None
    if len(text) > listing.MAX_PAGE_TOKEN_CHARS:
        v.add(
            "page_token",
            f"Must be at most {listing.MAX_PAGE_TOKEN_CHARS} characters; pass a response's "
            "next_page_token unchanged.",
            "TOO_LONG",
        )
        return None
    try:
        # Size, then signature, then content (server/temporal/listing.py).
        token = tokens.decode(text)
    except ValueError:
        v.add(
            "page_token",
            "Not a page token from this service; pass a response's next_page_token unchanged.",
            "INVALID_PAGE_TOKEN",
        )
        return None
    if list_filter is not None and token.filter_digest != list_filter.digest():
        v.add(
            "page_token",
            "Belongs to a request with other filters; customer_id, status, created_after "
            "and created_before must be the same as in that request.",
            "PAGE_TOKEN_MISMATCH",
        )
        return None
    return token


def validate_list_orders(
    request: pb.ListOrdersRequest, tokens: listing.PageTokens
) -> listing.ListRequest:
    """The filters, page size and position of a valid ListOrders.

    tokens: what checks the page token's signature (the lister's).

    page_size 0 means listing.DEFAULT_PAGE_SIZE (50); above listing.MAX_PAGE_SIZE
    (1000) it is lowered to it. Any customer_id up to 64 characters is a valid
    filter: one no order has simply finds nothing.
    """
    v = _Violations()
    page_size = _check_page_size(v, request.page_size)
    if len(request.customer_id) > MAX_ID_LENGTH:
        v.add("customer_id", f"Must be at most {MAX_ID_LENGTH} characters.", "TOO_LONG")
    status: models.OrderStatus | None = None
    if request.status not in pb.OrderStatus.values():
        v.add("status", "Must be one of the OrderStatus values.", "INVALID_ENUM_VALUE")
    elif request.status != pb.ORDER_STATUS_UNSPECIFIED:
        status = convert.status_from_proto(request.status)
    after = before = None
    if request.HasField("created_after"):
        after = _check_timestamp(v, "created_after", request.created_after)
    if request.HasField("created_before"):
        before = _check_timestamp(v, "created_before", request.created_before)
    if after is not None and before is not None:
        given_after = (request.created_after.seconds, request.created_after.nanos)
        given_before = (request.created_before.seconds, request.created_before.nanos)
        if given_after >= given_before:
            v.add("created_before", "Must be later than created_after.", "INVALID_RANGE")
    errors_before_token = len(v.items)
    list_filter = listing.ListFilter(
        customer_id=request.customer_id,
        status=status,
        created_after=after,
        created_before=before,
    )
    # A token is checked against the filters only when they are valid themselves.
    token = _check_page_token(
        v, request.page_token, list_filter if errors_before_token == 0 else None, tokens
    )
    v.raise_if_any()
    return listing.ListRequest(filter=list_filter, page_size=page_size, page_token=token)
