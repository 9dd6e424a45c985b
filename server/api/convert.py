"""Conversions between the workflow's dataclasses and the API's messages.

Money stays integral both ways (units + nanos, never a float); datetimes
become Timestamps in UTC; None becomes an unset field.
"""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from google.type import money_pb2

from acme.orders.v1 import order_service_pb2 as pb
from workflows import models
from workflows.money import Money

_STATUS_TO_PROTO: dict[models.OrderStatus, pb.OrderStatus.ValueType] = {
    models.OrderStatus.PENDING: pb.ORDER_STATUS_PENDING,
    models.OrderStatus.PAYMENT_CONFIRMED: pb.ORDER_STATUS_PAYMENT_CONFIRMED,
    models.OrderStatus.PREPARING: pb.ORDER_STATUS_PREPARING,
    models.OrderStatus.SHIPPED: pb.ORDER_STATUS_SHIPPED,
    models.OrderStatus.DELIVERED: pb.ORDER_STATUS_DELIVERED,
    models.OrderStatus.CANCELLED: pb.ORDER_STATUS_CANCELLED,
}
_STATUS_FROM_PROTO = {value: key for key, value in _STATUS_TO_PROTO.items()}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def status_to_proto(status: models.OrderStatus | str) -> pb.OrderStatus.ValueType:
    """ "payment_confirmed" -> ORDER_STATUS_PAYMENT_CONFIRMED; ValueError if unknown."""
    return _STATUS_TO_PROTO[models.OrderStatus(status)]


def status_from_proto(status: pb.OrderStatus.ValueType) -> models.OrderStatus:
    """ORDER_STATUS_PAYMENT_CONFIRMED -> "payment_confirmed"; ValueError for UNSPECIFIED."""
    try:
        return _STATUS_FROM_PROTO[status]
    except KeyError:
        raise ValueError(f"no order status for {pb.OrderStatus.Name(status)}") from None


def money_to_proto(money: Money) -> money_pb2.Money:
    return money_pb2.Money(currency_code=money.currency_code, units=money.units, nanos=money.nanos)


def money_from_proto(money: money_pb2.Money) -> Money:
    """Copies the fields as they are; validation checks them first."""
    return Money(currency_code=money.currency_code, units=money.units, nanos=money.nanos)


def timestamp_from_datetime(value: datetime) -> Timestamp:
    """A Timestamp for an aware datetime; a naive one is taken as UTC, as workflows use."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    # What Timestamp.FromDatetime computes, in a third of its time (an Order holds up to
    # a dozen timestamps, a ListOrders page one per order).
    since = value - EPOCH
    return Timestamp(seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000)


def datetime_from_timestamp(timestamp: Timestamp) -> datetime:
    """An aware UTC datetime."""
    return timestamp.ToDatetime(tzinfo=UTC)


def item_to_proto(item: models.OrderItem) -> pb.OrderItem:
    return pb.OrderItem(
        product_id=item.product_id,
        product_name=item.product_name,
        quantity=item.quantity,
        price=money_to_proto(item.price),
    )


def order_to_proto(state: models.OrderState) -> pb.Order:
    """The whole order, as the workflow keeps it (its memo, or the `get_full_state` query)."""
    paid, shipped, refund = state.payment_info, state.shipment_info, state.refund_info
    return pb.Order(
        order_id=state.order_id,
        workflow_id=models.workflow_id_for(state.order_id),
        customer_id=state.customer_id,
        items=[item_to_proto(item) for item in state.items],
        status=status_to_proto(state.status),
        total_amount=money_to_proto(state.total_amount),
        created_at=timestamp_from_datetime(state.created_at),
        updated_at=timestamp_from_datetime(state.updated_at),
        cancellation_reason=state.cancellation_reason or "",
        shipping_address=state.shipping.address,
        shipping_city=state.shipping.city,
        shipping_postal_code=state.shipping.postal_code,
        shipping_country=state.shipping.country,
        customer_email=state.customer_email,
        inventory_info=pb.InventoryInfo(
            reservation_id=state.inventory_info.reservation_id,
            released=state.inventory_info.released,
        ),
        rejected_payments=[
            pb.RejectedPayment(
                transaction_id=rejected.transaction_id,
                amount=money_to_proto(rejected.amount),
                payment_method=rejected.payment_method,
                reason=rejected.reason,
                received_at=timestamp_from_datetime(rejected.received_at),
            )
            for rejected in state.rejected_payments
        ],
        # None leaves a message field unset.
        payment_info=pb.PaymentInfo(
            transaction_id=paid.transaction_id,
            amount=money_to_proto(paid.amount),
            payment_method=paid.payment_method,
            timestamp=timestamp_from_datetime(paid.timestamp),
        )
        if paid
        else None,
        shipment_info=pb.ShipmentInfo(
            tracking_number=shipped.tracking_number,
            provider=shipped.provider,
            estimated_delivery=timestamp_from_datetime(shipped.estimated_delivery),
            shipped_at=timestamp_from_datetime(shipped.shipped_at),
        )
        if shipped
        else None,
        refund_info=pb.RefundInfo(
            refund_id=refund.refund_id,
            transaction_id=refund.transaction_id,
            amount=money_to_proto(refund.amount),
            refunded_at=timestamp_from_datetime(refund.refunded_at),
        )
        if refund
        else None,
        failures=[
            pb.StepFailure(
                step=failure.step,
                error=failure.error,
                failed_at=timestamp_from_datetime(failure.failed_at),
            )
            for failure in state.failures
        ],
        estimated_delivery=_timestamp_or_none(state.estimated_delivery),
        delivered_at=_timestamp_or_none(state.delivered_at),
    )


def _timestamp_or_none(value: datetime | None) -> Timestamp | None:
    return None if value is None else timestamp_from_datetime(value)
