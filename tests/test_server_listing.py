"""ListOrders' pure parts: validation, page tokens, the query text, the paging windows.

tests/test_list_orders.py runs the same code against a real Temporal server.
"""

from __future__ import annotations

import random
import sqlite3
import string
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from acme.orders.v1 import order_service_pb2 as pb
from server.api import validation
from server.api.errors import InvalidArgument
from server.temporal import listing
from server.temporal.listing import (
    ListedOrder,
    ListFilter,
    ListRequest,
    OrderLister,
    PageToken,
    PageTokens,
    Run,
    TemporalVisibility,
)
from workflows import models, search_attributes
from workflows.money import Money

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
KEY = bytes(range(32))
TOKENS = PageTokens([bytes(range(32, 64))])
P = models.OrderStatus.PENDING


def stamp(moment: datetime) -> Timestamp:
    timestamp = Timestamp()
    timestamp.FromDatetime(moment)
    return timestamp


def validate(request: pb.ListOrdersRequest) -> ListRequest:
    return validation.validate_list_orders(request, TOKENS)


def violations(request: pb.ListOrdersRequest) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        validate(request)
    return {v.field: v.reason for v in caught.value.violations}


# --- Validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "used"), [(0, 50), (1, 1), (50, 50), (999, 999), (1000, 1000), (1001, 1000)]
)
def test_page_size_default_and_maximum(asked: int, used: int) -> None:
    request = validate(pb.ListOrdersRequest(page_size=asked))
    assert request.page_size == used
    assert (listing.DEFAULT_PAGE_SIZE, listing.MAX_PAGE_SIZE) == (50, 1000)


def test_negative_page_size_is_invalid() -> None:
    assert violations(pb.ListOrdersRequest(page_size=-1)) == {"page_size": "OUT_OF_RANGE"}


def test_filters_are_converted() -> None:
    request = validate(
        pb.ListOrdersRequest(
            customer_id="x' OR 'a'='a",
            status=pb.ORDER_STATUS_SHIPPED,
            created_after=stamp(NOW),
            created_before=stamp(NOW + timedelta(days=1)),
        )
    )
    assert request.filter == ListFilter(
        customer_id="x' OR 'a'='a",
        status=models.OrderStatus.SHIPPED,
        created_after=NOW,
        created_before=NOW + timedelta(days=1),
    )
    assert request.page_token is None


def test_no_filters() -> None:
    assert validate(pb.ListOrdersRequest()).filter == ListFilter()


def test_nanoseconds_round_up_to_the_microsecond() -> None:
    # Order times have microseconds: t >= x.0000001 is t >= x.000001, and so is `<`.
    request = validate(pb.ListOrdersRequest(created_after=Timestamp(seconds=0, nanos=1)))
    assert request.filter.created_after == datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC)
    top = pb.ListOrdersRequest(created_before=Timestamp(seconds=253_402_300_799, nanos=999_999_999))
    assert validate(top).filter.created_before == datetime.max.replace(tzinfo=UTC)


def test_invalid_filters() -> None:
    assert violations(pb.ListOrdersRequest(status=7)) == {"status": "INVALID_ENUM_VALUE"}  # type: ignore[arg-type]
    assert violations(pb.ListOrdersRequest(customer_id="c" * 65)) == {"customer_id": "TOO_LONG"}
    assert violations(pb.ListOrdersRequest(created_after=Timestamp(seconds=-62_135_596_801))) == {
        "created_after": "OUT_OF_RANGE"
    }
    assert violations(pb.ListOrdersRequest(created_before=Timestamp(seconds=0, nanos=10**9))) == {
        "created_before.nanos": "OUT_OF_RANGE"
    }
    same = stamp(NOW)
    assert violations(pb.ListOrdersRequest(created_after=same, created_before=same)) == {
        "created_before": "INVALID_RANGE"
    }
    # A nanosecond apart is a valid (empty) range.
    validate(
        pb.ListOrdersRequest(
            created_after=same, created_before=Timestamp(seconds=same.seconds, nanos=1)
        )
    )


def test_any_customer_id_up_to_64_characters_is_a_valid_filter() -> None:
    for customer_id in ("\\", "'", '"', "\x00", "ü€😀", "%_*", "c" * 64):
        request = validate(pb.ListOrdersRequest(customer_id=customer_id))
        assert request.filter.customer_id == customer_id


