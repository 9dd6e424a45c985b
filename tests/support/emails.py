"""The emails the outbox mailer writes (activities/providers/mail.py), read back."""

from __future__ import annotations

from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path


def read_email(path: Path) -> EmailMessage:
    """The .eml file parsed with the modern policy: headers decoded, get_body available."""
    message = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
    assert isinstance(message, EmailMessage)
    return message


def body_of(message: EmailMessage) -> str:
    """The plain-text body, decoded."""
    part = message.get_body(preferencelist=("plain",))
    assert isinstance(part, EmailMessage)
    return str(part.get_content())
