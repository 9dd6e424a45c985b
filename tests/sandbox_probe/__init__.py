"""Workflows that break the determinism rules, for tests/test_sandbox.py: imports kept minimal."""

import random
import time
import uuid
from datetime import datetime

from temporalio import workflow

# Grows once per run where modules are shared between runs; the sandbox gives each run its own.
RUNS: list[int] = []


@workflow.defn
class CallsDatetimeNow:
    @workflow.run
    async def run(self, what: str) -> str:
        calls = {
            "datetime.now": lambda: str(datetime.now()),
            "time.time": lambda: str(time.time()),
            "random.random": lambda: str(random.random()),
            "uuid.uuid4": lambda: str(uuid.uuid4()),
        }
        return calls[what]()


@workflow.defn
class CountsRuns:
    @workflow.run
    async def run(self) -> int:
        RUNS.append(1)
        return len(RUNS)
