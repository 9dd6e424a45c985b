"""Orders for the tests: the requests that place, pay and cancel one, and its history read."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from datetime import datetime

from google.type.money_pb2 import Money
from temporalio.api.failure.v1 import Failure
from temporalio.client import Client, WorkflowFailureError, WorkflowHistory
from temporalio.exceptions import FailureError

from acme.orders.v1 import order_service_pb2 as pb
from workflows import models
from workflows import money as domain_money


def money(units: int, nanos: int = 0, currency: str = "USD") -> Money:
    return Money(currency_code=currency, units=units, nanos=nanos)


# The seed's example order: one laptop at 999.99.
LAPTOP_PRICE = money(999, 990_000_000)


def pending_state(order_id: str, customer_id: str, at: datetime) -> models.OrderState:
    """A just-created order of one pen for 1 USD, as the workflow would hold it."""
    price = domain_money.Money("USD", 1)
    return models.OrderState(
        order_id=order_id,
        customer_id=customer_id,
        customer_email="",
        items=[models.OrderItem("P", "Pen", 1, price)],
        shipping=models.ShippingAddress("1 Main St", "Springfield", "12345", "USA"),
        status=models.OrderStatus.PENDING,
        total_amount=price,
        created_at=at,
        updated_at=at,
    )


def create_request(**overrides: object) -> pb.CreateOrderRequest:
    """The seed's example order, with any field replaced."""
    request = pb.CreateOrderRequest(
        customer_id="CUST-001",
        items=[
            pb.OrderItem(
                product_id="PROD-123",
                product_name="Laptop",
                quantity=1,
                price=LAPTOP_PRICE,
            )
        ],
        shipping_address="123 Main St",
        shipping_city="San Francisco",
        shipping_postal_code="94102",
        shipping_country="USA",
        customer_email="cust-001@example.com",
    )
    for name, value in overrides.items():
        if isinstance(value, list):
            del getattr(request, name)[:]
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)
    return request


def payment_request(
    order_id: str,
    transaction_id: str = "TXN-1",
    *,
    amount: Money = LAPTOP_PRICE,
    payment_method: str = "credit_card",
) -> pb.ConfirmPaymentRequest:
    """A payment of the seed's order total (one laptop), by credit card unless told otherwise."""
    return pb.ConfirmPaymentRequest(
        order_id=order_id,
        transaction_id=transaction_id,
        amount=amount,
        payment_method=payment_method,
    )


def activity_attempts(history: WorkflowHistory) -> dict[str, list[int]]:
    """Activity name → the attempt each of its executions finished on, in history order.

    Temporal writes an activity's ActivityTaskStarted event once it closes,
    with the attempt that closed it, so a retried activity shows attempt > 1.
    """
    names: dict[int, str] = {}
    attempts: dict[str, list[int]] = defaultdict(list)
    for event in history.events:
        if event.HasField("activity_task_scheduled_event_attributes"):
            scheduled = event.activity_task_scheduled_event_attributes
            names[event.event_id] = scheduled.activity_type.name
        elif event.HasField("activity_task_started_event_attributes"):
            started = event.activity_task_started_event_attributes
            attempts[names[started.scheduled_event_id]].append(started.attempt)
    return dict(attempts)


async def failure_message(client: Client, failure: Failure) -> str:
    """A failure's message as read from a history: sealed there (docs/decisions/0017),
    opened with the client's keys."""
    error = await client.data_converter.decode_failure(failure)
    return error.message if isinstance(error, FailureError) else str(error)


async def email_workflows(client: Client, workflow_id: str) -> list[WorkflowHistory]:
    """Waits until every email workflow of the order has closed; their histories.

    The order hands each email to a workflow of its own and may close before they do.
    """
    order = client.get_workflow_handle(workflow_id)
    with contextlib.suppress(WorkflowFailureError):  # cancelled or failed, the order has closed
        await order.result()
    history = await order.fetch_history()
    histories = []
    for event in history.events:
        if event.HasField("child_workflow_execution_started_event_attributes"):
            started = event.child_workflow_execution_started_event_attributes
            email = client.get_workflow_handle(started.workflow_execution.workflow_id)
            with contextlib.suppress(WorkflowFailureError):  # a recipient refused for good
                await email.result()
            histories.append(await email.fetch_history())
    return histories


def email_attempts(histories: list[WorkflowHistory]) -> list[int]:
    """The attempt each email was sent (or refused for good) on."""
    return [n for history in histories for n in activity_attempts(history)["send_notification"]]
