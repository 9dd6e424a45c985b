"""The Temporal calls each OrderService RPC makes, as a markdown table (`make bench`).

    python -m tests.bench.call_counts

Starts a Temporal dev server (in memory), a worker and a gRPC server whose
Temporal client goes through a counting proxy, runs the scenarios of
tests/support/call_counts.py (the ones tests/test_call_counts.py pins) and
prints what each RPC cost Temporal. Takes a few seconds.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from temporalio.testing import WorkflowEnvironment

from infra.process_exit import exit_without_finalization
from tests.support.call_counts import counted_stack, measure_all, table
from tests.support.env import venv_binary
from workflows import search_attributes


async def main() -> str:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=venv_binary("temporal"),
        dev_server_log_level="error",
        search_attributes=search_attributes.ALL,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="call-counts-") as outbox:
            async with counted_stack(env.client, Path(outbox)) as stack:
                results = await measure_all(stack)
    finally:
        await env.shutdown()
    return table(results)


def run() -> int:
    results = asyncio.run(main())
    print("\nTemporal calls per RPC (the health prober's GetSystemInfo and DescribeTaskQueue,")
    print("every 2 s, left out; the worker's own calls not counted):\n")
    print(results)
    return 0


if __name__ == "__main__":
    exit_without_finalization(run())
