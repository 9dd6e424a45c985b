"""Records one workflow history per path an order can take, for tests/test_replay.py.

    .venv/bin/python -m tests.histories.record                   # every path
    .venv/bin/python -m tests.histories.record happy_delivered   # only some paths
    .venv/bin/python -m tests.histories.record --tag v2 happy_delivered
    .venv/bin/python -m tests.histories.record --tag v3-encrypted \
        --keys-file tests/histories/test-keys.toml            # every payload encrypted

It starts its own Temporal dev server (nothing else needs to run), a worker
per simulation setting, runs one order per path through the real workflow
and activities, and writes each finished workflow's history to
`tests/histories/<path>.json` (`<path>--<tag>.json` with `--tag`).

An existing file is never overwritten unless `--force` is given: the
committed histories stand for orders that may be in flight, so after a
change to the workflow record the NEW behaviour under a new tag and keep the
old files (docs/decisions/0008-changing-the-workflow-safely.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from temporalio.client import Client, WorkflowFailureError, WorkflowHandle, WorkflowHistory
from temporalio.testing import WorkflowEnvironment

from activities.order_activities import OrderActivities
from activities.providers import ProviderSettings
from infra.keys import Keys
from infra.process_exit import exit_without_finalization
from tests.support.env import venv_binary
from tests.support.keys import with_codec
from tests.support.polling import eventually
from worker.app import build_worker
from workflows import search_attributes
from workflows.models import (
    CANCEL_ORDER_SIGNAL,
    CONFIRM_PAYMENT_SIGNAL,
    GET_ORDER_STATUS_QUERY,
    WORKFLOW_NAME,
    CancelRequest,
    OrderInput,
    OrderItem,
    OrderState,
    OrderStatus,
    PaymentRequest,
    ShippingAddress,
    workflow_id_for,
)
from workflows.money import Money

HERE = Path(__file__).resolve().parent
PRICE = Money("USD", 999, 990_000_000)
SOLD_OUT = "PROD-SOLD-OUT"
DECLINED_METHOD = "declined_card"
# Long enough that a cancel sent once the order is PREPARING lands while packing.
SLOW_PREPARE_SECONDS = 5.0
# Long enough that a workflow cancel lands while the payment is captured.
SLOW_PAYMENT_SECONDS = 3.0

Handle = WorkflowHandle[object, OrderState]


def history_path(path: str, tag: str = "") -> Path:
    """Where the history of one path is written: <path>.json or <path>--<tag>.json."""
    return HERE / (f"{path}--{tag}.json" if tag else f"{path}.json")


def path_of(file: Path) -> str:
    """The path a history file records (its name up to `--`)."""
    return file.stem.split("--", 1)[0]


def workflow_id_of(file: Path) -> str:
    """The workflow id a history file was recorded under (for WorkflowHistory.from_json)."""
    return workflow_id_for(order_id_for(path_of(file)))


def order_id_for(path: str) -> str:
    return "ORD-HIST-" + path.upper().replace("_", "-")


@dataclass(frozen=True)
class Queues:
    """One worker per simulation setting."""

    instant: str
    slow: str  # packing takes SLOW_PREPARE_SECONDS
    flaky: str  # one failed attempt of some steps
    slow_payment: str  # a capture takes SLOW_PAYMENT_SECONDS
    mail_down: str  # every email fails, as when the mail server is down
    refunds_refused: str  # the gateway refuses refunds for good; packing is slow


@dataclass(frozen=True)
class Recorder:
    client: Client
    queues: Queues
    outbox: str

    async def start(
        self,
        path: str,
        task_queue: str,
        *,
        product: str = "PROD-123",
        payment_timeout_seconds: int = 24 * 60 * 60,
    ) -> Handle:
        order_id = order_id_for(path)
        order = OrderInput(
            order_id=order_id,
            customer_id="CUST-001",
            items=[OrderItem(product, "Laptop", 1, PRICE)],
            shipping=ShippingAddress("123 Main St", "San Francisco", "94102", "USA"),
            customer_email="cust-001@example.com",
            payment_timeout_seconds=payment_timeout_seconds,
        )
        return await self.client.start_workflow(
            WORKFLOW_NAME,
            order,
            id=workflow_id_for(order_id),
            task_queue=task_queue,
            result_type=OrderState,
        )


async def status_of(handle: Handle) -> OrderStatus:
    return OrderStatus(await handle.query(GET_ORDER_STATUS_QUERY, result_type=str))


async def reaching(handle: Handle, status: OrderStatus, within: float = 30.0) -> None:
    await eventually(
        lambda: status_of(handle),
        lambda current: current == status,
        within=within,
        interval=0.05,
        what=f"{handle.id} {status.value}",
    )


async def pay(
    handle: Handle,
    transaction_id: str = "TXN-1",
    *,
    amount: Money = PRICE,
    payment_method: str = "credit_card",
) -> None:
    payment = PaymentRequest(transaction_id, amount, payment_method)
    await handle.signal(CONFIRM_PAYMENT_SIGNAL, payment)


async def cancel(handle: Handle, reason: str = "Customer requested cancellation") -> None:
    await handle.signal(CANCEL_ORDER_SIGNAL, CancelRequest(reason))


async def finished(handle: Handle, expected: OrderStatus) -> None:
    state = await handle.result()
    if state.status != expected:
        raise RuntimeError(f"{handle.id} ended {state.status.value}, expected {expected.value}")


# --- The paths ------------------------------------------------------------------------


async def happy_delivered(r: Recorder) -> Handle:
    handle = await r.start("happy_delivered", r.queues.instant)
    await reaching(handle, OrderStatus.PENDING)
    await pay(handle)
    await finished(handle, OrderStatus.DELIVERED)
    return handle


async def cancelled_before_payment(r: Recorder) -> Handle:
    handle = await r.start("cancelled_before_payment", r.queues.instant)
    await reaching(handle, OrderStatus.PENDING)
    await cancel(handle)
    await finished(handle, OrderStatus.CANCELLED)
    return handle


async def cancelled_after_payment(r: Recorder) -> Handle:
    """Cancelled while packing: packing is interrupted, the payment refunded."""
    handle = await r.start("cancelled_after_payment", r.queues.slow)
    await reaching(handle, OrderStatus.PENDING)
    await pay(handle)
    await reaching(handle, OrderStatus.PREPARING)
    await cancel(handle)
    await finished(handle, OrderStatus.CANCELLED)
    return handle


async def payment_timeout(r: Recorder) -> Handle:
    # One second instead of 24 h: the same timer, fired sooner.
    handle = await r.start("payment_timeout", r.queues.instant, payment_timeout_seconds=1)
    await finished(handle, OrderStatus.CANCELLED)
    return handle


async def payment_declined(r: Recorder) -> Handle:
    handle = await r.start("payment_declined", r.queues.instant)
    await reaching(handle, OrderStatus.PENDING)
    await pay(handle, payment_method=DECLINED_METHOD)
    await finished(handle, OrderStatus.CANCELLED)
    return handle


async def out_of_stock(r: Recorder) -> Handle:
    handle = await r.start("out_of_stock", r.queues.instant, product=SOLD_OUT)
    await finished(handle, OrderStatus.CANCELLED)
    return handle


async def wrong_and_duplicate_payments(r: Recorder) -> Handle:
    """Signals sent raw, as from the CLI, that the server's pre-check would have refused."""
    handle = await r.start("wrong_and_duplicate_payments", r.queues.instant)
    await reaching(handle, OrderStatus.PENDING)
    await pay(handle, "TXN-WRONG-AMOUNT", amount=Money("USD", 1))  # refused: wrong amount
    await pay(handle, "TXN-WRONG-CURRENCY", amount=Money("EUR", 999, 990_000_000))  # refused
    await pay(handle, "TXN-1")  # accepted
    await pay(handle, "TXN-1")  # the same transaction again: ignored
    await pay(handle, "TXN-2")  # a second transaction: refused, already paid
    await finished(handle, OrderStatus.DELIVERED)
    state = await handle.result()
    if len(state.rejected_payments) != 3:
        raise RuntimeError(f"expected 3 rejected payments, got {state.rejected_payments}")
    return handle


