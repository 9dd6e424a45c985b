"""`python -m worker`, but with decision 0011's sandbox: every module passed through.

For the benchmark's sandbox phase only (tests/bench/benchmark.py): the same
worker, settings and flags as `python -m worker`, its workflows run by
`SandboxedWorkflowRunner` with `with_passthrough_all_modules()`, as before
decision 0015, so that what the default sandbox costs (worker CPU per order,
memory per cached order) is measured against it in one run. Never for
production: passing every module through switches the sandbox's checks off.
"""

from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from infra import process
from worker import app
from worker.settings import WorkerSettings

PASSTHROUGH_RUNNER = SandboxedWorkflowRunner(
    restrictions=SandboxRestrictions.default.with_passthrough_all_modules()
)

if __name__ == "__main__":
    # build_worker reads WORKFLOW_RUNNER when it builds the worker.
    app.WORKFLOW_RUNNER = PASSTHROUGH_RUNNER
    process.run(WorkerSettings, app.run_worker, "Worker (all modules passed through)")
