"""Load with invariants: drive many orders through gRPC at once, then audit every one.

`make_plans` turns a seed into one plan per order (a scenario and its random
choices), so a seed reproduces the same mix; the moments at which things
happen are the system's own. `Driver` runs the plans through the gRPC stub
(and, for some scenarios, straight to Temporal, as the CLI would), recording
every RPC outcome and every signal it sent. `Auditor` then checks each order
against its workflow's result and history, its `GetOrder` answer and the
simulated providers' records, and collects every broken invariant as one line
naming the order. `summary` renders the counts.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from temporalio.api.enums.v1 import EventType, WorkflowTaskFailedCause
from temporalio.client import Client, WorkflowHistory
from temporalio.service import RPCError, RPCStatusCode

from acme.orders.v1 import order_service_pb2 as pb
from activities.providers.payments import Payment
from server.api.servicer import PAYMENT_ALREADY_RECORDED_MESSAGE
from tests.support.money import money_moved_problems
from tests.support.orders import create_request, money, payment_request
from tests.support.polling import eventually
from tests.support.stack import Stack
from tests.support.stats import percentile
from workflows.models import (
    CANCEL_ORDER_SIGNAL,
    CONFIRM_PAYMENT_SIGNAL,
    CancelRequest,
    NotificationKind,
    OrderState,
    OrderStatus,
    PaymentRequest,
)
from workflows.money import NANOS_PER_UNIT, Money

PAYMENT_METHOD = "credit_card"
CURRENCIES = ("USD", "EUR", "GBP", "JPY")
CANCEL_REASON_PREFIX = "Load test cancel"
# A cancel after payment comes this long after it at most: about an order's life under load.
CANCEL_WITHIN_SECONDS = 3.0
OK = "OK"


class Scenario(StrEnum):
    PAY = "pay"
    WRONG_AMOUNT_THEN_PAY = "wrong amount, then pay"
    PAY_TWICE_SAME_TXN = "pay twice, same txn"
    PAY_THEN_SECOND_TXN = "pay, then a second txn"
    PAY_THEN_CANCEL = "pay, cancel after a delay"
    PAY_AND_CANCEL_AT_ONCE = "pay and cancel at once"
    CANCEL_BEFORE_PAY = "cancel, then pay"
    NEVER_PAY = "never pay: timeout, late pay"
    RAW_SIGNALS = "raw signals to Temporal"


# Scenarios that send no cancel: a payment confirmed there must end delivered.
NO_CANCEL = frozenset(
    {
        Scenario.PAY,
        Scenario.WRONG_AMOUNT_THEN_PAY,
        Scenario.PAY_TWICE_SAME_TXN,
        Scenario.PAY_THEN_SECOND_TXN,
        Scenario.RAW_SIGNALS,
    }
)


class WrongAmount(StrEnum):
    SHORT_BY_A_CENT = "short by 0.01"
    ONE_NANO_OVER = "1 nano over"
    OTHER_CURRENCY = "other currency"
    DOUBLE = "double"


# --- Plans ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    units: int
    nanos: int
    quantity: int


@dataclass(frozen=True)
class OrderPlan:
    """One order's scenario and every random choice it makes, fixed up front by the seed."""

    index: int
    scenario: Scenario
    currency: str
    lines: tuple[Line, ...]
    wrong: tuple[WrongAmount, ...]  # the wrong amounts it sends, in turn
    cancel_delay: float  # seconds between the payment and the cancel
    at_once: bool  # duplicates sent concurrently rather than one after the other
    raw_duplicates: int  # how often the raw scenario sends its good payment
    raw_second_txn: bool  # the raw scenario also sends a second, correct transaction

    @property
    def total(self) -> Money:
        total = Money(self.currency)
        for line in self.lines:
            total = total + Money(self.currency, line.units, line.nanos).times(line.quantity)
        return total

    def txn(self, label: str) -> str:
        return f"TXN-{self.index:05d}-{label}"

    def wrong_amount(self, kind: WrongAmount) -> Money:
        total = self.total
        if kind is WrongAmount.SHORT_BY_A_CENT:
            return Money.from_total_nanos(self.currency, total.total_nanos - NANOS_PER_UNIT // 100)
        if kind is WrongAmount.ONE_NANO_OVER:
            return Money.from_total_nanos(self.currency, total.total_nanos + 1)
        if kind is WrongAmount.OTHER_CURRENCY:
            other = CURRENCIES[(CURRENCIES.index(self.currency) + 1) % len(CURRENCIES)]
            return Money(other, total.units, total.nanos)
        return total.times(2)

    def create_request(self) -> pb.CreateOrderRequest:
        items = [
            pb.OrderItem(
                product_id=f"PROD-{n + 1}",
                product_name=f"Load item {n + 1}",
                quantity=line.quantity,
                price=money(line.units, line.nanos, self.currency),
            )
            for n, line in enumerate(self.lines)
        ]
        return create_request(
            customer_id=f"LOAD-{self.index:05d}", items=items, request_id=str(uuid.uuid4())
        )


def make_plans(seed: int, count: int) -> list[OrderPlan]:
    """`count` plans, each scenario equally often, every choice decided by `seed`."""
    rng = random.Random(seed)
    kinds = list(Scenario)
    scenarios = [kinds[i % len(kinds)] for i in range(count)]
    rng.shuffle(scenarios)
    plans = []
    for index, scenario in enumerate(scenarios):
        currency = rng.choice(CURRENCIES)
        lines = tuple(
            Line(
                units=rng.randint(1, 2_000),
                # Whole yen; the others in cents, now and then with stray nanos.
                nanos=0
                if currency == "JPY"
                else rng.choice((0, rng.randrange(100) * 10_000_000, rng.randrange(1, 10**9))),
                quantity=rng.randint(1, 5),
            )
            for _ in range(rng.randint(1, 3))
        )
        plans.append(
            OrderPlan(
                index=index,
                scenario=scenario,
                currency=currency,
                lines=lines,
                wrong=tuple(rng.choice(list(WrongAmount)) for _ in range(rng.randint(1, 2))),
                cancel_delay=rng.uniform(0.0, CANCEL_WITHIN_SECONDS),
                at_once=rng.random() < 0.5,
                raw_duplicates=rng.randint(2, 3),
                raw_second_txn=rng.random() < 0.5,
            )
        )
    return plans


# --- What the driver did ------------------------------------------------------------------


class Fate(StrEnum):
    """What became of a signal the driver sent, directly or through an RPC."""

    SENT = "accepted by Temporal"
    NOT_SENT = "never sent"  # refused by the server before signalling, or by Temporal
    UNKNOWN = "unknown"  # the call failed in a way that does not say


@dataclass(frozen=True)
class Call:
    """One RPC (or raw signal) and its outcome."""

    what: str  # "CreateOrder", "ConfirmPayment", "CancelOrder", "raw confirm_payment"
    code: str  # the gRPC / Temporal status code's name
    status: str  # the order status the server saw, "" if it did not say
    message: str
    transaction_id: str = ""
    late: bool = False  # sent once the workflow had closed
    seconds: float = 0.0  # how long the call took


@dataclass(frozen=True)
class SentSignal:
    key: str  # payment_key() or cancel_key()
    via: str  # "grpc" or "raw"
    fate: Fate


def payment_key(transaction_id: str, amount: Money, method: str = PAYMENT_METHOD) -> str:
    # str(Money) is exact: it prints every significant nano.
    return f"{CONFIRM_PAYMENT_SIGNAL} {transaction_id} {amount} {method}"


def cancel_key(reason: str) -> str:
    return f"{CANCEL_ORDER_SIGNAL} {reason}"


@dataclass
class OrderRecord:
    plan: OrderPlan
    order_id: str = ""
    workflow_id: str = ""
    calls: list[Call] = field(default_factory=list)
    signals: list[SentSignal] = field(default_factory=list)
    # Outcomes the scenario does not allow, noted while driving.
    unexpected: list[str] = field(default_factory=list)

    def confirmed(self, transaction_id: str) -> bool:
        """The server answered OK to this payment, or Temporal accepted it raw, in time."""
        return any(
            c.transaction_id == transaction_id and c.code == OK and not c.late
            for c in self.calls
            if c.what in ("ConfirmPayment", f"raw {CONFIRM_PAYMENT_SIGNAL}")
        )


Codes = frozenset[str]
# FAILED_PRECONDITION because the order is cancelled: for an order nobody cancelled, only
# right if its payment window had closed first. The audit checks that it had.
TIMED_OUT = "FAILED_PRECONDITION (order cancelled)"
ONLY_OK: Codes = frozenset({OK})
OK_OR_TIMED_OUT: Codes = frozenset({OK, TIMED_OUT})
OK_OR_REFUSED: Codes = frozenset({OK, grpc.StatusCode.FAILED_PRECONDITION.name})
# After these the server has certainly not signalled the workflow.
NOT_SIGNALLED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT.name,
        grpc.StatusCode.FAILED_PRECONDITION.name,
        grpc.StatusCode.NOT_FOUND.name,
    }
)


