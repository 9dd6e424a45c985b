"""ListOrders end to end: real Temporal visibility (the dev server's SQLite), real gRPC.

Each test lists its own customer (a fresh id), so orders other tests create
never show. Visibility lags the workflows, so every expectation is polled
with `eventually` until it holds, never slept for.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from temporalio.client import WorkflowHandle
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.testing import WorkflowEnvironment

from acme.orders.v1 import order_service_pb2 as pb
from activities.order_activities import OrderActivities
from activities.providers import ProviderSettings
from infra.keys import new_keys
from server.platform.app import start_server
from server.platform.settings import ServerSettings
from tests.support.keys import key_settings
from tests.support.orders import LAPTOP_PRICE, create_request
from tests.support.polling import eventually
from tests.support.stack import Stack, async_stub, order_reaching, serving
from worker.app import build_worker
from workflows import models, search_attributes

S = pb.OrderStatus


def new_customer() -> str:
    return f"LIST-{uuid.uuid4().hex[:12].upper()}"


async def create_orders(stack: Stack, customer: str, count: int) -> list[pb.Order]:
    """Creates the orders one after another; returns them as GetOrder reads them."""
    orders = []
    for _ in range(count):
        created = await stack.stub.CreateOrder(create_request(customer_id=customer))
        # PENDING from the first workflow task on: created_at is set by then.
        orders.append(await order_reaching(stack, created.order_id, S.ORDER_STATUS_PENDING))
    return orders


def newest_first(orders: Sequence[pb.Order]) -> list[str]:
    """Order ids in the listing's order: created_at, then workflow id, descending."""
    ranked = sorted(orders, key=lambda o: (o.created_at.ToDatetime(), o.workflow_id), reverse=True)
    return [order.order_id for order in ranked]


def ids(response: pb.ListOrdersResponse) -> list[str]:
    return [order.order_id for order in response.orders]


async def listed(stack: Stack, **fields: object) -> pb.ListOrdersResponse:
    return await stack.stub.ListOrders(pb.ListOrdersRequest(**fields))  # type: ignore[arg-type]


async def listing_becomes(
    stack: Stack, order_ids: list[str], **fields: object
) -> pb.ListOrdersResponse:
    """Waits until the listing is exactly these orders (visibility lags)."""
    request = pb.ListOrdersRequest(**fields)  # type: ignore[arg-type]
    return await eventually(
        lambda: stack.stub.ListOrders(request), lambda response: ids(response) == order_ids
    )


async def all_visible(stack: Stack, customer: str, count: int) -> pb.ListOrdersResponse:
    """Waits until visibility has caught up with `count` orders of the customer."""
    return await eventually(
        lambda: listed(stack, customer_id=customer, page_size=100),
        lambda response: len(response.orders) == count,
    )


def violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    """Field -> reason of the BadRequest in an INVALID_ARGUMENT."""
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return {v.field: v.reason for v in bad.field_violations}
    raise AssertionError(f"no BadRequest in {err}")


async def invalid(stack: Stack, **fields: object) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await listed(stack, **fields)
    return violations(caught.value)


# --- Paging and order ------------------------------------------------------------------


async def test_pages_newest_first_without_gaps_or_duplicates(stack: Stack) -> None:
    customer = new_customer()
    orders = await create_orders(stack, customer, 7)
    await all_visible(stack, customer, 7)

    pages: list[list[str]] = []
    token = ""
    while True:
        page = await listed(stack, customer_id=customer, page_size=3, page_token=token)
        pages.append(ids(page))
        token = page.next_page_token
        if not token:
            break
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [order_id for page in pages for order_id in page] == newest_first(orders)

    # Each summary is visibility's copy of the order, exact total from the memo.
    first = (await listed(stack, customer_id=customer, page_size=1)).orders[0]
    newest = next(o for o in orders if o.order_id == first.order_id)
    assert first.workflow_id == f"order-{first.order_id}"
    assert first.customer_id == customer
    assert first.status == S.ORDER_STATUS_PENDING
    assert first.total_amount == LAPTOP_PRICE
    assert first.created_at == newest.created_at


