"""How much the gRPC front costs next to Temporal: `make bench` (`make bench ARGS=--quick`).

One run starts its own processes, as `make run` does (one OS process each,
through tests/support/cluster.py): a Temporal dev server with the Makefile's
tuning (TEMPORAL_TUNING, which `make bench` passes as --temporal-tuning), a
worker with zero simulated delays and a gRPC server. It then
measures, interleaved (raw, gRPC, raw, gRPC) and at the same concurrency,
each RPC against the Temporal calls the servicer makes for it, made straight
through the `temporalio` client with the same inputs:

- CreateOrder        vs start_workflow (input from validation.validate_create_order);
- GetOrder           vs the get_full_state query, on the same (cache-hot) orders;
- ConfirmPayment     vs the get_full_state query, then the confirm_payment signal,
                     as the servicer makes them (decision 0009);
- CancelOrder        vs the query, then the cancel_order signal;
- whole orders       create, pay, wait for delivery (WatchOrder on the gRPC side,
                     the workflow's result on the raw side), zero simulated delays.

It also measures the gRPC server's CPU per RPC (utime + stime from
/proc/<pid>/stat over each gRPC round), whole orders per second on a plain
`temporal server start-dev --db-filename` with an untuned worker against
the tuned default (both up at once, loaded in turn), and GetOrder on orders
parked waiting for payment, 100 on one worker and 10,000 on another, read in
turn; the second worker's memory (VmRSS) is read before and after parking.

Writes docs/performance/results.md and chart.png, and prints the results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import temporalio
import temporalio.api.enums.v1 as enums
from grpc_health.v1 import health_pb2, health_pb2_grpc
from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from infra.process_exit import exit_without_finalization
from server.api import validation
from tests.support.cluster import SERVICE_NAME, Cluster, Simulation, WorkerProcess, kill_strays
from tests.support.env import ROOT, venv_binary
from tests.support.orders import create_request, payment_request
from tests.support.stack import Stack
from tests.support.stats import percentile
from workflows import models

OUT_DIR = ROOT / "docs" / "performance"

# The servicer's cap on each Temporal call (ServerSettings.temporal_rpc_timeout).
RPC_TIMEOUT = timedelta(seconds=10)
ZERO_DELAYS = Simulation(inventory=0, payment=0, prepare=0, ship=0, deliver=0, email=0)
CANCEL_REASON = "Benchmark cancel"

# The worker settings of the "plain" side: temporalio's own defaults.
PLAIN_WORKER_ENV = {
    "ORDER_WORKER_MAX_CACHED_WORKFLOWS": "1000",
    "ORDER_WORKER_MAX_CONCURRENT_WORKFLOW_TASKS": "100",
    "ORDER_WORKER_MAX_CONCURRENT_ACTIVITIES": "100",
    "ORDER_WORKER_WORKFLOW_TASK_POLLERS": "5",
    "ORDER_WORKER_ACTIVITY_TASK_POLLERS": "5",
}


# --- Sizes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How much each phase does, per round (one raw or one gRPC round)."""

    rounds: int  # per side: raw, gRPC, raw, gRPC ... (2 rounds = 4 runs)
    create: int
    get: int
    pay: int
    cancel: int
    whole: int
    devserver_rounds: int
    devserver_seconds: float
    devserver_warm_up: float
    parked_small: int
    parked_large: int
    parked_reads: int


FULL = Sizes(
    rounds=4,
    create=250,
    get=1200,
    pay=100,
    cancel=100,
    whole=80,
    devserver_rounds=2,
    devserver_seconds=15,
    devserver_warm_up=8,
    parked_small=100,
    parked_large=10_000,
    parked_reads=3000,
)
QUICK = Sizes(
    rounds=2,
    create=120,
    get=400,
    pay=60,
    cancel=60,
    whole=60,
    devserver_rounds=2,
    devserver_seconds=10,
    devserver_warm_up=8,
    parked_small=100,
    parked_large=1000,
    parked_reads=400,
)


# --- Measuring -----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds, from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # After "pid (comm) ": state is field 3, so utime (14) and stime (15) are at 11 and 12.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Run:
    """One round of one side: calls, their latencies, the wall time, the server's CPU."""

    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0
    server_cpu: float = 0.0
    # CPU cores used during the run: Temporal, worker, gRPC server, this driver.
    cores: list[float] = field(default_factory=list)

    def summary(self, unit: str = "/s") -> str:
        """Calls per second, p50 and p99, the cores used and the first error, for the log."""
        return (
            f"{len(self.latencies) / self.wall:7.1f}{unit}"
            f"  p50 {ms(percentile(self.latencies, 0.5))} ms"
            f"  p99 {ms(percentile(self.latencies, 0.99))} ms"
            + ("  cores " + "/".join(f"{c:.2f}" for c in self.cores) if self.cores else "")
            + (f"  ERRORS {len(self.errors)}: {self.errors[0]}" if self.errors else "")
        )


