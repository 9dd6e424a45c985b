"""server.convert: every field of OrderState reaches pb.Order, exactly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.type.money_pb2 import Money as PbMoney

from acme.orders.v1 import order_service_pb2 as pb
from server.api import convert
from tests.support.orders import pending_state
from workflows import models
from workflows.money import Money

CREATED = datetime(2025, 1, 31, 14, 30, 22, 123456, tzinfo=UTC)
LAPTOP = Money("USD", 999, 990_000_000)
TOTAL = Money("USD", 2999, 970_000_000)


def at(seconds: int) -> datetime:
    return CREATED + timedelta(seconds=seconds)


def ts(value: datetime) -> Timestamp:
    timestamp = Timestamp()
    timestamp.FromDatetime(value)
    return timestamp


def full_state() -> models.OrderState:
    """An order with every optional field set, as a refunded, rejected-once order has."""
    return models.OrderState(
        order_id="ORD-7K3QX9PDM2A4TZ5B",
        customer_id="CUST-001",
        customer_email="cust-001@example.com",
        items=[
            models.OrderItem("PROD-123", "Laptop", 3, LAPTOP),
            models.OrderItem("PROD-9", "Free sticker", 1, Money("USD")),
        ],
        shipping=models.ShippingAddress("123 Main St", "San Francisco", "94102", "USA"),
        status=models.OrderStatus.CANCELLED,
        total_amount=TOTAL,
        created_at=CREATED,
        updated_at=at(60),
        request_fingerprint="ab" * 32,
        payment_info=models.PaymentInfo("TXN-12345", TOTAL, "credit_card", at(10)),
        shipment_info=models.ShipmentInfo("FEDEX-1", "fedex", at(3 * 86400), at(20)),
        estimated_delivery=at(3 * 86400),
        cancellation_reason="Customer requested cancellation",
        refund_info=models.RefundInfo("REF-1", "TXN-12345", TOTAL, at(50)),
        inventory_info=models.InventoryInfo("RES-1", released=True),
        rejected_payments=[
            models.RejectedPayment("TXN-0", Money("EUR", 1, 0), "paypal", "wrong currency", at(5))
        ],
        delivered_at=at(4 * 86400),
        failures=[models.StepFailure("refund_payment", "Amount must be positive", at(5 * 86400))],
    )


def test_every_order_field_is_converted() -> None:
    order = convert.order_to_proto(full_state())
    assert order == pb.Order(
        order_id="ORD-7K3QX9PDM2A4TZ5B",
        workflow_id="order-ORD-7K3QX9PDM2A4TZ5B",
        customer_id="CUST-001",
        items=[
            pb.OrderItem(
                product_id="PROD-123",
                product_name="Laptop",
                quantity=3,
                price=PbMoney(currency_code="USD", units=999, nanos=990_000_000),
            ),
            pb.OrderItem(
                product_id="PROD-9",
                product_name="Free sticker",
                quantity=1,
                price=PbMoney(currency_code="USD"),
            ),
        ],
        status=pb.ORDER_STATUS_CANCELLED,
        total_amount=PbMoney(currency_code="USD", units=2999, nanos=970_000_000),
        payment_info=pb.PaymentInfo(
            transaction_id="TXN-12345",
            amount=PbMoney(currency_code="USD", units=2999, nanos=970_000_000),
            payment_method="credit_card",
            timestamp=ts(at(10)),
        ),
        shipment_info=pb.ShipmentInfo(
            tracking_number="FEDEX-1",
            provider="fedex",
            estimated_delivery=ts(at(3 * 86400)),
            shipped_at=ts(at(20)),
        ),
        created_at=ts(CREATED),
        updated_at=ts(at(60)),
        estimated_delivery=ts(at(3 * 86400)),
        cancellation_reason="Customer requested cancellation",
        shipping_address="123 Main St",
        shipping_city="San Francisco",
        shipping_postal_code="94102",
        shipping_country="USA",
        customer_email="cust-001@example.com",
        refund_info=pb.RefundInfo(
            refund_id="REF-1",
            transaction_id="TXN-12345",
            amount=PbMoney(currency_code="USD", units=2999, nanos=970_000_000),
            refunded_at=ts(at(50)),
        ),
        inventory_info=pb.InventoryInfo(reservation_id="RES-1", released=True),
        rejected_payments=[
            pb.RejectedPayment(
                transaction_id="TXN-0",
                amount=PbMoney(currency_code="EUR", units=1),
                payment_method="paypal",
                reason="wrong currency",
                received_at=ts(at(5)),
            )
        ],
        delivered_at=ts(at(4 * 86400)),
        failures=[
            pb.StepFailure(
                step="refund_payment", error="Amount must be positive", failed_at=ts(at(5 * 86400))
            )
        ],
    )


def test_no_order_field_is_left_out() -> None:
    """A field added to the proto but not to convert.order_to_proto fails here."""
    order = convert.order_to_proto(full_state())
    set_fields = {descriptor.name for descriptor, _ in order.ListFields()}
    assert set_fields == {field.name for field in pb.Order.DESCRIPTOR.fields}


def test_a_new_order_leaves_the_optional_fields_unset() -> None:
    order = convert.order_to_proto(pending_state("ORD-1", "C", CREATED))
    for name in (
        "payment_info",
        "shipment_info",
        "refund_info",
        "estimated_delivery",
        "delivered_at",
    ):
        assert not order.HasField(name), name
    assert order.cancellation_reason == ""
    assert order.inventory_info == pb.InventoryInfo()
    assert list(order.rejected_payments) == []
    assert list(order.failures) == []
    assert order.status == pb.ORDER_STATUS_PENDING


@pytest.mark.parametrize(
    ("status", "value"),
    [
        (models.OrderStatus.PENDING, pb.ORDER_STATUS_PENDING),
        (models.OrderStatus.PAYMENT_CONFIRMED, pb.ORDER_STATUS_PAYMENT_CONFIRMED),
        (models.OrderStatus.PREPARING, pb.ORDER_STATUS_PREPARING),
        (models.OrderStatus.SHIPPED, pb.ORDER_STATUS_SHIPPED),
        (models.OrderStatus.DELIVERED, pb.ORDER_STATUS_DELIVERED),
        (models.OrderStatus.CANCELLED, pb.ORDER_STATUS_CANCELLED),
    ],
)
def test_status_both_ways(status: models.OrderStatus, value: pb.OrderStatus.ValueType) -> None:
    assert convert.status_to_proto(status) == value
    assert convert.status_to_proto(status.value) == value  # the get_order_status query's str
    assert convert.status_from_proto(value) == status


def test_every_status_has_a_proto_value_and_back() -> None:
    assert {convert.status_to_proto(s) for s in models.OrderStatus} == (
        set(pb.OrderStatus.values()) - {pb.ORDER_STATUS_UNSPECIFIED}
    )


def test_unknown_statuses_are_errors() -> None:
    with pytest.raises(ValueError, match="lost"):
        convert.status_to_proto("lost")
    with pytest.raises(ValueError, match="ORDER_STATUS_UNSPECIFIED"):
        convert.status_from_proto(pb.ORDER_STATUS_UNSPECIFIED)


@pytest.mark.parametrize(
    "money",
    [Money("USD", 999, 990_000_000), Money("JPY", 0, 0), Money("EUR", -3, -500_000_000),
     Money("USD", 10**12, 1), Money("USD", 2**63 - 1, 999_999_999)],
)  # fmt: skip
def test_money_round_trip(money: Money) -> None:
    proto = convert.money_to_proto(money)
    assert (proto.currency_code, proto.units, proto.nanos) == (
        money.currency_code,
        money.units,
        money.nanos,
    )
    assert convert.money_from_proto(proto) == money


def test_timestamps_keep_microseconds_and_the_instant() -> None:
    paris = timezone(timedelta(hours=1))
    local = datetime(2025, 1, 31, 15, 30, 22, 123456, tzinfo=paris)
    timestamp = convert.timestamp_from_datetime(local)
    assert convert.datetime_from_timestamp(timestamp) == CREATED
    assert convert.datetime_from_timestamp(timestamp).tzinfo == UTC


def test_a_naive_datetime_is_taken_as_utc() -> None:
    naive = CREATED.replace(tzinfo=None)
    assert convert.timestamp_from_datetime(naive) == convert.timestamp_from_datetime(CREATED)


@pytest.mark.parametrize(
    "value",
    [
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 500_000, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(2025, 1, 31, 14, 30, 22, 123_456, tzinfo=timezone(timedelta(hours=-7))),
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    ],
)
def test_timestamps_are_those_of_the_protobuf_runtime(value: datetime) -> None:
    """The conversion computed by hand (for speed) is Timestamp.FromDatetime's, before and
    after the epoch, at both ends of the range and in another zone."""
    assert convert.timestamp_from_datetime(value) == ts(value)
