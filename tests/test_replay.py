"""Determinism: the committed histories of every path replay against today's workflow.

Each file in tests/histories/ is the history of a real order, recorded by
`python -m tests.histories.record`. Replaying it runs the current
OrderWorkflow code through the recorded events: if the code now makes a
different decision (another activity, another order of steps, a timer less),
the Replayer raises a NondeterminismError. A worker running that code would
fail the same way on every order in flight at deploy time, so this is the
test that keeps such a change out of CI.

The second half proves the test can fail, and shows the safe way to make one
real change, releasing the inventory before refunding, with
`workflow.patched` (docs/decisions/0008-changing-the-workflow-safely.md).

Every history replays through the workers' data converter, with the test-only keys
the `*--v3-encrypted.json` histories were recorded with (tests/histories/test-keys.toml):
those have every payload encrypted; the older ones, recorded before encryption, have
none, and the codec passes their payloads through (docs/decisions/0017).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from activities.order_activities import OrderActivities
from activities.providers import ProviderSettings
from infra import codec
from infra.keys import new_keys
from tests.histories import record
from tests.support.keys import history_keys
from tests.support.payloads import payloads_in
from workflows.models import (
    CANCEL_ORDER_SIGNAL,
    CONFIRM_PAYMENT_SIGNAL,
    WORKFLOW_NAME,
    CancelRequest,
    NotificationKind,
    OrderInput,
    OrderItem,
    OrderState,
    OrderStatus,
    PaymentRequest,
    ShippingAddress,
    workflow_id_for,
)
from workflows.notification_workflow import NotificationWorkflow
from workflows.order_workflow import OrderWorkflow

HISTORIES = sorted(record.HERE.glob("*.json"))


def load(file: Path) -> WorkflowHistory:
    data = json.loads(file.read_text())
    started = data["events"][0]["workflowExecutionStartedEventAttributes"]
    return WorkflowHistory.from_json(started.get("workflowId", record.workflow_id_of(file)), data)


# As a worker holding the test keys decodes: encrypted payloads and plain ones alike.
CONVERTER = codec.data_converter(history_keys())


async def replay(history: WorkflowHistory, workflow_class: type) -> None:
    """Replays one history against one workflow class; raises what the Replayer raises."""
    await Replayer(workflows=[workflow_class], data_converter=CONVERTER).replay_workflow(history)


async def replay_failures(workflow_class: type) -> dict[str, BaseException]:
    """The paths whose committed history `workflow_class` cannot replay, with why."""
    failures: dict[str, BaseException] = {}
    for file in HISTORIES:
        try:
            await replay(load(file), workflow_class)
        except Exception as err:
            failures[file.stem] = err
    return failures


# --- What each history is ---------------------------------------------------------------------


def activities_scheduled(events: Sequence[HistoryEvent]) -> list[str]:
    return [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in events
        if e.HasField("activity_task_scheduled_event_attributes")
    ]


def signals(events: Sequence[HistoryEvent]) -> list[str]:
    return [
        e.workflow_execution_signaled_event_attributes.signal_name
        for e in events
        if e.HasField("workflow_execution_signaled_event_attributes")
    ]


def has(events: Sequence[HistoryEvent], attributes: str) -> bool:
    return any(e.HasField(attributes) for e in events)  # type: ignore[arg-type]


def retried(events: Sequence[HistoryEvent]) -> bool:
    return any(
        e.activity_task_started_event_attributes.attempt > 1
        for e in events
        if e.HasField("activity_task_started_event_attributes")
    )


COMPLETED = "workflow_execution_completed_event_attributes"
# What shows that a history really took its path: a recorder bug must not pass quietly.
PATH_EVIDENCE: dict[str, Callable[[Sequence[HistoryEvent]], bool]] = {
    "happy_delivered": lambda ev: (
        "deliver_order" in activities_scheduled(ev)
        and "refund_payment" not in activities_scheduled(ev)
        and has(ev, COMPLETED)
    ),
    "cancelled_before_payment": lambda ev: (
        signals(ev) == ["cancel_order"]
        and "charge_payment" not in activities_scheduled(ev)
        and "release_inventory" in activities_scheduled(ev)
    ),
    "cancelled_after_payment": lambda ev: (
        signals(ev) == ["confirm_payment", "cancel_order"]
        and has(ev, "activity_task_cancel_requested_event_attributes")
        and {"charge_payment", "refund_payment", "release_inventory"}
        <= set(activities_scheduled(ev))
    ),
    "payment_timeout": lambda ev: (
        not signals(ev)
        and has(ev, "timer_fired_event_attributes")
        and "release_inventory" in activities_scheduled(ev)
    ),
    "payment_declined": lambda ev: (
        has(ev, "activity_task_failed_event_attributes")
        and "charge_payment" in activities_scheduled(ev)
        and "refund_payment" not in activities_scheduled(ev)
    ),
    "out_of_stock": lambda ev: (
        [a for a in activities_scheduled(ev) if a != "send_notification"] == ["reserve_inventory"]
        and has(ev, "activity_task_failed_event_attributes")
    ),
    "wrong_and_duplicate_payments": lambda ev: (
        signals(ev) == ["confirm_payment"] * 5 and "deliver_order" in activities_scheduled(ev)
    ),
    "transient_failures_retried": lambda ev: (
        retried(ev) and "deliver_order" in activities_scheduled(ev) and has(ev, COMPLETED)
    ),
    "workflow_cancelled": lambda ev: (
        has(ev, "workflow_execution_cancel_requested_event_attributes")
        and has(ev, "workflow_execution_canceled_event_attributes")
        and "refund_payment" in activities_scheduled(ev)
    ),
    # The capture under way when the workflow is cancelled finishes (shielded), then is refunded.
    "workflow_cancelled_while_charging": lambda ev: (
        has(ev, "workflow_execution_cancel_requested_event_attributes")
        and not has(ev, "activity_task_cancel_requested_event_attributes")
        and "prepare_shipment" not in activities_scheduled(ev)
        and {"charge_payment", "refund_payment", "release_inventory"}
        <= set(activities_scheduled(ev))
        and has(ev, "workflow_execution_canceled_event_attributes")
    ),
    # The order completes while its emails, handed to workflows of their own, are unsent.
    "mail_server_down": lambda ev: (
        activities_scheduled(ev).count("send_notification") == 4
        and len(children_started(ev)) == 4
        and not has(ev, "child_workflow_execution_completed_event_attributes")
        and has(ev, COMPLETED)
    ),
    "refund_refused": lambda ev: (
        has(ev, "activity_task_failed_event_attributes")
        and [a for a in activities_scheduled(ev) if a != "send_notification"][-2:]
        == ["refund_payment", "release_inventory"]
        and has(ev, COMPLETED)
    ),
    # The payment timer fires, and the payment arrives, before one and the same workflow task.
    "payment_and_timeout_in_one_task": lambda ev: one_task_sees_both(
        ev, "timer_fired_event_attributes", "workflow_execution_signaled_event_attributes"
    ),
}


def one_task_sees_both(events: Sequence[HistoryEvent], first: str, second: str) -> bool:
    """Whether the first `first` event and the first `second` one reach the workflow
    in one task: no workflow task starts between them."""
    found = [next((i for i, e in enumerate(events) if has([e], a)), -1) for a in (first, second)]
    low, high = sorted(found)
    return low >= 0 and not has(events[low:high], "workflow_task_started_event_attributes")


def children_started(events: Sequence[HistoryEvent]) -> list[str]:
    return [
        e.child_workflow_execution_started_event_attributes.workflow_execution.workflow_id
        for e in events
        if e.HasField("child_workflow_execution_started_event_attributes")
    ]


def test_every_path_has_a_committed_history() -> None:
    assert set(PATH_EVIDENCE) == set(record.PATHS)
    assert {record.path_of(file) for file in HISTORIES} == set(record.PATHS)


@pytest.mark.parametrize("file", HISTORIES, ids=lambda file: file.stem)
def test_history_is_of_its_path(file: Path) -> None:
    events = load(file).events
    assert PATH_EVIDENCE[record.path_of(file)](events)


@pytest.mark.parametrize("file", HISTORIES, ids=lambda file: file.stem)
async def test_history_replays_on_the_current_workflow(file: Path) -> None:
    await replay(load(file), OrderWorkflow)


# payloads_in's paths of the payloads counted below: inputs, results, signals and the memo.
ORDER_DATA = (
    "workflow_execution_started_event_attributes.input.",
    "workflow_execution_started_event_attributes.memo.",
    "activity_task_scheduled_event_attributes.input.",
    "activity_task_completed_event_attributes.result.",
    "workflow_execution_signaled_event_attributes.input.",
    "workflow_execution_completed_event_attributes.result.",
    "workflow_properties_modified_event_attributes.upserted_memo.",
)


def encrypted_share(file: Path) -> tuple[int, int]:
    """(encrypted, all) payloads of a history's inputs, results, signals and memo."""
    payloads = [
        payload
        for event in load(file).events
        for where, payload in payloads_in(event)
        if where.startswith(ORDER_DATA)
    ]
    return sum(codec.is_encrypted(p) for p in payloads), len(payloads)


