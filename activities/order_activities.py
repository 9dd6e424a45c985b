"""The order workflow's activities, against simulated inventory, payment, carrier and mail.

Each provider behaves like a remote call: it takes a configurable time,
heartbeating meanwhile so that a cancelled or timed-out attempt notices, and
it is idempotent by key, so a retried call returns the first call's result
and has no second effect. The effect is recorded only once the simulated call
has finished, so an attempt cancelled part-way leaves nothing behind.

Failures can be switched on (SimulationConfig): limited stock ("OutOfStock"),
declining payment rules ("PaymentDeclined"), both final; and transient
outages ("ProviderUnavailable") that the workflow's retry policies ride out.
An outage fails an attempt before it reaches the provider, so a failed
attempt has no effect either.

The providers' state lives in memory: it is lost when the worker restarts,
like a sandbox account that is reset. With a ledger (ORDER_SIM_LEDGER,
activities/ledger.py), the payment gateway, the inventory service and the
mail service remember their effects there instead, across processes, as
remote providers would: charges, refunds, reservations, releases and emails
then happen once per idempotency key even when the worker that made one is
killed before reporting it and the retry runs in another process. The
in-memory stores then mirror what this process did or found in the ledger;
stock levels, packages, shipments and deliveries stay per process.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.config import SimulationConfig
from activities.email import InvalidRecipientError, render_notification
from activities.ledger import Effect, EffectKind, Ledger
from activities.mailer import MailDeliveryError, Mailer, mailer_for
from workflows.models import (
    OUT_OF_STOCK_ERROR,
    PAYMENT_DECLINED_ERROR,
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
from workflows.money import NANOS_PER_UNIT, Money

logger = logging.getLogger(__name__)

# Often enough that a cancel or heartbeat timeout is noticed within about a
# second; the SDK throttles what it actually sends to the server.
HEARTBEAT_INTERVAL_SECONDS = 1.0
CARRIER = "fedex"

# ApplicationError types, non-retryable because a retry would fail the same way
# (as are models.OUT_OF_STOCK_ERROR and models.PAYMENT_DECLINED_ERROR)...
IDEMPOTENCY_KEY_REUSED = "IdempotencyKeyReused"
INVALID_ORDER = "InvalidOrder"
INVALID_AMOUNT = "InvalidAmount"
INVALID_RECIPIENT = "InvalidRecipient"
RECIPIENT_REJECTED = "RecipientRejected"  # the mail server said 5xx to the recipient
# ...and retryable ones: the provider may well answer next time.
PROVIDER_UNAVAILABLE = "ProviderUnavailable"  # a simulated outage
MAIL_SERVER_UNAVAILABLE = "MailServerUnavailable"

# Who a simulated outage of each activity is blamed on, for its message.
PROVIDERS: dict[str, str] = {
    "reserve_inventory": "inventory service",
    "release_inventory": "inventory service",
    "charge_payment": "payment gateway",
    "refund_payment": "payment gateway",
    "prepare_shipment": "warehouse",
    "ship_order": "carrier",
    "deliver_order": "carrier",
    "send_notification": "mail service",
}


@dataclass
class Reservation:
    reservation_id: str
    order_id: str
    quantity: int
    released: bool = False
    # Units taken from limited stock, per product id; given back on release.
    taken: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Charge:
    capture_id: str
    order_id: str
    transaction_id: str
    amount: Money
    payment_method: str


@dataclass(frozen=True)
class Refund:
    refund_id: str
    order_id: str
    transaction_id: str
    amount: Money


@dataclass(frozen=True)
class Package:
    package_id: str
    order_id: str
    quantity: int


@dataclass(frozen=True)
class Delivery:
    order_id: str
    tracking_number: str


class OrderActivities:
    """The activities and the simulated providers' state they share.

    Register the bound methods (`all()`) with a worker; workflows refer to
    them as `OrderActivities.<name>`.
    """

    def __init__(
        self,
        config: SimulationConfig,
        mailer: Mailer | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.mailer: Mailer = mailer if mailer is not None else mailer_for(config)
        # Units left per product with limited stock; unlimited products are absent.
        self.stock: dict[str, int] = dict(config.stock)
        self._random = rng if rng is not None else random.Random()
        # The providers' durable memory, shared with other workers, if configured.
        self.ledger: Ledger | None = (
            Ledger(config.ledger_path) if config.ledger_path is not None else None
        )
        logger.info("Emails go to the %s", self.mailer)
        if self.ledger is not None:
            logger.info("Providers record their effects in the %s", self.ledger)
        if config.simulates_failures:
            logger.info("Simulated failures: %s", config.describe_failures())
        # Each store is keyed by the call's idempotency key.
        self.reservations: dict[str, Reservation] = {}  # by order id
        self.charges: dict[str, Charge] = {}  # by idempotency key
        self.refunds: dict[str, Refund] = {}  # by idempotency key
        self.packages: dict[str, Package] = {}  # by order id
        self.shipments: dict[str, Shipment] = {}  # by order id
        self.deliveries: dict[str, Delivery] = {}  # by tracking number
        self.sent_emails: dict[str, str] = {}  # Message-ID by notification idempotency key
        self._package_numbers = itertools.count(1)

    def all(self) -> list[Callable[..., Any]]:
        """Every activity, bound to this instance, for `Worker(activities=...)`."""
        return [
            self.reserve_inventory,
            self.release_inventory,
            self.charge_payment,
            self.refund_payment,
            self.prepare_shipment,
            self.ship_order,
            self.deliver_order,
            self.send_notification,
        ]

    def charge_count(self, idempotency_key: str) -> int:
        """How many charges were made under this key: 0 or 1, however often it was retried."""
        return 1 if idempotency_key in self.charges else 0

    def refund_count(self, idempotency_key: str) -> int:
        """How many refunds were made under this key: 0 or 1, however often it was retried."""
        return 1 if idempotency_key in self.refunds else 0

    def stock_level(self, product_id: str) -> int | None:
        """Units of a product in stock, or None if its stock is unlimited."""
        if product_id in self.stock:
            return self.stock[product_id]
        return self.config.default_stock

    # --- Inventory -----------------------------------------------------------

    @activity.defn
    async def reserve_inventory(self, input: ReserveInventoryInput) -> str:
        """Reserves the order's items, taking them from stock; returns the reservation id.

        Fails with a non-retryable OutOfStock error, reserving nothing, if any
        product has fewer units in stock than the order needs.
        """
        quantity = _total_quantity(input.order_id, input.items)
        self._maybe_fail("reserve_inventory", input.order_id)
        if self.ledger is not None:
            self._mirror_reservation(
                await self.ledger.attempt(EffectKind.RESERVE, input.order_id, input.order_id)
            )
        if input.order_id not in self.reservations:
            await self._simulate(self.config.inventory, input.order_id, "reserving inventory")
        reservation = self.reservations.get(input.order_id)
        if reservation is not None:
            logger.info(
                "order %s: inventory already reserved as %s",
                input.order_id,
                reservation.reservation_id,
            )
            return reservation.reservation_id
        # Checked and taken with no await in between, so concurrent orders
        # cannot both get the last unit.
        wanted: dict[str, int] = {}
        for item in input.items:
            wanted[item.product_id] = wanted.get(item.product_id, 0) + item.quantity
        taken = {p: n for p, n in wanted.items() if self.stock_level(p) is not None}
        shortages = [
            f"{product} (requested {units}, available {available})"
            for product, units in taken.items()
            if units > (available := self.stock_level(product) or 0)
        ]
        if shortages:
            logger.info("order %s: out of stock: %s", input.order_id, ", ".join(shortages))
            raise ApplicationError(
                f"Out of stock: {', '.join(shortages)}",
                type=OUT_OF_STOCK_ERROR,
                non_retryable=True,
            )
        for product, units in taken.items():
            self.stock[product] = (self.stock_level(product) or 0) - units
        reservation = Reservation(f"RSV-{input.order_id}", input.order_id, quantity, taken=taken)
        self.reservations[input.order_id] = reservation
        if self.ledger is not None:
            # Taken from this process's stock first (no await between check and take),
            # then recorded; given back if the record fails or another attempt won.
            try:
                effect, created = await self.ledger.record(
                    EffectKind.RESERVE,
                    input.order_id,
                    input.order_id,
                    {"order_id": input.order_id, "items": wanted, "quantity": quantity},
                    reservation.reservation_id,
                )
            except BaseException:
                self._undo_reservation(reservation)
                raise
            if not created:
                self._undo_reservation(reservation)
                self._mirror_reservation(effect)
                logger.info(
                    "order %s: inventory already reserved as %s", input.order_id, effect.result
                )
                return effect.result
        logger.info(
            "order %s: reserved %d item(s) as %s",
            input.order_id,
            quantity,
            reservation.reservation_id,
        )
        return reservation.reservation_id

    @activity.defn
    async def release_inventory(self, input: ReleaseInventoryInput) -> None:
        """Releases a reservation, giving its stock back; releasing twice, or one never made,
        is a no-op."""
        self._maybe_fail("release_inventory", input.order_id)
        if self.ledger is not None:
            released = await self.ledger.attempt(EffectKind.RELEASE, input.order_id, input.order_id)
            if input.order_id not in self.reservations:
                self._mirror_reservation(await self.ledger.find(EffectKind.RESERVE, input.order_id))
            if released is not None and input.order_id in self.reservations:
                # Released by an earlier attempt, maybe in another process.
                self._give_back(self.reservations[input.order_id])
        reservation = self.reservations.get(input.order_id)
        if reservation is None or reservation.released:
            # Compensation must not fail: nothing held means nothing to release.
            state = "never made" if reservation is None else "already released"
            logger.info(
                "order %s: reservation %s %s, nothing to release",
                input.order_id,
                input.reservation_id or "(none)",
                state,
            )
            return
        await self._simulate(self.config.inventory, input.order_id, "releasing inventory")
        if reservation.reservation_id != input.reservation_id:
            logger.warning(
                "order %s: releasing %s, although asked to release %r",
                input.order_id,
                reservation.reservation_id,
                input.reservation_id,
            )
        if self.ledger is not None:
            await self.ledger.record(
                EffectKind.RELEASE,
                input.order_id,
                input.order_id,
                {"order_id": input.order_id, "reservation_id": reservation.reservation_id},
                reservation.reservation_id,
            )
        if not reservation.released:
            self._give_back(reservation)
            logger.info(
                "order %s: released reservation %s (%d item(s))",
                input.order_id,
                reservation.reservation_id,
                reservation.quantity,
            )

    # --- Payment -------------------------------------------------------------

    @activity.defn
    async def charge_payment(self, input: ChargePaymentInput) -> str:
        """Captures the payment, at most once per idempotency key; returns the capture id.

        Fails with a non-retryable PaymentDeclined error if a decline rule matches.
        """
        _require_positive(input.order_id, input.amount)
        self._maybe_fail("charge_payment", input.order_id)
        key = input.idempotency_key
        if self.ledger is not None:
            known = await self.ledger.attempt(EffectKind.CHARGE, key, input.order_id)
            if known is not None:
                self.charges.setdefault(key, _charge_from(known))
        if key not in self.charges:
            await self._simulate(self.config.payment, input.order_id, "charging payment")
        charge = self.charges.get(key)
        if charge is not None:
            return self._repeated_charge(input, charge)
        decline = self._decline_reason(input)
        if decline is not None:
            logger.info("order %s: payment %s declined", input.order_id, input.transaction_id)
            raise ApplicationError(decline, type=PAYMENT_DECLINED_ERROR, non_retryable=True)
        if self.ledger is None:
            capture_id = _unique_id(
                f"CAP-{input.transaction_id}", (c.capture_id for c in self.charges.values())
            )
            self.charges[key] = Charge(
                capture_id, input.order_id, input.transaction_id, input.amount, input.payment_method
            )
        else:
            # The ledger's record is the capture; it names it, unique among all workers',
            # and if another attempt recorded one under this key first, that one stands.
            effect, created = await self.ledger.record(
                EffectKind.CHARGE,
                key,
                input.order_id,
                _charge_request(input),
                f"CAP-{input.transaction_id}",
                unique_result=True,
            )
            self.charges[key] = charge = _charge_from(effect)
            if not created:
                return self._repeated_charge(input, charge)
            capture_id = charge.capture_id
        logger.info(
            "order %s: charged %s via %s (transaction %s), capture %s",
            input.order_id,
            input.amount,
            input.payment_method,
            input.transaction_id,
            capture_id,
        )
        return capture_id

    @activity.defn
    async def refund_payment(self, input: RefundPaymentInput) -> str:
        """Refunds a payment, at most once per idempotency key; returns the refund id."""
        _require_positive(input.order_id, input.amount)
        self._maybe_fail("refund_payment", input.order_id)
        key = input.idempotency_key
        if self.ledger is not None:
            known = await self.ledger.attempt(EffectKind.REFUND, key, input.order_id)
            if known is not None:
                self.refunds.setdefault(key, _refund_from(known))
        if key not in self.refunds:
            await self._simulate(self.config.payment, input.order_id, "refunding payment")
        refund = self.refunds.get(key)
        if refund is not None:
            return self._repeated_refund(input, refund)
        if self.ledger is None:
            refund_id = _unique_id(
                f"RFD-{input.transaction_id}", (r.refund_id for r in self.refunds.values())
            )
            self.refunds[key] = Refund(
                refund_id, input.order_id, input.transaction_id, input.amount
            )
        else:
            effect, created = await self.ledger.record(
                EffectKind.REFUND,
                key,
                input.order_id,
                _refund_request(input),
                f"RFD-{input.transaction_id}",
                unique_result=True,
            )
            self.refunds[key] = refund = _refund_from(effect)
            if not created:
                return self._repeated_refund(input, refund)
            refund_id = refund.refund_id
        logger.info(
            "order %s: refunded %s of transaction %s, refund %s",
            input.order_id,
            input.amount,
            input.transaction_id,
            refund_id,
        )
        return refund_id

    # --- Shipping ------------------------------------------------------------

    @activity.defn
    async def prepare_shipment(self, input: PrepareShipmentInput) -> str:
        """Packs the order's items; returns the package id."""
        quantity = _total_quantity(input.order_id, input.items)
        self._maybe_fail("prepare_shipment", input.order_id)
        if input.order_id not in self.packages:
            await self._simulate(self.config.prepare, input.order_id, "packing")
        package = self.packages.get(input.order_id)
        if package is not None:
            logger.info("order %s: already packed as %s", input.order_id, package.package_id)
            return package.package_id
        package = Package(f"PKG-{next(self._package_numbers)}", input.order_id, quantity)
        self.packages[input.order_id] = package
        logger.info(
            "order %s: packed %d item(s) as %s", input.order_id, quantity, package.package_id
        )
        return package.package_id

    @activity.defn
    async def ship_order(self, input: ShipOrderInput) -> Shipment:
        """Hands the package to the carrier; returns its tracking number."""
        self._maybe_fail("ship_order", input.order_id)
        if input.order_id not in self.shipments:
            await self._simulate(self.config.ship, input.order_id, "shipping")
        shipment = self.shipments.get(input.order_id)
        if shipment is not None:
            logger.info("order %s: already shipped as %s", input.order_id, shipment.tracking_number)
            return shipment
        shipment = Shipment(
            tracking_number=f"FEDEX-{input.order_id}-{input.package_id}", provider=CARRIER
        )
        self.shipments[input.order_id] = shipment
        logger.info(
            "order %s: shipped %s to %s, %s via %s, tracking %s",
            input.order_id,
            input.package_id,
            input.shipping.city,
            input.shipping.country,
            CARRIER,
            shipment.tracking_number,
        )
        return shipment

    @activity.defn
    async def deliver_order(self, input: DeliverOrderInput) -> None:
        """The carrier's journey: returns once the parcel has been delivered."""
        self._maybe_fail("deliver_order", input.order_id)
        if input.tracking_number not in self.deliveries:
            await self._simulate(self.config.deliver, input.order_id, "delivery")
        if input.tracking_number in self.deliveries:
            logger.info("order %s: %s already delivered", input.order_id, input.tracking_number)
            return
        self.deliveries[input.tracking_number] = Delivery(input.order_id, input.tracking_number)
        logger.info("order %s: delivered %s", input.order_id, input.tracking_number)

    # --- Email ---------------------------------------------------------------

    @activity.defn
    async def send_notification(self, notification: Notification) -> None:
        """Renders the email and hands it to the mailer, once per notification.

        A mail server that fails makes the attempt fail, to be retried; one that
        permanently rejects the recipient (5xx) fails it for good.
        """
        key = notification.idempotency_key
        try:
            # The first attempt's schedule time, so every retry renders the same bytes.
            message = render_notification(
                notification,
                sent_at=activity.info().scheduled_time,
                sender=self.config.email_from,
            )
        except InvalidRecipientError as err:
            raise ApplicationError(str(err), type=INVALID_RECIPIENT, non_retryable=True) from err
        self._maybe_fail("send_notification", notification.order_id)
        if self.ledger is not None:
            known = await self.ledger.attempt(EffectKind.EMAIL, key, notification.order_id)
            if known is not None:
                self.sent_emails.setdefault(key, known.result)
        if key not in self.sent_emails and self.config.smtp is None:
            # Simulated latency for the outbox only: a real SMTP server takes its own time.
            await self._simulate(self.config.email, notification.order_id, "sending email")
        if key in self.sent_emails:
            logger.info(
                "order %s: %s email already sent", notification.order_id, notification.kind.value
            )
            return
        try:
            await self.mailer.send(message, notification)
        except MailDeliveryError as err:
            logger.warning(
                "order %s: %s email not sent (attempt %d): %s",
                notification.order_id,
                notification.kind.value,
                activity.info().attempt,
                err,
            )
            if err.permanent:
                raise ApplicationError(
                    str(err), type=RECIPIENT_REJECTED, non_retryable=True
                ) from err
            raise ApplicationError(str(err), type=MAIL_SERVER_UNAVAILABLE) from err
        if self.ledger is not None:
            await self.ledger.record(
                EffectKind.EMAIL,
                key,
                notification.order_id,
                {
                    "order_id": notification.order_id,
                    "kind": notification.kind.value,
                    "to": str(message["To"]),
                },
                str(message["Message-ID"]),
            )
        self.sent_emails[key] = str(message["Message-ID"])
        logger.info(
            "order %s: emailed %r to %s",
            notification.order_id,
            str(message["Subject"]),
            str(message["To"]),
        )

    # --- Helpers -------------------------------------------------------------

    def _repeated_charge(self, input: ChargePaymentInput, charge: Charge) -> str:
        """The first capture's id for a repeated request; IdempotencyKeyReused for another one."""
        same_request = (
            charge.order_id,
            charge.transaction_id,
            charge.amount,
            charge.payment_method,
        ) == (input.order_id, input.transaction_id, input.amount, input.payment_method)
        if not same_request:
            raise _key_reused(
                input.idempotency_key,
                f"charge {charge.capture_id} of {charge.amount} for order {charge.order_id}",
            )
        logger.info(
            "order %s: payment %s already captured as %s",
            input.order_id,
            input.transaction_id,
            charge.capture_id,
        )
        return charge.capture_id

    def _repeated_refund(self, input: RefundPaymentInput, refund: Refund) -> str:
        """The first refund's id for a repeated request; IdempotencyKeyReused for another one."""
        same_request = (refund.order_id, refund.transaction_id, refund.amount) == (
            input.order_id,
            input.transaction_id,
            input.amount,
        )
        if not same_request:
            raise _key_reused(
                input.idempotency_key,
                f"refund {refund.refund_id} of {refund.amount} for order {refund.order_id}",
            )
        logger.info(
            "order %s: transaction %s already refunded as %s",
            input.order_id,
            input.transaction_id,
            refund.refund_id,
        )
        return refund.refund_id

    def _mirror_reservation(self, effect: Effect | None) -> None:
        """Remembers a reservation found in the ledger, unless this process made it.

        One made by another process took none of this process's stock, so
        releasing it gives none back.
        """
        if effect is None or effect.order_id in self.reservations:
            return
        quantity = int(effect.params().get("quantity", 0))
        self.reservations[effect.order_id] = Reservation(effect.result, effect.order_id, quantity)

    def _undo_reservation(self, reservation: Reservation) -> None:
        """Forgets a reservation that was never recorded, returning its stock."""
        if self.reservations.get(reservation.order_id) is reservation:
            del self.reservations[reservation.order_id]
        for product, units in reservation.taken.items():
            self.stock[product] = self.stock.get(product, 0) + units

    def _give_back(self, reservation: Reservation) -> None:
        """Marks the reservation released and returns its stock, once."""
        if reservation.released:
            return
        # The flag and the stock change together, so stock is given back once.
        reservation.released = True
        for product, units in reservation.taken.items():
            self.stock[product] = self.stock.get(product, 0) + units

    def _maybe_fail(self, name: str, order_id: str) -> None:
        """A simulated outage of the provider behind activity `name`, if configured.

        Raised before the provider is called, so the failed attempt has no
        effect and the retry starts afresh. Retryable, so that each failure
        shows as one more attempt of the activity in the Temporal UI.
        """
        config = self.config
        if name not in config.fail_activities:
            return
        attempt = activity.info().attempt
        if attempt <= config.fail_first_attempts:
            why = f"the first {config.fail_first_attempts} attempt(s) fail"
        elif config.failure_rate and self._random.random() < config.failure_rate:
            why = f"{config.failure_rate * 100:g}% of attempts fail"
        else:
            return
        provider = PROVIDERS.get(name, "provider")
        logger.info("order %s: %s attempt %d: simulated outage", order_id, name, attempt)
        raise ApplicationError(
            f"The {provider} is unavailable (simulated: attempt {attempt}, {why})",
            type=PROVIDER_UNAVAILABLE,
        )

    def _decline_reason(self, input: ChargePaymentInput) -> str | None:
        """Why the simulated gateway declines this charge, or None if it accepts it."""
        method = input.payment_method.strip().lower()
        if method in self.config.decline_methods:
            return f"Card declined by the gateway (payment method {input.payment_method!r})"
        limit = self.config.decline_over
        if limit is not None and _exceeds(input.amount, limit):
            return f"Charge of {input.amount} declined by the gateway: above the limit of {limit}"
        return None

    async def _simulate(self, seconds: float, order_id: str, step: str) -> None:
        """Takes `seconds` like a remote call would, heartbeating so a cancel can reach it."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            while (remaining := started + seconds - loop.time()) > 0:
                activity.heartbeat()
                await asyncio.sleep(min(remaining, HEARTBEAT_INTERVAL_SECONDS))
        except asyncio.CancelledError:
            # Cancelled, timed out or the worker is stopping: nothing was done.
            logger.info(
                "order %s: %s interrupted after %.1f s, nothing done",
                order_id,
                step,
                loop.time() - started,
            )
            raise


def _money_params(amount: Money) -> dict[str, Any]:
    return {"currency_code": amount.currency_code, "units": amount.units, "nanos": amount.nanos}


def _money_from(params: dict[str, Any]) -> Money:
    return Money(str(params["currency_code"]), int(params["units"]), int(params["nanos"]))


def _charge_request(input: ChargePaymentInput) -> dict[str, Any]:
    return {
        "order_id": input.order_id,
        "transaction_id": input.transaction_id,
        "amount": _money_params(input.amount),
        "payment_method": input.payment_method,
    }


def _charge_from(effect: Effect) -> Charge:
    params = effect.params()
    return Charge(
        effect.result,
        str(params["order_id"]),
        str(params["transaction_id"]),
        _money_from(params["amount"]),
        str(params["payment_method"]),
    )


def _refund_request(input: RefundPaymentInput) -> dict[str, Any]:
    return {
        "order_id": input.order_id,
        "transaction_id": input.transaction_id,
        "amount": _money_params(input.amount),
    }


def _refund_from(effect: Effect) -> Refund:
    params = effect.params()
    return Refund(
        effect.result,
        str(params["order_id"]),
        str(params["transaction_id"]),
        _money_from(params["amount"]),
    )


def _total_quantity(order_id: str, items: Iterable[OrderItem]) -> int:
    quantities = [item.quantity for item in items]
    if not quantities or any(q <= 0 for q in quantities):
        raise ApplicationError(
            f"order {order_id}: needs at least one item, each with a positive quantity",
            type=INVALID_ORDER,
            non_retryable=True,
        )
    return sum(quantities)


def _exceeds(amount: Money, limit: Decimal) -> bool:
    """amount > limit, compared exactly as integers (the limit's own currency is implied)."""
    numerator, denominator = limit.as_integer_ratio()
    return amount.total_nanos * denominator > numerator * NANOS_PER_UNIT


def _require_positive(order_id: str, amount: Money) -> None:
    if amount.total_nanos <= 0:
        raise ApplicationError(
            f"order {order_id}: amount must be positive, got {amount}",
            type=INVALID_AMOUNT,
            non_retryable=True,
        )


def _key_reused(key: str, first_use: str) -> ApplicationError:
    return ApplicationError(
        f"idempotency key {key!r} was already used, with other parameters, for {first_use}",
        type=IDEMPOTENCY_KEY_REUSED,
        non_retryable=True,
    )


def _unique_id(base: str, taken: Iterable[str]) -> str:
    """`base`, or `base-2`, `base-3`... if another key has it (a reused transaction id)."""
    used = set(taken)
    if base not in used:
        return base
    return next(f"{base}-{n}" for n in itertools.count(2) if f"{base}-{n}" not in used)
