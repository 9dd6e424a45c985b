"""`python -m server [flags]`: runs the OrderService gRPC server until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from infra import logs
from infra.process_exit import exit_without_finalization
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
    exit_without_finalization(main(sys.argv[1:]))
