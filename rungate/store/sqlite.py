"""The SQLite event store: one writer thread with group commit, read-only readers via aiosqlite.

Writes: every command waits in a queue; the writer takes everything queued (up to `MAX_BATCH`) and runs
it in ONE `BEGIN IMMEDIATE … COMMIT`, each command inside its own savepoint so a refused command rolls
back alone. Futures resolve only after COMMIT returned, so no response is released before its events
are durable (`synchronous=FULL` by default). Other processes (the CLI beside a running server) may write
the same file: the head of the chain is re-read under the write lock at the start of every batch.
"""

from __future__ import annotations

import asyncio
import sqlite3
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from projections import ALL as ALL_PROJECTIONS
from projections import Projection
from rungate.clock import now_iso
from rungate.errors import ConcurrencyError, RungateError, StoreError
from rungate.events import Recorded
from rungate.log import get_logger
from rungate.store.base import Command, Lookup, Row, VerifyReport
from rungate.store.hashing import GENESIS, chain_hash, verify_rows

MAX_BATCH = 512
log = get_logger("rungate.store")


def _schema_sql() -> str:
    return (resources.files("rungate") / "store" / "migrations" / "0001_event_log.sql").read_text("utf-8")


def _dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def row_to_recorded(row: Mapping[str, Any]) -> Recorded:
    return Recorded(
        position=int(row["position"]), event_id=row["event_id"], stream=row["stream"],
        version=int(row["version"]), type=row["type"], schema_version=int(row["schema_version"]),
        data=orjson.loads(row["data"]), metadata=orjson.loads(row["metadata"]),
        recorded_at=row["recorded_at"], prev_hash=row["prev_hash"], hash=row["hash"],
    )


@dataclass
class _Job:
    command: Command
    idempotency_key: str | None
    metadata: Mapping[str, Any]
    future: asyncio.Future[list[Recorded]] = field(repr=False)