def _status_name(status: pb.OrderStatus.ValueType) -> str:
    return pb.OrderStatus.Name(status).removeprefix("ORDER_STATUS_").lower()


def _error_order_status(err: grpc.aio.AioRpcError) -> str:
    """The order status an error names in its ErrorInfo, if any."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    if status is None:
        return ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.metadata.get("orderStatus", ""))
    return ""


def _refused(err: grpc.aio.AioRpcError) -> tuple[str, str, str, Fate]:
    """A failed ConfirmPayment or CancelOrder: code, order status, message, the signal's fate."""
    code = err.code().name
    fate = Fate.NOT_SENT if code in NOT_SIGNALLED else Fate.UNKNOWN
    return code, _error_order_status(err), err.details() or "", fate


class Driver:
    """Runs plans through the gRPC stub, at most `concurrency` orders at a time."""

    def __init__(
        self, stack: Stack, *, concurrency: int = 50, deadline_seconds: float = 30.0
    ) -> None:
        self._stub = stack.stub
        self._client = stack.client
        self._slots = asyncio.Semaphore(concurrency)
        self._deadline = deadline_seconds
        self._cancels = 0

    async def run(self, plans: Sequence[OrderPlan]) -> list[OrderRecord]:
        """Drives every plan; an order holds its slot until its workflow has closed.

        So at most `concurrency` orders are in flight at once and the system is
        driven at the pace it can take, never past it into an ever longer
        backlog. Orders left to time out give their slot back at once: they
        only wait on a timer.
        """
        records = [OrderRecord(plan) for plan in plans]

        async def one(record: OrderRecord) -> None:
            async with self._slots:
                await self._drive(record)
                if record.order_id and record.plan.scenario is not Scenario.NEVER_PAY:
                    await self._until_closed(record)

        await asyncio.gather(*(one(r) for r in records))
        return records

    async def _until_closed(self, record: OrderRecord) -> None:
        handle = self._client.get_workflow_handle(record.workflow_id)
        try:
            async with asyncio.timeout(4 * self._deadline):
                await handle.result()
        except TimeoutError:
            record.unexpected.append(f"not closed {4 * self._deadline:.0f} s after driving")
        except Exception as err:  # the audit reports how it closed
            record.unexpected.append(f"workflow did not complete: {err!r}")

    async def pay_late(self, records: Iterable[OrderRecord]) -> None:
        """Pays orders that have closed: the server must refuse, and so must Temporal."""

        async def one(record: OrderRecord) -> None:
            async with self._slots:
                plan = record.plan
                refused = frozenset({grpc.StatusCode.FAILED_PRECONDITION.name})
                await self._confirm(record, plan.txn("LATE"), plan.total, refused, late=True)
                closed = frozenset({RPCStatusCode.NOT_FOUND.name})
                await self._raw_pay(record, plan.txn("LATE-RAW"), plan.total, closed, late=True)

        await asyncio.gather(*(one(r) for r in records if r.order_id))

    async def _drive(self, record: OrderRecord) -> None:
        plan = record.plan
        if not await self._create(record):
            return
        total = plan.total
        first = plan.txn("A")
        match plan.scenario:
            case Scenario.PAY:
                await self._confirm(record, first, total, OK_OR_TIMED_OUT)
            case Scenario.WRONG_AMOUNT_THEN_PAY:
                # Refused by the server without a signal, so the same id may pay next.
                wrong = frozenset({grpc.StatusCode.INVALID_ARGUMENT.name, TIMED_OUT})
                for kind in plan.wrong:
                    await self._confirm(record, first, plan.wrong_amount(kind), wrong)
                await self._confirm(record, first, total, OK_OR_TIMED_OUT)
            case Scenario.PAY_TWICE_SAME_TXN:
                await self._maybe_at_once(
                    plan.at_once,
                    [lambda: self._confirm(record, first, total, OK_OR_TIMED_OUT)] * 2,
                )
            case Scenario.PAY_THEN_SECOND_TXN:
                await self._confirm(record, first, total, OK_OR_TIMED_OUT)
                # Refused up front, or (if the server's query ran before the workflow took
                # the first payment) OK from the server and refused by the workflow.
                await self._confirm(record, plan.txn("B"), total, OK_OR_REFUSED)
            case Scenario.PAY_THEN_CANCEL:
                await self._confirm(record, first, total, OK_OR_TIMED_OUT)
                await asyncio.sleep(plan.cancel_delay)
                await self._cancel(record, OK_OR_REFUSED)
            case Scenario.PAY_AND_CANCEL_AT_ONCE:
                await asyncio.gather(
                    self._confirm(record, first, total, OK_OR_REFUSED),
                    self._cancel(record, OK_OR_REFUSED),
                )
            case Scenario.CANCEL_BEFORE_PAY:
                await self._cancel(record, OK_OR_TIMED_OUT)
                await self._confirm(record, first, total, OK_OR_REFUSED)
            case Scenario.NEVER_PAY:
                pass  # it times out; pay_late pays it once closed
            case Scenario.RAW_SIGNALS:
                for n, kind in enumerate(plan.wrong):
                    await self._raw_pay(record, plan.txn(f"W{n}"), plan.wrong_amount(kind))
                await self._maybe_at_once(
                    plan.at_once,
                    [lambda: self._raw_pay(record, first, total)] * plan.raw_duplicates,
                )
                if plan.raw_second_txn:
                    await self._raw_pay(record, plan.txn("B"), total)

    @staticmethod
    async def _maybe_at_once(at_once: bool, steps: list[Callable[[], Awaitable[None]]]) -> None:
        if at_once:
            await asyncio.gather(*(step() for step in steps))
        else:
            for step in steps:
                await step()

    @staticmethod
    def _note(record: OrderRecord, call: Call, expected: Codes) -> None:
        record.calls.append(call)
        timed_out = call.code == grpc.StatusCode.FAILED_PRECONDITION.name and (
            call.status == OrderStatus.CANCELLED.value
        )
        if call.code not in expected and not (timed_out and TIMED_OUT in expected):
            record.unexpected.append(
                f"{call.what} {call.transaction_id}: {call.code} ({call.message!r}), "
                f"expected {' or '.join(sorted(expected))}"
            )

    async def _create(self, record: OrderRecord) -> bool:
        plan = record.plan
        started = time.monotonic()
        try:
            created = await self._stub.CreateOrder(plan.create_request(), timeout=self._deadline)
        except grpc.aio.AioRpcError as err:
            took = time.monotonic() - started
            call = Call("CreateOrder", err.code().name, "", err.details() or "", seconds=took)
            self._note(record, call, ONLY_OK)
            return False
        record.order_id = created.order_id
        record.workflow_id = created.workflow_id
        total = plan.total
        if created.total_amount != money(total.units, total.nanos, total.currency_code):
            record.unexpected.append(f"CreateOrder total {created.total_amount} is not {total}")
        took = time.monotonic() - started
        call = Call("CreateOrder", OK, _status_name(created.status), created.message, seconds=took)
        self._note(record, call, ONLY_OK)
        return True

    async def _confirm(
        self,
        record: OrderRecord,
        transaction_id: str,
        amount: Money,
        expected: Codes,
        *,
        late: bool = False,
    ) -> None:
        as_pb = money(amount.units, amount.nanos, amount.currency_code)
        request = payment_request(
            record.order_id, transaction_id, amount=as_pb, payment_method=PAYMENT_METHOD
        )
        started = time.monotonic()
        try:
            response = await self._stub.ConfirmPayment(request, timeout=self._deadline)
        except grpc.aio.AioRpcError as err:
            code, status, message, fate = _refused(err)
        else:
            code, status, message = OK, _status_name(response.status), response.message
            # A repeated transaction is answered from the server's query, without a signal.
            repeated = response.message == PAYMENT_ALREADY_RECORDED_MESSAGE
            fate = Fate.NOT_SENT if repeated else Fate.SENT
        took = time.monotonic() - started
        call = Call("ConfirmPayment", code, status, message, transaction_id, late, took)
        self._note(record, call, expected)
        record.signals.append(SentSignal(payment_key(transaction_id, amount), "grpc", fate))

    async def _cancel(self, record: OrderRecord, expected: Codes) -> None:
        self._cancels += 1
        reason = f"{CANCEL_REASON_PREFIX} {self._cancels} of order {record.plan.index}"
        request = pb.CancelOrderRequest(order_id=record.order_id, reason=reason)
        started = time.monotonic()
        try:
            response = await self._stub.CancelOrder(request, timeout=self._deadline)
        except grpc.aio.AioRpcError as err:
            code, status, message, fate = _refused(err)
        else:
            code, status, message = OK, _status_name(response.status), response.message
            fate = Fate.SENT
        took = time.monotonic() - started
        self._note(record, Call("CancelOrder", code, status, message, seconds=took), expected)
        record.signals.append(SentSignal(cancel_key(reason), "grpc", fate))

    async def _raw_pay(
        self,
        record: OrderRecord,
        transaction_id: str,
        amount: Money,
        expected: Codes = ONLY_OK,
        *,
        late: bool = False,
    ) -> None:
        """A `confirm_payment` signal straight to Temporal, as `temporal workflow signal` sends."""
        handle = self._client.get_workflow_handle(record.workflow_id)
        started = time.monotonic()
        try:
            await handle.signal(
                CONFIRM_PAYMENT_SIGNAL,
                PaymentRequest(transaction_id, amount, PAYMENT_METHOD),
                rpc_timeout=timedelta(seconds=self._deadline),
            )
        except RPCError as err:
            code, message = err.status.name, err.message
            # NOT_FOUND: the workflow has closed and takes no signal.
            fate = Fate.NOT_SENT if err.status == RPCStatusCode.NOT_FOUND else Fate.UNKNOWN
        else:
            code, message, fate = OK, "", Fate.SENT
        took = time.monotonic() - started
        what = f"raw {CONFIRM_PAYMENT_SIGNAL}"
        call = Call(what, code, "", message, transaction_id, late, took)
        self._note(record, call, expected)
        record.signals.append(SentSignal(payment_key(transaction_id, amount), "raw", fate))


