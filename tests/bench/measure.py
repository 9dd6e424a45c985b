"""What the benchmark's processes measure: calls timed, CPU and memory read from /proc.

Shared by the benchmark's driver (tests/bench/benchmark.py) and its raw process
(tests/bench/raw_side.py), so that both sides are timed and charged alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.stats import percentile


def cpu_seconds(pid: int) -> float:
    """The CPU time of a process (all its threads, utime + stime), in seconds.

    Read from its CPU-time clock (clock_gettime, in nanoseconds), the count
    /proc/<pid>/stat rounds to 10 ms ticks: a round of a few hundred calls
    costs a few hundred ms, which ticks would measure to a few percent only.
    """
    # Linux's clock id for a process's CPU time (MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)).
    with contextlib.suppress(OSError):
        return time.clock_gettime(((~pid) << 3) | 2)
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


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


@dataclass
class Run:
    """One round of one side: calls, their latencies, the wall time, the CPU it cost.

    `cpu`: the CPU time of the process under test over the round: the gRPC
    server's for gRPC and Health/Check rounds, the raw process's for raw ones.
    """

    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0
    cpu: float = 0.0
    # CPU cores used during the run: Temporal, worker, gRPC server, raw process, driver.
    cores: list[float] = field(default_factory=list)

    def summary(self, unit: str = "/s") -> str:
        """Calls per second, p50 and p99, the cores used and the first error, for the log."""
        calls = len(self.latencies)
        return (
            f"{calls / self.wall:7.1f}{unit}"
            f"  p50 {ms(percentile(self.latencies, 0.5))} ms"
            f"  p99 {ms(percentile(self.latencies, 0.99))} ms"
            + (f"  CPU {self.cpu / calls * 1e6:5.0f} µs/call" if self.cpu and calls else "")
            + ("  cores " + "/".join(f"{c:.2f}" for c in self.cores) if self.cores else "")
            + (f"  ERRORS {len(self.errors)}: {self.errors[0]}" if self.errors else "")
        )

    def to_json(self) -> dict[str, object]:
        return {
            "latencies": self.latencies,
            "errors": self.errors,
            "wall": self.wall,
            "cpu": self.cpu,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Run:
        return cls(
            latencies=list(data["latencies"]),
            errors=list(data["errors"]),
            wall=float(data["wall"]),
            cpu=float(data["cpu"]),
        )


async def run_calls(
    count: int,
    concurrency: int,
    call: Callable[[int], Awaitable[object]],
    *,
    cpu_of: int | None = None,
) -> Run:
    """`count` calls, `concurrency` callers at a time, each timed; `cpu_of`'s CPU over them."""
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

    cpu_before = cpu_seconds(cpu_of) if cpu_of else 0.0
    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    run.wall = time.perf_counter() - started
    if cpu_of:
        run.cpu = cpu_seconds(cpu_of) - cpu_before
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
