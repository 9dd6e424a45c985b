"""The order workflow: the whole state machine of one order (docs/walkthrough.md, the order's life).

Signals only record what arrived; the run loop acts on it between steps.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    WorkflowAlreadyStartedError,
)
from temporalio.workflow import ActivityHandle, ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from activities.order_activities import OrderActivities
    from workflows import search_attributes
    from workflows.models import (
        CANCEL_ORDER_SIGNAL,
        CONFIRM_PAYMENT_SIGNAL,
        DEFAULT_CANCEL_REASON,
        GET_ESTIMATED_DELIVERY_QUERY,
        GET_FULL_STATE_QUERY,
        GET_ORDER_STATUS_QUERY,
        OUT_OF_STOCK_ERROR,
        PAYMENT_DECLINED_ERROR,
        WORKFLOW_NAME,
        CancelRequest,
        ChargePaymentInput,
        DeliverOrderInput,
        Notification,
        NotificationKind,
        OrderInput,
        OrderState,
        OrderStatus,
        PaymentInfo,
        PaymentRequest,
        PrepareShipmentInput,
        RefundInfo,
        RefundPaymentInput,
        RejectedPayment,
        ReleaseInventoryInput,
        ReserveInventoryInput,
        ShipmentInfo,
        ShipOrderInput,
        StepFailure,
        initial_state,
    )
    from workflows.notification_workflow import NotificationWorkflow
    from workflows.rules import cancellation_refusal, payment_refusal

_T = TypeVar("_T")
_A = TypeVar("_A")

# The seed promises delivery three days after payment.
DELIVERY_ESTIMATE = timedelta(days=3)
WORKFLOW_CANCELLED_REASON = "Order workflow was cancelled"
# Bounds the state (and so every query answer) when a client floods bad payments.
MAX_REJECTED_PAYMENTS = 100

# Forward steps: retried with backoff, but a step that keeps failing for a day
# is a bug to look at, not something to retry forever: STEP_GIVE_UP ends it.
STEP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
)
STEP_GIVE_UP = timedelta(days=1)
STEP_TIMEOUT = timedelta(seconds=30)
# The providers heartbeat every second while they work, so a worker that dies
# mid-call is noticed after this, not after the whole STEP_TIMEOUT.
STEP_HEARTBEAT = timedelta(seconds=10)
# Retrying cannot change the warehouse's "out of stock" or the gateway's "declined".
RESERVE_RETRY = replace(STEP_RETRY, non_retryable_error_types=[OUT_OF_STOCK_ERROR])
PAYMENT_RETRY = replace(
    STEP_RETRY, non_retryable_error_types=[PAYMENT_DECLINED_ERROR, "IdempotencyKeyReused"]
)
# How long a payment may keep failing with no verdict from the gateway.
PAYMENT_GIVE_UP = timedelta(hours=1)
# Compensation must eventually happen: retried until it succeeds, unless the
# provider refuses it for good (a non-retryable error), which is recorded.
FOREVER_RETRY = replace(STEP_RETRY, maximum_interval=timedelta(minutes=1), maximum_attempts=0)
DELIVERY_TIMEOUT = timedelta(hours=1)
DELIVERY_HEARTBEAT = timedelta(seconds=30)
EMAIL_SCHEDULE_TO_CLOSE = timedelta(days=1)
# How long a finished order waits for its emails before it hands the unsent ones
# to workflows of their own and closes: a mail outage never holds it open.
EMAIL_GRACE = timedelta(seconds=10)
# Patches (docs/decisions/0008): what orders started before a change still replay.
EMAILS_HANDED_OFF = "emails-handed-off"
CANCEL_STEP_ON_WORKFLOW_CANCEL = "cancel-step-on-workflow-cancel"
STATE_IN_MEMO = "state-in-memo"


def _options(
    retry: RetryPolicy,
    timeout: timedelta = STEP_TIMEOUT,
    heartbeat: timedelta | None = STEP_HEARTBEAT,
    give_up: timedelta | None = STEP_GIVE_UP,
) -> workflow.ActivityConfig:
    return workflow.ActivityConfig(
        start_to_close_timeout=timeout,
        heartbeat_timeout=heartbeat,
        schedule_to_close_timeout=give_up,
        retry_policy=retry,
    )


# Each activity's timeouts and retries, in one table: _start applies them.
_OPTIONS: dict[Callable[..., Any], workflow.ActivityConfig] = {
    OrderActivities.reserve_inventory: _options(RESERVE_RETRY),
    OrderActivities.charge_payment: _options(PAYMENT_RETRY, give_up=PAYMENT_GIVE_UP),
    OrderActivities.prepare_shipment: _options(STEP_RETRY),
    OrderActivities.ship_order: _options(STEP_RETRY),
    OrderActivities.deliver_order: _options(STEP_RETRY, DELIVERY_TIMEOUT, DELIVERY_HEARTBEAT),
    OrderActivities.refund_payment: _options(FOREVER_RETRY, give_up=None),
    OrderActivities.release_inventory: _options(FOREVER_RETRY, give_up=None),
    OrderActivities.send_notification: _options(
        FOREVER_RETRY, heartbeat=None, give_up=EMAIL_SCHEDULE_TO_CLOSE
    ),
}


def _start(activity: Callable[[OrderActivities, _A], Awaitable[_T]], arg: _A) -> ActivityHandle[_T]:
    """Starts an activity with its options from _OPTIONS."""
    return workflow.start_activity_method(activity, arg, **_OPTIONS[activity])


def _cancelled(err: ActivityError) -> bool:
    return isinstance(err.cause, CancelledError)


def _failure_message(err: ActivityError) -> str:
    """The provider's own words for why an activity failed for good."""
    return err.cause.message if isinstance(err.cause, ApplicationError) else str(err)