@dataclass
class Side:
    """Every round of one side (raw or gRPC) of one comparison."""

    runs: list[Run] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return sum(len(r.latencies) for r in self.runs)

    @property
    def throughput(self) -> float:
        wall = sum(r.wall for r in self.runs)
        return self.calls / wall if wall else float("nan")

    @property
    def latencies(self) -> list[float]:
        return [lat for r in self.runs for lat in r.latencies]

    @property
    def errors(self) -> list[str]:
        return [e for r in self.runs for e in r.errors]

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)

    @property
    def cpu_per_call(self) -> float:
        return sum(r.server_cpu for r in self.runs) / self.calls if self.calls else float("nan")


@dataclass
class Comparison:
    name: str
    raw_calls: str
    goal: float
    raw: Side = field(default_factory=Side)
    grpc: Side = field(default_factory=Side)

    @property
    def ratio(self) -> float:
        return self.grpc.throughput / self.raw.throughput

    @property
    def met(self) -> bool:
        return self.ratio >= self.goal

    @property
    def round_ratios(self) -> list[float]:
        """gRPC / raw throughput of each round pair (raw round n, gRPC round n)."""
        return [
            (len(g.latencies) / g.wall) / (len(r.latencies) / r.wall)
            for r, g in zip(self.raw.runs, self.grpc.runs, strict=True)
        ]


async def run_calls(
    count: int,
    concurrency: int,
    call: Callable[[int], Awaitable[object]],
    *,
    server_pid: int | None = None,
) -> Run:
    """`count` calls, `concurrency` callers at a time, each timed."""
    run = Run()
    indexes = iter(range(count))

    async def caller() -> None:
        for i in indexes:
            started = time.perf_counter()
            try:
                await call(i)
            except Exception as err:
                run.errors.append(f"{type(err).__name__}: {err}"[:300])
                continue
            run.latencies.append(time.perf_counter() - started)

    cpu_before = cpu_seconds(server_pid) if server_pid else 0.0
    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    run.wall = time.perf_counter() - started
    if server_pid:
        run.server_cpu = cpu_seconds(server_pid) - cpu_before
    return run


async def run_for(
    seconds: float,
    concurrency: int,
    call: Callable[[int], Awaitable[object]],
    *,
    warm_up: float,
) -> Run:
    """`concurrency` callers calling for `warm_up` + `seconds`; only the last `seconds` count.

    For a side too slow for a fixed count of calls: its throughput is the calls
    completed within the window, divided by the window, once `warm_up` (longer
    than a call) has filled the pipeline, so that a slower side is not also
    charged for a longer ramp. Calls running at the window's end finish (within
    a minute) uncounted: no order is left half-way to load what comes next.
    """
    run = Run()
    counter = iter(range(1 << 62))
    began = time.perf_counter()
    window = (began + warm_up, began + warm_up + seconds)
    stopped = False

    async def caller() -> None:
        for i in counter:
            started = time.perf_counter()
            try:
                await call(i)
            except Exception as err:
                # temporalio turns some cancellations into errors of its own.
                if not stopped and time.perf_counter() >= window[0]:
                    run.errors.append(f"{type(err).__name__}: {err}"[:300])
                if stopped:
                    return
                continue
            finished = time.perf_counter()
            if window[0] <= finished <= window[1]:
                run.latencies.append(finished - started)
            if stopped:
                return

    tasks = [asyncio.create_task(caller()) for _ in range(concurrency)]
    await asyncio.sleep(warm_up + seconds)
    stopped = True
    await asyncio.wait(tasks, timeout=60)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    run.wall = seconds
    return run


async def quiesce(pids: Sequence[int], *, idle_cores: float = 0.15, limit: float = 20.0) -> None:
    """Waits until the processes use less than `idle_cores` CPU together (at most `limit` s).

    Work a round left behind (workflows moving on after the calls returned)
    then does not fall on the next round.
    """
    deadline = time.monotonic() + limit
    window = 0.5
    while time.monotonic() < deadline:
        before = sum(cpu_seconds(p) for p in pids)
        await asyncio.sleep(window)
        if (sum(cpu_seconds(p) for p in pids) - before) / window < idle_cores:
            return


# --- The processes -------------------------------------------------------------------------------


@dataclass
class Processes:
    """A dev server, a worker and a gRPC server as processes (a Cluster), and a Stack on them."""

    cluster: Cluster
    stack: Stack

    @property
    def server_pid(self) -> int:
        return self.cluster.servers[0].process.pid

    @property
    def temporal_pid(self) -> int:
        assert self.cluster.temporal is not None
        return self.cluster.temporal.process.pid

    async def quiesce(self) -> None:
        await quiesce(self.cluster.pids)


async def start_processes(
    root: Path, name: str, *, tuning: Sequence[str], worker_env: Mapping[str, str]
) -> Processes:
    """As `make run` starts them, the dev server with `tuning`; the worker with zero delays."""
    cluster = Cluster(root / name, ZERO_DELAYS, ledger_effects=False)
    cluster.root.mkdir(parents=True, exist_ok=True)
    await cluster.start_temporal(name=f"temporal-{name}", flags=tuning, log_level="error")
    await cluster.start_worker(env=worker_env, name=f"worker-{name}")
    await cluster.start_server(name=f"server-{name}")
    return Processes(cluster, await cluster.stack())


