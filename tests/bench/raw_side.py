"""The benchmark's raw process: the Temporal calls of each RPC, made straight with temporalio.

`make bench` (tests/bench/benchmark.py) runs it as a process of its own,
`python -m tests.bench.raw_side --temporal-address HOST:PORT --task-queue QUEUE`,
so that what the raw client costs per call is measured alone, as the gRPC
server's CPU is: utime + stime from /proc over each round, divided by its
calls. An RPC's CPU floor is grpc.aio's cost per RPC (Health/Check, on the
server) plus this process's CPU per call for the same Temporal calls.

It connects as the server does (`infra.temporal_client.connect`: the same gRPC
compression, payload limits and data converter, encrypting with the keys the
benchmark gives the server, ORDER_PAYLOAD_KEYS and ORDER_CUSTOMER_ID_KEY in its
environment) and makes the servicer's Temporal calls with the same arguments
(docs/decisions/0016 and 0017):

- CreateOrder:                 start_workflow, with the memo and the search
                               attributes the server sets (both built by
                               server/temporal/orders.start_arguments);
- GetOrder, GetOrderStatus,   DescribeWorkflowExecution, then the memo's
  GetEstimatedDelivery:        state decoded into an OrderState;
- ConfirmPayment, CancelOrder: the same describe and decode, then the signal;
- ListOrders (one page of a    ListWorkflowExecutions with the lister's visibility
  customer's orders):          query, each row's memo total and customer id decoded,
                               then one ListWorkflowExecutions of the rows' other runs
                               (docs/decisions/0007);
- whole orders:                start, pay, then the order's history long-polled
                               until it is settled, the latest state in each batch
                               decoded from its memo, as WatchOrder follows an
                               order (server/temporal/watching.py).

A round's arguments (the workflow inputs, memos, signal arguments) are built
before it starts, outside the CPU it measures: they are the calls' inputs.
The server builds them from each request, which is part of what it is
measured for.

It reads one JSON command per line on stdin and answers each with one JSON
line on stdout: `{"run": {...}, "ids": [...]}` or `{"error": "..."}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.workflowservice.v1 import GetWorkflowExecutionHistoryRequest
from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from infra import temporal_client
from infra.keys import Keys
from infra.process_exit import exit_without_finalization
from server.api import validation
from server.temporal.listing import (
    VISIBILITY_PAGE_SIZE,
    ListFilter,
    other_runs_query,
    visibility_query,
)
from server.temporal.listing import Run as ListedRun
from server.temporal.orders import StartArguments, decode_state, start_arguments
from server.temporal.watching import DEFAULT_POLL_TIMEOUT, latest_memo_state
from tests.bench.measure import Run, cpu_seconds, run_calls
from tests.support.orders import create_request, payment_request
from workflows import models, rules, search_attributes
from workflows.money import Money

# The servicer's cap on each Temporal call (ServerSettings.temporal_rpc_timeout).
RPC_TIMEOUT = timedelta(seconds=10)
CANCEL_REASON = "Benchmark cancel"


def payment(order_id: str) -> models.PaymentRequest:
    """The confirm_payment signal's argument for the benchmark's payment of `order_id`."""
    return validation.validate_confirm_payment(payment_request(order_id, f"TXN-{order_id}"))[1]


CANCELLATION = models.CancelRequest(reason=CANCEL_REASON)


class Raw:
    """The Temporal calls the servicer makes, made directly with the temporalio client."""

    def __init__(self, client: Client, task_queue: str, customer_id_key: bytes) -> None:
        self.client = client
        self.task_queue = task_queue
        self.customer_id_key = customer_id_key

    def new_order(self) -> StartArguments:
        """The seed's example order, its input built from the request as the server builds it."""
        order = validation.validate_create_order(create_request())
        return start_arguments(order, self.customer_id_key)

    def handle(self, order_id: str) -> WorkflowHandle[Any, Any]:
        return self.client.get_workflow_handle(models.workflow_id_for(order_id))

    async def start(self, start: StartArguments) -> None:
        await self.client.start_workflow(
            models.WORKFLOW_NAME,
            start.order,
            id=models.workflow_id_for(start.order.order_id),
            task_queue=self.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            search_attributes=start.search_attributes,
            memo=start.memo,
            rpc_timeout=RPC_TIMEOUT,
        )

    async def state(self, order_id: str) -> models.OrderState:
        """The order from its memo: one describe, then the state decoded."""
        described = await self.handle(order_id).describe(rpc_timeout=RPC_TIMEOUT)
        state: models.OrderState = await described.memo_value(
            search_attributes.MEMO_ORDER_STATE, type_hint=models.OrderState
        )
        return state

    async def write(self, order_id: str, signal: str, arg: object) -> None:
        """The servicer's writes: the state its clear answer is judged on, then the signal."""
        await self.state(order_id)
        await self.handle(order_id).signal(signal, arg, rpc_timeout=RPC_TIMEOUT)

    async def list_page(self, query: str) -> int:
        """One ListOrders page: the rows of `query` with their memo decoded, then their
        workflows' other runs. Returns the rows read."""
        runs: list[ListedRun] = []
        async for execution in self.client.list_workflows(
            query, page_size=VISIBILITY_PAGE_SIZE, rpc_timeout=RPC_TIMEOUT
        ):
            await execution.memo_value(search_attributes.MEMO_TOTAL_AMOUNT, type_hint=Money)
            await execution.memo_value(search_attributes.MEMO_CUSTOMER_ID, type_hint=str)
            runs.append(ListedRun(execution.id, execution.run_id, execution.start_time))
        if runs:
            others = other_runs_query(runs)
            async for _execution in self.client.list_workflows(
                others, page_size=VISIBILITY_PAGE_SIZE, rpc_timeout=RPC_TIMEOUT
            ):
                pass
        return len(runs)

    async def follow(self, order_id: str) -> models.OrderState:
        """The order's history, long-polled batch by batch until the order is settled, the
        latest state of each batch decoded from its memo: WatchOrder's calls for one stream."""
        token = b""
        state: models.OrderState | None = None
        while True:
            request = GetWorkflowExecutionHistoryRequest(
                namespace=self.client.namespace,
                execution=WorkflowExecution(workflow_id=models.workflow_id_for(order_id)),
                next_page_token=token,
                wait_new_event=True,
            )
            response = await self.client.workflow_service.get_workflow_execution_history(
                request, retry=True, timeout=DEFAULT_POLL_TIMEOUT
            )
            token = response.next_page_token
            if (payload := latest_memo_state(response.history.events)) is not None:
                state = await decode_state(self.client, payload)
            if not token or (state is not None and rules.is_settled(state)):
                if state is None:
                    raise RuntimeError(f"order {order_id} closed with no state in its memo")
                return state

    async def whole_order(self) -> None:
        """Start, pay, and follow the order's history until it is settled: delivered."""
        start = self.new_order()
        order_id = start.order.order_id
        await self.start(start)
        await self.write(order_id, models.CONFIRM_PAYMENT_SIGNAL, payment(order_id))
        state = await self.follow(order_id)
        if state.status != models.OrderStatus.DELIVERED:
            raise RuntimeError(f"order {order_id} ended {state.status}")


