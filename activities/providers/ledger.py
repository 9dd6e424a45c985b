"""The simulated providers' memory, once per idempotency key: in the worker or a SQLite file."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator

from infra.settings import Options, setting

T = TypeVar("T")

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


def _not_a_folder(path: Path) -> Path:
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a file")
    return path


class LedgerSettings(Options):
    """The simulated providers' memory."""

    sim_ledger: Annotated[Path, AfterValidator(_not_a_folder)] | None = setting(
        None, "ORDER_SIM_LEDGER", "SQLite file of effects, shared by workers", shown="in memory"
    )


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
            # One transaction: a connection closed part-way rolls it back.
            db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")

    def __str__(self) -> str:
        return f"ledger {self.path}"

    # --- For the providers ------------------------------------------------------

    async def attempt(self, kind: EffectKind, key: str, order_id: str) -> Effect | None:
        """Counts one call that reached the provider; returns the key's effect, if any yet."""
        row = (kind.value, key, order_id, os.getpid(), time.time())

        def run() -> Effect | None:
            with self._write() as db:
                db.execute(
                    "INSERT INTO attempts (kind, key, order_id, pid, at) VALUES (?, ?, ?, ?, ?)",
                    row,
                )
                return _select_effect(db, kind, key)

        return await asyncio.to_thread(run)

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
        text, pid, at = canonical(request), os.getpid(), time.time()

        def taken(candidate: str, db: sqlite3.Connection) -> bool:
            sql = "SELECT 1 FROM effects WHERE kind = ? AND result = ?"
            return db.execute(sql, (kind.value, candidate)).fetchone() is not None

        def run() -> tuple[Effect, bool]:
            with self._write() as db:
                existing = _select_effect(db, kind, key)
                if existing is not None:
                    return existing, False
                chosen = unused(result, lambda c: taken(c, db)) if unique_result else result
                effect = Effect(kind, key, order_id, text, chosen, pid, at)
                db.execute(
                    f"INSERT INTO effects ({_EFFECT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    astuple(effect),
                )
                return effect, True

        return await asyncio.to_thread(run)

    async def find(self, kind: EffectKind, key: str) -> Effect | None:
        """The effect recorded under the key, if any (not counted as an attempt)."""

        def run() -> Effect | None:
            with self._connect() as db:
                return _select_effect(db, kind, key)

        return await asyncio.to_thread(run)

    # --- For tests and tools ----------------------------------------------------------

    async def effects(
        self, kind: EffectKind | None = None, order_id: str | None = None
    ) -> list[Effect]:
        """Every effect, optionally of one kind and/or one order, oldest first."""
        select = f"SELECT {_EFFECT_COLUMNS} FROM effects"
        rows = await self._select(select, kind, order_id, "recorded_at, rowid")
        return [_effect(row) for row in rows]

    async def attempts(
        self, kind: EffectKind | None = None, order_id: str | None = None
    ) -> list[Attempt]:
        """Every attempt, optionally of one kind and/or one order, oldest first."""
        rows = await self._select(
            "SELECT kind, key, order_id, pid, at FROM attempts", kind, order_id, "id"
        )
        return [Attempt(EffectKind(row[0]), *row[1:]) for row in rows]

    # --- Blocking (run in a thread) -------------------------------------------------

    async def _select(
        self, select: str, kind: EffectKind | None, order_id: str | None, order: str
    ) -> list[tuple[Any, ...]]:
        given = {"kind": kind and kind.value, "order_id": order_id}
        filters = {column: value for column, value in given.items() if value is not None}
        where = " AND ".join(f"{column} = ?" for column in filters)
        sql = f"{select}{' WHERE ' if where else ''}{where} ORDER BY {order}"

        def run() -> list[tuple[Any, ...]]:
            with self._connect() as db:
                return db.execute(sql, list(filters.values())).fetchall()

        return await asyncio.to_thread(run)

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


_EFFECT_COLUMNS = "kind, key, order_id, request, result, pid, recorded_at"


def _select_effect(db: sqlite3.Connection, kind: EffectKind, key: str) -> Effect | None:
    sql = f"SELECT {_EFFECT_COLUMNS} FROM effects WHERE kind = ? AND key = ?"
    row = db.execute(sql, (kind.value, key)).fetchone()
    return None if row is None else _effect(row)


def _effect(row: tuple[Any, ...]) -> Effect:
    return Effect(EffectKind(row[0]), *row[1:])


def unused(base: str, taken: Callable[[str], bool]) -> str:
    """`base`, or `base-2`, `base-3`... the first one not `taken`."""
    candidates = itertools.chain([base], (f"{base}-{n}" for n in itertools.count(2)))
    return next(candidate for candidate in candidates if not taken(candidate))


class Effects(dict[str, T]):
    """One kind of effect by idempotency key, as one provider in this process knows them.

    Those it made, and those it found in the ledger, which remembers every
    process's when there is one. `decode` makes a recorded effect the value
    kept; with `unique_results`, a result another key has gets a suffix.
    """

    def __init__(
        self,
        kind: EffectKind,
        ledger: Ledger | None,
        decode: Callable[[Effect], T],
        *,
        unique_results: bool = False,
    ) -> None:
        super().__init__()
        self.kind, self.ledger, self.unique_results = kind, ledger, unique_results
        self._decode = decode
        self._results: set[str] = set()  # without a ledger: every result given
        self._order_of: dict[str, str] = {}  # without a ledger: each key's order id

    async def recall(self, key: str, order_id: str, *, attempt: bool = True) -> T | None:
        """The key's effect, if there is one yet; an `attempt` of the provider is counted."""
        ledger, kind = self.ledger, self.kind
        if ledger is not None:
            call = ledger.attempt(kind, key, order_id) if attempt else ledger.find(kind, key)
            if (found := await call) is not None:
                self.setdefault(key, self._decode(found))
        return self.get(key)

    async def record(
        self, key: str, order_id: str, request: Mapping[str, Any], result: str
    ) -> tuple[T, bool]:
        """Records an effect unless the key has one: the one that stands, and whether it is new."""
        unique = self.unique_results
        if self.ledger is not None:
            effect, created = await self.ledger.record(
                self.kind, key, order_id, request, result, unique_result=unique
            )
        elif key in self:
            return self[key], False
        else:
            result = unused(result, self._results.__contains__) if unique else result
            self._results.add(result)
            at, pid = time.time(), os.getpid()
            effect = Effect(self.kind, key, order_id, canonical(request), result, pid, at)
            self._order_of[key] = order_id
            created = True
        return self.setdefault(key, self._decode(effect)), created

    async def of_order(self, order_id: str) -> list[T]:
        """Every effect made for the order, under any key, oldest first.

        With a ledger, every process's (read from it); without, this process's.
        """
        if self.ledger is not None:
            return [self._decode(e) for e in await self.ledger.effects(self.kind, order_id)]
        return [self[key] for key, order in self._order_of.items() if order == order_id]
