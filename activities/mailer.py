"""Where rendered emails go: an SMTP server when one is configured, else an outbox folder."""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import hashlib
import os
import re
import smtplib
import ssl
import tempfile
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol

from activities.config import SimulationConfig, SmtpConfig, SmtpSecurity
from workflows.models import Notification

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class Mailer(Protocol):
    """Sends one rendered message.

    Implementations must be idempotent per notification (the activity may be
    retried after a send that did happen), e.g. by the message's Message-ID.
    A send that failed raises: MailDeliveryError when the mailer knows whether
    a retry can help, anything else to have it retried.
    """

    async def send(self, message: EmailMessage, notification: Notification) -> None: ...


class MailDeliveryError(Exception):
    """The message was not accepted; `permanent` when no retry can change that."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


def mailer_for(config: SimulationConfig) -> Mailer:
    """SMTP when a server is configured, else the outbox folder."""
    if config.smtp is not None:
        return SmtpMailer(config.smtp)
    return OutboxMailer(config.outbox_dir)


class OutboxMailer:
    """Files each message as `<outbox_dir>/<order_id>/<kind>.eml` instead of sending it."""

    def __init__(self, outbox_dir: Path) -> None:
        self.outbox_dir = outbox_dir

    def __str__(self) -> str:
        return f"outbox folder {self.outbox_dir} (.eml files, no SMTP server configured)"

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


class SmtpMailer:
    """Sends each message to an SMTP server, with stdlib smtplib in a worker thread.

    smtplib rather than aiosmtplib: one short session per email needs no
    connection pool, its TLS and AUTH are the most exercised there are, and a
    thread keeps the event loop (and so heartbeats) free while it talks.

    Idempotency: a retry after a send that reached the server but whose reply
    was lost sends the message again. It is the same message with the same
    Message-ID (derived from the notification's idempotency key), so mail
    clients and servers that dedupe by Message-ID show it once.
    """

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config
        self._tls: ssl.SSLContext | None = None
        if config.security is not SmtpSecurity.NONE:
            # Certificates and host names are verified: a relay with a self-signed
            # certificate is trusted through ca_file, never by switching checks off.
            self._tls = ssl.create_default_context(
                cafile=str(config.ca_file) if config.ca_file else None
            )

    def __str__(self) -> str:
        return self.config.describe()

    async def send(self, message: EmailMessage, notification: Notification) -> None:
        await asyncio.to_thread(self._send_blocking, message)

    def _send_blocking(self, message: EmailMessage) -> None:
        config = self.config
        server = f"{config.host}:{config.effective_port}"
        try:
            smtp = self._connect()
        except smtplib.SMTPResponseException as err:
            raise _transient(server, "refused the connection", err) from err
        except (smtplib.SMTPException, OSError) as err:
            raise MailDeliveryError(
                f"{server} unreachable: {_describe(err)}", permanent=False
            ) from err
        try:
            if config.security is SmtpSecurity.STARTTLS:
                smtp.starttls(context=self._tls)
            if config.username:
                smtp.login(config.username, config.password)
            smtp.send_message(message)
        except smtplib.SMTPRecipientsRefused as err:
            # One recipient per message, so "refused" means refused for all of them.
            refusals = [(code, text) for code, text in err.recipients.values()]
            detail = "; ".join(f"{code} {_text(reply)}" for code, reply in refusals)
            permanent = bool(refusals) and all(500 <= code <= 599 for code, _ in refusals)
            raise MailDeliveryError(
                f"{server} refused recipient {', '.join(err.recipients)}: {detail}",
                permanent=permanent,
            ) from err
        except smtplib.SMTPAuthenticationError as err:
            # Retryable: wrong credentials are fixed in the worker's settings, and the
            # email is then sent by a later attempt.
            raise _transient(server, f"rejected the login of {config.username!r}", err) from err
        except smtplib.SMTPResponseException as err:
            # Sender or message refused, or a 4xx: a server or configuration
            # problem, not one of this recipient; retried.
            raise _transient(server, "refused the message", err) from err
        except (smtplib.SMTPException, OSError) as err:
            raise MailDeliveryError(
                f"sending to {server} failed: {_describe(err)}", permanent=False
            ) from err
        finally:
            # The message may be accepted already: a failing QUIT must not make
            # the activity fail, or the retry would send it twice.
            with contextlib.suppress(smtplib.SMTPException, OSError):
                smtp.quit()
            smtp.close()

    def _connect(self) -> smtplib.SMTP:
        config = self.config
        if config.security is SmtpSecurity.TLS:
            return smtplib.SMTP_SSL(
                config.host, config.effective_port, timeout=config.timeout, context=self._tls
            )
        return smtplib.SMTP(config.host, config.effective_port, timeout=config.timeout)


def _text(reply: bytes | str) -> str:
    return reply.decode(errors="replace") if isinstance(reply, bytes) else reply


def _describe(err: BaseException) -> str:
    return str(err) or type(err).__name__


def _transient(server: str, what: str, err: smtplib.SMTPResponseException) -> MailDeliveryError:
    return MailDeliveryError(
        f"{server} {what}: {err.smtp_code} {_text(err.smtp_error)}", permanent=False
    )


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
