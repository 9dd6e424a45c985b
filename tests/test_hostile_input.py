"""Hostile input: random and adversarial requests at every RPC, through real gRPC.

Hypothesis generates the requests: empty and huge strings, unicode from every
plane (right-to-left, zero-width, combining, emoji; no surrogates, which
protobuf strings cannot hold), control characters, quotes, backslashes and
injection attempts in ids, int64 money at its extremes, nanos out of range,
mismatched signs, currency codes of every shape, huge item lists, int32
quantities at their limits, and raw bytes that are not a valid protobuf of
the request type. For every example:

- the status code is one the RPC may answer with (never UNKNOWN or INTERNAL,
  nor UNIMPLEMENTED: every RPC is served), and every error carries the detail
  its code promises (BadRequest for INVALID_ARGUMENT, ResourceInfo for
  NOT_FOUND, PreconditionFailure for FAILED_PRECONDITION);
- a hostile ConfirmPayment or CancelOrder never succeeds; most ConfirmPayments
  are built from valid parts (a real order, a valid transaction, its exact
  total or a near amount) so that they reach the order's rules: a payable
  order takes exactly one payment of exactly its total, captured once, and
  at least half of the examples get past validation (counted);
- a CreateOrder that is accepted stores exactly what was sent;
- a ListOrders answer keeps every promise of its request (customer, status,
  created_after inclusive, created_before exclusive, page size, newest
  first), lists the real orders as they were created, and, when it is the
  whole answer, lists every real order that matches.

Bytes that do not parse as the request never reach the servicer: grpc-python
would answer them with UNKNOWN ("Unexpected <class DecodeError>"), so the
server's interceptor (server/decoding.py) answers INVALID_ARGUMENT instead;
`test_raw_bytes` checks that for every such example.

At the end of the module (the last test): three real orders created first are
exactly as they were (GetOrder equal field by field, no signal in their
histories), and the stack's task queue holds no workflow but those orders and
the ones accepted CreateOrders started. Then every order of the stack is
cancelled, so nothing is left open.

The tests are async Hypothesis tests: pytest-asyncio runs each example on the
session event loop, where the Temporal client, worker and gRPC server live.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import string
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest
import pytest_asyncio
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from google.type.money_pb2 import Money
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError
from temporalio.testing import WorkflowEnvironment

from acme.orders.v1 import order_service_pb2 as pb
from server.api.servicer import PAYMENT_ALREADY_RECORDED_MESSAGE, PAYMENT_RECEIVED_MESSAGE
from tests.support.money import as_money, assert_money_moved
from tests.support.orders import create_request, money
from tests.support.polling import eventually
from tests.support.stack import Stack, open_stack
from workflows.money import NANOS_PER_UNIT
from workflows.money import Money as WorkflowMoney

T = TypeVar("T")
Code = grpc.StatusCode
S = pb.OrderStatus

SERVICE = "/acme.orders.v1.OrderService/"
RPC_TIMEOUT = 15.0
# The share of ConfirmPayment examples that must get past validation on a real order.
MIN_PAYMENTS_REACHING_THE_RULES = 0.5
GRPC_DEFAULT_MAX_RECEIVE = 4 * 1024 * 1024
# What a stream's read() returns once the server has ended it (grpc-stubs lacks it).
STREAM_END: object = grpc.aio.EOF  # type: ignore[attr-defined]

# HOSTILE_EXAMPLES_SCALE=10 runs ten times as many examples, for a deeper search.
_SCALE = float(os.environ.get("HOSTILE_EXAMPLES_SCALE", "1"))
EXAMPLES = {
    "CreateOrder": 200,
    "ConfirmPayment": 200,
    "CancelOrder": 200,
    "GetOrder": 100,
    "GetOrderStatus": 80,
    "GetEstimatedDelivery": 80,
    "ListOrders": 100,
    "WatchOrder": 50,
    "raw bytes": 400,
}


def hypothesis_settings(name: str) -> settings:
    return settings(
        max_examples=max(1, round(EXAMPLES[name] * _SCALE)),
        deadline=None,
        database=None,  # no .hypothesis/ directory in the repository
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.function_scoped_fixture,
        ],
    )


# --- Strategies: the hostile values --------------------------------------------------------------

INJECTIONS = [
    "' OR '1'='1",
    '" OR ""="',
    "'; DROP TABLE orders; --",
    "x' OR WorkflowId != '",
    "ORD-1') OR ('1'='1",
    "CustomerId = 'CUST-001' OR 1=1",
    "order-*",
    "*",
    "%",
    "_",
    "\\",
    "\\'",
    "\\\\x00",
    "${jndi:ldap://example.com/a}",
    "{{7*7}}",
    "%s%s%n",
    "../../etc/passwd",
    "<script>alert(1)</script>",
    "ORD-1\r\nX-Injected: 1",
    "null",
    "None",
    "NaN",
    "-1",
    "[]",
    "{}",
]
WEIRD_CHARS = [
    "\u202e",  # right-to-left override
    "\u202d",
    "\u200f",  # right-to-left mark
    "\u200b",  # zero-width space
    "\u200d",  # zero-width joiner
    "\u2060",  # word joiner
    "\ufeff",  # byte order mark
    "\u0301",  # combining acute accent
    "\u05d0",  # Hebrew alef
    "\u0627",  # Arabic alef
    "\u041e",  # Cyrillic O, looks like a Latin O
    "\uff35",  # fullwidth U
    "\ufffd",  # replacement character
    "\uffff",  # a noncharacter
    "\U0001f600",  # emoji (plane 1)
    "\U0002a6d6",  # CJK extension B (plane 2)
    "\U000e0041",  # tag character (plane 14)
    "\U0010fffd",  # private use (plane 16)
    "'",
    '"',
    "\\",
    "`",
    ";",
    " ",
]
# Control characters that no single-line field takes (a cancellation reason included).
CONTROL_CHARS = ["\x00", "\x01", "\x07", "\x0b", "\x0c", "\x1b", "\x7f", "\x85", "\u2028", "\u2029"]
EVERY_CHAR = st.characters(codec="utf-8")  # every code point but surrogates


def mix(*strategies: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """One of the strategies, each equally likely (st.one_of flattens nested one_ofs,
    so that a strategy with many branches would crowd out the others)."""
    return st.integers(0, len(strategies) - 1).flatmap(lambda i: strategies[i])


def joined(parts: st.SearchStrategy[str], max_size: int = 30) -> st.SearchStrategy[str]:
    return st.lists(parts, max_size=max_size).map("".join)


def huge(pieces: list[str], max_repeat: int = 300_000) -> st.SearchStrategy[str]:
    """A long string made by repetition: drawing it character by character would be slow."""
    return st.builds(
        lambda piece, n: piece * n, st.sampled_from(pieces), st.integers(65, max_repeat)
    )


HOSTILE_TEXT: st.SearchStrategy[str] = st.one_of(
    st.just(""),
    st.text(EVERY_CHAR, max_size=60),
    st.sampled_from(INJECTIONS),
    joined(st.one_of(st.sampled_from(WEIRD_CHARS + CONTROL_CHARS), EVERY_CHAR)),
    huge(["x", "é", "\U0001f600", "'", "\u200b", "\x00", "A-"]),
    st.builds(
        lambda base, weird: base + weird,
        st.sampled_from(["ORD-", "CUST-001", "PROD-123", "TXN-1", "credit_card"]),
        st.sampled_from(WEIRD_CHARS + CONTROL_CHARS + INJECTIONS),
    ),
)
# Sometimes valid, so that the other fields of a request are the ones checked.
NICE_ID = st.from_regex(r"[A-Z]{3,4}-[A-Z0-9]{1,12}", fullmatch=True)
ID = st.one_of(HOSTILE_TEXT, NICE_ID)
NICE_TEXT = st.text(EVERY_CHAR.filter(lambda c: c.isprintable()), min_size=1, max_size=40).filter(
    str.strip
)
TEXT = st.one_of(HOSTILE_TEXT, NICE_TEXT)

INT64 = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, -1, 999, 10**12, 10**12 + 1, 2**53 + 1, 2**62, 2**63 - 1, -(2**63)]),
)
INT32 = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from([0, 1, -1, 10_000, 10_001, 2**31 - 1, -(2**31)]),
)
NANOS = st.one_of(
    INT32,
    st.sampled_from([0, 1, -1, 999_999_999, -999_999_999, 1_000_000_000, -1_000_000_000]),
)
CURRENCY = st.one_of(
    st.sampled_from(
        [
            *["USD", "EUR", "JPY", "ZZZ", "usd", "Usd", "US", "USDD", "", "U$D", "ÜSD", "ＵＳＤ"],
            *["US\u200bD", "USD ", " USD", "\x00US", "'OR", "123", "USD\n"],
        ]
    ),
    st.text(EVERY_CHAR, max_size=5),
    st.from_regex(r"[A-Z]{3}", fullmatch=True),
)
MONEY: st.SearchStrategy[Money] = st.one_of(
    st.builds(Money, currency_code=CURRENCY, units=INT64, nanos=NANOS),
    # Plausible amounts, so that an item is sometimes valid.
    st.builds(
        Money,
        currency_code=st.sampled_from(["USD", "EUR"]),
        units=st.integers(0, 10_000),
        nanos=st.integers(0, 999_999_999),
    ),
)
QUANTITY = st.one_of(INT32, st.integers(1, 10_000))


def item_strategy(text: st.SearchStrategy[str] = TEXT) -> st.SearchStrategy[pb.OrderItem]:
    return st.builds(
        pb.OrderItem,
        product_id=text,
        product_name=text,
        quantity=QUANTITY,
        price=st.one_of(st.none(), MONEY),
    )


ITEMS: st.SearchStrategy[list[pb.OrderItem]] = st.one_of(
    st.lists(item_strategy(st.one_of(ID, TEXT)), max_size=5),
    # Far too many items, built by repetition (of short strings: 20,000 huge ones
    # would not fit in memory).
    st.builds(
        lambda item, n: [item] * n,
        item_strategy(st.text(EVERY_CHAR, max_size=20)),
        st.integers(101, 20_000),
    ),
)
# A few request_ids used again and again: retries, and reuses for other orders.
REQUEST_IDS = [str(uuid.uuid4()) for _ in range(3)]
REQUEST_ID = st.one_of(
    st.sampled_from(REQUEST_IDS),
    st.sampled_from(REQUEST_IDS).map(str.upper),
    st.uuids().map(str),
    st.uuids().map(lambda u: "{" + str(u) + "}"),
    st.uuids().map(lambda u: u.hex),
    HOSTILE_TEXT,
)
EMAIL = st.one_of(
    st.just(""),
    st.emails().map(str),
    st.builds(lambda a, b: f"{a}@{b}.com", TEXT, TEXT),
    HOSTILE_TEXT,
)


CREATE_TEXT_FIELDS: dict[str, st.SearchStrategy[str]] = {
    "customer_id": ID,
    "customer_email": EMAIL,
    "request_id": REQUEST_ID,
    "shipping_address": TEXT,
    "shipping_city": TEXT,
    "shipping_postal_code": TEXT,
    "shipping_country": TEXT,
}
ITEM_FIELDS = ["product_id", "product_name", "quantity", "price"]


@st.composite
def create_requests(draw: st.DrawFn) -> pb.CreateOrderRequest:
    """The seed's valid order with one to four of its fields made hostile."""
    request = create_request()
    choices = [*CREATE_TEXT_FIELDS, "items", "more items", *(f"items[0].{f}" for f in ITEM_FIELDS)]
    for name in draw(st.lists(st.sampled_from(choices), min_size=1, max_size=4)):
        if name in CREATE_TEXT_FIELDS:
            setattr(request, name, draw(CREATE_TEXT_FIELDS[name]))
        elif name == "items":
            del request.items[:]
            request.items.extend(draw(ITEMS))
        elif name == "more items":
            request.items.extend(draw(st.lists(item_strategy(st.one_of(ID, TEXT)), max_size=3)))
        elif request.items:
            item = request.items[0]
            if name == "items[0].product_id":
                item.product_id = draw(ID)
            elif name == "items[0].product_name":
                item.product_name = draw(TEXT)
            elif name == "items[0].quantity":
                item.quantity = draw(QUANTITY)
            else:
                item.price.CopyFrom(draw(MONEY))
    return request


