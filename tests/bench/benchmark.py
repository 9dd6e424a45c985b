"""How much the gRPC front costs next to Temporal: `make bench` (`make bench ARGS=--quick`).

One run starts its own processes, as `make run` does (one OS process each,
through tests/support/cluster.py): a Temporal dev server with the Makefile's
tuning (TEMPORAL_TUNING, which `make bench` passes as --temporal-tuning), a
worker with zero simulated delays, a gRPC server, and the benchmark's raw
process (tests/bench/raw_side.py), which makes the servicer's Temporal calls
straight through the `temporalio` client, connected as the server is, with
the same inputs. It then measures, interleaved (raw, gRPC, raw, gRPC) and at
the same concurrency, each RPC against those calls (decision 0016):

- CreateOrder        vs start_workflow, with the server's memo and search attributes
                     (input from validation.validate_create_order);
- GetOrder           vs DescribeWorkflowExecution and the memo's state decoded,
                     on the same orders;
- GetOrderStatus,    vs the same describe and decode;
  GetEstimatedDelivery
- ConfirmPayment     vs the describe and decode, then the confirm_payment signal;
- CancelOrder        vs the describe and decode, then the cancel_order signal;
- ListOrders         vs the lister's visibility list with each row's memo decoded, then
                     the list of the rows' other runs (one page of one customer's orders);
- whole orders       CreateOrder, ConfirmPayment and a WatchOrder stream until delivered,
                     vs start, describe and signal, and the order's history long-polled
                     until delivered (WatchOrder's calls), zero simulated delays.

The CPU budget: each gRPC round is followed by a round of Health/Check, and
the CPU of the process under test is read over every round (its CPU-time
clock: utime + stime): the gRPC server's for gRPC and Health/Check rounds,
the raw process's for raw ones. An RPC's floor is grpc.aio's own cost per RPC
(Health/Check) plus the raw client's CPU per call for the same Temporal
calls; the goal is every RPC within 250 µs of its floor (a whole order, three
RPCs: within 750 µs).

It also measures CreateOrder at one caller (the latency the front adds),
whole orders per second on a plain `temporal server start-dev --db-filename`
with an untuned worker against the tuned default (both up at once, loaded in
turn), GetOrder on orders parked waiting for payment, 100 on one worker and
10,000 on another, read in turn (the second worker's memory, VmRSS, read
before and after parking), and the workflow sandbox's cost: the worker's CPU
per whole order and memory per parked order under the default sandbox
(`python -m worker`) and with every module passed through
(tests/bench/passthrough_worker.py), the runner decision 0015 replaced.

Writes docs/performance/results.md and chart.png, and prints the results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
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
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from infra.process_exit import exit_without_finalization
from tests.bench.measure import Run, cpu_seconds, ms, quiesce, rss_bytes, run_calls, run_for
from tests.bench.raw_side import CANCEL_REASON, Raw
from tests.support.cluster import (
    SERVICE_NAME,
    Cluster,
    Simulation,
    WorkerProcess,
    kill_strays,
)
from tests.support.env import ROOT, clean_environ, venv_binary
from tests.support.keys import KEYS, key_variables
from tests.support.orders import create_request, payment_request
from tests.support.polling import eventually
from tests.support.stack import Stack
from tests.support.stats import percentile
from workflows import models

OUT_DIR = ROOT / "docs" / "performance"

# The orders of the customer ListOrders lists, all on one page.
LISTED = 10

ZERO_DELAYS = Simulation(inventory=0, payment=0, prepare=0, ship=0, deliver=0, email=0)
# The goal of issue 11: every RPC's server CPU within this of its floor.
CPU_BUDGET = 250e-6
# The goal for the latency the front adds to CreateOrder at one caller.
ADDED_LATENCY_GOAL = 2e-3

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
    status: int
    estimate: int
    pay: int
    cancel: int
    whole: int
    list: int  # ListOrders pages, each of LISTED orders
    health: int  # Health/Check calls after each gRPC round: grpc.aio's own cost
    one_caller: int  # CreateOrder at one caller, per round
    devserver_rounds: int
    devserver_seconds: float
    devserver_warm_up: float
    parked_small: int
    parked_large: int
    parked_reads: int
    sandbox_parked: int  # orders parked on each of the two sandbox workers
    sandbox_whole: int  # whole orders per sandbox worker and round (2 rounds)


# About 10 minutes on 2 cores (the parked and sandbox phases wait for the worker to take
# each order: about 20 orders a second).
FULL = Sizes(
    rounds=3,
    create=150,
    get=600,
    status=400,
    estimate=400,
    # The writes take pending orders from the create phase's: 2 × rounds × (pay + cancel)
    # must stay within 2 × rounds × create.
    pay=70,
    cancel=70,
    whole=40,
    list=150,
    health=600,
    one_caller=40,
    devserver_rounds=2,
    devserver_seconds=12,
    devserver_warm_up=8,
    parked_small=100,
    parked_large=2500,
    parked_reads=2000,
    sandbox_parked=800,
    sandbox_whole=30,
)
QUICK = Sizes(
    rounds=2,
    create=120,
    get=400,
    status=200,
    estimate=200,
    pay=60,
    cancel=60,
    whole=40,
    list=120,
    health=400,
    one_caller=30,
    devserver_rounds=2,
    devserver_seconds=10,
    devserver_warm_up=8,
    parked_small=100,
    parked_large=1000,
    parked_reads=400,
    sandbox_parked=400,
    sandbox_whole=20,
)


# --- Measuring -----------------------------------------------------------------------------------


@dataclass
class Side:
    """Every round of one side (raw, gRPC, or Health/Check) of one comparison."""

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
        """CPU seconds of the process under test (server, or raw process) per call."""
        return sum(r.cpu for r in self.runs) / self.calls if self.calls else float("nan")


@dataclass
class Comparison:
    name: str
    raw_calls: str
    goal: float
    # RPCs per call: 1, or 3 for a whole order (CreateOrder, ConfirmPayment, WatchOrder).
    rpcs: int = 1
    raw: Side = field(default_factory=Side)
    grpc: Side = field(default_factory=Side)
    # Health/Check after each gRPC round, at the same concurrency: grpc.aio's own cost.
    health: Side = field(default_factory=Side)

    @property
    def ratio(self) -> float:
        raw = self.raw.throughput
        return self.grpc.throughput / raw if raw else float("nan")

    @property
    def met(self) -> bool:
        return self.ratio >= self.goal

    @property
    def round_ratios(self) -> list[float]:
        """gRPC / raw throughput of each round pair (raw round n, gRPC round n)."""
        return [
            (len(g.latencies) / g.wall) / (len(r.latencies) / r.wall)
            if r.latencies
            else float("nan")
            for r, g in zip(self.raw.runs, self.grpc.runs, strict=True)
        ]

    @property
    def grpc_aio(self) -> float:
        """grpc.aio's own cost for the call's RPCs: Health/Check's CPU per call, times rpcs."""
        return self.health.cpu_per_call * self.rpcs

    @property
    def floor(self) -> float:
        """grpc.aio's cost for the RPCs plus the raw client's CPU per call, in seconds."""
        return self.grpc_aio + self.raw.cpu_per_call

    @property
    def over_floor(self) -> float:
        return self.grpc.cpu_per_call - self.floor

    @property
    def budget(self) -> float:
        return CPU_BUDGET * self.rpcs

    @property
    def cpu_met(self) -> bool:
        return self.over_floor <= self.budget


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

    @property
    def temporal_address(self) -> str:
        assert self.cluster.temporal is not None
        return self.cluster.temporal.address

    async def quiesce(self, *more: int) -> None:
        await quiesce([*self.cluster.pids, *more])


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