# --- Page tokens ---------------------------------------------------------------------------


def test_page_token_round_trip() -> None:
    """Signed and opaque; what is hostile about tokens: tests/test_page_tokens.py."""
    token = PageToken(NOW, "order-ORD-1", ListFilter().digest(), timedelta(seconds=90))
    text = TOKENS.encode(token)
    assert set(text) <= set(string.ascii_letters + string.digits + "-_.")
    assert len(text) <= listing.MAX_PAGE_TOKEN_CHARS
    assert TOKENS.decode(text) == token


def test_page_token_is_bound_to_the_filters() -> None:
    filters = pb.ListOrdersRequest(customer_id="CUST-1", status=pb.ORDER_STATUS_PENDING)
    token = TOKENS.encode(
        PageToken(NOW, "order-1", validate(filters).filter.digest(), listing.MIN_WINDOW)
    )
    # The same filters with another page size: fine (AIP-158).
    same = pb.ListOrdersRequest(customer_id="CUST-1", status=pb.ORDER_STATUS_PENDING, page_size=9)
    same.page_token = token
    assert validate(same).page_token is not None
    for other in (
        pb.ListOrdersRequest(customer_id="CUST-2", status=pb.ORDER_STATUS_PENDING),
        pb.ListOrdersRequest(customer_id="CUST-1"),
        pb.ListOrdersRequest(
            customer_id="CUST-1", status=pb.ORDER_STATUS_PENDING, created_after=stamp(NOW)
        ),
    ):
        other.page_token = token
        assert violations(other) == {"page_token": "PAGE_TOKEN_MISMATCH"}
    assert violations(pb.ListOrdersRequest(page_token="nope")) == {
        "page_token": "INVALID_PAGE_TOKEN"
    }


# --- The query text ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        ("CUST-1", "'CUST-1'"),
        ("x' OR 'a'='a", "'x'' OR ''a''=''a'"),
        ("\\", "'\\\\'"),
        ("\\'", "'\\\\'''"),
        ('"', "'\"'"),
        ("ü€", "'ü€'"),
    ],
)
def test_quote(value: str, literal: str) -> None:
    assert listing.quote(value) == literal


def test_visibility_query() -> None:
    query = listing.visibility_query(
        ListFilter(customer_id="a'b", status=models.OrderStatus.CANCELLED),
        customer_id_key=KEY,
        lower=datetime(2025, 1, 1, 0, 0, 0, 123_456, tzinfo=UTC),
        upper=datetime(2025, 1, 2, tzinfo=UTC),
    )
    hashed = search_attributes.customer_key(KEY, "a'b")
    # The hash new orders hold, and the id orders from before the hash hold.
    assert query == (
        f"WorkflowType = 'OrderWorkflow' AND OrderCustomerId IN ('{hashed}', 'a''b') "
        "AND OrderStatus = 'cancelled' "
        "AND OrderCreatedAt > '2025-01-01T00:00:00.122500+00:00' "
        "AND OrderCreatedAt < '2025-01-02T00:00:00.001500+00:00'"
    )
    empty = listing.visibility_query(ListFilter(), customer_id_key=KEY)
    assert empty == "WorkflowType = 'OrderWorkflow'"


def test_other_runs_query() -> None:
    runs = [Run("order-B", "r1", NOW), Run("order-A'", "r2", NOW), Run("order-B", "r3", NOW)]
    assert listing.other_runs_query(runs) == (
        "WorkflowType = 'OrderWorkflow' AND WorkflowId IN ('order-A''', 'order-B') "
        "AND RunId NOT IN ('r1', 'r2', 'r3')"
    )


# How the dev server compares a datetime search attribute (Temporal's SQLite schema and
# query converter): a generated column, text, against the query value in Go's
# "2006-01-02 15:04:05.999999-07:00" layout (trailing zeros dropped).
_sqlite = sqlite3.connect(":memory:")


def stored_form(moment: datetime) -> str:
    row = _sqlite.execute(
        "SELECT STRFTIME('%Y-%m-%d %H:%M:%f+00:00', ?)", (moment.isoformat(),)
    ).fetchone()
    return str(row[0])


