"""The order workflow's activities: each checks its input, then calls a simulated provider."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.email import render_notification
from activities.providers import ProviderSettings
from activities.providers.faults import ACTIVITY_PROVIDERS, Faults
from activities.providers.inventory import Inventory
from activities.providers.ledger import Ledger
from activities.providers.mail import Mailer, MailService
from activities.providers.payments import PaymentGateway
from activities.providers.shipping import Shipping
from workflows.models import (
    ChargePaymentInput,
    DeliverOrderInput,
    Notification,
    OrderItem,
    PrepareShipmentInput,
    RefundPaymentInput,
    ReleaseInventoryInput,
    ReserveInventoryInput,
    Shipment,
    ShipOrderInput,
)
from workflows.money import Money
from workflows.rules import InvalidEmailAddress

logger = logging.getLogger(__name__)

# ApplicationError types, non-retryable because a retry would fail the same way.
INVALID_ORDER = "InvalidOrder"
INVALID_AMOUNT = "InvalidAmount"
INVALID_RECIPIENT = "InvalidRecipient"


class OrderActivities:
    """The activities, and the simulated providers they call.

    Register the bound methods (`all()`) with a worker; workflows refer to
    them as `OrderActivities.<name>`.
    """

    def __init__(
        self,
        settings: ProviderSettings,
        mailer: Mailer | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = Ledger(settings.sim_ledger) if settings.sim_ledger is not None else None
        self.faults = Faults(settings, rng)
        self.inventory = Inventory(settings, self.ledger)
        self.payments = PaymentGateway(settings, self.ledger)
        self.shipping = Shipping(settings)
        self.mail = MailService(settings, self.ledger, mailer)
        logger.info("Emails go to the %s", self.mail.mailer)
        if self.ledger is not None:
            logger.info("Providers record their effects in the %s", self.ledger)
        if failures := settings.describe_failures():
            logger.info("Simulated failures: %s", failures)

    def all(self) -> list[Callable[..., Any]]:
        """Every activity, bound to this instance, for `Worker(activities=...)`."""
        return [getattr(self, name) for name in ACTIVITY_PROVIDERS]

    @activity.defn
    async def reserve_inventory(self, input: ReserveInventoryInput) -> str:
        """Reserves the order's items, taking them from stock; returns the reservation id.

        Fails with a non-retryable OutOfStock error, reserving nothing, if any
        product has fewer units in stock than the order needs.
        """
        _require_items(input.order_id, input.items)
        self.faults.check("reserve_inventory", input.order_id)
        return await self.inventory.reserve(input.order_id, input.items)

    @activity.defn
    async def release_inventory(self, input: ReleaseInventoryInput) -> None:
        """Releases a reservation, giving its stock back; releasing twice, or one never made,
        is a no-op."""
        self.faults.check("release_inventory", input.order_id)
        await self.inventory.release(input.order_id, input.reservation_id)

    @activity.defn
    async def charge_payment(self, input: ChargePaymentInput) -> str:
        """Captures the payment, at most once per idempotency key; returns the capture id.

        Fails with a non-retryable PaymentDeclined error if a decline rule matches.
        """
        _require_positive(input.order_id, input.amount)
        self.faults.check("charge_payment", input.order_id)
        return await self.payments.charge(input)

    @activity.defn
    async def refund_payment(self, input: RefundPaymentInput) -> str:
        """Refunds a payment, at most once per idempotency key; returns the refund id."""
        _require_positive(input.order_id, input.amount)
        self.faults.check("refund_payment", input.order_id)
        return await self.payments.refund(input)

    @activity.defn
    async def prepare_shipment(self, input: PrepareShipmentInput) -> str:
        """Packs the order's items; returns the package id."""
        _require_items(input.order_id, input.items)
        self.faults.check("prepare_shipment", input.order_id)
        return await self.shipping.pack(input.order_id)

    @activity.defn
    async def ship_order(self, input: ShipOrderInput) -> Shipment:
        """Hands the package to the carrier; returns its tracking number."""
        self.faults.check("ship_order", input.order_id)
        return await self.shipping.ship(input)

    @activity.defn
    async def deliver_order(self, input: DeliverOrderInput) -> None:
        """The carrier's journey: returns once the parcel has been delivered."""
        self.faults.check("deliver_order", input.order_id)
        await self.shipping.deliver(input.order_id, input.tracking_number)

    @activity.defn
    async def send_notification(self, notification: Notification) -> None:
        """Renders the email and sends it, once per notification.

        A mail server that fails makes the attempt fail, to be retried; one that
        permanently rejects the recipient (5xx) fails it for good.
        """
        try:
            # The first attempt's schedule time, so every retry renders the same bytes.
            message = render_notification(
                notification, activity.info().scheduled_time, self.settings.email_from
            )
        except InvalidEmailAddress as err:
            raise _final(str(err), INVALID_RECIPIENT) from err
        self.faults.check("send_notification", notification.order_id)
        await self.mail.send(message, notification)


def _require_items(order_id: str, items: Sequence[OrderItem]) -> None:
    if not items or any(item.quantity <= 0 for item in items):
        message = f"order {order_id}: needs at least one item, each with a positive quantity"
        raise _final(message, INVALID_ORDER)


def _require_positive(order_id: str, amount: Money) -> None:
    if amount.total_nanos <= 0:
        raise _final(f"order {order_id}: amount must be positive, got {amount}", INVALID_AMOUNT)


def _final(message: str, type: str) -> ApplicationError:
    return ApplicationError(message, type=type, non_retryable=True)
