"""The proxy's read cache (token → agent, provider → key): when it serves, when it must forget, and that
admission never trusts it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from projections import ALL
from rungate.admin import CreateAgent, RotateAgentToken
from rungate.errors import Unauthorized
from rungate.events.catalogue import StepCompleted
from rungate.ids import token_hash
from rungate.readcache import MAX_ENTRIES, ReadCache
from rungate.runs import AdmitCall, CallFacts, SettleStep
from rungate.store import Row, SQLiteEventStore
from tests.conftest import Gateway
from tests.store_helpers import facts, opened

CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}


class FakeStore:
    """Only what the cache asks of a store: the projection's version."""

    def __init__(self) -> None:
        self.version = 0

    def projection_version(self, name: str) -> int:
        return self.version


class Loader:
    def __init__(self, row: Row | None) -> None:
        self.row, self.calls = row, 0

    async def __call__(self) -> Row | None:
        self.calls += 1
        return self.row


async def test_rows_are_served_from_memory_until_the_projection_moves_or_the_ttl_ends() -> None:
    store, now = FakeStore(), [100.0]
    cache = ReadCache(store, "agents", keep_missing=False, ttl_s=1.0, clock=lambda: now[0])  # type: ignore[arg-type]
    load = Loader({"id": "agt_1"})
    assert await cache.get("k", load) == {"id": "agt_1"}
    assert await cache.get("k", load) == {"id": "agt_1"}
    assert load.calls == 1
    store.version += 1  # an agent event was committed
    await cache.get("k", load)
    assert load.calls == 2
    now[0] += 0.5
    await cache.get("k", load)
    assert load.calls == 2
    now[0] += 0.6  # older than the TTL: another process may have written
    await cache.get("k", load)
    assert load.calls == 3


async def test_missing_rows_are_remembered_only_when_asked() -> None:
    store = FakeStore()
    agents = ReadCache(store, "agents", keep_missing=False)  # type: ignore[arg-type]
    keys = ReadCache(store, "agents", keep_missing=True)  # type: ignore[arg-type]
    none_agent, none_key = Loader(None), Loader(None)
    for _ in range(3):
        assert await agents.get("unknown-token", none_agent) is None
        assert await keys.get("openai", none_key) is None
    assert none_agent.calls == 3 and none_key.calls == 1


async def test_a_row_read_while_the_projection_moved_is_not_kept() -> None:
    store = FakeStore()
    cache = ReadCache(store, "agents", keep_missing=True)  # type: ignore[arg-type]
    calls = 0

    async def racing() -> Row | None:
        nonlocal calls
        calls += 1
        store.version += 1  # a write commits while the read is in flight
        return {"id": "old"}

    await cache.get("k", racing)
    await cache.get("k", racing)
    assert calls == 2


async def test_a_flood_of_distinct_keys_does_not_grow_the_cache_without_bound() -> None:
    cache = ReadCache(FakeStore(), "agents", keep_missing=True)  # type: ignore[arg-type]
    for i in range(MAX_ENTRIES + 10):
        await cache.get(i, Loader({"i": i}))
    assert len(cache._entries) <= MAX_ENTRIES


async def test_projection_versions_move_with_the_events_each_projection_folds(tmp_path: Path) -> None:
    async with opened(tmp_path / "v.db") as store:
        await store.execute(CreateAgent("first", {}))  # (the first write after start moves every projection)
        agents0, runs0 = store.projection_version("agents"), store.projection_version("runs")
        create = CreateAgent("v", {})
        await store.execute(create)
        agents1, runs1 = store.projection_version("agents"), store.projection_version("runs")
        assert agents1 > agents0 and runs1 == runs0
        admit = AdmitCall(await facts(store, create.agent_id, run_id="r-v"))
        await store.execute(admit)
        assert store.projection_version("agents") == agents1 and store.projection_version("runs") > runs1
        # another process appends to the same file: at this process's next write every projection moves
        other = SQLiteEventStore(tmp_path / "v.db", projections=ALL)
        await other.start()
        try:
            await other.execute(CreateAgent("from-elsewhere", {}))
        finally:
            await other.close()
        before = store.projection_version("agents")
        await store.execute(SettleStep(admit.step_id, StepCompleted(
            step_id=admit.step_id, run_id="r-v", status="ok", provider="openai", model="gpt-4o-mini", usage={},
            cost_pusd=0, latency_ms=1)))
        assert store.projection_version("agents") > before
        before = store.projection_version("runs")
        await store.rebuild()
        assert store.projection_version("runs") > before


async def test_admission_refuses_a_token_rotated_after_authentication(tmp_path: Path) -> None:
    async with opened(tmp_path / "r.db") as store:
        create = CreateAgent("rotating", {})
        await store.execute(create)
        stale = CallFacts(agent_id=create.agent_id, token_hash=token_hash(create.token), run_id=None,
                          new_run=False, endpoint="chat", provider="openai", model="gpt-4o-mini", stream=False,
                          fingerprint="f", reserved_pusd=0, idle_timeout_s=900)
        await store.execute(RotateAgentToken(create.agent_id))
        events_before = len(await store.read_all())
        with pytest.raises(Unauthorized):
            await store.execute(AdmitCall(stale))
        assert len(await store.read_all()) == events_before  # nothing admitted, nothing recorded


def _cli(db: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rungate", "--database-url", f"sqlite:///{db}", *args],
                          capture_output=True, text=True, input=stdin, timeout=60,
                          env={**os.environ, "RUNGATE_LOG_LEVEL": "warning"})


async def _chat(gateway: Gateway, token: str) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as http, http.post(
            gateway.url + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {token}"}) as resp:
        await resp.read()
        return resp


async def test_changes_made_by_the_cli_beside_a_running_server_are_seen(gateway: Gateway) -> None:
    token = await gateway.new_agent("cached")
    assert (await _chat(gateway, token)).status == 200
    assert gateway.upstream_requests[-1]["headers"]["authorization"].endswith("sk-upstream-openai-0001")
    # an agent created by another process works at once (unknown tokens are never cached)
    created = await asyncio.to_thread(_cli, gateway.db_path, "agents", "create", "from-cli")
    assert created.returncode == 0, created.stderr
    cli_token = json.loads(created.stdout)["token"]
    assert (await _chat(gateway, cli_token)).status == 200
    # a provider key added by another process replaces the environment's within the cache's second
    added = await asyncio.to_thread(_cli, gateway.db_path, "keys", "add", "openai", "cli-key",
                                    stdin="sk-from-the-cli-0002\n")
    assert added.returncode == 0, added.stderr
    seen: list[Any] = []
    for _ in range(30):
        assert (await _chat(gateway, token)).status == 200
        seen.append(gateway.upstream_requests[-1]["headers"]["authorization"])
        if seen[-1].endswith("sk-from-the-cli-0002"):
            break
        await asyncio.sleep(0.1)
    assert seen[-1] == "Bearer sk-from-the-cli-0002"
