"""The SQLite event log: append and read back, group commit, refused commands, idempotency, append-only."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from projections import ALL
from rungate.admin import CreateAgent
from rungate.errors import ConcurrencyError, Conflict, StoreError
from rungate.events import NewEvent
from rungate.events.catalogue import AgentCreated, AgentUpdated, StepCompleted
from rungate.runs import AdmitCall, SettleStep
from rungate.store import Append, Lookup, Row, SQLiteEventStore
from rungate.store.hashing import GENESIS
from rungate.store.sqlite import WriteStats
from tests.store_helpers import agent_created, all_events, append_one, facts, opened, positions


class Refused(Exception):
    """What the refusing test command raises from `decide`."""


class RefuseCommand:
    """A command whose decision fails: it must append nothing."""

    def lookups(self) -> Sequence[Lookup]:
        return ()

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        raise Refused("no")


async def test_appended_events_read_back_with_contiguous_positions_and_stream_versions(tmp_path: Path) -> None:
    # given three streams written by single- and multi-event commands
    async with opened(tmp_path / "log.db") as store:
        written = []
        for i in range(30):
            stream = f"agent-s{i % 3}"
            if i % 5 == 0:
                events = (NewEvent(stream, AgentUpdated(agent_id=f"s{i % 3}", name=None)),
                          NewEvent(stream, AgentUpdated(agent_id=f"s{i % 3}", disabled=True)))
            else:
                events = (NewEvent(stream, AgentUpdated(agent_id=f"s{i % 3}", metadata={"i": i})),)
            written.extend(await store.execute(Append(events), metadata={"by": "test"}))

        # when the whole log is read back, in pages
        log = await all_events(store)
        paged = await store.read_all(after=10, limit=7)

    # then positions are 1..n without gaps, each stream counts 1..k in order, and the chain links up
    assert log == written
    assert positions(log) == list(range(1, len(log) + 1)) == list(range(1, 37))
    versions: dict[str, list[int]] = defaultdict(list)
    for rec in log:
        versions[rec.stream].append(rec.version)
    assert set(versions) == {"agent-s0", "agent-s1", "agent-s2"}
    for seen in versions.values():
        assert seen == list(range(1, len(seen) + 1))
    assert log[0].prev_hash == GENESIS
    assert all(later.prev_hash == earlier.hash for earlier, later in zip(log, log[1:], strict=False))
    assert positions(paged) == list(range(11, 18))
    assert log[0].type == "AgentUpdated" and log[0].metadata["by"] == "test" and "command_id" in log[0].metadata
    assert log[1].data == {"agent_id": "s0", "name": None, "disabled": True, "metadata": None}


async def test_two_hundred_concurrent_appends_get_distinct_positions_in_shared_commits(tmp_path: Path) -> None:
    # given a running store
    async with opened(tmp_path / "log.db") as store:
        # when 200 callers execute at the same time
        results = await asyncio.gather(*(store.execute(append_one(i)) for i in range(200)))
        report = await store.verify()
        agents = await store.fetchone("SELECT count(*) AS n FROM agents")

    # then every append succeeded with its own position, and commits were shared (group commit):
    # a batch stamps all its events with one `recorded_at`, so fewer distinct stamps than appends
    assert all(len(r) == 1 for r in results)
    assert sorted(r[0].position for r in results) == list(range(1, 201))
    stamps = Counter(r[0].recorded_at for r in results)
    assert len(stamps) < 200
    assert max(stamps.values()) > 1
    assert report.ok and report.events == 200
    assert agents == {"n": 200}


async def test_a_refused_command_appends_nothing_while_its_batch_mates_commit(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        await store.execute(Append((agent_created(0, "dup"),)))
        # given one batch holding good commands, a command whose decide raises, and a command whose
        # append is refused half-way by the projection (a second agent with a taken name)
        clash = NewEvent("agent-agt_clash", AgentCreated(agent_id="agt_clash", name="dup-agent-0", token_hash="x"))
        commands = [
            append_one(1),
            RefuseCommand(),
            Append((agent_created(2), clash)),
            append_one(3),
            CreateAgent("dup-agent-0", {}),
            append_one(4),
        ]
        # when they are executed concurrently
        results = await asyncio.gather(*(store.execute(c) for c in commands), return_exceptions=True)
        log = await all_events(store)
        report = await store.verify()
        names = [r["name"] for r in await store.fetch("SELECT name FROM agents ORDER BY position")]

    # then only the refused ones failed, each with its own error, and nothing of theirs was written
    assert isinstance(results[1], Refused)
    # a projection constraint is a server fault (500), not a retryable version conflict
    assert isinstance(results[2], StoreError) and not isinstance(results[2], ConcurrencyError)
    assert results[2].status == 500
    assert isinstance(results[4], Conflict) and results[4].code == "name_taken"
    good = [results[0], results[3], results[5]]
    assert all(isinstance(r, list) and len(r) == 1 for r in good)
    # the good ones shared one commit, and the log stayed gapless around the refusals
    assert len({r[0].recorded_at for r in good}) == 1  # type: ignore[index]
    assert positions(log) == [1, 2, 3, 4]
    assert [e.data["agent_id"] for e in log] == ["agt_dup0", "agt_a1", "agt_a3", "agt_a4"]
    assert "agt_a2" not in {e.data["agent_id"] for e in log}
    assert names == ["dup-agent-0", "a-agent-1", "a-agent-3", "a-agent-4"]
    assert report.ok


async def test_an_event_row_refused_when_the_batch_inserts_its_events_fails_only_its_own_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with opened(tmp_path / "log.db") as store:
        # given event ids that repeat, so that the second event of a batch breaks the log's unique event_id
        # only when the batch's rows are inserted, after both commands were decided and folded
        monkeypatch.setattr("rungate.store.batch.new_event_id", lambda: "01the-same-event-id")
        # when two commands are executed in one batch
        results = await asyncio.gather(store.execute(append_one(1)), store.execute(append_one(2)),
                                       return_exceptions=True)
        log = await all_events(store)
        names = [r["name"] for r in await store.fetch("SELECT name FROM agents ORDER BY position")]
        report = await store.verify()

    # then the first one is recorded, the second fails alone (a server fault), and its projection rows went
    # with it
    assert isinstance(results[0], list) and [e.event_id for e in results[0]] == ["01the-same-event-id"]
    assert isinstance(results[1], StoreError) and results[1].status == 500
    assert positions(log) == [1] and log == results[0]
    assert names == ["a-agent-1"]
    assert report.ok


async def test_an_event_row_refused_before_a_later_command_reads_the_log_fails_only_its_own_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with opened(tmp_path / "log.db") as store:
        await store.execute(append_one(0))
        # given an event id that repeats one already in the log, and a second command in the same batch with
        # an idempotency key, whose look-up makes the batch insert the rows decided before it
        taken = (await all_events(store))[0].event_id
        # (the first command draws it on the batch's first pass and again when applied alone)
        ids = iter([taken, taken, "01a-fresh-event-id-0000000000001", "01a-fresh-event-id-0000000000002"])
        monkeypatch.setattr("rungate.store.batch.new_event_id", lambda: next(ids))
        # when both are executed in one batch
        results = await asyncio.gather(store.execute(append_one(1)),
                                       store.execute(append_one(2), idempotency_key="key-2"),
                                       return_exceptions=True)
        log = await all_events(store)
        report = await store.verify()

    # then the command whose row was refused fails alone, the other is recorded, and the chain verifies
    assert isinstance(results[0], StoreError) and results[0].status == 500
    assert isinstance(results[1], list) and len(results[1]) == 1
    assert positions(log) == [1, 2] and log[1:] == results[1]
    assert report.ok


async def test_an_idempotency_key_reused_returns_the_first_events_and_appends_once(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        # given a two-event command executed under a key
        first = await store.execute(Append((agent_created(1), agent_created(2))), idempotency_key="key-1")
        # when the same key is executed again, sequentially, concurrently, and with a different command
        again = await store.execute(Append((agent_created(1), agent_created(2))), idempotency_key="key-1")
        together = await asyncio.gather(
            store.execute(append_one(3), idempotency_key="key-2"),
            store.execute(append_one(3), idempotency_key="key-2"),
            store.execute(append_one(9), idempotency_key="key-1"),
        )
        log = await all_events(store)

    # then each key's events were recorded exactly once and every retry got the original record back
    assert len(first) == 2
    assert again == first
    assert together[0] == together[1] and len(together[0]) == 1
    assert together[2] == first
    assert positions(log) == [1, 2, 3]
    assert log[:2] == first and log[2:] == together[0]


async def test_the_events_table_refuses_update_and_delete(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    async with opened(path) as store:
        await store.execute(Append((agent_created(1), agent_created(2))))
    # given a closed log opened with the standard library
    conn = sqlite3.connect(path)
    try:
        before = conn.execute("SELECT * FROM events ORDER BY position").fetchall()
        # when a row is updated or deleted, then the triggers refuse
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE events SET data = '{}' WHERE position = 1")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE events SET position = 7 WHERE position = 2")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM events WHERE position = 2")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM events")
        conn.commit()
        assert conn.execute("SELECT * FROM events ORDER BY position").fetchall() == before
    finally:
        conn.close()


@pytest.mark.parametrize("clash", ["position", "event_id", "stream_version", "idempotency_key"])
async def test_the_events_table_refuses_insert_or_replace_over_an_existing_row(tmp_path: Path, clash: str) -> None:
    """`INSERT OR REPLACE` deletes the clashing row without firing DELETE triggers (recursive_triggers is off)."""
    path = tmp_path / "log.db"
    async with opened(path) as store:
        await store.execute(Append((agent_created(1), agent_created(2))), idempotency_key="key-1")
        await store.execute(append_one(3))
    conn = sqlite3.connect(path)
    try:
        before = conn.execute("SELECT * FROM events ORDER BY position").fetchall()
        assert before[0][9] == "key-1"
        # a new row (position 4, fresh id, fresh stream) that collides with a stored one on one unique key
        forged = {"position": 4, "event_id": "forged-event-id", "stream": "agent-forged", "version": 1,
                  "idempotency_key": None}
        victim = before[1] if clash != "idempotency_key" else before[0]
        if clash == "position":
            forged["position"] = victim[0]
        elif clash == "event_id":
            forged["event_id"] = victim[1]
        elif clash == "stream_version":
            forged["stream"], forged["version"] = victim[2], victim[3]
        else:
            forged["idempotency_key"] = victim[9]
        # when it is written with the REPLACE conflict resolution
        try:
            conn.execute(
                "INSERT OR REPLACE INTO events (position, event_id, stream, version, type, schema_version, data,"
                " metadata, recorded_at, idempotency_key, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (forged["position"], forged["event_id"], forged["stream"], forged["version"], victim[4], victim[5],
                 '{"forged": true}', victim[7], victim[8], forged["idempotency_key"], victim[10], victim[11]))
            conn.commit()
        except sqlite3.IntegrityError as exc:
            assert "append-only" in str(exc) or "UNIQUE" in str(exc)
            conn.rollback()
        # then every stored event is still there, unchanged (the log is append-only)
        after = conn.execute("SELECT * FROM events WHERE position <= 3 ORDER BY position").fetchall()
        assert after == before
    finally:
        conn.close()


async def test_read_stream_returns_only_that_stream_after_a_position(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        # given two streams interleaved
        for i in range(10):
            await store.execute(Append((NewEvent(f"agent-x{i % 2}", AgentUpdated(agent_id=f"x{i % 2}", name=None)),)))
        # when one stream is read from the start, after a position, and with a limit
        whole = await store.read_stream("agent-x1")
        after = await store.read_stream("agent-x1", after_position=4)
        limited = await store.read_stream("agent-x1", after_position=4, limit=2)
        nothing = await store.read_stream("agent-nobody")

    # then only that stream's later events come back, in order
    assert positions(whole) == [2, 4, 6, 8, 10]
    assert [e.version for e in whole] == [1, 2, 3, 4, 5]
    assert positions(after) == [6, 8, 10]
    assert positions(limited) == [6, 8]
    assert nothing == []


@pytest.mark.parametrize("directory", ["runs #1", "what?", "100%41"])
async def test_a_database_path_with_uri_characters_is_read_from_the_same_file(tmp_path: Path, directory: str) -> None:
    """The read side opens `file:{path}?mode=ro` as a URI: `#`, `?` and `%` in the path must be escaped."""
    path = tmp_path / directory / "log.db"
    # given a store whose path holds characters that mean something in a URI
    async with opened(path) as store:
        # when an event is appended and read back
        await store.execute(append_one(1))
        log = await store.read_all()
    # then the read side saw the file the writer wrote, and created no stray database beside it
    assert positions(log) == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [directory]


async def test_a_closed_store_refuses_execute_and_reads(tmp_path: Path) -> None:
    store = SQLiteEventStore(tmp_path / "log.db", projections=ALL)
    # given a store that never started, then one that started and closed
    with pytest.raises(StoreError):
        await store.execute(append_one(1))
    await store.start()
    await store.execute(append_one(1))
    await store.close()
    # when it is used after close, then StoreError
    with pytest.raises(StoreError, match="not running"):
        await store.execute(append_one(2))
    with pytest.raises(StoreError):
        await store.read_all()
    with pytest.raises(StoreError):
        await store.fetch("SELECT 1")


async def test_a_closed_store_refuses_verify_and_rebuild_with_store_error(tmp_path: Path) -> None:
    # given a closed store
    store = SQLiteEventStore(tmp_path / "log.db", projections=ALL)
    await store.start()
    await store.execute(append_one(1))
    await store.close()
    # when verify or rebuild is called, then the documented StoreError comes back (not a RuntimeError)
    with pytest.raises(StoreError):
        await store.verify()
    with pytest.raises(StoreError):
        await store.rebuild()


async def test_close_never_reports_failure_for_a_command_it_then_commits(tmp_path: Path) -> None:
    """A caller told "failed" must find nothing in the log; one whose events are in the log must see success."""
    path = tmp_path / "log.db"
    entered, release = threading.Event(), threading.Event()

    class SlowCommand:
        def lookups(self) -> Sequence[Lookup]:
            return ()

        def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
            entered.set()
            release.wait(5)
            return (agent_created(1, "slow"),)

    store = SQLiteEventStore(path, projections=ALL)
    await store.start()
    loop = asyncio.get_running_loop()
    # given a command in the middle of its batch
    pending = asyncio.create_task(store.execute(SlowCommand()))
    assert await loop.run_in_executor(None, entered.wait, 5)
    # when the store is closed while that batch runs, and the batch then finishes
    closing = asyncio.create_task(store.close())
    await asyncio.sleep(0.1)
    release.set()
    await closing
    outcome = (await asyncio.gather(pending, return_exceptions=True))[0]
    async with opened(path) as reopened:
        written = [e.data["agent_id"] for e in await reopened.read_all()]

    # then what the caller was told matches what the log holds
    assert isinstance(outcome, list) == ("agt_slow1" in written), (outcome, written)


async def test_a_cancelled_caller_still_gets_its_events_written(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        # given a caller that gives up right after submitting
        task = asyncio.create_task(store.execute(append_one(1)))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # when the next command commits
        await store.execute(append_one(2))
        # then the abandoned command was written too (the ledger must not lose it)
        log = await store.read_all()
    assert [e.data["agent_id"] for e in log] == ["agt_a1", "agt_a2"]


async def test_two_stores_on_one_file_keep_one_gapless_chain(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    # given two writers on the same file (a server and a CLI beside it)
    async with opened(path) as one, opened(path) as two:
        # when both append concurrently
        await asyncio.gather(*(store.execute(append_one(i, prefix))
                               for i in range(40) for store, prefix in ((one, "one"), (two, "two"))))
        report = await one.verify()
        log = await all_events(two)
    # then the chain is whole and the positions are gapless
    assert report.ok and report.events == 80
    assert positions(log) == list(range(1, 81))


async def test_concurrent_commands_decide_against_each_others_writes(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        # given 30 operators creating the same agent name at once
        outcomes = await asyncio.gather(*(store.execute(CreateAgent("same-name", {})) for _ in range(30)),
                                        return_exceptions=True)
        agent = await store.fetchone("SELECT id FROM agents WHERE name = 'same-name'")
        assert agent is not None
        # and 30 calls of that agent, without a run id, admitted at once
        admits = [AdmitCall(await facts(store, agent["id"])) for _ in range(30)]
        await asyncio.gather(*(store.execute(a) for a in admits))
        runs = await store.fetch("SELECT id, step_count FROM runs")

    # then exactly one agent was created, and all the calls joined one auto-run
    assert sum(isinstance(o, list) for o in outcomes) == 1
    assert all(isinstance(o, Conflict) and o.code == "name_taken" for o in outcomes if not isinstance(o, list))
    assert len({a.run_id for a in admits}) == 1
    assert sum(a.started_run for a in admits) == 1
    assert runs == [{"id": admits[0].run_id, "step_count": 30}]


async def _writer_pragma(store: SQLiteEventStore, pragma: str) -> object:
    """Read a per-connection pragma on the store's own writer connection (no public way to reach it)."""

    def read() -> object:
        assert store._conn is not None
        return store._conn.execute(f"PRAGMA {pragma}").fetchone()[0]

    return await asyncio.get_running_loop().run_in_executor(store._executor, read)