def query_form(moment: datetime) -> str:
    fraction = f"{moment.microsecond:06d}".rstrip("0")
    return moment.strftime("%Y-%m-%d %H:%M:%S") + (f".{fraction}" if fraction else "") + "+00:00"


def instants() -> Iterator[datetime]:
    """Whole seconds, whole milliseconds, sub-millisecond instants either side of .5 ms."""
    rng = random.Random(7)
    base = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
    for micros in (0, 1, 499, 500, 501, 999, 1000, 123_400, 123_600, 999_999):
        yield base + timedelta(microseconds=micros)
    for _ in range(2000):
        yield base + timedelta(microseconds=rng.randrange(0, 3_000_000))


def test_time_bounds_are_supersets_on_sqlite_and_tight() -> None:
    """Every order at or after a lower bound (at or before an upper) passes the text
    comparison; none more than 1.5 ms outside does."""
    points = [(moment, stored_form(moment)) for moment in instants()]
    for edge, _ in points[:60]:
        low = listing.after_bound(edge)
        high = listing.until_bound(edge)
        assert low is not None
        assert high is not None
        low_text, high_text = query_form(low), query_form(high)
        for moment, stored in points:
            if moment >= edge:
                assert stored > low_text, (moment, edge)
                assert moment > low  # a superset on a store that compares exactly, too
            if moment <= edge:
                assert stored < high_text, (moment, edge)
                assert moment < high
            if moment < edge - timedelta(microseconds=1500):
                assert not stored > low_text, (moment, edge)
            if moment > edge + timedelta(microseconds=1500):
                assert not stored < high_text, (moment, edge)


def test_time_bounds_at_the_ends_of_time() -> None:
    start = datetime.min.replace(tzinfo=UTC)
    assert listing.after_bound(start) is None
    assert listing.until_bound(datetime.max.replace(tzinfo=UTC)) is None
    query = listing.visibility_query(ListFilter(), customer_id_key=KEY, lower=start)
    assert query == "WorkflowType = 'OrderWorkflow'"


# --- Paging -------------------------------------------------------------------------------


class FakeSource:
    """Visibility in memory: answers with supersets, as the real store may, and counts calls.

    Like the real store it holds a row per run: an order reset or continued as new
    has several, each with its own search attributes.
    """

    def __init__(self, orders: list[ListedOrder]) -> None:
        self.orders = orders
        self.reads = 0
        self.counts = 0
        self.lookups = 0
        self.rows_read = 0

    def _candidates(self, list_filter: ListFilter) -> Iterator[ListedOrder]:
        for order in self.orders:
            if list_filter.customer_id and order.customer_id != list_filter.customer_id:
                continue
            if list_filter.status and order.status != list_filter.status:
                continue
            yield order

    async def read(
        self,
        list_filter: ListFilter,
        lower: datetime,
        upper: datetime | None,
        limit: int | None,
        rpc_timeout: timedelta,
    ) -> list[ListedOrder] | None:
        self.reads += 1
        slack = timedelta(microseconds=1500)
        found = [
            order
            for order in self._candidates(list_filter)
            if order.created_at > lower - slack
            and (upper is None or order.created_at < upper + slack)
        ]
        if limit is not None and len(found) > limit:
            self.rows_read += limit + 1  # what the real source reads before it gives up
            return None
        self.rows_read += len(found)
        return found

    async def any_before(
        self, list_filter: ListFilter, before: datetime, rpc_timeout: timedelta
    ) -> bool:
        self.counts += 1
        slack = timedelta(microseconds=1500)
        return any(
            order.created_at < before + slack
            and (list_filter.created_after is None or order.created_at >= list_filter.created_after)
            for order in self._candidates(list_filter)
        )

    async def other_runs(self, runs: list[Run], rpc_timeout: timedelta) -> list[Run]:
        self.lookups += 1
        workflow_ids = {run.workflow_id for run in runs}
        run_ids = {run.run_id for run in runs}
        return [
            order.run
            for order in self.orders
            if order.workflow_id in workflow_ids and order.run_id not in run_ids
        ]


