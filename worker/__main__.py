"""`python -m worker`: runs the order worker until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from infra import logs
from infra.process_exit import exit_without_finalization
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
    exit_without_finalization(main(sys.argv[1:]))