def lookalikes(order_id: str) -> list[str]:
    """Ids that resemble a real order's id but are not it."""
    return [
        order_id.lower(),
        order_id[:-1],
        order_id + "0",
        order_id + " ",
        " " + order_id,
        order_id + "\u200b",
        "\u202e" + order_id,
        order_id + "\x00",
        order_id + "\n",
        order_id.replace("O", "\u041e"),
        order_id.replace("-", "_"),
        "order-" + order_id,
        order_id + "' OR '1'='1",
        order_id + "*",
        order_id + "%",
        order_id * 2,
    ]


# --- The stack and the real orders ----------------------------------------------------------------


@dataclass
class Hostile:
    """The stack under attack, the orders that must not change, and what happened."""

    stack: Stack
    real: dict[str, pb.Order]  # order id -> GetOrder right after creation
    totals: dict[str, Money]  # of the real orders
    # Orders ConfirmPayment may pay, once each: order id -> total.
    payable: dict[str, Money] = field(default_factory=dict)
    paid: dict[str, str] = field(default_factory=dict)  # payable order id -> its transaction
    created: set[str] = field(default_factory=set)  # order ids accepted CreateOrders started
    examples: Counter[str] = field(default_factory=Counter)
    codes: dict[str, Counter[str]] = field(default_factory=dict)
    # ConfirmPayment examples on a real or payable order, and those that reached its rules.
    payments_on_orders: int = 0
    payments_reaching_rules: int = 0

    def record(self, rpc: str, code: Code) -> None:
        self.examples[rpc] += 1
        self.codes.setdefault(rpc, Counter())[code.name] += 1

    def order_ids(self) -> st.SearchStrategy[str]:
        """Real ids, their lookalikes, and hostile strings."""
        real = sorted(self.real)
        return mix(
            st.sampled_from(real),
            st.sampled_from([fake for order_id in real for fake in lookalikes(order_id)]),
            ID,
        )


