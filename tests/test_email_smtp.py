"""Emails over SMTP: a real aiosmtpd server on loopback receives what the orders send.

The mailer is tested on its own first (plain, STARTTLS with AUTH, implicit
TLS, and each way a server can fail), then end to end: orders driven through
gRPC, every email of the seed's flows checked at the server, and a mail
server that refuses or is down never holds an order up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from pydantic import SecretStr
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from acme.orders.v1 import order_service_pb2 as pb
from activities.email import TITLES, render_notification
from activities.order_activities import OrderActivities
from activities.providers import ProviderSettings
from activities.providers.mail import MailDeliveryError, MailSettings, SmtpMailer, mailer_for
from tests.support.emails import body_of
from tests.support.env import free_port
from tests.support.orders import (
    activity_attempts,
    create_request,
    email_attempts,
    email_workflows,
    failure_message,
    payment_request,
)
from tests.support.polling import eventually
from tests.support.stack import Stack, open_stack, order_reaching
from workflows.models import Notification, NotificationKind, OrderState, OrderStatus
from workflows.money import Money
from workflows.order_workflow import EMAIL_GRACE

S = pb.OrderStatus
SENDER = "Acme Orders <orders@shop.example>"
REJECTED_DOMAIN = "rejected.example"
USERNAME, PASSWORD = "acme-orders", "s3cret pass"


def eml_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.eml")) if folder.exists() else []


# --- An SMTP server on loopback ---------------------------------------------------------


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    login: str | None  # the AUTH user the client logged in as
    tls: bool  # whether the session was encrypted


class Inbox:
    """aiosmtpd handler: keeps what it accepts; can refuse a message's first tries.

    Runs in the server's own thread; the lists are only appended to there.
    """

    def __init__(self, refuse_first: int = 0) -> None:
        self.received: list[Received] = []
        self.refuse_first = refuse_first
        self.tries: Counter[str] = Counter()  # DATA commands per Message-ID
        self.lock = threading.Lock()

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address.endswith(f"@{REJECTED_DOMAIN}"):
            # As Postfix words it: the address in the reply too.
            return f"550 5.1.1 <{address}>: No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content
        assert isinstance(content, bytes)
        message = BytesParser(policy=policy.default).parsebytes(content)
        assert isinstance(message, EmailMessage)
        message_id = str(message["Message-ID"])
        with self.lock:
            self.tries[message_id] += 1
            if self.tries[message_id] <= self.refuse_first:
                return "451 4.3.0 Mailbox busy, try again later"
            login = getattr(session.auth_data, "login", None)
            self.received.append(
                Received(
                    mail_from=str(envelope.mail_from),
                    rcpt_tos=list(envelope.rcpt_tos),
                    message=message,
                    login=login.decode() if isinstance(login, bytes) else None,
                    tls=encrypted(server, session),
                )
            )
        return "250 2.0.0 Accepted"

    def for_order(self, order_id: str) -> dict[str, Received]:
        """Kind of notification → what arrived, for one order."""
        with self.lock:
            return {
                str(r.message["X-Notification-Kind"]): r
                for r in self.received
                if r.message["X-Order-Id"] == order_id
            }


def encrypted(server: SMTP, session: Session) -> bool:
    """Upgraded by STARTTLS (aiosmtpd notes that in the session), or TLS from the start."""
    transport = server.transport
    implicit = transport is not None and transport.get_extra_info("ssl_object") is not None
    return session.ssl is not None or implicit


def authenticate(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (
        USERNAME.encode(),
        PASSWORD.encode(),
    )
    # handled=False: aiosmtpd then answers 535 itself (its default, True, answers nothing).
    return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


@asynccontextmanager
async def smtp_server(inbox: Inbox, port: int, **kwargs: Any) -> AsyncIterator[Controller]:
    """An aiosmtpd server on 127.0.0.1:`port`, in its own thread, until the block ends."""
    controller = Controller(inbox, hostname="127.0.0.1", port=port, **kwargs)
    await asyncio.to_thread(controller.start)
    try:
        yield controller
    finally:
        await asyncio.to_thread(controller.stop)


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for 127.0.0.1 and localhost, made by the openssl CLI.

    The CLI rather than the `cryptography` package, which the project does not
    otherwise need; the tests that need it are skipped where there is none.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return Certificate(cert, key)


# --- The mailer on its own ----------------------------------------------------------------


def note(kind: NotificationKind = NotificationKind.ORDER_RECEIVED, **changes: Any) -> Notification:
    base = Notification(
        kind=kind,
        order_id="ORD-SMTP-1",
        customer_id="CUST-001",
        recipient="cust-001@example.com",
        total_amount=Money("USD", 999, 990_000_000),
        reason="Customer requested cancellation",
    )
    return dataclasses.replace(base, **changes)


def smtp_settings(port: int, **changes: Any) -> MailSettings:
    """Mail settings for the SMTP server on 127.0.0.1:`port`."""
    return MailSettings(smtp_host="127.0.0.1", smtp_port=port, **changes)


def message_for(notification: Notification) -> EmailMessage:
    return render_notification(notification, datetime(2025, 1, 31, tzinfo=UTC), sender=SENDER)


async def test_plain_smtp_delivers_the_rendered_message() -> None:
    inbox, port = Inbox(), free_port()
    async with smtp_server(inbox, port):
        mailer = SmtpMailer(smtp_settings(port))
        sent = message_for(note())
        await mailer.send(sent, note())
    [got] = inbox.received
    assert got.mail_from == "orders@shop.example"
    assert got.rcpt_tos == ["cust-001@example.com"]
    assert got.message["From"] == SENDER
    assert got.message["Message-ID"] == sent["Message-ID"]
    assert got.message["Subject"] == "Order Received: ORD-SMTP-1"
    assert (got.login, got.tls) == (None, False)


async def test_starttls_with_auth(certificate: Certificate) -> None:
    inbox, port = Inbox(), free_port()
    server = smtp_server(
        inbox,
        port,
        tls_context=certificate.server_context(),
        require_starttls=True,
        authenticator=authenticate,
        auth_require_tls=True,
    )
    settings = smtp_settings(
        port,
        smtp_tls="starttls",
        smtp_username=USERNAME,
        smtp_password=PASSWORD,
        smtp_ca_file=certificate.cert,
    )
    async with server:
        await SmtpMailer(settings).send(message_for(note()), note())
        wrong = SmtpMailer(settings.model_copy(update={"smtp_password": SecretStr("wrong")}))
        with pytest.raises(MailDeliveryError) as caught:
            await wrong.send(message_for(note()), note())
        # Fixed by correcting the worker's settings, then sent by a later attempt.
        assert not caught.value.permanent
        assert "535" in str(caught.value)
        assert "wrong" not in str(caught.value)
    [got] = inbox.received
    assert (got.login, got.tls) == (USERNAME, True)


async def test_implicit_tls(certificate: Certificate) -> None:
    inbox, port = Inbox(), free_port()
    async with smtp_server(inbox, port, ssl_context=certificate.server_context()):
        settings = smtp_settings(port, smtp_tls="tls", smtp_ca_file=certificate.cert)
        await SmtpMailer(settings).send(message_for(note()), note())
        # An untrusted certificate is an error to retry, never a reason to send in clear.
        untrusted = SmtpMailer(settings.model_copy(update={"smtp_ca_file": None}))
        with pytest.raises(MailDeliveryError) as caught:
            await untrusted.send(message_for(note()), note())
        assert not caught.value.permanent
        assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    [got] = inbox.received
    assert got.tls


async def test_server_down_is_a_transient_failure() -> None:
    mailer = SmtpMailer(smtp_settings(free_port(), smtp_timeout=2))
    with pytest.raises(MailDeliveryError) as caught:
        await mailer.send(message_for(note()), note())
    assert not caught.value.permanent
    assert "unreachable" in str(caught.value)


async def test_silent_server_times_out() -> None:
    """A server that accepts the connection but never answers: ORDER_SMTP_TIMEOUT bounds it."""
    connections: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        mailer = SmtpMailer(smtp_settings(port, smtp_timeout=0.5))
        started = time.monotonic()
        with pytest.raises(MailDeliveryError) as caught:
            await mailer.send(message_for(note()), note())
        assert time.monotonic() - started < 3
        assert not caught.value.permanent
    finally:
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_refusals_are_retryable_rejections_are_final(tmp_path: Path) -> None:
    inbox, port = Inbox(refuse_first=1), free_port()
    settings = ProviderSettings.instant(
        tmp_path, smtp_host="127.0.0.1", smtp_port=port, email_from=SENDER
    )
    acts = OrderActivities(settings)
    assert isinstance(acts.mail.mailer, SmtpMailer)
    env = ActivityEnvironment()
    async with smtp_server(inbox, port):
        # 451: a temporary refusal, retried.
        with pytest.raises(ApplicationError) as caught:
            await env.run(acts.send_notification, note())
        assert caught.value.type == "MailServerUnavailable"
        assert not caught.value.non_retryable
        assert "451" in caught.value.message
        await env.run(acts.send_notification, note())
        # 550 for the recipient: no retry will change that.
        rejected = note(order_id="ORD-SMTP-2", recipient=f"nobody@{REJECTED_DOMAIN}")
        with pytest.raises(ApplicationError) as caught:
            await env.run(acts.send_notification, rejected)
        assert caught.value.type == "RecipientRejected"
        assert caught.value.non_retryable
        assert "550" in caught.value.message
        # The failure is logged and kept in the history: the address in it masked, the
        # one the client sent and the one the server's reply repeats alike.
        assert "nobody@" not in caught.value.message
        assert caught.value.message.count(f"n***@{REJECTED_DOMAIN}") == 2
    assert [r.rcpt_tos for r in inbox.received] == [["cust-001@example.com"]]
    # Nothing goes to the outbox when SMTP is configured.
    assert eml_files(tmp_path) == []


def test_mailer_follows_the_settings(tmp_path: Path) -> None:
    assert not isinstance(mailer_for(MailSettings(outbox_dir=tmp_path)), SmtpMailer)
    settings = MailSettings(
        smtp_host="mail.example", smtp_tls="none", smtp_username="u", smtp_password=SecretStr("p")
    )
    mailer = mailer_for(settings)
    assert isinstance(mailer, SmtpMailer)
    # What the worker logs at startup: where, never the password.
    assert str(mailer) == "SMTP server u@mail.example:25 (TLS: none, timeout 10 s)"


# --- End to end through gRPC -------------------------------------------------------------


@asynccontextmanager
async def smtp_stack(
    temporal: WorkflowEnvironment, tmp_path: Path, port: int, **smtp: Any
) -> AsyncIterator[Stack]:
    """A stack whose activities send every email to the SMTP server on `port`."""
    outbox = tmp_path / "outbox"
    simulation = ProviderSettings.instant(
        outbox, email_from=SENDER, smtp_host="127.0.0.1", smtp_port=port, smtp_timeout=5, **smtp
    )
    async with open_stack(temporal.client, outbox, simulation=simulation) as stack:
        yield stack
    # SMTP replaces the outbox; nothing may be written there.
    assert eml_files(outbox) == []


def check_email(
    received: Received, kind: NotificationKind, order_id: str, email: str, *mentions: str
) -> None:
    """The envelope and headers reach `email`, with the kind's subject and a body naming
    the order, its total and whatever else `mentions` lists."""
    assert received.rcpt_tos == [email]
    assert received.mail_from == "orders@shop.example"
    message = received.message
    assert message["To"] == email
    assert message["From"] == SENDER
    assert message["Subject"] == f"{TITLES[kind]}: {order_id}"
    body = body_of(message)
    for text in (order_id, "USD 999.99", *mentions):
        assert text in body, f"{text!r} not in the {kind.value} email:\n{body}"


async def test_paid_order_emails_every_step(temporal: WorkflowEnvironment, tmp_path: Path) -> None:
    inbox, port = Inbox(), free_port()
    email = "jane.doe@example.com"
    async with smtp_server(inbox, port), smtp_stack(temporal, tmp_path, port) as stack:
        created = await stack.stub.CreateOrder(create_request(customer_email=email))
        order_id = created.order_id
        await stack.stub.ConfirmPayment(payment_request(order_id, "TXN-SMTP-1"))
        order = await order_reaching(stack, order_id, S.ORDER_STATUS_DELIVERED)
        await email_workflows(stack.client, created.workflow_id)

    tracking = order.shipment_info.tracking_number
    assert tracking
    got = inbox.for_order(order_id)
    assert set(got) == {"order_received", "payment_confirmed", "order_shipped", "order_delivered"}
    K = NotificationKind
    check_email(got["order_received"], K.ORDER_RECEIVED, order_id, email)
    check_email(got["payment_confirmed"], K.PAYMENT_CONFIRMED, order_id, email)
    check_email(got["order_shipped"], K.ORDER_SHIPPED, order_id, email, tracking)
    check_email(got["order_delivered"], K.ORDER_DELIVERED, order_id, email, tracking)
    # The shipped email tells when to expect the parcel.
    eta = order.estimated_delivery.ToDatetime().strftime("%d %B %Y")
    assert eta in body_of(got["order_shipped"].message)
    assert len(inbox.received) == 4


async def test_cancelled_order_emails_the_reason(
    temporal: WorkflowEnvironment, tmp_path: Path
) -> None:
    inbox, port = Inbox(), free_port()
    email = "cust-001@example.com"
    async with smtp_server(inbox, port), smtp_stack(temporal, tmp_path, port) as stack:
        created = await stack.stub.CreateOrder(create_request(customer_email=email))
        order_id = created.order_id
        await stack.stub.CancelOrder(
            pb.CancelOrderRequest(order_id=order_id, reason="Found it cheaper elsewhere")
        )
        await order_reaching(stack, order_id, S.ORDER_STATUS_CANCELLED)
        await email_workflows(stack.client, created.workflow_id)

    got = inbox.for_order(order_id)
    assert set(got) == {"order_received", "order_cancelled"}
    check_email(got["order_received"], NotificationKind.ORDER_RECEIVED, order_id, email)
    check_email(
        got["order_cancelled"],
        NotificationKind.ORDER_CANCELLED,
        order_id,
        email,
        'Reason: "Found it cheaper elsewhere"',
    )


async def test_mail_server_down_does_not_hold_the_order_open(
    temporal: WorkflowEnvironment, tmp_path: Path
) -> None:
    """No server at first: the order closes soon after delivery; its emails follow once the
    server is up, in workflows of their own."""
    inbox, port = Inbox(), free_port()
    async with smtp_stack(temporal, tmp_path, port) as stack:
        created = await stack.stub.CreateOrder(create_request())
        order_id = created.order_id
        await stack.stub.ConfirmPayment(payment_request(order_id, "TXN-SMTP-1"))
        handle = stack.client.get_workflow_handle(created.workflow_id, result_type=OrderState)
        # Instant providers: delivered, then closed after EMAIL_GRACE though no email was sent.
        state = await asyncio.wait_for(handle.result(), timeout=EMAIL_GRACE.total_seconds() + 15)
        assert state.status == OrderStatus.DELIVERED
        emails = [
            stack.client.get_workflow_handle(f"{created.workflow_id}/email/{kind.value}")
            for kind in (
                NotificationKind.ORDER_RECEIVED,
                NotificationKind.PAYMENT_CONFIRMED,
                NotificationKind.ORDER_SHIPPED,
                NotificationKind.ORDER_DELIVERED,
            )
        ]
        # Each email goes on in a workflow of its own, its send failed and to be retried.
        for email in emails:
            pending = await eventually(
                email.describe,
                lambda d: any(p.attempt > 1 for p in d.raw_description.pending_activities),
                within=10,
            )
            [failure] = [
                await failure_message(stack.client, p.last_failure)
                for p in pending.raw_description.pending_activities
            ]
            assert "unreachable" in failure
        assert inbox.received == []

        async with smtp_server(inbox, port):
            histories = await asyncio.wait_for(email_workflows(stack.client, handle.id), 30)
    # Each email was retried until the server came up, and arrived once.
    assert len(histories) == len(inbox.for_order(order_id)) == len(inbox.received) == 4
    assert min(email_attempts(histories)) > 1


async def test_temporary_refusal_is_retried_and_delivered_once(
    temporal: WorkflowEnvironment, tmp_path: Path
) -> None:
    """451 to each message's first try: every email arrives on its second, exactly once."""
    inbox, port = Inbox(refuse_first=1), free_port()
    async with smtp_server(inbox, port), smtp_stack(temporal, tmp_path, port) as stack:
        created = await stack.stub.CreateOrder(create_request())
        await stack.stub.ConfirmPayment(payment_request(created.order_id, "TXN-SMTP-1"))
        await order_reaching(stack, created.order_id, S.ORDER_STATUS_DELIVERED, within=5)
        # Retried within the grace: sent by the order itself, no email workflow needed.
        assert await email_workflows(stack.client, created.workflow_id) == []
    assert len(inbox.for_order(created.order_id)) == len(inbox.received) == 4
    assert set(inbox.tries.values()) == {2}
    history = await stack.client.get_workflow_handle(created.workflow_id).fetch_history()
    assert activity_attempts(history)["send_notification"] == [2, 2, 2, 2]


