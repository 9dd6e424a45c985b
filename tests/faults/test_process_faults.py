"""Faults with real processes, killed for real: no order is lost, no effect happens twice.

Each test starts its own Temporal dev server, workers and gRPC servers as OS
processes (tests/support/cluster.py) and kills them with real signals:

- a worker SIGKILLed while orders wait for payment, inside activities, and
  right after an effect (between activities), restarted each time;
- two workers and two servers on one Temporal, one of each SIGKILLed under load;
- the Temporal dev server stopped (SIGTERM, SIGKILL) and restarted on its state file;
- the gRPC server restarted after SIGTERM and after SIGKILL.

The simulated providers record every effect in one ledger shared by all the
workers (ORDER_SIM_LEDGER, activities/ledger.py), so "charged twice" is
counted across processes, as a real gateway would see it. Every test prints
its figures (orders, kills, recovery times, error codes and latencies), also
without `-s`.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import temporalio.api.enums.v1 as enums

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from activities.providers.ledger import EffectKind, Ledger
from tests.support.cluster import (
    CallStats,
    Cluster,
    FailoverClient,
    LedgerAudit,
    Outcome,
    ServerProcess,
    Simulation,
    all_closed,
    all_waiting_for_payment,
    audit_ledger,
    check_final_states,
    health,
    kill_strays,
    open_cluster,
    refund_ids,
)
from tests.support.orders import create_request, payment_request
from tests.support.polling import eventually

SERVING = 1
NOT_SERVING = 2
WORKFLOW_QUEUE = enums.TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED
TERMINAL = {pb.ORDER_STATUS_DELIVERED, pb.ORDER_STATUS_CANCELLED}

# --- Figures and clean-up -----------------------------------------------------------------


@dataclass
class Figures:
    """What a test measured, printed when it ends (whatever the capture setting)."""

    title: str
    lines: list[tuple[str, str]] = field(default_factory=list)

    def add(self, label: str, value: object) -> None:
        text = f"{value:.2f} s" if isinstance(value, float) else str(value)
        self.lines.append((label, text))

    def render(self) -> str:
        width = max((len(label) for label, _ in self.lines), default=0)
        body = "\n".join(f"  {label.ljust(width)}  {value}" for label, value in self.lines)
        return f"\n[faults] {self.title}\n{body}"


@pytest.fixture
def figures(
    request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> Iterator[Figures]:
    collected = Figures(request.node.name)
    yield collected
    with capsys.disabled():
        print(collected.render())


@pytest.fixture(autouse=True)
def no_stray_processes() -> Iterator[None]:
    yield
    strays = kill_strays()
    assert not strays, f"processes were left running (now killed): {strays}"


# --- Helpers ----------------------------------------------------------------------------------


def new_order(n: int) -> pb.CreateOrderRequest:
    """The seed's order, safe to retry (request_id), with its own customer address."""
    return create_request(request_id=str(uuid.uuid4()), customer_email=f"customer-{n}@example.com")


def payment(order_id: str, n: int) -> pb.ConfirmPaymentRequest:
    return payment_request(order_id, f"TXN-{n}")


def cancellation(order_id: str) -> pb.CancelOrderRequest:
    return pb.CancelOrderRequest(order_id=order_id, reason="Customer changed their mind")


async def cancel(client: FailoverClient, order_id: str) -> None:
    """CancelOrder, retried on UNAVAILABLE; a retry of a cancel that got through is fine."""
    try:
        await client.cancel(cancellation(order_id))
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
            raise
        refusal = err.details()
    else:
        return
    order = await client.get(order_id)
    assert order.status == pb.ORDER_STATUS_CANCELLED, f"cancel refused: {refusal}"


async def reaching(
    client: FailoverClient,
    order_id: str,
    statuses: set[pb.OrderStatus.ValueType],
    *,
    within: float,
) -> pb.Order:
    """Polls GetOrder (through the retrying client) until the order has one of `statuses`."""
    return await eventually(
        lambda: client.get(order_id),
        lambda order: order.status in statuses,
        within=within,
        what=f"{order_id} reaching {sorted(pb.OrderStatus.Name(s) for s in statuses)}",
    )


