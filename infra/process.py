"""How `python -m server` and `python -m worker` run: settings, logs, then until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

from infra import logs
from infra.keys import KeySettings
from infra.process_exit import exit_without_finalization
from infra.settings import ProcessSettings

S = TypeVar("S", bound=ProcessSettings)
_SIGNALS = (signal.SIGINT, signal.SIGTERM)

logger = logging.getLogger(__name__)


def run(
    settings_class: type[S], service: Callable[[S, asyncio.Event], Awaitable[None]], name: str
) -> NoReturn:
    """Runs `service(settings, stop)` with the settings from the command line and environment.

    Exit status: 0 when it stopped, 2 for bad settings (no keys, for a process
    with KeySettings), 1 when it failed, 130 after a second signal.
    """
    settings = settings_class.from_args(sys.argv[1:])
    assert isinstance(settings, logs.LogSettings)
    if isinstance(settings, KeySettings) and not settings.has_keys:
        # Secure by default: a process that reads or writes orders never runs without keys.
        settings_class.parser().error(settings.missing_keys_message())
    logs.configure(settings)
    try:
        asyncio.run(_until_signalled(service, settings))
        code = 0
    except KeyboardInterrupt:
        code = 130
    except OSError as err:  # a port taken, a TLS file unreadable: no traceback needed
        logger.error("%s could not start: %s", name, err)
        code = 1
    except Exception:
        logger.exception("%s failed", name)
        code = 1
    exit_without_finalization(code)


async def _until_signalled(
    service: Callable[[S, asyncio.Event], Awaitable[None]], settings: S
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(received: signal.Signals) -> None:
        logger.info("Received %s: shutting down (send it again to stop at once)", received.name)
        stop.set()
        for signum in _SIGNALS:  # back to the default, so a second signal is not ignored
            loop.remove_signal_handler(signum)

    for signum in _SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    await service(settings, stop)