# --- The calls, both ways ------------------------------------------------------------------------


def payment(order_id: str) -> pb.ConfirmPaymentRequest:
    return payment_request(order_id, f"TXN-{order_id}")


def cancellation(order_id: str) -> pb.CancelOrderRequest:
    return pb.CancelOrderRequest(order_id=order_id, reason=CANCEL_REASON)


class Raw:
    """The Temporal calls the servicer makes, made directly with the temporalio client."""

    def __init__(self, client: Client, task_queue: str) -> None:
        self.client = client
        self.task_queue = task_queue

    def handle(self, order_id: str) -> WorkflowHandle[Any, Any]:
        return self.client.get_workflow_handle(models.workflow_id_for(order_id))

    async def start(self, order: models.OrderInput) -> WorkflowHandle[Any, Any]:
        return await self.client.start_workflow(
            models.WORKFLOW_NAME,
            order,
            id=models.workflow_id_for(order.order_id),
            task_queue=self.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            rpc_timeout=RPC_TIMEOUT,
        )

    async def get(self, order_id: str) -> models.OrderState:
        state: models.OrderState = await self.handle(order_id).query(
            models.GET_FULL_STATE_QUERY, result_type=models.OrderState, rpc_timeout=RPC_TIMEOUT
        )
        return state

    async def pay(self, request: pb.ConfirmPaymentRequest) -> None:
        order_id, payment = validation.validate_confirm_payment(request)
        await self._query_then_signal(order_id, models.CONFIRM_PAYMENT_SIGNAL, payment)

    async def cancel(self, request: pb.CancelOrderRequest) -> None:
        order_id, cancel = validation.validate_cancel_order(request)
        await self._query_then_signal(order_id, models.CANCEL_ORDER_SIGNAL, cancel)

    async def _query_then_signal(self, order_id: str, signal: str, arg: object) -> None:
        """The servicer's writes: the query its precheck needs, then the signal (0009)."""
        await self.get(order_id)
        await self.handle(order_id).signal(signal, arg, rpc_timeout=RPC_TIMEOUT)


def order_input(request: pb.CreateOrderRequest) -> models.OrderInput:
    """The workflow input exactly as the server builds it (its default payment timeout)."""
    return validation.validate_create_order(request)


async def whole_order_grpc(stub: pb_grpc.OrderServiceAsyncStub) -> None:
    created = await stub.CreateOrder(create_request())
    await stub.ConfirmPayment(payment(created.order_id))
    last = None
    async for order in stub.WatchOrder(pb.WatchOrderRequest(order_id=created.order_id)):
        last = order.status
    if last != pb.ORDER_STATUS_DELIVERED:
        raise RuntimeError(f"order {created.order_id} ended {last}")


async def whole_order_raw(raw: Raw) -> None:
    order = order_input(create_request())
    handle = await raw.start(order)
    await raw.pay(payment(order.order_id))
    state = await raw.client.get_workflow_handle(handle.id, result_type=models.OrderState).result()
    if state.status != models.OrderStatus.DELIVERED:
        raise RuntimeError(f"order {order.order_id} ended {state.status}")


# --- The phases ----------------------------------------------------------------------------------


