"""The OrderService RPCs: validate, call Temporal, convert. No order state lives here.

Each order is one workflow, and the workflow is the only source of truth:
writes are its signals, reads its queries. ConfirmPayment and CancelOrder
query before signalling only to answer clearly (FAILED_PRECONDITION, a wrong
amount) instead of sending a signal the workflow would ignore; both sides
apply the same rules (workflows/models.py: payment_refusal,
cancellation_refusal), and the workflow checks every signal again itself, so
a race between the query and the signal never costs money: the workflow
records what it refused in the order's state (docs/decisions/0001). Why not
one workflow Update instead: docs/decisions/0009.

Two reads are not queries of one workflow: ListOrders reads Temporal's
visibility store (server/listing.py, docs/decisions/0007), and WatchOrder
streams from one shared watch per order (server/watch.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

import grpc
from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from infra import logs
from server import convert, errors, validation
from server.config import ServerConfig
from server.errors import RpcContext
from server.listing import OrderLister, TemporalVisibility
from server.watch import OrderWatchers
from workflows import models

logger = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["OrderService"].full_name

ORDER_CREATED_MESSAGE = "Order created successfully. Awaiting payment confirmation."
ORDER_ALREADY_CREATED_MESSAGE = "Order already created for this request_id."
PAYMENT_RECEIVED_MESSAGE = "Payment received. The order is being processed."
PAYMENT_ALREADY_RECORDED_MESSAGE = (
    "Payment already recorded for this transaction_id; nothing to do."
)
CANCELLATION_REQUESTED_MESSAGE = (
    "Cancellation requested. Any captured payment will be refunded and the reserved "
    "inventory released; the status becomes CANCELLED once that is done."
)

# Our own deadline on a Temporal call runs this much past the rpc_timeout we
# give temporalio, so its more specific error normally arrives first. It is
# still needed: the core client retries a refused connection past rpc_timeout.
_TIMEOUT_SLACK_SECONDS = 0.5
# How long before the caller's deadline the server gives up on Temporal, so
# that its answer (UNAVAILABLE) still reaches the caller.
_ANSWER_MARGIN_SECONDS = 0.2
_MIN_TIMEOUT = timedelta(milliseconds=10)

_R = TypeVar("_R")

_CANNOT_PAY = {
    models.OrderStatus.PAYMENT_CONFIRMED: "is already paid by another transaction",
    models.OrderStatus.PREPARING: "is already paid by another transaction and being prepared",
    models.OrderStatus.SHIPPED: "is already paid by another transaction and has shipped",
    models.OrderStatus.DELIVERED: "is already paid by another transaction and was delivered",
    models.OrderStatus.CANCELLED: "is cancelled and can no longer be paid",
}
_CANNOT_CANCEL = {
    models.OrderStatus.SHIPPED: "has shipped and can no longer be cancelled",
    models.OrderStatus.DELIVERED: "was delivered and can no longer be cancelled",
    models.OrderStatus.CANCELLED: "is already cancelled",
}


@dataclass
class _Call:
    """One RPC in progress: what its log line and its errors need to know."""

    rpc: str
    context: RpcContext
    order_id: str = ""  # set once validated

    def __post_init__(self) -> None:
        # Every line this RPC logs from now on names it, and its order once known.
        logs.bind_rpc(self)

    @property
    def workflow_id(self) -> str:
        return models.workflow_id_for(self.order_id) if self.order_id else ""


def _cancel_of(state: models.OrderState) -> models.CancelRequest | None:
    """The order's cancellation, as far as its state shows one."""
    if state.status != models.OrderStatus.CANCELLED:
        return None
    return models.CancelRequest(state.cancellation_reason or "")


def _payment_error(
    order_id: str,
    payment: models.PaymentRequest,
    status: models.OrderStatus,
    refusal: models.Refusal,
) -> errors.ServiceError:
    """The status a refused payment gets: the workflow's own rule, said for the caller."""
    kind = refusal.kind
    if kind == models.RefusalKind.AMOUNT_MISMATCH:
        return errors.InvalidArgument(
            [errors.field_violation("amount", f"{refusal.reason}.", "AMOUNT_MISMATCH")],
            reason="PAYMENT_AMOUNT_MISMATCH",
        )
    if kind == models.RefusalKind.PREVIOUSLY_REFUSED:
        why = f"refused transaction {payment.transaction_id}: {refusal.reason.rstrip('.')}"
        return errors.OrderStateForbids(order_id, status, why)
    if kind == models.RefusalKind.ALREADY_PAID:
        default = "is already paid by another transaction"
    else:
        default = "cannot be paid"
    return errors.OrderStateForbids(order_id, status, _CANNOT_PAY.get(status, default))


