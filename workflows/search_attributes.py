"""The custom search attributes each order keeps up to date, for ListOrders."""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime
from typing import Any

from temporalio.common import SearchAttributeKey, SearchAttributePair

from workflows.money import Money

ORDER_CUSTOMER_ID = SearchAttributeKey.for_keyword("OrderCustomerId")
ORDER_STATUS = SearchAttributeKey.for_keyword("OrderStatus")
ORDER_CREATED_AT = SearchAttributeKey.for_datetime("OrderCreatedAt")
ORDER_CURRENCY = SearchAttributeKey.for_keyword("OrderCurrency")
# Visibility has no decimal type, and a float would round money. Whole
# micro-units (1/1,000,000) fit an int64 up to 9.2 trillion, beyond any order;
# the exact total is in the workflow's memo.
ORDER_TOTAL_MICROS = SearchAttributeKey.for_int("OrderTotalMicros")

ALL: list[SearchAttributeKey[Any]] = [
    ORDER_CUSTOMER_ID,
    ORDER_STATUS,
    ORDER_CREATED_AT,
    ORDER_CURRENCY,
    ORDER_TOTAL_MICROS,
]

# What OrderCustomerId holds: "h1:" and the hex HMAC-SHA256 of the customer id under the
# customer-id key (infra/keys.py), never the id itself (docs/decisions/0017). The "h1:"
# names the scheme, so a value made another way can be told apart. Orders started
# before it hold the raw id.
CUSTOMER_KEY_PREFIX = "h1:"

# The memo key holding the exact total (a Money), returned with list results.
MEMO_TOTAL_AMOUNT = "total_amount"
# The memo key holding the order's whole state (an OrderState), as of the
# workflow's last completed task: what reads answer from, with no worker needed.
MEMO_ORDER_STATE = "order"
# The memo key holding the customer id (a str), which the search attribute only hashes:
# what ListOrders shows, decoded in a few µs where the whole state takes about 0.5 ms.
MEMO_CUSTOMER_ID = "customer_id"


def customer_key(key: bytes, customer_id: str) -> str:
    """What visibility holds for a customer id: keyed, so that without the key a list of
    likely ids cannot be hashed and compared (which a plain SHA-256 would allow)."""
    digest = hmac.new(key, customer_id.encode(), hashlib.sha256).hexdigest()
    return CUSTOMER_KEY_PREFIX + digest


def dev_server_flags() -> list[str]:
    """`temporal server start-dev` arguments registering every key."""
    flags = []
    for key in ALL:  # the CLI spells the types Keyword, Datetime, Int
        flags += ["--search-attribute", f"{key.name}={key.indexed_value_type.name.title()}"]
    return flags


def for_listing(
    customer: str, status: str, created_at: datetime, total: Money
) -> list[SearchAttributePair[Any]]:
    """What ListOrders filters on: set by the server when it starts the order, kept by the
    workflow. `customer` is the customer_key (the raw id only for orders from before it)."""
    return [
        SearchAttributePair(ORDER_CUSTOMER_ID, customer),
        SearchAttributePair(ORDER_STATUS, status),
        SearchAttributePair(ORDER_CREATED_AT, created_at),
        SearchAttributePair(ORDER_CURRENCY, total.currency_code),
        SearchAttributePair(ORDER_TOTAL_MICROS, total_micros(total)),
    ]


def total_micros(total: Money) -> int:
    """An order total (never negative) in whole micro-units, for filtering only."""
    return total.total_nanos // 1000


if __name__ == "__main__":
    print(" ".join(dev_server_flags()))