async def test_a_page_token_is_stable_while_new_orders_arrive(stack: Stack) -> None:
    customer = new_customer()
    orders = await create_orders(stack, customer, 4)
    await all_visible(stack, customer, 4)
    first = await listed(stack, customer_id=customer, page_size=2)

    newer = await create_orders(stack, customer, 1)
    await all_visible(stack, customer, 5)
    second = await listed(
        stack, customer_id=customer, page_size=2, page_token=first.next_page_token
    )

    # Keyset paging: the new order is above the cursor, so no page repeats or shifts.
    expected = newest_first(orders)
    assert ids(first) == expected[:2]
    assert ids(second) == expected[2:]
    assert second.next_page_token == ""
    assert newer[0].order_id not in ids(first) + ids(second)


async def test_large_and_default_page_sizes(stack: Stack) -> None:
    customer = new_customer()
    orders = await create_orders(stack, customer, 3)
    await all_visible(stack, customer, 3)
    # Above the maximum (1000) is lowered to it, not refused; 0 is the default (50).
    for page_size in (5000, 0):
        page = await listed(stack, customer_id=customer, page_size=page_size)
        assert ids(page) == newest_first(orders)
        assert page.next_page_token == ""


# --- Filters ------------------------------------------------------------------------------


async def test_filters_by_status(stack: Stack) -> None:
    customer = new_customer()
    pending, cancelled, delivered = await create_orders(stack, customer, 3)
    await stack.stub.CancelOrder(pb.CancelOrderRequest(order_id=cancelled.order_id))
    await stack.stub.ConfirmPayment(
        pb.ConfirmPaymentRequest(
            order_id=delivered.order_id,
            transaction_id="TXN-LIST",
            amount=LAPTOP_PRICE,
            payment_method="credit_card",
        )
    )
    expected = {
        S.ORDER_STATUS_PENDING: [pending.order_id],
        S.ORDER_STATUS_CANCELLED: [cancelled.order_id],
        S.ORDER_STATUS_DELIVERED: [delivered.order_id],
        S.ORDER_STATUS_SHIPPED: [],
    }
    for status, order_ids in expected.items():
        page = await listing_becomes(stack, order_ids, customer_id=customer, status=status)
        assert all(order.status == status for order in page.orders)


async def test_filters_by_creation_time_at_the_exact_instants(stack: Stack) -> None:
    customer = new_customer()
    orders = await create_orders(stack, customer, 5)
    await all_visible(stack, customer, 5)
    by_age = sorted(orders, key=lambda o: (o.created_at.ToDatetime(), o.workflow_id))
    instants = [order.created_at for order in by_age]

    # created_after is inclusive and created_before exclusive, to the microsecond
    # (the dev server's SQLite compares times as text with milliseconds).
    between = await listed(
        stack, customer_id=customer, created_after=instants[1], created_before=instants[3]
    )
    assert ids(between) == [by_age[2].order_id, by_age[1].order_id]
    since = await listed(stack, customer_id=customer, created_after=instants[3])
    assert ids(since) == [by_age[4].order_id, by_age[3].order_id]
    until = await listed(stack, customer_id=customer, created_before=instants[1])
    assert ids(until) == [by_age[0].order_id]

    # A microsecond later or earlier moves the edge past the order at it.
    just_after = Timestamp()
    just_after.FromDatetime(instants[1].ToDatetime() + timedelta(microseconds=1))
    assert by_age[1].order_id not in ids(
        await listed(stack, customer_id=customer, created_after=just_after)
    )

    # Paging within a range keeps to it.
    first = await listed(stack, customer_id=customer, created_after=instants[1], page_size=2)
    rest = await listed(
        stack,
        customer_id=customer,
        created_after=instants[1],
        page_size=2,
        page_token=first.next_page_token,
    )
    assert ids(first) + ids(rest) == [o.order_id for o in reversed(by_age[1:])]


TOTAL_MEMO = {"currency_code": "USD", "units": 5, "nanos": 0}
StartByHand = Callable[[str, list[SearchAttributePair[Any]], object], Awaitable[None]]


