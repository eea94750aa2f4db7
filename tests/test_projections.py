"""Projections: given these events, then these rows; and a rebuild from the log gives the same rows."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rungate.admin import AddProviderKey, CreateAgent, RemoveProviderKey, RotateAgentToken, UpdateAgent
from rungate.enforce.policy import parse_document
from rungate.errors import Conflict, GovernanceRefusal, NotFound, Unauthorized
from rungate.events import NewEvent, Recorded
from rungate.events.catalogue import BudgetAlerted, RunStarted, StepStarted, ToolStepLogged
from rungate.ids import new_id, token_hash
from rungate.policy_admin import ApplyPolicy, DeletePolicy
from rungate.runs import AdmitCall, CloseIdleRun, CompleteRun, LogToolStep, ResumeRun, StopRun
from rungate.store import Append, SQLiteEventStore
from tests.store_helpers import all_events, facts, opened, run_cli, settle, snapshot, snapshot_file

# --- invariants every state of the runs projection must satisfy -------------------------------------

INVARIANT_QUERIES = {
    "step_count": "SELECT r.id FROM runs r WHERE r.step_count != (SELECT count(*) FROM steps s WHERE s.run_id = r.id)",
    "reserved": "SELECT r.id FROM runs r WHERE r.reserved_pusd !="
                " (SELECT coalesce(sum(s.reserved_pusd), 0) FROM steps s WHERE s.run_id = r.id)",
    "spend": "SELECT r.id FROM runs r WHERE r.spend_pusd !="
             " (SELECT coalesce(sum(s.cost_pusd), 0) FROM steps s WHERE s.run_id = r.id)",
    "tokens": "SELECT r.id FROM runs r WHERE r.tokens_input != (SELECT coalesce(sum(s.tokens_input), 0)"
              " FROM steps s WHERE s.run_id = r.id) OR r.tokens_output != (SELECT coalesce(sum(s.tokens_output), 0)"
              " FROM steps s WHERE s.run_id = r.id)",
    "unpriced": "SELECT r.id FROM runs r WHERE r.unpriced_steps !="
                " (SELECT coalesce(sum(s.unpriced), 0) FROM steps s WHERE s.run_id = r.id)",
    "seq": "SELECT r.id FROM runs r WHERE (SELECT group_concat(s.seq) FROM (SELECT seq FROM steps"
           " WHERE run_id = r.id ORDER BY seq) s) IS NOT (SELECT group_concat(n) FROM (WITH RECURSIVE c(n) AS"
           " (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < r.step_count) SELECT n FROM c WHERE r.step_count > 0))",
    "settled_reservations": "SELECT id FROM steps WHERE status != 'started' AND reserved_pusd != 0",
    "one_auto_run": "SELECT agent_id FROM runs WHERE auto = 1 AND status = 'active' GROUP BY agent_id"
                    " HAVING count(*) > 1",
    "orphan_steps": "SELECT id FROM steps WHERE run_id NOT IN (SELECT id FROM runs)",
}


async def assert_invariants(store: SQLiteEventStore) -> None:
    broken = {name: await store.fetch(sql) for name, sql in INVARIANT_QUERIES.items()}
    assert {name: rows for name, rows in broken.items() if rows} == {}
    await assert_known_rows_are_true(store)


async def assert_known_rows_are_true(store: SQLiteEventStore) -> None:
    """Every row image the writer would answer a look-up with equals the row itself."""
    known = store._batches.known_rows()
    for (table, row_id), image in known.items():
        row = await store.fetchone(f"SELECT {', '.join(image)} FROM {table} WHERE id = ?", (row_id,))
        assert row == image, (table, row_id)


# --- a realistic log driven through the real commands ---------------------------------------------------


def _usage(rng: random.Random) -> dict[str, int]:
    usage = {"input": rng.randint(0, 4000), "output": rng.randint(0, 1500)}
    if rng.random() < 0.3:
        usage["cached"] = rng.randint(0, 2000)
    if rng.random() < 0.1:
        usage["cache_write"] = rng.randint(0, 500)
    if rng.random() < 0.2:
        usage["reasoning"] = rng.randint(0, 800)
    return usage


async def drive_realistic_log(store: SQLiteEventStore, seed: int = 7, rounds: int = 60, per_round: int = 80) -> None:
    """Agents, provider keys, auto and explicit runs, settled and open steps, tool steps, completed runs."""
    rng = random.Random(seed)
    creates = [CreateAgent(f"agent-{i}", {"team": f"t{i % 3}"}) for i in range(12)]
    await asyncio.gather(*(store.execute(c) for c in creates))
    agents = [c.agent_id for c in creates]
    keys = [AddProviderKey(f"key-{i}", ("openai", "anthropic")[i % 2], f"nonce{i}", f"cipher{i}", f"…{i:04d}",
                           new_id("pk")) for i in range(4)]
    await asyncio.gather(*(store.execute(k) for k in keys))
    await store.execute(RemoveProviderKey(keys[1].key_id))
    await store.execute(RotateAgentToken(agents[0]))
    await store.execute(UpdateAgent(agents[1], "agent-1-renamed", None, {"team": "moved"}))
    # a policy with every counter folded inline (rate windows, alerts), limits too high to refuse anything
    await store.execute(ApplyPolicy(parse_document({
        "name": "counted", "budget": {"hard_limit_usd": "1000000", "alerts": [0.5]},
        "rate_limits": {"agent": {"requests_per_minute": 10**9}, "run": {"tokens_per_minute": 10**12}}})))
    for agent in agents[3:6]:
        await store.execute(UpdateAgent(agent, None, None, None, set_policy=True, policy_name="counted"))

    open_runs: dict[str, list[str]] = {a: [] for a in agents}  # explicit runs each agent may still use
    pending: list[tuple[str, str]] = []  # (run_id, step_id) admitted, not settled yet
    for _ in range(rounds):
        commands: list[Any] = []
        for _ in range(per_round):
            roll = rng.random()
            agent = rng.choice(agents)
            if roll < 0.40:
                if rng.random() < 0.5 or not open_runs[agent]:
                    commands.append(AdmitCall(await facts(store, agent, new_run=rng.random() < 0.04,
                                                    reserved_pusd=rng.choice((0, 10**6, 5 * 10**7)))))
                else:
                    commands.append(AdmitCall(await facts(store, agent, run_id=rng.choice(open_runs[agent]),
                                                    reserved_pusd=rng.randint(0, 10**8))))
            elif roll < 0.45:
                run_id = f"job-{new_id('x')}"
                open_runs[agent].append(run_id)
                call = await facts(store, agent, run_id=run_id, reserved_pusd=rng.randint(0, 10**8))
                commands.append(AdmitCall(call))
            elif roll < 0.85 and pending:
                run_id, step_id = pending.pop(rng.randrange(len(pending)))
                unpriced = rng.random() < 0.1
                commands.append(settle(run_id, step_id, usage=_usage(rng),
                                       cost_pusd=None if unpriced else rng.randint(0, 10**9), unpriced=unpriced,
                                       status=rng.choice(("ok", "ok", "ok", "error")),
                                       estimated=rng.random() < 0.05))
            elif roll < 0.95 and open_runs[agent]:
                run_id = rng.choice(open_runs[agent])
                commands.append(LogToolStep(agent, run_id, ToolStepLogged(
                    step_id=new_id("stp"), run_id=run_id, tool=rng.choice(("search", "sql", "http")),
                    status=rng.choice(("ok", "error")), usage={"input": rng.randint(0, 50)},
                    cost_pusd=rng.choice((None, rng.randint(0, 10**6))), latency_ms=rng.randint(1, 900))))
            elif open_runs[agent]:
                run_id = open_runs[agent].pop(rng.randrange(len(open_runs[agent])))
                commands.append(CompleteRun(agent, run_id, "agent_done", {"round": rng.randint(0, 9)}))
        outcomes = await asyncio.gather(*(store.execute(c) for c in commands), return_exceptions=True)
        for command, outcome in zip(commands, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                # only a call into a run completed earlier in the same batch may be refused
                assert isinstance(outcome, Conflict) and outcome.code == "run_closed", outcome
                assert isinstance(command, AdmitCall | LogToolStep)
            elif isinstance(command, AdmitCall):
                pending.append((command.run_id, command.step_id))
    await store.execute(UpdateAgent(agents[2], None, True, None))


async def test_rebuild_of_a_realistic_log_gives_identical_projections(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        # given several thousand events written by the real commands
        await drive_realistic_log(store)
        log = await all_events(store)
        before = await snapshot(store)
        await assert_invariants(store)
        # when every projection is dropped and replayed from the log
        replayed = await store.rebuild()
        after = await snapshot(store)
        report = await store.verify()

    # then the rows (and the projection schema) are identical
    assert len(log) > 3000
    assert replayed == len(log)
    assert report.ok
    assert after == before
    # and the log exercised every kind of row worth comparing
    assert len(before["agents"]) == 12 and len(before["provider_keys"]) == 3
    statuses = {(row[2], row[3]) for row in before["runs"]}  # (status, auto)
    assert {("active", 1), ("completed", 1), ("active", 0), ("completed", 0)} <= statuses
    kinds = {(row[3], row[9]) for row in before["steps"]}  # (kind, status)
    assert {("llm", "started"), ("llm", "ok"), ("llm", "error"), ("tool", "ok")} <= kinds
    assert len(before["rate_buckets"]) > 0 and len(before["agent_spend"]) > 0 and len(before["policies"]) == 1
    step_columns = [row[1] for row in sqlite3.connect(tmp_path / "log.db").execute("PRAGMA table_info(steps)")]
    cost, unpriced = step_columns.index("cost_pusd"), step_columns.index("unpriced")
    assert any(row[cost] is None and row[unpriced] == 1 for row in before["steps"])  # an unpriced step


async def test_cli_rebuild_gives_identical_projections(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    # given a closed log with its live projections
    async with opened(path) as store:
        await drive_realistic_log(store, seed=11, rounds=12, per_round=60)
        count = len(await all_events(store))
    before = snapshot_file(path)
    # when `rungate rebuild` runs on it
    result = run_cli(path, "rebuild")
    # then it reports the events replayed and the rows are unchanged
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"rebuilt projections from {count} events"
    assert snapshot_file(path) == before
    assert len(before["steps"]) > 100


# --- given these events, then these rows --------------------------------------------------------------


async def _agent(store: SQLiteEventStore, name: str = "agent") -> str:
    create = CreateAgent(name, {"k": "v"})
    await store.execute(create)
    return create.agent_id


async def _run(store: SQLiteEventStore, run_id: str) -> dict[str, Any]:
    row = await store.fetchone("SELECT * FROM runs WHERE id = ?", (run_id,))
    assert row is not None
    return row


async def _step(store: SQLiteEventStore, step_id: str) -> dict[str, Any]:
    row = await store.fetchone("SELECT * FROM steps WHERE id = ?", (step_id,))
    assert row is not None
    return row


async def test_an_admitted_call_reserves_and_its_settlement_releases_and_charges(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        agent = await _agent(store)
        # given two calls admitted into a new explicit run, both with reservations
        first = AdmitCall(await facts(store, agent, run_id="job-1", reserved_pusd=700, stream=True))
        second = AdmitCall(await facts(store, agent, run_id="job-1", reserved_pusd=300))
        started = await store.execute(first)
        await store.execute(second)
        run_open = await _run(store, "job-1")
        step_open = await _step(store, first.step_id)
        # when the first settles with full usage and the second without a price
        done = await store.execute(settle("job-1", first.step_id, cost_pusd=12_345, usage={
            "input": 100, "cached": 40, "cache_write": 10, "cache_write_1h": 5, "output": 60, "reasoning": 20}))
        await store.execute(settle("job-1", second.step_id, usage={"input": 7, "output": 3}, cost_pusd=None,
                                   unpriced=True))
        run = await _run(store, "job-1")
        step = await _step(store, first.step_id)
        unpriced = await _step(store, second.step_id)
        await assert_invariants(store)

    # then while open, the run holds both reservations; after settlement they are back to 0
    assert [e.type for e in started] == ["RunStarted", "StepStarted"] and first.started_run
    assert not second.started_run and first.run_id == second.run_id == "job-1"
    assert (run_open["status"], run_open["auto"], run_open["step_count"], run_open["reserved_pusd"]) == (
        "active", 0, 2, 1000)
    assert (step_open["status"], step_open["seq"], step_open["reserved_pusd"], step_open["stream"]) == (
        "started", 1, 700, 1)
    assert step_open["ended_at"] is None
    assert run["reserved_pusd"] == 0 and run["step_count"] == 2
    assert run["tokens_input"] == 155 + 7 and run["tokens_output"] == 63
    assert run["spend_pusd"] == 12_345 and run["unpriced_steps"] == 1
    assert run["last_activity_at"] >= done[0].recorded_at
    assert (step["status"], step["http_status"], step["reserved_pusd"], step["cost_pusd"]) == ("ok", 200, 0, 12_345)
    assert (step["tokens_input"], step["tokens_output"], step["tokens_cached"], step["tokens_cache_write"],
            step["tokens_reasoning"]) == (155, 60, 40, 15, 20)
    assert step["ended_at"] == done[0].recorded_at and step["latency_ms"] == 12
    assert (unpriced["seq"], unpriced["cost_pusd"], unpriced["unpriced"], unpriced["reserved_pusd"]) == (2, None, 1, 0)


async def test_tool_steps_number_after_llm_steps_and_add_their_cost(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        agent = await _agent(store)
        # given a tool step logged before any call (it starts the run), then a call, then another tool step
        tool = ToolStepLogged(step_id="stp_tool1", run_id="job-t", tool="search", status="ok",
                              usage={"input": 5, "output": 6}, cost_pusd=900, latency_ms=33, args={"q": "x"})
        first = await store.execute(LogToolStep(agent, "job-t", tool))
        admit = AdmitCall(await facts(store, agent, run_id="job-t"))
        await store.execute(admit)
        await store.execute(LogToolStep(agent, "job-t", ToolStepLogged(
            step_id="stp_tool2", run_id="job-t", tool="sql", status="error", error="timeout", cost_pusd=None)))
        run = await _run(store, "job-t")
        steps = await store.fetch("SELECT id, seq, kind, tool, status, cost_pusd, error FROM steps ORDER BY seq")

    # then the run was started by the tool step, seq counts every step, and only priced tools add spend
    assert [e.type for e in first] == ["RunStarted", "ToolStepLogged"]
    assert (run["auto"], run["step_count"], run["spend_pusd"], run["tokens_input"], run["tokens_output"]) == (
        0, 3, 900, 5, 6)
    assert steps == [
        {"id": "stp_tool1", "seq": 1, "kind": "tool", "tool": "search", "status": "ok", "cost_pusd": 900,
         "error": None},
        {"id": admit.step_id, "seq": 2, "kind": "llm", "tool": None, "status": "started", "cost_pusd": None,
         "error": None},
        {"id": "stp_tool2", "seq": 3, "kind": "tool", "tool": "sql", "status": "error", "cost_pusd": None,
         "error": "timeout"},
    ]


async def test_a_completed_run_is_closed_and_refuses_more_calls(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        agent = await _agent(store)
        await store.execute(AdmitCall(await facts(store, agent, run_id="job-c")))
        # given the agent completes its run
        done = await store.execute(CompleteRun(agent, "job-c", "agent_done", {"outcome": "refunded"}))
        again = await store.execute(CompleteRun(agent, "job-c", "other", {}))
        run = await _run(store, "job-c")
        count = len(await all_events(store))
        # when it calls into it or logs a tool step there
        with pytest.raises(Conflict) as call_refused:
            await store.execute(AdmitCall(await facts(store, agent, run_id="job-c")))
        with pytest.raises(Conflict) as tool_refused:
            await store.execute(LogToolStep(agent, "job-c", ToolStepLogged(
                step_id="stp_late", run_id="job-c", tool="x", status="ok")))
        log = await all_events(store)
        after = len(log)

    # then the run shows completed with its reason and metadata, a second completion changes nothing,
    # and calls into it are refused with run_closed: each refusal is recorded on the run's stream, its audit trail
    assert [e.type for e in done] == ["RunCompleted"] and again == []
    assert (run["status"], run["ended_reason"], run["ended_at"], run["metadata"]) == (
        "completed", "agent_done", done[0].recorded_at, '{"outcome":"refunded"}')
    assert call_refused.value.code == "run_closed" and call_refused.value.extra == {
        "run_id": "job-c", "status": "completed"}
    assert tool_refused.value.code == "run_closed"
    assert after == count + 2
    assert [(e.type, e.stream, e.data["code"], e.data["endpoint"]) for e in log[-2:]] == [
        ("CallRefused", "run-job-c", "run_closed", "chat"),
        ("CallRefused", "run-job-c", "run_closed", "steps")]


async def test_an_explicit_run_of_another_agent_is_refused(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        owner, intruder = await _agent(store, "owner"), await _agent(store, "intruder")
        # given a run that belongs to another agent
        await store.execute(AdmitCall(await facts(store, owner, run_id="job-o")))
        count = len(await all_events(store))
        # when the intruder calls into it, logs into it, or completes it
        with pytest.raises(Conflict) as admit_refused:
            await store.execute(AdmitCall(await facts(store, intruder, run_id="job-o")))
        with pytest.raises(Conflict) as tool_refused:
            await store.execute(LogToolStep(intruder, "job-o", ToolStepLogged(
                step_id="stp_i", run_id="job-o", tool="x", status="ok")))
        with pytest.raises(NotFound):
            await store.execute(CompleteRun(intruder, "job-o", "hijack", {}))
        run = await _run(store, "job-o")
        log = await all_events(store)

    # then every attempt is refused as unavailable; the refused call and step are recorded on the intruder's stream
    assert admit_refused.value.code == "run_unavailable" and tool_refused.value.code == "run_unavailable"
    assert (run["agent_id"], run["status"], run["step_count"]) == (owner, "active", 1)
    assert len(log) == count + 2
    assert all(e.type == "CallRefused" and e.stream == f"agent-{intruder}" for e in log[-2:])


async def test_unknown_and_disabled_agents_are_refused_and_only_the_refusal_is_recorded(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        agent = await _agent(store)
        await store.execute(UpdateAgent(agent, None, True, None))
        count = len(await all_events(store))
        with pytest.raises(Unauthorized):
            await store.execute(AdmitCall(await facts(store, "agt_nobody")))
        with pytest.raises(GovernanceRefusal) as refused:
            await store.execute(AdmitCall(await facts(store, agent)))
        runs = await store.fetch("SELECT * FROM runs")
        log = await all_events(store)
    assert refused.value.code == "agent_disabled" and refused.value.status == 403
    assert runs == [] and len(log) == count + 1
    assert (log[-1].type, log[-1].data["code"], log[-1].data["status"]) == ("CallRefused", "agent_disabled", 403)


async def test_auto_runs_group_calls_and_new_run_supersedes(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        agent = await _agent(store)
        # given two calls without a run id, then one asking for a new run
        one, two = AdmitCall(await facts(store, agent)), AdmitCall(await facts(store, agent))
        fresh = AdmitCall(await facts(store, agent, new_run=True))
        await store.execute(one)
        await store.execute(two)
        events = await store.execute(fresh)
        old, new = await _run(store, one.run_id), await _run(store, fresh.run_id)

    # then the first two share an auto-run; the third closes it (new_run) and opens another
    assert one.run_id == two.run_id and one.started_run and not two.started_run
    assert [e.type for e in events] == ["RunCompleted", "RunStarted", "StepStarted"]
    assert events[0].data["run_id"] == one.run_id
    assert (old["status"], old["ended_reason"], old["auto"], old["step_count"]) == ("completed", "new_run", 1, 2)
    assert (new["status"], new["auto"], new["step_count"]) == ("active", 1, 1)
    assert fresh.run_id != one.run_id


async def test_an_idle_auto_run_is_closed_by_the_next_call(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        agent = await _agent(store)
        # given an auto-run whose only call has settled
        first = AdmitCall(await facts(store, agent, idle_timeout_s=1, reserved_pusd=50))
        await store.execute(first)
        await store.execute(settle(first.run_id, first.step_id, usage={"input": 1, "output": 1}, cost_pusd=5))
        # when the next call comes after the idle window (the decision reads the store's clock)
        await asyncio.sleep(1.1)
        late = AdmitCall(await facts(store, agent, idle_timeout_s=1))
        events = await store.execute(late)
        soon = AdmitCall(await facts(store, agent, idle_timeout_s=1))
        soon_events = await store.execute(soon)
        old, new = await _run(store, first.run_id), await _run(store, late.run_id)

    # then the old run is completed as idle_timeout and the call starts (and the next one joins) a new run
    assert [e.type for e in events] == ["RunCompleted", "RunStarted", "StepStarted"]
    assert events[0].data == {"run_id": first.run_id, "status": "completed", "ended_reason": "idle_timeout",
                              "metadata": {}}
    assert (old["status"], old["ended_reason"], old["ended_at"], old["spend_pusd"], old["reserved_pusd"]) == (
        "completed", "idle_timeout", events[0].recorded_at, 5, 0)
    assert late.run_id != first.run_id and late.started_run
    assert [e.type for e in soon_events] == ["StepStarted"] and soon.run_id == late.run_id
    assert (new["status"], new["step_count"]) == ("active", 2)


async def test_an_auto_run_with_a_call_in_flight_is_not_closed_as_idle(tmp_path: Path) -> None:
    """`CloseIdleRun` never closes a run holding a reservation; the idle close inside `AdmitCall` should agree."""
    async with opened(tmp_path / "log.db") as store:
        agent = await _agent(store)
        # given an auto-run whose call is still streaming (reservation held) past the idle window
        slow = AdmitCall(await facts(store, agent, idle_timeout_s=1, reserved_pusd=10**9))
        await store.execute(slow)
        await asyncio.sleep(1.1)
        swept = await store.execute(CloseIdleRun(slow.run_id, 1))
        # when the agent's next call arrives
        nxt = AdmitCall(await facts(store, agent, idle_timeout_s=1))
        await store.execute(nxt)
        run = await _run(store, slow.run_id)

    # then the sweeper left the run open, and so does the next call: it joins the run instead
    assert swept == []
    assert run["status"] == "active", (run["status"], run["ended_reason"], run["reserved_pusd"])
    assert nxt.run_id == slow.run_id


async def test_the_idle_sweeper_closes_only_settled_idle_auto_runs(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        agent = await _agent(store)
        admit = AdmitCall(await facts(store, agent, reserved_pusd=80))
        await store.execute(admit)
        # given an idle auto-run still holding a reservation, then the same run settled
        await asyncio.sleep(1.1)
        held = await store.execute(CloseIdleRun(admit.run_id, 1))
        await store.execute(settle(admit.run_id, admit.step_id, cost_pusd=1))
        fresh = await store.execute(CloseIdleRun(admit.run_id, 1))  # settlement is fresh activity
        await asyncio.sleep(1.1)
        closed = await store.execute(CloseIdleRun(admit.run_id, 1))
        twice = await store.execute(CloseIdleRun(admit.run_id, 1))
        run = await _run(store, admit.run_id)
    assert held == [] and fresh == [] and twice == []
    assert [e.type for e in closed] == ["RunCompleted"]
    assert (run["status"], run["ended_reason"]) == ("completed", "idle_timeout")


async def test_agent_and_provider_key_events_fold_into_their_rows(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        # given an agent created, rotated, renamed, disabled; and keys added and removed
        create = CreateAgent("alpha", {"team": "a"})
        created = await store.execute(create)
        rotate = RotateAgentToken(create.agent_id)
        rotated = await store.execute(rotate)
        updated = await store.execute(UpdateAgent(create.agent_id, "beta", True, {"team": "b"}))
        other = CreateAgent("gamma", {})
        await store.execute(other)
        with pytest.raises(Conflict) as taken:
            await store.execute(UpdateAgent(other.agent_id, "beta", None, None))
        with pytest.raises(Conflict):
            await store.execute(CreateAgent("beta", {}))
        kept, gone = new_id("pk"), new_id("pk")
        await store.execute(AddProviderKey("main", "openai", "n1", "c1", "…abcd", kept))
        await store.execute(AddProviderKey("spare", "anthropic", "n2", "c2", "…wxyz", gone))
        with pytest.raises(Conflict):
            await store.execute(AddProviderKey("main", "openai", "n3", "c3", "…0000", new_id("pk")))
        await store.execute(RemoveProviderKey(gone))
        with pytest.raises(NotFound):
            await store.execute(RemoveProviderKey(gone))
        agent = await store.fetchone("SELECT * FROM agents WHERE id = ?", (create.agent_id,))
        keys = await store.fetch("SELECT id, name, provider, nonce, ciphertext, hint FROM provider_keys")

    # then the agent row carries the latest token, name, flag and metadata; only the kept key remains
    assert taken.value.code == "name_taken"
    assert agent == {
        "id": create.agent_id, "name": "beta", "token_hash": token_hash(rotate.token), "disabled": 1,
        "metadata": '{"team":"b"}', "policy_id": None, "created_at": created[0].recorded_at,
        "updated_at": updated[0].recorded_at,
        "position": updated[0].position}
    assert rotated[0].data["token_hash"] != created[0].data["token_hash"]
    assert keys == [{"id": kept, "name": "main", "provider": "openai", "nonce": "n1", "ciphertext": "c1",
                     "hint": "…abcd"}]


# --- property: any sequence of commands keeps the invariants and rebuilds identically -----------------

OPERATIONS = st.lists(st.tuples(st.sampled_from(("auto", "new_run", "explicit", "settle", "tool", "complete")),
                                st.integers(0, 2), st.integers(0, 10**6), st.booleans()),
                      min_size=1, max_size=40)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPERATIONS)
def test_any_command_sequence_keeps_invariants_and_rebuilds_identically(ops: list[tuple[str, int, int, bool]]) -> None:
    async def scenario(path: Path) -> None:
        async with opened(path) as store:
            agents = [await _agent(store, f"agent-{i}") for i in range(3)]
            pending: list[tuple[str, str]] = []
            commands: list[Any] = []
            for kind, who, amount, flag in ops:
                agent = agents[who]
                explicit = f"job-{who}-{int(flag)}"
                if kind in ("auto", "new_run", "explicit"):
                    commands.append(AdmitCall(await facts(store, agent, run_id=explicit if kind == "explicit" else None,
                                                    new_run=kind == "new_run", reserved_pusd=amount)))
                elif kind == "settle" and pending:
                    run_id, step_id = pending.pop(amount % len(pending))
                    commands.append(settle(run_id, step_id, usage={"input": amount % 997, "output": amount % 13},
                                           cost_pusd=None if flag else amount, unpriced=flag))
                elif kind == "tool":
                    commands.append(LogToolStep(agent, explicit, ToolStepLogged(
                        step_id=new_id("stp"), run_id=explicit, tool="t", status="ok",
                        usage={"input": amount % 50}, cost_pusd=amount if flag else None)))
                elif kind == "complete":
                    commands.append(CompleteRun(agent, explicit, "done", {}))
                if len(commands) >= 5 or kind == "complete":  # several batches of concurrent commands
                    outcomes = await asyncio.gather(*(store.execute(c) for c in commands), return_exceptions=True)
                    await assert_known_rows_are_true(store)
                    for command, outcome in zip(commands, outcomes, strict=True):
                        if isinstance(command, AdmitCall) and not isinstance(outcome, BaseException):
                            pending.append((command.run_id, command.step_id))
                        elif isinstance(outcome, BaseException):
                            assert isinstance(outcome, Conflict | NotFound), outcome
                    commands = []
            for command in commands:
                try:
                    await store.execute(command)
                except (Conflict, NotFound):
                    pass
            await assert_invariants(store)
            before = await snapshot(store)
            assert await store.rebuild() == len(await all_events(store))
            assert await snapshot(store) == before
            assert (await store.verify()).ok

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(scenario(Path(directory) / "log.db"))


# --- governance events ------------------------------------------------------------------------------


async def test_policy_events_fold_into_the_current_version_and_every_version(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        # given a policy created, changed, re-applied unchanged, renamed, then deleted
        first = ApplyPolicy(parse_document({"name": "p", "runaway": {"max_steps": 3}}))
        created = await store.execute(first)
        assert first.outcome == "created" and first.version == 1
        changed = ApplyPolicy(parse_document({"name": "p", "runaway": {"max_steps": 4}}))
        await store.execute(changed)
        same = ApplyPolicy(parse_document({"name": "p", "runaway": {"max_steps": 4}}))
        assert await store.execute(same) == [] and same.outcome == "unchanged"
        assert first.policy_id is not None
        renamed = ApplyPolicy(parse_document({"name": "q", "runaway": {"max_steps": 4}}), policy_id=first.policy_id)
        await store.execute(renamed)
        await store.execute(DeletePolicy(first.policy_id))
        current = await store.fetchone("SELECT id, name, version, deleted FROM policies WHERE id = ?",
                                       (first.policy_id,))
        versions = await store.fetch("SELECT version, name, document FROM policy_versions WHERE policy_id = ?"
                                     " ORDER BY version", (first.policy_id,))
    # then the current row is version 3 under its new name, retired; all three versions are kept
    assert current == {"id": first.policy_id, "name": "q", "version": 3, "deleted": 1}
    assert [(v["version"], v["name"]) for v in versions] == [(1, "p"), (2, "p"), (3, "q")]
    assert '"max_steps":3' in versions[0]["document"] and created[0].type == "PolicyVersionCreated"


async def test_stop_resume_alert_and_spend_events_fold_into_the_run(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        # given a run with a settled step, alerted, stopped, resumed with a top-up, and a logged tool cost
        agent = await _agent(store)
        admit = AdmitCall(await facts(store, agent, run_id="gov-run", reserved_pusd=500))
        await store.execute(admit)
        await store.execute(settle("gov-run", admit.step_id, usage={"input": 3, "output": 2}, cost_pusd=400))
        await store.execute(Append((NewEvent("run-gov-run", BudgetAlerted(run_id="gov-run", threshold=0.5,
                                                                          spend_pusd=400, limit_pusd=700)),)))
        await store.execute(StopRun("gov-run", "too much"))
        stopped = await _run(store, "gov-run")
        await store.execute(ResumeRun("gov-run", add_pusd=250))
        step = ToolStepLogged(step_id=new_id("stp"), run_id="gov-run", tool="search", status="ok", cost_pusd=60)
        await store.execute(LogToolStep(agent, "gov-run", step))
        run = await _run(store, "gov-run")
        spend = await store.fetch("SELECT minute, spend_pusd FROM agent_spend WHERE agent_id = ?", (agent,))
    # then the run shows each change, and the agent's spend per minute adds up to the run's
    assert stopped["status"] == "stopped" and stopped["ended_reason"] == "too much"
    assert run["status"] == "active" and run["ended_reason"] is None and run["budget_add_pusd"] == 250
    assert run["budget_alert_level"] == 0.5 and run["spend_pusd"] == 460 and run["reserved_pusd"] == 0
    assert sum(row["spend_pusd"] for row in spend) == 460


def _fold_at(conn: sqlite3.Connection, projection: Any, position: int, at: str, event: Any, stream: str) -> None:
    """Fold one event recorded at `at` (a time the test chooses) into `projection`'s tables on `conn`."""
    rec = Recorded(position, f"evt{position}", stream, position, event.type_name(), event.schema_version,
                   event.payload(), {}, at, "", "")
    for sql, params in projection.handle(rec):
        conn.execute(sql, params)


