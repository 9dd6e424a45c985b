"""The custom search attributes each order keeps up to date, for ListOrders."""

from __future__ import annotations

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

# The memo key holding the exact total (a Money), returned with list results.
MEMO_TOTAL_AMOUNT = "total_amount"
# The memo key holding the order's whole state (an OrderState), as of the
# workflow's last completed task: what reads answer from, with no worker needed.
MEMO_ORDER_STATE = "order"


def dev_server_flags() -> list[str]:
    """`temporal server start-dev` arguments registering every key."""
    flags = []
    for key in ALL:  # the CLI spells the types Keyword, Datetime, Int
        flags += ["--search-attribute", f"{key.name}={key.indexed_value_type.name.title()}"]
    return flags


def for_listing(
    customer_id: str, status: str, created_at: datetime, total: Money
) -> list[SearchAttributePair[Any]]:
    """What ListOrders filters on: set by the server when it starts the order, kept by the
    workflow."""
    return [
        SearchAttributePair(ORDER_CUSTOMER_ID, customer_id),
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