@asynccontextmanager
async def started_by_hand(stack: Stack) -> AsyncIterator[StartByHand]:
    """Starts order workflows no worker runs, with the given search attributes and memo
    total (None: no memo); terminates them at the end."""
    handles: list[WorkflowHandle[Any, Any]] = []

    async def start(
        workflow_id: str, attributes: list[SearchAttributePair[Any]], total: object
    ) -> None:
        handle: WorkflowHandle[Any, Any] = await stack.client.start_workflow(
            models.WORKFLOW_NAME,
            id=workflow_id,
            task_queue=f"nowhere-{uuid.uuid4().hex[:8]}",
            search_attributes=TypedSearchAttributes(attributes),
            memo={search_attributes.MEMO_TOTAL_AMOUNT: total} if total is not None else None,
        )
        handles.append(handle)

    try:
        yield start
    finally:
        for handle in handles:
            await handle.terminate("test over")


def customer_id_key(stack: Stack) -> bytes:
    return stack.server.settings.keys.customer_id_key


def order_attributes(
    customer: str, created_at: datetime, status: str = "pending"
) -> list[SearchAttributePair[Any]]:
    return [
        SearchAttributePair(search_attributes.ORDER_CUSTOMER_ID, customer),
        SearchAttributePair(search_attributes.ORDER_STATUS, status),
        SearchAttributePair(search_attributes.ORDER_CREATED_AT, created_at),
    ]


async def test_creation_time_edges_are_exact_on_any_instant(stack: Stack) -> None:
    """created_after includes its instant and created_before excludes it, to the microsecond.

    The dev server's SQLite compares times as text (milliseconds stored, a
    trimmed form queried), which gets whole seconds and sub-millisecond
    instants wrong unless the service asks for a superset and filters itself.
    These orders are six years old, so the lister must also widen its window.
    """
    customer = new_customer()
    base = datetime(2020, 2, 3, 4, 5, 6, tzinfo=UTC)
    offsets = [0, 123_400, 123_600, 124_000, 124_001, 1_000_000]  # microseconds
    instants = [base + timedelta(microseconds=offset) for offset in offsets]
    async with started_by_hand(stack) as start:
        for index, instant in enumerate(instants):
            await start(
                f"order-EDGE-{customer}-{index}", order_attributes(customer, instant), TOTAL_MEMO
            )
        everything = await all_visible(stack, customer, len(instants))
        assert ids(everything) == [f"EDGE-{customer}-{i}" for i in reversed(range(len(instants)))]
        for index, instant in enumerate(instants):
            stamp = Timestamp()
            stamp.FromDatetime(instant)
            since = await listed(stack, customer_id=customer, created_after=stamp)
            assert ids(since) == ids(everything)[: len(instants) - index], instant
            before = await listed(stack, customer_id=customer, created_before=stamp)
            assert ids(before) == ids(everything)[len(instants) - index :], instant


async def test_hostile_customer_ids_find_nothing_and_break_nothing(stack: Stack) -> None:
    customer = new_customer()
    await create_orders(stack, customer, 1)
    await all_visible(stack, customer, 1)
    hostile = [
        "x' OR 'a'='a",
        f"{customer}' OR 'a'='a",
        "') OR (WorkflowType != '",
        "' OR ''='",
        "\\",
        "\\'",
        "'\\",
        '"',
        'a"b',
        # Wildcards and comments that would match this test's customer if they
        # reached the query as syntax. (Bare "_" or "--" are valid customer
        # ids, which other tests may well have created orders for.)
        f"{customer[:-1]}_",
        f"{customer[:5]}%",
        f"{customer[:5]}*",
        f"{customer}'--",
        "ü€😀",
        "\u202e",
        "a\nb",
        "\x00",
        f"{customer}\x00",
        "\x1a",
        "é" * 64,
    ]
    for customer_id in hostile:
        page = await listed(stack, customer_id=customer_id)
        assert list(page.orders) == [], customer_id
        assert page.next_page_token == ""
        for status in (S.ORDER_STATUS_PENDING, S.ORDER_STATUS_CANCELLED):
            assert list((await listed(stack, customer_id=customer_id, status=status)).orders) == []


