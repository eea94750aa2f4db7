"""The SQLite event store: one writer thread with group commit, read-only readers via aiosqlite.

Writes: every command waits in a queue; the writer takes everything queued (up to `MAX_BATCH`) and runs
it in ONE `BEGIN IMMEDIATE … COMMIT`, each command inside its own savepoint so a refused command rolls
back alone. Futures resolve only after COMMIT returned, so no response is released before its events
are durable (`synchronous=FULL` by default). Other processes (the CLI beside a running server) may write
the same file: the head of the chain is re-read under the write lock at the start of every batch.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
import urllib.parse
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
from rungate.events import NewEvent, Recorded
from rungate.log import get_logger
from rungate.store.base import Command, Lookup, Row, VerifyReport
from rungate.store.hashing import GENESIS, chain_hash, verify_rows

MAX_BATCH = 512
INLINE_COMMIT_S = 0.002  # commits faster than this on average run on the event loop itself
BUSY_TIMEOUT_MS = 5000
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
        # Serialises every use of the writer connection (write batches on the loop, verify/rebuild on the thread).
        self._conn_lock = asyncio.Lock()
        # Stream versions as of `_known_head`, the last position this process committed (valid while no one else
        # has appended since).
        self._versions: dict[str, int] = {}
        self._known_head = -1
        # Starts "slow" so the first commits go to the thread until the storage has shown it is fast.
        self._commit_avg_s = 1.0

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
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
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
        conn.execute("PRAGMA busy_timeout=0")  # write batches never wait on the loop (see `_begin`)
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
        # A caller cancelled while waiting cancels only its own future: the writer still runs and commits the
        # job (it never looks at a queued job's future before writing), which is what the ledger needs.
        return await future

    async def _write_loop(self) -> None:
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
                async with self._conn_lock:
                    results = await self._write_batch(jobs)
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

    async def _write_batch(self, jobs: list[_Job]) -> list[list[Recorded] | BaseException]:
        """One transaction for the whole batch.

        The statements run on the event loop (they touch only SQLite's page cache and take microseconds
        each); BEGIN waits for a lock and COMMIT waits for fsync, so those two run on the writer thread when
        they would block. A command whose statements fail is dropped and the batch is retried without it,
        so no per-command savepoint is needed on the common path.
        """
        conn = self._conn
        if conn is None:
            raise StoreError("the event store is closed")
        loop = asyncio.get_running_loop()
        failed: dict[int, BaseException] = {}
        while True:
            await self._begin(conn, loop)
            try:
                results, state = self._apply(conn, jobs, failed)
            except _JobFailed as retry:
                conn.execute("ROLLBACK")
                self._versions.clear()
                failed[retry.index] = retry.error
                continue
            except BaseException as exc:
                self._rollback(conn)
                raise StoreError(f"event log write failed: {exc}") from exc
            try:
                await self._commit(conn, loop)
            except BaseException as exc:
                self._rollback(conn)
                raise StoreError(f"event log commit failed: {exc}") from exc
            self._known_head = state.position
            return results

    async def _commit(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        """COMMIT on the loop while commits (fsyncs) are quick, on the writer thread once they are not.

        A thread hand-off costs a few hundred microseconds of idle loop; on fast storage the fsync is
        cheaper than that. On slow storage a long fsync would stall every relayed stream, so the moving
        average of recent commit times decides, and a slow disk moves commits off the loop at once.
        """
        started = time.perf_counter()
        if self._commit_avg_s < INLINE_COMMIT_S:
            conn.execute("COMMIT")
        else:
            await loop.run_in_executor(self._executor, conn.execute, "COMMIT")
        elapsed = time.perf_counter() - started
        self._commit_avg_s = max(elapsed, 0.9 * self._commit_avg_s + 0.1 * elapsed)

    async def _begin(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")  # busy_timeout is 0 here: never blocks the loop
            return
        except sqlite3.OperationalError:
            pass  # another process holds the write lock: wait for it off the loop
        try:
            await loop.run_in_executor(self._executor, self._begin_waiting, conn)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot begin a write transaction: {exc}") from exc

    @staticmethod
    def _begin_waiting(conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        try:
            conn.execute("BEGIN IMMEDIATE")
        finally:
            conn.execute("PRAGMA busy_timeout=0")

    def _rollback(self, conn: sqlite3.Connection) -> None:
        self._versions.clear()
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _apply(self, conn: sqlite3.Connection, jobs: list[_Job],
               failed: dict[int, BaseException]) -> tuple[list[list[Recorded] | BaseException], _Head]:
        head = conn.execute("SELECT position, hash, recorded_at FROM events ORDER BY position DESC LIMIT 1").fetchone()
        state = _Head(int(head[0]), head[1], head[2]) if head else _Head(0, GENESIS, "")
        if state.position != self._known_head or len(self._versions) > 100_000:
            self._versions.clear()  # someone else appended (the CLI), or the cache grew: start afresh
        now = max(now_iso(), state.recorded_at)
        results: list[list[Recorded] | BaseException] = []
        for index, job in enumerate(jobs):
            if index in failed:
                results.append(failed[index])
                continue
            try:
                plan = self._plan(conn, job, now)
            except Exception as exc:  # refused by its decision: nothing of it was written
                results.append(exc)
                continue
            if isinstance(plan, list):
                results.append(plan)  # idempotent replay of an earlier command
                continue
            try:
                results.append(self._write_events(conn, job, plan, state, now))
            except Exception as exc:
                if isinstance(exc, sqlite3.IntegrityError):
                    exc = ConcurrencyError(f"append conflicted: {exc}")
                elif isinstance(exc, sqlite3.Error):
                    exc = StoreError(f"event log write failed: {exc}")
                raise _JobFailed(index, exc) from None
        return results, state

    def _plan(self, conn: sqlite3.Connection, job: _Job, now: str) -> list[Recorded] | Sequence[NewEvent]:
        """The events `job` decides to append, or (a list of `Recorded`) those an earlier run of its key wrote."""
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
        return tuple(job.command.decide(found, now))

    def _write_events(self, conn: sqlite3.Connection, job: _Job, new_events: Sequence[NewEvent], state: _Head,
                      now: str) -> list[Recorded]:
        command_id = os.urandom(16).hex()
        meta = {**job.metadata, "command_id": command_id}
        metadata = _dumps(meta)
        versions = self._versions
        recorded: list[Recorded] = []
        for index, new in enumerate(new_events):
            if new.stream not in versions:
                current = conn.execute("SELECT max(version) FROM events WHERE stream = ?", (new.stream,)).fetchone()
                versions[new.stream] = int(current[0] or 0)
            versions[new.stream] += 1
            position = state.position + 1
            event_id = os.urandom(16).hex()
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
        async with self._conn_lock:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._verify_sync)

    def _verify_sync(self) -> VerifyReport:
        conn = self._conn
        if conn is None:
            raise StoreError("the event store is closed")
        cursor = conn.execute("SELECT * FROM events ORDER BY position")
        return verify_rows(dict(row) for row in cursor)

    async def rebuild(self) -> int:
        self._require_writer()
        async with self._conn_lock:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._rebuild_sync)

    def _rebuild_sync(self) -> int:
        conn = self._conn
        if conn is None:
            raise StoreError("the event store is closed")
        self._versions.clear()
        self._begin_waiting(conn)
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


class _JobFailed(Exception):
    """A command's statements failed mid-batch: roll back and retry the batch without it."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(str(error))
        self.index, self.error = index, error


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