async def transient_failures_retried(r: Recorder) -> Handle:
    handle = await r.start("transient_failures_retried", r.queues.flaky)
    await reaching(handle, OrderStatus.PENDING, within=60)
    await pay(handle)
    await finished(handle, OrderStatus.DELIVERED)
    return handle


async def workflow_cancelled(r: Recorder) -> Handle:
    """`temporal workflow cancel` while packing: compensated, then the workflow is CANCELED."""
    handle = await r.start("workflow_cancelled", r.queues.slow)
    await reaching(handle, OrderStatus.PENDING)
    await pay(handle)
    await reaching(handle, OrderStatus.PREPARING)
    await handle.cancel()
    try:
        await handle.result()
    except WorkflowFailureError:
        pass
    else:
        raise RuntimeError(f"{handle.id} completed instead of being cancelled")
    return handle


async def workflow_cancelled_while_charging(r: Recorder) -> Handle:
    """`temporal workflow cancel` during the capture: it finishes (shielded), then is refunded."""
    handle = await r.start("workflow_cancelled_while_charging", r.queues.slow_payment)
    await reaching(handle, OrderStatus.PENDING)
    await pay(handle)
    await eventually(
        handle.describe,
        lambda d: any(
            p.activity_type.name == "charge_payment" for p in d.raw_description.pending_activities
        ),
        within=10,
        what="the capture under way",
    )
    await handle.cancel()
    with contextlib.suppress(WorkflowFailureError):
        await handle.result()
    return handle