async def all_reaching(
    client: FailoverClient,
    order_ids: Sequence[str],
    statuses: set[pb.OrderStatus.ValueType],
    *,
    within: float,
) -> list[pb.Order]:
    return list(
        await asyncio.gather(*(reaching(client, o, statuses, within=within) for o in order_ids))
    )


async def in_flight(ledger: Ledger, kind: EffectKind, pid: int) -> set[str]:
    """Keys `pid` is calling the provider about right now: attempted, with no effect yet."""
    done = {e.key for e in await ledger.effects(kind)}
    return {a.key for a in await ledger.attempts(kind) if a.pid == pid and a.key not in done}


async def charges_in_flight(ledger: Ledger, pid: int, *, within: float) -> set[str]:
    """Until `pid` is capturing payments: the keys of the charges it has in flight."""
    return await eventually(
        lambda: in_flight(ledger, EffectKind.CHARGE, pid),
        bool,
        within=within,
        interval=0.01,
        what=f"charges in flight on pid {pid}",
    )


async def health_becomes(server: ServerProcess, status: int) -> None:
    """Until the server's health check for OrderService answers `status`."""
    await eventually(
        lambda: health(server.target, rpc_timeout=1.0),
        lambda answer: answer == status,
        within=30,
        interval=0.05,
        what=f"health {'SERVING' if status == SERVING else 'NOT_SERVING'}",
    )


async def timed(call: Awaitable[object]) -> tuple[str, float]:
    """Awaits one RPC; its status code's name (OK if it succeeded) and how long it took."""
    started = time.monotonic()
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code().name, time.monotonic() - started
    return "OK", time.monotonic() - started


def since(started: float) -> float:
    return time.monotonic() - started


async def verify(
    cluster: Cluster, client: FailoverClient, outcomes: dict[str, Outcome], figures: Figures
) -> LedgerAudit:
    """Every order shows its expected end state, and the ledger holds exactly its effects.

    A terminal status comes before the workflow closes: the workflow still waits
    for its last emails, and an email that was on a killed worker is retried only
    after its start-to-close timeout. So the audit starts once every workflow has
    closed, which is the moment the workflow promises all its effects are done.
    """
    began = time.monotonic()
    await all_closed(cluster, outcomes, within=120)
    figures.add("every workflow closed, all its emails sent, after", since(began))
    ledger = cluster.ledger
    orders = {o: await client.get(o) for o in outcomes}
    problems = check_final_states(orders, outcomes, await refund_ids(ledger))
    totals = {order_id: order.total_amount for order_id, order in orders.items()}
    audit = await audit_ledger(ledger, outcomes, cluster.outbox, totals)
    figures.add("ledger", audit.summary())
    assert not problems + audit.violations, "\n".join(problems + audit.violations)
    return audit


# --- 1. The worker SIGKILLed at each stage ------------------------------------------------

STAGES = Simulation(inventory=0.2, payment=1.0, prepare=2.0, ship=0.5, deliver=1.0, email=0.1)
STAGE_ORDERS = 20
CANCEL_BEFORE_PAYMENT = range(0, 2)
CANCEL_WHILE_PREPARING = range(2, 5)


