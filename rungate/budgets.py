"""What a run's caps record as it spends: alerts, `BudgetExceeded` and `RunBlocked`.

Pure functions over the run's row (as the write transaction read it), the policy version the run is bound
to and the run's figures once a settlement (or a logged tool step) is folded in. They return events; the
commands (`rungate.runs`) append them to the run's stream.

The caps: `run_usd` (the policy's `budget.hard_limit_usd` plus operator top-ups), `run_tokens`
(`budget.hard_limit_tokens`) and `agent_hourly_usd` (`budget.agent_hourly_usd`: the agent's settled spend
over the last hour, all its runs). Each alert fraction fires once per cap and run; each run cap is
recorded exceeded once; an enforced run cap used up blocks the run.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from projections.runs import ALERT_LEVEL, EXCEEDED
from rungate.clock import iso_minus
from rungate.enforce.policy import CompiledPolicy
from rungate.enforce.rules import RunState, budget_limit_pusd
from rungate.events import Event
from rungate.events.catalogue import BudgetAlerted, BudgetExceeded, RunBlocked
from rungate.store.base import Lookup, Row

_RULE_CAPS = {"budget.hard_limit_usd": "run_usd", "budget.hard_limit_tokens": "run_tokens"}
_CAP_RULES = {cap: rule for rule, cap in _RULE_CAPS.items()}


@functools.lru_cache(maxsize=1024)  # asked several times per call, and by every call of a batch (one `now`)
def hour_spend(agent_id: str, now: str) -> Lookup:
    """The agent's settled spend over the hour before `now` (per-minute sums, all its runs)."""
    return Lookup.window("agent_spend", ("spend_pusd",), ("minute", iso_minus(now, 3600)[:16]), agent_id=agent_id)


def hour_alerts(policy: CompiledPolicy) -> bool:
    """Whether `policy` wants alerts on the agent's hourly cap (a settlement then reads the agent's hour)."""
    return policy.agent_hourly_pusd is not None and bool(policy.alerts)


def hour_after(found: Mapping[Lookup, Row | None], policy: CompiledPolicy, agent_id: str, now: str,
               cost: int) -> int | None:
    """The agent's settled spend over the last hour once `cost` is added (None: no hourly alert wanted, or
    nothing was added). Its row is `hour_spend(agent_id, now)`, which the command asked for."""
    if not hour_alerts(policy) or cost <= 0:
        return None
    row = found.get(hour_spend(agent_id, now))
    return (int(row["spend_pusd"]) if row is not None else 0) + cost


def signals(run: Row, policy: CompiledPolicy, after: RunState, step_id: str,
            hour_spent: int | None = None) -> list[Event]:
    """`BudgetAlerted` for each alert fraction of each cap newly reached; `BudgetExceeded` once per run cap;
    `RunBlocked` when an active run has used all of an enforced run cap.

    `run` is the row before the settlement (its alert levels and flags), `after` the run's figures with it.
    """
    out: list[Event] = []
    blocked: str | None = None
    for cap, used, limit in _caps(policy, after, hour_spent):
        level = float(run[ALERT_LEVEL[cap]])
        for threshold in policy.alerts:
            if threshold > level and used * 10**6 >= round(threshold * 10**6) * limit:
                out.append(BudgetAlerted(run_id=after.run_id, threshold=threshold, cap=cap,
                                         **_amounts(cap, used, limit)))
        if cap in EXCEEDED and used >= limit:
            if not run[EXCEEDED[cap]]:
                out.append(BudgetExceeded(run_id=after.run_id, cap=cap, step_id=step_id, **_amounts(cap, used, limit)))
            blocked = blocked or cap
    if blocked is not None and run["status"] == "active" and policy.budget_mode != "shadow":
        out.append(RunBlocked(run_id=after.run_id, cap=blocked, rule=_CAP_RULES[blocked]))
    return out


def exceeded_on_refusal(run: Row, policy: CompiledPolicy, state: RunState, rule: str) -> list[Event]:
    """`BudgetExceeded` for a call refused by the run cap `rule`, unless that cap was already exceeded."""
    cap = _RULE_CAPS.get(rule)
    if cap is None or run[EXCEEDED[cap]]:
        return []
    used, limit = next((used, limit) for c, used, limit in _caps(policy, state, None) if c == cap)
    return [BudgetExceeded(run_id=state.run_id, cap=cap, step_id=None, **_amounts(cap, used, limit))]


def _caps(policy: CompiledPolicy, after: RunState, hour_spent: int | None) -> list[tuple[str, int, int]]:
    """(cap, used, limit) for each cap `policy` sets on the run, as of `after` (`hour_spent`: the agent's
    hour including this settlement, when read)."""
    caps = []
    usd = budget_limit_pusd(policy, after)
    if usd is not None:
        caps.append(("run_usd", after.spend_pusd, usd))
    if policy.run_limit_tokens is not None:
        caps.append(("run_tokens", after.tokens_used, policy.run_limit_tokens))
    if policy.agent_hourly_pusd is not None and hour_spent is not None:
        caps.append(("agent_hourly_usd", hour_spent, policy.agent_hourly_pusd))
    return caps


def _amounts(cap: str, used: int, limit: int) -> dict[str, int]:
    """An event's figures for `cap`: tokens for the token cap, picodollars for the others."""
    if cap == "run_tokens":
        return {"tokens_used": used, "limit_tokens": limit}
    return {"spend_pusd": used, "limit_pusd": limit}
