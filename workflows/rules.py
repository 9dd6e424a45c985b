"""The order's rules, in one place: what an order accepts, when it is settled, whom it emails."""

import functools
import re
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.headerregistry import Address
from enum import StrEnum

from workflows.models import CancelRequest, OrderState, OrderStatus, PaymentRequest

# Deliberately loose: one @, something on each side, a dot in the domain.
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


class RefusalKind(StrEnum):
    """Why an order refuses a payment or a cancellation."""

    PREVIOUSLY_REFUSED = "PREVIOUSLY_REFUSED"
    ALREADY_PAID = "ALREADY_PAID"
    NOT_PAYABLE = "NOT_PAYABLE"
    AMOUNT_MISMATCH = "AMOUNT_MISMATCH"
    NOT_CANCELLABLE = "NOT_CANCELLABLE"


@dataclass(frozen=True)
class Refusal:
    kind: RefusalKind
    # One sentence for people: a rejected payment's reason, or the log line.
    reason: str
    # What completes "The order ...", for the caller: "has shipped and can no longer be ...".
    why: str = ""


# What each status makes of a payment that is not the accepted one, and of a cancel.
_CANNOT_PAY = {
    OrderStatus.PAYMENT_CONFIRMED: "is already paid by another transaction",
    OrderStatus.PREPARING: "is already paid by another transaction and being prepared",
    OrderStatus.SHIPPED: "is already paid by another transaction and has shipped",
    OrderStatus.DELIVERED: "is already paid by another transaction and was delivered",
    OrderStatus.CANCELLED: "is cancelled and can no longer be paid",
}
_CANNOT_CANCEL = {
    OrderStatus.SHIPPED: "has shipped and can no longer be cancelled",
    OrderStatus.DELIVERED: "was delivered and can no longer be cancelled",
    OrderStatus.CANCELLED: "is already cancelled",
}
# Cancellation is possible until the order has shipped.
_CANCELLABLE = (OrderStatus.PENDING, OrderStatus.PAYMENT_CONFIRMED, OrderStatus.PREPARING)


def payment_refusal(
    state: OrderState, payment: PaymentRequest, cancel: CancelRequest | None
) -> Refusal | None:
    """Why the order cannot take this payment, or None if it can (or already has)."""
    accepted = state.payment_info
    if accepted is not None and accepted.transaction_id == payment.transaction_id:
        return None  # the same transaction again: processed once
    refused = next(
        (r for r in state.rejected_payments if r.transaction_id == payment.transaction_id), None
    )
    if refused is not None:
        why = f"refused transaction {payment.transaction_id}: {refused.reason.rstrip('.')}"
        return Refusal(RefusalKind.PREVIOUSLY_REFUSED, refused.reason, why)
    cannot_pay = _CANNOT_PAY.get(state.status, "cannot be paid")
    if accepted is not None:
        return Refusal(
            RefusalKind.ALREADY_PAID,
            f"Order is already paid by transaction {accepted.transaction_id}",
            _CANNOT_PAY.get(state.status, "is already paid by another transaction"),
        )
    if cancel is not None:
        return Refusal(
            RefusalKind.NOT_PAYABLE,
            f"Order was cancelled ({cancel.reason}) and takes no payment",
            cannot_pay,
        )
    if state.status != OrderStatus.PENDING:
        reason = f"Order is {state.status.value} and takes no payment"
        return Refusal(RefusalKind.NOT_PAYABLE, reason, cannot_pay)
    total = state.total_amount
    if payment.amount.currency_code != total.currency_code:
        return Refusal(
            RefusalKind.AMOUNT_MISMATCH,
            f"Currency {payment.amount.currency_code} does not match the order's {total}",
        )
    if payment.amount.total_nanos != total.total_nanos:
        return Refusal(
            RefusalKind.AMOUNT_MISMATCH,
            f"Amount {payment.amount} does not equal the order total {total}",
        )
    return None


def cancellation_refusal(status: OrderStatus, *, handed_to_carrier: bool) -> Refusal | None:
    """Why the order can no longer be cancelled, or None if it can."""
    if handed_to_carrier or status not in _CANCELLABLE:
        return Refusal(
            RefusalKind.NOT_CANCELLABLE,
            f"Order is {status.value} and cannot be cancelled",
            _CANNOT_CANCEL.get(status, "can no longer be cancelled"),
        )
    return None


