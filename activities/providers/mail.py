"""The mail service: each notification sent once, to an SMTP server or (by default) an outbox."""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import hashlib
import logging
import os
import re
import smtplib
import ssl
import tempfile
from email.message import EmailMessage
from pathlib import Path
from typing import Annotated, Literal, Protocol, Self

from pydantic import AfterValidator, Field, SecretStr, model_validator
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.email import SENDER, parse_sender
from activities.providers.faults import WholeNumber, simulate
from activities.providers.ledger import EffectKind, Effects, Ledger
from infra.settings import ExistingFile, Lowercase, Options, Seconds, Text, setting
from workflows.models import Notification
from workflows.rules import mask_email

logger = logging.getLogger(__name__)

# ApplicationError types: the mail server refused the recipient for good (5xx),
# not retryable; or it failed otherwise, retryable.
RECIPIENT_REJECTED = "RecipientRejected"
MAIL_SERVER_UNAVAILABLE = "MailServerUnavailable"

# none, STARTTLS (required, not optional) or TLS from the first byte ("SMTPS").
SmtpTls = Literal["none", "starttls", "tls"]
DEFAULT_SMTP_PORTS: dict[SmtpTls, int] = {"none": 25, "starttls": 587, "tls": 465}
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _sender(text: str) -> str:
    parse_sender(text)  # raises InvalidEmailAddress, a ValueError
    return text


def _host(host: str) -> str:
    if any(ch.isspace() for ch in host):
        raise ValueError("not a host name or address")
    return host


class MailSettings(Options):
    """Email: an outbox folder, or an SMTP server."""

    outbox_dir: Path = setting(
        Path("outbox"), "ORDER_OUTBOX_DIR", "folder for .eml files when no SMTP server is set"
    )
    email_from: Annotated[Text, AfterValidator(_sender)] = setting(
        SENDER, "ORDER_EMAIL_FROM", 'From address; "Name <address>" works'
    )
    sim_email_seconds: Seconds = setting(0.2, "ORDER_SIM_EMAIL_SECONDS", "seconds per .eml file")
    smtp_host: Annotated[Text, AfterValidator(_host)] | None = setting(
        None, "ORDER_SMTP_HOST", "send over SMTP to this server", shown="none: the outbox"
    )
    smtp_port: Annotated[WholeNumber, Field(ge=1, le=65535)] | None = setting(
        None, "ORDER_SMTP_PORT", "SMTP port", shown="25, 587 with starttls, 465 with tls"
    )
    smtp_tls: Annotated[SmtpTls, Lowercase] | None = setting(
        None, "ORDER_SMTP_TLS", "none, starttls or tls", shown="starttls with a username, else none"
    )
    smtp_username: Text | None = setting(
        None, "ORDER_SMTP_USERNAME", "SMTP AUTH user, with ORDER_SMTP_PASSWORD"
    )
    smtp_password: SecretStr | None = setting(
        None, "ORDER_SMTP_PASSWORD", "SMTP AUTH password; prefer the variable: flags show in `ps`"
    )
    smtp_timeout: Annotated[float, Field(gt=0, allow_inf_nan=False)] = setting(
        10.0, "ORDER_SMTP_TIMEOUT", "seconds for connecting and for each SMTP command"
    )
    smtp_ca_file: ExistingFile | None = setting(
        None, "ORDER_SMTP_CA_FILE", "PEM file of the CAs to trust", shown="the system's CAs"
    )

    @model_validator(mode="after")
    def _smtp_settings_agree(self) -> Self:
        fields = MailSettings.model_fields
        stray = [
            str(field.validation_alias)
            for name, field in fields.items()
            if name.startswith("smtp_") and getattr(self, name) != field.default
        ]
        if self.smtp_host is None and stray:
            # Settings for a server that is not there point at a typo: better to say
            # so than to quietly write to the outbox.
            raise ValueError(f"{', '.join(stray)} set, but ORDER_SMTP_HOST is not")
        if (self.smtp_username is None) != (self.smtp_password is None):
            raise ValueError(
                "ORDER_SMTP_USERNAME and ORDER_SMTP_PASSWORD go together: set both or neither"
            )
        return self

    @property
    def smtp_security(self) -> SmtpTls:
        # Credentials never go over the wire in clear text unless asked for explicitly.
        return self.smtp_tls or ("starttls" if self.smtp_username else "none")

    @property
    def smtp_effective_port(self) -> int:
        return self.smtp_port or DEFAULT_SMTP_PORTS[self.smtp_security]