class SQLiteEventStore:
    """`EventStore` on one SQLite file in WAL mode."""

    def __init__(self, path: Path, *, durability: str = "full",
                 projections: Sequence[Projection] = ALL_PROJECTIONS) -> None:
        self.path = path
        self.durability = durability
        self.projections = tuple(projections)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rungate-writer")
        self._conn: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        # Point lookups (token → agent, provider key) run on the event loop itself: a primary-key read from
        # a WAL snapshot takes microseconds, far less than the two thread hand-offs aiosqlite needs.
        self._point: sqlite3.Connection | None = None
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None

    # --- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._open_writer)
            self._reader = await aiosqlite.connect(self._read_only_uri(), uri=True, isolation_level=None)
            self._reader.row_factory = aiosqlite.Row
            await self._reader.execute("PRAGMA busy_timeout=5000")
            self._point = sqlite3.connect(self._read_only_uri(), uri=True, isolation_level=None,
                                          check_same_thread=False)
            self._point.row_factory = sqlite3.Row
            self._point.execute("PRAGMA busy_timeout=200")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the event log at {self.path}: {exc}") from exc
        self._writer_task = asyncio.create_task(self._write_loop(), name="rungate-writer")

    def _read_only_uri(self) -> str:
        # Quoted: a `#`, `?` or `%` in the path must not change which file (or mode) is opened.
        return f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro"

    def _open_writer(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"SQLite refused WAL mode for {self.path} (got {mode})")
        conn.execute(f"PRAGMA synchronous={'FULL' if self.durability == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _split_sql(_schema_sql()):
                conn.execute(statement)
            for projection in self.projections:
                for ddl in projection.ddl:
                    conn.execute(ddl)
            conn.execute("CREATE TABLE IF NOT EXISTS projection_positions"
                         " (name TEXT PRIMARY KEY, position INTEGER NOT NULL)")
            conn.execute("PRAGMA user_version=1")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._conn = conn

    async def close(self) -> None:
        """Finish every command already queued (their callers learn the truth), then close."""
        if self._writer_task is not None:
            task, self._writer_task = self._writer_task, None
            self._queue.put_nowait(_STOP)
            try:
                await task
            except asyncio.CancelledError:
                pass
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is not _STOP and not job.future.done():
                job.future.set_exception(StoreError("the event store is shutting down"))
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        if self._point is not None:
            self._point.close()
            self._point = None
        if self._conn is not None:
            conn = self._conn
            self._conn = None
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)

    # --- writes -----------------------------------------------------------------------------------

    async def execute(self, command: Command, *, idempotency_key: str | None = None,
                      metadata: Mapping[str, Any] | None = None) -> list[Recorded]:
        if self._writer_task is None or self._writer_task.done():
            raise StoreError("the event store is not running")
        future: asyncio.Future[list[Recorded]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(command, idempotency_key, metadata or {}, future))
        # Shielded: a caller that is cancelled (client gone) must not cancel a commit other callers share;
        # its events are still written, which is what the ledger needs.
        return await asyncio.shield(future)

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            jobs = [await self._queue.get()]
            while len(jobs) < MAX_BATCH and not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            if _STOP in jobs:
                stopping = True
                jobs = [job for job in jobs if job is not _STOP]
                if not jobs:
                    break
            try:
                results = await loop.run_in_executor(self._executor, self._write_batch, jobs)
            except BaseException as exc:  # the whole batch failed: every caller learns it
                error = exc if isinstance(exc, RungateError) else StoreError(f"event log write failed: {exc}")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                log.error("event_log_write_failed", error=str(exc), batch=len(jobs))
                continue
            for job, result in zip(jobs, results, strict=True):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _write_batch(self, jobs: list[_Job]) -> list[list[Recorded] | BaseException]:
        conn = self._conn
        if conn is None:
            raise StoreError("the event store is closed")
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot begin a write transaction: {exc}") from exc
        results: list[list[Recorded] | BaseException] = []
        try:
            head = conn.execute("SELECT position, hash, recorded_at FROM events ORDER BY position DESC LIMIT 1"
                                ).fetchone()
            state = _Head(int(head[0]), head[1], head[2]) if head else _Head(0, GENESIS, "")
            now = max(now_iso(), state.recorded_at)
            for job in jobs:
                saved = state.copy()
                conn.execute("SAVEPOINT job")
                try:
                    results.append(self._run_job(conn, job, state, now))
                    conn.execute("RELEASE job")
                except Exception as exc:  # refused or failed command: undo it alone
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    state.restore(saved)
                    if isinstance(exc, sqlite3.IntegrityError):
                        exc = ConcurrencyError(f"append conflicted: {exc}")
                    elif isinstance(exc, sqlite3.Error):
                        exc = StoreError(f"event log write failed: {exc}")
                    results.append(exc)
            conn.execute("COMMIT")
        except BaseException as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"event log commit failed: {exc}") from exc
            raise
        return results

    def _run_job(self, conn: sqlite3.Connection, job: _Job, state: _Head, now: str) -> list[Recorded]:
        if job.idempotency_key is not None:
            first = conn.execute("SELECT position, metadata FROM events WHERE idempotency_key = ?",
                                 (job.idempotency_key,)).fetchone()
            if first is not None:
                # A command's events are contiguous, so the scan starts at its first one.
                command_id = orjson.loads(first[1])["command_id"]
                rows = conn.execute("SELECT * FROM events WHERE position >= ? AND"
                                    " json_extract(metadata, '$.command_id') = ? ORDER BY position LIMIT 10000",
                                    (first[0], command_id)).fetchall()
                return [row_to_recorded(dict(r)) for r in rows]
        found: dict[Lookup, Row | None] = {}
        for lookup in job.command.lookups():
            found[lookup] = self._lookup(conn, lookup)
        new_events = job.command.decide(found, now)
        command_id = uuid.uuid4().hex
        meta = {**job.metadata, "command_id": command_id}
        metadata = _dumps(meta)
        versions: dict[str, int] = {}
        recorded: list[Recorded] = []
        for index, new in enumerate(new_events):
            if new.stream not in versions:
                current = conn.execute("SELECT max(version) FROM events WHERE stream = ?", (new.stream,)).fetchone()
                versions[new.stream] = int(current[0] or 0)
            versions[new.stream] += 1
            position = state.position + 1
            event_id = uuid.uuid4().hex
            payload = new.event.payload()
            data = _dumps(payload)
            type_ = new.event.type_name()
            schema_version = new.event.schema_version
            idempotency_key = job.idempotency_key if index == 0 else None
            digest = chain_hash(state.hash, position, event_id, new.stream, versions[new.stream], type_,
                                schema_version, data, metadata, now, idempotency_key)
            conn.execute(
                "INSERT INTO events (position, event_id, stream, version, type, schema_version, data, metadata,"
                " recorded_at, idempotency_key, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (position, event_id, new.stream, versions[new.stream], type_, schema_version, data, metadata, now,
                 idempotency_key, state.hash, digest),
            )
            rec = Recorded(position, event_id, new.stream, versions[new.stream], type_, schema_version,
                           payload, meta, now, state.hash, digest)
            self._project(conn, rec)
            state.position, state.hash = position, digest
            recorded.append(rec)
        return recorded

    def _project(self, conn: sqlite3.Connection, rec: Recorded) -> None:
        for projection in self.projections:
            for sql, params in projection.handle(rec):
                conn.execute(sql, params)

    @staticmethod
    def _lookup(conn: sqlite3.Connection, lookup: Lookup) -> Row | None:
        clause = " AND ".join(f"{column} = ?" for column, _ in lookup.where)
        row = conn.execute(f"SELECT * FROM {lookup.table} WHERE {clause} ORDER BY position DESC LIMIT 1",
                           tuple(value for _, value in lookup.where)).fetchone()
        return dict(row) if row is not None else None

    def _require_writer(self) -> None:
        if self._conn is None:
            raise StoreError("the event store is not running")

    # --- reads ------------------------------------------------------------------------------------

    def _require_reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StoreError("the event store is not running")
        return self._reader

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        try:
            async with self._require_reader().execute(sql, tuple(params)) as cursor:
                return [dict(row) for row in await cursor.fetchall()]
        except sqlite3.Error as exc:
            raise StoreError(f"event log read failed: {exc}") from exc

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        """A single-row read, done synchronously on the loop (meant for indexed point lookups)."""
        if self._point is None:
            raise StoreError("the event store is not running")
        try:
            row = self._point.execute(sql, tuple(params)).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"event log read failed: {exc}") from exc
        return dict(row) if row is not None else None

    async def read_all(self, after: int = 0, limit: int = 1000) -> list[Recorded]:
        rows = await self.fetch("SELECT * FROM events WHERE position > ? ORDER BY position LIMIT ?", (after, limit))
        return [row_to_recorded(r) for r in rows]

    async def read_stream(self, stream: str, after_position: int = 0, limit: int = 10000) -> list[Recorded]:
        rows = await self.fetch("SELECT * FROM events WHERE stream = ? AND position > ? ORDER BY position LIMIT ?",
                                (stream, after_position, limit))
        return [row_to_recorded(r) for r in rows]

    async def ping(self) -> None:
        await self.fetch("SELECT 1")

    async def verify(self) -> VerifyReport:
        self._require_writer()
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._verify_sync)

    def _verify_sync(self) -> VerifyReport:
        conn = self._conn
        if conn is None:
            raise StoreError("the event store is closed")
        cursor = conn.execute("SELECT * FROM events ORDER BY position")
        return verify_rows(dict(row) for row in cursor)

    async def rebuild(self) -> int:
        self._require_writer()
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._rebuild_sync)

    def _rebuild_sync(self) -> int:
        conn = self._conn
        if conn is None:
            raise StoreError("the event store is closed")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for projection in self.projections:
                for table in projection.tables:
                    conn.execute(f"DROP TABLE IF EXISTS {table}")
                for ddl in projection.ddl:
                    conn.execute(ddl)
            count = 0
            cursor = conn.execute("SELECT * FROM events ORDER BY position")
            while batch := cursor.fetchmany(1000):
                for row in batch:
                    self._project(conn, row_to_recorded(dict(row)))
                    count += 1
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return count


_STOP: Any = object()  # queued by close(): the writer finishes what came before it, then stops


@dataclass
class _Head:
    position: int
    hash: str
    recorded_at: str

    def copy(self) -> _Head:
        return _Head(self.position, self.hash, self.recorded_at)

    def restore(self, other: _Head) -> None:
        self.position, self.hash, self.recorded_at = other.position, other.hash, other.recorded_at


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements; trigger bodies (BEGIN … END;) stay whole."""
    statements: list[str] = []
    current: list[str] = []
    in_trigger = False
    for line in script.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("--")):
            continue
        current.append(line)
        upper = stripped.upper()
        if upper.startswith("CREATE TRIGGER"):
            in_trigger = True
        if (in_trigger and upper.endswith("END;")) or (not in_trigger and stripped.endswith(";")):
            statements.append("\n".join(current))
            current = []
            in_trigger = False
    if current:
        statements.append("\n".join(current))
    return statements
