"""The simulated providers' memory on disk: what they did, once per idempotency key.

A real payment gateway, warehouse or mail service is remote: it remembers the
charges it made and answers a repeated request with the first one's result,
whatever became of the worker that sent it. The simulated providers keep that
memory in the worker's process by default, so a worker killed with SIGKILL
forgets it. With ORDER_SIM_LEDGER set, they keep it in this SQLite file
instead, which any number of worker processes share: a retry on another
worker, or on the same worker after a restart, still has no second effect,
and a test can count the effects afterwards.

Two tables:

    effects   one row per effect, unique by (kind, key): the charge, refund,
              reservation, release or email that happened, the request it
              answered (canonical JSON, to refuse a key reused for another
              request) and its result (capture id, refund id, Message-ID...).
    attempts  one row per call that reached the provider, whatever came of it
              (a first effect, a repeat answered from `effects`, a call cut off
              by a kill), so "retried three times" can be told from "charged
              three times".

One connection per call, in a thread (`asyncio.to_thread`), WAL journal so
readers never wait for writers, and every write in a `BEGIN IMMEDIATE`
transaction so two processes recording the same key cannot both win.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

# How long a call waits for another process's write transaction before failing.
BUSY_TIMEOUT_SECONDS = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS effects (
    kind        TEXT NOT NULL,
    key         TEXT NOT NULL,
    order_id    TEXT NOT NULL,
    request     TEXT NOT NULL,
    result      TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE INDEX IF NOT EXISTS effects_by_result ON effects (kind, result);
CREATE INDEX IF NOT EXISTS effects_by_order ON effects (order_id);
CREATE TABLE IF NOT EXISTS attempts (
    id       INTEGER PRIMARY KEY,
    kind     TEXT NOT NULL,
    key      TEXT NOT NULL,
    order_id TEXT NOT NULL,
    pid      INTEGER NOT NULL,
    at       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_by_order ON attempts (order_id);
"""


class EffectKind(StrEnum):
    """What a provider did; with the idempotency key it identifies one effect."""

    RESERVE = "reserve"  # key: the order id
    RELEASE = "release"  # key: the order id
    CHARGE = "charge"  # key: "<order id>/charge/<transaction id>"
    REFUND = "refund"  # key: "<order id>/refund/<transaction id>"
    EMAIL = "email"  # key: "<order id>/<notification kind>"


@dataclass(frozen=True)
class Effect:
    """One thing a provider did."""

    kind: EffectKind
    key: str
    order_id: str
    request: str  # canonical JSON of the request's parameters (see `canonical`)
    result: str
    pid: int  # the worker process that made it
    recorded_at: float  # Unix time

    def params(self) -> dict[str, Any]:
        """The request's parameters, decoded."""
        decoded: dict[str, Any] = json.loads(self.request)
        return decoded


@dataclass(frozen=True)
class Attempt:
    """One call that reached a provider."""

    kind: EffectKind
    key: str
    order_id: str
    pid: int
    at: float  # Unix time


