"""The OrderService RPCs, each read as validate, call Temporal, convert; no order state lives here.

Reads, and writes' clear answers, use the state the workflow keeps in its memo: no worker
needed; the workflow judges every write again (docs/decisions/0016). Which caller may see
which order is access.py's to say, from that same state (docs/decisions/0020).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from temporalio.exceptions import WorkflowAlreadyStartedError

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from server.api import access, convert, errors, validation
from server.temporal.listing import OrderLister, PageTokens
from server.temporal.orders import OrderWorkflows, within_deadline
from server.temporal.watching import OrderWatchers
from workflows import models, rules
from workflows.money import Money

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

# grpc passes each method its ServicerContext; the request path has used it already.
_Context = Any


class OrderService(pb_grpc.OrderServiceServicer):
    """acme.orders.v1.OrderService, backed by one Temporal workflow per order."""

    def __init__(
        self,
        orders: OrderWorkflows,
        lister: OrderLister,
        watchers: OrderWatchers,
        *,
        page_tokens: PageTokens,
        payment_timeout_seconds: int,
    ) -> None:
        self._orders = orders
        self._lister = lister
        # Sign the next-page tokens ListOrders hands out, and check those it gets back.
        self._page_tokens = page_tokens
        self._watchers = watchers
        self._payment_timeout_seconds = payment_timeout_seconds

    async def CreateOrder(
        self, request: pb.CreateOrderRequest, context: _Context
    ) -> pb.CreateOrderResponse:
        order = validation.validate_create_order(
            request, payment_timeout_seconds=self._payment_timeout_seconds
        )
        access.ensure_own_customer(order.customer_id)
        try:
            total = await self._orders.start(order)
        except WorkflowAlreadyStartedError:
            if not request.request_id:
                raise errors.OrderAlreadyExists(order.order_id) from None
            # A retried CreateOrder: the same order if the request is the same one.
            state = await self._orders.state(order.order_id)
            if state.request_fingerprint != order.request_fingerprint:
                raise errors.InvalidArgument(
                    [
                        errors.field_violation(
                            "request_id",
                            "Already used for a different order; use a new request_id for a "
                            "new order.",
                            "REQUEST_ID_REUSED",
                        )
                    ],
                    reason="REQUEST_ID_REUSED",
                ) from None
            return _created(state.order_id, state.status, state.total_amount, retried=True)
        return _created(order.order_id, models.OrderStatus.PENDING, total, retried=False)

    async def ConfirmPayment(
        self, request: pb.ConfirmPaymentRequest, context: _Context
    ) -> pb.ConfirmPaymentResponse:
        order_id, payment = validation.validate_confirm_payment(request)
        state = await self._visible_state(order_id)
        accepted = state.payment_info
        if accepted is not None and accepted.transaction_id == payment.transaction_id:
            message = PAYMENT_ALREADY_RECORDED_MESSAGE
        else:
            refusal = rules.payment_refusal(state, payment, rules.cancellation_of(state))
            if refusal is not None:
                raise errors.refused(order_id, state.status, refusal)
            await self._orders.signal(
                order_id,
                models.CONFIRM_PAYMENT_SIGNAL,
                payment,
                if_closed="closed before the payment arrived (it was cancelled or timed out)",
            )
            message = PAYMENT_RECEIVED_MESSAGE
        return pb.ConfirmPaymentResponse(
            order_id=order_id, status=convert.status_to_proto(state.status), message=message
        )

    async def CancelOrder(
        self, request: pb.CancelOrderRequest, context: _Context
    ) -> pb.CancelOrderResponse:
        order_id, cancel = validation.validate_cancel_order(request)
        state = await self._visible_state(order_id)
        # Whether the parcel is being handed over is the workflow's to know: it
        # refuses such a late cancel itself (docs/decisions/0006).
        refusal = rules.cancellation_refusal(state.status, handed_to_carrier=False)
        if refusal is not None:
            raise errors.refused(order_id, state.status, refusal)
        await self._orders.signal(
            order_id,
            models.CANCEL_ORDER_SIGNAL,
            cancel,
            if_closed="closed before the cancellation arrived",
        )
        return pb.CancelOrderResponse(
            order_id=order_id,
            status=convert.status_to_proto(state.status),
            message=CANCELLATION_REQUESTED_MESSAGE,
        )

    async def GetOrder(self, request: pb.GetOrderRequest, context: _Context) -> pb.Order:
        order_id = validation.validate_order_id(request.order_id)
        return convert.order_to_proto(await self._visible_state(order_id))

    async def GetOrderStatus(
        self, request: pb.GetOrderStatusRequest, context: _Context
    ) -> pb.GetOrderStatusResponse:
        order_id = validation.validate_order_id(request.order_id)
        state = await self._visible_state(order_id)
        return pb.GetOrderStatusResponse(
            order_id=order_id, status=convert.status_to_proto(state.status)
        )

    async def GetEstimatedDelivery(
        self, request: pb.GetEstimatedDeliveryRequest, context: _Context
    ) -> pb.GetEstimatedDeliveryResponse:
        order_id = validation.validate_order_id(request.order_id)
        estimated = (await self._visible_state(order_id)).estimated_delivery
        response = pb.GetEstimatedDeliveryResponse(order_id=order_id)
        if estimated is not None:
            response.estimated_delivery.CopyFrom(convert.timestamp_from_datetime(estimated))
        return response

    async def ListOrders(
        self, request: pb.ListOrdersRequest, context: _Context
    ) -> pb.ListOrdersResponse:
        """Orders newest first, from Temporal's visibility store (server/temporal/listing.py).

        page_size: 0 means 50; larger than 1000 is lowered to 1000; negative is
        INVALID_ARGUMENT. Visibility lags the workflows by up to a few seconds.
        A page token is bound to the filters it was issued for. A customer lists its
        own orders only: no customer_id means its own, another's is PERMISSION_DENIED.
        """
        list_request = validation.validate_list_orders(
            access.scoped_list_request(request), self._page_tokens
        )
        # One cap for the whole page, which may take several visibility calls.
        page = await within_deadline(
            self._orders.rpc_timeout,
            lambda timeout: self._lister.list_page(list_request, rpc_timeout=timeout),
        )
        return pb.ListOrdersResponse(
            orders=[order.to_proto() for order in page.orders],
            next_page_token=(
                self._page_tokens.encode(page.next_page_token) if page.next_page_token else ""
            ),
        )

    async def WatchOrder(
        self, request: pb.WatchOrderRequest, context: _Context
    ) -> AsyncIterator[pb.Order]:
        """The order now, then after every change, until it is settled.

        Every stream on one order shares one watch, so many watchers cost
        Temporal what one does; the last one to go away releases it.
        """
        # An async generator itself: grpc.aio streams responses only from one.
        order_id = validation.validate_order_id(request.order_id)
        async with self._watchers.watch(order_id) as updates:
            async for order in updates:
                # Checked on the first message, before anything is sent (and on every
                # one after: it costs nothing).
                access.ensure_visible(order_id, order.customer_id)
                yield order

    async def _visible_state(self, order_id: str) -> models.OrderState:
        """The order's state, if the caller may see it; NOT_FOUND as for a missing one if not."""
        state = await self._orders.state(order_id)
        access.ensure_visible(order_id, state.customer_id)
        return state


def _created(
    order_id: str, status: models.OrderStatus, total: Money, *, retried: bool
) -> pb.CreateOrderResponse:
    return pb.CreateOrderResponse(
        order_id=order_id,
        workflow_id=models.workflow_id_for(order_id),
        status=convert.status_to_proto(status),
        total_amount=convert.money_to_proto(total),
        message=ORDER_ALREADY_CREATED_MESSAGE if retried else ORDER_CREATED_MESSAGE,
    )
