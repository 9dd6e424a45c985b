"""Real processes: a Temporal dev server, workers and gRPC servers (fault tests, benchmark).

Everything runs as it does in production, one OS process each, started from
this repository with the venv's interpreter: `temporal server start-dev`,
`python -m worker`, `python -m server`. Each process gets its own process
group, so a kill reaches everything it started, and its output goes to a log
file under the test's temporary folder (printed when a test fails).

    async with open_cluster(tmp_path, simulation=...) as cluster:
        await cluster.start_temporal()
        worker = await cluster.start_worker()
        server = await cluster.start_server()
        ...
        await worker.kill()          # SIGKILL, for real
        worker = await cluster.start_worker()

Ports are always free ones (the OS picks them); nothing is fixed. On leaving
the block every process still running is killed, whatever happened. Workers
and servers encrypt with the session's test keys (tests/support/keys.py), given
in their environment, as `make run` gives its processes a keys file.

Also here:

- `partition_proxy()`: a worker reaches Temporal through it (tests/support/proxy.py),
  and `partition()` cuts the network, so a worker can finish an effect Temporal
  never hears of;
- `FailoverClient`: the small client a user of two servers would write,
  round-robin, a call failing with UNAVAILABLE retried on the next server;
- `audit_ledger`: the providers' ledger (ORDER_SIM_LEDGER, shared by every
  worker of the cluster) against the orders' outcomes: one charge per paid
  order, one refund per order cancelled after capture, and so on;
- `all_waiting_for_payment`, `all_closed`, `check_final_states`: the orders'
  progress and their end states as GetOrder shows them, for the fault tests;
- `Cluster.stack()`: a worker and a server of the cluster as a `Stack`
  (tests/support/stack.py), the view the in-process stacks give.
- `new_server_process()`: `python -m server` as `Cluster.start_server` starts it, for a
  dev server that is not a cluster's (the in-process tests' own).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import grpc
import temporalio.api.enums.v1 as enums
import temporalio.api.taskqueue.v1 as taskqueue
import temporalio.api.workflowservice.v1 as workflowservice
from grpc_health.v1 import health_pb2, health_pb2_grpc
from temporalio.client import Client, WorkflowExecutionStatus

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from activities.providers.ledger import Effect, EffectKind, Ledger
from tests.support.env import BIN, ROOT, clean_environ, free_port
from tests.support.keys import key_variables, with_codec
from tests.support.money import AnyMoney, money_moved_problems
from tests.support.polling import eventually
from tests.support.proxy import Proxy
from tests.support.stack import Stack, async_stub
from workflows import search_attributes
from workflows.models import NotificationKind, workflow_id_for
from workflows.money import Money

SERVICE_NAME = "acme.orders.v1.OrderService"
HOSTNAME = socket.gethostname()
T = TypeVar("T")


# --- Processes ------------------------------------------------------------------------------


# Every process group started and not yet reaped, so nothing outlives the tests.
_LIVE: dict[int, Process] = {}


@dataclass
class Process:
    """One OS process (and its process group), its command and its log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    starts: int = 0

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def spawn(self) -> None:
        """Starts the command in a new process group, appending its output to the log file."""
        assert not self.running, f"{self.name} is already running"
        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start #{self.starts}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group: killpg reaches its children
            )
        _LIVE[self.process.pid] = self

    async def signal(self, sig: signal.Signals, *, within: float = 30.0) -> int:
        """Sends `sig` to the whole process group and waits for the process to exit.

        Returns the exit status (negative: killed by that signal). A process
        that does not exit in time is SIGKILLed and the test fails.
        """
        assert self.process is not None
        process = self.process
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
        try:
            async with asyncio.timeout(within):
                code = await process.wait()
        except TimeoutError:
            self._kill_group()
            await process.wait()
            raise AssertionError(f"{self.name} ignored {sig.name} for {within:g} s") from None
        finally:
            if process.returncode is not None:
                _LIVE.pop(process.pid, None)
        # Children of the group that outlived the leader (there should be none).
        self._kill_group()
        return code

    async def kill(self) -> int:
        """SIGKILL: the process ends at once, no cleanup of any kind."""
        return await self.signal(signal.SIGKILL)

    def _kill_group(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)

    async def until(
        self,
        probe: Callable[[], Awaitable[T]],
        accept: Callable[[T], bool],
        *,
        within: float,
        interval: float = 0.1,
        what: str = "ready",
    ) -> T:
        """`eventually`, failing at once if the process exits; its log's tail in the failure."""

        async def alive() -> T:
            if not self.running:
                raise ProcessLookupError(f"{self.name} exited")
            return await probe()

        try:
            return await eventually(
                alive, accept, within=within, interval=interval, what=f"{self.name} {what}"
            )
        except (AssertionError, ProcessLookupError) as err:
            raise AssertionError(f"{err}:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(no log)"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def kill_strays() -> list[str]:
    """SIGKILLs every process group the harness started and that is still alive."""
    names = []
    for pid, process in list(_LIVE.items()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
            names.append(f"{process.name} (pid {pid})")
        _LIVE.pop(pid, None)
    return names


def _base_env(extra: Mapping[str, str]) -> dict[str, str]:
    return clean_environ({"PYTHONUNBUFFERED": "1", **extra})


# --- Temporal ---------------------------------------------------------------------------------


@dataclass
class TemporalServer:
    """`temporal server start-dev` with its state in a SQLite file, on a free port."""

    process: Process
    db_path: Path
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, *, within: float = 60.0) -> float:
        """Starts, or restarts on the same file and port; returns the seconds until it answers."""
        started = time.monotonic()
        await self.process.spawn()
        await self.wait_ready(within=within)
        return time.monotonic() - started

    async def wait_ready(self, *, within: float) -> None:
        """Until the frontend answers and the default namespace exists."""

        async def problem() -> str:
            try:
                async with asyncio.timeout(5):
                    client = await Client.connect(self.address)
                    await client.workflow_service.describe_namespace(
                        workflowservice.DescribeNamespaceRequest(namespace="default"),
                        retry=False,
                        timeout=timedelta(seconds=3),
                    )
            except Exception as err:
                return str(err) or type(err).__name__
            return ""

        await self.process.until(problem, lambda p: not p, within=within, interval=0.2)


# --- Worker and server ------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    """`python -m worker` on a task queue (the cluster's, unless started on another)."""

    process: Process
    cluster: Cluster
    task_queue: str

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def identity(self) -> str:
        """The identity the worker's Temporal client reports (temporalio's default)."""
        return f"{self.pid}@{HOSTNAME}"

    async def start(self, *, within: float = 60.0) -> float:
        """Starts it and waits until it polls both workflow and activity tasks; seconds taken."""
        started = time.monotonic()
        await self.process.spawn()
        await self.wait_polling(within=within)
        return time.monotonic() - started

    async def wait_polling(self, *, within: float) -> None:
        """Until Temporal lists this process among the queue's workflow and activity pollers."""

        async def missing() -> list[str]:
            try:
                return [
                    enums.TaskQueueType.Name(kind)
                    for kind in (
                        enums.TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                        enums.TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
                    )
                    if self.identity not in await self.cluster.pollers(kind, self.task_queue)
                ]
            except Exception as err:
                return [f"describe_task_queue failed: {err}"]

        await self.process.until(missing, lambda m: not m, within=within, what="polling")

    async def kill(self) -> int:
        return await self.process.kill()


@dataclass
class ServerProcess:
    """`python -m server` on 127.0.0.1, its port chosen by the OS the first time and kept."""

    process: Process
    port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, *, within: float = 60.0, serving: bool = True) -> float:
        """Starts it (on its previous port, if it had one); returns the seconds until ready.

        Ready means listening, and with `serving` also health SERVING (Temporal reachable).
        """
        started = time.monotonic()
        self.process.argv[self.process.argv.index("--port") + 1] = str(self.port)
        log_offset = len(self.process.log_text())
        await self.process.spawn()
        if self.port == 0:
            self.port = await self._bound_port(log_offset, within=within)
        if serving:
            await self.process.until(
                lambda: health(self.target, rpc_timeout=1.0),
                lambda status: status == health_pb2.HealthCheckResponse.SERVING,
                within=within,
                what=f"{self.target} SERVING",
            )
        return time.monotonic() - started

    async def _bound_port(self, log_offset: int, *, within: float) -> int:
        """The port the server logged it listens on, this start (after `log_offset`)."""
        marker = "OrderService listening on 127.0.0.1:"

        async def port() -> int:
            text = self.process.log_text()[log_offset:]
            return int(text.split(marker, 1)[1].split()[0]) if marker in text else 0

        return await self.process.until(port, bool, within=within, interval=0.05, what="listening")

    async def kill(self) -> int:
        return await self.process.kill()


