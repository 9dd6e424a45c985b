"""Renders an order notification as an RFC 5322 email: pure functions, no I/O."""

from __future__ import annotations

import email.policy
import hashlib
import re
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime

from workflows.models import Notification, NotificationKind
from workflows.rules import InvalidEmailAddress, parse_email_address, safe_reason

SENDER = "orders@acme.example"
FALLBACK_RECIPIENT_DOMAIN = "customers.invalid"
MESSAGE_ID_DOMAIN = "orders.acme.example"

# The seed's email names, one per kind.
TITLES: dict[NotificationKind, str] = {
    NotificationKind.ORDER_RECEIVED: "Order Received",
    NotificationKind.PAYMENT_CONFIRMED: "Payment Confirmed",
    NotificationKind.ORDER_SHIPPED: "Order Shipped",
    NotificationKind.ORDER_DELIVERED: "Order Delivered",
    NotificationKind.ORDER_CANCELLED: "Order Cancelled",
}

_UNSAFE_LOCAL_PART = re.compile(r"[^A-Za-z0-9._+-]+")


def recipient_for(notification: Notification) -> str:
    """The To address: the customer's email, else a placeholder that can never be delivered.

    The fallback uses the reserved .invalid TLD (RFC 2606), so that an order
    placed without an email address still leaves a readable message behind.
    """
    recipient = notification.recipient.strip()
    if recipient:
        return recipient
    local_part = _UNSAFE_LOCAL_PART.sub("-", notification.customer_id).strip(".-") or "customer"
    return f"{local_part}@{FALLBACK_RECIPIENT_DOMAIN}"


def message_id_for(idempotency_key: str) -> str:
    """A Message-ID that is the same for every retry of one notification.

    A digest rather than the key itself, because the key holds an order id
    that may contain characters a Message-ID may not.
    """
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
    return f"<{digest}@{MESSAGE_ID_DOMAIN}>"


def subject_for(notification: Notification) -> str:
    return f"{TITLES[notification.kind]}: {notification.order_id}"


def format_delivery_estimate(estimated_delivery: datetime | None) -> str:
    if estimated_delivery is None:
        return "to be confirmed"
    if estimated_delivery.tzinfo is not None:
        estimated_delivery = estimated_delivery.astimezone(UTC)
    return estimated_delivery.strftime("%A %d %B %Y, %H:%M UTC")


def quoted_reason(reason: str) -> str:
    """A cancellation reason as the email shows it: quoted, its own quotes and backslashes
    escaped, on one line, with nothing that reorders text (rules.safe_reason), whatever
    reached the order; "not given" when there is none."""
    if not reason:
        return "not given"
    escaped = safe_reason(reason).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def body_for(notification: Notification) -> str:
    """The plain-text body: what happened to the order and what comes next."""
    order_id = notification.order_id
    amount = str(notification.total_amount)
    kind = notification.kind
    if kind is NotificationKind.ORDER_RECEIVED:
        lines = [
            f"Thank you for your order {order_id}.",
            f"Order total: {amount}.",
            "Your items are reserved; we will prepare them as soon as your",
            "payment is confirmed.",
        ]
    elif kind is NotificationKind.PAYMENT_CONFIRMED:
        lines = [
            f"We have received your payment of {amount} for order {order_id}.",
            "Your items are being prepared for shipment.",
        ]
    elif kind is NotificationKind.ORDER_SHIPPED:
        lines = [
            f"Your order {order_id} ({amount}) is on its way.",
            f"Tracking number: {notification.tracking_number or 'not yet available'}",
            f"Estimated delivery: {format_delivery_estimate(notification.estimated_delivery)}",
        ]
    elif kind is NotificationKind.ORDER_DELIVERED:
        lines = [f"Your order {order_id} ({amount}) has been delivered."]
        if notification.tracking_number:
            lines.append(f"Tracking number: {notification.tracking_number}")
        lines.append("We hope you enjoy it.")
    else:
        lines = [
            f"Your order {order_id} ({amount}) has been cancelled.",
            f"Reason: {quoted_reason(notification.reason)}",
            "If you had already paid, the payment is refunded to your",
            "original payment method.",
        ]
    return "Hello,\n\n" + "\n".join(lines) + "\n\nAcme Orders\n"


def parse_sender(text: str) -> Address:
    """The From address: "orders@acme.example" or "Acme Orders <orders@acme.example>".

    Raises InvalidEmailAddress (a ValueError) unless `text` is exactly one address.
    """
    if "\r" in text or "\n" in text:
        raise InvalidEmailAddress(f"not a single email address: {text!r}")
    header = email.policy.default.header_factory("From", text)
    addresses: tuple[object, ...] = getattr(header, "addresses", ())
    if header.defects or len(addresses) != 1:
        raise InvalidEmailAddress(f"not a single email address: {text!r}")
    address = addresses[0]
    if not isinstance(address, Address) or not address.username or not address.domain:
        raise InvalidEmailAddress(f"not a valid email address: {text!r}")
    return address


def render_notification(
    notification: Notification, sent_at: datetime, sender: str = SENDER
) -> EmailMessage:
    """The whole message; `sent_at` becomes the Date header, so pass one that retries share.

    Raises InvalidEmailAddress when the recipient is not one plain address:
    that is never going to work, however often it is retried.
    """
    message = EmailMessage()
    message["From"] = parse_sender(sender)
    message["To"] = parse_email_address(recipient_for(notification))
    message["Subject"] = subject_for(notification)
    message["Date"] = format_datetime(_as_aware(sent_at))
    message["Message-ID"] = message_id_for(notification.idempotency_key)
    # For tooling that reads the outbox; mail clients ignore them.
    message["X-Order-Id"] = notification.order_id
    message["X-Notification-Kind"] = notification.kind.value
    message.set_content(body_for(notification))
    return message


def _as_aware(moment: datetime) -> datetime:
    # format_datetime writes "-0000" (unknown zone) for naive times; treat them as UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