@dataclass
class Bench:
    processes: Processes
    raw: Raw
    sizes: Sizes
    concurrency: int
    log: Callable[[str], None]
    # Orders created and waiting for payment, for the reads and the writes.
    pending: list[str] = field(default_factory=list)

    async def interleave(
        self,
        comparison: Comparison,
        count: int,
        raw_call: Callable[[int, int], Awaitable[object]],
        grpc_call: Callable[[int, int], Awaitable[object]],
    ) -> Comparison:
        """raw, gRPC, raw, gRPC ...: `count` calls each; the call gets (round, index)."""
        pids = [*self.processes.cluster.pids, os.getpid()]
        for round_ in range(self.sizes.rounds):
            for side, call in (("raw", raw_call), ("gRPC", grpc_call)):
                await self.processes.quiesce()
                cpu_before = [cpu_seconds(pid) for pid in pids]
                run = await run_calls(
                    count,
                    self.concurrency,
                    lambda i, r=round_, c=call: c(r, i),  # type: ignore[misc]
                    server_pid=self.processes.server_pid,
                )
                (comparison.raw if side == "raw" else comparison.grpc).runs.append(run)
                run.cores = [
                    (cpu_seconds(pid) - before) / run.wall
                    for pid, before in zip(pids, cpu_before, strict=True)
                ]
                self.log(f"  {comparison.name:<15} {side:<4} round {round_ + 1}: {run.summary()}")
        return comparison

    def take_pending(self, count: int) -> list[str]:
        if len(self.pending) < count:
            raise RuntimeError(f"need {count} pending orders, have {len(self.pending)}")
        taken, self.pending = self.pending[:count], self.pending[count:]
        return taken

    async def warm_up(self) -> None:
        stub, raw = self.processes.stack.stub, self.raw
        for _ in range(10):
            await whole_order_grpc(stub)
            await whole_order_raw(raw)
        created = await stub.CreateOrder(create_request())
        for _ in range(20):
            await stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))
            await raw.get(created.order_id)

    async def grpc_floor(self, count: int) -> Side:
        """Health/Check: what grpc.aio alone costs the server per unary RPC, no Temporal call."""
        health = health_pb2_grpc.HealthStub(self.processes.stack.channel)
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        await self.processes.quiesce()
        side = Side()
        side.runs.append(
            await run_calls(
                count,
                self.concurrency,
                lambda _i: health.Check(request),
                server_pid=self.processes.server_pid,
            )
        )
        return side

    async def create(self) -> Comparison:
        n = self.sizes.create
        inputs = [
            [order_input(create_request()) for _ in range(n)] for _ in range(self.sizes.rounds)
        ]
        requests = [create_request() for _ in range(n)]

        async def raw_call(r: int, i: int) -> None:
            order = inputs[r][i]
            await self.raw.start(order)
            self.pending.append(order.order_id)

        async def grpc_call(r: int, i: int) -> None:
            response = await self.processes.stack.stub.CreateOrder(requests[i])
            self.pending.append(response.order_id)

        comparison = Comparison("CreateOrder", "start_workflow", 0.95)
        return await self.interleave(comparison, n, raw_call, grpc_call)

    async def get(self) -> Comparison:
        n = self.sizes.get
        rng = random.Random(1)
        ids = [rng.choice(self.pending) for _ in range(n)]

        async def raw_call(r: int, i: int) -> None:
            await self.raw.get(ids[i])

        async def grpc_call(r: int, i: int) -> None:
            await self.processes.stack.stub.GetOrder(pb.GetOrderRequest(order_id=ids[i]))

        comparison = Comparison("GetOrder", "query get_full_state", 0.90)
        return await self.interleave(comparison, n, raw_call, grpc_call)

    async def pay(self) -> Comparison:
        stub = self.processes.stack.stub
        return await self.write(
            Comparison("ConfirmPayment", f"query + signal {models.CONFIRM_PAYMENT_SIGNAL}", 0.90),
            self.sizes.pay,
            lambda order_id: self.raw.pay(payment(order_id)),
            lambda order_id: stub.ConfirmPayment(payment(order_id)),
        )

    async def cancel(self) -> Comparison:
        stub = self.processes.stack.stub
        return await self.write(
            Comparison("CancelOrder", f"query + signal {models.CANCEL_ORDER_SIGNAL}", 0.90),
            self.sizes.cancel,
            lambda order_id: self.raw.cancel(cancellation(order_id)),
            lambda order_id: stub.CancelOrder(cancellation(order_id)),
        )

    async def write(
        self,
        comparison: Comparison,
        count: int,
        raw_call: Callable[[str], Awaitable[object]],
        grpc_call: Callable[[str], Awaitable[object]],
    ) -> Comparison:
        """A write to pending orders: `count` of them for each side of each round."""
        orders = {
            (r, side): self.take_pending(count) for r in range(self.sizes.rounds) for side in "rg"
        }
        return await self.interleave(
            comparison,
            count,
            lambda r, i: raw_call(orders[(r, "r")][i]),
            lambda r, i: grpc_call(orders[(r, "g")][i]),
        )

    async def whole(self) -> Comparison:
        async def raw_call(r: int, i: int) -> None:
            await whole_order_raw(self.raw)

        async def grpc_call(r: int, i: int) -> None:
            await whole_order_grpc(self.processes.stack.stub)

        comparison = Comparison("Whole orders", "start + pay + result", 0.90)
        return await self.interleave(comparison, self.sizes.whole, raw_call, grpc_call)


# --- Dev server: plain vs tuned ------------------------------------------------------------------


@dataclass
class DevServerResult:
    plain: Side
    tuned: Side
    plain_flags: list[str]
    tuned_flags: list[str]

    @property
    def ratio(self) -> float:
        return self.tuned.throughput / self.plain.throughput


async def devserver_comparison(
    tuned: Processes,
    plain: Processes,
    sizes: Sizes,
    concurrency: int,
    log: Callable[[str], None],
) -> tuple[Side, Side]:
    """Whole orders through gRPC, plain processes and tuned ones in turn."""
    plain_side, tuned_side = Side(), Side()
    for _ in range(5):
        await whole_order_grpc(plain.stack.stub)
    for round_ in range(sizes.devserver_rounds):
        for name, on, side in (("plain", plain, plain_side), ("tuned", tuned, tuned_side)):
            await plain.quiesce()
            await tuned.quiesce()
            run = await run_for(
                sizes.devserver_seconds,
                concurrency,
                lambda _i, s=on.stack: whole_order_grpc(s.stub),  # type: ignore[misc]
                warm_up=sizes.devserver_warm_up,
            )
            side.runs.append(run)
            log(f"  dev server {name:<5} round {round_ + 1}: {run.summary(' orders/s')}")
    return plain_side, tuned_side


# --- Parked orders -------------------------------------------------------------------------------


# Parking keeps at most this many first workflow tasks waiting for the worker.
PARKING_BACKLOG = 100


