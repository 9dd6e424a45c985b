"""Load with invariants: 1,000+ orders at once through gRPC, every one audited afterwards.

A random mix (seeded: LOAD_TEST_SEED reproduces a run's mix, LOAD_TEST_ORDERS
changes its size) of correct payments, wrong amounts, duplicate payments,
second transactions, cancels at random moments, payments that never come and
raw signals straight to Temporal. Once every workflow has closed, each order
is checked from its final state and its history:

- it is closed, in exactly one terminal state (DELIVERED or CANCELLED), and
  GetOrder, the workflow's result, the emails and the providers agree on it;
- money captured == money kept (delivered) + money refunded, exactly, per order
  and per currency in total; no order charged twice, no refused payment charged;
- its inventory reservation was shipped (delivered) or released (cancelled);
- no signal lost: every signal Temporal accepted is in the history, nothing
  else is, and every payment signal is the accepted payment or a refusal;
- a confirmed payment of an order nobody cancelled was delivered; a cancel
  failed to stop a delivery only once the hand-over to the carrier had begun.

Where timing decides an outcome (a cancel racing the hand-over, a second
transaction racing the first) the test checks these invariants, not one result.
The counts are printed, also under `make test-faults`.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from activities.providers import ProviderSettings
from tests.support.load import (
    Auditor,
    Driver,
    Scenario,
    make_plans,
    summary,
    wait_until_closed,
)
from tests.support.stack import open_stack

ORDERS = int(os.environ.get("LOAD_TEST_ORDERS", "1000"))
CONCURRENCY = int(os.environ.get("LOAD_TEST_CONCURRENCY", "50"))
# GetOrder on a closed order replays its history in the worker: a few at a time.
AUDIT_CONCURRENCY = 10
# Orders never paid time out within the run; ten seconds is the server's own cap on a
# Temporal call, so a payment sent right away comes in time unless its RPC fails anyway.
PAYMENT_TIMEOUT_SECONDS = 10
# Short enough for a few minutes in all, long enough that cancels land in every state.


def simulation(outbox: Path) -> ProviderSettings:
    return ProviderSettings.instant(
        outbox,
        sim_inventory_seconds=0.02,
        sim_payment_seconds=0.05,
        sim_prepare_seconds=0.2,
        sim_ship_seconds=0.05,
        sim_deliver_seconds=0.1,
    )


@pytest.mark.timeout(600)
async def test_load_with_invariants(
    temporal: WorkflowEnvironment, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = int(os.environ.get("LOAD_TEST_SEED") or random.SystemRandom().randrange(10**9))
    with capsys.disabled():
        print(f"\nLoad test seed {seed} (LOAD_TEST_SEED={seed} repeats this mix)", flush=True)
    plans = make_plans(seed, ORDERS)

    async with open_stack(
        temporal.client,
        tmp_path / "outbox",
        simulation=simulation(tmp_path / "outbox"),
        payment_timeout_seconds=PAYMENT_TIMEOUT_SECONDS,
    ) as stack:
        driver = Driver(stack, concurrency=CONCURRENCY)
        started = time.monotonic()
        records = await driver.run(plans)
        driven = time.monotonic()
        await wait_until_closed(stack, within=120)
        settled = time.monotonic()
        await driver.pay_late(r for r in records if r.plan.scenario is Scenario.NEVER_PAY)
        paid_late = time.monotonic()
        auditor = Auditor(
            stack,
            payment_timeout_reason=f"Payment not received within {PAYMENT_TIMEOUT_SECONDS} s",
            concurrency=AUDIT_CONCURRENCY,
        )
        audit = await auditor.run(records)
        audited = time.monotonic()

    timings = {
        "drive": driven - started,
        "settle": settled - driven,
        "late": paid_late - settled,
        "audit": audited - paid_late,
    }
    with capsys.disabled():
        print(summary(audit, seed=seed, orders=len(plans), timings=timings), flush=True)
    shown = "\n".join(audit.violations[:50])
    more = len(audit.violations) - 50
    assert not audit.violations, (
        f"{len(audit.violations)} invariant violation(s), seed {seed}:\n{shown}"
        + (f"\n... and {more} more" if more > 0 else "")
    )
