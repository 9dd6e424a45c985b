"""How fast the API answers while no worker runs, as a markdown table (`make bench`).

    python -m tests.bench.no_worker

Starts a Temporal dev server (in memory) and a gRPC server on a task queue no
worker polls, then creates, pays, cancels and reads orders through gRPC. Every
answer comes from Temporal alone (decision 0016); the goal is under 1 s each.
tests/faults/test_no_workers.py proves the same with real workers SIGKILLed,
and that the orders then end as written.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable

import grpc
from temporalio.testing import WorkflowEnvironment

from acme.orders.v1 import order_service_pb2 as pb
from infra import temporal_client
from infra.process_exit import exit_without_finalization
from server.platform.app import start_server
from server.platform.settings import ServerSettings
from tests.support.env import venv_binary
from tests.support.keys import key_settings
from tests.support.orders import create_request, money, payment_request
from tests.support.stack import async_stub
from tests.support.stats import percentile
from workflows import search_attributes

ORDERS = 25  # 20 paid, 5 cancelled
GOAL_SECONDS = 1.0


async def measure() -> dict[str, list[float]]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=venv_binary("temporal"),
        dev_server_log_level="error",
        search_attributes=search_attributes.ALL,
    )
    seconds: dict[str, list[float]] = defaultdict(list)

    async def timed(rpc: str, call: Awaitable[object]) -> None:
        started = time.perf_counter()
        try:
            await call
        except grpc.aio.AioRpcError as err:
            rpc = f"{rpc} ({err.code().name})"
        seconds[rpc].append(time.perf_counter() - started)

    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        temporal_address=env.client.service_client.config.target_host,
        task_queue=f"orders-no-worker-{uuid.uuid4().hex[:8]}",  # nobody polls it
        **key_settings(),
    )
    client = await temporal_client.connect(settings, keys=settings.keys)
    server = await start_server(settings, client=client)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = async_stub(channel)
            created = [await stub.CreateOrder(create_request(), timeout=10) for _ in range(ORDERS)]
            for order in created:
                await timed("CreateOrder", stub.CreateOrder(create_request(), timeout=10))
                await timed(
                    "GetOrder",
                    stub.GetOrder(pb.GetOrderRequest(order_id=order.order_id), timeout=10),
                )
                await timed(
                    "GetOrderStatus",
                    stub.GetOrderStatus(
                        pb.GetOrderStatusRequest(order_id=order.order_id), timeout=10
                    ),
                )
            for order in created[:20]:
                await timed(
                    "ConfirmPayment",
                    stub.ConfirmPayment(payment_request(order.order_id), timeout=10),
                )
            for order in created[20:]:
                cancel = pb.CancelOrderRequest(order_id=order.order_id, reason="Changed my mind")
                await timed("CancelOrder", stub.CancelOrder(cancel, timeout=10))
            wrong = payment_request(created[20].order_id, "TXN-WRONG", amount=money(1))
            await timed("ConfirmPayment", stub.ConfirmPayment(wrong, timeout=10))
    finally:
        await server.stop(grace=1.0)
        await env.shutdown()
    return seconds


def table(seconds: dict[str, list[float]]) -> str:
    lines = [
        "| RPC (answer) | calls | p50 ms | max ms | goal: under 1 s |",
        "|---|---:|---:|---:|:-:|",
    ]
    for rpc, values in sorted(seconds.items()):
        met = "✅" if max(values) < GOAL_SECONDS else "❌"
        p50, slowest = percentile(values, 0.5) * 1000, max(values) * 1000
        lines.append(f"| {rpc} | {len(values)} | {p50:.1f} | {slowest:.1f} | {met} |")
    return "\n".join(lines)


def run() -> int:
    results = asyncio.run(measure())
    print("\nWith no worker running (a task queue nobody polls), through gRPC:\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    exit_without_finalization(run())
