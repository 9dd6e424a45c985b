"""The data the order workflow exchanges: its input, signals, queries and activities."""

# No `from __future__ import annotations`: Temporal's data converter reads these
# dataclasses' hints with typing.get_type_hints on every payload, and string
# hints are compiled and evaluated each time (about 1 ms per get_full_state).

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from workflows.money import Money

WORKFLOW_NAME = "OrderWorkflow"
DEFAULT_TASK_QUEUE = "orders"
DEFAULT_PAYMENT_TIMEOUT_SECONDS = 24 * 60 * 60

# Message handler names: fixed, so the Temporal CLI can use them as in the seed.
CONFIRM_PAYMENT_SIGNAL = "confirm_payment"
CANCEL_ORDER_SIGNAL = "cancel_order"
GET_ORDER_STATUS_QUERY = "get_order_status"
GET_FULL_STATE_QUERY = "get_full_state"
GET_ESTIMATED_DELIVERY_QUERY = "get_estimated_delivery"


# Error types of activity failures that retrying cannot fix.
OUT_OF_STOCK_ERROR = "OutOfStock"
PAYMENT_DECLINED_ERROR = "PaymentDeclined"


# The reason a cancel without one is given, by the server and the signal alike.
DEFAULT_CANCEL_REASON = "Cancelled at the customer's request"


def workflow_id_for(order_id: str) -> str:
    """The id of the workflow that runs an order."""
    return f"order-{order_id}"


class OrderStatus(StrEnum):
    """Where an order is in its life; the values are the seed's strings."""

    PENDING = "pending"
    PAYMENT_CONFIRMED = "payment_confirmed"
    PREPARING = "preparing"
    SHIPPED = "shipped"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class OrderItem:
    product_id: str
    product_name: str
    quantity: int
    price: Money


def order_total(items: Sequence[OrderItem]) -> Money:
    """The sum of price x quantity, exactly; all items share one currency."""
    total = Money(items[0].price.currency_code)
    for item in items:
        total += item.price.times(item.quantity)
    return total


@dataclass(frozen=True)
class ShippingAddress:
    address: str
    city: str
    postal_code: str
    country: str


@dataclass(frozen=True)
class OrderInput:
    """The workflow's single input: a validated order."""

    order_id: str
    customer_id: str
    items: list[OrderItem]
    shipping: ShippingAddress
    customer_email: str = ""
    payment_timeout_seconds: int = DEFAULT_PAYMENT_TIMEOUT_SECONDS
    # A digest of the CreateOrder request, so that a retry with the same
    # request_id but different contents can be told apart from a true retry.
    request_fingerprint: str = ""
    # When the server started the order's workflow, as its OrderCreatedAt search
    # attribute says; kept across a reset, whose run starts later. None: orders
    # started before it was sent, created at their workflow's start time.
    created_at: datetime | None = None
    # search_attributes.customer_key of customer_id, which the server computes (it holds
    # the key; the workflow reads no secret): what OrderCustomerId holds. "": orders
    # started before it, whose OrderCustomerId is the raw id.
    customer_key: str = ""


@dataclass(frozen=True)
class PaymentRequest:
    """The `confirm_payment` signal's argument."""

    transaction_id: str
    amount: Money
    payment_method: str


@dataclass(frozen=True)
class CancelRequest:
    """The `cancel_order` signal's argument."""

    reason: str = ""


@dataclass
class PaymentInfo:
    transaction_id: str
    amount: Money
    payment_method: str
    timestamp: datetime


@dataclass
class ShipmentInfo:
    tracking_number: str
    provider: str
    estimated_delivery: datetime
    shipped_at: datetime


@dataclass
class RefundInfo:
    refund_id: str
    transaction_id: str
    amount: Money
    refunded_at: datetime


@dataclass
class InventoryInfo:
    reservation_id: str = ""
    released: bool = False


@dataclass
class RejectedPayment:
    """A payment the order refused; it was never captured."""

    transaction_id: str
    amount: Money
    payment_method: str
    reason: str
    received_at: datetime


@dataclass
class StepFailure:
    """A step that failed for good and needs a person: the step, the error, when."""

    step: str
    error: str
    failed_at: datetime


@dataclass
class OrderState:
    """Everything the workflow knows about its order: the `get_full_state` query."""

    order_id: str
    customer_id: str
    customer_email: str
    items: list[OrderItem]
    shipping: ShippingAddress
    status: OrderStatus
    total_amount: Money
    created_at: datetime
    updated_at: datetime
    request_fingerprint: str = ""
    payment_info: PaymentInfo | None = None
    shipment_info: ShipmentInfo | None = None
    estimated_delivery: datetime | None = None
    cancellation_reason: str | None = None
    refund_info: RefundInfo | None = None
    inventory_info: InventoryInfo = field(default_factory=InventoryInfo)
    rejected_payments: list[RejectedPayment] = field(default_factory=list)
    delivered_at: datetime | None = None
    failures: list[StepFailure] = field(default_factory=list)


def initial_state(order: OrderInput, created_at: datetime) -> OrderState:
    """A new order's state: the workflow's first, and the one the server records at its start."""
    return OrderState(
        order_id=order.order_id,
        customer_id=order.customer_id,
        customer_email=order.customer_email,
        items=list(order.items),
        shipping=order.shipping,
        status=OrderStatus.PENDING,
        total_amount=order_total(order.items),
        created_at=created_at,
        updated_at=created_at,
        request_fingerprint=order.request_fingerprint,
    )


# --- Activity inputs and results ---------------------------------------------


@dataclass(frozen=True)
class ReserveInventoryInput:
    order_id: str
    items: list[OrderItem]


@dataclass(frozen=True)
class ReleaseInventoryInput:
    order_id: str
    reservation_id: str


@dataclass(frozen=True)
class ChargePaymentInput:
    order_id: str
    transaction_id: str
    amount: Money
    payment_method: str
    # The gateway charges at most once per key, however often the activity retries.
    idempotency_key: str


@dataclass(frozen=True)
class RefundPaymentInput:
    order_id: str
    transaction_id: str
    amount: Money
    idempotency_key: str


@dataclass(frozen=True)
class PrepareShipmentInput:
    order_id: str
    items: list[OrderItem]


@dataclass(frozen=True)
class ShipOrderInput:
    order_id: str
    package_id: str
    shipping: ShippingAddress


@dataclass(frozen=True)
class Shipment:
    tracking_number: str
    provider: str


@dataclass(frozen=True)
class DeliverOrderInput:
    order_id: str
    tracking_number: str


class NotificationKind(StrEnum):
    ORDER_RECEIVED = "order_received"
    PAYMENT_CONFIRMED = "payment_confirmed"
    ORDER_SHIPPED = "order_shipped"
    ORDER_DELIVERED = "order_delivered"
    ORDER_CANCELLED = "order_cancelled"


@dataclass(frozen=True)
class Notification:
    """One email about an order; the activity renders it from these facts."""

    kind: NotificationKind
    order_id: str
    customer_id: str
    recipient: str
    total_amount: Money
    tracking_number: str = ""
    estimated_delivery: datetime | None = None
    reason: str = ""

    @property
    def idempotency_key(self) -> str:
        """One email of each kind per order, however often the activity retries."""
        return f"{self.order_id}/{self.kind.value}"