REAL_ORDERS = [
    create_request(),
    create_request(
        customer_id="CUST-002",
        items=[
            pb.OrderItem(
                product_id="PROD-9",
                product_name="Caf\u00e9 \u202eRTL\u202c \u05e9\u05dc\u05d5\u05dd \U0001f680 \u200b",
                quantity=3,
                price=money(12, 500_000_000, "EUR"),
            ),
            pb.OrderItem(
                product_id="PROD-10",
                product_name="'; DROP TABLE orders; -- \\ \"",
                quantity=10_000,
                price=money(0, 10_000_000, "EUR"),
            ),
        ],
        shipping_address="\u6771\u4eac\u90fd 1-2-3",
        shipping_city="Z\u00fcrich",
    ),
    create_request(
        items=[
            pb.OrderItem(product_id="P", product_name="Y", quantity=1, price=money(5000, 0, "JPY"))
        ]
    ),
]


def shifted(timestamp: Timestamp, nanos: int) -> Timestamp:
    """The instant `nanos` nanoseconds after (or before) `timestamp`."""
    seconds, rest = divmod(timestamp.seconds * 1_000_000_000 + timestamp.nanos + nanos, 10**9)
    return Timestamp(seconds=seconds, nanos=rest)


async def reserved(stack: Stack, order_id: str) -> pb.Order:
    """The order once its inventory is reserved: from then on it waits for its payment."""
    return await eventually(
        lambda: stack.stub.GetOrder(pb.GetOrderRequest(order_id=order_id)),
        lambda order: bool(order.inventory_info.reservation_id),
    )


@pytest_asyncio.fixture(scope="module")
async def hostile(
    temporal: WorkflowEnvironment, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Hostile]:
    """A stack of its own (so its workflows can be counted) with three real pending orders."""
    async with open_stack(temporal.client, tmp_path_factory.mktemp("hostile-outbox")) as stack:
        real: dict[str, pb.Order] = {}
        totals: dict[str, Money] = {}
        for request in REAL_ORDERS:
            created = await stack.stub.CreateOrder(request, timeout=RPC_TIMEOUT)
            order = await reserved(stack, created.order_id)
            assert order.status == S.ORDER_STATUS_PENDING
            real[created.order_id] = order
            totals[created.order_id] = created.total_amount
        payable: dict[str, Money] = {}
        for request in REAL_ORDERS:  # the same orders again, for ConfirmPayment to pay
            created = await stack.stub.CreateOrder(request, timeout=RPC_TIMEOUT)
            await reserved(stack, created.order_id)
            payable[created.order_id] = created.total_amount
        yield Hostile(stack=stack, real=real, totals=totals, payable=payable)


