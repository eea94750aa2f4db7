"""The hash chain makes tampering visible: `verify` (API and CLI) names the first broken position."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from rungate.admin import CreateAgent
from rungate.runs import AdmitCall, CompleteRun
from rungate.store import Anchor, VerifyReport
from rungate.store.hashing import chain_hash
from tests.store_helpers import copy_database, facts, opened, run_cli, settle

Tamper = Callable[[sqlite3.Connection], None]
EVENTS = 41


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A closed, healthy log of exactly EVENTS events written through the real commands."""
    path = tmp_path_factory.mktemp("integrity") / "source.db"

    async def fill() -> None:
        async with opened(path) as store:
            create = CreateAgent("integrity-agent", {"team": "audit"})
            await store.execute(create)  # 1 event
            run_id = "run-integrity"
            for i in range(13):  # 1 RunStarted + 13 StepStarted + 13 StepCompleted = 27 events
                admit = AdmitCall(await facts(store, create.agent_id, run_id=run_id, reserved_pusd=100 + i))
                await store.execute(admit)
                await store.execute(settle(run_id, admit.step_id, usage={"input": i, "output": 2 * i},
                                           cost_pusd=1000 * i))
            await store.execute(CompleteRun(create.agent_id, run_id, "done", {}))  # 1 event
            for _ in range(11):  # auto-run: 1 RunStarted + 11 StepStarted = 12 events
                await store.execute(AdmitCall(await facts(store, create.agent_id)))
            count = await store.fetchone("SELECT count(*) AS n FROM events")
            assert count == {"n": EVENTS}
    asyncio.run(fill())
    return path


def _tampered(source: Path, target: Path, tamper: Tamper | None) -> Path:
    copy_database(source, target)
    if tamper is not None:
        conn = sqlite3.connect(target)
        try:
            conn.execute("DROP TRIGGER events_no_update")
            conn.execute("DROP TRIGGER events_no_delete")
            tamper(conn)
            conn.commit()
        finally:
            conn.close()
    return target


def _change_column(position: int, column: str, expression: str) -> Tamper:
    def tamper(conn: sqlite3.Connection) -> None:
        changed = conn.execute(f"UPDATE events SET {column} = {expression} WHERE position = ?", (position,))
        assert changed.rowcount == 1

    return tamper


def _delete(position: int) -> Tamper:
    def tamper(conn: sqlite3.Connection) -> None:
        assert conn.execute("DELETE FROM events WHERE position = ?", (position,)).rowcount == 1

    return tamper


def _truncate_from(position: int) -> Tamper:
    def tamper(conn: sqlite3.Connection) -> None:
        assert conn.execute("DELETE FROM events WHERE position >= ?", (position,)).rowcount > 1

    return tamper


def _swap(first: int, second: int) -> Tamper:
    def tamper(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE events SET position = -1 WHERE position = ?", (first,))
        conn.execute("UPDATE events SET position = ? WHERE position = ?", (first, second))
        conn.execute("UPDATE events SET position = ? WHERE position = -1", (second,))

    return tamper


def _forge_tail(conn: sqlite3.Connection) -> None:
    """Append a row whose links look right but whose hash was not computed over its columns."""
    last = conn.execute("SELECT * FROM events ORDER BY position DESC LIMIT 1").fetchone()
    conn.execute("INSERT INTO events VALUES (?, 'forged-id', ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                 (last[0] + 1, last[2], last[3] + 1000, last[4], last[5], last[6], last[7], last[8], last[11],
                  "f" * 64))


def _two_changes(conn: sqlite3.Connection) -> None:
    _change_column(30, "data", "json_set(data, '$.status', 'ok-forged')")(conn)
    _change_column(9, "recorded_at", "'2000-01-01T00:00:00.000000Z'")(conn)


