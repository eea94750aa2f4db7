"""The event-store interface every backend (SQLite today, PostgreSQL next) satisfies.

Callers never see SQL dialects or connections: they `execute` commands and read events and rows.
A command is a decision taken atomically with its append: the store fetches the rows the command asks
for (`lookups`) inside the write transaction, calls the pure `decide`, appends the events it returns and
folds them into the inline projections, all in one transaction. A command that raises appends nothing.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rungate.errors import RungateError
from rungate.events import NewEvent, Recorded

Row = dict[str, Any]


_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class Lookup:
    """`SELECT * FROM table WHERE k1 = v1 AND …` — the newest matching row (by `position`), or None.

    Table and column names come from code, never from a request; they are checked to be plain identifiers.
    """

    table: str
    where: tuple[tuple[str, Any], ...]

    def __post_init__(self) -> None:
        if not self.where:
            raise ValueError("a lookup needs at least one condition")
        _lookup_sql(self.table, tuple(column for column, _ in self.where))  # validates (once per shape)

    @classmethod
    def of(cls, table: str, **where: Any) -> Lookup:
        return cls(table, tuple(sorted(where.items())))

    @property
    def sql(self) -> str:
        return _lookup_sql(self.table, tuple(column for column, _ in self.where))

    @property
    def params(self) -> tuple[Any, ...]:
        return tuple(value for _, value in self.where)


@functools.lru_cache(maxsize=256)
def _lookup_sql(table: str, columns: tuple[str, ...]) -> str:
    if not all(_IDENTIFIER.match(name) for name in (table, *columns)):
        raise ValueError(f"not a lookup over plain identifiers: {(table, *columns)}")
    clause = " AND ".join(f"{column} = ?" for column in columns)
    return f"SELECT * FROM {table} WHERE {clause} ORDER BY position DESC LIMIT 1"


class Refused(Exception):
    """Raised by `decide` to refuse a command and still record why.

    The store appends `events` (e.g. a `CallRefused` on the agent's stream) and then raises `error` to the
    caller, so every decision is in the log, allowed or not.
    """

    def __init__(self, error: RungateError, events: Sequence[NewEvent]) -> None:
        super().__init__(error.message)
        self.error = error
        self.events = tuple(events)


# One SQL statement with `?` placeholders and its parameters; each backend adapts the placeholders.
Statement = tuple[str, tuple[Any, ...]]


class Projection(Protocol):
    """A read model folded inline with every append (see the `projections` package)."""

    name: str
    tables: Sequence[str]
    ddl: Sequence[str]

    def handle(self, recorded: Recorded) -> list[Statement]: ...


class Command(Protocol):
    """A unit of decision and append, run by the single writer."""

    def lookups(self) -> Sequence[Lookup]: ...

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]: ...


@dataclass(frozen=True, slots=True)
class Append:
    """The simplest command: append these events, unconditionally."""

    events: tuple[NewEvent, ...]

    def lookups(self) -> Sequence[Lookup]:
        return ()

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        return self.events


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of checking the hash chain: `ok`, how many events, and the first broken position."""

    ok: bool
    events: int
    broken_at: int | None = None
    reason: str | None = None


class EventStore(Protocol):
    """What the proxy, the API and the CLI need from the event log."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def execute(self, command: Command, *, idempotency_key: str | None = None,
                      metadata: Mapping[str, Any] | None = None) -> list[Recorded]:
        """Run `command` atomically; returns the recorded events once they are durable.

        With an `idempotency_key` already used, returns the events recorded the first time and runs
        nothing. Raises what `decide` raised, or `StoreError` when the log cannot be written.
        """
        ...

    async def read_all(self, after: int = 0, limit: int = 1000) -> list[Recorded]: ...

    async def read_stream(self, stream: str, after_position: int = 0, limit: int = 10000) -> list[Recorded]: ...

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Read-model query with `?` placeholders (read side only)."""
        ...

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...

    def projection_version(self, name: str) -> int:
        """A number that changes whenever projection `name` may have changed since it was last asked.

        It moves when this process commits an event the projection folds, rebuilds, or notices that
        another process appended to the log; read caches compare it to know when to drop what they hold.
        Writes by another process are noticed at this process's next write, so caches also expire by age.
        """
        ...

    async def verify(self) -> VerifyReport: ...

    async def rebuild(self) -> int:
        """Drop every projection table and replay the log into it; returns the events replayed."""
        ...

    async def ping(self) -> None:
        """Raise `StoreError` when the database cannot be reached."""
        ...