async def mail_server_down(r: Recorder) -> Handle:
    """No email can be sent: the order is delivered, hands its emails off, and closes."""
    handle = await r.start("mail_server_down", r.queues.mail_down)
    await reaching(handle, OrderStatus.PENDING)
    await pay(handle)
    await finished(handle, OrderStatus.DELIVERED)
    return handle


async def refund_refused(r: Recorder) -> Handle:
    """Cancelled while packing, the refund refused for good: recorded; the release still runs."""
    handle = await r.start("refund_refused", r.queues.refunds_refused)
    await reaching(handle, OrderStatus.PENDING)
    await pay(handle)
    await reaching(handle, OrderStatus.PREPARING)
    await cancel(handle)
    state = await handle.result()
    if [f.step for f in state.failures] != ["refund_payment"] or not state.inventory_info.released:
        raise RuntimeError(f"{handle.id}: expected the refund recorded as failed, got {state}")
    return handle


def _timer_started(history: WorkflowHistory) -> bool:
    return any(e.HasField("timer_started_event_attributes") for e in history.events)


async def payment_and_timeout_in_one_task(r: Recorder) -> Handle:
    """The payment timer fires and the payment arrives while no worker runs: one task for both."""
    queue = "history-no-worker-for-a-while"
    async with build_worker(r.client, queue, OrderActivities(ProviderSettings.instant(r.outbox))):
        handle = await r.start("payment_and_timeout_in_one_task", queue, payment_timeout_seconds=2)
        await eventually(handle.fetch_history, _timer_started, within=10, what="the payment timer")
    await asyncio.sleep(3)  # the timer fires with nobody to run the workflow task
    await pay(handle)
    async with build_worker(r.client, queue, OrderActivities(ProviderSettings.instant(r.outbox))):
        state = await handle.result()
    if state.status not in (OrderStatus.DELIVERED, OrderStatus.CANCELLED):
        raise RuntimeError(f"{handle.id} ended {state.status.value}")
    return handle


PATHS: dict[str, Callable[[Recorder], Awaitable[Handle]]] = {
    fn.__name__: fn
    for fn in (
        happy_delivered,
        cancelled_before_payment,
        cancelled_after_payment,
        payment_timeout,
        payment_declined,
        out_of_stock,
        wrong_and_duplicate_payments,
        transient_failures_retried,
        workflow_cancelled,
        workflow_cancelled_while_charging,
        mail_server_down,
        refund_refused,
        payment_and_timeout_in_one_task,
    )
}


# --- Running them ------------------------------------------------------------------------