def list_query(customer_id: str, created_after: datetime, customer_id_key: bytes) -> str:
    """The lister's first visibility query for a page of one customer's orders created after
    `created_after` (its window reaching that floor: no count call)."""
    return visibility_query(
        ListFilter(customer_id=customer_id, created_after=created_after),
        customer_id_key=customer_id_key,
        lower=created_after,
    )


# --- The process -----------------------------------------------------------------------------


async def measured(count: int, concurrency: int, call: Callable[[int], Awaitable[object]]) -> Run:
    """`run_calls`, charged with this process's own CPU over the calls."""
    return await run_calls(count, concurrency, call, cpu_of=os.getpid())


async def perform(raw: Raw, command: dict[str, Any]) -> dict[str, Any]:
    """One command: a round of calls, its Run and the order ids it created."""
    do: str = command["do"]
    concurrency: int = command.get("concurrency", 1)
    ids: Sequence[str] = command.get("ids", [])
    if do == "create":
        starts = [raw.new_order() for _ in range(command["count"])]
        run = await measured(len(starts), concurrency, lambda i: raw.start(starts[i]))
        return {"run": run.to_json(), "ids": [s.order.order_id for s in starts]}
    if do == "read":
        run = await measured(len(ids), concurrency, lambda i: raw.state(ids[i]))
    elif do == "pay":
        payments = [payment(order_id) for order_id in ids]
        run = await measured(
            len(ids),
            concurrency,
            lambda i: raw.write(ids[i], models.CONFIRM_PAYMENT_SIGNAL, payments[i]),
        )
    elif do == "cancel":
        run = await measured(
            len(ids),
            concurrency,
            lambda i: raw.write(ids[i], models.CANCEL_ORDER_SIGNAL, CANCELLATION),
        )
    elif do == "list":
        query = list_query(
            command["customer_id"],
            datetime.fromisoformat(command["created_after"]),
            raw.customer_id_key,
        )
        expected: int = command["rows"]

        async def one_page(_i: int) -> None:
            if (rows := await raw.list_page(query)) != expected:
                raise RuntimeError(f"listed {rows} orders, not {expected}")

        run = await measured(command["count"], concurrency, one_page)
    elif do == "whole":
        run = await measured(command["count"], concurrency, lambda _i: raw.whole_order())
    elif do == "warm_up":
        start = raw.new_order()
        await raw.start(start)
        for _ in range(20):
            await raw.state(start.order.order_id)
        run = await measured(10, 1, lambda _i: raw.whole_order())
    else:
        raise ValueError(f"unknown command {do!r}")
    return {"run": run.to_json(), "ids": []}


async def serve(address: str, task_queue: str) -> None:
    settings = temporal_client.TemporalSettings(temporal_address=address, task_queue=task_queue)
    keys = Keys.from_variables(
        os.environ["ORDER_PAYLOAD_KEYS"], os.environ["ORDER_CUSTOMER_ID_KEY"]
    )
    # As the server connects (server/platform/app.py), less its laziness.
    client = await temporal_client.connect(
        settings, keys=keys, runtime=temporal_client.new_runtime()
    )
    raw = Raw(client, task_queue, keys.customer_id_key)
    answer({"ready": True, "pid": os.getpid(), "cpu": cpu_seconds(os.getpid())})
    while line := await asyncio.to_thread(sys.stdin.readline):
        try:
            answer(await perform(raw, json.loads(line)))
        except Exception as err:
            answer({"error": f"{type(err).__name__}: {err}"})


def answer(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.raw_side", description=__doc__)
    parser.add_argument("--temporal-address", required=True)
    parser.add_argument("--task-queue", required=True)
    args = parser.parse_args(list(argv))
    asyncio.run(serve(args.temporal_address, args.task_queue))
    return 0


if __name__ == "__main__":
    exit_without_finalization(main(sys.argv[1:]))