async def wait_until_closed(stack: Stack, *, within: float) -> None:
    """Polls visibility until no workflow on the stack's task queue runs."""
    query = f"TaskQueue = '{stack.task_queue}' AND ExecutionStatus = 'Running'"
    await eventually(
        lambda: stack.client.count_workflows(query),
        lambda running: running.count == 0,
        within=within,
        interval=0.25,
        what="every order workflow closed",
    )


# --- What the history says ----------------------------------------------------------------

_CLOSE_EVENTS = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED: "completed",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED: "failed",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT: "timed out",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED: "terminated",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED: "canceled",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW: "continued as new",
}
# Workflow task failures that mean a bug rather than ordinary contention.
_BAD_TASK_FAILURES = frozenset(
    {
        WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_WORKFLOW_WORKER_UNHANDLED_FAILURE,
        WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_NON_DETERMINISTIC_ERROR,
    }
)


@dataclass
class HistoryFacts:
    closed: str = "open"
    result: OrderState | None = None
    payments: list[tuple[int, PaymentRequest]] = field(default_factory=list)  # (event id, arg)
    cancels: list[tuple[int, CancelRequest]] = field(default_factory=list)
    other_signals: list[str] = field(default_factory=list)
    scheduled: defaultdict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    completed: Counter[str] = field(default_factory=Counter)
    activity_ends: Counter[str] = field(default_factory=Counter)  # "prepare_shipment canceled"
    task_failures: Counter[str] = field(default_factory=Counter)
    bad_task_failures: list[str] = field(default_factory=list)

    def signal_keys(self) -> Counter[str]:
        keys = Counter(
            payment_key(p.transaction_id, p.amount, p.payment_method) for _, p in self.payments
        )
        keys.update(cancel_key(c.reason) for _, c in self.cancels)
        keys.update(self.other_signals)
        return keys