def test_histories_from_before_and_after_encryption_are_both_replayed() -> None:
    """The upgrade: orders recorded before encryption replay through the codec (above), as
    do those recorded with it, every payload of which is sealed with the test key."""
    encrypted = [file for file in HISTORIES if file.stem.endswith("-encrypted")]
    assert {record.path_of(file) for file in encrypted} == set(record.PATHS)
    for file in HISTORIES:
        sealed, total = encrypted_share(file)
        assert total > 0, file.stem
        assert sealed == (total if file in encrypted else 0), file.stem


async def test_an_encrypted_history_does_not_replay_without_its_key() -> None:
    [file] = [f for f in HISTORIES if f.stem == "happy_delivered--v3-encrypted"]
    stranger = codec.data_converter(new_keys())
    # The message names the key, but is sealed itself (a failure's message is): the type shows.
    with pytest.raises(Exception, match="UndecryptablePayload"):
        await Replayer(workflows=[OrderWorkflow], data_converter=stranger).replay_workflow(
            load(file)
        )


# --- The replay test can fail -------------------------------------------------------------------
# The variants of OrderWorkflow below run outside the workflow sandbox: in it,
# every replay would re-import this test module and pytest with it (half a
# second each). The sandbox only guards against non-deterministic calls;
# which commands a workflow issues, and so what the Replayer compares, is the
# same with or without it. OrderWorkflow itself replays sandboxed, as it runs.


