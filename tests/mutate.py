"""Mutation check: break a money or cancellation rule on purpose; the fast tests must fail.

    make mutate                                   # every mutation
    .venv/bin/python -m tests.mutate half-refund  # some, by name
    .venv/bin/python -m tests.mutate --list       # names, files and snippets

Each mutation is one find/replace of a small snippet in one file. For each,
alone, the repository is copied to a temporary folder (this checkout is never
touched), the snippet replaced there, and the test files that should catch it
run in the copy (`pytest -x -q -p no:cacheprovider`). The check fails if any
mutation survives (its tests pass), or if a snippet is no longer in its file,
or is there more than once: the code changed, so update MUTATIONS below. The
same files first run unmutated, so a failure is the mutation's doing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Never copied: environments, caches and run state.
_NOT_COPIED = shutil.ignore_patterns(
    ".venv", ".git", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache",
    ".hypothesis", ".temporal", "outbox", "*.egg-info", "build", "dist",
)  # fmt: skip
RUN_TIMEOUT_SECONDS = 900


@dataclass(frozen=True)
class Mutation:
    """One rule broken on purpose: `find` replaced by `replace` in `path`."""

    name: str
    rule: str
    path: str
    find: str
    replace: str
    tests: tuple[str, ...]  # the fast test files that must catch it


WORKFLOW = "workflows/order_workflow.py"
_CHARGE = "await self._uninterrupted(_start(OrderActivities.charge_payment, charge))"
_REFUND = "_start(OrderActivities.refund_payment, refund)"
# dataclasses.replace by __import__, so a mutation never depends on the file's own imports.
_REPLACE = '__import__("dataclasses").replace'

MUTATIONS = [
    Mutation(
        name="double-charge",
        rule="a paid order is captured exactly once",
        path=WORKFLOW,
        # After a successful capture, a second one under another idempotency key.
        find=_CHARGE,
        replace=f"{_CHARGE}; await self._uninterrupted(_start(OrderActivities.charge_payment, "
        f'{_REPLACE}(charge, idempotency_key=charge.idempotency_key + "/again")))',
        tests=("tests/test_order_flows.py", "tests/test_payments.py"),
    ),
    Mutation(
        name="half-refund",
        rule="a cancelled order is refunded exactly what was captured",
        path=WORKFLOW,
        find=_REFUND,
        replace=f"_start(OrderActivities.refund_payment, {_REPLACE}(refund, amount="
        "type(refund.amount).from_total_nanos(refund.amount.currency_code, "
        "refund.amount.total_nanos // 2)))",
        tests=("tests/test_order_flows.py", "tests/test_failure_paths.py"),
    ),
    Mutation(
        name="cancel-during-hand-over",
        rule="a cancel is refused once the parcel is being handed to the carrier",
        path=WORKFLOW,
        # The cancel signal's handler forgets that ship_order has begun.
        find="handed_to_carrier=self._handed_to_carrier",
        replace="handed_to_carrier=False",
        tests=("tests/test_order_flows.py",),
    ),
]


class SnippetGone(Exception):
    """A mutation's snippet is not in its file exactly once: the code changed."""


def copy_repository(into: Path) -> Path:
    """A copy of this checkout, without its venv, caches or git data."""
    copy = into / "repo"
    shutil.copytree(ROOT, copy, ignore=_NOT_COPIED)
    return copy


def apply(mutation: Mutation, repo: Path) -> None:
    """Replaces the mutation's snippet in the copy; SnippetGone unless it is there exactly once."""
    path = repo / mutation.path
    text = path.read_text()
    found = text.count(mutation.find)
    if found != 1:
        raise SnippetGone(
            f"mutation {mutation.name} no longer applies: {mutation.find!r} is in "
            f"{mutation.path} {found} times, not once; update it in tests/mutate.py"
        )
    path.write_text(text.replace(mutation.find, mutation.replace))


def run_tests(repo: Path, tests: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """The test files, in the copy, with this venv's interpreter; stops at the first failure."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    return subprocess.run(
        command, cwd=repo, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS, check=False
    )


def imports_from(repo: Path, module: str) -> Path:
    """Where the copy's interpreter finds `module` (it must be the copy's own)."""
    code = f"import {module} as m; print(m.__file__)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True
    )
    return Path(done.stdout.strip())


def failures(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The `FAILED`/`ERROR` lines of pytest's short summary."""
    lines = result.stdout.splitlines()
    return [line for line in lines if line.startswith(("FAILED ", "ERROR "))]


def check(mutations: Sequence[Mutation]) -> bool:
    """Runs every mutation alone; True if each one was caught."""
    ok = True
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        pristine = copy_repository(Path(tmp))
        where = imports_from(pristine, "workflows.order_workflow")
        if not where.is_relative_to(pristine):
            print(f"the copy imports the workflow from {where}, not from itself", file=sys.stderr)
            return False
        files = sorted({test for mutation in mutations for test in mutation.tests})
        started = time.monotonic()
        baseline = run_tests(pristine, files)
        if baseline.returncode != 0:
            print(f"unmutated, the tests fail already: fix them first\n{baseline.stdout[-4000:]}")
            return False
        print(f"unmutated: {' '.join(files)} pass ({time.monotonic() - started:.0f} s)")
        for mutation in mutations:
            repo = Path(tmp) / mutation.name
            shutil.copytree(pristine, repo)
            try:
                apply(mutation, repo)
            except SnippetGone as err:
                print(f"ERROR    {err}")
                ok = False
                continue
            started = time.monotonic()
            result = run_tests(repo, mutation.tests)
            seconds = time.monotonic() - started
            if result.returncode == 0:
                ok = False
                names = " ".join(mutation.tests)
                print(f"SURVIVED {mutation.name} ({mutation.rule}): {names} pass")
            else:
                caught = failures(result) or [result.stdout.strip().splitlines()[-1]]
                print(f"caught   {mutation.name} in {seconds:.0f} s by {caught[0]}")
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    by_name = {mutation.name: mutation for mutation in MUTATIONS}
    if unknown := [name for name in args.names if name not in by_name]:
        parser.error(f"unknown mutation(s) {unknown}; known: {', '.join(by_name)}")
    chosen = [by_name[name] for name in args.names] or MUTATIONS
    if args.list:
        for mutation in chosen:
            print(f"{mutation.name}: {mutation.rule}\n  in {mutation.path}")
            print(f"  find:    {mutation.find}\n  replace: {mutation.replace}")
            print(f"  tests:   {' '.join(mutation.tests)}")
        return 0
    return 0 if check(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