async def read_history(client: Client, history: WorkflowHistory) -> HistoryFacts:
    facts = HistoryFacts()
    names: dict[int, str] = {}  # scheduled event id -> activity name
    decode = client.data_converter.decode
    for event in history.events:
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            signaled = event.workflow_execution_signaled_event_attributes
            payloads = list(signaled.input.payloads)
            if signaled.signal_name == CONFIRM_PAYMENT_SIGNAL:
                [payment] = await decode(payloads, [PaymentRequest])
                facts.payments.append((event.event_id, payment))
            elif signaled.signal_name == CANCEL_ORDER_SIGNAL:
                [cancel] = await decode(payloads, [CancelRequest])
                facts.cancels.append((event.event_id, cancel))
            else:
                facts.other_signals.append(signaled.signal_name)
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            names[event.event_id] = name
            facts.scheduled[name].append(event.event_id)
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            facts.completed[
                names[event.activity_task_completed_event_attributes.scheduled_event_id]
            ] += 1
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED:
            name = names[event.activity_task_failed_event_attributes.scheduled_event_id]
            facts.activity_ends[f"{name} failed"] += 1
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT:
            name = names[event.activity_task_timed_out_event_attributes.scheduled_event_id]
            facts.activity_ends[f"{name} timed out"] += 1
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED:
            name = names[event.activity_task_canceled_event_attributes.scheduled_event_id]
            facts.activity_ends[f"{name} canceled"] += 1
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
            failed = event.workflow_task_failed_event_attributes
            cause = WorkflowTaskFailedCause.Name(failed.cause)
            facts.task_failures[cause.removeprefix("WORKFLOW_TASK_FAILED_CAUSE_")] += 1
            if failed.cause in _BAD_TASK_FAILURES:
                facts.bad_task_failures.append(f"workflow task failed: {cause}: {failed.failure}")
        elif kind in _CLOSE_EVENTS:
            facts.closed = _CLOSE_EVENTS[kind]
            if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
                result = event.workflow_execution_completed_event_attributes.result
                [facts.result] = await decode(list(result.payloads), [OrderState])
    return facts


# --- The audit ------------------------------------------------------------------------------


def _sum(currency: str, amounts: Iterable[Money]) -> Money:
    total = Money(currency)
    for amount in amounts:
        total = total + amount  # ValueError on another currency
    return total