class Backlog:
    """The queue's workflow task backlog, as Temporal estimates it, refreshed twice a second."""

    def __init__(self, cluster: Cluster, task_queue: str) -> None:
        self._cluster = cluster
        self._task_queue = task_queue
        self.count = 0
        self._changed = asyncio.Event()

    async def follow(self) -> None:
        workflow_tasks = enums.TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW
        while True:
            with contextlib.suppress(Exception):
                response = await self._cluster.describe_queue(
                    workflow_tasks, self._task_queue, stats=True
                )
                self.count = response.stats.approximate_backlog_count
                self._changed.set()
                self._changed.clear()
            await asyncio.sleep(0.5)

    async def below(self, limit: int, *, at_most: float = 5.0) -> None:
        """Until the backlog is under `limit`; an estimate, so never more than `at_most` s."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(at_most):
                while self.count >= limit:
                    await self._changed.wait()


@dataclass
class ParkedResult:
    small: int
    large: int
    small_reads: Side
    large_reads: Side
    # The RSS of the small and large workers with their orders parked, and of the
    # large one before it parked any.
    rss_small: int
    rss_large: int
    rss_empty: int
    park_seconds: float
    stuck: int

    @property
    def p99_ratio(self) -> float:
        return self.large_reads.p(0.99) / self.small_reads.p(0.99)

    @property
    def bytes_per_order(self) -> float:
        return (self.rss_large - self.rss_empty) / self.large


class Parking:
    """A worker of its own with orders parked on it: started, reserved, waiting for payment."""

    def __init__(self, processes: Processes, worker: WorkerProcess) -> None:
        self.processes = processes
        self.worker = worker
        self.task_queue = worker.task_queue
        self.raw = Raw(processes.stack.client, worker.task_queue)
        self.parked: list[str] = []
        # Orders started but never parked: their first workflow task was never delivered.
        self.stuck: set[str] = set()

    @classmethod
    async def open(cls, processes: Processes, name: str) -> Parking:
        task_queue = f"orders-{name}-{uuid.uuid4().hex[:8]}"
        worker = await processes.cluster.start_worker(task_queue=task_queue, name=f"worker-{name}")
        return cls(processes, worker)

    async def park(self, total: int, concurrency: int, log: Callable[[str], None]) -> None:
        backlog = Backlog(self.processes.cluster, self.task_queue)
        monitor = asyncio.create_task(backlog.follow())

        async def one(_i: int) -> None:
            # Start no faster than the worker takes the orders: a deep backlog of
            # first workflow tasks is not what is measured here.
            await backlog.below(PARKING_BACKLOG)
            order = order_input(create_request())
            await self.raw.start(order)
            self.parked.append(order.order_id)

        try:
            run = await run_calls(total - len(self.parked), concurrency, one)
        finally:
            monitor.cancel()
        if run.errors:
            raise RuntimeError(f"parking failed: {run.errors[:3]}")
        await self.settle(total, log)

    async def settle(self, total: int, log: Callable[[str], None]) -> None:
        """Until every order is parked: listed as pending, its reservation and email done."""
        pids = [self.processes.temporal_pid, self.worker.pid]
        await quiesce(pids, limit=120)
        client = self.raw.client
        query = f'TaskQueue="{self.task_queue}" AND OrderStatus="{models.OrderStatus.PENDING}"'
        last, since = -1, time.monotonic()
        while (count := (await client.count_workflows(query)).count) < total:
            if count != last:
                last, since = count, time.monotonic()
            elif time.monotonic() - since > 30:
                missing = f'TaskQueue="{self.task_queue}" AND OrderStatus IS NULL'
                async for execution in client.list_workflows(missing):
                    self.stuck.add(execution.id.removeprefix("order-"))
                log(
                    f"  WARNING: {total - count} of {total} orders never parked: their first "
                    "workflow task was not delivered within 30 s; reads leave them out"
                )
                break
            await asyncio.sleep(1)
        await quiesce(pids, limit=60)

    def sample(self, count: int, seed: int) -> list[str]:
        rng = random.Random(seed)
        candidates = [order_id for order_id in self.parked if order_id not in self.stuck]
        return [rng.choice(candidates) for _ in range(count)]


async def parked_orders(
    processes: Processes, sizes: Sizes, concurrency: int, log: Callable[[str], None]
) -> ParkedResult:
    """GetOrder (gRPC) on a worker with few, and one with many, orders waiting for payment.

    Reads alternate between the two (few, many, few, many), so the machine's
    noise falls on both; the many's worker RSS is read before and after parking.
    """
    small = await Parking.open(processes, f"parked-{sizes.parked_small}")
    large = await Parking.open(processes, f"parked-{sizes.parked_large}")
    await small.park(sizes.parked_small, concurrency, log)
    await quiesce([processes.temporal_pid, large.worker.pid])
    rss_empty = rss_bytes(large.worker.pid)
    started = time.perf_counter()
    await large.park(sizes.parked_large, concurrency, log)
    park_seconds = time.perf_counter() - started
    log(f"  parked {sizes.parked_large:,} orders in {park_seconds:.0f} s")
    sides = {"small": Side(), "large": Side()}
    stub = processes.stack.stub
    per_run = sizes.parked_reads // 2
    samples = {"small": small.sample(per_run * 2, 1), "large": large.sample(per_run * 2, 2)}
    for round_ in range(2):
        for name in ("small", "large"):
            ids = samples[name][round_ * per_run : (round_ + 1) * per_run]
            await processes.quiesce()
            run = await run_calls(
                per_run,
                concurrency,
                lambda i, ids=ids: stub.GetOrder(pb.GetOrderRequest(order_id=ids[i])),  # type: ignore[misc]
                server_pid=processes.server_pid,
            )
            sides[name].runs.append(run)
            parked = sizes.parked_small if name == "small" else sizes.parked_large
            log(f"  GetOrder with {parked:>6,} parked, round {round_ + 1}: {run.summary()}")
    result = ParkedResult(
        small=sizes.parked_small,
        large=sizes.parked_large,
        small_reads=sides["small"],
        large_reads=sides["large"],
        rss_small=rss_bytes(small.worker.pid),
        rss_large=rss_bytes(large.worker.pid),
        rss_empty=rss_empty,
        park_seconds=park_seconds,
        stuck=len(small.stuck) + len(large.stuck),
    )
    log(
        f"  worker RSS: {result.rss_small / 2**20:.0f} MiB with {result.small:,} parked, "
        f"{result.rss_empty / 2**20:.0f} MiB empty, {result.rss_large / 2**20:.0f} MiB with "
        f"{result.large:,}: {result.bytes_per_order / 1024:.1f} KiB per parked order"
    )
    await small.worker.kill()
    await large.worker.kill()
    return result


# --- Report --------------------------------------------------------------------------------------


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    return (
        f"{os.cpu_count()} × {model}, {mem / 1024:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, temporalio "
        f"{temporalio.__version__}, grpcio {grpc.__version__}"
    )


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


@dataclass
class Report:
    comparisons: list[Comparison]
    floor: Side | None
    devserver: DevServerResult | None
    parked: ParkedResult | None
    concurrency: int
    sizes: Sizes
    quick: bool
    started_at: datetime
    duration: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    temporal_version: str

    def markdown(self) -> str:
        """docs/performance/results.md."""
        lines = [
            "# Performance: the gRPC front against raw Temporal",
            "",
            f"Run {self.started_at:%Y-%m-%d %H:%M} UTC, `make bench"
            + (" ARGS=--quick" if self.quick else "")
            + f"`, {self.duration / 60:.1f} min; {self.concurrency} concurrent callers; "
            f"{self.sizes.rounds} rounds per side, interleaved raw, gRPC, raw, gRPC.",
            "",
            f"Machine: {machine()}; {self.temporal_version}. "
            f"Load average before / after: {self.load_before[0]:.2f} / {self.load_after[0]:.2f} "
            "(the machine is shared: numbers are noisy).",
            "",
            "Writes: the servicer makes a query, then a signal for ConfirmPayment and "
            "CancelOrder (decision 0009); the raw side makes the same calls.",
            "",
            "| operation | raw calls | raw /s | gRPC /s | **gRPC / raw** | goal | per round "
            "| raw p50 ms | gRPC p50 ms | raw p99 ms | gRPC p99 ms | server CPU / call |",
            "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for c in self.comparisons:
            lines.append(
                f"| {c.name} | {c.raw_calls} | {c.raw.throughput:.1f} | {c.grpc.throughput:.1f} "
                f"| **{ratio_text(c.ratio, c.goal)}** {'✅' if c.met else '❌'} | ≥ {c.goal:.2f} "
                f"| {min(c.round_ratios):.2f}–{max(c.round_ratios):.2f} "
                f"| {ms(c.raw.p(0.5))} | {ms(c.grpc.p(0.5))} | {ms(c.raw.p(0.99))} "
                f"| {ms(c.grpc.p(0.99))} | {c.grpc.cpu_per_call * 1e6:.0f} µs |"
            )
        errors = [(c.name, e) for c in self.comparisons for e in c.raw.errors + c.grpc.errors]
        lines.append("")
        lines.append(
            "Throughput is calls (orders, for whole orders) per second over all rounds of a side; "
            "per round: the lowest and highest gRPC / raw of one round pair. Server CPU / call: "
            "the gRPC server process's utime + stime over its rounds, per call (per order for "
            "whole orders: CreateOrder, ConfirmPayment and a WatchOrder stream)."
        )
        if self.floor is not None:
            lines.append("")
            lines.append(
                f"For scale, grpc.aio alone (Health/Check, no Temporal call) costs the server "
                f"{self.floor.cpu_per_call * 1e6:.0f} µs of CPU per RPC "
                f"({self.floor.throughput:.0f} RPC/s)."
            )
        lines.append("")
        lines.append(
            f"Errors: {len(errors)}"
            + (f" (first: {errors[0][0]}: {errors[0][1]})" if errors else "")
        )
        if self.devserver is not None:
            d = self.devserver
            lines += [
                "",
                "## Dev server: plain vs the `make run` default",
                "",
                "Whole orders per second through gRPC (create, pay, WatchOrder until delivered, "
                "zero simulated delays), each stack its own dev server, worker and gRPC server, "
                "both up at once and loaded in turn.",
                "",
                "| stack | dev server flags | worker | orders/s | p50 ms | p99 ms |",
                "|---|---|---|---:|---:|---:|",
                f"| plain | `--db-filename` only | SDK defaults | {d.plain.throughput:.1f} "
                f"| {ms(d.plain.p(0.5))} | {ms(d.plain.p(0.99))} |",
                f"| `make run` | `{' '.join(d.tuned_flags)}` | tuned (worker/settings.py) "
                f"| {d.tuned.throughput:.1f} | {ms(d.tuned.p(0.5))} | {ms(d.tuned.p(0.99))} |",
                "",
                f"**{d.ratio:.2f}×** the plain dev server's orders per second (goal ≥ 2×: "
                f"{'met ✅' if d.ratio >= 2 else 'not met ❌'}).",
            ]
        if self.parked is not None:
            p = self.parked
            lines += [
                "",
                "## Orders waiting for payment",
                "",
                f"GetOrder through gRPC, {self.concurrency} callers, on random orders waiting for "
                f"payment: two workers of their own, one with {p.small:,} orders parked, one with "
                f"{p.large:,}, read in turn ({p.small:,}, {p.large:,}, {p.small:,}, {p.large:,}). "
                f"Both keep every order in their workflow cache (`--max-cached-workflows`).",
                "",
                "| parked | GetOrder /s | p50 ms | p99 ms | worker RSS |",
                "|---:|---:|---:|---:|---:|",
                f"| {p.small:,} | {p.small_reads.throughput:.0f} | {ms(p.small_reads.p(0.5))} "
                f"| {ms(p.small_reads.p(0.99))} | {p.rss_small / 2**20:.0f} MiB |",
                f"| {p.large:,} | {p.large_reads.throughput:.0f} | {ms(p.large_reads.p(0.5))} "
                f"| {ms(p.large_reads.p(0.99))} | {p.rss_large / 2**20:.0f} MiB |",
                "",
                f"p99 with {p.large:,} parked is **{p.p99_ratio:.2f}×** the p99 with {p.small:,} "
                f"(goal ≤ 2×: {'met ✅' if p.p99_ratio <= 2 else 'not met ❌'}); the worker holds "
                f"**{p.bytes_per_order / 1024:.1f} KiB per parked order** (VmRSS "
                f"{p.rss_empty / 2**20:.0f} MiB before parking, {p.rss_large / 2**20:.0f} MiB "
                f"after); parking {p.large:,} orders took {p.park_seconds:.0f} s, started no "
                f"faster than the worker took them."
                + (
                    f" **{p.stuck} orders never parked**: their first workflow task was not "
                    "delivered to the polling worker within 30 s; the reads leave them out."
                    if p.stuck
                    else ""
                ),
            ]
        return "\n".join(lines) + "\n"


def ratio_text(ratio: float, goal: float) -> str:
    """Two decimals, three when two would round a miss up to the goal (or a pass down)."""
    text = f"{ratio:.2f}"
    return f"{ratio:.3f}" if float(text) == goal and ratio != goal else text


def chart(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comparisons = report.comparisons
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (left, right), (dev, parked) = axes
    names = [c.name for c in comparisons]
    xs = list(range(len(comparisons)))
    width = 0.38
    left.bar(
        [x - width / 2 for x in xs],
        [c.raw.throughput for c in comparisons],
        width,
        label="raw temporalio",
    )
    left.bar(
        [x + width / 2 for x in xs], [c.grpc.throughput for c in comparisons], width, label="gRPC"
    )
    left.set_yscale("log")
    left.set_xticks(xs, names, rotation=15)
    left.set_ylabel("calls (orders) per second, log scale")
    left.set_title(f"Throughput, {report.concurrency} concurrent callers each side")
    left.legend()
    ratios = [c.ratio for c in comparisons]
    colors = ["tab:green" if c.met else "tab:red" for c in comparisons]
    right.bar(xs, ratios, 0.6, color=colors)
    for x, c in zip(xs, comparisons, strict=True):
        right.plot([x - 0.35, x + 0.35], [c.goal, c.goal], color="black", linestyle="--")
        right.text(x, c.ratio + 0.02, ratio_text(c.ratio, c.goal), ha="center")
    right.set_xticks(xs, names, rotation=15)
    right.set_ylim(0, max(1.2, max(ratios) + 0.15))
    right.set_ylabel("gRPC / raw throughput")
    right.set_title("gRPC / raw (dashed: goal; green: met)")
    if report.devserver is not None:
        d = report.devserver
        values = [d.plain.throughput, d.tuned.throughput]
        dev.bar([0, 1], values, 0.6, color=["tab:gray", "tab:green" if d.ratio >= 2 else "tab:red"])
        for x, value in enumerate(values):
            dev.text(x, value, f"{value:.1f}", ha="center", va="bottom")
        dev.set_xticks(
            [0, 1], ["plain start-dev\n--db-filename", "make run default\n(WAL, tuned worker)"]
        )
        dev.set_ylabel("whole orders per second (gRPC)")
        dev.set_title(f"Dev server: {d.ratio:.2f}× the plain one (goal ≥ 2×)")
    else:
        dev.set_axis_off()
    if report.parked is not None:
        p = report.parked
        values = [p.small_reads.p(0.99) * 1000, p.large_reads.p(0.99) * 1000]
        parked.bar(
            [0, 1], values, 0.6, color=["tab:gray", "tab:green" if p.p99_ratio <= 2 else "tab:red"]
        )
        for x, value in enumerate(values):
            parked.text(x, value, f"{value:.0f} ms", ha="center", va="bottom")
        parked.set_xticks([0, 1], [f"{p.small:,} parked", f"{p.large:,} parked"])
        parked.set_ylabel("GetOrder p99, ms")
        parked.set_title(
            f"Parked orders: p99 {p.p99_ratio:.2f}× (goal ≤ 2×); "
            f"{p.bytes_per_order / 1024:.0f} KiB per parked order"
        )
    else:
        parked.set_axis_off()
    fig.suptitle(
        f"OrderService vs raw Temporal, {report.started_at:%Y-%m-%d %H:%M} UTC"
        + (" (quick)" if report.quick else "")
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- Main ----------------------------------------------------------------------------------------


def temporal_version() -> str:
    import subprocess

    out = subprocess.run(
        [venv_binary("temporal"), "--version"], capture_output=True, text=True, check=False
    )
    return out.stdout.strip() or "temporal CLI"


async def main(args: argparse.Namespace) -> Report:
    sizes = QUICK if args.quick else FULL
    started_at = datetime.now(UTC)
    began = time.perf_counter()
    load_before = os.getloadavg()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f}s] {line}", flush=True)

    tuning = shlex.split(args.temporal_tuning)
    root = Path(tempfile.mkdtemp(prefix="orders-bench-"))
    log(f"processes and logs under {root}; dev server tuning: {' '.join(tuning)}")
    clusters: list[Cluster] = []
    try:
        tuned = await start_processes(root, "tuned", tuning=tuning, worker_env={})
        clusters.append(tuned.cluster)
        bench = Bench(
            tuned, Raw(tuned.stack.client, tuned.stack.task_queue), sizes, args.concurrency, log
        )
        log("started; warming up")
        await bench.warm_up()
        comparisons: list[Comparison] = []
        floor = await bench.grpc_floor(sizes.get)
        for phase in args.phases:
            if phase in ("create", "get", "pay", "cancel", "whole"):
                if phase != "create" and not bench.pending and phase != "whole":
                    raise SystemExit(f"phase {phase} needs the create phase first")
                log(f"{phase}")
                comparisons.append(await getattr(bench, phase)())
        devserver = None
        if "devserver" in args.phases:
            log("dev server: plain vs tuned")
            plain = await start_processes(root, "plain", tuning=[], worker_env=PLAIN_WORKER_ENV)
            clusters.append(plain.cluster)
            plain_side, tuned_side = await devserver_comparison(
                tuned, plain, sizes, args.concurrency, log
            )
            await plain.cluster.shutdown()
            clusters.remove(plain.cluster)
            devserver = DevServerResult(plain_side, tuned_side, ["--db-filename"], tuning)
        parked = None
        if "parked" in args.phases:
            log("parked orders")
            parked = await parked_orders(tuned, sizes, args.concurrency, log)
    except BaseException:
        log(f"failed: the processes' logs are under {root}")
        raise
    finally:
        for cluster in clusters:
            with contextlib.suppress(Exception):
                await cluster.shutdown()
        kill_strays()
    # Hundreds of MB of Temporal state: kept only when something went wrong.
    shutil.rmtree(root, ignore_errors=True)
    return Report(
        comparisons=comparisons,
        floor=floor,
        devserver=devserver,
        parked=parked,
        concurrency=args.concurrency,
        sizes=sizes,
        quick=args.quick,
        started_at=started_at,
        duration=time.perf_counter() - began,
        load_before=load_before,
        load_after=os.getloadavg(),
        temporal_version=temporal_version(),
    )


PHASES = ("create", "get", "pay", "cancel", "whole", "devserver", "parked")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.benchmark", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a sanity run")
    parser.add_argument(
        "--concurrency", type=int, default=50, help="concurrent callers (default %(default)s)"
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help="comma-separated subset of " + ",".join(PHASES),
    )
    parser.add_argument(
        "--temporal-tuning",
        required=True,
        help="the dev server flags of `make run` (make bench passes the Makefile's "
        "TEMPORAL_TUNING), or others to measure",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=OUT_DIR,
        help="where results.md and chart.png go (default docs/performance)",
    )
    args = parser.parse_args(list(argv))
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if unknown := set(args.phases) - set(PHASES):
        parser.error(f"unknown phases: {sorted(unknown)}")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    return args


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    # SIGTERM as Ctrl-C: main's cleanup stops every process it started.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = asyncio.run(main(args))
    finally:
        kill_strays()
    results = report.markdown()
    print(f"\n{results}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(results)
    if report.comparisons:
        chart(report, args.out / "chart.png")
    print(f"\nwrote {args.out / 'results.md'} and {args.out / 'chart.png'}")
    return 0


if __name__ == "__main__":
    exit_without_finalization(run(sys.argv[1:]))