def _cannot_cancel(order_id: str, status: models.OrderStatus) -> errors.OrderStateForbids:
    why = _CANNOT_CANCEL.get(status, "can no longer be cancelled")
    return errors.OrderStateForbids(order_id, status, why)


class OrderServiceServicer(pb_grpc.OrderServiceServicer):
    """acme.orders.v1.OrderService, backed by one Temporal workflow per order."""

    def __init__(
        self, client: Client, config: ServerConfig, *, watchers: OrderWatchers | None = None
    ) -> None:
        self._client = client
        self._config = config
        self._lister = OrderLister(TemporalVisibility(client))
        if watchers is None:
            watchers = OrderWatchers(client, query_timeout=config.temporal_rpc_timeout)
        self._watchers = watchers

    # --- RPCs ---------------------------------------------------------------

    async def CreateOrder(
        self, request: pb.CreateOrderRequest, context: RpcContext
    ) -> pb.CreateOrderResponse:
        call = _Call("CreateOrder", context)
        return await self._serve(call, lambda: self._create_order(request, call))

    async def ConfirmPayment(
        self, request: pb.ConfirmPaymentRequest, context: RpcContext
    ) -> pb.ConfirmPaymentResponse:
        call = _Call("ConfirmPayment", context)
        return await self._serve(call, lambda: self._confirm_payment(request, call))

    async def CancelOrder(
        self, request: pb.CancelOrderRequest, context: RpcContext
    ) -> pb.CancelOrderResponse:
        call = _Call("CancelOrder", context)
        return await self._serve(call, lambda: self._cancel_order(request, call))

    async def GetOrder(self, request: pb.GetOrderRequest, context: RpcContext) -> pb.Order:
        call = _Call("GetOrder", context)
        return await self._serve(call, lambda: self._get_order(request, call))

    async def GetOrderStatus(
        self, request: pb.GetOrderStatusRequest, context: RpcContext
    ) -> pb.GetOrderStatusResponse:
        call = _Call("GetOrderStatus", context)
        return await self._serve(call, lambda: self._get_order_status(request, call))

    async def GetEstimatedDelivery(
        self, request: pb.GetEstimatedDeliveryRequest, context: RpcContext
    ) -> pb.GetEstimatedDeliveryResponse:
        call = _Call("GetEstimatedDelivery", context)
        return await self._serve(call, lambda: self._get_estimated_delivery(request, call))

    async def ListOrders(
        self, request: pb.ListOrdersRequest, context: RpcContext
    ) -> pb.ListOrdersResponse:
        """Orders newest first, from Temporal's visibility store (server/listing.py).

        page_size: 0 means 50 (listing.DEFAULT_PAGE_SIZE); larger than 1000
        (listing.MAX_PAGE_SIZE) is lowered to 1000; negative is INVALID_ARGUMENT.
        Visibility lags the workflows by up to a few seconds, so a new order or
        a status change shows a moment later. A page token is bound to the
        filters it was issued for.
        """
        call = _Call("ListOrders", context)
        return await self._serve(call, lambda: self._list_orders(request, call))

    async def WatchOrder(
        self, request: pb.WatchOrderRequest, context: RpcContext
    ) -> AsyncIterator[pb.Order]:
        """The order now, then after every change, until it is final (server/watch.py).

        Every stream on one order shares one watch, so many watchers cost
        Temporal what one does; the last one to go away releases it.
        """
        # An async generator itself (not a function returning one): grpc.aio
        # serves a response stream only from an async generator function.
        call = _Call("WatchOrder", context)
        started = time.monotonic()
        sent = 0
        try:
            call.order_id = validation.validate_order_id(request.order_id)
            async with self._watchers.watch(call.order_id) as updates:
                async for order in updates:
                    yield order
                    sent += 1
        except (asyncio.CancelledError, GeneratorExit):
            # The caller went away or its deadline passed; gRPC has answered already.
            self._log(call, grpc.StatusCode.CANCELLED, started, messages=sent)
            raise
        except Exception as exc:
            error = errors.translate(exc, order_id=call.order_id)
            self._log(call, error.code, started, messages=sent)
            await errors.abort(call.context, error)
        self._log(call, grpc.StatusCode.OK, started, messages=sent)

    # --- Implementations ----------------------------------------------------

    async def _create_order(
        self, request: pb.CreateOrderRequest, call: _Call
    ) -> pb.CreateOrderResponse:
        order_input = validation.validate_create_order(
            request, payment_timeout_seconds=self._config.payment_timeout_seconds
        )
        call.order_id = order_input.order_id
        total = convert.money_to_proto(models.order_total(order_input.items))
        try:
            await self._temporal(
                call,
                lambda timeout: self._client.start_workflow(
                    models.WORKFLOW_NAME,
                    order_input,
                    id=call.workflow_id,
                    task_queue=self._config.task_queue,
                    # One workflow per order id, ever: a retried request_id cannot
                    # start a second workflow even after the first has closed.
                    id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                    id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                    rpc_timeout=timeout,
                ),
            )
        except WorkflowAlreadyStartedError:
            if not request.request_id:
                raise errors.OrderAlreadyExists(call.order_id) from None
            return await self._existing_order(request, order_input, call)
        return pb.CreateOrderResponse(
            order_id=call.order_id,
            workflow_id=call.workflow_id,
            status=pb.ORDER_STATUS_PENDING,
            total_amount=total,
            message=ORDER_CREATED_MESSAGE,
        )

    async def _existing_order(
        self, request: pb.CreateOrderRequest, order_input: models.OrderInput, call: _Call
    ) -> pb.CreateOrderResponse:
        """A retried CreateOrder: the same order if the request is the same one."""
        state = await self._query_state(call)
        if state.request_fingerprint != order_input.request_fingerprint:
            raise errors.InvalidArgument(
                [
                    errors.field_violation(
                        "request_id",
                        "Already used for a different order; use a new request_id for a new order.",
                        "REQUEST_ID_REUSED",
                    )
                ],
                reason="REQUEST_ID_REUSED",
            )
        return pb.CreateOrderResponse(
            order_id=state.order_id,
            workflow_id=call.workflow_id,
            status=convert.status_to_proto(state.status),
            total_amount=convert.money_to_proto(state.total_amount),
            message=ORDER_ALREADY_CREATED_MESSAGE,
        )

    async def _confirm_payment(
        self, request: pb.ConfirmPaymentRequest, call: _Call
    ) -> pb.ConfirmPaymentResponse:
        order_id, payment = validation.validate_confirm_payment(request)
        call.order_id = order_id
        state = await self._query_state(call)
        accepted = state.payment_info
        if accepted is not None and accepted.transaction_id == payment.transaction_id:
            return pb.ConfirmPaymentResponse(
                order_id=order_id,
                status=convert.status_to_proto(state.status),
                message=PAYMENT_ALREADY_RECORDED_MESSAGE,
            )
        refusal = models.payment_refusal(state, payment, _cancel_of(state))
        if refusal is not None:
            raise _payment_error(order_id, payment, state.status, refusal)
        await self._signal(
            call,
            models.CONFIRM_PAYMENT_SIGNAL,
            payment,
            if_closed="closed before the payment arrived (it was cancelled or timed out)",
        )
        return pb.ConfirmPaymentResponse(
            order_id=order_id,
            status=convert.status_to_proto(state.status),
            message=PAYMENT_RECEIVED_MESSAGE,
        )

    async def _cancel_order(
        self, request: pb.CancelOrderRequest, call: _Call
    ) -> pb.CancelOrderResponse:
        order_id, cancel = validation.validate_cancel_order(request)
        call.order_id = order_id
        state = await self._query_state(call)
        # Whether the parcel is being handed over is the workflow's to know: it
        # refuses such a late cancel itself (docs/decisions/0006).
        if models.cancellation_refusal(state.status, handed_to_carrier=False) is not None:
            raise _cannot_cancel(order_id, state.status)
        await self._signal(
            call,
            models.CANCEL_ORDER_SIGNAL,
            cancel,
            if_closed="closed before the cancellation arrived",
        )
        return pb.CancelOrderResponse(
            order_id=order_id,
            status=convert.status_to_proto(state.status),
            message=CANCELLATION_REQUESTED_MESSAGE,
        )

    async def _get_order(self, request: pb.GetOrderRequest, call: _Call) -> pb.Order:
        call.order_id = validation.validate_order_id(request.order_id)
        return convert.order_to_proto(await self._query_state(call))

    async def _get_order_status(
        self, request: pb.GetOrderStatusRequest, call: _Call
    ) -> pb.GetOrderStatusResponse:
        call.order_id = validation.validate_order_id(request.order_id)
        handle = self._handle(call)
        status: str = await self._temporal(
            call,
            lambda timeout: handle.query(
                models.GET_ORDER_STATUS_QUERY, result_type=str, rpc_timeout=timeout
            ),
        )
        return pb.GetOrderStatusResponse(
            order_id=call.order_id, status=convert.status_to_proto(status)
        )

    async def _get_estimated_delivery(
        self, request: pb.GetEstimatedDeliveryRequest, call: _Call
    ) -> pb.GetEstimatedDeliveryResponse:
        call.order_id = validation.validate_order_id(request.order_id)
        handle = self._handle(call)
        # temporalio decodes `datetime | None` (null stays None); the hint's type is a
        # UnionType, which query's signature (`type | None`) does not admit.
        estimated: datetime | None = await self._temporal(
            call,
            lambda timeout: handle.query(
                models.GET_ESTIMATED_DELIVERY_QUERY,
                result_type=datetime | None,  # type: ignore[arg-type]
                rpc_timeout=timeout,
            ),
        )
        response = pb.GetEstimatedDeliveryResponse(order_id=call.order_id)
        if estimated is not None:
            response.estimated_delivery.CopyFrom(convert.timestamp_from_datetime(estimated))
        return response

    async def _list_orders(
        self, request: pb.ListOrdersRequest, call: _Call
    ) -> pb.ListOrdersResponse:
        list_request = validation.validate_list_orders(request)
        # One cap for the whole page, which may take several visibility calls.
        page = await self._temporal(
            call, lambda timeout: self._lister.list_page(list_request, rpc_timeout=timeout)
        )
        return pb.ListOrdersResponse(
            orders=[order.to_proto() for order in page.orders],
            next_page_token=page.next_page_token.encode() if page.next_page_token else "",
        )

    # --- Temporal access ----------------------------------------------------

    def _handle(self, call: _Call) -> WorkflowHandle[object, object]:
        return self._client.get_workflow_handle(call.workflow_id)

    async def _query_state(self, call: _Call) -> models.OrderState:
        handle = self._handle(call)
        state: models.OrderState = await self._temporal(
            call,
            lambda timeout: handle.query(
                models.GET_FULL_STATE_QUERY, result_type=models.OrderState, rpc_timeout=timeout
            ),
        )
        return state

    async def _signal(self, call: _Call, signal: str, arg: object, *, if_closed: str) -> None:
        """Sends a signal; a workflow that closed since the query is FAILED_PRECONDITION."""
        handle = self._handle(call)
        try:
            await self._temporal(
                call, lambda timeout: handle.signal(signal, arg, rpc_timeout=timeout)
            )
        except RPCError as err:
            error = errors.translate(err, order_id=call.order_id)
            if isinstance(error, errors.OrderNotFound):
                raise errors.OrderStateForbids(call.order_id, None, if_closed) from err
            raise error from err

    def _budget(self, call: _Call) -> tuple[timedelta, float]:
        """The rpc_timeout to give temporalio, and our own guard on the whole call, in seconds.

        The configured cap, shortened to what is left of the caller's deadline
        minus a margin: the server answers UNAVAILABLE (with RetryInfo) while the
        caller still listens, instead of letting it run into DEADLINE_EXCEEDED.
        """
        cap = self._config.temporal_rpc_timeout
        guard = cap.total_seconds() + _TIMEOUT_SLACK_SECONDS
        remaining = call.context.time_remaining()
        if remaining is not None:
            guard = min(
                guard, max(remaining - _ANSWER_MARGIN_SECONDS, _MIN_TIMEOUT.total_seconds())
            )
        return min(cap, timedelta(seconds=guard)), guard

    async def _temporal(self, call: _Call, operation: Callable[[timedelta], Awaitable[_R]]) -> _R:
        """Runs one Temporal call within the budget; TimeoutError if it overruns."""
        rpc_timeout, guard = self._budget(call)
        async with asyncio.timeout(guard):
            return await operation(rpc_timeout)

    # --- Outcome ------------------------------------------------------------

    async def _serve(self, call: _Call, handler: Callable[[], Awaitable[_R]]) -> _R:
        """Runs an RPC: its result, or its error turned into a status; one log line each."""
        started = time.monotonic()
        try:
            result = await handler()
        except asyncio.CancelledError:
            # The caller went away or its deadline passed; gRPC has answered already.
            self._log(call, grpc.StatusCode.CANCELLED, started)
            raise
        except Exception as exc:
            error = errors.translate(exc, order_id=call.order_id)
            self._log(call, error.code, started)
            await errors.abort(call.context, error)
        self._log(call, grpc.StatusCode.OK, started)
        return result

    def _log(
        self, call: _Call, code: grpc.StatusCode, started: float, *, messages: int | None = None
    ) -> None:
        if code == grpc.StatusCode.INTERNAL:
            level = logging.ERROR
        elif code == grpc.StatusCode.UNAVAILABLE:
            level = logging.WARNING
        else:
            level = logging.INFO
        line = "rpc=%s order_id=%s workflow_id=%s code=%s duration_ms=%d"
        args: list[object] = [
            call.rpc,
            call.order_id or "-",
            call.workflow_id or "-",
            code.name,
            (time.monotonic() - started) * 1000,
        ]
        if messages is not None:  # a stream: how many messages it sent
            line += " messages=%d"
            args.append(messages)
        logger.log(level, line, *args)