@dataclass
class Audit:
    violations: list[str] = field(default_factory=list)
    final: Counter[tuple[Scenario, str]] = field(default_factory=Counter)
    cancel_reasons: Counter[str] = field(default_factory=Counter)
    # (status the server saw when asked to cancel, how the CancelOrder went, final status)
    cancels: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    rpc_outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    latencies: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    payments: Counter[str] = field(default_factory=Counter)
    signals_sent: Counter[tuple[str, Fate]] = field(default_factory=Counter)
    signals_seen: int = 0
    activity_ends: Counter[str] = field(default_factory=Counter)
    task_failures: Counter[str] = field(default_factory=Counter)
    optimistic_ok: int = 0
    # Calls refused because the order had timed out before they arrived (no cancel sent).
    after_timeout: Counter[str] = field(default_factory=Counter)
    refused_in_hand_over: int = 0
    # Exact nanos per currency.
    captured: Counter[str] = field(default_factory=Counter)
    kept: Counter[str] = field(default_factory=Counter)
    refunded: Counter[str] = field(default_factory=Counter)


class Auditor:
    """Checks every order against the invariants; collects what is broken."""

    def __init__(self, stack: Stack, *, payment_timeout_reason: str, concurrency: int = 50) -> None:
        self._stub = stack.stub
        self._client = stack.client
        self._activities = stack.activities
        self._timeout_reason = payment_timeout_reason
        self._slots = asyncio.Semaphore(concurrency)
        self.audit = Audit()
        self._charges: defaultdict[str, list[Payment]] = defaultdict(list)
        self._refunds: defaultdict[str, list[Payment]] = defaultdict(list)

    async def run(self, records: Sequence[OrderRecord]) -> Audit:
        for charge in list(self._activities.payments.charges.values()):
            self._charges[charge.order_id].append(charge)
        for refund in list(self._activities.payments.refunds.values()):
            self._refunds[refund.order_id].append(refund)
        self._check_no_strays(records)

        async def one(record: OrderRecord) -> None:
            async with self._slots:
                await self._check(record)

        await asyncio.gather(*(one(r) for r in records))
        for currency in sorted(set(self.audit.captured) | set(self.audit.refunded)):
            captured = self.audit.captured[currency]
            kept, refunded = self.audit.kept[currency], self.audit.refunded[currency]
            if captured != kept + refunded:
                self.audit.violations.append(
                    f"all orders, {currency}: captured {captured} nanos "
                    f"!= kept {kept} + refunded {refunded}"
                )
        return self.audit

    def _check_no_strays(self, records: Sequence[OrderRecord]) -> None:
        """The providers did nothing for an order the driver did not create."""
        ours = {r.order_id for r in records}
        for what, ids in (
            ("charges", set(self._charges)),
            ("refunds", set(self._refunds)),
            ("reservations", set(self._activities.inventory.reservations)),
            ("shipments", set(self._activities.shipping.shipments)),
        ):
            if strays := ids - ours:
                self.audit.violations.append(f"{what} for unknown orders: {sorted(strays)[:5]}")

    async def _check(self, record: OrderRecord) -> None:
        audit = self.audit
        plan = record.plan
        label = f"order #{plan.index} {record.order_id or '(not created)'} [{plan.scenario}]"
        problems = list(record.unexpected)
        for call in record.calls:
            what = call.what + (" (late)" if call.late else "")
            audit.rpc_outcomes[(what, call.code)] += 1
            audit.latencies[what].append(call.seconds)
        for signal in record.signals:
            audit.signals_sent[(signal.via, signal.fate)] += 1
        if not record.order_id:
            audit.final[(plan.scenario, "not created")] += 1
            audit.violations.extend(f"{label}: {p}" for p in problems)
            return

        handle = self._client.get_workflow_handle(record.workflow_id)
        facts = await read_history(self._client, await handle.fetch_history())
        order = await self._get_order(record.order_id, problems)
        audit.signals_seen += facts.signal_keys().total()
        audit.activity_ends.update(facts.activity_ends)
        audit.task_failures.update(facts.task_failures)
        problems += facts.bad_task_failures

        state = facts.result
        if facts.closed != "completed" or state is None:
            problems.append(f"workflow {facts.closed}, not completed with a result")
            audit.final[(plan.scenario, f"workflow {facts.closed}")] += 1
        else:
            audit.final[(plan.scenario, state.status.value)] += 1
            if order is not None:
                problems += _compare(state, order)
            problems += self._check_terminal(state)
            problems += self._check_money(record, state, facts)
            problems += await self._check_book(state)
            problems += self._check_inventory(state, facts)
            problems += self._check_signals(record, state, facts)
            problems += self._check_outcome(record, state, facts)
        audit.violations.extend(f"{label}: {p}" for p in problems)

    async def _get_order(self, order_id: str, problems: list[str]) -> pb.Order | None:
        """GetOrder, retried while the server reports the backend busy (a read is safe to retry).

        Querying a closed workflow makes the worker replay its history, which under
        load can outlast the server's cap on a Temporal call: UNAVAILABLE, as documented.
        """
        for attempt in range(1, 4):
            try:
                order = await self._stub.GetOrder(pb.GetOrderRequest(order_id=order_id), timeout=30)
            except grpc.aio.AioRpcError as err:
                self.audit.rpc_outcomes[("GetOrder (audit)", err.code().name)] += 1
                if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == 3:
                    problems.append(f"GetOrder failed: {err.code().name} {err.details()}")
                    return None
                await asyncio.sleep(attempt)
            else:
                self.audit.rpc_outcomes[("GetOrder (audit)", OK)] += 1
                return order
        return None

    def _check_terminal(self, state: OrderState) -> list[str]:
        """Exactly one terminal state, told the same way by state, emails and providers."""
        problems = []
        prefix = f"{state.order_id}/"
        emails = {
            k.removeprefix(prefix) for k in self._activities.mail.sent if k.startswith(prefix)
        }
        if NotificationKind.ORDER_RECEIVED.value not in emails:
            problems.append("no order_received email")
        delivered = NotificationKind.ORDER_DELIVERED.value in emails
        cancelled = NotificationKind.ORDER_CANCELLED.value in emails
        if state.status is OrderStatus.DELIVERED:
            if state.shipment_info is None or state.delivered_at is None:
                problems.append("delivered without shipment_info or delivered_at")
            if state.cancellation_reason or state.refund_info is not None:
                problems.append(
                    f"delivered, yet cancelled ({state.cancellation_reason!r}) or refunded"
                )
            if not delivered or cancelled:
                problems.append(f"delivered, emails sent: {sorted(emails)}")
        elif state.status is OrderStatus.CANCELLED:
            self.audit.cancel_reasons[self._reason_kind(state.cancellation_reason or "")] += 1
            if not state.cancellation_reason:
                problems.append("cancelled without a reason")
            if state.delivered_at is not None or state.shipment_info is not None:
                problems.append("cancelled, yet shipped or delivered")
            if not cancelled or delivered:
                problems.append(f"cancelled, emails sent: {sorted(emails)}")
        else:
            problems.append(f"final status {state.status.value} is not terminal")
        return problems

    def _reason_kind(self, reason: str) -> str:
        if reason == self._timeout_reason:
            return "payment timeout"
        if reason.startswith(CANCEL_REASON_PREFIX):
            return "customer cancel"
        return f"other: {reason}"

    async def _check_book(self, state: OrderState) -> list[str]:
        """The gateway's book: a paid order captured its total once; refunded once if cancelled."""
        payments = self._activities.payments
        total = state.total_amount
        paid = state.payment_info is not None
        cancelled = state.status is OrderStatus.CANCELLED
        return money_moved_problems(
            await payments.captured(state.order_id),
            await payments.refunded(state.order_id),
            captured=total if paid else None,
            refunded=total if paid and cancelled else None,
        )

    def _check_money(
        self, record: OrderRecord, state: OrderState, facts: HistoryFacts
    ) -> list[str]:
        """Captured == kept (delivered) + refunded, exactly; nobody charged twice."""
        problems = []
        total = state.total_amount
        currency = total.currency_code
        if total != record.plan.total:
            problems.append(f"order total {total} is not {record.plan.total}")
        charges = self._charges.get(state.order_id, [])
        refunds = self._refunds.get(state.order_id, [])
        if len(charges) > 1:
            problems.append(f"charged {len(charges)} times: {[c.transaction_id for c in charges]}")
        for activity, done in (("charge_payment", charges), ("refund_payment", refunds)):
            if facts.completed[activity] != len(done):
                problems.append(
                    f"{facts.completed[activity]} {activity} completed in history, "
                    f"{len(done)} at the gateway"
                )
        try:
            captured = _sum(currency, (c.amount for c in charges))
            refunded = _sum(currency, (r.amount for r in refunds))
        except ValueError as err:
            return [*problems, f"money in another currency: {err}"]
        paid = state.payment_info
        kept = Money(currency)
        if state.status is OrderStatus.DELIVERED:
            if paid is None:
                return [*problems, "delivered without payment_info"]
            kept = paid.amount
        if paid is not None and paid.amount != total:
            problems.append(f"accepted payment {paid.amount} is not the total {total}")
        if captured.total_nanos != kept.total_nanos + refunded.total_nanos:
            problems.append(f"captured {captured} != kept {kept} + refunded {refunded}")
        rejected = {r.transaction_id for r in state.rejected_payments}
        for charge in charges:
            if paid is None or charge.transaction_id != paid.transaction_id:
                problems.append(f"charged {charge.transaction_id}, not the order's payment")
            if charge.transaction_id in rejected:
                problems.append(f"charged {charge.transaction_id}, a rejected payment")
        refund = state.refund_info
        if (refund is None) != (not refunds):
            problems.append(f"refund_info {refund} but gateway refunds {refunds}")
        elif refund is not None:
            gateway = refunds[0]
            if (refund.transaction_id, refund.amount) != (gateway.transaction_id, gateway.amount):
                problems.append(f"refund_info {refund} is not the gateway's {gateway}")
            if paid is None or refund.transaction_id != paid.transaction_id:
                problems.append(f"refunded {refund.transaction_id}, not the order's payment")
        audit = self.audit
        audit.captured[currency] += captured.total_nanos
        audit.kept[currency] += kept.total_nanos
        audit.refunded[currency] += refunded.total_nanos
        audit.payments["captured"] += len(charges)
        audit.payments["kept (delivered)"] += 1 if kept.total_nanos else 0
        audit.payments["refunded"] += len(refunds)
        audit.payments["rejected (rejected_payments)"] += len(state.rejected_payments)
        return problems

    def _check_inventory(self, state: OrderState, facts: HistoryFacts) -> list[str]:
        """Every reservation released (cancelled) or shipped (delivered)."""
        problems = []
        reservation = self._activities.inventory.reservations.get(state.order_id)
        if reservation is None:
            return ["no reservation at the warehouse"]
        if state.inventory_info.reservation_id != reservation.reservation_id:
            problems.append(
                f"reservation {state.inventory_info.reservation_id!r} in the state, "
                f"{reservation.reservation_id!r} at the warehouse"
            )
        shipment = self._activities.shipping.shipments.get(state.order_id)
        if state.status is OrderStatus.DELIVERED:
            if reservation.released or state.inventory_info.released:
                problems.append("delivered, but its reservation was released")
            if shipment is None or state.shipment_info is None:
                problems.append("delivered, but the carrier has no shipment")
            elif shipment.tracking_number != state.shipment_info.tracking_number:
                problems.append("tracking number is not the carrier's")
            elif shipment.tracking_number not in self._activities.shipping.deliveries:
                problems.append("delivered, but the carrier never delivered it")
        elif state.status is OrderStatus.CANCELLED:
            if not (reservation.released and state.inventory_info.released):
                problems.append(
                    f"cancelled, reservation dangling (warehouse released={reservation.released}"
                    f", state released={state.inventory_info.released})"
                )
            if shipment is not None or facts.scheduled["ship_order"]:
                problems.append("cancelled, yet handed to the carrier")
        return problems

    def _check_signals(
        self, record: OrderRecord, state: OrderState, facts: HistoryFacts
    ) -> list[str]:
        """No signal lost or invented; every payment signal accounted for in the state."""
        problems = []
        surely: Counter[str] = Counter()
        possibly: Counter[str] = Counter()
        for signal in record.signals:
            if signal.fate is Fate.SENT:
                surely[signal.key] += 1
            if signal.fate is not Fate.NOT_SENT:
                possibly[signal.key] += 1
        seen = facts.signal_keys()
        for key in sorted(set(surely) | set(seen)):
            if seen[key] < surely[key]:
                problems.append(f"signal lost: sent {surely[key]}x, in history {seen[key]}x: {key}")
            elif seen[key] > possibly[key]:
                problems.append(f"in history {seen[key]}x, sent at most {possibly[key]}x: {key}")
        paid = state.payment_info
        rejected = {r.transaction_id: r for r in state.rejected_payments}
        for _, payment in facts.payments:
            txn = payment.transaction_id
            if (paid is None or paid.transaction_id != txn) and txn not in rejected:
                problems.append(f"payment signal {txn} neither accepted nor rejected")
        signalled = {p.transaction_id for _, p in facts.payments}
        for txn, rejection in rejected.items():
            if txn not in signalled:
                problems.append(f"rejected payment {txn} was never signalled")
            if not rejection.reason:
                problems.append(f"rejected payment {txn} has no reason")
        if paid is not None and not any(
            p.transaction_id == paid.transaction_id and p.amount == paid.amount
            for _, p in facts.payments
        ):
            problems.append(f"accepted payment {paid.transaction_id} was never signalled")
        return problems

    def _check_outcome(
        self, record: OrderRecord, state: OrderState, facts: HistoryFacts
    ) -> list[str]:
        """What the scenario and the history let us expect, whatever the timing."""
        problems = []
        plan = record.plan
        paid = state.payment_info
        refused = {r.transaction_id for r in state.rejected_payments}
        cancelled = state.status is OrderStatus.CANCELLED
        reason = state.cancellation_reason or ""
        hand_over = min(facts.scheduled["ship_order"], default=None)
        valid = [p for _, p in facts.payments if p.amount == state.total_amount]

        if state.status is OrderStatus.DELIVERED:
            # Signals are handled in history order: the first valid payment is the one taken.
            if not valid or paid is None or paid.transaction_id != valid[0].transaction_id:
                problems.append(
                    f"delivered on {paid and paid.transaction_id}, but the first valid "
                    f"payment signal was {valid[0].transaction_id if valid else None}"
                )
            # Decision 0006: a cancel is refused only once the hand-over to the carrier began.
            for event_id, cancel in facts.cancels:
                if hand_over is None or event_id < hand_over:
                    problems.append(
                        f"cancel {cancel.reason!r} (event {event_id}) came before the hand-over "
                        f"to the carrier (event {hand_over}), yet the order was delivered"
                    )
            if facts.cancels:
                self.audit.refused_in_hand_over += 1
        if cancelled and reason != self._timeout_reason:
            first_cancel = facts.cancels[0][1].reason if facts.cancels else None
            if reason != first_cancel:
                problems.append(f"cancelled for {reason!r}; first cancel was {first_cancel!r}")
        if cancelled and reason == self._timeout_reason and self._charges.get(state.order_id):
            problems.append("timed out waiting for its payment, yet charged")

        # "Every order that got OK for ConfirmPayment and was not cancelled is delivered with
        # that transaction." One legitimate exception: the server's query saw the order
        # pending, the payment timer fired before its signal arrived (an optimistic OK,
        # decision 0001); then the order refused the payment and never charged it.
        first = plan.txn("A")
        if plan.scenario in NO_CANCEL and record.confirmed(first) and not facts.cancels:
            if state.status is OrderStatus.DELIVERED:
                if paid is None or paid.transaction_id != first:
                    problems.append(
                        f"{first} confirmed, delivered on {paid and paid.transaction_id}"
                    )
            elif reason == self._timeout_reason and first in refused:
                self.audit.optimistic_ok += 1
            else:
                problems.append(f"{first} confirmed and never cancelled, yet {reason!r}")

        if plan.scenario in (Scenario.PAY_THEN_SECOND_TXN, Scenario.RAW_SIGNALS):
            second = plan.txn("B")
            if any(p.transaction_id == second for _, p in facts.payments) and second not in refused:
                problems.append(f"second transaction {second} signalled and not refused")
        if plan.scenario is Scenario.RAW_SIGNALS:
            for n in range(len(plan.wrong)):
                if plan.txn(f"W{n}") not in refused:
                    problems.append(f"wrong amount {plan.txn(f'W{n}')} not refused")
        if (
            plan.scenario is Scenario.CANCEL_BEFORE_PAY
            and record.confirmed(first)
            and first not in refused
        ):
            # The server signalled the payment after the cancel: the order must refuse it.
            problems.append(f"payment {first} after the cancel was not refused")
        if plan.scenario is Scenario.CANCEL_BEFORE_PAY and (
            not cancelled or self._charges.get(state.order_id)
        ):
            problems.append(f"cancelled before paying, yet {state.status.value} or charged")
        if plan.scenario is Scenario.NEVER_PAY:
            if not cancelled or reason != self._timeout_reason:
                problems.append(f"never paid in time, yet {state.status.value} ({reason!r})")
            if facts.payments:
                problems.append("paid only after closing, yet payment signals in history")

        for call in record.calls:
            turned_down = call.code == grpc.StatusCode.FAILED_PRECONDITION.name
            if turned_down and call.status == OrderStatus.CANCELLED.value:
                if not cancelled:
                    problems.append(f"{call.what} refused as cancelled, yet {state.status.value}")
                # Nobody cancelled it: the server refused because the payment window closed.
                if not facts.cancels and reason == self._timeout_reason and not call.late:
                    self.audit.after_timeout[call.what] += 1
            if call.what != "CancelOrder":
                continue
            self.audit.cancels[(call.status or "?", call.code, state.status.value)] += 1
            if turned_down and call.status in ("shipped", "delivered") and cancelled:
                problems.append(f"cancel refused as {call.status}, yet cancelled")
        return problems