async def test_rejected_recipient_does_not_fail_the_order(
    temporal: WorkflowEnvironment, tmp_path: Path
) -> None:
    inbox, port = Inbox(), free_port()
    async with smtp_server(inbox, port), smtp_stack(temporal, tmp_path, port) as stack:
        created = await stack.stub.CreateOrder(
            create_request(customer_email=f"nobody@{REJECTED_DOMAIN}")
        )
        await stack.stub.ConfirmPayment(payment_request(created.order_id, "TXN-SMTP-1"))
        await order_reaching(stack, created.order_id, S.ORDER_STATUS_DELIVERED)
        handle = stack.client.get_workflow_handle(created.workflow_id)
        await handle.result()  # completes: a rejected email is logged, not fatal
    assert inbox.received == []
    # Rejected for good at the first attempt: not retried.
    assert activity_attempts(await handle.fetch_history())["send_notification"] == [1, 1, 1, 1]


async def test_order_emails_over_starttls_with_auth(
    temporal: WorkflowEnvironment, tmp_path: Path, certificate: Certificate
) -> None:
    inbox, port = Inbox(), free_port()
    server = smtp_server(
        inbox,
        port,
        tls_context=certificate.server_context(),
        require_starttls=True,
        authenticator=authenticate,
    )
    stack_context = smtp_stack(
        temporal,
        tmp_path,
        port,
        smtp_tls="starttls",
        smtp_username=USERNAME,
        smtp_password=PASSWORD,
        smtp_ca_file=certificate.cert,
    )
    async with server, stack_context as stack:
        created = await stack.stub.CreateOrder(create_request())
        await stack.stub.CancelOrder(pb.CancelOrderRequest(order_id=created.order_id))
        await email_workflows(stack.client, created.workflow_id)
    got = inbox.for_order(created.order_id)
    assert set(got) == {"order_received", "order_cancelled"}
    assert all((r.login, r.tls) == (USERNAME, True) for r in got.values())