def canonical(params: Mapping[str, Any]) -> str:
    """The JSON text `Effect.request` holds: equal parameters give equal text."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class Ledger:
    """The effects and attempts in one SQLite file, shared by every process that opens it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Opens the file, creating it and its tables if needed (blocking, at startup)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            # WAL is a property of the file: set once, kept by every later connection.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def __str__(self) -> str:
        return f"ledger {self.path}"

    # --- For the providers ------------------------------------------------------

    async def attempt(self, kind: EffectKind, key: str, order_id: str) -> Effect | None:
        """Counts one call that reached the provider; returns the key's effect, if any yet."""
        return await asyncio.to_thread(self._attempt, kind, key, order_id, os.getpid(), time.time())

    async def record(
        self,
        kind: EffectKind,
        key: str,
        order_id: str,
        request: Mapping[str, Any],
        result: str,
        *,
        unique_result: bool = False,
    ) -> tuple[Effect, bool]:
        """Records an effect unless the key already has one.

        Returns the effect that stands and whether this call recorded it. The
        first effect recorded under a key wins: a caller that lost compares
        the winner's `request` with its own to tell a repeat from a reused key.
        With `unique_result`, a result another effect of the same kind already
        has gets a suffix: "CAP-TXN-1", then "CAP-TXN-1-2", "CAP-TXN-1-3"...
        """
        return await asyncio.to_thread(
            self._record,
            kind,
            key,
            order_id,
            canonical(request),
            result,
            unique_result,
            os.getpid(),
            time.time(),
        )

    async def find(self, kind: EffectKind, key: str) -> Effect | None:
        """The effect recorded under the key, if any (not counted as an attempt)."""
        return await asyncio.to_thread(self._find, kind, key)

    # --- For tests and tools ----------------------------------------------------------

    async def effects(
        self, kind: EffectKind | None = None, order_id: str | None = None
    ) -> list[Effect]:
        """Every effect, optionally of one kind and/or one order, oldest first."""
        return await asyncio.to_thread(self._effects, kind, order_id)

    async def attempts(
        self, kind: EffectKind | None = None, order_id: str | None = None
    ) -> list[Attempt]:
        """Every attempt, optionally of one kind and/or one order, oldest first."""
        return await asyncio.to_thread(self._attempts, kind, order_id)

    # --- Blocking implementations (run in a thread) --------------------------------

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: no implicit transactions; each write opens its own.
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        try:
            # FULL: a committed effect survives the machine, not only the process.
            db.execute("PRAGMA synchronous=FULL")
            yield db
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A connection inside a write transaction, committed unless the block raises."""
        with self._connect() as db:
            # IMMEDIATE takes the write lock now, so a read-then-insert cannot interleave.
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _attempt(
        self, kind: EffectKind, key: str, order_id: str, pid: int, at: float
    ) -> Effect | None:
        with self._write() as db:
            db.execute(
                "INSERT INTO attempts (kind, key, order_id, pid, at) VALUES (?, ?, ?, ?, ?)",
                (kind.value, key, order_id, pid, at),
            )
            return _select_effect(db, kind, key)

    def _record(
        self,
        kind: EffectKind,
        key: str,
        order_id: str,
        request: str,
        result: str,
        unique_result: bool,
        pid: int,
        at: float,
    ) -> tuple[Effect, bool]:
        with self._write() as db:
            existing = _select_effect(db, kind, key)
            if existing is not None:
                return existing, False
            if unique_result:
                result = _unused_result(db, kind, result)
            db.execute(
                "INSERT INTO effects (kind, key, order_id, request, result, pid, recorded_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (kind.value, key, order_id, request, result, pid, at),
            )
            return Effect(kind, key, order_id, request, result, pid, at), True

    def _find(self, kind: EffectKind, key: str) -> Effect | None:
        with self._connect() as db:
            return _select_effect(db, kind, key)

    def _effects(self, kind: EffectKind | None, order_id: str | None) -> list[Effect]:
        where, args = _filters(kind, order_id)
        with self._connect() as db:
            rows = db.execute(
                "SELECT kind, key, order_id, request, result, pid, recorded_at FROM effects"
                f"{where} ORDER BY recorded_at, rowid",
                args,
            ).fetchall()
        return [_effect(row) for row in rows]

    def _attempts(self, kind: EffectKind | None, order_id: str | None) -> list[Attempt]:
        where, args = _filters(kind, order_id)
        with self._connect() as db:
            rows = db.execute(
                f"SELECT kind, key, order_id, pid, at FROM attempts{where} ORDER BY id", args
            ).fetchall()
        return [Attempt(EffectKind(row[0]), row[1], row[2], row[3], row[4]) for row in rows]


def _select_effect(db: sqlite3.Connection, kind: EffectKind, key: str) -> Effect | None:
    row = db.execute(
        "SELECT kind, key, order_id, request, result, pid, recorded_at FROM effects "
        "WHERE kind = ? AND key = ?",
        (kind.value, key),
    ).fetchone()
    return None if row is None else _effect(row)


def _effect(row: tuple[Any, ...]) -> Effect:
    return Effect(EffectKind(row[0]), row[1], row[2], row[3], row[4], row[5], row[6])


def _unused_result(db: sqlite3.Connection, kind: EffectKind, base: str) -> str:
    candidate, n = base, 1
    while db.execute(
        "SELECT 1 FROM effects WHERE kind = ? AND result = ?", (kind.value, candidate)
    ).fetchone():
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def _filters(kind: EffectKind | None, order_id: str | None) -> tuple[str, list[str]]:
    clauses: list[str] = []
    args: list[str] = []
    if kind is not None:
        clauses.append("kind = ?")
        args.append(kind.value)
    if order_id is not None:
        clauses.append("order_id = ?")
        args.append(order_id)
    return (f" WHERE {' AND '.join(clauses)}" if clauses else ""), args