def _compare(state: OrderState, order: pb.Order) -> list[str]:
    """GetOrder (the query) and the workflow's result must tell the same story."""
    problems = []
    if _status_name(order.status) != state.status.value:
        problems.append(f"GetOrder says {_status_name(order.status)}, result {state.status.value}")
    paid = state.payment_info
    if order.HasField("payment_info") != (paid is not None) or (
        paid is not None
        and (
            order.payment_info.transaction_id != paid.transaction_id
            or order.payment_info.amount
            != money(paid.amount.units, paid.amount.nanos, paid.amount.currency_code)
        )
    ):
        problems.append("GetOrder's payment_info differs from the result's")
    refund = state.refund_info
    if order.HasField("refund_info") != (refund is not None) or (
        refund is not None and order.refund_info.transaction_id != refund.transaction_id
    ):
        problems.append("GetOrder's refund_info differs from the result's")
    if [r.transaction_id for r in order.rejected_payments] != [
        r.transaction_id for r in state.rejected_payments
    ]:
        problems.append("GetOrder's rejected_payments differ from the result's")
    if order.inventory_info.released != state.inventory_info.released:
        problems.append("GetOrder's inventory_info differs from the result's")
    return problems


# --- The printed summary --------------------------------------------------------------------


def _table(title: str, rows: Sequence[Sequence[object]], header: Sequence[str]) -> list[str]:
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        first, *rest = row
        return "  " + "  ".join(
            [first.ljust(widths[0]), *(c.rjust(w) for c, w in zip(rest, widths[1:], strict=True))]
        )

    return [f"{title}:", line(cells[0]), *(line(r) for r in cells[1:])]


