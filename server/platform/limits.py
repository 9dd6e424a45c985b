"""Limits that hold: calls in progress per class of service, caller rates, ListOrders per caller.

One interceptor, after the token check so it knows the caller; the settings and
their tuning: docs/security.md#limits, the design: docs/decisions/0022.
"""

from __future__ import annotations

import inspect
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from pydantic import BeforeValidator
from pydantic_settings import NoDecode

from infra.settings import Duration, Options, setting
from server.api import access, errors
from server.platform.request_path import HandlerWrapper, behavior_of, handler_of_the_same_kind
from server.platform.slow_readers import SlowReaders, TimedWrites, message_size
from server.platform.tokens import ORDER_METHODS, ROLES

_Context = grpc.aio.ServicerContext[Any, Any]

# The rate classes: the roles of the tokens file, an end user's JWT, any other caller.
CUSTOMER = "customer"
DEFAULT = "default"
RATE_CLASSES = (*ROLES, CUSTOMER, DEFAULT)
DEFAULT_RATES = (
    "storefront=200/400,payment-gateway=100/200,operator=100/200,admin=100/200,"
    "customer=10/20,default=50/100"
)
LIST_ORDERS = ORDER_METHODS["ListOrders"]
# What a refused caller is told to wait when no clock says better: calls in progress end soon.
BUSY_RETRY = timedelta(seconds=1)
# Past the classes' caps, grpc's own cap refuses before any interceptor: room for
# the calls being refused or ending, so that it never bites first.
GRPC_CAP_MARGIN = 1_000
# Token buckets kept; the least recently used goes first (a full bucket is a new one).
MAX_BUCKETS = 100_000


@dataclass(frozen=True)
class Rate:
    """A token bucket's refill per second and its size."""

    per_second: float
    burst: int

    def __str__(self) -> str:
        return f"{self.per_second:g}/{self.burst}"


def parse_rates(value: object) -> object:
    """The default rates, those named in "storefront=200/400,customer=off" replaced."""
    if not isinstance(value, str):
        return value
    return _rate_table(DEFAULT_RATES) | _rate_table(value)


def _rate_table(value: str) -> dict[str, Rate | None]:
    """{"storefront": Rate(200, 400), "customer": None} from "storefront=200/400,customer=off"."""
    table: dict[str, Rate | None] = {}
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        name, _, spec = (s.strip() for s in part.partition("="))
        if name not in RATE_CLASSES:
            raise ValueError(f"unknown rate class {name!r}; classes are {', '.join(RATE_CLASSES)}")
        if spec == "off":
            table[name] = None
            continue
        rate_text, _, burst_text = spec.partition("/")
        try:
            rate = float(rate_text)
            burst = int(burst_text) if burst_text else max(1, math.ceil(rate))
        except ValueError:
            raise ValueError(
                f"{part!r}: write <class>=<per second>/<burst> or <class>=off"
            ) from None
        if not (math.isfinite(rate) and rate > 0 and burst >= 1):
            raise ValueError(f"{part!r}: the rate must be above 0 and the burst at least 1")
        table[name] = Rate(rate, burst)
    return table


RateTable = Annotated[dict[str, Rate | None], NoDecode, BeforeValidator(parse_rates)]


class LimitSettings(Options):
    """Limits: calls in progress, rates per caller, clients that do not read."""

    max_concurrent_rpcs: int = setting(
        10_000,
        "ORDER_MAX_CONCURRENT_RPCS",
        "OrderService calls in progress at once, WatchOrder streams included; "
        "beyond it RESOURCE_EXHAUSTED",
        ge=1,
    )
    open_max_concurrent_rpcs: int = setting(
        100,
        "ORDER_OPEN_MAX_CONCURRENT_RPCS",
        "health and reflection calls (open, no token) in progress at once, counted apart: "
        "this many streams (Health/Watch, reflection) and this many Health/Check",
        ge=1,
    )
    rate_limits: RateTable = setting(
        DEFAULT_RATES,
        "ORDER_RATE_LIMITS",
        "each caller's calls per second and burst, by role: ROLE=RATE/BURST or "
        "ROLE=off, those not named keep their defaults; customer: an end user's JWT, "
        "default: any other caller; callers without credentials are not limited",
        shown=DEFAULT_RATES,
        validate_default=True,
    )
    list_orders_per_caller: int = setting(
        2,
        "ORDER_LIST_ORDERS_PER_CALLER",
        "ListOrders calls one caller may have in progress at once; beyond it RESOURCE_EXHAUSTED",
        ge=1,
    )
    write_timeout: Duration = setting(
        timedelta(seconds=30),
        "ORDER_WRITE_TIMEOUT",
        "disconnect a client whose response has waited this long to be sent (it does not read)",
    )
    max_unsent_bytes: int = setting(
        16 * 1024 * 1024,
        "ORDER_MAX_UNSENT_BYTES",
        "disconnect a client once this many bytes of responses wait to be sent to it",
        ge=1,
    )

    @property
    def grpc_max_concurrent_rpcs(self) -> int:
        """grpc's own cap: a backstop above the classes' caps, never the one that refuses."""
        return self.max_concurrent_rpcs + 2 * self.open_max_concurrent_rpcs + GRPC_CAP_MARGIN