# Answers of the raw process carry every latency and order id of a round.
_RAW_LINE_LIMIT = 1 << 24


class RawProcess:
    """The benchmark's raw process (tests/bench/raw_side.py), driven over its stdin."""

    def __init__(self, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self._process = process
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self._process.pid

    @classmethod
    async def start(cls, processes: Processes) -> RawProcess:
        cluster = processes.cluster
        log_path = cluster.root / "logs" / "raw.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.bench.raw_side",
                "--temporal-address",
                processes.temporal_address,
                "--task-queue",
                cluster.task_queue,
                cwd=ROOT,
                # The keys the cluster gives the server and the workers.
                env=clean_environ({"PYTHONUNBUFFERED": "1", **key_variables()}),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                start_new_session=True,
                limit=_RAW_LINE_LIMIT,
            )
        raw = cls(process, log_path)
        async with asyncio.timeout(60):
            await raw._answer()
        return raw

    async def _answer(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        line = await self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the raw process exited; its log: {self.log_path}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the raw process failed: {answer['error']}")
        return answer

    async def run(self, do: str, **arguments: object) -> tuple[Run, list[str]]:
        """One command (see raw_side.perform): its round, and the orders it created."""
        assert self._process.stdin is not None
        self._process.stdin.write((json.dumps({"do": do, **arguments}) + "\n").encode())
        await self._process.stdin.drain()
        answer = await self._answer()
        return Run.from_json(answer["run"]), answer["ids"]

    async def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGKILL)
        await self._process.wait()