def _amount(currency: str, nanos: int) -> str:
    return str(Money.from_total_nanos(currency, nanos))


def summary(audit: Audit, *, seed: int, orders: int, timings: dict[str, float]) -> str:
    out = [f"Load test: {orders} orders, seed {seed}"]
    finals = sorted({status for _, status in audit.final})
    rows: list[list[object]] = []
    for scenario in Scenario:
        counts = [audit.final[(scenario, s)] for s in finals]
        rows.append([scenario.value, sum(counts), *counts])
    rows.append(
        [
            "all",
            sum(audit.final.values()),
            *[sum(n for (_, s), n in audit.final.items() if s == status) for status in finals],
        ]
    )
    out += _table("Orders per scenario, by final status", rows, ["scenario", "orders", *finals])
    out += _table(
        "Cancelled, by reason",
        sorted(audit.cancel_reasons.items()),
        ["reason", "orders"],
    )
    out += _table(
        "CancelOrder calls: status the server saw -> answer -> final status",
        [
            [f"{seen} -> {code}", final, n]
            for (seen, code, final), n in sorted(audit.cancels.items())
        ],
        ["at", "final", "calls"],
    )
    out.append(
        f"  delivered although a cancel signal was accepted (hand-over race): "
        f"{audit.refused_in_hand_over}"
    )
    after_timeout = ", ".join(f"{what} {n}" for what, n in sorted(audit.after_timeout.items()))
    out.append(
        "  calls refused as the payment window had closed: "
        f"{sum(audit.after_timeout.values())}" + (f" ({after_timeout})" if after_timeout else "")
    )
    out.append(
        f"  optimistic OKs (payment confirmed, then timed out and refused): {audit.optimistic_ok}"
    )
    out += _table(
        "RPCs and raw signals, by outcome",
        [[what, code, n] for (what, code), n in sorted(audit.rpc_outcomes.items())],
        ["call", "code", "count"],
    )
    out += _table(
        "Latency per call, seconds",
        [
            [what, len(times), *(f"{percentile(times, q):.3f}" for q in (0.5, 0.99, 1.0))]
            for what, times in sorted(audit.latencies.items())
        ],
        ["call", "calls", "p50", "p99", "max"],
    )
    out += _table(
        "Signals",
        [
            *[
                [f"sent via {via}: {fate.value}", n]
                for (via, fate), n in sorted(audit.signals_sent.items())
            ],
            ["in histories (WorkflowExecutionSignaled)", audit.signals_seen],
        ],
        ["", "count"],
    )
    out += _table("Payments", sorted(audit.payments.items()), ["", "count"])
    out += _table(
        "Money per currency (captured = kept + refunded)",
        [
            [
                c,
                _amount(c, audit.captured[c]),
                _amount(c, audit.kept[c]),
                _amount(c, audit.refunded[c]),
            ]
            for c in sorted(audit.captured)
        ],
        ["currency", "captured", "kept", "refunded"],
    )
    if audit.activity_ends or audit.task_failures:
        out += _table(
            "History: activities that did not complete, workflow task failures",
            [
                *sorted(audit.activity_ends.items()),
                *[(f"workflow task {k}", n) for k, n in sorted(audit.task_failures.items())],
            ],
            ["", "count"],
        )
    drive_and_settle = timings["drive"] + timings["settle"]
    out += _table(
        "Time",
        [
            ["driving (all scenarios sent)", f"{timings['drive']:.1f} s"],
            ["until every workflow closed", f"{timings['settle']:.1f} s"],
            ["late payments to closed orders", f"{timings['late']:.1f} s"],
            ["audit (history + GetOrder per order)", f"{timings['audit']:.1f} s"],
            ["throughput, created to all closed", f"{orders / drive_and_settle:.1f} orders/s"],
        ],
        ["phase", "took"],
    )
    out.append(f"Invariant violations: {len(audit.violations)}")
    return "\n".join(out)