@pytest.mark.timeout(300)
async def test_worker_sigkilled_at_each_stage_loses_nothing_and_repeats_nothing(
    tmp_path: Path, figures: Figures
) -> None:
    """(a) while orders wait for payment, (b) inside activities, (c) between activities.

    (c) is the hardest case: the worker is cut off from Temporal while it
    captures payments, finishes them (the gateway has charged), and dies
    before Temporal hears of it. Temporal retries those charges on the next
    worker, and the gateway must answer them without charging again.
    """
    began = time.monotonic()
    async with open_cluster(tmp_path, simulation=STAGES) as cluster:
        await cluster.start_temporal()
        worker = await cluster.start_worker()
        server = await cluster.start_server(temporal_rpc_timeout="5s")
        client = FailoverClient([server.target], attempt_timeout=10.0, give_up_after=150.0)
        ledger = cluster.ledger
        try:
            created = await asyncio.gather(
                *(client.create(new_order(n)) for n in range(STAGE_ORDERS))
            )
            ids = [c.order_id for c in created]
            outcomes = dict.fromkeys(ids, Outcome.DELIVERED)
            for n in CANCEL_BEFORE_PAYMENT:
                outcomes[ids[n]] = Outcome.CANCELLED_UNPAID
            for n in CANCEL_WHILE_PREPARING:
                outcomes[ids[n]] = Outcome.CANCELLED_REFUNDED
            planned = Counter(o.value for o in outcomes.values())
            figures.add("orders", f"{STAGE_ORDERS}: {dict(planned)}")

            # (a) Every order reserved, emailed, and waiting for its payment.
            await eventually(
                lambda: ledger.effects(EffectKind.EMAIL),
                lambda emails: len(emails) == STAGE_ORDERS,
                within=60,
                what="every order waiting for payment",
            )
            killed = time.monotonic()
            await worker.kill()
            worker = await cluster.start_worker()
            figures.add("(a) SIGKILL while waiting for payment: new worker polling", since(killed))
            await all_reaching(client, ids, {pb.ORDER_STATUS_PENDING}, within=60)
            figures.add("(a) every order answering queries again", since(killed))

            for n in CANCEL_BEFORE_PAYMENT:
                await cancel(client, ids[n])
            paid = [n for n in range(STAGE_ORDERS) if n not in CANCEL_BEFORE_PAYMENT]
            await asyncio.gather(*(client.pay(payment(ids[n], n)) for n in paid))

            async def cancel_while_preparing(order_id: str) -> None:
                later = {pb.ORDER_STATUS_PREPARING, pb.ORDER_STATUS_SHIPPED}
                order = await reaching(
                    client, order_id, later | {pb.ORDER_STATUS_DELIVERED}, within=200
                )
                assert order.status == pb.ORDER_STATUS_PREPARING, f"{order_id} not seen preparing"
                await cancel(client, order_id)

            cancels = asyncio.gather(
                *(cancel_while_preparing(ids[n]) for n in CANCEL_WHILE_PREPARING)
            )

            # (b) Inside activities: payments being captured right now.
            cut_off = await charges_in_flight(ledger, worker.pid, within=30)
            killed_b = time.time()
            killed = time.monotonic()
            await worker.kill()
            proxy = await cluster.partition_proxy()
            worker = await cluster.start_worker(proxy=proxy)
            figures.add("(b) SIGKILL inside activities: charges cut off", len(cut_off))
            figures.add("(b) new worker polling", since(killed))

            # (c) Between activities: the new worker is cut off from Temporal while it
            # captures payments; they complete at the gateway, then it dies unheard.
            capturing = await charges_in_flight(ledger, worker.pid, within=90)
            proxy.partition()
            await eventually(
                lambda: ledger.effects(EffectKind.CHARGE),
                lambda charges: capturing <= {c.key for c in charges},
                within=30,
                what="the partitioned worker's charges captured",
            )
            killed_c = time.time()
            killed = time.monotonic()
            await worker.kill()
            # The network comes back: the dead worker's connections close, its polls end.
            await proxy.close()
            worker = await cluster.start_worker()
            figures.add(
                "(c) network cut + SIGKILL after capture: charges Temporal never heard of",
                len(capturing),
            )
            figures.add("(c) new worker polling", since(killed))

            await cancels
            await all_reaching(client, ids, TERMINAL, within=150)
            figures.add("every order terminal after the last kill", since(killed))

            charges = {c.key: c for c in await ledger.effects(EffectKind.CHARGE)}
            attempts = await ledger.attempts(EffectKind.CHARGE)
            recaptured = max(charges[key].recorded_at for key in cut_off) - killed_b
            figures.add("(b) cut-off charges captured by a later worker after", recaptured)
            retried = [a.at for a in attempts if a.key in capturing and a.pid == worker.pid]
            assert len(retried) >= len(capturing), "Temporal did not retry the unheard charges"
            figures.add(
                "(c) unheard charges retried, answered from the ledger, after",
                (max(retried) - killed_c),
            )
            assert all(charges[key].pid != worker.pid for key in capturing)

            audit = await verify(cluster, client, outcomes, figures)
            assert audit.repeats[EffectKind.CHARGE] >= len(capturing)
            figures.add("workers started / SIGKILLed", f"{len(cluster.workers)} / 3")
            figures.add("RPCs retried after UNAVAILABLE", client.stats.retries)
            figures.add("test duration", since(began))
        finally:
            await client.close()