# --- The calls -----------------------------------------------------------------------------------


def payment(order_id: str) -> pb.ConfirmPaymentRequest:
    return payment_request(order_id, f"TXN-{order_id}")


def cancellation(order_id: str) -> pb.CancelOrderRequest:
    return pb.CancelOrderRequest(order_id=order_id, reason=CANCEL_REASON)


async def whole_order_grpc(stub: pb_grpc.OrderServiceAsyncStub) -> None:
    created = await stub.CreateOrder(create_request())
    await stub.ConfirmPayment(payment(created.order_id))
    last = None
    async for order in stub.WatchOrder(pb.WatchOrderRequest(order_id=created.order_id)):
        last = order.status
    if last != pb.ORDER_STATUS_DELIVERED:
        raise RuntimeError(f"order {created.order_id} ended {last}")


# --- The phases ----------------------------------------------------------------------------------


@dataclass
class Bench:
    processes: Processes
    raw: RawProcess
    sizes: Sizes
    concurrency: int
    log: Callable[[str], None]
    # Orders created and waiting for payment, for the reads and the writes.
    pending: list[str] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        """Temporal, worker, gRPC server, raw process, this driver: the cores of a run."""
        return [*self.processes.cluster.pids, self.raw.pid, os.getpid()]

    async def side(self, measure: Callable[[], Awaitable[Run]]) -> Run:
        """One round, once the processes are idle, with the cores each used during it."""
        await self.processes.quiesce(self.raw.pid)
        pids = self.pids
        cpu_before = [cpu_seconds(pid) for pid in pids]
        run = await measure()
        run.cores = [
            (cpu_seconds(pid) - before) / run.wall
            for pid, before in zip(pids, cpu_before, strict=True)
        ]
        return run

    async def interleave(
        self,
        comparison: Comparison,
        count: int,
        raw_round: Callable[[int], Awaitable[Run]],
        grpc_call: Callable[[int, int], Awaitable[object]],
        *,
        concurrency: int | None = None,
        health_calls: int | None = None,
    ) -> Comparison:
        """raw, gRPC, Health/Check, raw, gRPC, Health/Check ...: `count` calls per side.

        `raw_round(round)` runs a raw round in the raw process; the gRPC call
        gets (round, index).
        """
        callers = concurrency or self.concurrency
        server = self.processes.server_pid
        health = health_pb2_grpc.HealthStub(self.processes.stack.channel)
        check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        for round_ in range(self.sizes.rounds):
            raw = await self.side(lambda r=round_: raw_round(r))  # type: ignore[misc]
            comparison.raw.runs.append(raw)
            grpc_run = await self.side(
                lambda r=round_: run_calls(  # type: ignore[misc]
                    count, callers, lambda i: grpc_call(r, i), cpu_of=server
                )
            )
            comparison.grpc.runs.append(grpc_run)
            comparison.health.runs.append(
                await self.side(
                    lambda: run_calls(
                        health_calls or self.sizes.health,
                        callers,
                        lambda _i: health.Check(check),
                        cpu_of=server,
                    )
                )
            )
            for side, run in (
                ("raw", raw),
                ("gRPC", grpc_run),
                ("Health/Check", comparison.health.runs[-1]),
            ):
                self.log(f"  {comparison.name:<20} {side:<4} round {round_ + 1}: {run.summary()}")
        return comparison

    def take_pending(self, count: int) -> list[str]:
        if len(self.pending) < count:
            raise RuntimeError(f"need {count} pending orders, have {len(self.pending)}")
        taken, self.pending = self.pending[:count], self.pending[count:]
        return taken

    async def warm_up(self) -> None:
        stub = self.processes.stack.stub
        for _ in range(10):
            await whole_order_grpc(stub)
        await self.raw.run("warm_up")
        created = await stub.CreateOrder(create_request())
        for _ in range(20):
            await stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))
            await stub.GetOrderStatus(pb.GetOrderStatusRequest(order_id=created.order_id))

    async def create(self) -> Comparison:
        n = self.sizes.create
        requests = [create_request() for _ in range(n)]

        async def raw_round(_r: int) -> Run:
            run, ids = await self.raw.run("create", count=n, concurrency=self.concurrency)
            self.pending += ids
            return run

        async def grpc_call(_r: int, i: int) -> None:
            response = await self.processes.stack.stub.CreateOrder(requests[i])
            self.pending.append(response.order_id)

        comparison = Comparison("CreateOrder", "start_workflow (memo, search attributes)", 0.95)
        return await self.interleave(comparison, n, raw_round, grpc_call)

    async def read(self, name: str, count: int, seed: int) -> Comparison:
        """GetOrder or GetOrderStatus: a describe and the memo decoded, on the same orders."""
        rng = random.Random(seed)
        ids = [rng.choice(self.pending) for _ in range(count)]
        stub = self.processes.stack.stub

        async def raw_round(_r: int) -> Run:
            return (await self.raw.run("read", ids=ids, concurrency=self.concurrency))[0]

        async def grpc_call(_r: int, i: int) -> object:
            if name == "GetOrder":
                return await stub.GetOrder(pb.GetOrderRequest(order_id=ids[i]))
            if name == "GetEstimatedDelivery":
                return await stub.GetEstimatedDelivery(
                    pb.GetEstimatedDeliveryRequest(order_id=ids[i])
                )
            return await stub.GetOrderStatus(pb.GetOrderStatusRequest(order_id=ids[i]))

        comparison = Comparison(name, "describe + memo decoded", 0.90)
        return await self.interleave(comparison, count, raw_round, grpc_call)

    async def get(self) -> Comparison:
        return await self.read("GetOrder", self.sizes.get, 1)

    async def status(self) -> Comparison:
        return await self.read("GetOrderStatus", self.sizes.status, 2)

    async def estimate(self) -> Comparison:
        return await self.read("GetEstimatedDelivery", self.sizes.estimate, 3)

    async def list(self) -> Comparison:
        """ListOrders: one page of one customer's LISTED orders, created for it here."""
        stub = self.processes.stack.stub
        customer = f"CUST-BENCH-{uuid.uuid4().hex[:8].upper()}"
        created_after = datetime.now(UTC) - timedelta(seconds=1)
        for _ in range(LISTED):
            await stub.CreateOrder(create_request(customer_id=customer))
        since = Timestamp()
        since.FromDatetime(created_after)
        request = pb.ListOrdersRequest(
            customer_id=customer, created_after=since, page_size=LISTED * 2
        )
        # Visibility lags the starts a little.
        await eventually(
            lambda: stub.ListOrders(request),
            lambda page: len(page.orders) == LISTED,
            what=f"{LISTED} orders listed",
        )
        count = self.sizes.list

        async def raw_round(_r: int) -> Run:
            run, _ids = await self.raw.run(
                "list",
                count=count,
                concurrency=self.concurrency,
                customer_id=customer,
                created_after=created_after.isoformat(),
                rows=LISTED,
            )
            return run

        async def grpc_call(_r: int, _i: int) -> None:
            page = await stub.ListOrders(request)
            if len(page.orders) != LISTED:
                raise RuntimeError(f"listed {len(page.orders)} orders, not {LISTED}")

        comparison = Comparison(
            "ListOrders",
            f"list ({LISTED} rows, memo decoded) + list of their other runs",
            0.90,
        )
        return await self.interleave(comparison, count, raw_round, grpc_call)

    async def pay(self) -> Comparison:
        stub = self.processes.stack.stub
        return await self.write(
            Comparison(
                "ConfirmPayment", f"describe + signal {models.CONFIRM_PAYMENT_SIGNAL}", 0.90
            ),
            self.sizes.pay,
            "pay",
            lambda order_id: stub.ConfirmPayment(payment(order_id)),
        )

    async def cancel(self) -> Comparison:
        stub = self.processes.stack.stub
        return await self.write(
            Comparison("CancelOrder", f"describe + signal {models.CANCEL_ORDER_SIGNAL}", 0.90),
            self.sizes.cancel,
            "cancel",
            lambda order_id: stub.CancelOrder(cancellation(order_id)),
        )

    async def write(
        self,
        comparison: Comparison,
        count: int,
        raw_command: str,
        grpc_call: Callable[[str], Awaitable[object]],
    ) -> Comparison:
        """A write to pending orders: `count` of them for each side of each round."""
        orders = {
            (r, side): self.take_pending(count) for r in range(self.sizes.rounds) for side in "rg"
        }

        async def raw_round(r: int) -> Run:
            ids = orders[(r, "r")]
            return (await self.raw.run(raw_command, ids=ids, concurrency=self.concurrency))[0]

        return await self.interleave(
            comparison, count, raw_round, lambda r, i: grpc_call(orders[(r, "g")][i])
        )

    async def whole(self) -> Comparison:
        n = self.sizes.whole

        async def raw_round(_r: int) -> Run:
            return (await self.raw.run("whole", count=n, concurrency=self.concurrency))[0]

        async def grpc_call(_r: int, _i: int) -> None:
            await whole_order_grpc(self.processes.stack.stub)

        comparison = Comparison(
            "Whole orders",
            "start; describe + signal; history long-polled until delivered",
            0.90,
            rpcs=3,
        )
        return await self.interleave(comparison, n, raw_round, grpc_call)

    async def one_caller(self) -> Comparison:
        """CreateOrder at one caller: the latency the front adds to a start, and its CPU."""
        n = self.sizes.one_caller

        async def raw_round(_r: int) -> Run:
            return (await self.raw.run("create", count=n, concurrency=1))[0]

        async def grpc_call(_r: int, _i: int) -> None:
            await self.processes.stack.stub.CreateOrder(create_request())

        comparison = Comparison("CreateOrder", "start_workflow", 0.0)
        return await self.interleave(
            comparison, n, raw_round, grpc_call, concurrency=1, health_calls=n * 5
        )


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
        # The driver's own client: parking is not measured, only what it leaves.
        self.raw = Raw(processes.stack.client, worker.task_queue, KEYS.customer_id_key)
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
            start = self.raw.new_order()
            await self.raw.start(start)
            self.parked.append(start.order.order_id)

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
                cpu_of=processes.server_pid,
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