async def test_workflows_without_order_attributes_are_skipped(stack: Stack) -> None:
    """Workflows started by hand are listed only with everything a summary needs."""
    customer = new_customer()
    [order] = await create_orders(stack, customer, 1)
    complete = order_attributes(customer, datetime.now(UTC))
    incomplete: list[tuple[str, list[SearchAttributePair[Any]], object]] = [
        ("order-NO-MEMO", complete, None),
        ("order-BAD-MEMO", complete, "five dollars"),
        ("order-NO-TIME", complete[:2], TOTAL_MEMO),
        ("order-ODD-STATUS", order_attributes(customer, datetime.now(UTC), "lost"), TOTAL_MEMO),
        ("elsewhere", complete, TOTAL_MEMO),  # not an order's workflow id
    ]
    async with started_by_hand(stack) as start:
        for name, attributes, total in incomplete:
            await start(f"{name}-{uuid.uuid4().hex[:8]}", attributes, total)
        # Once visibility holds all six, only the real order is listed. The real order
        # holds the customer's hash, the others (as orders from before it) the id.
        hashed = search_attributes.customer_key(customer_id_key(stack), customer)
        query = f"{search_attributes.ORDER_CUSTOMER_ID.name} IN ('{hashed}', '{customer}')"
        await eventually(
            lambda: stack.client.count_workflows(query), lambda counted: counted.count == 6
        )
        assert ids(await listed(stack, customer_id=customer)) == [order.order_id]


# --- Invalid requests ------------------------------------------------------------------


async def test_invalid_requests_are_invalid_argument(stack: Stack) -> None:
    now = Timestamp()
    now.GetCurrentTime()
    later = Timestamp(seconds=now.seconds + 60)
    assert await invalid(stack, page_size=-1) == {"page_size": "OUT_OF_RANGE"}
    assert await invalid(stack, created_after=later, created_before=now) == {
        "created_before": "INVALID_RANGE"
    }
    assert await invalid(stack, created_after=now, created_before=now) == {
        "created_before": "INVALID_RANGE"
    }
    assert await invalid(stack, status=42) == {"status": "INVALID_ENUM_VALUE"}
    assert await invalid(stack, customer_id="C" * 65) == {"customer_id": "TOO_LONG"}
    assert await invalid(stack, created_after=Timestamp(seconds=253_402_300_800)) == {
        "created_after": "OUT_OF_RANGE"
    }
    assert await invalid(stack, created_before=Timestamp(seconds=-62_135_596_801)) == {
        "created_before": "OUT_OF_RANGE"
    }
    assert await invalid(stack, created_after=Timestamp(seconds=0, nanos=-1)) == {
        "created_after.nanos": "OUT_OF_RANGE"
    }
    # All mistakes at once.
    assert (await invalid(stack, page_size=-5, status=9)).keys() == {"page_size", "status"}


async def test_bad_page_tokens_are_invalid_argument(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for garbage in ("garbage", "not a token!", "e30", "eyJ2IjoxfQ", "🙂", "A" * 500):
        assert await invalid(stack, page_token=garbage) == {"page_token": "INVALID_PAGE_TOKEN"}
    # Issue 14: base64 of "[" x 10,000 was INTERNAL, with a RecursionError logged each time.
    deep = base64.urlsafe_b64encode(b"[" * 10_000).decode()
    assert await invalid(stack, page_token=deep) == {"page_token": "TOO_LONG"}
    assert await invalid(stack, page_token=deep[:1000]) == {"page_token": "INVALID_PAGE_TOKEN"}
    assert await invalid(stack, page_token="A" * 1_000_000) == {"page_token": "TOO_LONG"}

    customer = new_customer()
    await create_orders(stack, customer, 2)
    await all_visible(stack, customer, 2)
    token = (await listed(stack, customer_id=customer, page_size=1)).next_page_token
    assert token
    # Forged: the genuine body (valid JSON) moved to another order, under its old MAC,
    # or unsigned as tokens used to be.
    body_text, mac = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(body_text + "=="))
    moved = base64.urlsafe_b64encode(json.dumps({**body, "id": "order-ORD-X"}).encode()).decode()
    for forged in (f"{moved.rstrip('=')}.{mac}", moved, body_text):
        assert await invalid(stack, page_token=forged, customer_id=customer) == {
            "page_token": "INVALID_PAGE_TOKEN"
        }
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text
    assert "code=INVALID_ARGUMENT" in caplog.text, "the request path logged the refusals"
    # AIP-158: a token serves the query it came from, whatever page_size asks.
    assert len((await listed(stack, customer_id=customer, page_token=token)).orders) == 1
    for other in (
        {"customer_id": new_customer()},
        {"customer_id": customer, "status": S.ORDER_STATUS_PENDING},
        {"customer_id": customer, "created_after": Timestamp(seconds=0)},
        {},
    ):
        assert await invalid(stack, page_token=token, **other) == {
            "page_token": "PAGE_TOKEN_MISMATCH"
        }