def order(
    index: int, created_at: datetime, customer: str = "C", status: models.OrderStatus = P
) -> ListedOrder:
    return ListedOrder(
        workflow_id=f"order-ORD-{index:05d}",
        order_id=f"ORD-{index:05d}",
        customer_id=customer,
        status=status,
        total_amount=Money("USD", 1),
        created_at=created_at,
        run_id=f"run-{index:05d}-0",
        started_at=created_at - timedelta(milliseconds=5),
    )


def new_run(
    old: ListedOrder, created_at: datetime, status: models.OrderStatus, after: timedelta
) -> ListedOrder:
    """A run a reset (or continue-as-new) started `after` the old one: its own row, its own
    status, and its own creation time when the reset went back to the first workflow task."""
    prefix, number = old.run_id.rsplit("-", 1)
    return replace(
        old,
        status=status,
        created_at=created_at,
        run_id=f"{prefix}-{int(number) + 1}",
        started_at=old.started_at + after,
    )


def current_runs(orders: list[ListedOrder]) -> list[ListedOrder]:
    """The run of each workflow id that started last: the order as it is now."""
    latest: dict[str, ListedOrder] = {}
    for row in orders:
        best = latest.get(row.workflow_id)
        if best is None or (row.started_at, row.run_id) > (best.started_at, best.run_id):
            latest[row.workflow_id] = row
    return list(latest.values())


async def page_through(
    source: FakeSource, list_filter: ListFilter, page_size: int
) -> list[list[ListedOrder]]:
    lister = OrderLister(cast(TemporalVisibility, source), now=lambda: NOW)
    pages = []
    token = None
    while True:
        page = await lister.list_page(
            ListRequest(list_filter, page_size, token), rpc_timeout=timedelta(seconds=1)
        )
        pages.append(page.orders)
        if page.next_page_token is None:
            return pages
        # What a client would send back.
        token = TOKENS.decode(TOKENS.encode(page.next_page_token))
        assert len(pages) < 10_000


def expected(orders: list[ListedOrder], list_filter: ListFilter) -> list[str]:
    kept = [o for o in current_runs(orders) if list_filter.matches(o)]
    return [o.workflow_id for o in sorted(kept, key=lambda o: o.key, reverse=True)]


def datasets() -> Iterator[tuple[str, list[ListedOrder]]]:
    rng = random.Random(11)
    yield "empty", []
    yield "one", [order(0, NOW - timedelta(minutes=5))]
    spread = [order(i, NOW - timedelta(seconds=rng.randrange(0, 30 * 86400))) for i in range(300)]
    yield "spread over a month", spread
    same = NOW - timedelta(hours=3)
    yield "ties", [order(i, same + timedelta(microseconds=i % 3)) for i in range(40)]
    years = [order(i, NOW - timedelta(days=400 * i + rng.randrange(0, 10))) for i in range(12)]
    yield "years apart", years
    future = [order(1000 + i, NOW + timedelta(minutes=i)) for i in range(5)]
    burst = [order(100 + i, NOW - timedelta(days=2, microseconds=i)) for i in range(120)]
    yield "clock skew and a burst", future + burst + spread[:50]
    mixed = [
        order(
            i,
            NOW - timedelta(seconds=rng.randrange(0, 86400 * 3)),
            customer=rng.choice(["A", "B"]),
            status=rng.choice(list(models.OrderStatus)),
        )
        for i in range(200)
    ]
    yield "customers and statuses", mixed
    # A third of them reset, some twice, to another status and (back to the first
    # workflow task) another creation time: often another window, even years away.
    runs = list(mixed)
    for index in range(0, len(mixed), 3):
        latest = mixed[index]
        for _ in range(rng.choice([1, 1, 2])):
            moved = timedelta(seconds=rng.randrange(-86400 * 400, 86400 * 400))
            status = rng.choice(list(models.OrderStatus))
            after = timedelta(seconds=rng.randrange(1, 86400))
            latest = new_run(latest, latest.created_at + moved, status, after)
            runs.append(latest)
    rng.shuffle(runs)
    yield "reset orders", runs


FILTERS = [
    ListFilter(),
    ListFilter(customer_id="A"),
    ListFilter(customer_id="B", status=models.OrderStatus.CANCELLED),
    ListFilter(created_after=NOW - timedelta(days=1)),
    ListFilter(created_before=NOW - timedelta(days=2)),
    ListFilter(created_after=NOW - timedelta(days=2, microseconds=60), created_before=NOW),
]