def cancellation_of(state: OrderState) -> CancelRequest | None:
    """The order's cancellation, as far as its state shows one."""
    if state.status != OrderStatus.CANCELLED:
        return None
    return CancelRequest(state.cancellation_reason or "")


def is_settled(state: OrderState) -> bool:
    """Whether the order has reached its end: delivered, or cancelled and compensated."""
    if state.status == OrderStatus.DELIVERED:
        return True
    if state.status != OrderStatus.CANCELLED:
        return False
    # A compensation that failed for good is settled too: recorded, for a person.
    failed = {failure.step for failure in state.failures}
    refunded = state.payment_info is None or state.refund_info is not None
    released = not state.inventory_info.reservation_id or state.inventory_info.released
    return (refunded or "refund_payment" in failed) and (released or "release_inventory" in failed)


class InvalidEmailAddress(ValueError):
    """Not a single plain email address that the mailer can send to."""


@functools.lru_cache(maxsize=4096)
def parse_email_address(text: str) -> Address:
    """One plain address like name@example.com, or InvalidEmailAddress.

    Cached (an Address is immutable; errors are not cached): the stdlib's RFC
    5322 parser costs about 90 µs, most of a CreateOrder's validation, and
    one order's emails, like one customer's orders, share an address.
    """
    # Building the Address ourselves rejects header injection (CR/LF) and
    # lists of recipients, which a plain string header would let through.
    # The messages mask the address: they end up in logs and in the activity's failure.
    if not _EMAIL.fullmatch(text) or any(ch in text for ch in '\r\n,;<>"()'):
        raise InvalidEmailAddress(f"not a single email address: {mask_email(text)}")
    try:
        return Address(addr_spec=text)
    except (ValueError, IndexError, HeaderParseError) as err:
        raise InvalidEmailAddress(f"not a valid email address: {mask_email(text)}") from err


_SHOWN_DOMAIN = re.compile(r"[\w.-]+")


def mask_email(text: str) -> str:
    """An email address as a log line or an error may show it: "a***@example.com".

    Only the first character of the name, if a letter or digit, and the domain, if
    plain; anything else, "***". Never a line break, whatever `text` holds.
    """
    name, at, domain = text.partition("@")
    if not at:
        return "***"
    first = name[:1] if name[:1].isalnum() else ""
    return f"{first}***@{domain if _SHOWN_DOMAIN.fullmatch(domain) else '***'}"


# --- A cancellation reason ----------------------------------------------------------
# It is the customer's text, shown back in the cancellation email. So it is one line,
# and holds nothing that changes how the text around it reads: no control characters
# (tabs and line breaks included), no line or paragraph separators, and none of the
# bidirectional controls that reorder what follows them ("Trojan Source", CVE-2021-42574).
BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
_BREAKS = frozenset("\t\n\v\f\r\x1c\x1d\x1e\x85\u2028\u2029")
# Unicode's categories Cc (fixed by its stability policy), Zl and Zp, as the ranges of a
# character class: a regex finds them in a field in 0.5 µs, where a unicodedata.category
# call per character took about 10. The request validation checks its fields with it too.
CONTROL_CHARS = "\x00-\x1f\x7f-\x9f\u2028\u2029"
_UNSAFE_IN_REASON = re.compile(f"[{CONTROL_CHARS}{''.join(sorted(BIDI_CONTROLS))}]")


def is_safe_reason(reason: str) -> bool:
    """Whether a cancellation reason holds none of those characters (CancelOrder's check)."""
    return _UNSAFE_IN_REASON.search(reason) is None


def safe_reason(reason: str) -> str:
    """The reason with each such character replaced: a break by a space, any other by
    U+FFFD. For a reason that reached the order without the server's check (a signal
    sent straight to Temporal, an order from before the check)."""
    return _UNSAFE_IN_REASON.sub(
        lambda found: " " if found.group() in _BREAKS else "\ufffd", reason
    )