# --- The workflow sandbox's cost -----------------------------------------------------------------


async def start_passthrough_worker(cluster: Cluster, name: str) -> WorkerProcess:
    """`python -m tests.bench.passthrough_worker`: the worker with every module passed through.

    Started by Cluster.start_worker as `python -m worker` is, on a task queue of its own.
    """
    return await cluster.start_worker(
        task_queue=f"orders-{name}-{uuid.uuid4().hex[:8]}",
        module="tests.bench.passthrough_worker",
        name=f"worker-{name}",
    )


@dataclass
class SandboxWorker:
    """One worker of the sandbox phase: its memory before and after parking, its CPU per order."""

    runner: str
    parked: int
    rss_before: int
    rss_parked: int
    # Whole orders on this worker alone; each Run's cpu is the worker's.
    whole: Side

    @property
    def bytes_per_order(self) -> float:
        return (self.rss_parked - self.rss_before) / self.parked

    @property
    def cpu_per_order(self) -> float:
        return self.whole.cpu_per_call


@dataclass
class SandboxResult:
    default: SandboxWorker
    passthrough: SandboxWorker

    @property
    def cpu_ratio(self) -> float:
        return self.default.cpu_per_order / self.passthrough.cpu_per_order

    @property
    def memory_ratio(self) -> float:
        return self.default.bytes_per_order / self.passthrough.bytes_per_order