@pytest.mark.parametrize(("durability", "expected"), [("full", 2), ("normal", 1)])
async def test_the_writer_uses_wal_and_the_configured_synchronous_mode(tmp_path: Path, durability: str,
                                                                       expected: int) -> None:
    path = tmp_path / "log.db"
    kwargs = {} if durability == "full" else {"durability": durability}
    # given a started store (default durability, or "normal")
    async with opened(path, **kwargs) as store:
        await store.execute(append_one(1))
        # when the database and its writer connection are inspected
        other = sqlite3.connect(path)
        try:
            journal = other.execute("PRAGMA journal_mode").fetchone()[0]
        finally:
            other.close()
        synchronous = await _writer_pragma(store, "synchronous")
    # then the file is in WAL mode and commits are FULL (2) by default, NORMAL (1) on request
    assert journal == "wal"
    assert synchronous == expected


class ReadAgent:
    """A command that only reads an agent's `disabled` flag (what the writer's look-up cache may answer)."""

    def __init__(self, agent_id: str) -> None:
        self.lookup = Lookup.of("agents", "disabled", id=agent_id)
        self.seen: Row | None = None

    def lookups(self) -> Sequence[Lookup]:
        return (self.lookup,)

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        self.seen = found[self.lookup]
        return ()


async def _disabled(store: SQLiteEventStore, agent_id: str) -> object:
    read = ReadAgent(agent_id)
    await store.execute(read)
    return None if read.seen is None else read.seen["disabled"]