@workflow.defn(name=WORKFLOW_NAME, sandboxed=False)
class EmailFirstOrderWorkflow(OrderWorkflow):
    """A careless change: "tell the customer at once", before anything else happens."""

    @workflow.run
    async def run(self, order: OrderInput) -> OrderState:
        self._notify(NotificationKind.ORDER_RECEIVED)
        return await super().run(order)


async def test_a_changed_workflow_fails_to_replay_every_history() -> None:
    failures = await replay_failures(EmailFirstOrderWorkflow)
    assert set(failures) == {file.stem for file in HISTORIES}
    for err in failures.values():
        assert isinstance(err, workflow.NondeterminismError), repr(err)


# --- The worked example: release the inventory before refunding -------------------------------
# OrderWorkflow._compensate refunds first, then releases the reservation. The
# refund is retried forever, so a payment gateway that is down for hours keeps
# the cancelled order's stock locked for hours. Releasing first frees it at
# once. For an order cancelled after payment the commands come in another
# order: without a guard, every such order in flight fails on the new worker.

RELEASE_BEFORE_REFUND = "release-inventory-before-refund"


@workflow.defn(name=WORKFLOW_NAME, sandboxed=False)
class UnguardedOrderWorkflow(OrderWorkflow):
    """The change made naively: new orders are right, orders in flight break."""

    @workflow.run
    async def run(self, order: OrderInput) -> OrderState:
        return await super().run(order)

    async def _undo_effects(self) -> None:
        await self._release_reservation()
        await self._refund_if_charged()


@workflow.defn(name=WORKFLOW_NAME, sandboxed=False)
class PatchedOrderWorkflow(OrderWorkflow):
    """The change made safely: the old order of steps for orders that began with it."""

    @workflow.run
    async def run(self, order: OrderInput) -> OrderState:
        return await super().run(order)

    async def _undo_effects(self) -> None:
        if workflow.patched(RELEASE_BEFORE_REFUND):
            await self._release_reservation()
            await self._refund_if_charged()
        else:
            await self._refund_if_charged()
            await self._release_reservation()