async def sandbox_cost(
    processes: Processes, sizes: Sizes, concurrency: int, log: Callable[[str], None]
) -> SandboxResult:
    """The default sandbox against every module passed through (decision 0015).

    Two workers of their own, `python -m worker` and the passthrough one: each
    parks `sandbox_parked` orders (its VmRSS before and after), then runs
    whole orders (start, pay, result, through the driver's client) in turn,
    default, passthrough, default, passthrough, its CPU read over each round.
    """
    default = await Parking.open(processes, "sandbox-default")
    passthrough = Parking(
        processes, await start_passthrough_worker(processes.cluster, "sandbox-passthrough")
    )
    parkings = {"default sandbox": default, "all modules passed through": passthrough}
    for parking in parkings.values():
        for _ in range(5):  # every module imported, every path run once
            await parking.raw.whole_order()
    rss: dict[str, tuple[int, int]] = {}
    for name, parking in parkings.items():
        await quiesce([processes.temporal_pid, parking.worker.pid])
        before = rss_bytes(parking.worker.pid)
        await parking.park(sizes.sandbox_parked, concurrency, log)
        rss[name] = (before, rss_bytes(parking.worker.pid))
        log(
            f"  {name}: VmRSS {before / 2**20:.0f} MiB, {rss[name][1] / 2**20:.0f} MiB with "
            f"{sizes.sandbox_parked:,} parked"
        )
    sides = {name: Side() for name in parkings}
    for round_ in range(2):
        for name, parking in parkings.items():
            await processes.quiesce()
            run = await run_calls(
                sizes.sandbox_whole,
                concurrency,
                lambda _i, p=parking: p.raw.whole_order(),  # type: ignore[misc]
                cpu_of=parking.worker.pid,
            )
            sides[name].runs.append(run)
            log(f"  whole orders, {name}, round {round_ + 1}: {run.summary(' orders/s')}")
    workers = [
        SandboxWorker(name, sizes.sandbox_parked, *rss[name], sides[name]) for name in parkings
    ]
    for parking in parkings.values():
        await parking.worker.kill()
    return SandboxResult(*workers)


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


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f}"