@pytest_asyncio.fixture(scope="module")
async def listed_in_visibility(hostile: Hostile) -> None:
    """Until ListOrders finds each real order by all its filters (visibility lags a little)."""

    async def found(order_id: str, order: pb.Order) -> bool:
        request = pb.ListOrdersRequest(
            customer_id=order.customer_id,
            status=S.ORDER_STATUS_PENDING,
            created_after=order.created_at,
            created_before=shifted(order.created_at, 1000),
        )
        answer = await hostile.stack.stub.ListOrders(request, timeout=RPC_TIMEOUT)
        return order_id in {summary.order_id for summary in answer.orders}

    for order_id, order in hostile.real.items():
        await eventually(
            functools.partial(found, order_id, order), bool, what=f"ListOrders finding {order_id}"
        )


# --- Calling and checking -------------------------------------------------------------------------


@dataclass
class Outcome:
    code: Code
    response: Any = None
    error: grpc.aio.AioRpcError | None = None

    @property
    def details(self) -> str:
        return (self.error.details() or "") if self.error else ""

    def detail(self, kind: type[T]) -> T | None:
        """The google.rpc detail of this type, if the error carries one."""
        if self.error is None:
            return None
        status = rpc_status.from_call(self.error)  # type: ignore[arg-type]
        if status is None:
            return None
        for any_detail in status.details:
            if any_detail.Is(kind.DESCRIPTOR):  # type: ignore[attr-defined]
                message = kind()
                any_detail.Unpack(message)
                return message
        return None


async def outcome(call: Awaitable[Any]) -> Outcome:
    try:
        return Outcome(Code.OK, response=await call)
    except grpc.aio.AioRpcError as err:
        return Outcome(err.code(), error=err)


def check(hostile: Hostile, rpc: str, result: Outcome, allowed: set[Code], request: object) -> None:
    """The code is allowed and the error carries the detail its code promises."""
    hostile.record(rpc, result.code)
    where = f"{rpc}({_short(request)}) -> {result.code.name}: {result.details[:300]}"
    assert result.code not in (Code.UNKNOWN, Code.INTERNAL), where
    assert result.code in allowed, where
    if result.code == Code.INVALID_ARGUMENT:
        bad = result.detail(error_details_pb2.BadRequest)
        assert bad is not None, where
        assert len(bad.field_violations) > 0, where
    elif result.code == Code.NOT_FOUND:
        assert result.detail(error_details_pb2.ResourceInfo) is not None, where
    elif result.code == Code.FAILED_PRECONDITION:
        assert result.detail(error_details_pb2.PreconditionFailure) is not None, where


def _short(request: object) -> str:
    text = str(request).replace("\n", " ")
    return text if len(text) < 400 else f"{text[:400]}... ({len(text)} chars)"


# --- CreateOrder ----------------------------------------------------------------------------------


@hypothesis_settings("CreateOrder")
@given(request=create_requests())
async def test_create_order(hostile: Hostile, request: pb.CreateOrderRequest) -> None:
    stub = hostile.stack.stub
    result = await outcome(stub.CreateOrder(request, timeout=RPC_TIMEOUT))
    allowed = {Code.OK, Code.INVALID_ARGUMENT, Code.ALREADY_EXISTS, Code.RESOURCE_EXHAUSTED}
    check(hostile, "CreateOrder", result, allowed, request)
    if result.code != Code.OK:
        return
    # Accepted: the order holds exactly what was sent, however odd.
    created: pb.CreateOrderResponse = result.response
    hostile.created.add(created.order_id)
    order = await stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id), timeout=RPC_TIMEOUT)
    sent = pb.CreateOrderRequest()
    sent.CopyFrom(request)
    sent.ClearField("request_id")
    stored = pb.CreateOrderRequest(
        customer_id=order.customer_id,
        items=order.items,
        shipping_address=order.shipping_address,
        shipping_city=order.shipping_city,
        shipping_postal_code=order.shipping_postal_code,
        shipping_country=order.shipping_country,
        customer_email=order.customer_email,
    )
    assert stored == sent


# --- ConfirmPayment and CancelOrder: never succeed, never touch a real order ----------------------


VALID_TRANSACTION_ID = mix(
    st.sampled_from(["TXN-1", "TXN-2", "TXN-3"]),  # repeats: the same transaction again
    st.from_regex(r"[A-Za-z0-9._:-]{1,40}", fullmatch=True),
)
VALID_METHOD = st.sampled_from(["credit_card", "card", "paypal"])


