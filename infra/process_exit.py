"""How a process that used the temporalio client ends: without interpreter finalization.

Such a process can abort while the interpreter shuts down (PyGILState_Release
from the SDK's Rust threads; sdk-python issue 300), exiting 134 or 139 after
all its work succeeded (docs/decisions/0004-exit-without-finalization.md).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def exit_without_finalization(code: int) -> NoReturn:
    """Flushes the log handlers and the standard streams, then exits with `code` at once."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
