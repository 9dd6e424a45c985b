"""`python -m worker`: runs the order worker until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from infra import logs
from worker.app import run_worker
from worker.config import from_args

logger = logging.getLogger("worker")


def main(argv: Sequence[str]) -> int:
    """Runs the worker; returns the process's exit status."""
    config = from_args(argv)
    logs.configure(config.log, stream=sys.stderr)
    try:
        asyncio.run(run_worker(config))
    except KeyboardInterrupt:
        # A second Ctrl-C during the graceful shutdown.
        return 130
    except OSError as err:  # a TLS file unreadable, the metrics port taken: no traceback
        logger.error("Worker could not start: %s", err)
        return 1
    except Exception:
        logger.exception("Worker failed")
        return 1
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter finalization: a process that used the temporalio client
    # can abort there (sdk-python issue 300: "PyGILState_Release", exit 134 or
    # 139) after all its work has succeeded, which would turn a clean stop
    # into a crash for `make run` and for supervisors.
    os._exit(code)
