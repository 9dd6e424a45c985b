"""`python -m server [flags]`: runs the OrderService gRPC server until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from infra import logs
from server.app import serve
from server.config import from_args

logger = logging.getLogger("server")


def main(argv: Sequence[str]) -> int:
    """Runs the server; the process exit status (2: bad flags, 1: failed to run)."""
    try:
        config = from_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a bad value (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    logs.configure(config.log)
    try:
        asyncio.run(serve(config))
    except OSError as err:  # the port is taken or the host unknown: no traceback needed
        logger.error("OrderService could not start: %s", err)
        return 1
    except Exception:
        logger.exception("OrderService failed")
        return 1
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter finalization: a process that used the temporalio client
    # can abort while the interpreter shuts down (PyGILState_Release from the
    # Rust core's threads; temporalio/sdk-python issue 300), exiting 134 or 139
    # after all its work succeeded. Everything worth keeping is flushed above.
    os._exit(code)