# --- 2. Two workers, two servers: one of each SIGKILLed under load --------------------------

LOAD = Simulation(inventory=0.1, payment=0.5, prepare=0.5, ship=0.2, deliver=0.5, email=0.05)
LOAD_ORDERS = 60


@pytest.mark.timeout(240)
async def test_one_worker_and_one_server_of_two_sigkilled_under_load(
    tmp_path: Path, figures: Figures
) -> None:
    began = time.monotonic()
    async with open_cluster(tmp_path, simulation=LOAD) as cluster:
        await cluster.start_temporal()
        workers = [await cluster.start_worker(), await cluster.start_worker()]
        servers = [
            await cluster.start_server(temporal_rpc_timeout="5s"),
            await cluster.start_server(temporal_rpc_timeout="5s"),
        ]
        client = FailoverClient([s.target for s in servers], attempt_timeout=10.0)
        half_created = asyncio.Event()
        created: list[str] = []

        async def place_and_pay(n: int) -> str:
            # Orders arrive over about 3 s, so the kills land in the middle of the load.
            await asyncio.sleep(n * 0.05)
            order = await client.create(new_order(n))
            created.append(order.order_id)
            if len(created) == LOAD_ORDERS // 2:
                half_created.set()
            await client.pay(payment(order.order_id, n))
            return order.order_id

        try:
            flows = asyncio.gather(*(place_and_pay(n) for n in range(LOAD_ORDERS)))
            await half_created.wait()
            killed = time.monotonic()
            await asyncio.gather(workers[0].kill(), servers[0].kill())
            figures.add("load", f"{LOAD_ORDERS} orders created and paid over ~3 s, round-robin")
            figures.add("SIGKILLed at", f"{len(created)} orders created: worker-1 and server-1")
            ids = await flows
            load = client.stats
            client.stats = CallStats()
            figures.add("every order created and paid after", since(began))
            await all_reaching(client, ids, {pb.ORDER_STATUS_DELIVERED}, within=150)
            figures.add("every order delivered, after the kills", since(killed))
            assert len(set(ids)) == LOAD_ORDERS
            await verify(cluster, client, dict.fromkeys(ids, Outcome.DELIVERED), figures)
            figures.add("load RPCs / retried on the other server", f"{load.calls} / {load.retries}")
            figures.add("load attempts that failed", dict(sorted(load.failures.items())))
            figures.add("test duration", since(began))
        finally:
            await client.close()


# --- 3. The Temporal dev server stopped and restarted on its state file -------------------------

