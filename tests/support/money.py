"""The money rules, as the payment gateway's own book shows them for one order.

A paid order was captured exactly once, exactly its total; a cancelled one
was refunded exactly once, exactly what was captured; any other order had
neither. The book counts every capture and refund of the order, under any
idempotency key (PaymentGateway.captured / .refunded), so a second capture
under another key, or a refund of another amount, breaks the rule too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

from google.type import money_pb2

from activities.order_activities import OrderActivities
from workflows.money import Money

AnyMoney: TypeAlias = Money | money_pb2.Money


def as_money(amount: AnyMoney) -> Money:
    """The workflow's Money for either form (google.type.Money from the API, or ours)."""
    if isinstance(amount, Money):
        return amount
    return Money(amount.currency_code, amount.units, amount.nanos)


def _exactly_once(what: str, made: Sequence[Money], expected: AnyMoney | None) -> list[str]:
    shown = [str(m) for m in made]
    if expected is None:
        return [f"{what} {shown}, expected none"] if made else []
    want = as_money(expected)
    exact = [(m.currency_code, m.total_nanos) for m in made]
    if exact != [(want.currency_code, want.total_nanos)]:
        return [f"{what} {shown}, expected exactly one of {want}"]
    return []


def money_moved_problems(
    captures: Sequence[Money],
    refunds: Sequence[Money],
    *,
    captured: AnyMoney | None,
    refunded: AnyMoney | None = None,
) -> list[str]:
    """What breaks the rule: exactly one capture of `captured` and one refund of `refunded`.

    None means none at all; an empty list means the book is as expected.
    """
    return _exactly_once("captured", captures, captured) + _exactly_once(
        "refunded", refunds, refunded
    )


async def assert_money_moved(
    activities: OrderActivities,
    order_id: str,
    *,
    captured: AnyMoney | None,
    refunded: AnyMoney | None = None,
) -> None:
    """The gateway captured exactly `captured` once and refunded exactly `refunded` once.

    None: no capture (or refund) at all, under any key.
    """
    payments = activities.payments
    captures = await payments.captured(order_id)
    refunds = await payments.refunded(order_id)
    problems = money_moved_problems(captures, refunds, captured=captured, refunded=refunded)
    assert not problems, f"order {order_id}: " + "; ".join(problems)