async def test_the_writer_reads_a_row_again_once_its_projection_changed(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        # given an agent whose row the writer has read (and may keep)
        await store.execute(Append((agent_created(1),)))
        assert await _disabled(store, "agt_a1") == 0
        assert await _disabled(store, "agt_a1") == 0
        # when an event changes that row, in a batch of its own or in the same batch as the next read
        await store.execute(Append((NewEvent("agent-agt_a1", AgentUpdated(agent_id="agt_a1", disabled=True)),)))
        after_own_batch = await _disabled(store, "agt_a1")
        enable = store.execute(Append((NewEvent("agent-agt_a1", AgentUpdated(agent_id="agt_a1", disabled=False)),)))
        same_batch = await asyncio.gather(enable, _disabled(store, "agt_a1"))
    # then every read after the change sees it
    assert after_own_batch == 1
    assert same_batch[1] == 0


async def test_the_writer_reads_a_row_again_once_another_process_wrote(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    async with opened(path) as server, opened(path) as cli:
        # given a server whose writer has read an agent's row
        await server.execute(Append((agent_created(1),)))
        assert await _disabled(server, "agt_a1") == 0
        # when another writer on the same file (the CLI) disables the agent
        await cli.execute(Append((NewEvent("agent-agt_a1", AgentUpdated(agent_id="agt_a1", disabled=True)),)))
        # then the server's next read sees it, not the row it read before
        assert await _disabled(server, "agt_a1") == 1


async def test_commit_runs_on_the_loop_while_quick_and_on_the_writer_thread_once_storage_is_slow(
        tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        assert store._conn is not None
        committed_on: list[int] = []
        store._conn.set_trace_callback(
            lambda sql: committed_on.append(threading.get_ident()) if sql == "COMMIT" else None)
        loop_thread = threading.get_ident()
        # given quick commits (a fresh store assumes so): COMMIT runs on the loop, in the batch's own turn
        await store.execute(append_one(1))
        assert committed_on == [loop_thread]
        # when the storage has been slow (commits averaging a second)
        store._commit_avg_s = 1.0
        events = await store.execute(append_one(2))
        # then COMMIT runs on the writer thread, and the caller is answered once it returned
        assert len(committed_on) == 2 and committed_on[1] != loop_thread
        assert [e.position for e in events] == [2]
        assert await store.fetchone("SELECT count(*) AS n FROM agents") == {"n": 2}
        # and the writer's counters say so (the benchmark reports jobs per commit from them)
        assert store.write_stats() == WriteStats(commits=2, jobs=2, on_thread=1)


async def test_a_step_is_settled_from_the_writers_memory_only_while_no_other_writer_touched_it(
        tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    async with opened(path) as server, opened(path) as cli:
        agent = CreateAgent("imaged", {})
        await server.execute(agent)
        admit = AdmitCall(await facts(server, agent.agent_id, reserved_pusd=500))
        await server.execute(admit)
        # given a started step whose row the server's writer knows as its projection wrote it
        known = server._batches.known_rows()[("steps", admit.step_id)]
        row = await server.fetchone("SELECT status, run_id, provider, model, reserved_pusd, reserved_tokens"
                                    " FROM steps WHERE id = ?", (admit.step_id,))
        assert known == row and known["status"] == "started"
        # when another writer on the same file (a sweeper in another process, say) closes that step first
        assert len(await cli.execute(SettleStep(admit.step_id))) == 1
        # then the server's own settlement reads the row again, sees it closed, and books nothing more
        done = StepCompleted(step_id=admit.step_id, run_id=admit.run_id, status="ok", provider="openai",
                             model="gpt-4o-mini", usage={"input": 3, "output": 2}, cost_pusd=40, latency_ms=1)
        assert await server.execute(SettleStep(admit.step_id, done)) == []
        run = await server.fetchone("SELECT spend_pusd, reserved_pusd FROM runs WHERE id = ?", (admit.run_id,))
        assert ("steps", admit.step_id) not in server._batches.known_rows()
    assert run == {"spend_pusd": 500, "reserved_pusd": 0}  # the reservation, charged once