@pytest.mark.parametrize("page_size", [1, 3, 50, 1000])
async def test_paging_returns_every_order_once_newest_first(page_size: int) -> None:
    for name, orders in datasets():
        for list_filter in FILTERS:
            pages = await page_through(FakeSource(orders), list_filter, page_size)
            listed = [o.workflow_id for page in pages for o in page]
            assert listed == expected(orders, list_filter), (name, list_filter)
            assert all(len(page) == page_size for page in pages[:-1]), name
            assert len(pages[-1]) <= page_size


async def test_a_reset_order_is_listed_once_with_its_current_runs_status() -> None:
    delivered = order(1, NOW - timedelta(hours=2), status=models.OrderStatus.DELIVERED)
    # Reset to its first workflow task: pending again, with a new creation time.
    pending = new_run(delivered, NOW - timedelta(minutes=1), P, timedelta(hours=1))
    terminated = order(2, NOW - timedelta(hours=3), status=models.OrderStatus.SHIPPED)
    source = FakeSource([delivered, pending, terminated])
    for list_filter, workflow_ids in [
        (ListFilter(), ["order-ORD-00001", "order-ORD-00002"]),
        (ListFilter(status=P), ["order-ORD-00001"]),
        (ListFilter(status=models.OrderStatus.DELIVERED), []),
        (ListFilter(created_before=NOW - timedelta(hours=1)), ["order-ORD-00002"]),
        # An order terminated by an operator (one run) is still an order.
        (ListFilter(status=models.OrderStatus.SHIPPED), ["order-ORD-00002"]),
    ]:
        for page_size in (1, 10):
            pages = await page_through(source, list_filter, page_size)
            listed = [o.workflow_id for page in pages for o in page]
            assert listed == workflow_ids, list_filter
    lister = OrderLister(cast(TemporalVisibility, source), now=lambda: NOW)
    page = await lister.list_page(ListRequest(ListFilter(), 10), rpc_timeout=timedelta(seconds=1))
    assert page.orders == [pending, terminated]


async def test_a_page_reads_about_its_own_size_when_orders_are_spread() -> None:
    rng = random.Random(3)
    orders = [order(i, NOW - timedelta(seconds=rng.randrange(0, 90 * 86400))) for i in range(5000)]
    source = FakeSource(orders)
    pages = await page_through(source, ListFilter(), 50)
    assert len(pages) == 100
    # Windows adapt to the density: a few calls and a few pages' worth of rows per page.
    assert source.reads + source.counts < 100 * 6
    assert source.rows_read < 5000 * 4
    # At most one look-up of other runs per window read.
    assert source.lookups <= source.reads


async def test_a_dense_burst_is_read_in_narrower_windows() -> None:
    """A page reads a bounded number of rows however many orders share its window."""
    burst = [order(i, NOW - timedelta(minutes=10, microseconds=i * 50)) for i in range(100_000)]
    older = [order(200_000 + i, NOW - timedelta(days=i + 1)) for i in range(5)]
    source = FakeSource(burst + older)
    lister = OrderLister(cast(TemporalVisibility, source), now=lambda: NOW)
    page = await lister.list_page(
        ListRequest(ListFilter(), 50, None), rpc_timeout=timedelta(seconds=1)
    )
    assert [o.workflow_id for o in page.orders] == expected(burst, ListFilter())[:50]
    # The first window (an hour) holds all 100,000: it is narrowed, a quarter at a
    # time, instead of read; every call reads at most read_limit rows.
    assert source.reads < 40
    assert source.rows_read < 40 * (listing.read_limit(50) + 1) < len(burst) / 2


async def test_orders_within_one_millisecond_beyond_the_limit_are_read_whole() -> None:
    same = [order(i, NOW - timedelta(seconds=1)) for i in range(3000)]
    pages = await page_through(FakeSource(same), ListFilter(), 7)
    listed = [o.workflow_id for p in pages for o in p]
    assert listed == expected(same, ListFilter())


async def test_an_impossible_customer_id_asks_nothing() -> None:
    source = FakeSource([order(0, NOW, customer="\x00")])
    pages = await page_through(source, ListFilter(customer_id="\x00"), 10)
    assert pages == [[]]
    assert source.reads == source.counts == 0