@workflow.defn(name=WORKFLOW_NAME, sandboxed=False)
class DeprecatedPatchOrderWorkflow(OrderWorkflow):
    """Step two, once no order from before the patch is open: only the new code is left."""

    @workflow.run
    async def run(self, order: OrderInput) -> OrderState:
        return await super().run(order)

    async def _undo_effects(self) -> None:
        workflow.deprecate_patch(RELEASE_BEFORE_REFUND)
        await self._release_reservation()
        await self._refund_if_charged()


def refunded_paths() -> set[str]:
    """The committed histories in which an order was refunded (and its stock released)."""
    return {
        file.stem
        for file in HISTORIES
        if "refund_payment" in activities_scheduled(load(file).events)
    }


async def test_unguarded_change_breaks_exactly_the_refunded_orders() -> None:
    failures = await replay_failures(UnguardedOrderWorkflow)
    assert refunded_paths() >= {"cancelled_after_payment", "workflow_cancelled"}
    assert set(failures) == refunded_paths()
    for err in failures.values():
        assert isinstance(err, workflow.NondeterminismError), repr(err)
        assert "'refund_payment' does not match" in str(err), str(err)


async def test_patched_change_replays_every_committed_history() -> None:
    assert await replay_failures(PatchedOrderWorkflow) == {}


async def run_cancelled_after_payment(
    env: WorkflowEnvironment, workflow_class: type, outbox: Path
) -> tuple[OrderState, WorkflowHistory]:
    """A new order on `workflow_class`: paid, cancelled while packing, compensated."""
    task_queue = f"replay-{uuid.uuid4().hex[:8]}"
    simulation = ProviderSettings.instant(outbox, sim_prepare_seconds=record.SLOW_PREPARE_SECONDS)
    activities = OrderActivities(simulation)
    order_id = f"ORD-PATCH{uuid.uuid4().hex[:11].upper()}"
    async with Worker(
        env.client,
        task_queue=task_queue,
        workflows=[workflow_class, NotificationWorkflow],
        activities=activities.all(),
    ):
        handle = await env.client.start_workflow(
            WORKFLOW_NAME,
            OrderInput(
                order_id=order_id,
                customer_id="CUST-001",
                items=[OrderItem("PROD-123", "Laptop", 1, record.PRICE)],
                shipping=ShippingAddress("123 Main St", "San Francisco", "94102", "USA"),
            ),
            id=workflow_id_for(order_id),
            task_queue=task_queue,
            result_type=OrderState,
        )
        await handle.signal(
            CONFIRM_PAYMENT_SIGNAL, PaymentRequest("TXN-1", record.PRICE, "credit_card")
        )
        await record.reaching(handle, OrderStatus.PREPARING)
        await handle.signal(CANCEL_ORDER_SIGNAL, CancelRequest("Changed my mind"))
        state = await handle.result()
        return state, await handle.fetch_history()


async def test_patched_change_releases_first_for_new_orders(
    temporal: WorkflowEnvironment, tmp_path: Path
) -> None:
    state, history = await run_cancelled_after_payment(temporal, PatchedOrderWorkflow, tmp_path)
    assert state.status == OrderStatus.CANCELLED
    assert state.refund_info is not None
    assert state.inventory_info.released
    steps = activities_scheduled(history.events)
    assert steps.index("release_inventory") < steps.index("refund_payment")
    # The patch leaves a marker in the new order's history: how a replay knows its branch.
    markers = [
        str(e.marker_recorded_event_attributes)
        for e in history.events
        if e.HasField("marker_recorded_event_attributes")
    ]
    assert sum(RELEASE_BEFORE_REFUND in marker for marker in markers) == 1, markers

    await replay(history, PatchedOrderWorkflow)
    # Once no pre-patch order is open, deprecate_patch keeps replaying the new orders...
    await replay(history, DeprecatedPatchOrderWorkflow)
    # ...and rolling back to the unpatched code would break them.
    with pytest.raises(workflow.NondeterminismError):
        await replay(history, OrderWorkflow)


async def test_deprecated_patch_is_only_for_after_the_old_orders_are_gone() -> None:
    failures = await replay_failures(DeprecatedPatchOrderWorkflow)
    assert set(failures) == refunded_paths()
