"""A codec server (server/codec_server.py) in this process, with the test keys
(tests/support/keys.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from server.codec_server import CodecServer, CodecServerSettings, start_codec_server
from tests.support.keys import key_settings


def codec_settings(**changes: Any) -> CodecServerSettings:
    """On loopback, on a port the OS chooses, with the test keys; `changes` over those."""
    base: dict[str, Any] = {"host": "127.0.0.1", "port": 0, **key_settings()}
    return CodecServerSettings(**{**base, **changes})


@contextmanager
def open_codec_server(**changes: Any) -> Iterator[CodecServer]:
    """A codec server serving with `codec_settings(**changes)`; stopped after."""
    server = start_codec_server(codec_settings(**changes))
    try:
        yield server
    finally:
        server.stop()
