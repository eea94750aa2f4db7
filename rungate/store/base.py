"""The event-store interface every backend (SQLite today, PostgreSQL next) satisfies.

Callers never see SQL dialects or connections: they `execute` commands and read events and rows.
A command is a decision taken atomically with its append: the store fetches the rows the command asks
for (`lookups`) inside the write transaction, calls the pure `decide`, appends the events it returns and
folds them into the inline projections, all in one transaction. A command that raises appends nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rungate.errors import RungateError
from rungate.events import NewEvent, Recorded

Row = dict[str, Any]


_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")


class Lookup:
    """`SELECT columns FROM table WHERE k1 = v1 AND …` — the newest matching row (by `position`), or None.

    `columns` empty means every column. Naming the few a decision needs makes the hot look-ups cheaper
    (a row of 26 columns costs more to fetch and to turn into a dict than the search itself).
    Table and column names come from code, never from a request; they are checked to be plain identifiers.
    A look-up is a value: two are equal when they run the same SQL with the same parameters. The SQL is
    built once per shape and the hash once per look-up, because a write batch makes and compares many.
    """

    __slots__ = ("table", "sql", "names", "params", "row_id", "_hash")

    def __init__(self, table: str, where: tuple[tuple[str, Any], ...], columns: tuple[str, ...] = (),
                 count: int = 0, sums: tuple[str, ...] = (), after: str = "", detail: str = "") -> None:
        # count > 0: a row `{"n": …}` counting the matches, up to this many, instead of the newest row.
        # sums (with after): a row of these columns' sums and `oldest`, over a range; `after` names the
        # column the last `where` value is a lower bound for (exclusive); `detail` names one of `sums` whose
        # value per `after` value the row also lists (`detail`: "after:value,…", in no particular order).
        if not where:
            raise ValueError("a lookup needs at least one condition")
        self.table = table
        shape = (table, tuple([column for column, _ in where]), columns, count, sums, after, detail)
        built = _SQL.get(shape)
        if built is None:
            built = _SQL[shape] = (_lookup_sql(*shape), _lookup_names(columns, count, sums, detail))
        sql, self.names = built
        self.sql = sql
        self.params = tuple([value for _, value in where])
        # The row looked up by its id alone (`WHERE id = ?`, the newest row): one a projection may know exactly
        # (see `Projection.images`).
        self.row_id = where[0][1] if len(where) == 1 and where[0][0] == "id" and not count and not sums else None
        self._hash = hash((sql, self.params))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Lookup):
            return NotImplemented
        return self._hash == other._hash and self.sql == other.sql and self.params == other.params

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"Lookup({self.sql!r}, {self.params!r})"

    @classmethod
    def of(cls, table: str, *columns: str, **where: Any) -> Lookup:
        """`Lookup.of("steps", "status", "run_id", id=step_id)`: those columns (all without any) of the row."""
        return cls(table, tuple(sorted(where.items())), columns)

    @classmethod
    def counting(cls, table: str, up_to: int, **where: Any) -> Lookup:
        """`Lookup.counting("steps", 5, run_id=r, fingerprint=f)`: a row `{"n": …}`, the number of matches
        but at most `up_to` (a limit check never needs more, and the count stays cheap on big tables)."""
        if up_to < 1:
            raise ValueError("up_to must be at least 1")
        return cls(table, tuple(sorted(where.items())), (), up_to)

    @classmethod
    def window(cls, table: str, sums: tuple[str, ...], after: tuple[str, Any], *, detail: str = "",
               **where: Any) -> Lookup:
        """`Lookup.window("rate_buckets", ("requests",), ("second", t), scope=s)`: a row with the sum of each
        of `sums` and the smallest `oldest` value of the `after` column over the rows where it exceeds `t`
        (and with `detail`, that sum column's value per `after` value)."""
        return cls(table, (*sorted(where.items()), after), (), 0, sums, after[0], detail)


# The SQL of each look-up shape (table, where columns, columns, count, sums, after, detail) and the names of the
# columns it selects (None: every column of the table): shapes come from code, so this stays as small as the
# number of look-up kinds.
_SQL: dict[tuple[str, tuple[str, ...], tuple[str, ...], int, tuple[str, ...], str, str],
           tuple[str, tuple[str, ...] | None]] = {}


def _lookup_names(columns: tuple[str, ...], count: int, sums: tuple[str, ...],
                  detail: str = "") -> tuple[str, ...] | None:
    if sums:
        return (*sums, "oldest", "detail") if detail else (*sums, "oldest")
    if count:
        return ("n",)
    return columns or None


def _lookup_sql(table: str, where: tuple[str, ...], columns: tuple[str, ...], count: int,
                sums: tuple[str, ...] = (), after: str = "", detail: str = "") -> str:
    if not all(_IDENTIFIER.match(name) for name in (table, *where, *columns, *sums)):
        raise ValueError(f"not a lookup over plain identifiers: {(table, *where, *columns, *sums)}")
    if detail and detail not in sums:
        raise ValueError(f"the detail column {detail} is not one of the sums {sums}")
    if sums:
        equal = " AND ".join(f"{column} = ?" for column in where[:-1])
        totals = ", ".join(f"coalesce(sum({column}), 0) AS {column}" for column in sums)
        listed = f", group_concat({after} || ':' || {detail}) AS detail" if detail else ""
        return f"SELECT {totals}, min({after}) AS oldest{listed} FROM {table} WHERE {equal} AND {after} > ?"
    clause = " AND ".join(f"{column} = ?" for column in where)
    if count:
        return f"SELECT count(*) AS n FROM (SELECT 1 FROM {table} WHERE {clause} LIMIT {int(count)})"
    selected = ", ".join(columns) if columns else "*"
    return f"SELECT {selected} FROM {table} WHERE {clause} ORDER BY position DESC LIMIT 1"


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


# What a projection knows of a row once an event is folded: (table, the row's id, the values of some of its
# columns as its statements just wrote them), or None for those values when the row changed in a way the
# projection does not describe.
Image = tuple[str, str, Row | None]


class Projection(Protocol):
    """A read model folded inline with every append (see the `projections` package)."""

    name: str
    tables: Sequence[str]
    ddl: Sequence[str]
    # Indexes added after the tables were first defined (`CREATE INDEX IF NOT EXISTS`): created at start when
    # missing, without a rebuild, since an index changes no row; not part of the schema's fingerprint.
    indexes: Sequence[str]
    # Tables whose every change the projection describes with `images`: the writer may then answer a look-up
    # of such a row by its id from what it was told, without reading the row.
    image_tables: Sequence[str]

    def handle(self, recorded: Recorded) -> list[Statement]: ...

    def images(self, recorded: Recorded) -> Sequence[Image]:
        """What folding `recorded` did to rows of `image_tables` (nothing for events that leave them alone)."""
        ...

    def handles(self, type_: str) -> bool:
        """Whether events of this type may change the projection (`handle` returns nothing for the rest)."""
        ...


class Command(Protocol):
    """A unit of decision and append, run by the single writer.

    A command may also define `more_lookups(found, now) -> Sequence[Lookup]`: asked again after each round of
    look-ups (with everything found so far) until it asks for nothing new, for rows whose keys come from
    other rows (the policy version a run is bound to, say).
    """

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


Anchor = tuple[int, str]  # (position, hash) of an event, as an operator kept it outside the log


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of checking the hash chain: `ok`, how many events, the first broken position, and the
    head (position and hash of the last event) when the chain holds — what an operator keeps, elsewhere, as
    an anchor for later checks."""

    ok: bool
    events: int
    broken_at: int | None = None
    reason: str | None = None
    head: Anchor | None = None


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

    async def verify(self, anchors: Sequence[Anchor] = ()) -> VerifyReport:
        """Check the hash chain, and that the event at each anchor's position still has the anchor's hash.

        The chain's hashes are not keyed: someone who can write the database can rewrite a stretch of the
        log, or cut its end, and recompute every hash after it. Only a (position, hash) kept outside the
        log shows that; `anchors` are such figures from an earlier `verify` (or `GET /api/log/head`).
        """
        ...

    async def rebuild(self) -> int:
        """Drop every projection table and replay the log into it; returns the events replayed."""
        ...

    async def ping(self) -> None:
        """Raise `StoreError` when the database cannot be reached."""
        ...