def _describe_timeout(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


@workflow.defn(name=WORKFLOW_NAME)
class OrderWorkflow:
    @workflow.init
    def __init__(self, order: OrderInput) -> None:
        self._order = order
        self._state = initial_state(order, order.created_at or workflow.info().start_time)
        # Whether the state is kept in the memo (orders started before that keep
        # none), and whether it changed since it was last written there.
        self._state_in_memo = False
        self._unsaved = False
        # What the cancel signal recorded; the run loop acts on it. An accepted
        # payment is recorded in the state itself (payment_info), uncaptured
        # until _charged.
        self._cancel: CancelRequest | None = None
        # Set once the parcel is handed to the carrier: from then on, no cancel.
        self._handed_to_carrier = False
        # Set once Temporal asked to cancel the workflow itself, not just the order.
        self._workflow_cancelled = False
        self._charged = False
        self._cancellation_emailed = False
        self._emails: list[tuple[Notification, ActivityHandle[None]]] = []

    # --- Signals: record, validate, never block ------------------------------
    # What the order refuses is recorded (rejected_payments) or logged: a
    # signal has no caller to answer (the server reads the memo's state first for that).

    @workflow.signal(name=CONFIRM_PAYMENT_SIGNAL)
    def confirm_payment(self, payment: PaymentRequest) -> None:
        if self._is_known_transaction(payment.transaction_id):
            return  # the same transaction twice is processed once
        refusal = payment_refusal(self._state, payment, self._cancel)
        if refusal is None:
            self._state.payment_info = PaymentInfo(
                transaction_id=payment.transaction_id,
                amount=payment.amount,
                payment_method=payment.payment_method,
                timestamp=workflow.now(),
            )
            self._touch()
            return
        workflow.logger.warning("Payment %s refused: %s", payment.transaction_id, refusal.reason)
        self._reject_payment(payment, refusal.reason)

    @workflow.signal(name=CANCEL_ORDER_SIGNAL)
    def cancel_order(self, request: CancelRequest) -> None:
        if self._cancel is not None:
            return
        refusal = cancellation_refusal(
            self._state.status, handed_to_carrier=self._handed_to_carrier
        )
        if refusal is not None:
            workflow.logger.warning("Cancellation refused: %s", refusal.reason)
            return
        self._cancel = CancelRequest(request.reason or DEFAULT_CANCEL_REASON)

    # --- Queries: read-only, answered even after the workflow has closed ----

    @workflow.query(name=GET_ORDER_STATUS_QUERY)
    def get_order_status(self) -> str:
        return self._state.status.value

    @workflow.query(name=GET_FULL_STATE_QUERY)
    def get_full_state(self) -> OrderState:
        return self._state

    @workflow.query(name=GET_ESTIMATED_DELIVERY_QUERY)
    def get_estimated_delivery(self) -> datetime | None:
        return self._state.estimated_delivery

    # --- The process: the seed's steps, in order ---------------------------------

    @workflow.run
    async def run(self, order: OrderInput) -> OrderState:
        if workflow.patched(STATE_IN_MEMO):
            self._state_in_memo = True
            saver = asyncio.create_task(self._keep_state_in_memo())
        try:
            await self._process()
        except asyncio.CancelledError:
            # The workflow itself was cancelled (e.g. `temporal workflow cancel`),
            # possibly in the middle of compensating: finish undoing what was
            # done (each step runs once) before letting the cancellation through.
            self._on_workflow_cancel()
            if not self._handed_to_carrier:
                await self._compensate()
        await self._await_emails()
        if self._state_in_memo:
            saver.cancel()
            self._save_state()  # the last change, in this last workflow task
        if self._workflow_cancelled:
            raise asyncio.CancelledError(WORKFLOW_CANCELLED_REASON)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._state

    async def _keep_state_in_memo(self) -> None:
        """Writes the state to the memo once per workflow task that changed it."""
        while True:
            await workflow.wait_condition(lambda: self._unsaved)
            self._save_state()

    def _save_state(self) -> None:
        if self._unsaved:
            self._unsaved = False
            workflow.upsert_memo({search_attributes.MEMO_ORDER_STATE: self._state})

    async def _process(self) -> None:
        """The seed's steps. Until the parcel ships, a step that ends the order returns False."""
        self._publish_for_listing()
        if (
            await self._reserve_inventory()
            and await self._wait_for_payment()
            and await self._charge()
            and (package_id := await self._prepare()) is not None
        ):
            if (tracking_number := await self._ship(package_id)) is not None:
                await self._deliver(tracking_number)
        else:
            await self._compensate()

    async def _reserve_inventory(self) -> bool:
        """Takes the items from stock; False (and a cancel reason) if they are not there."""
        reserve = ReserveInventoryInput(self._order.order_id, list(self._order.items))
        try:
            reserved = await self._uninterrupted(_start(OrderActivities.reserve_inventory, reserve))
        except ActivityError as err:
            # Out of stock: nothing was reserved and nothing was charged.
            self._cancel = CancelRequest(f"Inventory not reserved: {_failure_message(err)}")
            return False
        self._state.inventory_info.reservation_id = reserved
        self._touch()
        self._notify(NotificationKind.ORDER_RECEIVED)
        return True

    async def _wait_for_payment(self) -> bool:
        """Until a payment is accepted, the order is cancelled, or the payment times out."""
        timeout = self._order.payment_timeout_seconds
        try:
            await workflow.wait_condition(
                lambda: self._state.payment_info is not None or self._cancel is not None,
                timeout=timedelta(seconds=timeout),
            )
        except TimeoutError:
            self._cancel = CancelRequest(
                f"Payment not received within {_describe_timeout(timeout)}"
            )
        return self._cancel is None

    async def _charge(self) -> bool:
        """Captures the accepted payment; False if refused or the order was cancelled meanwhile."""
        payment = self._state.payment_info
        assert payment is not None
        charge = ChargePaymentInput(
            order_id=self._order.order_id,
            transaction_id=payment.transaction_id,
            amount=payment.amount,
            payment_method=payment.payment_method,
            idempotency_key=f"{self._order.order_id}/charge/{payment.transaction_id}",
        )
        try:
            await self._uninterrupted(_start(OrderActivities.charge_payment, charge))
        except ActivityError as err:
            reason = f"Payment failed: {_failure_message(err)}"
            if isinstance(err.cause, ApplicationError) and err.cause.type == PAYMENT_DECLINED_ERROR:
                self._state.payment_info = None
                self._reject_payment(payment, reason)
            else:
                # No verdict: an attempt whose reply was lost may have captured
                # the money, so compensation refunds by the same key to be sure.
                self._charged = True
            self._cancel = self._cancel or CancelRequest(reason)
            return False
        self._charged = True
        now = workflow.now()
        payment.timestamp = now  # when the money was captured
        self._state.estimated_delivery = now + DELIVERY_ESTIMATE
        self._set_status(OrderStatus.PAYMENT_CONFIRMED)
        self._notify(NotificationKind.PAYMENT_CONFIRMED)
        return self._cancel is None

    async def _prepare(self) -> str | None:
        """Packs the order: the package id, or None if it failed for good or was cancelled."""
        self._set_status(OrderStatus.PREPARING)
        prepare = PrepareShipmentInput(self._order.order_id, list(self._order.items))
        try:
            package_id = await self._unless_cancelled(
                _start(OrderActivities.prepare_shipment, prepare)
            )
        except ActivityError as err:
            self._cancel = self._cancel or CancelRequest(f"Packing failed: {_failure_message(err)}")
            return None
        return package_id if self._cancel is None else None

    async def _ship(self, package_id: str) -> str | None:
        """Hands the parcel to the carrier: its tracking number, or None if that failed for good."""
        # The point of no return: from here a cancel, of the order or of the
        # workflow, no longer stops the parcel, and a failure needs a person.
        self._handed_to_carrier = True
        ship = ShipOrderInput(self._order.order_id, package_id, self._order.shipping)
        try:
            shipment = await self._uninterrupted(_start(OrderActivities.ship_order, ship))
        except ActivityError as err:
            self._failed("ship_order", err)
            return None
        now = workflow.now()
        self._state.shipment_info = ShipmentInfo(
            tracking_number=shipment.tracking_number,
            provider=shipment.provider,
            estimated_delivery=self._state.estimated_delivery or now + DELIVERY_ESTIMATE,
            shipped_at=now,
        )
        self._set_status(OrderStatus.SHIPPED)
        self._notify(NotificationKind.ORDER_SHIPPED)
        return shipment.tracking_number

    async def _deliver(self, tracking_number: str) -> None:
        deliver = DeliverOrderInput(self._order.order_id, tracking_number)
        try:
            await self._uninterrupted(_start(OrderActivities.deliver_order, deliver))
        except ActivityError as err:
            self._failed("deliver_order", err)
            return
        self._state.delivered_at = workflow.now()
        self._set_status(OrderStatus.DELIVERED)
        self._notify(NotificationKind.ORDER_DELIVERED)

    # --- Compensation -------------------------------------------------------------

    async def _compensate(self) -> None:
        """Cancels the order: refund if charged, release inventory, email.

        Idempotent, so an interrupted compensation can simply be run again.
        """
        assert self._cancel is not None
        if self._state.status != OrderStatus.CANCELLED:
            self._state.cancellation_reason = self._cancel.reason
            self._set_status(OrderStatus.CANCELLED)
        if self._state.payment_info is not None and not self._charged:
            # Accepted but not captured yet: refuse it, nothing to refund.
            self._reject_payment(
                self._state.payment_info, "Order was cancelled before the payment was captured"
            )
            self._state.payment_info = None
        await self._undo_effects()
        if not self._cancellation_emailed:
            self._cancellation_emailed = True
            self._notify(NotificationKind.ORDER_CANCELLED)

    async def _undo_effects(self) -> None:
        """The compensating calls, refund first (docs/decisions/0008 shows how to reorder)."""
        await self._refund_if_charged()
        await self._release_reservation()

    async def _refund_if_charged(self) -> None:
        if self._charged and self._state.payment_info and not self._state.refund_info:
            paid = self._state.payment_info
            refund = RefundPaymentInput(
                order_id=self._order.order_id,
                transaction_id=paid.transaction_id,
                amount=paid.amount,
                idempotency_key=f"{self._order.order_id}/refund/{paid.transaction_id}",
            )
            try:
                refund_id = await _start(OrderActivities.refund_payment, refund)
            except ActivityError as err:
                self._failed("refund_payment", err)  # the release still runs
                return
            self._state.refund_info = RefundInfo(
                refund_id=refund_id,
                transaction_id=paid.transaction_id,
                amount=paid.amount,
                refunded_at=workflow.now(),
            )
            self._touch()

    async def _release_reservation(self) -> None:
        reservation = self._state.inventory_info.reservation_id
        if reservation and not self._state.inventory_info.released:
            release = ReleaseInventoryInput(self._order.order_id, reservation)
            try:
                await _start(OrderActivities.release_inventory, release)
            except ActivityError as err:
                self._failed("release_inventory", err)
                return
            self._state.inventory_info.released = True
            self._touch()

    # --- Helpers ----------------------------------------------------------------

    def _on_workflow_cancel(self) -> None:
        """A cancel of the workflow cancels the order too, unless the parcel is on its way."""
        self._workflow_cancelled = True
        if not self._handed_to_carrier:
            self._cancel = self._cancel or CancelRequest(WORKFLOW_CANCELLED_REASON)

    async def _uninterrupted(self, call: ActivityHandle[_T]) -> _T:
        """Awaits a call that a workflow cancel must not abandon half-way.

        Abandoning a reservation or a charge could leave stock held or money
        taken with nobody to undo it, and a parcel handed to the carrier ships
        whatever happens. So a cancel of the workflow itself lets the call
        finish (shielded) and becomes a cancel of the order where that is still
        possible; run() re-raises it once the order is settled.
        """
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            self._on_workflow_cancel()
            return await call

    async def _unless_cancelled(self, step: ActivityHandle[_T]) -> _T | None:
        """The step's result, or None if the order is cancelled first.

        Packaging can stop half-way, so a cancel need not wait for it: the
        activity is cancelled and compensation starts at once.
        """
        cancelled = asyncio.ensure_future(workflow.wait_condition(lambda: self._cancel is not None))
        try:
            await workflow.wait([step, cancelled], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # A cancel of the workflow itself: the step is cancelled too, then compensated.
            if not workflow.patched(CANCEL_STEP_ON_WORKFLOW_CANCEL):
                raise
            self._on_workflow_cancel()
        if step.done():
            cancelled.cancel()
            return step.result()
        step.cancel()
        # Nobody awaits the abandoned step; read its outcome so asyncio does not
        # log "exception was never retrieved" for it.
        step.add_done_callback(lambda done: done.cancelled() or done.exception())
        return None

    async def _await_emails(self) -> None:
        """Waits for the emails, then hands those still unsent to workflows of their own.

        The order cannot close with an email pending (it would be lost); a mail
        server that is down would otherwise hold it open until the mail is sent.
        """
        if self._emails and workflow.patched(EMAILS_HANDED_OFF):
            await workflow.wait(
                [email for _, email in self._emails], timeout=EMAIL_GRACE.total_seconds()
            )
            for notification, email in self._emails:
                if not email.done():
                    email.cancel()
                    email.add_done_callback(lambda done: done.cancelled() or done.exception())
                    await self._hand_off(notification)
        for notification, email in self._emails:
            try:
                await email
            except ActivityError as err:
                if not _cancelled(err):  # failed for a whole day: never the order's end
                    workflow.logger.error("%s email not sent: %s", notification.kind.value, err)

    async def _hand_off(self, notification: Notification) -> None:
        """Starts the email's own workflow, which outlives the order (ABANDON)."""
        # A reset order may hand an email off again: then the first workflow sends it.
        with contextlib.suppress(WorkflowAlreadyStartedError):
            await workflow.start_child_workflow(
                NotificationWorkflow.run,
                notification,
                id=f"{workflow.info().workflow_id}/email/{notification.kind.value}",
                parent_close_policy=ParentClosePolicy.ABANDON,
            )

    def _is_known_transaction(self, transaction_id: str) -> bool:
        paid = self._state.payment_info
        if paid is not None and paid.transaction_id == transaction_id:
            return True
        return any(r.transaction_id == transaction_id for r in self._state.rejected_payments)

    def _reject_payment(self, payment: PaymentRequest | PaymentInfo, reason: str) -> None:
        if len(self._state.rejected_payments) >= MAX_REJECTED_PAYMENTS:
            return
        self._state.rejected_payments.append(
            RejectedPayment(
                transaction_id=payment.transaction_id,
                amount=payment.amount,
                payment_method=payment.payment_method,
                reason=reason,
                received_at=workflow.now(),
            )
        )
        self._touch()

    def _notify(self, kind: NotificationKind) -> None:
        """Starts the email without waiting: a slow mail server never holds up the order."""
        state = self._state
        notification = Notification(
            kind=kind,
            order_id=state.order_id,
            customer_id=state.customer_id,
            recipient=state.customer_email,
            total_amount=state.total_amount,
            tracking_number=state.shipment_info.tracking_number if state.shipment_info else "",
            estimated_delivery=state.estimated_delivery,
            reason=state.cancellation_reason or "",
        )
        email = _start(OrderActivities.send_notification, notification)
        self._emails.append((notification, email))

    def _failed(self, step: str, err: ActivityError) -> None:
        """Records a step that failed for good, for a person to act on, and says so loudly."""
        message = _failure_message(err)
        workflow.logger.error("%s failed for good, a person must act: %s", step, message)
        self._state.failures.append(StepFailure(step, message, workflow.now()))
        self._touch()

    def _set_status(self, status: OrderStatus) -> None:
        """The one place the status changes: in the state and in its search attribute."""
        self._state.status = status
        self._touch()
        workflow.upsert_search_attributes([search_attributes.ORDER_STATUS.value_set(status.value)])

    def _publish_for_listing(self) -> None:
        """Search attributes for ListOrders' filters, and the exact total for its results."""
        state = self._state
        # The hash the server put in the input; orders from before it upsert the raw id, as
        # they always did. No patch: replay matches an upsert by its type, never its values,
        # and each run upserts what its own input holds (docs/decisions/0017).
        customer = self._order.customer_key or state.customer_id
        pairs = search_attributes.for_listing(
            customer, state.status.value, state.created_at, state.total_amount
        )
        # Orders started by an older server have none yet; for the others, the
        # creation time becomes the workflow's start time to the microsecond.
        workflow.upsert_search_attributes([pair.key.value_set(pair.value) for pair in pairs])
        workflow.upsert_memo({search_attributes.MEMO_TOTAL_AMOUNT: state.total_amount})

    def _touch(self) -> None:
        self._state.updated_at = workflow.now()
        self._unsaved = self._state_in_memo
