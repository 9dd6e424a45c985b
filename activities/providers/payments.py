"""The simulated payment gateway: captures and refunds once per idempotency key; decline rules.

Its book (`captured`, `refunded`) lists every capture and refund of an order,
whatever its key, each with its amount: what a reconciliation would read.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any

from pydantic import AfterValidator, Field
from pydantic_settings import NoDecode
from temporalio.exceptions import ApplicationError

from activities.providers.faults import simulate
from activities.providers.ledger import Effect, EffectKind, Effects, Ledger
from infra.settings import CommaList, Options, Seconds, setting
from workflows.models import PAYMENT_DECLINED_ERROR, ChargePaymentInput, RefundPaymentInput
from workflows.money import NANOS_PER_UNIT, Money

logger = logging.getLogger(__name__)

# Not retryable: a retry would fail the same way.
IDEMPOTENCY_KEY_REUSED = "IdempotencyKeyReused"


def _lower(methods: frozenset[str]) -> frozenset[str]:
    return frozenset(method.lower() for method in methods)


Methods = Annotated[frozenset[str], NoDecode, AfterValidator(_lower), CommaList]
# Decimal, not float: "999.99" means exactly 999.99.
Amount = Annotated[Decimal, Field(ge=0, allow_inf_nan=False)]


class PaymentSettings(Options):
    """Simulated payment gateway."""

    sim_payment_seconds: Seconds = setting(2.0, "ORDER_SIM_PAYMENT_SECONDS", "seconds per call")
    sim_decline_methods: Methods = setting(
        frozenset(), "ORDER_SIM_DECLINE_METHODS", "payment methods always declined"
    )
    sim_decline_over: Amount | None = setting(
        None, "ORDER_SIM_DECLINE_OVER", "decline charges above this amount, in any currency"
    )


@dataclass(frozen=True)
class Payment:
    """A capture or a refund (which has no payment method)."""

    id: str
    order_id: str
    transaction_id: str
    amount: Money
    payment_method: str = ""


def _payment(effect: Effect) -> Payment:
    params = effect.params()
    return Payment(effect.result, **{**params, "amount": Money(**params["amount"])})


class PaymentGateway:
    """Captures (`charges`) and refunds (`refunds`) by idempotency key; by order, `captured`..."""

    def __init__(self, settings: PaymentSettings, ledger: Ledger | None) -> None:
        self.settings = settings
        self.charges = Effects(EffectKind.CHARGE, ledger, _payment, unique_results=True)
        self.refunds = Effects(EffectKind.REFUND, ledger, _payment, unique_results=True)

    async def charge(self, input: ChargePaymentInput) -> str:
        """Captures the payment, once per idempotency key; returns the capture id."""
        return await self._once(self.charges, "CAP", input, input.payment_method)

    async def refund(self, input: RefundPaymentInput) -> str:
        """Refunds the payment, once per idempotency key; returns the refund id."""
        return await self._once(self.refunds, "RFD", input)

    async def captured(self, order_id: str) -> list[Money]:
        """The amount of every capture made for the order, under any key, oldest first."""
        return [payment.amount for payment in await self.charges.of_order(order_id)]

    async def refunded(self, order_id: str) -> list[Money]:
        """The amount of every refund made for the order, under any key, oldest first."""
        return [payment.amount for payment in await self.refunds.of_order(order_id)]

    async def _once(
        self,
        done: Effects[Payment],
        prefix: str,
        input: ChargePaymentInput | RefundPaymentInput,
        payment_method: str = "",
    ) -> str:
        """The id of the payment made under the input's key: new, or the first for a repeat."""
        key, order_id, what = input.idempotency_key, input.order_id, done.kind.value
        txn = input.transaction_id
        payment = Payment(f"{prefix}-{txn}", order_id, txn, input.amount, payment_method)
        made = await done.recall(key, order_id)
        if made is None:
            await simulate(self.settings.sim_payment_seconds, order_id, f"{what} {payment.id}")
            made = done.get(key)
        if made is None:
            if done is self.charges:
                self._decline(payment)
            made, created = await done.record(key, order_id, _request(payment), payment.id)
            if created:
                logger.info("order %s: %s %s of %s", order_id, what, made.id, payment.amount)
                return made.id
        if dataclasses.replace(made, id=payment.id) != payment:
            raise ApplicationError(
                f"idempotency key {key!r} was already used, with other parameters, for "
                f"{what} {made.id} of {made.amount} for order {made.order_id}",
                type=IDEMPOTENCY_KEY_REUSED,
                non_retryable=True,
            )
        logger.info("order %s: %s %s already made as %s", order_id, what, key, made.id)
        return made.id

    def _decline(self, payment: Payment) -> None:
        """Raises PaymentDeclined, final, if a decline rule matches the charge."""
        limit = self.settings.sim_decline_over
        if payment.payment_method.strip().lower() in self.settings.sim_decline_methods:
            reason = f"Card declined by the gateway (payment method {payment.payment_method!r})"
        elif limit is not None and _exceeds(payment.amount, limit):
            reason = (
                f"Charge of {payment.amount} declined by the gateway: above the limit of {limit}"
            )
        else:
            return
        logger.info("order %s: payment %s declined", payment.order_id, payment.transaction_id)
        raise ApplicationError(reason, type=PAYMENT_DECLINED_ERROR, non_retryable=True)


def _request(payment: Payment) -> dict[str, Any]:
    """What the ledger records of the request: a charge's fields, or a refund's."""
    request = dataclasses.asdict(payment)
    del request["id"]
    if not payment.payment_method:
        del request["payment_method"]
    return request


def _exceeds(amount: Money, limit: Decimal) -> bool:
    """amount > limit, compared exactly as integers (the limit's own currency is implied)."""
    numerator, denominator = limit.as_integer_ratio()
    return amount.total_nanos * denominator > numerator * NANOS_PER_UNIT
