"""ListOrders: orders from Temporal's visibility store, newest first, in stable pages.

Why the service sorts and pages itself, and what it costs: docs/decisions/0007.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from temporalio.client import Client, WorkflowExecution

from acme.orders.v1 import order_service_pb2 as pb
from infra.keys import new_key
from server.api import convert
from workflows import models, search_attributes
from workflows.money import Money

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

# The first window below the cursor when no page token suggests a better one.
INITIAL_WINDOW = timedelta(hours=1)
# How much a window grows when it held too few orders, or shrinks when too many.
WINDOW_FACTOR = 4
# Bounds on a window (a page token's hint is client input). Below a millisecond
# no store tells instants apart, so a denser window is read whole.
MIN_WINDOW = timedelta(milliseconds=1)
MAX_WINDOW = timedelta(days=100 * 366)
# Rows per visibility call while reading a window (Temporal's usual maximum).
VISIBILITY_PAGE_SIZE = 1000


def read_limit(page_size: int) -> int:
    """The most rows a page reads from one window before it narrows the window instead."""
    return max(WINDOW_FACTOR * (page_size + 1), VISIBILITY_PAGE_SIZE)


WORKFLOW_ID_PREFIX = models.workflow_id_for("")
_TOKEN_VERSION = 1
# The longest page token read: this server writes under 700 characters (a workflow id
# has at most 255); anything longer is refused before it is decoded.
MAX_PAGE_TOKEN_CHARS = 1024
# base64url(body) "." base64url(HMAC-SHA256), unpadded.
_SIGNED_TOKEN = re.compile(r"(?P<body>[A-Za-z0-9_-]+)\.(?P<mac>[A-Za-z0-9_-]{43})")
# What the MAC covers before the body: a key of the ring signs page tokens and nothing else.
_MAC_CONTEXT = b"acme.orders.v1.ListOrders.page_token\x00"
_MIN_TIME = datetime.min.replace(tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
_HALF_MILLISECOND = timedelta(microseconds=500)

# (created_at, workflow_id): the order of a listing, newest first when reversed.
Key = tuple[datetime, str]


# --- What a request asks for ---------------------------------------------------------


@dataclass(frozen=True)
class ListFilter:
    """ListOrders' filters, validated. Times are aware UTC datetimes."""

    customer_id: str = ""
    status: models.OrderStatus | None = None
    created_after: datetime | None = None  # inclusive
    created_before: datetime | None = None  # exclusive

    def digest(self) -> str:
        """Binds a page token to these filters (AIP-158: a token serves one query)."""
        canonical = json.dumps(
            [
                self.customer_id,
                self.status.value if self.status else None,
                self.created_after.isoformat() if self.created_after else None,
                self.created_before.isoformat() if self.created_before else None,
            ]
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    def matches(self, order: ListedOrder) -> bool:
        """The filters, exactly: visibility only narrows, this decides."""
        return (
            (not self.customer_id or order.customer_id == self.customer_id)
            and (self.status is None or order.status == self.status)
            and (self.created_after is None or order.created_at >= self.created_after)
            and (self.created_before is None or order.created_at < self.created_before)
        )

    @property
    def can_match(self) -> bool:
        """False for a customer id no order can have (control characters)."""
        return not any(unicodedata.category(char) == "Cc" for char in self.customer_id)


@dataclass(frozen=True)
class PageToken:
    """Where the next page starts. Clients get it signed and opaque (`PageTokens`)."""

    created_at: datetime
    workflow_id: str
    filter_digest: str
    # The window the next page starts with, from the density of this one.
    window: timedelta

    @property
    def key(self) -> Key:
        return (self.created_at, self.workflow_id)

    def body(self) -> bytes:
        """The token's content as a small JSON, which `PageTokens` signs."""
        payload = {
            "v": _TOKEN_VERSION,
            "t": self.created_at.isoformat(),
            "id": self.workflow_id,
            "f": self.filter_digest,
            "w": self.window // _MILLISECOND,
        }
        return json.dumps(payload, separators=(",", ":")).encode()

    @staticmethod
    def from_body(raw: bytes) -> PageToken:
        """The content of a body whose MAC was verified; ValueError if it is not one of ours."""
        try:
            payload = json.loads(raw)
        # A verified body is one this server wrote; still, nothing here may become INTERNAL.
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise ValueError("not a page token") from err
        if not isinstance(payload, dict) or payload.get("v") != _TOKEN_VERSION:
            raise ValueError("not a page token of this version")
        created, workflow_id = payload.get("t"), payload.get("id")
        digest, window = payload.get("f"), payload.get("w")
        if not (
            isinstance(created, str)
            and isinstance(workflow_id, str)
            and 0 < len(workflow_id) <= 255
            and isinstance(digest, str)
            and isinstance(window, int)
            and not isinstance(window, bool)
        ):
            raise ValueError("malformed page token")
        try:
            created_at = datetime.fromisoformat(created)
        except ValueError:
            raise ValueError("malformed page token") from None
        if created_at.tzinfo is None:
            raise ValueError("malformed page token")
        window_span = window * _MILLISECOND
        if not MIN_WINDOW <= window_span <= MAX_WINDOW:
            raise ValueError("malformed page token")
        return PageToken(created_at.astimezone(UTC), workflow_id, digest, window_span)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PageTokens:
    """Signs the page tokens this server hands out and checks those it gets back
    (docs/decisions/0021).

    HMAC-SHA256 over the body, with the first of `keys` (the keys file's
    `page_token_keys`, newest first); a token signed with any of them is
    accepted, so tokens handed out before a rotation keep working.
    """

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("page tokens need at least one key")
        self._keys = tuple(keys)

    @classmethod
    def for_keys(cls, keys: Sequence[bytes]) -> PageTokens:
        """With the configured keys; without any (a keys file from before them), with a
        random key of this process, which no other server or restart accepts."""
        if keys:
            return cls(keys)
        logger.warning(
            "No page_token_keys in the keys: ListOrders page tokens are signed with a key of "
            "this process only, so another server or a restart refuses them (INVALID_ARGUMENT). "
            "Add one with `python -m infra.keys rotate FILE` (docs/decisions/0021)."
        )
        return cls([new_key()])

    def _mac(self, key: bytes, body: bytes) -> bytes:
        return hmac.digest(key, _MAC_CONTEXT + body, "sha256")

    def encode(self, token: PageToken) -> str:
        """base64url(body).base64url(HMAC): opaque to clients, ASCII, URL-safe."""
        return self.sign(token.body())

    def sign(self, body: bytes) -> str:
        """Any body, signed with the newest key (`encode` signs a token's)."""
        return f"{_b64(body)}.{_b64(self._mac(self._keys[0], body))}"

    def decode(self, text: str) -> PageToken:
        """The token's content; ValueError for anything this service did not sign.

        The size and the alphabet are checked first, then the MAC, and only
        then is the body parsed: nothing a client made up reaches the JSON parser.
        """
        if len(text) > MAX_PAGE_TOKEN_CHARS:
            raise ValueError("page token too long")
        match = _SIGNED_TOKEN.fullmatch(text)
        if match is None:
            raise ValueError("not a page token")
        try:
            body, mac = _unb64(match["body"]), _unb64(match["mac"])
        except (binascii.Error, ValueError) as err:  # e.g. a body of 4n+1 characters
            raise ValueError("not a page token") from err
        if not any(hmac.compare_digest(mac, self._mac(key, body)) for key in self._keys):
            raise ValueError("page token not signed by this service")
        return PageToken.from_body(body)


@dataclass(frozen=True)
class ListRequest:
    """A validated ListOrders request."""

    filter: ListFilter
    page_size: int
    page_token: PageToken | None = None


# --- What visibility gives back -------------------------------------------------------


class Run(NamedTuple):
    """One run of an order's workflow. Visibility keeps a row per run; the order is the
    run started last (a reset or continue-as-new starts a new one)."""

    workflow_id: str
    run_id: str
    started_at: datetime


@dataclass(frozen=True)
class ListedOrder:
    """One order as visibility knows it: one run's row."""

    workflow_id: str
    order_id: str
    customer_id: str
    status: models.OrderStatus
    total_amount: Money
    created_at: datetime
    run_id: str = ""
    started_at: datetime = _MIN_TIME

    @property
    def key(self) -> Key:
        return (self.created_at, self.workflow_id)

    @property
    def run(self) -> Run:
        return Run(self.workflow_id, self.run_id, self.started_at)

    def to_proto(self) -> pb.OrderSummary:
        return pb.OrderSummary(
            order_id=self.order_id,
            workflow_id=self.workflow_id,
            customer_id=self.customer_id,
            status=convert.status_to_proto(self.status),
            total_amount=convert.money_to_proto(self.total_amount),
            created_at=convert.timestamp_from_datetime(self.created_at),
        )


@dataclass(frozen=True)
class Page:
    orders: list[ListedOrder]
    next_page_token: PageToken | None


async def listed_order(execution: WorkflowExecution) -> ListedOrder | None:
    """The order a visibility row describes; None if the row lacks what a listing needs.

    Such rows are workflows started by hand (CLI, tests) rather than by
    CreateOrder: skipped, never a reason to fail the whole listing.
    """
    attributes = execution.typed_search_attributes
    # Visibility holds the customer id's hash; the id is in the memo, or, for orders
    # started before the hash, in the search attribute itself.
    customer_id = attributes.get(search_attributes.ORDER_CUSTOMER_ID)
    status = _status(attributes.get(search_attributes.ORDER_STATUS))
    created_at = attributes.get(search_attributes.ORDER_CREATED_AT)
    if (
        not execution.id.startswith(WORKFLOW_ID_PREFIX)
        or customer_id is None
        or status is None
        or created_at is None
    ):
        logger.debug("Skipping workflow %s: not an order's search attributes", execution.id)
        return None
    try:
        total = await execution.memo_value(search_attributes.MEMO_TOTAL_AMOUNT, type_hint=Money)
    except Exception as err:  # absent or undecodable: one odd row must not fail the page
        logger.debug("Skipping workflow %s: no order total in its memo (%s)", execution.id, err)
        return None
    try:
        customer_id = await execution.memo_value(
            search_attributes.MEMO_CUSTOMER_ID, customer_id, type_hint=str
        )
    except Exception as err:  # undecodable: skipped like any other odd row
        logger.debug("Skipping workflow %s: undecodable customer id (%s)", execution.id, err)
        return None
    return ListedOrder(
        workflow_id=execution.id,
        order_id=execution.id.removeprefix(WORKFLOW_ID_PREFIX),
        customer_id=customer_id,
        status=status,
        total_amount=total,
        created_at=_aware(created_at),
        run_id=execution.run_id,
        started_at=_aware(execution.start_time),
    )


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _status(text: str | None) -> models.OrderStatus | None:
    try:
        return models.OrderStatus(text) if text is not None else None
    except ValueError:
        return None


# --- The visibility query ------------------------------------------------------------------


def quote(value: str) -> str:
    """A string literal of Temporal's visibility query language holding exactly `value`.

    The language is parsed as MySQL: a backslash escapes the next character
    and a quote is doubled. Doubling quotes (rather than `\\'`) stays safe
    even for a parser that took backslashes literally.
    """
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _datetime_literal(moment: datetime) -> str:
    return quote(moment.astimezone(UTC).isoformat(timespec="microseconds"))


def _floor_ms(moment: datetime) -> datetime:
    return moment - timedelta(microseconds=moment.microsecond % 1000)


def after_bound(lower: datetime) -> datetime | None:
    """An instant such that `OrderCreatedAt > instant` holds for every order created at
    or after `lower` (and for some up to 1.5 ms before it).

    It sits 500 µs into the millisecond before `lower`'s: on the dev server's
    SQLite that admits exactly the stored milliseconds from `lower`'s on (and
    its trimmed query form keeps the sub-millisecond digit that makes text
    comparison right); elsewhere it is a little early. None when not
    representable (near year 1): no bound is needed there.
    """
    try:
        return _floor_ms(lower) - _MILLISECOND + _HALF_MILLISECOND
    except OverflowError:
        return None


def until_bound(upper: datetime) -> datetime | None:
    """An instant such that `OrderCreatedAt < instant` holds for every order created at
    or before `upper` (and for some up to 1.5 ms after it).

    The mirror of after_bound, 500 µs into the millisecond after `upper`'s,
    which also covers SQLite rounding to the nearest millisecond.
    """
    try:
        return _floor_ms(upper) + _MILLISECOND + _HALF_MILLISECOND
    except OverflowError:
        return None


def visibility_query(
    list_filter: ListFilter,
    *,
    customer_id_key: bytes,
    lower: datetime | None = None,
    upper: datetime | None = None,
) -> str:
    """The visibility query for the orders matching the filters with lower <= created_at <= upper.

    Only this service's workflows (WorkflowType), and a superset of the
    answer: see the module docstring. A customer is looked for by its hash
    (search_attributes.customer_key) and, for orders started before the hash,
    by its id.
    """
    conditions = [f"WorkflowType = {quote(models.WORKFLOW_NAME)}"]
    if customer_id := list_filter.customer_id:
        hashed = search_attributes.customer_key(customer_id_key, customer_id)
        conditions.append(
            f"{search_attributes.ORDER_CUSTOMER_ID.name} IN ({quote(hashed)}, {quote(customer_id)})"
        )
    if list_filter.status is not None:
        conditions.append(
            f"{search_attributes.ORDER_STATUS.name} = {quote(list_filter.status.value)}"
        )
    created_at = search_attributes.ORDER_CREATED_AT.name
    if lower is not None and (bound := after_bound(lower)) is not None:
        conditions.append(f"{created_at} > {_datetime_literal(bound)}")
    if upper is not None and (bound := until_bound(upper)) is not None:
        conditions.append(f"{created_at} < {_datetime_literal(bound)}")
    return " AND ".join(conditions)


def other_runs_query(runs: Sequence[Run]) -> str:
    """The visibility query for every run of these runs' workflows but these runs."""
    workflow_ids = ", ".join(quote(w) for w in sorted({run.workflow_id for run in runs}))
    run_ids = ", ".join(quote(run.run_id) for run in runs)
    return (
        f"WorkflowType = {quote(models.WORKFLOW_NAME)}"
        f" AND WorkflowId IN ({workflow_ids}) AND RunId NOT IN ({run_ids})"
    )


# --- Reading visibility ---------------------------------------------------------------------


class TemporalVisibility:
    """Where the lister reads orders: list and count calls on visibility, nothing per order.

    Unit tests stand in for it with a model of the store.
    """

    def __init__(self, client: Client, *, customer_id_key: bytes) -> None:
        self._client = client
        self._customer_id_key = customer_id_key

    async def read(
        self,
        list_filter: ListFilter,
        lower: datetime,
        upper: datetime | None,
        limit: int | None,
        rpc_timeout: timedelta,
    ) -> list[ListedOrder] | None:
        """At least every order matching the filters with lower <= created_at <= upper;
        None as soon as that is more than `limit` rows (None: no limit)."""
        query = visibility_query(
            list_filter, customer_id_key=self._customer_id_key, lower=lower, upper=upper
        )
        orders = []
        rows = 0
        # The iterator fetches a visibility page at a time: leaving early stops it.
        async for execution in self._client.list_workflows(
            query, page_size=VISIBILITY_PAGE_SIZE, rpc_timeout=rpc_timeout
        ):
            rows += 1
            if limit is not None and rows > limit:
                return None
            order = await listed_order(execution)
            if order is not None:
                orders.append(order)
        return orders

    async def any_before(
        self, list_filter: ListFilter, before: datetime, rpc_timeout: timedelta
    ) -> bool:
        """False only if no order matching the filters was created before `before`."""
        query = visibility_query(
            list_filter,
            customer_id_key=self._customer_id_key,
            lower=list_filter.created_after,
            upper=before,
        )
        counted = await self._client.count_workflows(query, rpc_timeout=rpc_timeout)
        return counted.count > 0

    async def other_runs(self, runs: Sequence[Run], rpc_timeout: timedelta) -> list[Run]:
        """Every other run of these runs' workflows, whatever its search attributes."""
        found = []
        # Bounded queries: about 70 characters a run.
        for start in range(0, len(runs), VISIBILITY_PAGE_SIZE):
            query = other_runs_query(runs[start : start + VISIBILITY_PAGE_SIZE])
            async for execution in self._client.list_workflows(
                query, page_size=VISIBILITY_PAGE_SIZE, rpc_timeout=rpc_timeout
            ):
                found.append(Run(execution.id, execution.run_id, _aware(execution.start_time)))
        return found


# --- Paging ------------------------------------------------------------------------------------


class OrderLister:
    """Pages of orders, newest first: the windows of docs/decisions/0007."""

    def __init__(
        self,
        source: TemporalVisibility,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._source = source
        self._now = now

    async def list_page(self, request: ListRequest, *, rpc_timeout: timedelta) -> Page:
        list_filter = request.filter
        if not list_filter.can_match:
            return Page([], None)
        token = request.page_token
        # Everything returned lies strictly below `ceiling` (None: no ceiling).
        ceiling: Key | None = token.key if token else None
        if ceiling is None and list_filter.created_before is not None:
            ceiling = (list_filter.created_before, "")
        floor = list_filter.created_after or _MIN_TIME
        window = token.window if token else INITIAL_WINDOW
        top = ceiling[0] if ceiling else self._now()
        limit = read_limit(request.page_size)
        found: dict[str, ListedOrder] = {}
        while True:
            lower = max(_subtract(top, window), floor)
            orders = await self._source.read(
                list_filter,
                lower,
                ceiling[0] if ceiling else None,
                limit if window > MIN_WINDOW else None,
                rpc_timeout,
            )
            if orders is None:
                # Denser than guessed: the newest part of the window only.
                window = max(window / WINDOW_FACTOR, MIN_WINDOW)
                continue
            # Each order belongs to exactly one window; the source may return more.
            candidates = [
                order
                for order in orders
                if order.created_at >= lower
                and (ceiling is None or order.key < ceiling)
                and list_filter.matches(order)
            ]
            for order in await self._current(candidates, rpc_timeout):
                found[order.workflow_id] = order
            if len(found) > request.page_size or lower <= floor:
                break
            if not await self._source.any_before(list_filter, lower, rpc_timeout):
                break
            ceiling, top, window = (lower, ""), lower, window * WINDOW_FACTOR
        return self._page(list_filter, sorted(found.values(), key=_key, reverse=True), request)

    async def _current(
        self, candidates: list[ListedOrder], rpc_timeout: timedelta
    ) -> list[ListedOrder]:
        """The candidates that are their workflow's current run: none of its runs, in this
        window or anywhere else, started later. Filters then apply to the current run only."""
        if not candidates:
            return []
        runs = [order.run for order in candidates]
        latest: dict[str, Run] = {}
        for run in runs + await self._source.other_runs(runs, rpc_timeout):
            best = latest.get(run.workflow_id)
            if best is None or (run.started_at, run.run_id) > (best.started_at, best.run_id):
                latest[run.workflow_id] = run
        return [order for order in candidates if latest[order.workflow_id] == order.run]

    @staticmethod
    def _page(
        list_filter: ListFilter, ordered: Sequence[ListedOrder], request: ListRequest
    ) -> Page:
        size = request.page_size
        if len(ordered) <= size:
            return Page(list(ordered), None)
        page = list(ordered[:size])
        # The span of page_size + 1 orders, doubled: the next page's likely window.
        span = page[0].created_at - ordered[size].created_at
        window = min(max(span * 2, MIN_WINDOW), MAX_WINDOW)
        last = page[-1]
        return Page(
            page, PageToken(last.created_at, last.workflow_id, list_filter.digest(), window)
        )


def _key(order: ListedOrder) -> Key:
    return order.key


def _subtract(moment: datetime, span: timedelta) -> datetime:
    try:
        return moment - span
    except OverflowError:
        return _MIN_TIME