RESTART = Simulation(inventory=0.1, payment=0.2, prepare=0.2, ship=0.1, deliver=3.0, email=0.0)
SHORT_DEADLINE = 3.0
# Past the deadline, the most a call may take to come back: gRPC's own bookkeeping.
DEADLINE_SLACK = 0.3


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_temporal_restarted_on_its_state_file_loses_nothing(
    tmp_path: Path, figures: Figures, sig: signal.Signals
) -> None:
    async with open_cluster(tmp_path, simulation=RESTART) as cluster:
        temporal = await cluster.start_temporal()
        worker = await cluster.start_worker()
        server = await cluster.start_server()
        client = FailoverClient([server.target], attempt_timeout=15.0)
        try:
            # Orders in every state: waiting for payment, delivered, cancelled, in delivery.
            ids = [(await client.create(new_order(n))).order_id for n in range(4)]
            pending, delivered, cancelled, in_delivery = ids
            await all_waiting_for_payment(client, ids, within=30)
            await client.pay(payment(delivered, 1))
            await cancel(client, cancelled)
            await reaching(client, delivered, {pb.ORDER_STATUS_DELIVERED}, within=30)
            await reaching(client, cancelled, {pb.ORDER_STATUS_CANCELLED}, within=30)
            await client.pay(payment(in_delivery, 3))
            await reaching(client, in_delivery, {pb.ORDER_STATUS_SHIPPED}, within=30)
            before = {o: await client.get(o) for o in (pending, delivered, cancelled)}

            stopped = time.monotonic()
            code = await temporal.process.signal(sig)
            figures.add(
                f"Temporal stopped with {sig.name}", f"exit {code} after {since(stopped):.2f} s"
            )

            async def health_flip() -> float:
                await health_becomes(server, NOT_SERVING)
                return since(stopped)

            channel = grpc.aio.insecure_channel(server.target)
            stub = pb_grpc.OrderServiceStub(channel)
            try:
                flip, get_short, create_short, get_long = await asyncio.gather(
                    health_flip(),
                    timed(
                        stub.GetOrder(pb.GetOrderRequest(order_id=pending), timeout=SHORT_DEADLINE)
                    ),
                    timed(stub.CreateOrder(new_order(9), timeout=SHORT_DEADLINE)),
                    timed(stub.GetOrder(pb.GetOrderRequest(order_id=pending), timeout=30)),
                )
            finally:
                await channel.close(grace=None)
            figures.add("health NOT_SERVING, after the signal", flip)
            figures.add(f"GetOrder, {SHORT_DEADLINE:g} s deadline", _call(get_short))
            figures.add(f"CreateOrder, {SHORT_DEADLINE:g} s deadline", _call(create_short))
            figures.add("GetOrder, 30 s deadline", _call(get_long))
            for name, (code_name, took) in (("GetOrder", get_short), ("CreateOrder", create_short)):
                # No hang: each call ends by its deadline, saying why.
                assert took <= SHORT_DEADLINE + DEADLINE_SLACK, f"{name} hung: {took:.2f} s"
                assert code_name == UNAVAILABLE.name, (name, code_name)
            assert get_long[0] == UNAVAILABLE.name, get_long
            assert worker.process.running, "the worker died while Temporal was down"
            figures.add("Temporal down for", since(stopped))

            restarted = time.monotonic()
            figures.add("Temporal restarted and answering in", await temporal.start())
            await health_becomes(server, SERVING)
            figures.add("health SERVING again after the restart began", since(restarted))

            after = {o: await client.get(o) for o in before}
            assert after == before, "an order's state changed across the restart"
            figures.add("first GetOrder after the restart took", since(restarted))

            async def all_delivered(order_ids: list[str], started: float) -> float:
                await all_reaching(client, order_ids, {pb.ORDER_STATUS_DELIVERED}, within=90)
                return since(started)

            paid = time.monotonic()
            await client.pay(payment(pending, 0))
            fresh = (await client.create(new_order(4))).order_id
            await client.pay(payment(fresh, 4))
            in_flight_took, paid_took = await asyncio.gather(
                all_delivered([in_delivery], restarted), all_delivered([pending, fresh], paid)
            )
            # An activity that finished during the outage is redone after its timeout: the
            # SDK gives up reporting it after a few seconds (deliver: 30 s heartbeat timeout).
            figures.add(
                "order in delivery at the stop: delivered, after the restart", in_flight_took
            )
            figures.add("orders paid after the restart: delivered, after their payment", paid_took)

            # The same worker process did it, reconnected by itself.
            assert worker.process.running
            assert len(cluster.workers) == 1
            assert worker.identity in await cluster.pollers(WORKFLOW_QUEUE)
            late = [e for o in (pending, fresh) for e in await cluster.ledger.effects(order_id=o)]
            assert {e.pid for e in late} == {worker.pid}
            outcomes = dict.fromkeys(
                [pending, delivered, in_delivery, fresh], Outcome.DELIVERED
            ) | {cancelled: Outcome.CANCELLED_UNPAID}
            await verify(cluster, client, outcomes, figures)
        finally:
            await client.close()


def _call(result: tuple[str, float]) -> str:
    code, took = result
    return f"{code} after {took:.2f} s"