# (case id, tampering, the position verify must name, a word of the reason)
CASES: list[tuple[str, Tamper, int, str]] = [
    ("data", _change_column(17, "data", "json_set(data, '$.cost_pusd', 1)"), 17, "hash"),
    ("metadata", _change_column(5, "metadata", "json_set(metadata, '$.agent_id', 'someone')"), 5, "hash"),
    ("recorded_at", _change_column(22, "recorded_at", "'2030-01-01T00:00:00.000000Z'"), 22, "hash"),
    ("type", _change_column(12, "type", "'RunCompleted'"), 12, "hash"),
    ("stream", _change_column(3, "stream", "'run-elsewhere'"), 3, "hash"),
    ("version", _change_column(8, "version", "version + 1000"), 8, "hash"),
    ("idempotency_key", _change_column(6, "idempotency_key", "'replayed-key'"), 6, "hash"),
    ("first_row", _change_column(1, "data", "json_set(data, '$.name', 'mallory')"), 1, "hash"),
    ("last_row", _change_column(EVENTS, "data", "json_set(data, '$.model', 'cheap')"), 41, "hash"),
    ("delete_middle", _delete(20), 20, "missing"),
    ("delete_first", _delete(1), 1, "missing"),
    ("delete_last", _delete(EVENTS), EVENTS, "missing"),
    ("truncate_tail", _truncate_from(EVENTS - 4), EVENTS - 4, "missing from the end"),
    ("swap_neighbours", _swap(14, 15), 14, "prev_hash"),
    ("swap_apart", _swap(10, 33), 10, "prev_hash"),
    ("forged_tail", _forge_tail, EVENTS + 1, "hash"),
    ("first_of_two", _two_changes, 9, "hash"),
]


async def _verify(path: Path) -> VerifyReport:
    async with opened(path) as store:
        return await store.verify()


async def _verify_with(path: Path, anchors: list[Anchor]) -> VerifyReport:
    async with opened(path) as store:
        return await store.verify(anchors)


def _hash_in(conn: sqlite3.Connection, position: int) -> str:
    return conn.execute("SELECT hash FROM events WHERE position = ?", (position,)).fetchone()[0]


def _hash_at(path: Path, position: int = EVENTS) -> str:
    conn = sqlite3.connect(path)
    try:
        return _hash_in(conn, position)
    finally:
        conn.close()


async def test_an_untampered_copy_verifies(populated: Path, tmp_path: Path) -> None:
    # given a plain copy of a healthy log, when verified, then ok with every event counted and the head named
    path = _tampered(populated, tmp_path / "copy.db", None)
    report = await _verify(path)
    assert report == VerifyReport(True, EVENTS, head=(EVENTS, _hash_at(path)))


