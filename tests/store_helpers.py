"""Shared helpers for the event-store tests: real SQLite files, real commands, no mocks of Rungate code."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from projections import ALL
from rungate.events import NewEvent, Recorded
from rungate.events.catalogue import AgentCreated, StepCompleted
from rungate.runs import CallFacts, run_stream
from rungate.store import Append, SQLiteEventStore

REPO_ROOT = Path(__file__).resolve().parent.parent

# Every projection table, with the ORDER BY that makes a snapshot deterministic.
PROJECTION_TABLES: tuple[tuple[str, str], ...] = (
    ("agents", "id"),
    ("provider_keys", "id"),
    ("policies", "id"),
    ("policy_versions", "policy_id, version"),
    ("runs", "id"),
    ("steps", "id"),
    ("agent_spend", "agent_id, minute"),
    ("rate_buckets", "scope, second"),
    ("gates", "id"),
    ("holds", "id"),
    ("webhooks", "id"),
    ("webhook_deliveries", "webhook_id, event_position"),
)
_SCHEMA_TABLES = ", ".join(f"'{table}'" for table, _ in PROJECTION_TABLES)


@asynccontextmanager
async def opened(path: Path, **kwargs: Any) -> AsyncIterator[SQLiteEventStore]:
    """A started store on `path`, closed on exit."""
    store = SQLiteEventStore(path, **kwargs, projections=ALL)
    try:
        await store.start()
        yield store
    finally:
        await store.close()


def agent_created(index: int, prefix: str = "a") -> NewEvent:
    """A unique `AgentCreated` on its own stream (an append that the projection always accepts)."""
    agent_id = f"agt_{prefix}{index}"
    return NewEvent(f"agent-{agent_id}", AgentCreated(agent_id=agent_id, name=f"{prefix}-agent-{index}",
                                                       token_hash=f"hash-{prefix}-{index}"))


def append_one(index: int, prefix: str = "a") -> Append:
    return Append((agent_created(index, prefix),))


async def facts(store: SQLiteEventStore, agent_id: str, *, run_id: str | None = None, new_run: bool = False,
                reserved_pusd: int = 0, idle_timeout_s: int = 900, model: str = "gpt-4o-mini",
                stream: bool = False) -> CallFacts:
    """A chat call's facts as the proxy would build them for `agent_id` (authenticated with its current token)."""
    row = await store.fetchone("SELECT token_hash FROM agents WHERE id = ?", (agent_id,))
    return CallFacts(agent_id=agent_id, token_hash=row["token_hash"] if row else "unknown", run_id=run_id,
                     new_run=new_run, endpoint="chat", provider="openai", model=model, stream=stream,
                     fingerprint="f" * 64, reserved_pusd=reserved_pusd, idle_timeout_s=idle_timeout_s)


def settle(run_id: str, step_id: str, *, usage: dict[str, int] | None = None, cost_pusd: int | None = 0,
           unpriced: bool = False, status: str = "ok", estimated: bool = False) -> Append:
    """The `Append` the proxy executes when a call ends."""
    return Append((NewEvent(run_stream(run_id), StepCompleted(
        step_id=step_id, run_id=run_id, status=status, http_status=200 if status == "ok" else 502,
        provider="openai", model="gpt-4o-mini", usage=usage or {}, cost_pusd=cost_pusd, unpriced=unpriced,
        estimated=estimated, latency_ms=12, tool_calls=[])),))


async def snapshot(store: SQLiteEventStore) -> dict[str, list[tuple[Any, ...]]]:
    """Every projection row (and the projection schema) read through the store's read side."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table, order in PROJECTION_TABLES:
        out[table] = [tuple(row.values()) for row in await store.fetch(f"SELECT * FROM {table} ORDER BY {order}")]
    out["schema"] = [tuple(row.values()) for row in await store.fetch(
        f"SELECT type, name, tbl_name, sql FROM sqlite_master WHERE tbl_name IN ({_SCHEMA_TABLES}) ORDER BY name")]
    return out


def snapshot_file(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """The same snapshot, read with the standard library (for a closed database)."""
    conn = sqlite3.connect(path)
    try:
        out: dict[str, list[tuple[Any, ...]]] = {}
        for table, order in PROJECTION_TABLES:
            out[table] = conn.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()
        out["schema"] = conn.execute(
            f"SELECT type, name, tbl_name, sql FROM sqlite_master WHERE tbl_name IN ({_SCHEMA_TABLES})"
            " ORDER BY name").fetchall()
        return out
    finally:
        conn.close()


async def all_events(store: SQLiteEventStore) -> list[Recorded]:
    out: list[Recorded] = []
    while batch := await store.read_all(after=out[-1].position if out else 0, limit=1000):
        out.extend(batch)
    return out


def copy_database(source: Path, target: Path) -> Path:
    """Copy a closed database file (and its WAL, should one remain) to `target`."""
    shutil.copyfile(source, target)
    for suffix in ("-wal",):
        side = Path(f"{source}{suffix}")
        if side.exists():
            shutil.copyfile(side, Path(f"{target}{suffix}"))
    return target


def cli_command() -> list[str]:
    """How to start the CLI: `python -m rungate` when the package has a `__main__`, else the console script."""
    if (REPO_ROOT / "rungate" / "__main__.py").exists():
        return [sys.executable, "-m", "rungate"]
    script = shutil.which("rungate") or str(Path(sys.executable).with_name("rungate"))
    return [script]


def run_cli(path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`rungate --database-url sqlite:///PATH ARGS…` in a clean environment (no RUNGATE_* leaking in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNGATE_")}
    return subprocess.run([*cli_command(), "--database-url", f"sqlite:///{path}", *args], capture_output=True,
                          text=True, env=env, cwd=path.parent, timeout=timeout, check=False)


def positions(events: Sequence[Recorded]) -> list[int]:
    return [e.position for e in events]


def database_files(db_path: Path) -> dict[str, bytes]:
    """The bytes of the database and of every file beside it that SQLite or Rungate writes (its WAL, shared
    memory, key file), by file name."""
    return {path.name: path.read_bytes() for path in db_path.parent.iterdir()
            if path.is_file() and path.name.startswith(db_path.name)}


def read_only(db_path: Path) -> sqlite3.Connection:
    """A read-only connection to a database another process (or a running server) writes."""
    return sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)


def route_path(template: str, prefix: str = "id") -> str:
    """A concrete path for a route template: each `{param}` becomes a well-formed id that names nothing."""
    out, rest = [], template
    while "{" in rest:
        before, _, after = rest.partition("{")
        name, _, rest = after.partition("}")
        out.append(f"{before}{prefix}-{name.replace('_', '-')}")
    return "".join(out) + rest
