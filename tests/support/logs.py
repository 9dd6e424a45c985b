"""What the processes log while a block runs, captured as they would write it."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from infra import logs


@contextmanager
def captured_logs(*log_formats: str) -> Iterator[list[io.StringIO]]:
    """Every line logged at INFO or above while the block runs, one stream per format
    ("text" or "json"), each written by the handler the processes use (infra/logs.py)."""
    streams = [io.StringIO() for _ in log_formats]
    handlers = [
        logs.handler(log_format, out) for log_format, out in zip(log_formats, streams, strict=True)
    ]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    for handler in handlers:
        handler.setLevel(logging.INFO)
        root.addHandler(handler)
    try:
        yield streams
    finally:
        for handler in handlers:
            root.removeHandler(handler)
        root.setLevel(level)