@pytest.mark.parametrize(("tamper", "broken_at", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_verify_names_the_first_tampered_position(populated: Path, tmp_path: Path, tamper: Tamper,
                                                        broken_at: int, reason: str) -> None:
    # given a copy of a healthy log tampered with outside Rungate
    path = _tampered(populated, tmp_path / "tampered.db", tamper)
    # when the store verifies it
    report = await _verify(path)
    # then the chain is reported broken at the first affected position
    assert not report.ok
    assert report.broken_at == broken_at
    assert report.reason is not None and reason in report.reason


async def test_the_source_log_is_untouched_by_tampering_with_copies(populated: Path) -> None:
    assert await _verify(populated) == VerifyReport(True, EVENTS, head=(EVENTS, _hash_at(populated)))


def _rehash_from(position: int) -> Tamper:
    """Change the event at `position`, then compute every hash from it on again, and the recorded head: what
    someone who can write the file and knows the (unkeyed) chain can do."""

    def tamper(conn: sqlite3.Connection) -> None:
        _change_column(position, "data", "json_set(data, '$.forged', 1)")(conn)
        prev = _hash_in(conn, position - 1)
        rows = conn.execute("SELECT position, event_id, stream, version, type, schema_version, data, metadata,"
                            " recorded_at, idempotency_key FROM events WHERE position >= ? ORDER BY position",
                            (position,)).fetchall()
        for row in rows:
            digest = chain_hash(prev, *row)
            conn.execute("UPDATE events SET prev_hash = ?, hash = ? WHERE position = ?", (prev, digest, row[0]))
            prev = digest
        conn.execute("UPDATE chain_head SET hash = ? WHERE id = 1", (prev,))

    return tamper


def _cut_tail_and_head(position: int) -> Tamper:
    """Delete the events from `position` on and move the recorded head back to the event before."""

    def tamper(conn: sqlite3.Connection) -> None:
        _truncate_from(position)(conn)
        last = _hash_in(conn, position - 1)
        conn.execute("UPDATE chain_head SET position = ?, hash = ? WHERE id = 1", (position - 1, last))

    return tamper


@pytest.mark.parametrize(("tamper", "anchor_at", "broken_at", "reason"), [
    (_rehash_from(17), EVENTS, EVENTS, "anchor"),  # the head kept: the rewrite changed every later hash
    (_rehash_from(17), 20, 20, "anchor"),  # an older anchor: the first it covers
    (_rehash_from(17), 17, 17, "anchor"),
    (_cut_tail_and_head(37), EVENTS, 37, "missing from the end"),
], ids=["rewritten-head-anchor", "rewritten-older-anchor", "rewritten-at-anchor", "cut-tail"])
async def test_an_anchor_kept_elsewhere_shows_a_rewrite_the_chain_cannot(
        populated: Path, tmp_path: Path, tamper: Tamper, anchor_at: int, broken_at: int, reason: str) -> None:
    # Given anchors kept from a check of the healthy log
    async with opened(populated) as store:
        healthy = await store.verify()
        kept = {e.position: e.hash for e in await store.read_all(0, EVENTS)}
    assert healthy.head == (EVENTS, kept[EVENTS])
    # When the log is rewritten consistently (or cut, with its recorded head moved back)
    path = _tampered(populated, tmp_path / "rewritten.db", tamper)
    # Then the chain alone verifies: this is the limit of an unkeyed chain
    assert (await _verify(path)).ok
    # But the anchor does not: the first position it covers is named
    report = await _verify_with(path, [(anchor_at, kept[anchor_at])])
    assert not report.ok and report.broken_at == broken_at and reason in (report.reason or ""), report
    # and anchors older than the change still hold
    assert (await _verify_with(path, [(16, kept[16]), (3, kept[3])])).ok


def test_cli_verify_prints_the_head_and_checks_anchors(populated: Path, tmp_path: Path) -> None:
    path = _tampered(populated, tmp_path / "copy.db", None)
    head = f"{EVENTS}:{_hash_at(path)}"
    # `rungate verify` prints the head as the anchor to keep
    result = run_cli(path, "verify")
    assert result.returncode == 0 and f"head {head}" in result.stdout, result.stdout
    # which checks out later, on the same log
    result = run_cli(path, "verify", "--anchor", head, "--anchor", f"1:{_hash_at(path, 1)}")
    assert result.returncode == 0 and result.stdout.startswith("ok"), (result.stdout, result.stderr)
    # and not on a log rewritten since
    rewritten = _tampered(populated, tmp_path / "rewritten.db", _rehash_from(30))
    assert run_cli(rewritten, "verify").returncode == 0
    result = run_cli(rewritten, "verify", "--anchor", head)
    assert result.returncode == 1 and f"broken at position {EVENTS}:" in result.stdout, result.stdout
    # an anchor that is not POSITION:HASH is a usage error, named
    for bad in ("41", f"0:{'a' * 64}", "41:xyz", f"41:{'A' * 64}", f"-1:{'a' * 64}"):
        result = run_cli(path, "verify", "--anchor", bad)
        assert result.returncode == 2 and "POSITION:HASH" in result.stderr, (bad, result.stderr)


def test_cli_verify_prints_ok_and_exits_0_on_a_good_log(populated: Path, tmp_path: Path) -> None:
    # given a healthy copy, when `rungate verify` runs, then it prints ok and exits 0
    result = run_cli(_tampered(populated, tmp_path / "copy.db", None), "verify")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
    assert f"{EVENTS} events" in result.stdout


@pytest.mark.parametrize("case", ["data", "delete_middle", "swap_neighbours", "first_of_two"])
def test_cli_verify_exits_1_naming_the_first_broken_position(populated: Path, tmp_path: Path, case: str) -> None:
    _, tamper, broken_at, _ = next(c for c in CASES if c[0] == case)
    # given a tampered copy, when `rungate verify` runs
    result = run_cli(_tampered(populated, tmp_path / "tampered.db", tamper), "verify")
    # then it exits 1 and names the first broken position
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"broken at position {broken_at}:" in result.stdout
    assert not result.stdout.startswith("ok")


def test_python_dash_m_rungate_runs_the_cli(populated: Path, tmp_path: Path) -> None:
    """`python -m rungate` (the form the docs and scripts use) needs `rungate/__main__.py`."""
    path = _tampered(populated, tmp_path / "copy.db", None)
    result = subprocess.run([sys.executable, "-m", "rungate", "--database-url", f"sqlite:///{path}", "verify"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
