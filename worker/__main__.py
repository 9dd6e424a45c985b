"""`python -m worker [flags]`: runs the order worker until SIGINT or SIGTERM."""

from infra import process
from worker.app import run_worker
from worker.settings import WorkerSettings

if __name__ == "__main__":
    process.run(WorkerSettings, run_worker, "Worker")