def check(met: bool) -> str:
    return "✅" if met else "❌"


@dataclass
class Report:
    comparisons: list[Comparison]
    one_caller: Comparison | None
    devserver: DevServerResult | None
    parked: ParkedResult | None
    sandbox: SandboxResult | None
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
            "(the machine is shared: numbers are noisy; compare within one run).",
            "",
            "The raw side makes the servicer's Temporal calls (decision 0016) straight through "
            "temporalio, in a process of its own (`tests/bench/raw_side.py`), connected as the "
            "server is.",
        ]
        if self.comparisons:
            lines += [
                "",
                "## CPU per RPC against its floor",
                "",
                "| RPC | Temporal calls (raw side) | server CPU / call "
                "| floor: grpc.aio + raw client | over the floor | goal: floor + 250 µs "
                "| gRPC / raw throughput | ratio goal |",
                "|---|---|---:|---:|---:|:-:|---:|:-:|",
            ]
            for c in self.comparisons:
                per = " / order" if c.rpcs > 1 else ""
                lines.append(
                    f"| {c.name} | {c.raw_calls} | {us(c.grpc.cpu_per_call)} µs{per} "
                    f"| {us(c.floor)} µs ({us(c.grpc_aio)} + {us(c.raw.cpu_per_call)}) "
                    f"| {c.over_floor * 1e6:+,.0f} µs "
                    f"| ≤ {us(c.floor + c.budget)} µs {check(c.cpu_met)} "
                    f"| {ratio_text(c.ratio, c.goal)} | ≥ {c.goal:.2f} {check(c.met)} |"
                )
            lines += [
                "",
                "Server CPU / call: the gRPC server process's CPU time (utime + stime) over "
                "its rounds, divided by its calls. The floor is grpc.aio's own cost per RPC, "
                "Health/Check on the same server at the same concurrency right after each gRPC "
                "round, plus the raw process's CPU per call over its rounds for the same "
                "Temporal calls. A whole order is three RPCs (CreateOrder, ConfirmPayment and "
                "a WatchOrder stream until delivered): three Health/Checks in its floor, and "
                "3 × 250 µs of budget.",
            ]
        if self.comparisons:
            lines += [
                "",
                f"## Throughput and latency, {self.concurrency} callers",
                "",
                "| operation | raw /s | gRPC /s | **gRPC / raw** | goal | per round "
                "| raw p50 ms | gRPC p50 ms | raw p99 ms | gRPC p99 ms |",
                "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
            ]
            for c in self.comparisons:
                lines.append(
                    f"| {c.name} | {c.raw.throughput:.1f} | {c.grpc.throughput:.1f} "
                    f"| **{ratio_text(c.ratio, c.goal)}** {check(c.met)} | ≥ {c.goal:.2f} "
                    f"| {min(c.round_ratios):.2f}–{max(c.round_ratios):.2f} "
                    f"| {ms(c.raw.p(0.5))} | {ms(c.grpc.p(0.5))} | {ms(c.raw.p(0.99))} "
                    f"| {ms(c.grpc.p(0.99))} |"
                )
            errors = [(c.name, e) for c in self.comparisons for e in c.raw.errors + c.grpc.errors]
            lines += [
                "",
                "Throughput is calls (orders, for whole orders) per second over all rounds of "
                "a side; per round: the lowest and highest gRPC / raw of one round pair.",
                "",
                f"Errors: {len(errors)}"
                + (f" (first: {errors[0][0]}: {errors[0][1]})" if errors else ""),
            ]
        if self.one_caller is not None:
            c = self.one_caller
            added = c.grpc.p(0.5) - c.raw.p(0.5)
            lines += [
                "",
                "## Added latency at one caller",
                "",
                f"CreateOrder through gRPC against the raw start, one caller, "
                f"{self.sizes.one_caller} calls per round, interleaved: p50 "
                f"**{ms(c.grpc.p(0.5))} ms** against **{ms(c.raw.p(0.5))} ms**, "
                f"**{added * 1000:+.1f} ms** added (goal ≤ {ADDED_LATENCY_GOAL * 1000:.0f} ms: "
                f"{'met ✅' if added <= ADDED_LATENCY_GOAL else 'not met ❌'}); p99 "
                f"{ms(c.grpc.p(0.99))} ms against {ms(c.raw.p(0.99))} ms. At one caller the "
                f"server spent {us(c.grpc.cpu_per_call)} µs of CPU per CreateOrder against a "
                f"floor of {us(c.floor)} µs ({us(c.health.cpu_per_call)} for grpc.aio, "
                f"{us(c.raw.cpu_per_call)} for the raw client's start)."
                + (
                    f" Errors: {len(c.raw.errors + c.grpc.errors)}."
                    if c.raw.errors or c.grpc.errors
                    else ""
                ),
            ]
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
        if self.sandbox is not None:
            s = self.sandbox
            lines += [
                "",
                "## The workflow sandbox's cost",
                "",
                f"Two workers of their own on the same dev server: `python -m worker` (the "
                f"default sandbox, decision 0015) and `python -m tests.bench.passthrough_worker` "
                f"(every module passed through, as before it). Each parks "
                f"{s.default.parked:,} orders, then runs whole orders ({self.sizes.sandbox_whole} "
                f"per round, two rounds each, in turn), its CPU read over each round.",
                "",
                "| workflow runner | worker CPU / whole order | VmRSS before → parked "
                "| memory / parked order |",
                "|---|---:|---:|---:|",
            ]
            for w in (s.default, s.passthrough):
                lines.append(
                    f"| {w.runner} | {w.cpu_per_order * 1000:.1f} ms "
                    f"| {w.rss_before / 2**20:.0f} → {w.rss_parked / 2**20:.0f} MiB "
                    f"| {w.bytes_per_order / 1024:.0f} KiB |"
                )
            lines += [
                "",
                f"The default sandbox costs **{s.cpu_ratio:.2f}×** the worker CPU per order and "
                f"**{s.memory_ratio:.2f}×** the memory per cached order.",
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

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (left, right), (dev, parked) = axes
    # Single RPCs only: a whole order's CPU would dwarf them.
    rpcs = [c for c in report.comparisons if c.rpcs == 1]
    if rpcs:
        names = [c.name for c in rpcs]
        xs = list(range(len(rpcs)))
        width = 0.38
        grpc_aio = [c.grpc_aio * 1e6 for c in rpcs]
        raw_client = [c.raw.cpu_per_call * 1e6 for c in rpcs]
        left.bar([x - width / 2 for x in xs], grpc_aio, width, label="floor: grpc.aio")
        left.bar(
            [x - width / 2 for x in xs],
            raw_client,
            width,
            bottom=grpc_aio,
            label="floor: raw temporalio client",
        )
        left.bar(
            [x + width / 2 for x in xs],
            [c.grpc.cpu_per_call * 1e6 for c in rpcs],
            width,
            color=["tab:green" if c.cpu_met else "tab:red" for c in rpcs],
            label="gRPC server (green: within budget)",
        )
        for x, c in zip(xs, rpcs, strict=True):
            budget = (c.floor + c.budget) * 1e6
            left.plot([x - 0.4, x + 0.4], [budget, budget], color="black", linestyle="--")
        left.set_xticks(xs, names, rotation=15)
        left.set_ylabel("CPU per call, µs")
        left.set_title("Server CPU per RPC against its floor (dashed: floor + 250 µs)")
        left.legend(fontsize="small")
    else:
        left.set_axis_off()
    comparisons = report.comparisons
    if comparisons:
        xs = list(range(len(comparisons)))
        ratios = [c.ratio for c in comparisons]
        colors = ["tab:green" if c.met else "tab:red" for c in comparisons]
        right.bar(xs, ratios, 0.6, color=colors)
        for x, c in zip(xs, comparisons, strict=True):
            right.plot([x - 0.35, x + 0.35], [c.goal, c.goal], color="black", linestyle="--")
            right.text(x, c.ratio + 0.02, ratio_text(c.ratio, c.goal), ha="center")
        right.set_xticks(xs, [c.name for c in comparisons], rotation=15)
        right.set_ylim(0, max(1.2, max(ratios) + 0.15))
        right.set_ylabel("gRPC / raw throughput")
        right.set_title(
            f"gRPC / raw, {report.concurrency} callers each side (dashed: goal; green: met)"
        )
    else:
        right.set_axis_off()
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


COMPARED = ("create", "get", "status", "estimate", "pay", "cancel", "list", "whole")


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
    raw: RawProcess | None = None
    try:
        tuned = await start_processes(root, "tuned", tuning=tuning, worker_env={})
        clusters.append(tuned.cluster)
        raw = await RawProcess.start(tuned)
        bench = Bench(tuned, raw, sizes, args.concurrency, log)
        log("started; warming up")
        await bench.warm_up()
        comparisons: list[Comparison] = []
        for phase in args.phases:
            if phase in COMPARED:
                if phase not in ("create", "list", "whole") and not bench.pending:
                    raise SystemExit(f"phase {phase} needs the create phase first")
                log(f"{phase}")
                comparisons.append(await getattr(bench, phase)())
        one_caller = None
        if "one-caller" in args.phases:
            log("CreateOrder at one caller")
            one_caller = await bench.one_caller()
        await raw.stop()
        raw = None
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
        sandbox = None
        if "sandbox" in args.phases:
            log("the workflow sandbox: default vs every module passed through")
            sandbox = await sandbox_cost(tuned, sizes, args.concurrency, log)
    except BaseException:
        log(f"failed: the processes' logs are under {root}")
        raise
    finally:
        if raw is not None:
            await raw.stop()
        for cluster in clusters:
            with contextlib.suppress(Exception):
                await cluster.shutdown()
        kill_strays()
    # Hundreds of MB of Temporal state: kept only when something went wrong.
    shutil.rmtree(root, ignore_errors=True)
    return Report(
        comparisons=comparisons,
        one_caller=one_caller,
        devserver=devserver,
        parked=parked,
        sandbox=sandbox,
        concurrency=args.concurrency,
        sizes=sizes,
        quick=args.quick,
        started_at=started_at,
        duration=time.perf_counter() - began,
        load_before=load_before,
        load_after=os.getloadavg(),
        temporal_version=temporal_version(),
    )


PHASES = (*COMPARED, "one-caller", "devserver", "parked", "sandbox")


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
    chart(report, args.out / "chart.png")
    print(f"\nwrote {args.out / 'results.md'} and {args.out / 'chart.png'}")
    return 0


if __name__ == "__main__":
    exit_without_finalization(run(sys.argv[1:]))