class Mailer(Protocol):
    """Sends one rendered message, idempotently; MailDeliveryError says if a retry can help."""

    async def send(self, message: EmailMessage, notification: Notification) -> None: ...


class MailDeliveryError(Exception):
    """The message was not accepted; `permanent` when no retry can change that."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def mailer_for(settings: MailSettings) -> Mailer:
    """SMTP when a server is configured, else the outbox folder."""
    return SmtpMailer(settings) if settings.smtp_host else OutboxMailer(settings.outbox_dir)


class MailService:
    """Sends each notification once: `sent` is the Message-ID by idempotency key.

    A mail server that fails makes the attempt fail, to be retried; one that
    rejects the recipient for good (5xx) fails it for good.
    """

    def __init__(
        self, settings: MailSettings, ledger: Ledger | None, mailer: Mailer | None
    ) -> None:
        self.settings = settings
        self.mailer = mailer if mailer is not None else mailer_for(settings)
        self.sent = Effects(EffectKind.EMAIL, ledger, lambda effect: effect.result)

    async def send(self, message: EmailMessage, notification: Notification) -> None:
        key, order_id, kind = notification.idempotency_key, notification.order_id, notification.kind
        if await self.sent.recall(key, order_id) is None and self.settings.smtp_host is None:
            # Simulated latency for the outbox only: a real SMTP server takes its own time.
            await simulate(self.settings.sim_email_seconds, order_id, "sending email")
        if key in self.sent:
            logger.info("order %s: %s email already sent", order_id, kind.value)
            return
        try:
            await self.mailer.send(message, notification)
        except MailDeliveryError as err:
            attempt = activity.info().attempt
            logger.warning(
                "order %s: %s email not sent (attempt %d): %s", order_id, kind.value, attempt, err
            )
            raise ApplicationError(
                str(err),
                type=RECIPIENT_REJECTED if err.permanent else MAIL_SERVER_UNAVAILABLE,
                non_retryable=err.permanent,
            ) from err
        request = {"order_id": order_id, "kind": kind.value, "to": str(message["To"])}
        await self.sent.record(key, order_id, request, str(message["Message-ID"]))
        # The address masked: no email address in a log line (docs/decisions/0017).
        to = mask_email(str(message["To"]))
        logger.info("order %s: emailed %r to %s", order_id, str(message["Subject"]), to)


class OutboxMailer:
    """Files each message as `<outbox_dir>/<order_id>/<kind>.eml` instead of sending it.

    Each is written in `<outbox_dir>/.tmp/` first, as Maildir does, so an order's folder
    only ever holds whole emails, even when a worker is killed in the middle of one.
    """

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
        await asyncio.to_thread(
            write_once_atomically, self.path_for(notification), data, self.outbox_dir / ".tmp"
        )


class SmtpMailer:
    """Sends each message to an SMTP server, with smtplib in a thread (docs/decisions/0013).

    A retry after a lost reply sends the same message, same Message-ID, again.
    """

    def __init__(self, settings: MailSettings) -> None:
        assert settings.smtp_host, "an SmtpMailer needs ORDER_SMTP_HOST"
        self.settings = settings
        self.host, self.port = settings.smtp_host, settings.smtp_effective_port
        self.security = settings.smtp_security
        self._tls: ssl.SSLContext | None = None
        if self.security != "none":
            # Certificates and host names are verified: a relay with a self-signed
            # certificate is trusted through the CA file, never by switching checks off.
            self._tls = ssl.create_default_context(cafile=settings.smtp_ca_file)

    def __str__(self) -> str:
        """For logs: where and how, never the password."""
        settings = self.settings
        user = f"{settings.smtp_username}@" if settings.smtp_username else ""
        ca = f", trusting {settings.smtp_ca_file}" if settings.smtp_ca_file else ""
        return (
            f"SMTP server {user}{self.host}:{self.port} "
            f"(TLS: {self.security}{ca}, timeout {settings.smtp_timeout:g} s)"
        )

    async def send(self, message: EmailMessage, notification: Notification) -> None:
        await asyncio.to_thread(self._send_blocking, message)

    def _send_blocking(self, message: EmailMessage) -> None:
        settings = self.settings
        server = f"{self.host}:{self.port}"
        try:
            smtp = self._connect()
        except smtplib.SMTPResponseException as err:
            raise _transient(server, "refused the connection", err) from err
        except (smtplib.SMTPException, OSError) as err:
            raise MailDeliveryError(f"{server} unreachable: {_describe(err)}") from err
        try:
            if self.security == "starttls":
                smtp.starttls(context=self._tls)
            if settings.smtp_username and settings.smtp_password:
                smtp.login(settings.smtp_username, settings.smtp_password.get_secret_value())
            smtp.send_message(message)
        except smtplib.SMTPRecipientsRefused as err:
            # One recipient per message, so "refused" means refused for all of them.
            refusals = [(code, text) for code, text in err.recipients.values()]
            detail = "; ".join(f"{code} {_text(reply)}" for code, reply in refusals)
            permanent = bool(refusals) and all(500 <= code <= 599 for code, _ in refusals)
            # Masked: this message is logged and kept in the activity's failure.
            refused = ", ".join(mask_email(recipient) for recipient in err.recipients)
            raise MailDeliveryError(
                f"{server} refused recipient {refused}: {detail}",
                permanent=permanent,
            ) from err
        except smtplib.SMTPAuthenticationError as err:
            # Retryable: wrong credentials are fixed in the worker's settings, and the
            # email is then sent by a later attempt.
            who = settings.smtp_username
            raise _transient(server, f"rejected the login of {who!r}", err) from err
        except smtplib.SMTPResponseException as err:
            # Sender or message refused, or a 4xx: a server or configuration
            # problem, not one of this recipient; retried.
            raise _transient(server, "refused the message", err) from err
        except (smtplib.SMTPException, OSError) as err:
            raise MailDeliveryError(f"sending to {server} failed: {_describe(err)}") from err
        finally:
            # The message may be accepted already: a failing QUIT must not make
            # the activity fail, or the retry would send it twice.
            with contextlib.suppress(smtplib.SMTPException, OSError):
                smtp.quit()
            smtp.close()

    def _connect(self) -> smtplib.SMTP:
        timeout = self.settings.smtp_timeout
        if self.security == "tls":
            return smtplib.SMTP_SSL(self.host, self.port, timeout=timeout, context=self._tls)
        return smtplib.SMTP(self.host, self.port, timeout=timeout)


# An address in a mail server's reply ("550 5.1.1 <bob@example.com>: unknown user").
_ADDRESS_IN_REPLY = re.compile(r"[^\s<>@,;:\"'()\[\]]+@[^\s<>@,;:\"'()\[\]]+")


def _text(reply: bytes | str) -> str:
    """A mail server's reply for a log line or a failure: any address in it masked."""
    text = reply.decode(errors="replace") if isinstance(reply, bytes) else reply
    return _ADDRESS_IN_REPLY.sub(lambda found: mask_email(found.group()), text)


def _describe(err: BaseException) -> str:
    return str(err) or type(err).__name__


def _transient(server: str, what: str, err: smtplib.SMTPResponseException) -> MailDeliveryError:
    return MailDeliveryError(f"{server} {what}: {err.smtp_code} {_text(err.smtp_error)}")


def safe_path_component(name: str) -> str:
    """`name` if it is a harmless file name, else a sanitised one with a digest to keep it unique.

    Order ids come from clients; one like "../x" must not escape the outbox.
    """
    if _SAFE_NAME.fullmatch(name):
        return name
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".")[:80] or "order"
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{cleaned}-{digest}"


def write_once_atomically(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Writes `path` unless it exists, through a temporary file in `tmp_dir` (on the same
    file system), so readers never see half a file.

    A retried send finds the file there and leaves it alone; two racing sends
    write the same bytes, and the rename makes either one win whole. A process killed
    mid-write leaves its temporary file in `tmp_dir`, never beside `path`.
    """
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix=f".{path.name}.", suffix=".tmp")
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