def near(total: Money) -> list[Money]:
    """Positive amounts close to the total, never the total itself: off by a nano, a unit..."""
    exact = as_money(total)
    nanos = exact.total_nanos
    offsets = [1, -1, 1000, NANOS_PER_UNIT, -NANOS_PER_UNIT, nanos, -(nanos // 2)]
    amounts = [
        WorkflowMoney.from_total_nanos(exact.currency_code, nanos + offset)
        for offset in offsets
        if nanos + offset > 0
    ]
    other = "EUR" if exact.currency_code != "EUR" else "USD"
    amounts.append(WorkflowMoney(other, exact.units, exact.nanos))  # the digits, not the money
    return [money(a.units, a.nanos, a.currency_code) for a in amounts]


@st.composite
def payments_from_valid_parts(draw: st.DrawFn, hostile: Hostile) -> pb.ConfirmPaymentRequest:
    """A payment that passes validation on a real or payable order: it reaches the rules."""
    totals = hostile.totals | hostile.payable
    order_id = draw(mix(st.sampled_from(sorted(hostile.payable)), st.sampled_from(sorted(totals))))
    total = totals[order_id]
    amount = draw(mix(st.just(total), st.sampled_from(near(total))))
    if order_id in hostile.real and amount == total:
        # The right amount would legitimately pay an order that must not change.
        amount = near(total)[0]
    return pb.ConfirmPaymentRequest(
        order_id=order_id,
        transaction_id=draw(VALID_TRANSACTION_ID),
        amount=amount,
        payment_method=draw(VALID_METHOD),
    )


@st.composite
def hostile_payments(draw: st.DrawFn, hostile: Hostile) -> pb.ConfirmPaymentRequest:
    """A payment with hostile fields, each often valid so that the others are the ones checked."""
    order_id = draw(hostile.order_ids())
    request = pb.ConfirmPaymentRequest(
        order_id=order_id,
        transaction_id=draw(mix(ID, VALID_TRANSACTION_ID)),
        amount=draw(mix(st.none(), MONEY, st.sampled_from(list(hostile.totals.values())))),
        payment_method=draw(mix(ID, VALID_METHOD)),
    )
    if order_id in hostile.real and request.amount == hostile.totals[order_id]:
        # The right amount for a real order: with a valid transaction it would
        # legitimately pay it. A missing transaction id keeps it hostile.
        request.transaction_id = ""
    return request


def payments(hostile: Hostile) -> st.SearchStrategy[pb.ConfirmPaymentRequest]:
    """Three in four from valid parts (they reach the rules), one in four hostile."""
    valid = payments_from_valid_parts(hostile)
    return mix(valid, valid, valid, hostile_payments(hostile))


def reached_the_rules(result: Outcome) -> bool:
    """Whether the order judged the payment: accepted, or refused by its rules, not validation."""
    if result.code in (Code.OK, Code.FAILED_PRECONDITION):
        return True
    info = result.detail(error_details_pb2.ErrorInfo)
    return info is not None and info.reason == "PAYMENT_AMOUNT_MISMATCH"


async def check_payable(
    hostile: Hostile, request: pb.ConfirmPaymentRequest, result: Outcome
) -> None:
    """A payable order takes one payment, of exactly its total; refuses the rest by its rules."""
    order_id, txn = request.order_id, request.transaction_id
    paid_by = hostile.paid.get(order_id)
    total = hostile.payable[order_id]
    where = f"{_short(request)} -> {result.code.name}: {result.details[:300]}"
    if result.code == Code.OK:
        if paid_by is None:
            assert request.amount == total, where
            assert result.response.message == PAYMENT_RECEIVED_MESSAGE, where
            hostile.paid[order_id] = txn
            # Until the order shows it, so the next example sees a paid order.
            await eventually(
                lambda: hostile.stack.stub.GetOrder(pb.GetOrderRequest(order_id=order_id)),
                lambda order: order.payment_info.transaction_id == txn,
                what=f"{order_id} paid by {txn}",
            )
        else:
            assert txn == paid_by, where  # the same transaction again: nothing to do
            assert result.response.message == PAYMENT_ALREADY_RECORDED_MESSAGE, where
    elif result.code == Code.FAILED_PRECONDITION:
        # Paid by another transaction.
        assert paid_by is not None, where
        assert txn != paid_by, where
    elif reached_the_rules(result):
        # Refused for its amount: the order is unpaid and the amount is not its total.
        assert paid_by is None, where
        assert request.amount != total, where


@hypothesis_settings("ConfirmPayment")
@given(data=st.data())
async def test_confirm_payment(hostile: Hostile, data: st.DataObject) -> None:
    request = data.draw(payments(hostile))
    result = await outcome(hostile.stack.stub.ConfirmPayment(request, timeout=RPC_TIMEOUT))
    allowed = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION}
    if request.order_id in hostile.payable:
        allowed.add(Code.OK)
    check(hostile, "ConfirmPayment", result, allowed, request)
    if request.order_id in hostile.real:
        assert result.code == Code.INVALID_ARGUMENT, result.details
    if request.order_id in hostile.real or request.order_id in hostile.payable:
        hostile.payments_on_orders += 1
        hostile.payments_reaching_rules += reached_the_rules(result)
    if request.order_id in hostile.payable:
        await check_payable(hostile, request, result)


async def test_confirm_payment_reached_the_rules_and_moved_money_once(hostile: Hostile) -> None:
    """Right after test_confirm_payment: most of its examples got past validation; each
    payable order was captured exactly once, exactly its total, if it was paid at all."""
    examples = hostile.examples["ConfirmPayment"]
    if not examples:
        pytest.skip("test_confirm_payment was not selected")
    share = hostile.payments_reaching_rules / examples
    print(
        f"\nConfirmPayment: {share:.0%} of {examples} examples reached an order's rules; "
        f"{len(hostile.paid)} of {len(hostile.payable)} payable orders paid"
    )
    assert share >= MIN_PAYMENTS_REACHING_THE_RULES, (hostile.payments_on_orders, examples)
    stack = hostile.stack
    for order_id, total in hostile.payable.items():
        txn = hostile.paid.get(order_id)
        if txn is not None:
            await stack.client.get_workflow_handle(f"order-{order_id}").result()
        order = await stack.stub.GetOrder(pb.GetOrderRequest(order_id=order_id))
        assert order.payment_info.transaction_id == (txn or "")
        assert not order.rejected_payments
        captured = total if txn is not None else None
        await assert_money_moved(stack.activities, order_id, captured=captured)


# A reason is one line, and holds none of the controls that reorder text (workflows/rules.py).
BIDI_CONTROLS = list("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
INVALID_REASON = st.one_of(
    st.builds(
        lambda before, control, after: before + control + after,
        st.text(EVERY_CHAR, max_size=20),
        st.sampled_from([*CONTROL_CHARS, *BIDI_CONTROLS, "\n", "\r", "\t"]),
        st.text(EVERY_CHAR, max_size=20),
    ),
    # Longer than the 500 characters a reason may have.
    st.builds(
        lambda piece, n: piece * n,
        st.sampled_from(["x", "\U0001f600", "'", "a\n"]),
        st.integers(501, 100_000),
    ),
)


@hypothesis_settings("CancelOrder")
@given(data=st.data())
async def test_cancel_order(hostile: Hostile, data: st.DataObject) -> None:
    order_id = data.draw(hostile.order_ids())
    # A valid reason would legitimately cancel a real order: those get only invalid ones.
    reason = data.draw(INVALID_REASON if order_id in hostile.real else TEXT)
    request = pb.CancelOrderRequest(order_id=order_id, reason=reason)
    result = await outcome(hostile.stack.stub.CancelOrder(request, timeout=RPC_TIMEOUT))
    check(hostile, "CancelOrder", result, {Code.INVALID_ARGUMENT, Code.NOT_FOUND}, request)
    if order_id in hostile.real:
        assert result.code == Code.INVALID_ARGUMENT, result.details


# --- The reads ------------------------------------------------------------------------------------

ReadCall = Callable[[Stack, str], Awaitable[Any]]
READS: dict[str, ReadCall] = {
    "GetOrder": lambda s, i: s.stub.GetOrder(pb.GetOrderRequest(order_id=i), timeout=RPC_TIMEOUT),
    "GetOrderStatus": lambda s, i: s.stub.GetOrderStatus(
        pb.GetOrderStatusRequest(order_id=i), timeout=RPC_TIMEOUT
    ),
    "GetEstimatedDelivery": lambda s, i: s.stub.GetEstimatedDelivery(
        pb.GetEstimatedDeliveryRequest(order_id=i), timeout=RPC_TIMEOUT
    ),
}


async def check_read(hostile: Hostile, rpc: str, order_id: str) -> None:
    result = await outcome(READS[rpc](hostile.stack, order_id))
    check(hostile, rpc, result, {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND}, order_id)
    # Found exactly when the id is a real order's, and then that order.
    assert (result.code == Code.OK) == (order_id in hostile.real), (order_id, result.code)
    if result.code == Code.OK:
        assert result.response.order_id == order_id


@hypothesis_settings("GetOrder")
@given(data=st.data())
async def test_get_order(hostile: Hostile, data: st.DataObject) -> None:
    await check_read(hostile, "GetOrder", data.draw(hostile.order_ids()))


@hypothesis_settings("GetOrderStatus")
@given(data=st.data())
async def test_get_order_status(hostile: Hostile, data: st.DataObject) -> None:
    await check_read(hostile, "GetOrderStatus", data.draw(hostile.order_ids()))


@hypothesis_settings("GetEstimatedDelivery")
@given(data=st.data())
async def test_get_estimated_delivery(hostile: Hostile, data: st.DataObject) -> None:
    await check_read(hostile, "GetEstimatedDelivery", data.draw(hostile.order_ids()))


# --- ListOrders and WatchOrder --------------------------------------------------------------------

TIMESTAMP = st.one_of(
    st.none(),
    st.builds(Timestamp, seconds=INT64, nanos=NANOS),
    st.builds(Timestamp, seconds=st.integers(0, 4_102_444_800), nanos=st.integers(0, 999_999_999)),
)
PAGE_TOKEN = st.one_of(
    HOSTILE_TEXT,
    st.binary(max_size=64).map(lambda b: b.hex()),
    st.text(string.ascii_letters + string.digits + "+/=_-", max_size=120),
)


def instant(timestamp: Timestamp) -> tuple[int, int]:
    """A Timestamp as a pair that compares as the instants do."""
    return timestamp.seconds, timestamp.nanos


def matches(request: pb.ListOrdersRequest, customer_id: str, status: int, at: Timestamp) -> bool:
    """Whether an order matches every filter of the request (created_before exclusive)."""
    return (
        (not request.customer_id or customer_id == request.customer_id)
        and (request.status == S.ORDER_STATUS_UNSPECIFIED or status == request.status)
        and (not request.HasField("created_after") or instant(at) >= instant(request.created_after))
        and (
            not request.HasField("created_before") or instant(at) < instant(request.created_before)
        )
    )


@st.composite
def list_requests(draw: st.DrawFn, hostile: Hostile) -> pb.ListOrdersRequest:
    """Hostile filters; the times often at a real order's creation, a nanosecond either side."""
    near_real = st.builds(
        shifted,
        st.sampled_from([order.created_at for order in hostile.real.values()]),
        st.sampled_from([0, 1, -1, 1000, -1000, 10**9, -(10**9)]),
    )
    times = mix(TIMESTAMP, near_real)
    customers = sorted({order.customer_id for order in hostile.real.values()})
    request: pb.ListOrdersRequest = draw(
        st.builds(
            pb.ListOrdersRequest,
            page_size=mix(INT32, st.integers(0, 1000)),
            page_token=st.one_of(st.just(""), PAGE_TOKEN),
            customer_id=st.one_of(st.just(""), st.sampled_from(customers), ID),
            status=st.one_of(st.sampled_from(list(S.values())), INT32),
            created_after=times,
            created_before=times,
        )
    )
    return request


@hypothesis_settings("ListOrders")
@given(data=st.data())
@pytest.mark.usefixtures("listed_in_visibility")
async def test_list_orders(hostile: Hostile, data: st.DataObject) -> None:
    request = data.draw(list_requests(hostile))
    result = await outcome(hostile.stack.stub.ListOrders(request, timeout=RPC_TIMEOUT))
    check(hostile, "ListOrders", result, {Code.OK, Code.INVALID_ARGUMENT}, request)
    if result.code != Code.OK:
        return
    # An injection in a filter must not widen the result: every order matches every filter.
    listed: pb.ListOrdersResponse = result.response
    where = _short(request)
    assert len(listed.orders) <= min(request.page_size or 50, 1000), where
    for summary in listed.orders:
        assert matches(request, summary.customer_id, summary.status, summary.created_at), (
            where,
            summary,
        )
    created = [instant(summary.created_at) for summary in listed.orders]
    assert created == sorted(created, reverse=True), where  # newest first
    # The real orders are listed as they were created.
    ids = {summary.order_id for summary in listed.orders}
    for summary in listed.orders:
        if (real := hostile.real.get(summary.order_id)) is not None:
            shown = (summary.customer_id, summary.status, summary.created_at, summary.total_amount)
            assert shown == (real.customer_id, real.status, real.created_at, real.total_amount)
    # The whole answer (no page before, none after) lists every real order that matches.
    if not request.page_token and not listed.next_page_token:
        for order_id, real in hostile.real.items():
            if matches(request, real.customer_id, real.status, real.created_at):
                assert order_id in ids, (where, order_id)
                hostile.examples["ListOrders, a real order due in a whole answer"] += 1


@hypothesis_settings("WatchOrder")
@given(data=st.data())
async def test_watch_order(hostile: Hostile, data: st.DataObject) -> None:
    # Real orders are excluded: watching one streams until the deadline.
    order_id = data.draw(hostile.order_ids().filter(lambda i: i not in hostile.real))
    call = hostile.stack.stub.WatchOrder(pb.WatchOrderRequest(order_id=order_id), timeout=10)
    try:
        first = await outcome(call.read())
    finally:
        call.cancel()
    if first.code == Code.OK and first.response is STREAM_END:
        first = Outcome(await call.code())  # the stream ended without an order
    check(hostile, "WatchOrder", first, {Code.INVALID_ARGUMENT, Code.NOT_FOUND}, order_id)


# --- Wrong types: bytes that are not the request --------------------------------------------------

REQUEST_TYPES: dict[str, type[ProtoMessage]] = {
    "CreateOrder": pb.CreateOrderRequest,
    "ConfirmPayment": pb.ConfirmPaymentRequest,
    "CancelOrder": pb.CancelOrderRequest,
    "GetOrder": pb.GetOrderRequest,
    "GetOrderStatus": pb.GetOrderStatusRequest,
    "GetEstimatedDelivery": pb.GetEstimatedDeliveryRequest,
    "ListOrders": pb.ListOrdersRequest,
    "WatchOrder": pb.WatchOrderRequest,
}
# What each RPC may answer to a request that parses (random fields, unknown fields).
ALLOWED_FOR_PARSED: dict[str, set[Code]] = {
    "CreateOrder": {Code.OK, Code.INVALID_ARGUMENT, Code.ALREADY_EXISTS},
    "ConfirmPayment": {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION},
    "CancelOrder": {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION},
    "GetOrder": {Code.INVALID_ARGUMENT, Code.NOT_FOUND},
    "GetOrderStatus": {Code.INVALID_ARGUMENT, Code.NOT_FOUND},
    "GetEstimatedDelivery": {Code.INVALID_ARGUMENT, Code.NOT_FOUND},
    "ListOrders": {Code.OK, Code.INVALID_ARGUMENT},
    "WatchOrder": {Code.INVALID_ARGUMENT, Code.NOT_FOUND},
}
# What server/decoding.py answers when the request bytes do not parse.
MALFORMED_REQUEST = "Invalid request: request: Not a valid protobuf encoding"


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@st.composite
def wire_field(draw: st.DrawFn) -> bytes:
    """One protobuf field of any number and wire type, its payload valid or not."""
    number = draw(st.one_of(st.integers(1, 8), st.integers(1, 2**29 - 1)))
    wire_type = draw(st.integers(0, 7))  # 3, 4 (groups), 6 and 7 do not exist
    tag = varint(number << 3 | wire_type)
    payload: bytes = draw(
        st.one_of(
            st.builds(varint, INT64),
            st.binary(min_size=4, max_size=4),
            st.binary(min_size=8, max_size=8),
            st.sampled_from([b"\xff" * 11, b"\x80" * 10 + b"\x01", b""]),  # overlong varints
            st.text(EVERY_CHAR, max_size=30).map(lambda t: varint(len(t.encode())) + t.encode()),
            st.binary(max_size=30).map(lambda b: varint(len(b)) + b),  # bad UTF-8 as a string
            # A length longer than what follows.
            st.binary(max_size=30).map(lambda b: varint(len(b) + 7) + b),
            st.just(varint(2**63) + b"x"),
        )
    )
    return tag + payload


RAW_REQUEST = st.one_of(
    st.binary(max_size=300),
    st.lists(wire_field(), max_size=6).map(b"".join),
    # Another message type's valid bytes: the same field numbers with other meanings.
    st.builds(
        lambda request: bytes(request.SerializeToString()),
        st.one_of(
            st.builds(create_request),
            st.builds(pb.ConfirmPaymentRequest, order_id=ID, amount=MONEY, transaction_id=ID),
            st.builds(pb.ListOrdersRequest, page_size=INT32, status=INT32),
            st.builds(Money, currency_code=CURRENCY, units=INT64, nanos=NANOS),
        ),
    ),
)


def parses(rpc: str, raw: bytes) -> bool:
    try:
        REQUEST_TYPES[rpc].FromString(raw)
    except DecodeError:
        return False
    return True


async def call_raw(channel: grpc.aio.Channel, rpc: str, raw: bytes) -> Outcome:
    """Sends raw bytes as the request: no serializer, nor deserializer for the answer."""
    if rpc == "WatchOrder":
        stream = channel.unary_stream(SERVICE + rpc, None, None)(raw, timeout=10)
        try:
            first = await outcome(stream.read())
        finally:
            stream.cancel()
        if first.code == Code.OK and first.response is STREAM_END:
            return Outcome(await stream.code())
        return first
    return await outcome(channel.unary_unary(SERVICE + rpc, None, None)(raw, timeout=RPC_TIMEOUT))


@hypothesis_settings("raw bytes")
@given(rpc=st.sampled_from(sorted(REQUEST_TYPES)), raw=RAW_REQUEST)
async def test_raw_bytes(hostile: Hostile, rpc: str, raw: bytes) -> None:
    result = await call_raw(hostile.stack.channel, rpc, raw)
    hostile.examples["raw bytes"] += 1
    if not parses(rpc, raw):
        # Not a protobuf of the request type: refused before the servicer runs.
        hostile.record(f"raw {rpc}, not parsed", result.code)
        assert result.code == Code.INVALID_ARGUMENT, (rpc, raw, result.code, result.details)
        assert result.details.startswith(MALFORMED_REQUEST), (rpc, raw, result.details)
        return
    check(hostile, f"raw {rpc}", result, ALLOWED_FOR_PARSED[rpc], raw)
    if rpc == "CreateOrder" and result.code == Code.OK:
        hostile.created.add(pb.CreateOrderResponse.FromString(result.response).order_id)
    if result.code == Code.OK and rpc not in ("CreateOrder", "ListOrders"):
        raise AssertionError(f"{rpc} accepted raw bytes {raw!r}")


async def test_unparseable_request_is_invalid_argument(hostile: Hostile) -> None:
    # Field 1 (order_id, a string) holding bytes that are not UTF-8.
    raw = b"\x0a\x02\xff\xfe"
    assert not parses("GetOrder", raw)
    result = await call_raw(hostile.stack.channel, "GetOrder", raw)
    assert result.code == Code.INVALID_ARGUMENT, (result.code, result.details)


# --- Oversized messages ---------------------------------------------------------------------------

_LARGER_THAN_MAX = re.compile(r"larger than max \((\d+) vs\. (\d+)\)")


def server_limit(result: Outcome) -> int:
    """The server's max receive size, as its RESOURCE_EXHAUSTED message states it."""
    found = _LARGER_THAN_MAX.search(result.details)
    assert found is not None, result.details
    return int(found.group(2))


async def test_message_over_the_max_size_is_resource_exhausted(hostile: Hostile) -> None:
    name = "x" * (GRPC_DEFAULT_MAX_RECEIVE + 1024)
    request = create_request(items=[pb.OrderItem(product_id="P", product_name=name, quantity=1)])
    result = await outcome(hostile.stack.stub.CreateOrder(request, timeout=RPC_TIMEOUT))
    hostile.record("CreateOrder oversized", result.code)
    assert result.code == Code.RESOURCE_EXHAUSTED, result.details
    assert server_limit(result) <= GRPC_DEFAULT_MAX_RECEIVE


async def test_huge_field_under_the_max_size_is_invalid_argument(hostile: Hostile) -> None:
    name = "x" * (3 * 1024 * 1024)
    request = create_request(
        items=[pb.OrderItem(product_id="P", product_name=name, quantity=1, price=money(1))]
    )
    result = await outcome(hostile.stack.stub.CreateOrder(request, timeout=RPC_TIMEOUT))
    hostile.record("CreateOrder 3 MiB name", result.code)
    if result.code == Code.RESOURCE_EXHAUSTED:
        # Only if the server was configured below 3 MiB (the default is 4 MiB).
        assert server_limit(result) < request.ByteSize()
        return
    assert result.code == Code.INVALID_ARGUMENT, result.details
    bad = result.detail(error_details_pb2.BadRequest)
    assert bad is not None
    assert [(v.field, v.reason) for v in bad.field_violations] == [
        ("items[0].product_name", "TOO_LONG")
    ]


# --- Afterwards: nothing changed, nothing started -------------------------------------------------


async def test_real_orders_unchanged_and_no_stray_workflow(hostile: Hostile) -> None:
    """Runs last: real orders as created; workflows only from accepted CreateOrders."""
    stack = hostile.stack
    for order_id, before in hostile.real.items():
        after = await stack.stub.GetOrder(pb.GetOrderRequest(order_id=order_id))
        assert after.status == S.ORDER_STATUS_PENDING
        assert not after.rejected_payments
        assert after == before
        history = await stack.client.get_workflow_handle(after.workflow_id).fetch_history()
        signals = [
            e for e in history.events if e.HasField("workflow_execution_signaled_event_attributes")
        ]
        assert signals == [], f"order {order_id} was signalled"

    # A sentinel order: once visibility lists it, it lists every earlier start too.
    sentinel = await stack.stub.CreateOrder(create_request())
    ours = {*hostile.real, *hostile.payable, *hostile.created, sentinel.order_id}
    expected = {f"order-{order_id}" for order_id in ours}
    query = f"TaskQueue = '{stack.task_queue}'"
    await eventually(
        lambda: stack.client.count_workflows(query), lambda c: c.count >= len(expected)
    )
    workflows = [w async for w in stack.client.list_workflows(query)]
    started = {w.id for w in workflows if w.parent_id is None}
    assert started == expected
    # Any other is a child of one of those orders (an email of its own, say).
    assert {w.parent_id for w in workflows if w.parent_id is not None} <= expected

    # Hypothesis ran every example it was asked for, in each test that ran.
    for rpc, count in hostile.examples.items():
        if rpc in EXAMPLES:
            assert count >= round(EXAMPLES[rpc] * _SCALE), (rpc, count)
    print(f"\nhostile input: examples {dict(hostile.examples)}; status codes {hostile.codes}")

    # Leave nothing open: cancel every open order of this stack and let each
    # finish compensating (and its emails) before the worker stops.
    async def cancel(workflow_id: str) -> None:
        handle = stack.client.get_workflow_handle(workflow_id)
        if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
            return  # a paid order, delivered
        await handle.cancel()
        with contextlib.suppress(WorkflowFailureError):
            await handle.result()

    await asyncio.gather(*(cancel(workflow_id) for workflow_id in started))
