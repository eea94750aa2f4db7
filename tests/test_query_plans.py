"""Reads that happen on every new run or every sweep stay point reads as the log grows.

Two of them read whole tables before: the look-up of an agent's newest auto-run, done by the one writer each
time an agent starts a run after an idle close (77 ms for an agent with 100,000 past runs), and the sweeper's
reads of idle runs and unsettled steps every 30 seconds (a million steps took 100-140 ms). These tests ask
SQLite how it runs the SQL Rungate sends: no plan may scan a table that grows with use or sort its rows. Pages
of runs in the audit API are walked along an index too (a page of an agent's runs sorted all of them: 110 ms for
an agent with 100,000).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from projections import ALL
from rungate import queries
from rungate.admin import CreateAgent
from rungate.runs import AdmitCall, CloseIdleRun
from rungate.store import Lookup, SQLiteEventStore
from tests.store_helpers import facts, opened, settle

GROWING = ("runs", "steps", "events", "agent_spend", "rate_buckets", "gates", "holds")


def plan(db: Path, sql: str, params: tuple[Any, ...]) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]


def recorded_reads(store: SQLiteEventStore) -> list[tuple[str, tuple[Any, ...]]]:
    """The (SQL, parameters) of every read `store.fetch` sends from now on, in a list that grows as they go."""
    sent: list[tuple[str, tuple[Any, ...]]] = []
    original = store.fetch

    async def recording(sql: str, params: Any = ()) -> Any:
        sent.append((sql, tuple(params)))
        return await original(sql, params)

    store.fetch = recording  # type: ignore[method-assign]
    return sent


def assert_point_read(db: Path, sql: str, params: tuple[Any, ...]) -> None:
    steps = plan(db, sql, params)
    assert not any(step.startswith("SCAN") and step.split()[1] in GROWING for step in steps), (sql, steps)
    assert "USE TEMP B-TREE FOR ORDER BY" not in steps, (sql, steps)  # every matching row read, then sorted


async def test_an_agent_s_newest_auto_run_is_found_through_the_index(tmp_path: Path) -> None:
    db = tmp_path / "plans.db"
    async with opened(db) as store:
        agent = CreateAgent("a", {})
        await store.execute(agent)
        agent_id = agent.agent_id
        # given an agent whose auto-run was closed after an idle window
        first = AdmitCall(await facts(store, agent_id))
        await store.execute(first)
        assert first.run_id is not None
        await store.execute(settle(first.run_id, first.step_id))
        await store.execute(CloseIdleRun(first.run_id, 0))
        # when its next call is admitted, it starts a new run, and every look-up it made is a point read
        asked: list[Lookup] = []
        second = AdmitCall(await facts(store, agent_id))
        original = second.more_lookups

        def recording(found: Any, now: str) -> Any:
            wanted = original(found, now)
            asked.extend(wanted)
            return wanted

        second.more_lookups = recording  # type: ignore[method-assign]
        await store.execute(second)
        assert second.started_run and second.run_id != first.run_id
    latest = [lookup for lookup in asked if "status" in lookup.sql and "auto" in lookup.sql]
    assert latest, "the admission did not look for the agent's newest auto-run"
    for lookup in [*second.lookups(), *asked]:
        assert_point_read(db, lookup.sql, lookup.params)


async def test_the_sweeper_reads_idle_runs_and_open_steps_through_indexes(tmp_path: Path) -> None:
    db = tmp_path / "sweep.db"
    async with opened(db) as store:
        sent = recorded_reads(store)
        await queries.idle_auto_runs(store, "2026-12-08T00:00:00.000000Z", 900)
        await queries.open_steps_started_before(store, "2026-12-08T00:00:00.000000Z")
    assert len(sent) >= 3
    for sql, params in sent:
        assert_point_read(db, sql, params)


async def test_a_page_of_runs_is_read_in_index_order_whatever_the_filter(tmp_path: Path) -> None:
    db = tmp_path / "pages.db"
    async with opened(db) as store:
        sent = recorded_reads(store)
        cursor = queries._cursor_encode("2026-06-01T00:00:00.000000Z", "run_x")  # as a page's last run gives
        pages: list[dict[str, str]] = [{}, {"agent_id": "agt_x"}, {"status": "completed"},
                                       {"agent_id": "agt_x", "status": "completed"},
                                       {"agent_id": "agt_x", "since": "2026-01-01"},
                                       {"since": "2026-01-01", "until": "2026-02-01"}]
        for filters in pages:
            await queries.list_runs(store, limit=50, **filters)
            await queries.list_runs(store, limit=50, cursor=cursor, **filters)
    assert len(sent) == 12
    for sql, params in sent:
        steps = plan(db, sql, params)
        # walked newest first along an index and stopped after a page: never every run read and sorted
        assert "USE TEMP B-TREE FOR ORDER BY" not in steps, (sql, steps)
        assert not any(step == "SCAN runs" for step in steps), (sql, steps)
        # both filters narrow the walk: along one alone, an agent's few runs are looked for among all others
        if "agent_id = ?" in sql and "status = ?" in sql:
            assert any("agent_id=? AND status=?" in step for step in steps), (sql, steps)


async def test_a_page_of_approval_requests_is_read_in_index_order(tmp_path: Path) -> None:
    db = tmp_path / "gates.db"
    async with opened(db) as store:
        sent = recorded_reads(store)
        for filters in ({}, {"status": "approved"}, {"status": "rejected"}, {"agent_id": "agt_x"},
                        {"run_id": "run_x"}, {"status": "expired"}, {"status": "expired", "agent_id": "agt_x"},
                        {"status": "pending"}):
            await queries.list_approval_requests(store, now="2026-12-08T00:00:00.000000Z", **filters)
    assert len(sent) == 8
    for sql, params in sent:
        steps = plan(db, sql, params)
        assert not any(step == "SCAN gates" for step in steps), (sql, steps)
        # Pending gates are read through their expiry and sorted: only those not yet expired, or (merged into
        # the expired ones, which come off their index in order) those past it, which the sweeper keeps few.
        sorted_part = [step for step in steps if "expires_at" in step]
        if not sorted_part:
            assert "USE TEMP B-TREE FOR ORDER BY" not in steps, (sql, steps)  # every gate (in the status) sorted
        if "status = 'expired'" in sql:
            assert any("gates_status_created (status=?)" in step for step in steps), (sql, steps)


async def test_indexes_added_to_a_projection_are_created_at_start_without_a_rebuild(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    async with opened(db) as store:
        await store.execute(CreateAgent("a", {}))
    # given a database from before the indexes existed, with a row no rebuild from the log would keep
    with sqlite3.connect(db) as conn:
        conn.execute("DROP INDEX runs_status_started")
        conn.execute("DROP INDEX runs_agent_started")
        conn.execute("DROP INDEX runs_agent_status_started")
        conn.execute("DROP INDEX gates_status_created")
        conn.execute("DROP INDEX steps_open")
        conn.execute("INSERT INTO agent_spend (agent_id, minute, spend_pusd) VALUES ('marker', '2026-01-01T00:00', 1)")
    # when Rungate starts on it
    store = SQLiteEventStore(db, projections=ALL)
    await store.start()
    await store.close()
    # then the indexes exist again, and the projections were not rebuilt (the marker row is still there)
    with sqlite3.connect(db) as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        marker = conn.execute("SELECT spend_pusd FROM agent_spend WHERE agent_id = 'marker'").fetchone()
    assert {"runs_status_started", "runs_agent_started", "runs_agent_status_started", "steps_open",
            "gates_status_created"} <= names
    assert marker == (1,)