def compact(history_json: str) -> str:
    """The history JSON indented by one space: still diffable, an eighth smaller than two."""
    return json.dumps(json.loads(history_json), indent=1) + "\n"


async def record(targets: dict[str, Path], keys: Keys | None = None) -> list[Path]:
    """Runs an order for each path and writes its history to the path's target file.

    With `keys`, the client and the workers encrypt every payload, as the server and the
    worker do (infra/codec.py): the histories are those of orders placed since issue 12.
    """
    paths = list(targets)
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=venv_binary("temporal"),
        dev_server_log_level="error",
        search_attributes=search_attributes.ALL,
    )
    client = env.client if keys is None else with_codec(env.client, keys)
    try:
        with tempfile.TemporaryDirectory(prefix="history-outbox-") as outbox:
            instant = ProviderSettings.instant
            simulations = {
                "instant": instant(
                    outbox,
                    sim_stock={SOLD_OUT: 0},
                    sim_decline_methods=frozenset({DECLINED_METHOD}),
                ),
                "slow": instant(outbox, sim_prepare_seconds=SLOW_PREPARE_SECONDS),
                # One failed attempt of each: 1 s of backoff apiece.
                "flaky": instant(
                    outbox,
                    sim_fail_first_attempts=1,
                    sim_fail_activities=frozenset(
                        {"reserve_inventory", "charge_payment", "ship_order"}
                    ),
                ),
                "slow_payment": instant(outbox, sim_payment_seconds=SLOW_PAYMENT_SECONDS),
                "mail_down": instant(
                    outbox,
                    sim_failure_rate=1.0,
                    sim_fail_activities=frozenset({"send_notification"}),
                ),
                "refunds_refused": instant(
                    outbox,
                    sim_prepare_seconds=SLOW_PREPARE_SECONDS,
                    sim_fail_for_good=frozenset({"refund_payment"}),
                ),
            }
            queues = Queues(**{name: f"history-{name}" for name in simulations})
            async with contextlib.AsyncExitStack() as workers:
                for name, simulation in simulations.items():
                    activities = OrderActivities(simulation)
                    worker = build_worker(client, getattr(queues, name), activities)
                    await workers.enter_async_context(worker)
                recorder = Recorder(client, queues, outbox)
                handles = await asyncio.gather(*(PATHS[path](recorder) for path in paths))
                written = []
                for path, handle in zip(paths, handles, strict=True):
                    history = await handle.fetch_history()
                    targets[path].write_text(compact(history.to_json()))
                    written.append(targets[path])
                    print(f"{targets[path].name}: {len(history.events)} events")
                return written
    finally:
        await env.shutdown()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.histories.record", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "paths", nargs="*", metavar="PATH", help=f"default: all of {', '.join(PATHS)}"
    )
    parser.add_argument("--tag", default="", help="write <path>--<tag>.json")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.add_argument(
        "--keys-file",
        type=Path,
        help="encrypt every payload with these keys (tests/histories/test-keys.toml: test only)",
    )
    args = parser.parse_args(argv)
    # The simulated failures are on purpose: their activity tracebacks would only be noise.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("temporalio.activity", "temporalio.workflow", "temporalio.worker"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    unknown = sorted(set(args.paths) - set(PATHS))
    if unknown:
        parser.error(f"unknown paths {', '.join(unknown)}; known: {', '.join(PATHS)}")
    if args.tag and ("--" in args.tag or "/" in args.tag or not args.tag.strip()):
        parser.error("--tag must not contain '--' or '/'")
    targets = {path: history_path(path, args.tag) for path in args.paths or PATHS}
    existing = [os.path.relpath(file) for file in targets.values() if file.exists()]
    if existing and not args.force:
        parser.error(
            f"refusing to overwrite {', '.join(existing)}: record new behaviour with --tag, "
            "or pass --force to replace them"
        )
    keys = None if args.keys_file is None else Keys.from_toml(args.keys_file.read_text())
    asyncio.run(record(targets, keys))
    return 0


if __name__ == "__main__":
    exit_without_finalization(main(sys.argv[1:]))