async def test_a_page_token_outlives_one_rotation_of_its_key(stack: Stack) -> None:
    """Servers over the same orders with a page-token key, the keys rotated once, and
    rotated twice: the newest key signs, the one before still verifies, older ones don't."""
    customer = new_customer()
    orders = await create_orders(stack, customer, 3)
    await all_visible(stack, customer, 3)
    keys = new_keys()
    rings = [keys, keys.rotated()]
    rings.append(rings[1].rotated())
    async with AsyncExitStack() as opened:
        servers = [
            await opened.enter_async_context(
                serving(stack, page_token_keys=key_settings(ring)["page_token_keys"])
            )
            for ring in rings
        ]
        before, once, twice = [
            async_stub(
                await opened.enter_async_context(
                    grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
                )
            )
            for server in servers
        ]
        first = await before.ListOrders(pb.ListOrdersRequest(customer_id=customer, page_size=1))
        second = await once.ListOrders(
            pb.ListOrdersRequest(
                customer_id=customer, page_size=1, page_token=first.next_page_token
            )
        )
        third = await twice.ListOrders(
            pb.ListOrdersRequest(
                customer_id=customer, page_size=1, page_token=second.next_page_token
            )
        )
        assert ids(first) + ids(second) + ids(third) == newest_first(orders)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await twice.ListOrders(
                pb.ListOrdersRequest(customer_id=customer, page_token=first.next_page_token)
            )
        assert violations(caught.value) == {"page_token": "INVALID_PAGE_TOKEN"}


async def test_an_order_is_listed_at_once_with_no_worker_and_keeps_its_creation_time(
    temporal: WorkflowEnvironment, tmp_path: Path
) -> None:
    """Search attributes come with the start: listable before any worker runs the order."""
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        temporal_address=temporal.client.service_client.config.target_host,
        task_queue=f"orders-no-worker-{uuid.uuid4().hex[:8]}",
        **key_settings(),
    )
    server = await start_server(settings, client=temporal.client)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = async_stub(channel)
            customer = f"CUST-EARLY-{uuid.uuid4().hex[:8]}"
            created = await stub.CreateOrder(create_request(customer_id=customer))
            listed = await eventually(
                lambda: stub.ListOrders(pb.ListOrdersRequest(customer_id=customer)),
                lambda page: len(page.orders) == 1,
                within=10,
            )
            [summary] = listed.orders
            assert summary.order_id == created.order_id
            assert summary.status == pb.ORDER_STATUS_PENDING
            assert summary.total_amount == created.total_amount
            started = await temporal.client.get_workflow_handle(created.workflow_id).describe()
            created_at = summary.created_at.ToDatetime(tzinfo=UTC)
            assert abs(created_at - started.start_time) < timedelta(seconds=1)
            # Once a worker runs the order, it says the same creation time.
            activities = OrderActivities(ProviderSettings.instant(tmp_path))
            async with build_worker(temporal.client, settings.task_queue, activities):
                order = await stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))
            assert abs(order.created_at.ToDatetime(tzinfo=UTC) - created_at) < timedelta(
                milliseconds=1
            )
    finally:
        await server.stop(grace=0.5)