@pytest.mark.timeout(120)
async def test_rpcs_fail_with_unavailable_within_a_short_deadline_while_temporal_is_down(
    tmp_path: Path, figures: Figures
) -> None:
    async with open_cluster(tmp_path, simulation=RESTART) as cluster:
        temporal = await cluster.start_temporal()
        server = await cluster.start_server()
        channel = grpc.aio.insecure_channel(server.target)
        stub = pb_grpc.OrderServiceStub(channel)
        try:
            order = await stub.CreateOrder(new_order(0), timeout=10)
            await temporal.process.kill()
            await health_becomes(server, NOT_SERVING)
            results = await asyncio.gather(
                timed(stub.GetOrder(pb.GetOrderRequest(order_id=order.order_id), timeout=3)),
                timed(
                    stub.GetOrderStatus(
                        pb.GetOrderStatusRequest(order_id=order.order_id), timeout=3
                    )
                ),
                timed(stub.CreateOrder(new_order(1), timeout=3)),
                timed(stub.CancelOrder(cancellation(order.order_id), timeout=3)),
            )
        finally:
            await channel.close(grace=None)
        names = ["GetOrder", "GetOrderStatus", "CreateOrder", "CancelOrder"]
        for name, result in zip(names, results, strict=True):
            figures.add(f"{name}, 3 s deadline, health already NOT_SERVING", _call(result))
        for name, (code, took) in zip(names, results, strict=True):
            assert (code, took < 3.0) == (UNAVAILABLE.name, True), f"{name}: {code} {took:.2f} s"


# --- 4. The gRPC server restarted --------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_grpc_server_restarted_loses_nothing(tmp_path: Path, figures: Figures) -> None:
    async with open_cluster(tmp_path, simulation=RESTART) as cluster:
        await cluster.start_temporal()
        await cluster.start_worker()
        server = await cluster.start_server()
        # One long-lived channel, as a client service would keep: it must reconnect by itself.
        channel = grpc.aio.insecure_channel(server.target)
        stub = pb_grpc.OrderServiceStub(channel)
        client = FailoverClient([server.target], attempt_timeout=15.0)
        try:
            ids = [(await stub.CreateOrder(new_order(n), timeout=10)).order_id for n in range(3)]
            await all_waiting_for_payment(client, ids, within=30)
            outcomes: dict[str, Outcome] = {}
            for n, sig in enumerate((signal.SIGTERM, signal.SIGKILL)):
                order_id = ids[n]
                before = {o: await client.get(o) for o in ids}
                code = await server.process.signal(sig)
                stopped = time.monotonic()
                figures.add(f"{sig.name}: server exit status", code)
                down = await timed(stub.GetOrder(pb.GetOrderRequest(order_id=order_id), timeout=5))
                assert down[0] == UNAVAILABLE.name, down
                figures.add(f"{sig.name}: GetOrder while the server is down", _call(down))
                figures.add(f"{sig.name}: restarted, SERVING, same port, in", await server.start())

                async def get_on_old_channel(order_id: str = order_id) -> pb.Order | None:
                    try:
                        order: pb.Order = await stub.GetOrder(
                            pb.GetOrderRequest(order_id=order_id), timeout=2
                        )
                    except grpc.aio.AioRpcError:
                        return None
                    return order

                await eventually(get_on_old_channel, lambda o: o is not None, within=60)
                figures.add(f"{sig.name}: the old channel works again after", since(stopped))
                assert {o: await client.get(o) for o in ids} == before, "state changed"
                await stub.ConfirmPayment(payment(order_id, n), timeout=10)
                await reaching(client, order_id, {pb.ORDER_STATUS_DELIVERED}, within=30)
                outcomes[order_id] = Outcome.DELIVERED
            # Created before both restarts, paid after them.
            await stub.ConfirmPayment(payment(ids[2], 2), timeout=10)
            await reaching(client, ids[2], {pb.ORDER_STATUS_DELIVERED}, within=30)
            outcomes[ids[2]] = Outcome.DELIVERED
            await verify(cluster, client, outcomes, figures)
        finally:
            await client.close()
            await channel.close(grace=None)
