"""The SQLite event store: one writer with group commit, read-only readers.

Writes: every command waits in a queue; the writer task takes everything queued (up to `MAX_BATCH`) and
applies it in ONE `BEGIN IMMEDIATE … COMMIT` (see `batch.py`). The statements run on the event loop —
they touch SQLite's page cache and take microseconds. COMMIT (the WAL write and its fsync) runs on the loop
too while commits are quick (under `INLINE_COMMIT_S` on average): the batch's callers are then answered
together, in the same loop turn, and move on in step, so the next batch gathers all of them again. On the
writer thread, commits end at arbitrary moments of the loop's work: measured on the bench, concurrent
calls then split into groups a quarter the size, each batch and loop turn does less, and the same load
costs about a fifth more CPU per call. When storage is slow (a commit average above `INLINE_COMMIT_S`),
COMMIT moves to the writer thread so the loop keeps relaying while the disk works. BEGIN goes to the
thread when another process holds the write lock. Futures resolve only after COMMIT returned, so no
response is released before its events are durable (`synchronous=FULL` by default). Other processes (the
CLI beside a running server) may write the same file: the head of the chain is re-read under the write lock
in every batch.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from rungate.errors import RungateError, StoreError
from rungate.events import Recorded
from rungate.log import get_logger
from rungate.store.base import Anchor, Command, Projection, Row, VerifyReport
from rungate.store.batch import BatchWriter, Job, Outcome, StatementsFailed, fold_all, row_to_recorded
from rungate.store.hashing import verify_rows


@dataclass(frozen=True)
class WriteStats:
    """What the writer has done since the store started: commits, the jobs they carried, and how many of
    those commits ran on the writer thread (slow storage) rather than on the loop."""

    commits: int = 0
    jobs: int = 0
    on_thread: int = 0


MAX_BATCH = 512
INLINE_COMMIT_S = 0.002  # COMMIT runs on the loop while commits take less than this on average
BUSY_TIMEOUT_MS = 5000
log = get_logger("rungate.store")
T = TypeVar("T")


def _schema_sql() -> str:
    return (resources.files("rungate") / "store" / "migrations" / "0001_event_log.sql").read_text("utf-8")


def _fingerprint(projection: Projection) -> str:
    return hashlib.sha256("\n".join(projection.ddl).encode()).hexdigest()


class SQLiteEventStore:
    """`EventStore` on one SQLite file in WAL mode, folding `projections` inline with every append."""

    def __init__(self, path: Path, *, projections: Sequence[Projection], durability: str = "full") -> None:
        self.path = path
        self.durability = durability
        self.projections = tuple(projections)
        self._batches = BatchWriter(self.projections)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rungate-writer")
        self._conn: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        # Point lookups (token → agent, provider key) run on the event loop itself: a primary-key read from
        # a WAL snapshot takes microseconds, far less than the two thread hand-offs aiosqlite needs.
        self._point: sqlite3.Connection | None = None
        # Jobs waiting for the writer, and the future it sleeps on while there are none (a plain deque: every
        # call queues two jobs, and asyncio.Queue's bookkeeping per put and get shows in the profile).
        self._queue: collections.deque[Job] = collections.deque()
        self._wake: asyncio.Future[None] | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._closed = False  # closed after running: verify refuses then (never started: it reads the file)
        # Serialises every use of the writer connection (batches on the loop, rebuild on the thread).
        self._conn_lock = asyncio.Lock()
        self._projection_versions: dict[str, int] = {p.name: 0 for p in self.projections}
        # Where COMMIT runs (see `_write_batch`): a moving average of commit times. It starts fast: the first
        # commits run on the loop, and a slow disk shows itself within a few of them.
        self._commit_avg_s = 0.0
        self._commits = self._committed_jobs = self._thread_commits = 0  # see `write_stats`

    # --- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(self._executor, self._open_writer)
            self._reader = await aiosqlite.connect(self._read_only_uri(), uri=True, isolation_level=None)
            self._reader.row_factory = aiosqlite.Row
            await self._reader.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._point = self._open_reader(busy_timeout_ms=200)
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            raise StoreError(f"cannot open the event log at {self.path}: {exc}") from exc
        self._writer_task = asyncio.create_task(self._write_loop(), name="rungate-writer")

    def _read_only_uri(self) -> str:
        # Quoted: a `#`, `?` or `%` in the path must not change which file (or mode) is opened.
        return f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro"

    def _open_reader(self, busy_timeout_ms: int) -> sqlite3.Connection:
        conn = sqlite3.connect(self._read_only_uri(), uri=True, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        return conn

    def _open_writer(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.row_factory = sqlite3.Row
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"SQLite refused WAL mode for {self.path} (got {mode})")
            conn.execute(f"PRAGMA synchronous={'FULL' if self.durability == 'full' else 'NORMAL'}")
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _split_sql(_schema_sql()):
                    conn.execute(statement)
                self._ensure_projections(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("PRAGMA busy_timeout=0")  # write batches never wait on the loop (see `_begin`)
        except BaseException:
            conn.close()
            raise
        return conn

    def _ensure_projections(self, conn: sqlite3.Connection) -> None:
        """Create the projection tables; rebuild them from the log when their schema changed; create the
        indexes added since (`Projection.indexes`)."""
        conn.execute("CREATE TABLE IF NOT EXISTS projection_schemas (name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL)")
        stored = {row[0]: row[1] for row in conn.execute("SELECT name, fingerprint FROM projection_schemas")}
        wanted = {p.name: _fingerprint(p) for p in self.projections}
        has_events = conn.execute("SELECT 1 FROM events LIMIT 1").fetchone() is not None
        if stored != wanted and has_events:
            count = fold_all(conn, self.projections)
            log.warning("projections_rebuilt", reason="schema changed", events=count)
        else:
            for projection in self.projections:
                for ddl in (*projection.ddl, *projection.indexes):
                    conn.execute(ddl)
        conn.execute("DELETE FROM projection_schemas")
        conn.executemany("INSERT INTO projection_schemas (name, fingerprint) VALUES (?, ?)", wanted.items())

    async def close(self) -> None:
        """Finish every command already queued (their callers learn the truth), then close."""
        self._closed = True
        if self._writer_task is not None:
            task, self._writer_task = self._writer_task, None
            self._enqueue(_STOP)
            try:
                await task
            except asyncio.CancelledError:
                pass
        while self._queue:
            job = self._queue.popleft()
            if job is not _STOP and not job.future.done():
                job.future.set_exception(StoreError("the event store is shutting down"))
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        if self._point is not None:
            self._point.close()
            self._point = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)

    # --- writes -----------------------------------------------------------------------------------

    async def execute(self, command: Command, *, idempotency_key: str | None = None,
                      metadata: Mapping[str, Any] | None = None) -> list[Recorded]:
        if self._writer_task is None or self._writer_task.done():
            raise StoreError("the event store is not running")
        future: asyncio.Future[list[Recorded]] = asyncio.get_running_loop().create_future()
        self._enqueue(Job(command, idempotency_key, metadata or {}, future))
        # A caller cancelled while waiting cancels only its own future: the writer still runs and commits the
        # job (it never looks at a queued job's future before writing), which is what the ledger needs.
        return await future

    def _enqueue(self, job: Job) -> None:
        self._queue.append(job)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        stopping = False
        while not stopping:
            while not queue:
                self._wake = loop.create_future()
                await self._wake
            jobs = [queue.popleft() for _ in range(min(len(queue), MAX_BATCH))]
            if any(job is _STOP for job in jobs):
                stopping = True
                jobs = [job for job in jobs if job is not _STOP]
                if not jobs:
                    break
            try:
                async with self._conn_lock:
                    await self._write_batch(jobs)
            except BaseException as exc:  # the whole batch failed: every caller learns it
                error = exc if isinstance(exc, RungateError) else StoreError(f"event log write failed: {exc}")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                log.error("event_log_write_failed", error=str(exc), batch=len(jobs))

    async def _write_batch(self, jobs: list[Job]) -> None:
        """Apply `jobs` in one transaction and resolve their futures once it is committed."""
        conn = self._conn
        if conn is None:
            raise StoreError("the event store is closed")
        await self._begin(conn)
        try:
            try:
                outcomes, head = self._batches.apply(conn, jobs, isolated=False)
            except StatementsFailed:
                # Rare: some command's statements failed. Undo everything, then apply once more with one
                # savepoint per command so only the failing ones are dropped.
                self._rollback(conn)
                await self._begin(conn)
                outcomes, head = self._batches.apply(conn, jobs, isolated=True)
            touched = self._batches.touched

            def committed(on_thread: bool = False) -> None:
                self._bump_projections(touched)
                self._commits += 1
                self._committed_jobs += len(jobs)
                self._thread_commits += on_thread
                _resolve(jobs, outcomes)

            if self._commit_avg_s < INLINE_COMMIT_S:
                # A quick commit: the loop waits out the fsync, and every caller of the batch resumes in this
                # turn (see the module docstring for why that beats overlapping the disk with the loop).
                self._timed_commit(conn)
                committed()
            else:
                # Slow storage: the loop keeps relaying while the disk works; the callers are answered in the
                # loop turn that learns of the commit, not one turn later when this task resumes.
                await self._in_thread(self._timed_commit, conn, on_done=lambda: committed(on_thread=True))
        except BaseException as exc:
            self._rollback(conn)
            if isinstance(exc, RungateError | asyncio.CancelledError):
                raise
            raise StoreError(f"event log write failed: {exc}") from exc
        self._batches.known_head = head

    def write_stats(self) -> WriteStats:
        """Commits and jobs so far (the benchmark reports jobs per commit: how well calls share commits)."""
        return WriteStats(self._commits, self._committed_jobs, self._thread_commits)

    def _timed_commit(self, conn: sqlite3.Connection) -> None:
        started = time.perf_counter()
        conn.execute("COMMIT")
        elapsed = time.perf_counter() - started
        # A moving average: storage that stays slow moves COMMIT to the thread within a few commits, while one
        # slow commit (a checkpoint every thousand WAL pages) does not. Every hop between the two changes how
        # concurrent calls group (see the module docstring), so a lone spike should not cause one.
        self._commit_avg_s = 0.8 * self._commit_avg_s + 0.2 * elapsed

    def _bump_projections(self, names: set[str] | None) -> None:
        """Move the versions of projections `names` (all of them for `None`) after a commit."""
        for name in self._projection_versions if names is None else names:
            self._projection_versions[name] += 1

    def projection_version(self, name: str) -> int:
        return self._projection_versions.get(name, 0)

    async def _begin(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")  # busy_timeout is 0 here: never blocks the loop
            return
        except sqlite3.OperationalError:
            pass  # another process holds the write lock: wait for it off the loop
        try:
            await self._in_thread(_begin_waiting, conn)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot begin a write transaction: {exc}") from exc

    async def _in_thread(self, fn: Callable[..., T], *args: Any, on_done: Callable[[], None] | None = None) -> T:
        """Run `fn` on the writer thread; `on_done` runs on the loop as soon as it succeeded.

        The thread hands its result straight to a loop future (one loop turn; `run_in_executor` plus a
        shield would take three). If the caller is cancelled meanwhile, this still waits for `fn` to finish
        before letting go of the connection.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def deliver(result: T | None, error: BaseException | None) -> None:  # on the loop
            if error is None and on_done is not None:
                on_done()
            if done.done():  # the caller was cancelled; it waits on `finished` instead
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)  # type: ignore[arg-type]

        def run() -> None:  # on the writer thread
            try:
                result = fn(*args)
            except BaseException as exc:
                loop.call_soon_threadsafe(deliver, None, exc)
            else:
                loop.call_soon_threadsafe(deliver, result, None)

        finished = self._executor.submit(run)
        try:
            return await done
        except asyncio.CancelledError:
            await asyncio.wait([asyncio.wrap_future(finished)])
            raise

    def _rollback(self, conn: sqlite3.Connection) -> None:
        self._batches.forget()
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # no transaction was open

    def _require_writer(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("the event store is not running")
        return self._conn

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

    async def verify(self, anchors: Sequence[Anchor] = ()) -> VerifyReport:
        """Check the chain (and `anchors`) on a read-only snapshot, on its own thread: writers are not held
        up. Needs no `start`: a store never started checks the file without writing to it (no schema set-up);
        a closed one refuses, as its other operations do."""
        if self._closed:
            raise StoreError("the event store is closed")
        return await asyncio.to_thread(self._verify_snapshot, anchors)

    def _verify_snapshot(self, anchors: Sequence[Anchor]) -> VerifyReport:
        conn = self._open_reader(busy_timeout_ms=BUSY_TIMEOUT_MS)
        try:
            conn.execute("BEGIN")  # one consistent snapshot for the whole scan
            recorded = conn.execute("SELECT position, hash FROM chain_head WHERE id = 1").fetchone()
            head = (int(recorded[0]), recorded[1]) if recorded else None
            return verify_rows((dict(row) for row in conn.execute("SELECT * FROM events ORDER BY position")), head,
                               anchors)
        finally:
            conn.close()

    async def rebuild(self) -> int:
        conn = self._require_writer()
        async with self._conn_lock:
            try:
                return await self._in_thread(self._rebuild_sync, conn)
            finally:
                self._bump_projections(None)

    def _rebuild_sync(self, conn: sqlite3.Connection) -> int:
        self._batches.forget()
        _begin_waiting(conn)
        try:
            count = fold_all(conn, self.projections)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return count


def _begin_waiting(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    try:
        conn.execute("BEGIN IMMEDIATE")
    finally:
        conn.execute("PRAGMA busy_timeout=0")


def _resolve(jobs: Sequence[Job], outcomes: Sequence[Outcome]) -> None:
    """Answer each job's caller with its outcome (callers that gave up are skipped)."""
    for job, outcome in zip(jobs, outcomes, strict=True):
        if job.future.done():
            continue
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)


_STOP: Any = object()  # queued by close(): the writer finishes what came before it, then stops


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
