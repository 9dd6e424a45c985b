"""Where rendered emails go: for now an outbox directory; SMTP can come later."""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import hashlib
import os
import re
import tempfile
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol

from workflows.models import Notification

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class Mailer(Protocol):
    """Sends one rendered message; the seam for an SMTP implementation.

    Implementations must be idempotent per notification (the activity may be
    retried after a send that did happen), e.g. by the message's Message-ID.
    """

    async def send(self, message: EmailMessage, notification: Notification) -> None: ...


class OutboxMailer:
    """Files each message as `<outbox_dir>/<order_id>/<kind>.eml` instead of sending it."""

    def __init__(self, outbox_dir: Path) -> None:
        self.outbox_dir = outbox_dir

    def path_for(self, notification: Notification) -> Path:
        return (
            self.outbox_dir
            / safe_path_component(notification.order_id)
            / f"{notification.kind.value}.eml"
        )

    async def send(self, message: EmailMessage, notification: Notification) -> None:
        # CRLF line endings, as RFC 5322 has them on the wire.
        data = message.as_bytes(policy=email.policy.SMTP)
        await asyncio.to_thread(write_once_atomically, self.path_for(notification), data)


def safe_path_component(name: str) -> str:
    """`name` if it is a harmless file name, else a sanitised one with a digest to keep it unique.

    Order ids come from clients; one like "../x" must not escape the outbox.
    """
    if _SAFE_NAME.fullmatch(name):
        return name
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".")[:80] or "order"
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{cleaned}-{digest}"


def write_once_atomically(path: Path, data: bytes) -> None:
    """Writes `path` unless it exists, through a temporary file, so readers never see half a file.

    A retried send finds the file there and leaves it alone; two racing sends
    write the same bytes, and the rename makes either one win whole.
    """
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            # mkstemp makes the file private (0600); an outbox is meant to be read.
            os.fchmod(tmp.fileno(), 0o644)
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