def test_rate_buckets_count_each_scope_per_second_and_drop_old_seconds_once_a_minute() -> None:
    from projections.runs import RunsProjection

    projection = RunsProjection()
    conn = sqlite3.connect(":memory:")
    for ddl in projection.ddl:
        conn.execute(ddl)

    def started(position: int, at: str, scopes: list[str], tokens: int) -> None:
        event = StepStarted(step_id=f"stp{position}", run_id="r1", kind="llm", endpoint="chat", provider="openai",
                            model="m", stream=False, fingerprint="f", reserved_tokens=tokens, rate_scopes=scopes)
        _fold_at(conn, projection, position, at, event, "run-r1")

    _fold_at(conn, projection, 1, "2026-11-27T10:00:00.000000Z", RunStarted(run_id="r1", agent_id="a", auto=False),
             "run-r1")
    # given calls in two scopes: two in one second, one a second later, one with no rate limit at all
    started(2, "2026-11-27T10:00:01.100000Z", ["agent:a", "run:r1"], 100)
    started(3, "2026-11-27T10:00:01.900000Z", ["agent:a", "run:r1"], 50)
    started(4, "2026-11-27T10:00:02.000000Z", ["agent:a"], 7)
    started(5, "2026-11-27T10:00:02.500000Z", [], 1000)
    before = conn.execute("SELECT scope, second, requests, tokens FROM rate_buckets ORDER BY scope, second").fetchall()
    # when a call lands exactly on a minute, 11 minutes later
    started(6, "2026-11-27T10:11:00.000000Z", ["agent:a"], 1)
    after = conn.execute("SELECT scope, second, requests, tokens FROM rate_buckets ORDER BY scope, second").fetchall()

    # then each (scope, second) counts its requests and reserved tokens; an unlimited call counts nowhere
    base = 1795773601  # 2026-11-27T10:00:01Z
    assert before == [("agent:a", base, 2, 150), ("agent:a", base + 1, 1, 7), ("run:r1", base, 2, 150)]
    # and at the top of a minute, that scope's seconds older than ten minutes are gone (other scopes wait
    # for their own next call on a minute)
    assert after == [("agent:a", base + 659, 1, 1), ("run:r1", base, 2, 150)]


def test_a_step_keeps_its_request_fingerprint_in_the_repeat_index_only_under_a_policy() -> None:
    from projections.runs import RunsProjection

    projection = RunsProjection()
    conn = sqlite3.connect(":memory:")
    for ddl in projection.ddl:
        conn.execute(ddl)
    _fold_at(conn, projection, 1, "2026-11-27T10:00:00.000000Z", RunStarted(run_id="r1", agent_id="a", auto=False),
             "run-r1")
    ref = {"id": "pol_1", "name": "p", "version": 1}
    # given one step admitted under no policy and one under a policy, with the same request
    for position, policy in ((2, None), (3, ref)):
        _fold_at(conn, projection, position, "2026-11-27T10:00:01.000000Z", StepStarted(
            step_id=f"stp{position}", run_id="r1", kind="llm", endpoint="chat", provider="openai", model="m",
            stream=False, fingerprint="f" * 64, policy=policy), "run-r1")
    rows = conn.execute("SELECT id, fingerprint FROM steps ORDER BY id").fetchall()
    # then only the policy's step can be counted as a repeat (no policy counts them for the other)
    assert rows == [("stp2", None), ("stp3", "f" * 64)]
