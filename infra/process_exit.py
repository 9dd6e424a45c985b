"""How a process that used the temporalio client ends: without interpreter finalization.

Why: sdk-python issue 300, docs/decisions/0004-exit-without-finalization.md.
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
