"""server.validation: every rule, its field path, and exact money arithmetic."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from google.type.money_pb2 import Money as PbMoney

from acme.orders.v1 import order_service_pb2 as pb
from server.api import ids, validation
from server.api.errors import InvalidArgument
from workflows import models
from workflows.money import Money

REQUEST_ID = "123e4567-e89b-12d3-a456-426614174000"


def usd(units: int, nanos: int = 0, currency: str = "USD") -> PbMoney:
    return PbMoney(currency_code=currency, units=units, nanos=nanos)


def item(**fields: object) -> pb.OrderItem:
    values: dict[str, object] = {
        "product_id": "PROD-123",
        "product_name": "Laptop",
        "quantity": 1,
        "price": usd(999, 990_000_000),
    }
    values.update(fields)
    return pb.OrderItem(**values)  # type: ignore[arg-type]


def create(**fields: object) -> pb.CreateOrderRequest:
    values: dict[str, object] = {
        "customer_id": "CUST-001",
        "items": [item()],
        "shipping_address": "123 Main St",
        "shipping_city": "San Francisco",
        "shipping_postal_code": "94102",
        "shipping_country": "USA",
    }
    values.update(fields)
    return pb.CreateOrderRequest(**values)  # type: ignore[arg-type]


def violations(check: Callable[[], object]) -> dict[str, str]:
    """field -> reason of every violation the check raises."""
    with pytest.raises(InvalidArgument) as caught:
        check()
    return {v.field: v.reason for v in caught.value.violations}


def create_violations(request: pb.CreateOrderRequest) -> dict[str, str]:
    return violations(lambda: validation.validate_create_order(request))


# --- CreateOrder: the valid case ----------------------------------------------------


def test_valid_create_becomes_order_input() -> None:
    request = create(customer_email="cust-001@example.com", items=[item(quantity=3)])
    order = validation.validate_create_order(request, payment_timeout_seconds=90)
    assert re.fullmatch(r"ORD-[0-9A-HJKMNP-TV-Z]{16}", order.order_id)
    assert order.customer_id == "CUST-001"
    assert order.items == [
        models.OrderItem("PROD-123", "Laptop", 3, Money("USD", 999, 990_000_000))
    ]
    assert order.shipping == models.ShippingAddress("123 Main St", "San Francisco", "94102", "USA")
    assert order.customer_email == "cust-001@example.com"
    assert order.payment_timeout_seconds == 90
    assert order.request_fingerprint == ids.request_fingerprint(request)


def test_default_payment_timeout_is_the_models_default() -> None:
    order = validation.validate_create_order(create())
    assert order.payment_timeout_seconds == models.DEFAULT_PAYMENT_TIMEOUT_SECONDS


def test_request_id_gives_a_stable_order_id_in_any_case() -> None:
    lower = validation.validate_create_order(create(request_id=REQUEST_ID))
    upper = validation.validate_create_order(create(request_id=REQUEST_ID.upper()))
    assert lower.order_id == upper.order_id == ids.new_order_id(REQUEST_ID)


def test_without_request_id_every_order_id_is_new() -> None:
    first = validation.validate_create_order(create())
    second = validation.validate_create_order(create())
    assert first.order_id != second.order_id


@pytest.mark.parametrize(
    "name",
    ["Laptop", "Café crème 15\u00a0cm", "👩\u200d💻 sticker", "A" * 200, "日本語のキーボード"],
)
def test_printable_product_names_pass(name: str) -> None:
    validation.validate_create_order(create(items=[item(product_name=name)]))


@pytest.mark.parametrize("customer_id", ["C", "cust:42@shop.example", "a.b_c-d", "x" * 64])
def test_customer_ids_pass(customer_id: str) -> None:
    validation.validate_create_order(create(customer_id=customer_id))


def test_limits_are_inclusive() -> None:
    validation.validate_create_order(
        create(items=[item(quantity=10_000, product_id="p" * 64)] * 100, shipping_city="c" * 200)
    )


def test_zero_price_item_is_fine_when_the_total_is_positive() -> None:
    validation.validate_create_order(create(items=[item(price=usd(0)), item()]))


@pytest.mark.parametrize(
    "email", ["a@b.co", "first.last+tag@sub.example.com", "x" * 240 + "@ex.com"]
)
def test_emails_pass(email: str) -> None:
    validation.validate_create_order(create(customer_email=email))


# --- CreateOrder: one bad field at a time -------------------------------------------

BAD_CREATES: list[tuple[str, pb.CreateOrderRequest, str, str]] = [
    ("no customer", create(customer_id=""), "customer_id", "REQUIRED"),
    ("long customer", create(customer_id="c" * 65), "customer_id", "TOO_LONG"),
    ("customer with space", create(customer_id="CUST 1"), "customer_id", "INVALID_CHARACTERS"),
    ("customer non-ASCII", create(customer_id="Ö"), "customer_id", "INVALID_CHARACTERS"),
    ("no items", create(items=[]), "items", "REQUIRED"),
    ("101 items", create(items=[item()] * 101), "items", "TOO_MANY"),
    ("no product id", create(items=[item(product_id="")]), "items[0].product_id", "REQUIRED"),
    (
        "long product id",
        create(items=[item(product_id="p" * 65)]),
        "items[0].product_id",
        "TOO_LONG",
    ),
    (
        "product id with slash",
        create(items=[item(product_id="a/b")]),
        "items[0].product_id",
        "INVALID_CHARACTERS",
    ),
    ("no product name", create(items=[item(product_name="")]), "items[0].product_name", "REQUIRED"),
    (
        "blank product name",
        create(items=[item(product_name="  ")]),
        "items[0].product_name",
        "REQUIRED",
    ),
    (
        "long product name",
        create(items=[item(product_name="x" * 201)]),
        "items[0].product_name",
        "TOO_LONG",
    ),
    (
        "control char in name",
        create(items=[item(product_name="Lap\x07top")]),
        "items[0].product_name",
        "INVALID_CHARACTERS",
    ),
    (
        "newline in name",
        create(items=[item(product_name="Lap\ntop")]),
        "items[0].product_name",
        "INVALID_CHARACTERS",
    ),
    ("zero quantity", create(items=[item(quantity=0)]), "items[0].quantity", "OUT_OF_RANGE"),
    ("negative quantity", create(items=[item(quantity=-1)]), "items[0].quantity", "OUT_OF_RANGE"),
    ("quantity 10,001", create(items=[item(quantity=10_001)]), "items[0].quantity", "OUT_OF_RANGE"),
    (
        "no price",
        create(items=[pb.OrderItem(product_id="P", product_name="N", quantity=1)]),
        "items[0].price",
        "REQUIRED",
    ),
    ("negative price", create(items=[item(price=usd(-1))]), "items[0].price", "OUT_OF_RANGE"),
    ("negative nanos", create(items=[item(price=usd(0, -1))]), "items[0].price", "OUT_OF_RANGE"),
    (
        "lowercase currency",
        create(items=[item(price=usd(1, currency="usd"))]),
        "items[0].price.currency_code",
        "INVALID_CURRENCY",
    ),
    (
        "empty currency",
        create(items=[item(price=usd(1, currency=""))]),
        "items[0].price.currency_code",
        "INVALID_CURRENCY",
    ),
    (
        "4-letter currency",
        create(items=[item(price=usd(1, currency="USDT"))]),
        "items[0].price.currency_code",
        "INVALID_CURRENCY",
    ),
    (
        "nanos too big",
        create(items=[item(price=usd(1, 1_000_000_000))]),
        "items[0].price.nanos",
        "OUT_OF_RANGE",
    ),
    (
        "nanos too small",
        create(items=[item(price=usd(-1, -1_000_000_000))]),
        "items[0].price.nanos",
        "OUT_OF_RANGE",
    ),
    (
        "units and nanos of opposite signs",
        create(items=[item(price=usd(1, -5))]),
        "items[0].price.nanos",
        "SIGN_MISMATCH",
    ),
    (
        "mixed currencies",
        create(items=[item(), item(), item(price=usd(1, currency="EUR"))]),
        "items[2].price.currency_code",
        "CURRENCY_MISMATCH",
    ),
    ("zero total", create(items=[item(price=usd(0))]), "items", "OUT_OF_RANGE"),
    (
        "total over 10^12",
        create(items=[item(price=usd(900_000_000_000), quantity=10_000)]),
        "items",
        "OUT_OF_RANGE",
    ),
    (
        "price beyond int64 sums",
        create(items=[item(price=usd(2**63 - 1, 999_999_999), quantity=10_000)] * 2),
        "items",
        "OUT_OF_RANGE",
    ),
    ("no address", create(shipping_address=""), "shipping_address", "REQUIRED"),
    ("blank city", create(shipping_city=" \t"), "shipping_city", "REQUIRED"),
    ("no postal code", create(shipping_postal_code=""), "shipping_postal_code", "REQUIRED"),
    ("no country", create(shipping_country=""), "shipping_country", "REQUIRED"),
    ("long address", create(shipping_address="a" * 201), "shipping_address", "TOO_LONG"),
    (
        "control char in address",
        create(shipping_address="1 Main\x00St"),
        "shipping_address",
        "INVALID_CHARACTERS",
    ),
    ("request_id not a UUID", create(request_id="abc"), "request_id", "INVALID_FORMAT"),
    (
        "request_id without dashes",
        create(request_id=REQUEST_ID.replace("-", "")),
        "request_id",
        "INVALID_FORMAT",
    ),
    (
        "request_id in braces",
        create(request_id="{" + REQUEST_ID + "}"),
        "request_id",
        "INVALID_FORMAT",
    ),
    ("email without @", create(customer_email="nobody"), "customer_email", "INVALID_FORMAT"),
    ("email without domain dot", create(customer_email="a@b"), "customer_email", "INVALID_FORMAT"),
    ("email with space", create(customer_email="a b@c.de"), "customer_email", "INVALID_FORMAT"),
    ("email with two @", create(customer_email="a@b@c.de"), "customer_email", "INVALID_FORMAT"),
    # The stdlib parser raises HeaderParseError, not ValueError, on this one.
    (
        "email with \\ in domain",
        create(customer_email="a@b.\\.com"),
        "customer_email",
        "INVALID_FORMAT",
    ),
    ("long email", create(customer_email="a" * 250 + "@b.de"), "customer_email", "TOO_LONG"),
]


@pytest.mark.parametrize(
    ("request_", "field", "reason"),
    [case[1:] for case in BAD_CREATES],
    ids=[case[0] for case in BAD_CREATES],
)
def test_bad_create_field(request_: pb.CreateOrderRequest, field: str, reason: str) -> None:
    assert create_violations(request_) == {field: reason}


def test_all_violations_are_collected() -> None:
    request = create(
        customer_id="",
        items=[item(), item(quantity=0, product_name=""), item(price=usd(1, 5, currency="eur"))],
        shipping_country="",
        request_id="nope",
        customer_email="nope",
    )
    assert create_violations(request) == {
        "customer_id": "REQUIRED",
        "items[1].product_name": "REQUIRED",
        "items[1].quantity": "OUT_OF_RANGE",
        "items[2].price.currency_code": "INVALID_CURRENCY",
        "shipping_country": "REQUIRED",
        "request_id": "INVALID_FORMAT",
        "customer_email": "INVALID_FORMAT",
    }


def test_the_error_message_names_the_first_violation_and_counts_the_rest() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validation.validate_create_order(create(customer_id="", shipping_city=""))
    assert caught.value.message.startswith("Invalid request: customer_id: Required.")
    assert "and 1 more" in caught.value.message


def test_too_many_items_skips_the_per_item_checks() -> None:
    # 101 bad items would otherwise be hundreds of violations.
    assert create_violations(create(items=[item(quantity=0)] * 101)) == {"items": "TOO_MANY"}


# --- Money: exact integers ---------------------------------------------------------


def test_999_99_times_3_is_exactly_2999_97() -> None:
    items = [models.OrderItem("P", "N", 3, Money("USD", 999, 990_000_000))]
    assert models.order_total(items) == Money("USD", 2999, 970_000_000)
    assert str(models.order_total(items)) == "USD 2999.97"


def test_ten_cents_three_times_has_no_float_error() -> None:
    # 0.1 * 3 == 0.30000000000000004 as floats.
    items = [models.OrderItem("P", "N", 1, Money("EUR", 0, 100_000_000))] * 3
    assert models.order_total(items) == Money("EUR", 0, 300_000_000)


def test_nanos_carry_into_units() -> None:
    items = [
        models.OrderItem("A", "A", 7, Money("USD", 0, 999_999_999)),
        models.OrderItem("B", "B", 1, Money("USD", 1, 7)),
    ]
    # 7 x 0.999999999 + 1.000000007 = 8.000000000
    assert models.order_total(items) == Money("USD", 8, 0)


def test_total_of_exactly_10_to_the_12_units_is_allowed() -> None:
    order = validation.validate_create_order(
        create(items=[item(price=usd(100_000_000, 0), quantity=10_000)])
    )
    assert models.order_total(order.items) == Money("USD", 10**12, 0)


def test_one_nano_over_10_to_the_12_units_is_not() -> None:
    request = create(
        items=[item(price=usd(100_000_000, 0), quantity=10_000), item(price=usd(0, 1))]
    )
    assert create_violations(request) == {"items": "OUT_OF_RANGE"}


# --- Order ids ------------------------------------------------------------------------


@pytest.mark.parametrize("order_id", ["ORD-7K3QX9PDM2A4TZ5B", "a", "x" * 64, "ord.1_2-3"])
def test_well_formed_order_ids(order_id: str) -> None:
    assert validation.validate_order_id(order_id) == order_id


@pytest.mark.parametrize(
    ("order_id", "reason"),
    [
        ("", "REQUIRED"),
        ("x" * 65, "TOO_LONG"),
        ("ORD 1", "INVALID_CHARACTERS"),
        ("ORD\n1", "INVALID_CHARACTERS"),
        ("x' OR 'a'='a", "INVALID_CHARACTERS"),
        ("Ö" * 10, "INVALID_CHARACTERS"),
        ("ORD:1", "INVALID_CHARACTERS"),
    ],
)
def test_malformed_order_ids(order_id: str, reason: str) -> None:
    assert violations(lambda: validation.validate_order_id(order_id)) == {"order_id": reason}


# --- ConfirmPayment ---------------------------------------------------------------------


def payment(**fields: object) -> pb.ConfirmPaymentRequest:
    values: dict[str, object] = {
        "order_id": "ORD-1",
        "transaction_id": "TXN-12345",
        "amount": usd(999, 990_000_000),
        "payment_method": "credit_card",
    }
    values.update(fields)
    return pb.ConfirmPaymentRequest(**values)  # type: ignore[arg-type]


def test_valid_payment() -> None:
    order_id, request = validation.validate_confirm_payment(payment(transaction_id="pi_3N:x.y-z"))
    assert order_id == "ORD-1"
    assert request == models.PaymentRequest(
        "pi_3N:x.y-z", Money("USD", 999, 990_000_000), "credit_card"
    )


@pytest.mark.parametrize(
    ("request_", "field", "reason"),
    [
        (payment(order_id=""), "order_id", "REQUIRED"),
        (payment(order_id="a b"), "order_id", "INVALID_CHARACTERS"),
        (payment(transaction_id=""), "transaction_id", "REQUIRED"),
        (payment(transaction_id="t" * 129), "transaction_id", "TOO_LONG"),
        (payment(transaction_id="TXN 1"), "transaction_id", "INVALID_CHARACTERS"),
        (
            pb.ConfirmPaymentRequest(order_id="O", transaction_id="T", payment_method="m"),
            "amount",
            "REQUIRED",
        ),
        (payment(amount=usd(0)), "amount", "OUT_OF_RANGE"),
        (payment(amount=usd(-999)), "amount", "OUT_OF_RANGE"),
        (payment(amount=usd(1, currency="us")), "amount.currency_code", "INVALID_CURRENCY"),
        (payment(amount=usd(1, 1_000_000_000)), "amount.nanos", "OUT_OF_RANGE"),
        (payment(amount=usd(-1, 5)), "amount.nanos", "SIGN_MISMATCH"),
        (payment(payment_method=""), "payment_method", "REQUIRED"),
        (payment(payment_method="m" * 65), "payment_method", "TOO_LONG"),
        (payment(payment_method="credit card"), "payment_method", "INVALID_CHARACTERS"),
        (payment(payment_method="card:visa"), "payment_method", "INVALID_CHARACTERS"),
    ],
)
def test_bad_payment_field(request_: pb.ConfirmPaymentRequest, field: str, reason: str) -> None:
    assert violations(lambda: validation.validate_confirm_payment(request_)) == {field: reason}


def test_bad_payment_collects_everything() -> None:
    request = pb.ConfirmPaymentRequest(order_id="", transaction_id="", payment_method="")
    assert set(violations(lambda: validation.validate_confirm_payment(request))) == {
        "order_id",
        "transaction_id",
        "amount",
        "payment_method",
    }


# --- CancelOrder ------------------------------------------------------------------------


def test_empty_reason_gets_the_default() -> None:
    order_id, cancel = validation.validate_cancel_order(pb.CancelOrderRequest(order_id="ORD-1"))
    assert order_id == "ORD-1"
    assert cancel == models.CancelRequest("Cancelled at the customer's request")


def test_a_reason_is_any_one_line_of_text() -> None:
    reason = "Ordered twice \u2013 refund. \u00abMerci\u00bb \u05e9\u05dc\u05d5\u05dd 😀 'x' \"y\""
    _, cancel = validation.validate_cancel_order(
        pb.CancelOrderRequest(order_id="ORD-1", reason=reason)
    )
    assert cancel.reason == reason


# Line breaks and tabs (a reason is one line), other controls, separators, and every
# bidirectional control: each one alone makes the reason INVALID_ARGUMENT.
UNSAFE_IN_REASON = [
    *"\n\r\t\x00\x07\x1b\x7f\x85\u2028\u2029",
    *"\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069",
]


@pytest.mark.parametrize("char", UNSAFE_IN_REASON, ids=lambda c: f"U+{ord(c):04X}")
def test_reason_with_a_control_or_bidi_character_is_invalid(char: str) -> None:
    request = pb.CancelOrderRequest(order_id="ORD-1", reason=f"Refund{char} to evil.example")
    with pytest.raises(InvalidArgument) as caught:
        validation.validate_cancel_order(request)
    [violation] = caught.value.violations
    assert (violation.field, violation.reason) == ("reason", "INVALID_CHARACTERS")
    assert "bidirectional" in violation.description


def test_reason_of_500_characters_passes() -> None:
    validation.validate_cancel_order(pb.CancelOrderRequest(order_id="ORD-1", reason="r" * 500))


@pytest.mark.parametrize(
    ("request_", "field", "reason"),
    [
        (pb.CancelOrderRequest(order_id=""), "order_id", "REQUIRED"),
        (pb.CancelOrderRequest(order_id="ORD-1", reason="r" * 501), "reason", "TOO_LONG"),
        (
            pb.CancelOrderRequest(order_id="ORD-1", reason="bell\x07"),
            "reason",
            "INVALID_CHARACTERS",
        ),
        (
            pb.CancelOrderRequest(order_id="ORD-1", reason="esc\x1b[31m"),
            "reason",
            "INVALID_CHARACTERS",
        ),
    ],
)
def test_bad_cancel_field(request_: pb.CancelOrderRequest, field: str, reason: str) -> None:
    assert violations(lambda: validation.validate_cancel_order(request_)) == {field: reason}


@pytest.mark.parametrize(
    "email", ["<script>alert(1)</script>@<script>alert(1)</script>.com", 'a"b@example.com']
)
def test_customer_email_the_mailer_would_refuse_is_invalid(email: str) -> None:
    assert create_violations(create(customer_email=email)) == {"customer_email": "INVALID_FORMAT"}


def test_control_characters_are_unicodes_cc_zl_and_zp() -> None:
    """The character class the text fields are checked with is exactly those categories."""
    import sys
    import unicodedata

    expected = {
        chr(code)
        for code in range(sys.maxunicode + 1)
        if unicodedata.category(chr(code)) in ("Cc", "Zl", "Zp")
    }
    found = {
        chr(code) for code in range(sys.maxunicode + 1) if validation._has_control_chars(chr(code))
    }
    assert found == expected
