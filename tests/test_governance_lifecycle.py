"""Governance over a run's life, at the store: a policy's idle window, the sweeper's settlements raising
budget alerts, alerts on every cap, refusals of stopped runs and disabled agents naming the policy, atomic
agent updates.

Real SQLite files and the real commands the proxy, the API and the sweeper execute.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from rungate import queries
from rungate.admin import CreateAgent, UpdateAgent
from rungate.clock import now_iso
from rungate.enforce import policy as policy_module
from rungate.errors import GovernanceRefusal, NotFound
from rungate.events.catalogue import StepCompleted, ToolStepLogged
from rungate.ids import new_id
from rungate.policy_admin import apply_policy
from rungate.runs import AdmitCall, CloseIdleRun, CompleteRun, LogToolStep, ResumeRun, SettleStep, StopRun
from rungate.store import SQLiteEventStore
from tests.store_helpers import facts, opened

USD = 10**12  # picodollars


async def _agent(store: SQLiteEventStore, name: str, policy: str | None = None) -> str:
    create = CreateAgent(name, {}, policy_name=policy)
    await store.execute(create)
    return create.agent_id


async def _row(store: SQLiteEventStore, table: str, ident: str) -> dict[str, Any]:
    row = await store.fetchone(f"SELECT * FROM {table} WHERE id = ?", (ident,))
    assert row is not None
    return row


async def test_a_policys_idle_window_closes_its_auto_runs_and_no_others(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        await apply_policy(store, {"name": "brief", "runs": {"idle_timeout_s": 1}})
        # given two agents calling without run ids, one under a policy with a 1 s idle window, one without
        brief = await _agent(store, "brief-agent", policy="brief")
        plain = await _agent(store, "plain-agent")
        first = AdmitCall(await facts(store, brief))
        other = AdmitCall(await facts(store, plain))
        for admit in (first, other):
            await store.execute(admit)
            await store.execute(SettleStep(admit.step_id, charge_reservation=False))
        await asyncio.sleep(1.2)
        # when the sweeper looks for idle runs (the server's own window being 15 minutes) and closes them
        idle = await queries.idle_auto_runs(store, now_iso(), 900)
        closed = [await store.execute(CloseIdleRun(run_id, 900)) for run_id in idle]
        brief_run, plain_run = await _row(store, "runs", first.run_id), await _row(store, "runs", other.run_id)
        # and, as after a restart (nothing compiled yet), the agent under the policy calls again
        policy_module._COMPILED.clear()
        again = AdmitCall(await facts(store, brief))
        await store.execute(again)

    # then only the run under the policy was idle: it closed as idle_timeout, the other stays active
    assert idle == [first.run_id]
    assert [[e.type for e in events] for events in closed] == [["RunCompleted"]]
    assert (brief_run["status"], brief_run["ended_reason"], brief_run["idle_timeout_s"]) == (
        "completed", "idle_timeout", 1)
    assert (plain_run["status"], plain_run["idle_timeout_s"]) == ("active", None)
    # and the next call started a new run (the window lives in the run's row, not in a process's cache)
    assert again.started_run and again.run_id != first.run_id


async def test_admission_closes_an_idle_run_by_its_own_window_after_a_restart(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        await apply_policy(store, {"name": "brief", "runs": {"idle_timeout_s": 1}})
        agent = await _agent(store, "brief-agent", policy="brief")
        first = AdmitCall(await facts(store, agent))
        await store.execute(first)
        await store.execute(SettleStep(first.step_id, charge_reservation=False))
        await asyncio.sleep(1.2)
        policy_module._COMPILED.clear()  # the sweeper has not run, and this process never compiled the policy
        # when the agent calls again without a run id
        nxt = AdmitCall(await facts(store, agent, idle_timeout_s=900))
        events = await store.execute(nxt)
        old = await _row(store, "runs", first.run_id)
    # then its idle run was closed by the policy's window inside the admission, and a new one began
    assert [e.type for e in events] == ["RunCompleted", "RunStarted", "StepStarted"]
    assert (old["status"], old["ended_reason"]) == ("completed", "idle_timeout")
    assert nxt.started_run and nxt.run_id != first.run_id


async def test_the_sweepers_settlement_raises_the_runs_budget_alerts(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        await apply_policy(store, {"name": "capped", "budget": {"hard_limit_usd": "1", "alerts": [0.5, 0.9]}})
        agent = await _agent(store, "capped-agent", policy="capped")
        # given a call that reserved 0.95 USD and whose process died before settling it
        admit = AdmitCall(await facts(store, agent, run_id="orphaned", reserved_pusd=95 * USD // 100))
        await store.execute(admit)
        policy_module._COMPILED.clear()  # the sweeper may run in a process that never saw the policy
        # when the sweeper settles the orphaned step, charging its reservation
        swept = await store.execute(SettleStep(admit.step_id, budget_from_run=True))
        again = await store.execute(SettleStep(admit.step_id, budget_from_run=True))
        run = await _row(store, "runs", "orphaned")

    # then the settlement raised both alerts it crossed, once, like a settlement the proxy waited for
    assert [e.type for e in swept] == ["StepCompleted", "BudgetAlerted", "BudgetAlerted"]
    assert swept[0].data["status"] == "abandoned" and swept[0].data["cost_pusd"] == 95 * USD // 100
    assert [e.data["threshold"] for e in swept[1:]] == [0.5, 0.9]
    assert again == []
    assert (run["spend_pusd"], run["reserved_pusd"], run["budget_alert_level"]) == (95 * USD // 100, 0, 0.9)


async def test_the_sweeper_settles_a_step_without_a_policy_as_before(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        agent = await _agent(store, "free-agent")
        admit = AdmitCall(await facts(store, agent, reserved_pusd=7))
        await store.execute(admit)
        swept = await store.execute(SettleStep(admit.step_id, budget_from_run=True))
    assert [e.type for e in swept] == ["StepCompleted"] and swept[0].data["cost_pusd"] == 7


async def test_refusals_of_a_stopped_run_and_a_disabled_agent_name_the_policy(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        row, _ = await apply_policy(store, {"name": "named", "models": {"blocked": ["gpt-5"]}})
        agent = await _agent(store, "named-agent", policy="named")
        # given a run under the policy that an operator stopped, and an auto-run stopped the same way
        explicit = AdmitCall(await facts(store, agent, run_id="explicit"))
        auto = AdmitCall(await facts(store, agent))
        for admit in (explicit, auto):
            await store.execute(admit)
            await store.execute(SettleStep(admit.step_id, charge_reservation=False))
            await store.execute(StopRun(admit.run_id))
        policy_module._COMPILED.clear()  # refusals name the policy even before this process compiled it
        refusals: list[GovernanceRefusal] = []
        for run_id in ("explicit", None):
            with pytest.raises(GovernanceRefusal) as stopped:
                await store.execute(AdmitCall(await facts(store, agent, run_id=run_id)))
            refusals.append(stopped.value)
        # and then the agent disabled
        await store.execute(UpdateAgent(agent, None, True, None))
        with pytest.raises(GovernanceRefusal) as disabled:
            await store.execute(AdmitCall(await facts(store, agent, run_id="fresh")))
        refusals.append(disabled.value)
        logged = sorted([*await store.read_stream("run-explicit"), *await store.read_stream(f"agent-{agent}")],
                        key=lambda e: e.position)
        recorded = [e.data for e in logged if e.type == "CallRefused"]
        # the refusal inside the stopped run is on its stream; those with no run of the agent's on the agent's
        assert [e.stream for e in logged if e.type == "CallRefused"] == ["run-explicit", f"agent-{agent}",
                                                                         f"agent-{agent}"]

    # then each refusal names the rule and the policy (id, name, version), in the answer and in the log
    assert [(r.code, r.context["rule"]) for r in refusals] == [("run_force_stopped", "run.stopped")] * 2 + [
        ("agent_disabled", "agent.disabled")]
    for refusal in refusals:
        assert (refusal.context["policy_id"], refusal.context["policy_name"], refusal.context["policy_version"]) == (
            row["id"], "named", 1)
    assert [(r["rule"], r["policy"]["id"], r["policy"]["version"]) for r in recorded] == [
        ("run.stopped", row["id"], 1), ("run.stopped", row["id"], 1), ("agent.disabled", row["id"], 1)]


async def test_a_disabled_agent_without_a_policy_is_refused_with_null_policy_fields(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        agent = await _agent(store, "loose")
        await store.execute(UpdateAgent(agent, None, True, None))
        with pytest.raises(GovernanceRefusal) as disabled:
            await store.execute(AdmitCall(await facts(store, agent)))
    assert disabled.value.code == "agent_disabled"
    assert [disabled.value.context[k] for k in ("policy_id", "policy_name", "policy_version")] == [None, None, None]


async def test_an_agent_update_with_a_policy_is_one_command_all_or_nothing(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        row, _ = await apply_policy(store, {"name": "strict", "models": {"allowed": ["gpt-4o-mini"]}})
        agent = await _agent(store, "changing")
        # when an update renames, disables and names an unknown policy
        with pytest.raises(NotFound) as unknown:
            await store.execute(UpdateAgent(agent, "renamed", True, None, set_policy=True, policy_name="nope"))
        untouched = await _row(store, "agents", agent)
        # and then the same update with a known policy
        events = await store.execute(UpdateAgent(agent, "renamed", True, None, set_policy=True, policy_name="strict"))
        changed = await _row(store, "agents", agent)
        # and then only the policy is removed
        removed = await store.execute(UpdateAgent(agent, None, None, None, set_policy=True, policy_name=None))
        cleared = await _row(store, "agents", agent)
        same = await store.execute(UpdateAgent(agent, None, None, None, set_policy=True, policy_name=None))

    # then the refused update changed nothing at all; the accepted one changed everything in one commit
    assert unknown.value.code == "unknown_policy"
    assert (untouched["name"], untouched["disabled"], untouched["policy_id"]) == ("changing", 0, None)
    assert [e.type for e in events] == ["AgentUpdated", "AgentPolicySet"]
    assert len({e.recorded_at for e in events}) == 1 and events[1].position == events[0].position + 1
    assert (changed["name"], changed["disabled"], changed["policy_id"]) == ("renamed", 1, row["id"])
    # and a policy-only change records only the policy, once
    assert [e.type for e in removed] == ["AgentPolicySet"] and cleared["policy_id"] is None and same == []


def _completed(admit: AdmitCall, tokens: int, cost_pusd: int) -> SettleStep:
    """The settlement the proxy executes for a call under a policy (it reads the run with it)."""
    return SettleStep(admit.step_id, StepCompleted(
        step_id=admit.step_id, run_id=admit.run_id, status="ok", http_status=200, provider="openai",
        model="gpt-4o-mini", usage={"input": tokens // 2, "output": tokens - tokens // 2}, cost_pusd=cost_pusd,
        latency_ms=5, tool_calls=[]), run_id=admit.run_id)


async def _call(store: SQLiteEventStore, agent: str, run_id: str, tokens: int, cost_pusd: int,
                reserved_tokens: int | None = None) -> list[Any]:
    """A call admitted with `reserved_tokens` (default: exactly what it then uses) and settled."""
    admit = AdmitCall(replace(await facts(store, agent, run_id=run_id, reserved_pusd=cost_pusd),
                              reserved_tokens=tokens if reserved_tokens is None else reserved_tokens))
    await store.execute(admit)
    return await store.execute(_completed(admit, tokens, cost_pusd))


def _signals(events: list[Any]) -> list[tuple[Any, ...]]:
    return [(e.type, e.data["cap"], e.data.get("threshold")) for e in events if e.type.startswith("Budget")]


async def test_each_cap_of_a_run_alerts_once_per_threshold_and_is_exceeded_once(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        await apply_policy(store, {"name": "caps", "budget": {
            "hard_limit_usd": "10", "hard_limit_tokens": 1000, "agent_hourly_usd": "1", "alerts": [0.5]}})
        agent = await _agent(store, "capped", policy="caps")
        # given a call of 600 tokens costing 0.60 USD, then one admitted for 300 tokens that used 500 and
        # cost 0.10 USD (the provider counted more input than the estimate)
        first = await _call(store, agent, "caps", 600, 60 * USD // 100)
        second = await _call(store, agent, "caps", 500, 10 * USD // 100, reserved_tokens=300)
        # and a call in another run of the same agent, costing 0.10 USD more
        other = await _call(store, agent, "other", 10, 10 * USD // 100)
        # when the first run asks for more tokens than its cap leaves, twice
        refusals = []
        for _ in range(2):
            admit = AdmitCall(replace(await facts(store, agent, run_id="caps"), reserved_tokens=10))
            with pytest.raises(GovernanceRefusal) as refused:
                await store.execute(admit)
            refusals.append(refused.value)
        run = await _row(store, "runs", "caps")
        log = [e for e in await store.read_stream("run-caps") if e.type.startswith("Budget")]

    # then the token cap alerted at half (600 of 1000), and the agent's hourly cap too (0.60 of 1 USD);
    # the run's USD cap (0.70 of 10) stayed quiet
    assert _signals(first) == [("BudgetAlerted", "run_tokens", 0.5), ("BudgetAlerted", "agent_hourly_usd", 0.5)]
    assert first[1].data["tokens_used"] == 600 and first[1].data["limit_tokens"] == 1000
    assert first[2].data["spend_pusd"] == 60 * USD // 100 and first[2].data["limit_pusd"] == USD
    # and passing the token cap recorded BudgetExceeded for it, with no alert repeated
    assert _signals(second) == [("BudgetExceeded", "run_tokens", None)]
    assert second[1].data["tokens_used"] == 1100
    # and the other run saw the agent's hour at 0.80 USD: its own alert for it, once
    assert _signals(other) == [("BudgetAlerted", "agent_hourly_usd", 0.5)]
    # and the refusals for the token cap added no second BudgetExceeded
    assert [(r.code, r.context["rule"]) for r in refusals] == [("budget_exceeded", "budget.hard_limit_tokens")] * 2
    assert [(e.type, e.data["cap"]) for e in log] == [("BudgetAlerted", "run_tokens"),
                                                      ("BudgetAlerted", "agent_hourly_usd"),
                                                      ("BudgetExceeded", "run_tokens")]
    assert (run["budget_alert_level_tokens"], run["budget_alert_level_hourly"], run["budget_alert_level"]) == (
        0.5, 0.5, 0)
    assert (run["budget_exceeded_tokens"], run["budget_exceeded"]) == (1, 0)


async def test_a_call_refused_by_the_token_cap_records_it_exceeded_once(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        await apply_policy(store, {"name": "tokens", "budget": {"hard_limit_tokens": 100}})
        agent = await _agent(store, "counted", policy="tokens")
        await _call(store, agent, "small", 10, 0)
        refused_events = []
        for _ in range(2):
            with pytest.raises(GovernanceRefusal):
                await store.execute(AdmitCall(replace(await facts(store, agent, run_id="small"), reserved_tokens=200)))
            refused_events.append([e for e in await store.read_stream("run-small") if e.type == "BudgetExceeded"])
    # then the first refusal recorded the cap exceeded (10 tokens used of 100), the second nothing more
    assert [len(events) for events in refused_events] == [1, 1]
    exceeded = refused_events[0][0].data
    assert (exceeded["cap"], exceeded["tokens_used"], exceeded["limit_tokens"], exceeded["step_id"]) == (
        "run_tokens", 10, 100, None)


async def test_a_logged_tool_steps_tokens_count_towards_the_token_caps_alerts(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        await apply_policy(store, {"name": "tooling", "budget": {"hard_limit_tokens": 100, "alerts": [0.8]}})
        agent = await _agent(store, "tooler", policy="tooling")
        await _call(store, agent, "tools", 50, 0)
        step = ToolStepLogged(step_id=new_id("stp"), run_id="tools", tool="search", status="ok",
                              usage={"input": 20, "output": 15})
        events = await store.execute(LogToolStep(agent, "tools", step))
    assert _signals(events) == [("BudgetAlerted", "run_tokens", 0.8)] and events[-1].data["tokens_used"] == 85


async def test_a_run_that_spends_its_cap_is_blocked_until_an_operator_resumes_it(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        await apply_policy(store, {"name": "blocking", "budget": {"hard_limit_usd": "1", "alerts": []}})
        agent = await _agent(store, "spender", policy="blocking")
        # given a run whose second call cost more than it reserved, taking the spend past the 1 USD cap
        await _call(store, agent, "spend", 10, 50 * USD // 100)
        admit = AdmitCall(await facts(store, agent, run_id="spend", reserved_pusd=40 * USD // 100))
        await store.execute(admit)
        over = await store.execute(_completed(admit, 10, 60 * USD // 100))
        blocked = await _row(store, "runs", "spend")
        # when the agent calls again, and logs a tool step, in the blocked run
        with pytest.raises(GovernanceRefusal) as refused:
            await store.execute(AdmitCall(await facts(store, agent, run_id="spend", reserved_pusd=1)))
        step = ToolStepLogged(step_id=new_id("stp"), run_id="spend", tool="search", status="ok")
        logged = await store.execute(LogToolStep(agent, "spend", step))
        # and then an operator resumes it with a 1 USD top-up, and the agent calls again
        resumed = await store.execute(ResumeRun("spend", add_pusd=USD))
        active = await _row(store, "runs", "spend")
        after = AdmitCall(await facts(store, agent, run_id="spend", reserved_pusd=50 * USD // 100))
        await store.execute(after)

    # then the settlement that used the cap up recorded it exceeded and the run blocked, with the rule
    assert [e.type for e in over] == ["StepCompleted", "BudgetExceeded", "RunBlocked"]
    assert over[2].data == {"run_id": "spend", "cap": "run_usd", "rule": "budget.hard_limit_usd"}
    assert (blocked["status"], blocked["ended_reason"]) == ("blocked", "budget.hard_limit_usd")
    # and the blocked run refused the call for its budget (402, not 409), yet recorded the tool step
    assert (refused.value.status, refused.value.code) == (402, "budget_exceeded")
    assert [e.type for e in logged] == ["ToolStepLogged"]
    # and the resume made it active with the top-up, so the next call fits
    assert [e.type for e in resumed] == ["RunResumed"] and active["status"] == "active"
    assert after.run_id == "spend" and not after.started_run


async def test_a_blocked_auto_run_holds_the_agent_until_it_asks_for_a_new_run(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        await apply_policy(store, {"name": "tight", "budget": {"hard_limit_usd": "1", "alerts": []},
                                   "runs": {"idle_timeout_s": 1}})
        agent = await _agent(store, "auto-spender", policy="tight")
        first = AdmitCall(await facts(store, agent, reserved_pusd=USD))
        await store.execute(first)
        await store.execute(_completed(first, 10, USD))
        await asyncio.sleep(1.2)  # past the policy's idle window: a blocked run does not go idle
        idle = await queries.idle_auto_runs(store, now_iso(), 900)
        # when the agent calls again without a run id, then asks for a new run
        with pytest.raises(GovernanceRefusal) as refused:
            await store.execute(AdmitCall(await facts(store, agent, reserved_pusd=1)))
        fresh = AdmitCall(await facts(store, agent, new_run=True, reserved_pusd=1))
        await store.execute(fresh)
        old = await _row(store, "runs", first.run_id)
    # then the blocked auto-run answered for the agent (402 naming it), not a fresh run with a fresh budget
    assert idle == []
    assert refused.value.code == "budget_exceeded" and refused.value.run_id == first.run_id
    # and only an explicit new run started over, leaving the blocked one for the operator
    assert fresh.started_run and fresh.run_id != first.run_id and old["status"] == "blocked"


async def test_a_shadow_budget_never_blocks_and_a_blocked_run_can_still_be_completed(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        await apply_policy(store, {"name": "watch", "budget": {"hard_limit_usd": "1", "mode": "shadow", "alerts": []}})
        await apply_policy(store, {"name": "hard", "budget": {"hard_limit_usd": "1", "alerts": []}})
        watched = await _agent(store, "watched", policy="watch")
        hard = await _agent(store, "hard", policy="hard")
        shadow = await _call(store, watched, "watched-run", 10, 2 * USD)  # admitted: the cap is only watched
        admit = AdmitCall(await facts(store, hard, run_id="hard-run", reserved_pusd=USD))
        await store.execute(admit)
        await store.execute(_completed(admit, 10, 2 * USD))  # the provider billed more than was reserved
        completed = await store.execute(CompleteRun(hard, "hard-run", "done", {}))
        runs = {r: (await _row(store, "runs", r))["status"] for r in ("watched-run", "hard-run")}
    # then the shadow budget recorded the cap exceeded but let the run go on; the blocked run completed
    assert [e.type for e in shadow] == ["StepCompleted", "BudgetExceeded"]
    assert [e.type for e in completed] == ["RunCompleted"]
    assert runs == {"watched-run": "active", "hard-run": "completed"}


async def test_every_admission_names_the_policy_version_that_admitted_it(tmp_path: Path) -> None:
    async with opened(tmp_path / "log.db") as store:
        row, _ = await apply_policy(store, {"name": "naming", "tools": {"blocked": ["rm"]}})
        agent = await _agent(store, "named", policy="naming")
        plain = await _agent(store, "unnamed")
        admitted = await store.execute(AdmitCall(await facts(store, agent, run_id="named-run")))
        step = ToolStepLogged(step_id=new_id("stp"), run_id="named-run", tool="search", status="ok")
        logged = await store.execute(LogToolStep(agent, "named-run", step))
        free = await store.execute(AdmitCall(await facts(store, plain, run_id="free-run")))
    ref = {"id": row["id"], "name": "naming", "version": 1}
    assert [e.data["policy"] for e in admitted if e.type == "StepStarted"] == [ref]
    assert [e.data["policy"] for e in logged if e.type == "ToolStepLogged"] == [ref]
    assert [e.data["policy"] for e in free if e.type == "StepStarted"] == [None]
