"""How the simulated providers behave, and where the emails go.

Every setting comes from an environment variable (see `SimulationConfig.from_env`):

Durations, in seconds (a float >= 0), each simulated provider call:
    ORDER_SIM_INVENTORY_SECONDS (0.5), ORDER_SIM_PAYMENT_SECONDS (2),
    ORDER_SIM_PREPARE_SECONDS (5), ORDER_SIM_SHIP_SECONDS (3),
    ORDER_SIM_DELIVER_SECONDS (10), ORDER_SIM_EMAIL_SECONDS (0.2; outbox only,
    not added to real SMTP sends).

Failures, all off by default:
    ORDER_SIM_STOCK                "PROD-123=5,PROD-9=0": units in stock per product id;
                                   "*=N" sets the stock of every unlisted product.
                                   Unlisted products are unlimited unless "*" is given.
    ORDER_SIM_DECLINE_METHODS      "declined_card,expired_card": payment methods the
                                   gateway always declines (case-insensitive).
    ORDER_SIM_DECLINE_OVER         "1000" or "999.99": the gateway declines any charge
                                   above this amount (any currency; exact decimal).
    ORDER_SIM_FAILURE_RATE         "0.3": chance (0..1) that an attempt fails transiently
                                   (a retryable "ProviderUnavailable" error).
    ORDER_SIM_FAIL_FIRST_ATTEMPTS  "2": the first N attempts of each activity execution fail
                                   (each email separately, for example).
    ORDER_SIM_FAIL_ACTIVITIES      "charge_payment,ship_order" or "all": which activities
                                   the two settings above apply to; default the forward
                                   steps (reserve_inventory, charge_payment,
                                   prepare_shipment, ship_order, deliver_order).

Memory of the simulated providers:
    ORDER_SIM_LEDGER               path of a SQLite file where the providers record what they
                                   did (charges, refunds, reservations and releases, emails),
                                   once per idempotency key, shared by every worker using it:
                                   a retry after a worker is killed, or on another worker,
                                   still has no second effect (activities/ledger.py).
                                   Unset: in the worker's memory, lost when it stops.

Email:
    ORDER_OUTBOX_DIR               folder for .eml files when no SMTP server is set ("outbox").
    ORDER_EMAIL_FROM               From address ("orders@acme.example"); "Name <addr>" works.
    ORDER_SMTP_HOST                send over SMTP to this server; unset: write to the outbox.
    ORDER_SMTP_PORT                default 25, 587 with starttls, 465 with tls.
    ORDER_SMTP_TLS                 none | starttls | tls (implicit TLS); default starttls when
                                   ORDER_SMTP_USERNAME is set, else none.
    ORDER_SMTP_USERNAME, ORDER_SMTP_PASSWORD   AUTH credentials, both or neither.
    ORDER_SMTP_TIMEOUT             seconds for connecting and for each SMTP command (10).
    ORDER_SMTP_CA_FILE             PEM file of the CA(s) to trust instead of the system's,
                                   e.g. for a relay with a self-signed certificate.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path

from activities.email import InvalidRecipientError, parse_sender

# Environment variable for each duration field, in seconds.
DURATION_ENV_VARS: Mapping[str, str] = {
    "inventory": "ORDER_SIM_INVENTORY_SECONDS",
    "payment": "ORDER_SIM_PAYMENT_SECONDS",
    "prepare": "ORDER_SIM_PREPARE_SECONDS",
    "ship": "ORDER_SIM_SHIP_SECONDS",
    "deliver": "ORDER_SIM_DELIVER_SECONDS",
    "email": "ORDER_SIM_EMAIL_SECONDS",
}
OUTBOX_DIR_ENV_VAR = "ORDER_OUTBOX_DIR"
DEFAULT_OUTBOX_DIR = "outbox"
LEDGER_ENV_VAR = "ORDER_SIM_LEDGER"

STOCK_ENV_VAR = "ORDER_SIM_STOCK"
DECLINE_METHODS_ENV_VAR = "ORDER_SIM_DECLINE_METHODS"
DECLINE_OVER_ENV_VAR = "ORDER_SIM_DECLINE_OVER"
FAILURE_RATE_ENV_VAR = "ORDER_SIM_FAILURE_RATE"
FAIL_FIRST_ATTEMPTS_ENV_VAR = "ORDER_SIM_FAIL_FIRST_ATTEMPTS"
FAIL_ACTIVITIES_ENV_VAR = "ORDER_SIM_FAIL_ACTIVITIES"
# In ORDER_SIM_STOCK: the stock of every product not listed.
ANY_PRODUCT = "*"
# In ORDER_SIM_FAIL_ACTIVITIES: every activity, compensation and email included.
ALL_ACTIVITIES_WORD = "all"

EMAIL_FROM_ENV_VAR = "ORDER_EMAIL_FROM"
DEFAULT_EMAIL_FROM = "orders@acme.example"
SMTP_HOST_ENV_VAR = "ORDER_SMTP_HOST"
SMTP_PORT_ENV_VAR = "ORDER_SMTP_PORT"
SMTP_TLS_ENV_VAR = "ORDER_SMTP_TLS"
SMTP_USERNAME_ENV_VAR = "ORDER_SMTP_USERNAME"
SMTP_PASSWORD_ENV_VAR = "ORDER_SMTP_PASSWORD"
SMTP_TIMEOUT_ENV_VAR = "ORDER_SMTP_TIMEOUT"
SMTP_CA_FILE_ENV_VAR = "ORDER_SMTP_CA_FILE"
DEFAULT_SMTP_TIMEOUT = 10.0

# The activities' names, as registered with the worker and scheduled by the workflow.
FORWARD_ACTIVITIES = frozenset(
    {"reserve_inventory", "charge_payment", "prepare_shipment", "ship_order", "deliver_order"}
)
COMPENSATION_ACTIVITIES = frozenset({"release_inventory", "refund_payment"})
EMAIL_ACTIVITIES = frozenset({"send_notification"})
ALL_ACTIVITIES = FORWARD_ACTIVITIES | COMPENSATION_ACTIVITIES | EMAIL_ACTIVITIES


class SmtpSecurity(StrEnum):
    NONE = "none"
    STARTTLS = "starttls"  # plain connection upgraded with STARTTLS; required, not optional
    TLS = "tls"  # TLS from the first byte ("SMTPS")


DEFAULT_SMTP_PORTS: Mapping[SmtpSecurity, int] = {
    SmtpSecurity.NONE: 25,
    SmtpSecurity.STARTTLS: 587,
    SmtpSecurity.TLS: 465,
}


@dataclass(frozen=True)
class SmtpConfig:
    """An SMTP server to send the emails through."""

    host: str
    port: int | None = None  # None: the usual port for `security`
    security: SmtpSecurity = SmtpSecurity.NONE
    username: str = ""
    # Kept out of repr(), so that logging a config never shows it.
    password: str = field(default="", repr=False)
    timeout: float = DEFAULT_SMTP_TIMEOUT
    ca_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.host or any(ch.isspace() for ch in self.host):
            raise ValueError(f"SMTP host must be a host name or address, got {self.host!r}")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ValueError(f"SMTP port must be between 1 and 65535, got {self.port}")
        if not math.isfinite(self.timeout) or self.timeout <= 0:
            raise ValueError(f"SMTP timeout must be a finite number > 0, got {self.timeout}")
        if bool(self.username) != bool(self.password):
            raise ValueError("SMTP username and password go together: set both or neither")

    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else DEFAULT_SMTP_PORTS[self.security]

    def describe(self) -> str:
        """For logs: where and how, never the password."""
        user = f"{self.username}@" if self.username else ""
        ca = f", trusting {self.ca_file}" if self.ca_file else ""
        return (
            f"SMTP server {user}{self.host}:{self.effective_port} "
            f"(TLS: {self.security.value}{ca}, timeout {self.timeout:g} s)"
        )


@dataclass(frozen=True)
class SimulationConfig:
    """How the simulated providers behave, and where the emails go.

    Durations are in seconds (durations, not money). Their defaults are for
    the `make run` demo: a paid order is delivered about 20 s after payment,
    and the 7 s of charging and packing leave time for a cancel sent right
    after payment to arrive before the order ships. Every failure setting is
    off by default; the module docstring lists the environment variables.
    """

    inventory: float = 0.5
    payment: float = 2.0
    prepare: float = 5.0
    ship: float = 3.0
    deliver: float = 10.0
    email: float = 0.2
    outbox_dir: Path = Path(DEFAULT_OUTBOX_DIR)
    # Where the providers remember their effects across processes (activities/ledger.py);
    # None: in memory, per process.
    ledger_path: Path | None = None

    # Units in stock per product id; products not listed have `default_stock`,
    # or no limit when that is None. Reserving takes stock, releasing gives it back.
    stock: Mapping[str, int] = field(default_factory=dict)
    default_stock: int | None = None
    # Payment methods the gateway always declines, lower-case.
    decline_methods: frozenset[str] = frozenset()
    # The gateway declines charges above this amount (whatever the currency).
    decline_over: Decimal | None = None
    # Transient failures ("ProviderUnavailable") of the activities in `fail_activities`:
    # each attempt fails with this probability, and the first N attempts always fail.
    failure_rate: float = 0.0
    fail_first_attempts: int = 0
    fail_activities: frozenset[str] = FORWARD_ACTIVITIES

    email_from: str = DEFAULT_EMAIL_FROM
    # None: emails are written to `outbox_dir` instead of being sent.
    smtp: SmtpConfig | None = None

    def __post_init__(self) -> None:
        for name in DURATION_ENV_VARS:
            seconds = getattr(self, name)
            if not math.isfinite(seconds) or seconds < 0:
                raise ValueError(f"{name} duration must be a finite number >= 0, got {seconds}")
        for product, units in self.stock.items():
            if not product or product == ANY_PRODUCT or units < 0:
                raise ValueError(f"stock of {product!r} must be >= 0 units, got {units}")
        if self.default_stock is not None and self.default_stock < 0:
            raise ValueError(f"default stock must be >= 0 units, got {self.default_stock}")
        if self.decline_over is not None and not (
            self.decline_over.is_finite() and self.decline_over >= 0
        ):
            raise ValueError(f"decline limit must be an amount >= 0, got {self.decline_over}")
        if not 0.0 <= self.failure_rate <= 1.0:  # also false for NaN
            raise ValueError(f"failure rate must be between 0 and 1, got {self.failure_rate}")
        if self.fail_first_attempts < 0:
            raise ValueError(f"failing attempts must be >= 0, got {self.fail_first_attempts}")
        unknown = self.fail_activities - ALL_ACTIVITIES
        if unknown:
            raise ValueError(
                f"unknown activities {sorted(unknown)}; known: {sorted(ALL_ACTIVITIES)}"
            )
        parse_sender(self.email_from)  # raises InvalidRecipientError, a ValueError

    @property
    def simulates_failures(self) -> bool:
        return bool(
            self.stock
            or self.default_stock is not None
            or self.decline_methods
            or self.decline_over is not None
            or (self.fail_activities and (self.failure_rate or self.fail_first_attempts))
        )

    def describe_failures(self) -> str:
        """For the worker's startup log: which failures are simulated."""
        parts = []
        if self.stock or self.default_stock is not None:
            levels = [f"{product}={units}" for product, units in sorted(self.stock.items())]
            if self.default_stock is not None:
                levels.append(f"{ANY_PRODUCT}={self.default_stock}")
            parts.append(f"stock {', '.join(levels)}")
        if self.decline_methods:
            parts.append(f"declining {', '.join(sorted(self.decline_methods))}")
        if self.decline_over is not None:
            parts.append(f"declining charges over {self.decline_over}")
        if self.fail_activities and (self.failure_rate or self.fail_first_attempts):
            how = []
            if self.fail_first_attempts:
                how.append(f"first {self.fail_first_attempts} attempt(s)")
            if self.failure_rate:
                how.append(f"{self.failure_rate * 100:g}% of attempts")
            parts.append(
                f"failing {' and '.join(how)} of {', '.join(sorted(self.fail_activities))}"
            )
        return "; ".join(parts) or "none"

    @classmethod
    def instant(cls, outbox_dir: str | os.PathLike[str]) -> SimulationConfig:
        """No simulated latency at all: for tests."""
        return cls(
            inventory=0.0,
            payment=0.0,
            prepare=0.0,
            ship=0.0,
            deliver=0.0,
            email=0.0,
            outbox_dir=Path(outbox_dir),
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SimulationConfig:
        """The defaults, overridden by the ORDER_SIM_* (ORDER_SIM_LEDGER among them),
        ORDER_OUTBOX_DIR, ORDER_EMAIL_FROM and ORDER_SMTP_* variables that are set
        (the module docstring lists them).

        Raises ValueError naming the variable when a value is not valid.
        """
        env = os.environ if environ is None else environ

        def get(var: str) -> str:
            return env.get(var, "").strip()

        durations: dict[str, float] = {}
        for name, var in DURATION_ENV_VARS.items():
            raw = get(var)
            if not raw:
                continue
            try:
                durations[name] = float(raw)
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a number of seconds") from None
            if not math.isfinite(durations[name]) or durations[name] < 0:
                raise ValueError(f"{var}={raw!r} must be a finite number of seconds >= 0")
        outbox_dir = Path(get(OUTBOX_DIR_ENV_VAR) or DEFAULT_OUTBOX_DIR)
        ledger_raw = get(LEDGER_ENV_VAR)
        ledger_path = Path(ledger_raw) if ledger_raw else None
        if ledger_path is not None and ledger_path.is_dir():
            raise ValueError(f"{LEDGER_ENV_VAR}={ledger_raw!r} is a folder, not a file")
        stock, default_stock = _parse_stock(get(STOCK_ENV_VAR))
        fail_activities = _parse_activities(get(FAIL_ACTIVITIES_ENV_VAR))
        email_from = get(EMAIL_FROM_ENV_VAR) or DEFAULT_EMAIL_FROM
        try:
            parse_sender(email_from)
        except InvalidRecipientError as err:
            raise ValueError(f"{EMAIL_FROM_ENV_VAR}={email_from!r}: {err}") from None
        return cls(
            **durations,
            outbox_dir=outbox_dir,
            ledger_path=ledger_path,
            stock=stock,
            default_stock=default_stock,
            decline_methods=frozenset(m.lower() for m in _split_list(get(DECLINE_METHODS_ENV_VAR))),
            decline_over=_parse_amount(DECLINE_OVER_ENV_VAR, get(DECLINE_OVER_ENV_VAR)),
            failure_rate=_parse_rate(FAILURE_RATE_ENV_VAR, get(FAILURE_RATE_ENV_VAR)),
            fail_first_attempts=_parse_count(
                FAIL_FIRST_ATTEMPTS_ENV_VAR, get(FAIL_FIRST_ATTEMPTS_ENV_VAR)
            ),
            fail_activities=fail_activities,
            email_from=email_from,
            smtp=_smtp_from_env(env),
        )


def _split_list(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


def _parse_stock(raw: str) -> tuple[dict[str, int], int | None]:
    stock: dict[str, int] = {}
    default: int | None = None
    for entry in _split_list(raw):
        product, sep, units_text = entry.rpartition("=")
        product = product.strip()
        if not sep or not product:
            raise ValueError(
                f"{STOCK_ENV_VAR}: {entry!r} is not PRODUCT=UNITS (e.g. PROD-123=5,*=100)"
            )
        units = _parse_count(f"{STOCK_ENV_VAR} ({product})", units_text.strip())
        if product in stock or (product == ANY_PRODUCT and default is not None):
            raise ValueError(f"{STOCK_ENV_VAR}: {product!r} is listed twice")
        if product == ANY_PRODUCT:
            default = units
        else:
            stock[product] = units
    return stock, default


def _parse_activities(raw: str) -> frozenset[str]:
    names = _split_list(raw)
    if not names:
        return FORWARD_ACTIVITIES
    if [n.lower() for n in names] == [ALL_ACTIVITIES_WORD]:
        return ALL_ACTIVITIES
    unknown = sorted(set(names) - ALL_ACTIVITIES)
    if unknown:
        raise ValueError(
            f"{FAIL_ACTIVITIES_ENV_VAR}: unknown activities {', '.join(unknown)}; "
            f"known: {', '.join(sorted(ALL_ACTIVITIES))}, or {ALL_ACTIVITIES_WORD}"
        )
    return frozenset(names)


def _parse_count(var: str, raw: str) -> int:
    if not raw:
        return 0
    # isdecimal() refuses signs, spaces and "1e3", which int() would take or choke on.
    if not raw.isascii() or not raw.isdecimal():
        raise ValueError(f"{var}={raw!r} is not a whole number >= 0")
    return int(raw)


def _parse_rate(var: str, raw: str) -> float:
    if not raw:
        return 0.0
    try:
        rate = float(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a number between 0 and 1") from None
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"{var}={raw!r} must be between 0 and 1")
    return rate


def _parse_amount(var: str, raw: str) -> Decimal | None:
    # Decimal, not float: "999.99" must mean exactly 999.99.
    if not raw:
        return None
    try:
        amount = Decimal(raw)
    except InvalidOperation:
        raise ValueError(f"{var}={raw!r} is not a decimal amount like 1000 or 999.99") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{var}={raw!r} must be an amount >= 0")
    return amount


def _parse_seconds(var: str, raw: str) -> float:
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{var}={raw!r} must be a finite number of seconds > 0")
    return seconds


def _smtp_from_env(env: Mapping[str, str]) -> SmtpConfig | None:
    host = env.get(SMTP_HOST_ENV_VAR, "").strip()
    others = [
        SMTP_PORT_ENV_VAR,
        SMTP_TLS_ENV_VAR,
        SMTP_USERNAME_ENV_VAR,
        SMTP_PASSWORD_ENV_VAR,
        SMTP_TIMEOUT_ENV_VAR,
        SMTP_CA_FILE_ENV_VAR,
    ]
    if not host:
        # Settings for a server that is not there point at a typo: better to say so
        # than to quietly write to the outbox.
        stray = [var for var in others if env.get(var, "").strip()]
        if stray:
            raise ValueError(f"{', '.join(stray)} set, but {SMTP_HOST_ENV_VAR} is not")
        return None
    if any(ch.isspace() for ch in host):
        raise ValueError(f"{SMTP_HOST_ENV_VAR}={host!r} is not a host name or address")

    username = env.get(SMTP_USERNAME_ENV_VAR, "").strip()
    password = env.get(SMTP_PASSWORD_ENV_VAR, "")  # as given: spaces may belong to it
    if bool(username) != bool(password):
        raise ValueError(
            f"{SMTP_USERNAME_ENV_VAR} and {SMTP_PASSWORD_ENV_VAR} go together: set both or neither"
        )

    tls_raw = env.get(SMTP_TLS_ENV_VAR, "").strip().lower()
    if not tls_raw:
        # Credentials never go over the wire in clear text unless asked for explicitly.
        security = SmtpSecurity.STARTTLS if username else SmtpSecurity.NONE
    else:
        try:
            security = SmtpSecurity(tls_raw)
        except ValueError:
            choices = " | ".join(s.value for s in SmtpSecurity)
            raise ValueError(f"{SMTP_TLS_ENV_VAR}={tls_raw!r} is not one of {choices}") from None

    port: int | None = None
    port_raw = env.get(SMTP_PORT_ENV_VAR, "").strip()
    if port_raw:
        port = _parse_count(SMTP_PORT_ENV_VAR, port_raw)
        if not 1 <= port <= 65535:
            raise ValueError(f"{SMTP_PORT_ENV_VAR}={port_raw!r} must be between 1 and 65535")

    timeout_raw = env.get(SMTP_TIMEOUT_ENV_VAR, "").strip()
    timeout = (
        _parse_seconds(SMTP_TIMEOUT_ENV_VAR, timeout_raw) if timeout_raw else DEFAULT_SMTP_TIMEOUT
    )

    ca_file: Path | None = None
    ca_raw = env.get(SMTP_CA_FILE_ENV_VAR, "").strip()
    if ca_raw:
        ca_file = Path(ca_raw)
        if not ca_file.is_file():
            raise ValueError(f"{SMTP_CA_FILE_ENV_VAR}={ca_raw!r} is not a file")
    return SmtpConfig(
        host=host,
        port=port,
        security=security,
        username=username,
        password=password,
        timeout=timeout,
        ca_file=ca_file,
    )