def new_server_process(
    name: str,
    log_path: Path,
    *,
    temporal_address: str,
    task_queue: str,
    flags: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> ServerProcess:
    """`python -m server` on 127.0.0.1 and the task queue, not started yet.

    Its port is the OS's pick; its environment has the session's keys, and `env`
    added. Also for a server in front of a dev server that is not a Cluster's.
    """
    argv = [
        *(sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0"),
        *("--temporal-address", temporal_address, "--task-queue", task_queue),
        *flags,
    ]
    environ = _base_env({**key_variables(), **(env or {})})
    return ServerProcess(Process(name, argv, environ, log_path))


async def health(target: str, *, rpc_timeout: float) -> int | str:
    """The server's grpc.health.v1 status for OrderService, or the error code's name."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=rpc_timeout
            )
        except grpc.aio.AioRpcError as err:
            return err.code().name
        status: int = response.status
        return status


# --- The cluster ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Simulation:
    """Simulated provider durations, in seconds, passed to the workers as ORDER_SIM_*."""

    inventory: float = 0.2
    payment: float = 1.0
    prepare: float = 1.0
    ship: float = 0.5
    deliver: float = 1.0
    email: float = 0.0

    def env(self) -> dict[str, str]:
        return {
            "ORDER_SIM_INVENTORY_SECONDS": str(self.inventory),
            "ORDER_SIM_PAYMENT_SECONDS": str(self.payment),
            "ORDER_SIM_PREPARE_SECONDS": str(self.prepare),
            "ORDER_SIM_SHIP_SECONDS": str(self.ship),
            "ORDER_SIM_DELIVER_SECONDS": str(self.deliver),
            "ORDER_SIM_EMAIL_SECONDS": str(self.email),
        }


@dataclass
class Cluster:
    """One Temporal dev server, any number of workers and gRPC servers, one ledger and outbox."""

    root: Path
    simulation: Simulation
    # Whether the workers record every effect in the shared ledger (the benchmark's do not).
    ledger_effects: bool = True
    task_queue: str = field(default_factory=lambda: f"orders-{uuid.uuid4().hex[:8]}")
    temporal: TemporalServer | None = None
    workers: list[WorkerProcess] = field(default_factory=list)
    servers: list[ServerProcess] = field(default_factory=list)
    proxies: list[Proxy] = field(default_factory=list)
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    _client: Client | None = None

    @property
    def ledger_path(self) -> Path:
        return self.root / "providers.sqlite"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @functools.cached_property
    def ledger(self) -> Ledger:
        """The workers' shared ledger, read by the tests."""
        return Ledger(self.ledger_path)

    @property
    def processes(self) -> list[Process]:
        found = [self.temporal.process] if self.temporal else []
        return found + [w.process for w in self.workers] + [s.process for s in self.servers]

    @property
    def pids(self) -> list[int]:
        """Temporal's, the workers' and the servers' process ids, of those running."""
        return [p.pid for p in self.processes if p.running]

    async def start_temporal(
        self, *, name: str = "temporal", flags: Sequence[str] = (), log_level: str = "warn"
    ) -> TemporalServer:
        """The dev server, state in <root>/<name>.db, custom search attributes registered.

        `flags` go to `temporal server start-dev` as they are (the benchmark's SQLite pragmas).
        """
        assert self.temporal is None
        port = free_port()
        db_path = self.root / f"{name}.db"
        argv = [
            str(BIN / "temporal"),
            "server",
            "start-dev",
            "--db-filename",
            str(db_path),
            "--ip",
            "127.0.0.1",
            "--port",
            str(port),
            "--headless",
            "--log-level",
            log_level,
            *flags,
            *search_attributes.dev_server_flags(),
        ]
        process = Process(name, argv, _base_env({}), self.root / "logs" / f"{name}.log")
        self.temporal = TemporalServer(process, db_path, port)
        await self.temporal.start()
        return self.temporal

    async def client(self) -> Client:
        """The test's own Temporal client (it reconnects by itself after a restart), with
        the processes' keys (tests/support/keys.py)."""
        assert self.temporal is not None
        if self._client is None:
            self._client = with_codec(await Client.connect(self.temporal.address))
        return self._client

    async def describe_queue(
        self,
        kind: enums.TaskQueueType.ValueType,
        task_queue: str | None = None,
        *,
        stats: bool = False,
    ) -> workflowservice.DescribeTaskQueueResponse:
        """Temporal's description of a task queue (the cluster's unless told): pollers, stats."""
        client = await self.client()
        return await client.workflow_service.describe_task_queue(
            workflowservice.DescribeTaskQueueRequest(
                namespace="default",
                task_queue=taskqueue.TaskQueue(
                    name=task_queue or self.task_queue,
                    kind=enums.TaskQueueKind.TASK_QUEUE_KIND_NORMAL,
                ),
                task_queue_type=kind,
                report_stats=stats,
            ),
            retry=False,
            timeout=timedelta(seconds=3),
        )

    async def pollers(
        self, kind: enums.TaskQueueType.ValueType, task_queue: str | None = None
    ) -> set[str]:
        """Identities of the task queue's pollers (the cluster's queue), as Temporal lists them."""
        response = await self.describe_queue(kind, task_queue)
        return {poller.identity for poller in response.pollers}

    def _temporal_flags(self, address: str | None = None, task_queue: str = "") -> list[str]:
        assert self.temporal is not None, "start Temporal first"
        return [
            "--temporal-address",
            address or self.temporal.address,
            "--task-queue",
            task_queue or self.task_queue,
        ]

    async def start_worker(
        self,
        *,
        proxy: Proxy | None = None,
        task_queue: str = "",
        env: Mapping[str, str] | None = None,
        module: str = "worker",
        name: str = "",
        within: float = 60.0,
    ) -> WorkerProcess:
        """A new `python -m worker` process, polling once this returns.

        With `proxy`, it reaches Temporal through it (see `partition_proxy`); with
        `task_queue`, it polls that queue instead of the cluster's; `env` adds to
        (or overrides) its ORDER_* settings; `module` runs another worker taking the
        same flags (the benchmark's passthrough one).
        """
        name = name or f"worker-{len(self.workers) + 1}"
        ledger = {"ORDER_SIM_LEDGER": str(self.ledger_path)} if self.ledger_effects else {}
        settings = {
            **self.simulation.env(),
            "ORDER_OUTBOX_DIR": str(self.outbox),
            **ledger,
            **key_variables(),
        }
        address = proxy.address if proxy is not None else None
        flags = self._temporal_flags(address, task_queue)
        argv = [sys.executable, "-m", module, *flags]
        log = self.root / "logs" / f"{name}.log"
        process = Process(name, argv, _base_env({**settings, **(env or {})}), log)
        worker = WorkerProcess(process, self, task_queue or self.task_queue)
        self.workers.append(worker)
        await worker.start(within=within)
        return worker

    async def start_server(
        self,
        *,
        temporal_rpc_timeout: str = "10s",
        flags: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        name: str = "",
        within: float = 60.0,
    ) -> ServerProcess:
        """A new `python -m server` process, SERVING once this returns.

        `flags` go to it after the cluster's (a metrics port, say); `env` adds to its
        environment.
        """
        assert self.temporal is not None, "start Temporal first"
        name = name or f"server-{len(self.servers) + 1}"
        server = new_server_process(
            name,
            self.root / "logs" / f"{name}.log",
            temporal_address=self.temporal.address,
            task_queue=self.task_queue,
            flags=["--temporal-rpc-timeout", temporal_rpc_timeout, *flags],
            env=env,
        )
        self.servers.append(server)
        await server.start(within=within)
        return server

    async def stack(self, server: ServerProcess | None = None) -> Stack:
        """The cluster as a Stack: its client, task queue and outbox, a stub on `server`.

        The first server unless told; its channel is closed with the cluster.
        """
        target = (server or self.servers[0]).target
        channel = grpc.aio.insecure_channel(target)
        self.channels.append(channel)
        client = await self.client()
        return Stack(client, self.task_queue, target, channel, async_stub(channel), self.outbox)

    async def partition_proxy(self) -> Proxy:
        """A proxy to Temporal whose network can be cut; closed with the cluster."""
        assert self.temporal is not None, "start Temporal first"
        proxy = Proxy(self.temporal.address)
        await proxy.start()
        self.proxies.append(proxy)
        return proxy

    def logs(self, lines: int = 60) -> str:
        return "\n\n".join(
            f"----- {p.name} ({p.log_path}) -----\n{p.log_tail(lines)}" for p in self.processes
        )

    async def shutdown(self) -> None:
        """Kills every process still running: servers, workers, then Temporal."""
        for channel in self.channels:
            await channel.close(grace=None)
        for process in reversed(self.processes):
            if process.running:
                with contextlib.suppress(Exception):
                    await process.kill()
        for proxy in self.proxies:
            await proxy.close()


@contextlib.asynccontextmanager
async def open_cluster(
    root: Path, *, simulation: Simulation | None = None
) -> AsyncIterator[Cluster]:
    """A cluster under `root`; every process is killed on the way out, and logs shown on failure."""
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    cluster = Cluster(root, simulation or Simulation())
    try:
        yield cluster
    except BaseException:
        print(f"\n===== process logs (last lines) =====\n{cluster.logs()}", file=sys.stderr)
        raise
    finally:
        await cluster.shutdown()


# --- A client of several servers --------------------------------------------------------------


@dataclass
class CallStats:
    calls: int = 0
    retries: int = 0
    # Failed attempts by target and status code name.
    failures: dict[str, int] = field(default_factory=dict)


class FailoverClient:
    """OrderService over several servers: round-robin, and UNAVAILABLE retried on the next one.

    What a user with two servers would write. A call retried after its
    server died having done the work does not do it twice: CreateOrder with
    a request_id returns the same order, ConfirmPayment with the same
    transaction id answers "already recorded", the reads just read; only
    CancelOrder then answers FAILED_PRECONDITION ("already cancelled").
    """

    def __init__(
        self,
        targets: Sequence[str],
        *,
        attempt_timeout: float = 15.0,
        give_up_after: float = 90.0,
    ) -> None:
        self.targets = list(targets)
        self._channels = {t: grpc.aio.insecure_channel(t) for t in self.targets}
        self._stubs = {t: pb_grpc.OrderServiceStub(c) for t, c in self._channels.items()}
        self._next = itertools.cycle(range(len(self.targets)))
        self.attempt_timeout = attempt_timeout
        self.give_up_after = give_up_after
        self.stats = CallStats()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(grace=None)

    async def call(self, method: str, request: Any) -> Any:
        """Calls OrderService/`method`, moving to the next server on UNAVAILABLE."""
        self.stats.calls += 1
        start = next(self._next)
        deadline = time.monotonic() + self.give_up_after
        backoff = 0.05
        for attempt in itertools.count():
            target = self.targets[(start + attempt) % len(self.targets)]
            rpc = getattr(self._stubs[target], method)
            try:
                return await rpc(request, timeout=self.attempt_timeout)
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                key = f"{target} {err.code().name}"
                self.stats.failures[key] = self.stats.failures.get(key, 0) + 1
                self.stats.retries += 1
            # Straight to the next server; a short pause once every server was tried.
            if (attempt + 1) % len(self.targets) == 0:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
        raise AssertionError("unreachable")

    async def create(self, request: pb.CreateOrderRequest) -> pb.CreateOrderResponse:
        response: pb.CreateOrderResponse = await self.call("CreateOrder", request)
        return response

    async def pay(self, request: pb.ConfirmPaymentRequest) -> pb.ConfirmPaymentResponse:
        response: pb.ConfirmPaymentResponse = await self.call("ConfirmPayment", request)
        return response

    async def cancel(self, request: pb.CancelOrderRequest) -> pb.CancelOrderResponse:
        response: pb.CancelOrderResponse = await self.call("CancelOrder", request)
        return response

    async def get(self, order_id: str) -> pb.Order:
        response: pb.Order = await self.call("GetOrder", pb.GetOrderRequest(order_id=order_id))
        return response


# --- What the providers must have done ----------------------------------------------------------


class Outcome(StrEnum):
    """How an order ended, which decides the effects it must have had."""

    DELIVERED = "delivered"
    CANCELLED_UNPAID = "cancelled before payment"
    CANCELLED_REFUNDED = "cancelled after capture"


EXPECTED_EMAILS: Mapping[Outcome, frozenset[NotificationKind]] = {
    Outcome.DELIVERED: frozenset(
        {
            NotificationKind.ORDER_RECEIVED,
            NotificationKind.PAYMENT_CONFIRMED,
            NotificationKind.ORDER_SHIPPED,
            NotificationKind.ORDER_DELIVERED,
        }
    ),
    Outcome.CANCELLED_UNPAID: frozenset(
        {NotificationKind.ORDER_RECEIVED, NotificationKind.ORDER_CANCELLED}
    ),
    Outcome.CANCELLED_REFUNDED: frozenset(
        {
            NotificationKind.ORDER_RECEIVED,
            NotificationKind.PAYMENT_CONFIRMED,
            NotificationKind.ORDER_CANCELLED,
        }
    ),
}


def expected_counts(outcome: Outcome) -> dict[EffectKind, int]:
    """Effects of each kind an order with this outcome must have had, exactly."""
    paid = outcome is not Outcome.CANCELLED_UNPAID
    cancelled = outcome is not Outcome.DELIVERED
    return {
        EffectKind.RESERVE: 1,
        EffectKind.RELEASE: int(cancelled),
        EffectKind.CHARGE: int(paid),
        EffectKind.REFUND: int(paid and cancelled),
        EffectKind.EMAIL: len(EXPECTED_EMAILS[outcome]),
    }


@dataclass
class LedgerAudit:
    """The ledger checked against the orders' outcomes."""

    violations: list[str] = field(default_factory=list)
    effects: Counter[EffectKind] = field(default_factory=Counter)
    attempts: Counter[EffectKind] = field(default_factory=Counter)
    # Attempts that found the effect already made and did not repeat it.
    repeats: Counter[EffectKind] = field(default_factory=Counter)
    # Effects whose key was attempted by more than one worker process.
    across_processes: Counter[EffectKind] = field(default_factory=Counter)

    def summary(self) -> str:
        return ", ".join(
            f"{kind.value} {self.effects[kind]} (attempts {self.attempts[kind]}, repeats "
            f"absorbed {self.repeats[kind]}, across processes {self.across_processes[kind]})"
            for kind in EffectKind
        )


_MESSAGE_ID = re.compile(rb"^Message-ID: (.+?)\r?$", re.MULTILINE | re.IGNORECASE)


async def audit_ledger(
    ledger: Ledger,
    outcomes: Mapping[str, Outcome],
    outbox: Path | None = None,
    totals: Mapping[str, AnyMoney] | None = None,
) -> LedgerAudit:
    """Checks that each order had exactly the effects its outcome calls for, and no other order any.

    One charge per paid order, one refund per order cancelled after capture
    (same transaction, same amount) and none otherwise, one reservation per
    order and one release per cancelled one, one email of each kind the
    outcome calls for; with `outbox`, exactly those .eml files, each the
    ledger's message. The money rule (tests/support/money.py): a paid order
    captured exactly once, exactly its total (from `totals`; without, its
    one charge's amount), and a refunded one refunded exactly that, once.
    """
    audit = LedgerAudit()
    effects = await ledger.effects()
    attempts = await ledger.attempts()
    by_order: defaultdict[str, list[Effect]] = defaultdict(list)
    for effect in effects:
        by_order[effect.order_id].append(effect)
        audit.effects[effect.kind] += 1
    attempt_pids: defaultdict[tuple[EffectKind, str], set[int]] = defaultdict(set)
    for attempt in attempts:
        audit.attempts[attempt.kind] += 1
        attempt_pids[(attempt.kind, attempt.key)].add(attempt.pid)
    recorded_at = {(e.kind, e.key): e.recorded_at for e in effects}
    for attempt in attempts:
        made = recorded_at.get((attempt.kind, attempt.key))
        if made is not None and attempt.at > made:
            audit.repeats[attempt.kind] += 1
    for effect in effects:
        if len(attempt_pids[(effect.kind, effect.key)]) > 1:
            audit.across_processes[effect.kind] += 1

    if strays := sorted(set(by_order) - set(outcomes)):
        audit.violations.append(f"effects for orders nobody placed: {strays[:5]}")
    for order_id, outcome in outcomes.items():
        mine = by_order.get(order_id, [])
        counts = Counter(e.kind for e in mine)
        for kind, expected in expected_counts(outcome).items():
            if counts[kind] != expected:
                audit.violations.append(
                    f"{order_id} ({outcome.value}): {counts[kind]} {kind.value} effect(s), "
                    f"expected {expected}"
                )
        emails = {e.params()["kind"] for e in mine if e.kind is EffectKind.EMAIL}
        if emails != {k.value for k in EXPECTED_EMAILS[outcome]}:
            audit.violations.append(f"{order_id} ({outcome.value}): emails {sorted(emails)}")
        charges = [e.params() for e in mine if e.kind is EffectKind.CHARGE]
        refunds = [e.params() for e in mine if e.kind is EffectKind.REFUND]
        audit.violations.extend(
            f"{order_id} ({outcome.value}): {problem}"
            for problem in _money_problems(outcome, charges, refunds, (totals or {}).get(order_id))
        )
        for refund in refunds:
            if not any(
                (c["transaction_id"], c["amount"]) == (refund["transaction_id"], refund["amount"])
                for c in charges
            ):
                audit.violations.append(f"{order_id}: refund {refund} matches no charge")
        if outbox is not None:
            audit.violations.extend(_check_outbox(outbox, order_id, outcome, mine))
    return audit


def _money_problems(
    outcome: Outcome,
    charges: Sequence[Mapping[str, Any]],
    refunds: Sequence[Mapping[str, Any]],
    total: AnyMoney | None,
) -> list[str]:
    """The ledger's captures and refunds of one order against the money rule."""
    captures = [Money(**c["amount"]) for c in charges]
    if total is None and captures:
        total = captures[0]  # no total given: at least the refund must match the capture
    paid = outcome is not Outcome.CANCELLED_UNPAID
    captured = total if paid else None
    refunded = total if outcome is Outcome.CANCELLED_REFUNDED else None
    if paid and captured is None:
        return []  # no charge and no total: the count of charge effects says so already
    return money_moved_problems(
        captures, [Money(**r["amount"]) for r in refunds], captured=captured, refunded=refunded
    )


def _check_outbox(
    outbox: Path, order_id: str, outcome: Outcome, effects: Sequence[Effect]
) -> list[str]:
    folder = outbox / order_id
    files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    expected = sorted(f"{kind.value}.eml" for kind in EXPECTED_EMAILS[outcome])
    if files != expected:
        return [f"{order_id}: outbox holds {files}, expected {expected}"]
    problems = []
    for effect in effects:
        if effect.kind is EffectKind.EMAIL:
            data = (folder / f"{effect.params()['kind']}.eml").read_bytes()
            match = _MESSAGE_ID.search(data)
            found = match.group(1).decode() if match else None
            if found != effect.result:
                problems.append(f"{order_id}: outbox Message-ID {found} != ledger {effect.result}")
    return problems


# --- What the orders must show ------------------------------------------------------------

OUTCOME_STATUS: Mapping[Outcome, pb.OrderStatus.ValueType] = {
    Outcome.DELIVERED: pb.ORDER_STATUS_DELIVERED,
    Outcome.CANCELLED_UNPAID: pb.ORDER_STATUS_CANCELLED,
    Outcome.CANCELLED_REFUNDED: pb.ORDER_STATUS_CANCELLED,
}


async def all_waiting_for_payment(
    client: FailoverClient, order_ids: Sequence[str], *, within: float
) -> None:
    """Until every order is PENDING with its inventory reserved (it is PENDING from the start)."""
    await asyncio.gather(
        *(
            eventually(
                functools.partial(client.get, order_id),
                lambda order: (
                    order.status == pb.ORDER_STATUS_PENDING
                    and bool(order.inventory_info.reservation_id)
                ),
                within=within,
                what=f"{order_id} reserved and waiting for payment",
            )
            for order_id in order_ids
        )
    )


async def all_closed(cluster: Cluster, order_ids: Iterable[str], *, within: float) -> None:
    """Until Temporal reports every order's workflow as completed."""
    temporal = await cluster.client()
    completed = WorkflowExecutionStatus.COMPLETED

    async def closed(order_id: str) -> None:
        handle = temporal.get_workflow_handle(workflow_id_for(order_id))
        await eventually(
            handle.describe,
            lambda d: d.status == completed,
            within=within,
            interval=0.5,
            what=f"{order_id}'s workflow completed",
        )

    await asyncio.gather(*(closed(o) for o in order_ids))


async def refund_ids(ledger: Ledger) -> dict[str, str]:
    return {e.order_id: e.result for e in await ledger.effects(EffectKind.REFUND)}


def check_final_states(
    orders: Mapping[str, pb.Order], outcomes: Mapping[str, Outcome], refund_ids: Mapping[str, str]
) -> list[str]:
    """What GetOrder shows, against each order's expected outcome."""
    problems = []
    for order_id, outcome in outcomes.items():
        order = orders[order_id]
        status = pb.OrderStatus.Name(order.status)
        if order.status != OUTCOME_STATUS[outcome]:
            problems.append(f"{order_id}: {status}, expected {outcome.value}")
            continue
        if order.rejected_payments:
            problems.append(f"{order_id}: payments rejected: {list(order.rejected_payments)}")
        if not order.inventory_info.reservation_id:
            problems.append(f"{order_id}: no reservation")
        cancelled = outcome is not Outcome.DELIVERED
        if order.inventory_info.released != cancelled:
            problems.append(f"{order_id}: inventory released={order.inventory_info.released}")
        if outcome is Outcome.DELIVERED and not (
            order.delivered_at.seconds and order.shipment_info.tracking_number
        ):
            problems.append(f"{order_id}: delivered without shipment or delivery time")
        refunded = order.refund_info.refund_id
        if refunded != refund_ids.get(order_id, ""):
            problems.append(
                f"{order_id}: refund {refunded!r} shown, ledger has {refund_ids.get(order_id)!r}"
            )
        paid = outcome is not Outcome.CANCELLED_UNPAID
        if bool(order.payment_info.transaction_id) != paid:
            problems.append(f"{order_id}: payment_info {order.payment_info}")
    return problems