class TooManyCalls(errors.ServiceError):
    """RESOURCE_EXHAUSTED: a limit refused the call; RetryInfo says when to try again."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, reason: str, subject: str, description: str, retry_delay: timedelta) -> None:
        self.reason = reason
        self.subject = subject
        self.description = description
        self.retry_delay = retry_delay
        millis = max(1, math.ceil(retry_delay / timedelta(milliseconds=1)))
        super().__init__(
            f"{description} Retry in {millis} ms.",
            metadata={"subject": subject, "retryDelayMs": str(millis)},
        )

    def details(self) -> Sequence[Message]:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromTimedelta(self.retry_delay)
        quota = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(
                    subject=self.subject, description=self.description
                )
            ]
        )
        return [retry, quota]


class TokenBuckets:
    """A token bucket per key, the least recently used forgotten beyond `max_keys`."""

    def __init__(
        self, *, max_keys: int = MAX_BUCKETS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max_keys = max_keys
        self._clock = clock
        # key -> [tokens, when last refilled]
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, rate: Rate) -> float:
        """Takes a token: 0.0 if there was one, else the seconds until there is."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [float(rate.burst), now]
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(float(rate.burst), bucket[0] + (now - bucket[1]) * rate.per_second)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / rate.per_second


@dataclass
class _Class:
    """A class of calls counted together against one cap."""

    name: str
    cap: int
    in_progress: int = 0


def rate_class(principal: access.Principal) -> str:
    """The caller's rate class: customer for a JWT, else its role, else default."""
    if principal.customer_id is not None:
        return CUSTOMER
    if principal.role is not None and principal.role in ROLES:
        return principal.role
    return DEFAULT


class Limits(HandlerWrapper):
    """Caps calls in progress per class of service, each caller's rate and its ListOrders
    in progress; with `readers`, times every response until grpc has sent it."""

    def __init__(
        self,
        settings: LimitSettings,
        *,
        open_services: Iterable[str],
        readers: SlowReaders | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._open_prefixes = tuple(f"/{name}/" for name in open_services)
        self._service = _Class("OrderService calls", settings.max_concurrent_rpcs)
        self._open_streams = _Class("open streams", settings.open_max_concurrent_rpcs)
        self._open_unary = _Class("open calls", settings.open_max_concurrent_rpcs)
        self._rates = settings.rate_limits
        self._buckets = TokenBuckets(clock=clock)
        self._list_cap = settings.list_orders_per_caller
        self._listing: dict[str, int] = {}
        self._readers = readers

    def wrap(self, method: str, handler: Any) -> Any:
        streaming = handler.request_streaming or handler.response_streaming
        is_open = method.startswith(self._open_prefixes)
        if is_open:
            calls = self._open_streams if streaming else self._open_unary
        else:
            calls = self._service
        behavior = behavior_of(handler)
        admitted = self._admitted
        readers = self._readers
        listing = method == LIST_ORDERS

        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: _Context) -> AsyncIterator[Any]:
                with admitted(calls, is_open, listing):
                    peer = context.peer() if readers is not None else ""
                    async for response in behavior(request, context):
                        if readers is None:
                            yield response
                            continue
                        # The request path writes it while this generator waits at the yield.
                        ticket = readers.waiting(peer, message_size(response))
                        try:
                            yield response
                        finally:
                            readers.sent(ticket)

            wrapped: Callable[..., Any] = stream
        elif inspect.iscoroutinefunction(behavior):

            async def call(request: Any, context: _Context) -> Any:
                with admitted(calls, is_open, listing):
                    if readers is not None and handler.response_streaming:
                        return await behavior(request, TimedWrites(context, readers))
                    response = await behavior(request, context)
                if readers is not None and not handler.response_streaming:
                    readers.watch_unary(context, message_size(response))
                return response

            wrapped = call
        else:  # a synchronous handler: not ours to wrap
            return handler
        return handler_of_the_same_kind(handler, wrapped, handler.request_deserializer)

    @contextmanager
    def _admitted(self, calls: _Class, is_open: bool, listing: bool) -> Iterator[None]:
        """Counts the call in while it runs, or raises TooManyCalls."""
        caller: str | None = None
        if not is_open:
            principal = access.current()
            if principal is not access.ANONYMOUS:
                caller = principal.name
                self._check_rate(principal)
        if calls.in_progress >= calls.cap:
            raise TooManyCalls(
                "TOO_MANY_CALLS_IN_PROGRESS",
                "server",
                f"This server already has {calls.cap} {calls.name} in progress, its limit.",
                BUSY_RETRY,
            )
        if listing and caller is not None:
            if self._listing.get(caller, 0) >= self._list_cap:
                raise TooManyCalls(
                    "TOO_MANY_LIST_ORDERS",
                    f"caller:{caller}",
                    f"Caller {caller} already has {self._list_cap} ListOrders calls in "
                    "progress, its limit.",
                    BUSY_RETRY,
                )
            self._listing[caller] = self._listing.get(caller, 0) + 1
        calls.in_progress += 1
        try:
            yield
        finally:
            calls.in_progress -= 1
            if listing and caller is not None:
                left = self._listing[caller] - 1
                if left:
                    self._listing[caller] = left
                else:
                    del self._listing[caller]

    def _check_rate(self, principal: access.Principal) -> None:
        kind = rate_class(principal)
        rate = self._rates.get(kind, self._rates.get(DEFAULT))
        if rate is None:
            return
        wait = self._buckets.take(principal.name, rate)
        if wait > 0:
            raise TooManyCalls(
                "RATE_LIMITED",
                f"caller:{principal.name}",
                f"Caller {principal.name} ({kind}) is over its rate of "
                f"{rate.per_second:g} calls per second (burst {rate.burst}).",
                timedelta(seconds=wait),
            )
