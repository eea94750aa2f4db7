"""Run life-cycle commands: admit a call into a run, complete a run, log a tool step, close idle runs.

Each command is a pure decision over rows the store fetches inside the write transaction, so two
concurrent calls can never both start the same run or both see a run open that one of them closes.
Governance rules (issue 3) plug into `AdmitCall.decide`: it is the one place a call is let in.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

from projections.runs import ALERT_LEVEL, EXCEEDED
from rungate import budgets
from rungate.approvals import Hold, found_gates, gate_lookups, hold_answer, hold_state, shadowed
from rungate.clock import iso_minus, parse_iso
from rungate.enforce.policy import CompiledPolicy, cached_policy, compile_policy
from rungate.enforce.rules import (
    RATE_WINDOW_S,
    AgentHour,
    CallAsk,
    RateWindow,
    RunState,
    Verdict,
    evaluate,
    shrink,
)
from rungate.errors import (
    BadRequest,
    Conflict,
    GovernanceRefusal,
    NotFound,
    ProviderError,
    RungateError,
    StoreError,
    Unauthorized,
)
from rungate.events import Event, NewEvent, canonical_json, stream_name
from rungate.events.catalogue import (
    CallRefused,
    HeldAnswerRetried,
    PolicyDrifted,
    RunCompleted,
    RunResumed,
    RunStarted,
    RunStopped,
    StepCompleted,
    StepFailedOver,
    StepStarted,
    ToolStepLogged,
)
from rungate.ids import new_id
from rungate.prices import ModelPrice
from rungate.queries import RUN_STATUSES
from rungate.store.base import Lookup, Refused, Row
from rungate.usage import Usage

# Statuses a call cannot continue (stopped: 403, completed: 409). A `blocked` run is not closed: its calls are
# judged by its policy, which refuses them (402) until an operator resumes it; steps may still be logged.
CLOSED = ("completed", "stopped")
# Refusals `on_exceed: shrink` answers by lowering the call's output limit: a run cap and the agent's hourly cap.
_SHRINKABLE = frozenset({"budget_exceeded", "hourly_cost_exceeded"})
# What admission reads of a run (the write transaction fetches only these).
_RUN_COLUMNS = ("id", "agent_id", "status", "open_steps", "last_activity_at", "policy_id", "policy_version",
                "idle_timeout_s",
                "step_count", "spend_pusd", "reserved_pusd", "tokens_input", "tokens_output", "reserved_tokens",
                "budget_add_pusd", *ALERT_LEVEL.values(), *EXCEEDED.values())


def run_stream(run_id: str) -> str:
    return stream_name("run", run_id)


# SDKs auto-retry 409s; a closed or foreign run will not open by retrying.
_NO_RETRY = {"x-should-retry": "false"}


def _run_closed(run_id: str, status: str) -> Conflict:
    return Conflict(f"Run {run_id} is {status}; start a new run to continue.", code="run_closed",
                    extra={"run_id": run_id, "status": status}, headers=dict(_NO_RETRY))


def _run_unavailable() -> Conflict:
    # A client-chosen id another agent already uses: refused without saying more about that run.
    return Conflict("This run id is not available to this agent.", code="run_unavailable", headers=dict(_NO_RETRY))


def idle_window(run: Row, default_s: int) -> int:
    """The run's idle window: its policy's `runs.idle_timeout_s` as of the run's start, else `default_s`."""
    own = run["idle_timeout_s"]
    return int(own) if own is not None else default_s


def _idle(run: Row, now: str, idle_timeout_s: int) -> bool:
    """An auto-run looks idle when no call is in flight and nothing happened within the window (a held answer
    still waiting for its approval or its delivery keeps it open too: see `open_holds`)."""
    return bool(run["open_steps"] == 0 and run["last_activity_at"] < iso_minus(now, idle_timeout_s))


# Look-ups are values, asked for in every round of `more_lookups` and again by `decide`: the hot ones are
# built once and shared (a few thousand recent ones; a Lookup is a few hundred bytes).
_shared = functools.lru_cache(maxsize=4096)


@_shared
def open_holds(run_id: str) -> Lookup:
    """Whether the run has a held answer still pending or not yet delivered (`{"n": 0 | 1}`)."""
    return Lookup.counting("holds", 1, run_id=run_id, open=1)


def _held_up(found: Mapping[Lookup, Row | None], run_id: str) -> bool | None:
    """Whether `open_holds(run_id)` found a hold (None: not looked up yet)."""
    row = found.get(open_holds(run_id))
    return None if row is None else bool(row["n"])


@_shared
def _any_hold(run_id: str) -> Lookup:
    """Whether the run has ever held an answer (`{"n": 0 | 1}`)."""
    return Lookup.counting("holds", 1, run_id=run_id)


@_shared
def hold_lookup(run_id: str, fingerprint: str) -> Lookup:
    """The newest held answer of this run for this request fingerprint."""
    return Lookup.of("holds", "id", "status", "rule", "decided_by", "reason", "released", "step_id", "mode",
                     "gate_ids", run_id=run_id, fingerprint=fingerprint)


def _hold_and_gates(found: Mapping[Lookup, Row | None], run_id: str, fingerprint: str,
                    wanted: list[Lookup]) -> Row | None:
    """For `more_lookups`: the request's hold, once read, with its gates added to `wanted`."""
    lookup = hold_lookup(run_id, fingerprint)
    wanted.append(lookup)
    hold = found.get(lookup)
    if hold is not None:
        wanted.extend(gate_lookups(hold))
    return hold


def held_retry(found: Mapping[Lookup, Row | None], hold: Row, run_id: str, now: str) -> tuple[str, NewEvent]:
    """A retry of a held request: its hold's state (`pending`, `approved`, `rejected`, read off its gates)
    and the `HeldAnswerRetried` that records what the retry got."""
    state = hold_state(hold, found_gates(found, hold), now)
    return state, NewEvent(run_stream(run_id), HeldAnswerRetried(
        hold_id=hold["id"], run_id=run_id, outcome="released" if state == "approved" else state))


def approval_rejected(run_id: str, hold: Row, now: str, policy: CompiledPolicy | None) -> GovernanceRefusal:
    """The SPEC §4 refusal of a request whose held answer was rejected, or expired unapproved."""
    expired = hold["status"] != "rejected" or hold["decided_by"] is None
    reason = "The approval expired before anyone decided." if expired else (hold["reason"] or "No reason given.")
    return GovernanceRefusal(
        f"The tool call this request produced was {'not approved in time' if expired else 'rejected'}: {reason}",
        code="approval_rejected", status=403, run_id=run_id,
        context={"rule": f"approvals.{hold['rule']}", "hold_id": hold["id"], "reason": reason,
                 "decided_by": hold["decided_by"], "expired": expired, **policy_fields(policy),
                 "next": "Change the request (the conversation) or ask an operator."},
        headers=dict(_NO_RETRY))


@dataclass(frozen=True)
class CallFacts:
    """What the proxy knows about a call before it goes upstream."""

    agent_id: str
    token_hash: str  # the digest the caller authenticated with: re-checked at admission
    run_id: str | None
    new_run: bool
    endpoint: str
    provider: str
    model: str
    stream: bool
    fingerprint: str
    reserved_pusd: int
    idle_timeout_s: int
    reserved_tokens: int = 0  # input estimate plus the most output the call may produce
    priced: bool = True  # the model has a price (else `reserved_pusd` is 0 and a USD budget cannot hold)
    tools: tuple[str, ...] = ()  # tools the request offers the model
    policy_name: str | None = None  # `x-rungate-policy: NAME[@VERSION]`: binds a run this call starts
    policy_version: int | None = None
    input_tokens: int = 0  # the input estimate (for `on_exceed: shrink`, with the model's price; a planned call
    # takes its plan's, which counts its images at the target model's most)
    previous_response_id: str | None = None  # a Responses call that continues an answer (its tokens are input)
    cache_writes: bool = False  # the request asks for prompt caching (its input may cost a write rate)
    web_searches: int = 0  # the most server-side web searches the request allows (each billed a fee)
    price: ModelPrice | None = None
    embedding: bool = False
    choices: int = 1
    output_bounded: bool = True
    # Routes (SPEC §6.1): picks the call's targets once its run's policy is known (the policy's routes win
    # over the configuration file's); None refuses the call (no target of its route is allowed).
    planner: Callable[[CompiledPolicy | None, int], Plan | None] | None = None
    # A failover attempt: the step that failed and why. Such an admission is checked against the budget and
    # the model lists only (the call was already counted by its first admission) and records the failover.
    failover: Failover | None = None


@dataclass(frozen=True)
class Plan:
    """The targets a call may go to, in order, and what its first attempt reserves at that target's price."""

    targets: tuple[Any, ...]
    provider: str
    model: str
    reserved_pusd: int
    reserved_tokens: int
    priced: bool
    price: ModelPrice | None
    output_bounded: bool
    skipped: tuple[dict[str, Any], ...] = ()  # targets left out (an open circuit, a model the policy refuses)
    routed: bool = False  # a route named the targets (else: the format's own provider, no failover)
    input_tokens: int = 0  # the input the reservation counts (the estimate, images at the first target's most)


@dataclass(frozen=True)
class Failover:
    """What a failover admission records about the attempt before it."""

    from_step_id: str
    from_provider: str
    from_model: str
    reason: str
    retry: bool = False
    delay_s: float = 0.0
    continuation: bool = False


_ATTEMPT_RULES = ("budget.", "models.")  # what a failover attempt is judged by


@dataclass
class AdmitCall:
    """Resolve the call's run (explicit, auto or new), apply the run's policy, record `StepStarted`.

    Everything is decided inside the write transaction over the rows as they are at that instant, so two
    concurrent calls never both take the last dollar. After `execute`: `run_id`, `step_id`, `started_run`,
    `policy` (the compiled version the run is bound to, or None), `budget` (the run's limits and what is
    left of them after this call's reservation) and `warnings` (shadow-mode verdicts, ignored pins).
    """

    facts: CallFacts
    step_id: str = field(default_factory=lambda: new_id("stp"))
    run_id: str = ""
    started_run: bool = False
    policy: CompiledPolicy | None = None
    state: RunState | None = None
    warnings: list[str] = field(default_factory=list)
    max_output: int | None = None  # set when `on_exceed: shrink` lowered the call's output limit to fit
    reserved_pusd: int = 0  # what was reserved (the facts' worst case, or less once shrunk)
    reserved_tokens: int = 0
    # A retry of a held request (SPEC §5): the hold's row and `pending` or `released`. Then no step was
    # admitted: the proxy answers from the hold (a rejected hold is refused with 403 instead).
    hold: Row | None = None
    hold_outcome: str | None = None
    plan: Plan | None = None  # set when the facts carry a planner
    run_exists: bool = False  # the call's run is the agent's and exists: a refusal is recorded on its stream
    carried: int = 0  # tokens the answer it continues (`previous_response_id`) adds to its input, as recorded
    _idle_seen: tuple[tuple[str, str], bool] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Built once: the store asks for them and `decide` indexes its rows by them.
        f = self.facts
        self._agent = _admitting_agent(f.agent_id)
        self._run = _run_lookup(f.run_id) if f.run_id is not None else _active_auto_run(f.agent_id)
        # What the answer it continues carried: only the planner counts it (a failover re-admission is given the
        # plan's input, which already holds it).
        self._continued = (Lookup.of("responses", "tokens", id=f.previous_response_id, agent_id=f.agent_id)
                           if f.previous_response_id is not None and f.planner is not None else None)

    def lookups(self) -> Sequence[Lookup]:
        if self._continued is not None:
            return (self._agent, self._run, self._continued)
        return (self._agent, self._run)

    @functools.cached_property
    def _latest_autos(self) -> tuple[Lookup, ...]:
        """With no active auto-run: the agent's newest auto-run of each other status, with its position.

        One look-up per status, each a point read of the runs index: one over every status cannot use that
        index to find the newest and reads every auto-run the agent ever had (77 ms for 100,000 of them, in
        the one writer, each time the agent starts a run after an idle close).
        """
        return tuple(Lookup.of("runs", *_RUN_COLUMNS, "position", agent_id=self.facts.agent_id, auto=1, status=status)
                     for status in RUN_STATUSES if status != "active")

    def _latest_auto(self, found: Mapping[Lookup, Row | None]) -> Row | None:
        """The agent's newest auto-run whatever its status, once `_latest_autos` are found (stopped → refused,
        blocked → still the agent's run, refused by its budget)."""
        rows = [row for lookup in self._latest_autos if (row := found.get(lookup)) is not None]
        return max(rows, key=lambda row: int(row["position"]), default=None)

    def _current(self, found: Mapping[Lookup, Row | None]) -> Row | None:
        """The run the call belongs to, if it exists: the named one, or the active auto-run — or a blocked
        one: a blocked auto-run holds the agent until an operator resumes it or the agent asks for a new run."""
        run = found[self._run]
        if run is None and self.facts.run_id is None and not self.facts.new_run:
            latest = self._latest_auto(found)
            if latest is not None and latest["status"] == "blocked":
                return latest
        return run

    # --- which rows the decision needs -------------------------------------------------------------

    def more_lookups(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[Lookup]:
        """The policy rows (only versions this process has not compiled yet) and the repeat count."""
        agent, run = found[self._agent], found[self._run]
        if agent is None:
            return ()
        wanted: list[Lookup] = []
        if self.facts.run_id is None and run is None and not self.facts.new_run:
            wanted.extend(self._latest_autos)
            run = self._current(found)
            latest = self._latest_auto(found)
            if latest is not None and latest["status"] == "stopped":
                _known_policy(found, _run_ref(latest), wanted)  # the refusal names the stopped run's policy
        if run is not None and self._looks_idle(run, now):
            wanted.append(open_holds(run["id"]))
        starting = self._starts_run(run, now, found)
        ref_lookup = self._binding_lookup(agent, starting)
        if ref_lookup is not None:
            wanted.append(ref_lookup)
        policy = _known_policy(found, self._binding(found, run, starting, ref_lookup), wanted)
        if agent["disabled"]:  # refused: only the policy its refusal names is needed
            return wanted
        if policy is not None and policy.approvals and not starting and run is not None:
            # Most runs never hold an answer: whether this one has any is read first (and kept by the writer
            # until the approvals change), and only then the hold of this request.
            guard = _any_hold(run["id"])
            wanted.append(guard)
            held = found.get(guard)
            if held is not None and held["n"]:
                _hold_and_gates(found, run["id"], self.facts.fingerprint, wanted)
        if policy is not None and policy.max_repeats is not None and not starting and run is not None:
            wanted.append(self._repeats(run["id"], policy.max_repeats))
        if policy is not None:
            run_id = self.facts.run_id or (run["id"] if run is not None and not starting else None)
            wanted.extend(lookup for _, lookup in self._windows(policy, run_id, now))
            if policy.agent_hourly_pusd is not None:
                wanted.extend(self._hour(now))
        return wanted

    def _hour(self, now: str) -> tuple[Lookup, Lookup]:
        """The agent's settled spend of the last hour (by minute), and what its active runs hold reserved."""
        return budgets.hour_spend(self.facts.agent_id, now), _reserved(self.facts.agent_id)

    def _windows(self, policy: CompiledPolicy, run_id: str | None, now: str) -> list[tuple[str, Lookup]]:
        """The rate windows `policy` limits: the agent's, and the run's when it already exists."""
        since = _epoch(now) - RATE_WINDOW_S
        out = []
        if policy.agent_rate is not None:
            out.append(("agent", _window(f"agent:{self.facts.agent_id}", since)))
        if policy.run_rate is not None and run_id is not None:
            out.append(("run", _window(f"run:{run_id}", since)))
        return out

    def _looks_idle(self, run: Row, now: str) -> bool:
        if self.facts.run_id is not None or self.facts.new_run or run["status"] != "active":
            return False
        key = (run["id"], now)  # asked in every round of look-ups and again by the decision: worked out once
        if self._idle_seen is None or self._idle_seen[0] != key:
            self._idle_seen = (key, _idle(run, now, self._idle_window(run)))
        return self._idle_seen[1]

    def _starts_run(self, run: Row | None, now: str, found: Mapping[Lookup, Row | None]) -> bool:
        if self.facts.run_id is not None:
            return run is None
        if run is None or self.facts.new_run:
            return True
        # An idle-looking auto-run with a held answer outstanding stays the agent's run.
        return self._looks_idle(run, now) and not _held_up(found, run["id"])

    def _binding_lookup(self, agent: Row, starting: bool) -> Lookup | None:
        """Where a starting run finds its policy: the pinned one, else the agent's default."""
        f = self.facts
        if not starting:
            return None
        if f.policy_name is not None:  # the live policy of that name (its current or the pinned version)
            return Lookup.of("policies", "id", "version", name=f.policy_name, deleted=0)
        if agent["policy_id"] is not None:
            return Lookup.of("policies", "id", "version", id=agent["policy_id"], deleted=0)
        return None

    def _binding(self, found: Mapping[Lookup, Row | None], run: Row | None, starting: bool,
                 ref_lookup: Lookup | None) -> tuple[str, int] | None:
        """The (policy id, version) the call is governed by: the run's, or the one a starting run takes."""
        if not starting:
            return None if run is None else _run_ref(run)
        if ref_lookup is None or ref_lookup not in found:
            return None
        row = found[ref_lookup]
        if row is None:
            return None
        pinned = self.facts.policy_version if self.facts.policy_name is not None else None
        if pinned is not None and pinned > int(row["version"]):
            return None  # no such version (yet): refused as an unknown policy
        return str(row["id"]), pinned if pinned is not None else int(row["version"])

    def _repeats(self, run_id: str, limit: int) -> Lookup:
        return _repeats(run_id, self.facts.fingerprint, limit)

    def _idle_window(self, run: Row) -> int:
        return idle_window(run, self.facts.idle_timeout_s)

    # --- the decision --------------------------------------------------------------------------------

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        f = self.facts
        agent = found[self._agent]
        # Re-checked atomically with admission: an agent disabled or deleted, or a token rotated, a moment ago
        # lets nothing more in (authentication may have read a cached row).
        if agent is None or not hmac.compare_digest(agent["token_hash"], f.token_hash):
            raise Unauthorized("Unknown agent token.")
        run = self._current(found)
        if agent["disabled"]:
            starting = self._starts_run(run, now, found)
            ref = self._binding(found, run, starting, self._binding_lookup(agent, starting))
            self.policy = _found_policy(found, ref)
            if run is not None and not starting and run["agent_id"] == f.agent_id:  # refused inside its own run
                self.run_id, self.run_exists = run["id"], True
            self._refuse(agent_disabled(self.run_id or f.run_id, self.policy))
        events: list[NewEvent] = []
        if f.run_id is not None:
            if run is not None and run["agent_id"] != f.agent_id:
                self._refuse(_run_unavailable())
            self.run_exists = run is not None
            if run is not None and run["status"] == "stopped":
                self.policy = _found_policy(found, _run_ref(run))
                self._refuse(force_stopped(f.run_id, self.policy))
            if run is not None and run["status"] in CLOSED:
                self._refuse(_run_closed(f.run_id, run["status"]))
            self.run_id = f.run_id
        else:
            latest = self._latest_auto(found) if run is None else None
            if run is None and latest is not None and latest["status"] == "stopped" and not f.new_run:
                self.policy = _found_policy(found, _run_ref(latest))
                self._refuse(force_stopped(latest["id"], self.policy))
            if run is not None and self._starts_run(run, now, found):  # asked for a new run, or idle
                idle = not f.new_run
                events.append(NewEvent(run_stream(run["id"]), RunCompleted(
                    run_id=run["id"], status="completed", ended_reason="idle_timeout" if idle else "new_run")))
                run = None
            self.run_id = run["id"] if run is not None else new_id("run")
        starting = run is None
        self.run_exists = not starting
        ref_lookup = self._binding_lookup(agent, starting)
        if starting and f.policy_name is not None and self._binding(found, run, starting, ref_lookup) is None:
            raise BadRequest(f"Policy {f.policy_name}{'' if f.policy_version is None else f'@{f.policy_version}'}"
                             " not found.", code="unknown_policy")
        ref = self._binding(found, run, starting, ref_lookup)
        if ref is not None:
            self.policy = cached_policy(*ref) or _compile(found, *ref)
        if not starting and f.policy_name is not None:
            bound = "no policy" if self.policy is None else f"{self.policy.name}@{self.policy.version}"
            self.warnings.append(f"x-rungate-policy ignored: the run is already bound to {bound}")
        if starting:
            self.started_run = True
            events.append(NewEvent(run_stream(self.run_id), RunStarted(
                run_id=self.run_id, agent_id=f.agent_id, auto=f.run_id is None,
                policy=None if self.policy is None else self.policy.ref,
                idle_timeout_s=None if self.policy is None else self.policy.idle_timeout_s)))
        if f.failover is not None and starting:  # the run vanished between attempts (a rebuild): refuse
            raise StoreError("the run of this call is not readable right now", status=503, code="store_unavailable")
        if not starting and self.policy is not None and self.policy.approvals and f.failover is None:
            hold = found.get(hold_lookup(self.run_id, f.fingerprint))
            if hold is not None:  # a retry of a held request: neither a step nor a repeat, not charged
                return self._retry_held(found, hold, now)
        provider, model, input_tokens = f.provider, f.model, f.input_tokens
        reserved_pusd, reserved_tokens, priced, price, bounded = (f.reserved_pusd, f.reserved_tokens, f.priced,
                                                                  f.price, f.output_bounded)
        if f.planner is not None:
            continued = found.get(self._continued) if self._continued is not None else None
            self.carried = int(continued["tokens"]) if continued is not None else 0
            plan = self.plan = f.planner(self.policy, self.carried)
            if plan is None:
                self._refuse(no_allowed_target(self.run_id, f.model, self.policy), rule="models.allowed")
            if not plan.targets:
                self._refuse(ProviderError("Every target of this model's route is failing (circuits open).",
                                           list(plan.skipped)))
            provider, model, input_tokens = plan.provider, plan.model, plan.input_tokens
            reserved_pusd, reserved_tokens, priced, price, bounded = (
                plan.reserved_pusd, plan.reserved_tokens, plan.priced, plan.price, plan.output_bounded)
        repeats = (found.get(self._repeats(self.run_id, self.policy.max_repeats))
                   if not starting and self.policy is not None and self.policy.max_repeats is not None else None)
        state = _state(self.run_id, None if starting else run, repeats)
        self.state = state
        decisions: list[dict[str, Any]] = []
        ask = CallAsk(f.provider, f.model, reserved_pusd, reserved_tokens, priced, f.tools,
                      input_tokens=input_tokens, embedding=f.embedding, choices=f.choices,
                      output_bounded=bounded)
        rate_scopes: list[str] = []
        if self.policy is not None:
            windows: dict[str, RateWindow] = {}
            for scope, lookup in self._windows(self.policy, None if starting else self.run_id, now):
                row = found.get(lookup)
                windows[scope] = RateWindow(int(row["requests"]), int(row["tokens"]), row["oldest"],
                                            row["detail"]) if row \
                    else RateWindow()
            if self.policy.agent_rate is not None and f.failover is None:
                rate_scopes.append(f"agent:{f.agent_id}")
            if self.policy.run_rate is not None and f.failover is None:
                rate_scopes.append(f"run:{self.run_id}")
            now_s = _epoch(now)
            hour = None
            if self.policy.agent_hourly_pusd is not None:
                spent, held = (found.get(lookup) for lookup in self._hour(now))
                hour = AgentHour(int(spent["spend_pusd"]) if spent else 0, int(held["reserved_pusd"]) if held else 0,
                                 spent["oldest"] if spent else None)
            verdicts = evaluate(self.policy, state, ask, windows, now_s, hour)
            if f.failover is not None:
                verdicts = [v for v in verdicts if v.rule.startswith(_ATTEMPT_RULES)]
            if any(v.code in _SHRINKABLE and not v.shadow for v in verdicts) and price is not None:
                # What shrinking needs of the price, worked out only when it may happen.
                ask = replace(ask, input_pusd=price.max_cost_pico(input_tokens, 0, cache_writes=f.cache_writes,
                                                                  web_searches=f.web_searches),
                              output_pusd_per_million=price.max_cost_pico(0, 1_000_000))
                shrunk = shrink(self.policy, state, ask, hour)
                if shrunk is not None:
                    self.max_output = (shrunk.reserved_tokens - shrunk.input_tokens) // max(1, f.choices)
                    self.warnings.append(f"budget: the output limit was lowered to {self.max_output} tokens so"
                                         " the call fits the remaining budget")
                    ask, verdicts = shrunk, evaluate(self.policy, state, shrunk, windows, now_s, hour)
                    if f.failover is not None:
                        verdicts = [v for v in verdicts if v.rule.startswith(_ATTEMPT_RULES)]
            # Every request for a model outside the lists is a drift, whatever else refuses the call.
            drift = [self._drift(v) for v in verdicts if v.code == "model_not_allowed"]
            for verdict in verdicts:
                if not verdict.shadow:
                    extra: list[NewEvent] = []
                    if not starting and run is not None:  # a run refused for one of its caps: once per cap
                        extra.extend(NewEvent(run_stream(self.run_id), e)
                                     for e in budgets.exceeded_on_refusal(run, self.policy, state, verdict.rule))
                    self._refuse(self._governance(verdict), rule=verdict.rule, drift=drift, extra=extra)
            events.extend(NewEvent(run_stream(self.run_id), e) for e in drift)  # the run exists once admitted
            for verdict in verdicts:
                decisions.append({"rule": verdict.rule, "code": verdict.code, "mode": "shadow",
                                  "message": verdict.message})
                self.warnings.append(f"shadow: {verdict.code} ({verdict.rule}): {verdict.message}")
        if self.max_output is not None:
            decisions.append({"rule": "budget.on_exceed", "code": "shrunk", "mode": "enforce",
                              "message": f"output limited to {self.max_output} tokens"})
        self.reserved_pusd, self.reserved_tokens = ask.reserved_pusd, ask.reserved_tokens
        if f.failover is not None:
            fo = f.failover
            events.append(NewEvent(run_stream(self.run_id), StepFailedOver(
                run_id=self.run_id, step_id=fo.from_step_id, to_step_id=self.step_id, from_provider=fo.from_provider,
                from_model=fo.from_model, to_provider=provider, to_model=model, reason=fo.reason, retry=fo.retry,
                delay_s=fo.delay_s, continuation=fo.continuation)))
        events.append(NewEvent(run_stream(self.run_id), StepStarted(
            step_id=self.step_id, run_id=self.run_id, kind="llm", endpoint=f.endpoint, provider=provider,
            # Another attempt of a call already counted is not a repeat of it (`max_repeats` counts fingerprints).
            model=model, stream=f.stream, fingerprint="" if f.failover is not None else f.fingerprint,
            reserved_pusd=ask.reserved_pusd,
            reserved_tokens=ask.reserved_tokens, warnings=decisions, rate_scopes=rate_scopes,
            policy=None if self.policy is None else self.policy.ref)))
        return events

    def _retry_held(self, found: Mapping[Lookup, Row | None], hold: Row, now: str) -> list[NewEvent]:
        outcome, retried = held_retry(found, hold, self.run_id, now)
        if outcome == "rejected":
            self._refuse(approval_rejected(self.run_id, hold, now, self.policy), rule=f"approvals.{hold['rule']}",
                         extra=[retried])
        self.hold, self.hold_outcome = hold, "pending" if outcome == "pending" else "released"
        return [retried]

    def _drift(self, verdict: Verdict) -> PolicyDrifted:
        assert self.policy is not None
        f = self.facts
        return PolicyDrifted(agent_id=f.agent_id, run_id=self.run_id, model=f.model, provider=f.provider,
                             rule=verdict.rule, policy=self.policy.ref, enforced=not verdict.shadow)

    def _governance(self, verdict: Verdict) -> GovernanceRefusal:
        assert self.policy is not None
        return governance_error(self.policy, self.run_id, verdict, self.step_id)

    def _refuse(self, error: RungateError, rule: str | None = None, drift: Sequence[Event] = (),
                extra: Sequence[NewEvent] = ()) -> NoReturn:
        f = self.facts
        refused = refusal(f.agent_id, self.run_id or f.run_id, f.endpoint, f.model, error, rule=rule,
                          policy=None if self.policy is None else self.policy.ref, on_run=self.run_exists,
                          step_id=self.step_id, extra=drift)
        raise Refused(refused.error, [*refused.events, *extra])


def no_allowed_target(run_id: str, model: str, policy: CompiledPolicy | None) -> GovernanceRefusal:
    """403 `model_not_allowed`: the policy refuses every target of the model's route."""
    return GovernanceRefusal(f"No target of the route for {model} is allowed by this run's policy.",
                             code="model_not_allowed", status=403, run_id=run_id, context={
                                 "rule": "models.allowed", "requested": model, **policy_fields(policy),
                                 "next": "Use another model, or ask an operator to change the route or policy."},
                             headers=dict(_NO_RETRY))


def governance_error(policy: CompiledPolicy, run_id: str, verdict: Verdict, step_id: str) -> GovernanceRefusal:
    """The SPEC §4 refusal for `verdict`: its context names the rule and the policy version."""
    context = {"rule": verdict.rule, **verdict.context, **policy_fields(policy)}
    if "step_that_tripped" in context:
        context["step_that_tripped"] = step_id
    headers = {"x-should-retry": "false"}
    if verdict.retry_after is not None:
        headers = {"Retry-After": str(verdict.retry_after)}
    return GovernanceRefusal(verdict.message, code=verdict.code, status=verdict.status, run_id=run_id,
                             context=context, headers=headers)


@functools.lru_cache(maxsize=64)
def _epoch(iso: str) -> int:
    return int(parse_iso(iso).timestamp())


@_shared
def _window(scope: str, since: int) -> Lookup:
    return Lookup.window("rate_buckets", ("requests", "tokens"), ("second", since), detail="tokens", scope=scope)


@_shared
def _admitting_agent(agent_id: str) -> Lookup:
    """What admission reads of the agent (re-checked inside the write transaction)."""
    return Lookup.of("agents", "disabled", "token_hash", "policy_id", id=agent_id)


@_shared
def _run_lookup(run_id: str) -> Lookup:
    """What admission and settlement read of a run."""
    return Lookup.of("runs", *_RUN_COLUMNS, id=run_id)


@_shared
def _active_auto_run(agent_id: str) -> Lookup:
    """The agent's active auto-run, if any."""
    return Lookup.of("runs", *_RUN_COLUMNS, agent_id=agent_id, auto=1, status="active")


@_shared
def _reserved(agent_id: str) -> Lookup:
    """What the agent's active runs hold reserved (with `hour_spend`, the agent's hourly cap)."""
    return Lookup.window("runs", ("reserved_pusd",), ("reserved_pusd", 0), agent_id=agent_id, status="active")


@_shared
def _repeats(run_id: str, fingerprint: str, limit: int) -> Lookup:
    """How often the run has already sent this request (up to `limit`)."""
    return Lookup.counting("steps", limit, run_id=run_id, fingerprint=fingerprint)


@_shared
def _version_lookup(policy_id: str, version: int) -> Lookup:
    return Lookup.of("policy_versions", "document", policy_id=policy_id, version=version)


def _known_policy(found: Mapping[Lookup, Row | None], ref: tuple[str, int] | None,
                  wanted: list[Lookup]) -> CompiledPolicy | None:
    """For `more_lookups`: the compiled version `ref` names, once this process has it (compiled from its row
    when the row was just read); otherwise its row is added to `wanted`."""
    policy = _found_policy(found, ref)
    if policy is None and ref is not None:
        wanted.append(_version_lookup(*ref))
    return policy


def _found_policy(found: Mapping[Lookup, Row | None], ref: tuple[str, int] | None) -> CompiledPolicy | None:
    """The compiled version `ref` names when this process has it or its row was read, else None."""
    if ref is None:
        return None
    return cached_policy(*ref) or (_compile(found, *ref) if _version_lookup(*ref) in found else None)


def _run_ref(run: Row) -> tuple[str, int] | None:
    """The (policy id, version) a run row is bound to, if any."""
    return (run["policy_id"], int(run["policy_version"])) if run["policy_id"] is not None else None


def _compile(found: Mapping[Lookup, Row | None], policy_id: str, version: int) -> CompiledPolicy:
    row = found.get(_version_lookup(policy_id, version))
    if row is None:  # a bound version always exists: versions are never deleted
        raise StoreError(f"policy {policy_id} version {version} is missing from the log", status=500,
                         code="policy_missing")
    return compile_policy(policy_id, version, row["document"])


def _state(run_id: str, run: Row | None, repeats: Row | None) -> RunState:
    if run is None:
        return RunState(run_id)
    return RunState(run_id, step_count=run["step_count"], spend_pusd=run["spend_pusd"],
                    reserved_pusd=run["reserved_pusd"], tokens_used=run["tokens_input"] + run["tokens_output"],
                    reserved_tokens=run["reserved_tokens"], budget_add_pusd=run["budget_add_pusd"],
                    repeats=int(repeats["n"]) if repeats is not None else 0)


def policy_fields(policy: CompiledPolicy | None) -> dict[str, Any]:
    """A refusal context's policy keys (SPEC §4): the policy governing the run (all None when there is none)."""
    if policy is None:
        return {"policy_id": None, "policy_name": None, "policy_version": None}
    return {"policy_id": policy.id, "policy_name": policy.name, "policy_version": policy.version}


def force_stopped(run_id: str, policy: CompiledPolicy | None = None) -> GovernanceRefusal:
    """The canonical refusal for a run an operator stopped (SPEC §4, kill switch); it names the run's policy."""
    return GovernanceRefusal("An operator stopped this run.", code="run_force_stopped", status=403, run_id=run_id,
                             context={"rule": "run.stopped", **policy_fields(policy),
                                      "next": "Ask an operator to resume the run, or start a new run."},
                             headers=dict(_NO_RETRY))


def refusal(agent_id: str, run_id: str | None, endpoint: str, model: str | None, error: RungateError, *,
            rule: str | None = None, policy: dict[str, Any] | None = None, on_run: bool = False,
            step_id: str | None = None, extra: Sequence[Event] = ()) -> Refused:
    """Refuse a call with `error` and record the refusal (`CallRefused`, then `extra`): on the run's stream when
    the call was refused inside a run of this agent (`on_run`: its audit trail and replay show every decision),
    else on the agent's (no run of its own: the run was another agent's, or the call would have started it)."""
    stream = run_stream(run_id) if on_run and run_id is not None else stream_name("agent", agent_id)
    refused = CallRefused(
        agent_id=agent_id, run_id=run_id, endpoint=endpoint, model=model, status=error.status, code=error.code,
        reason=error.message, rule=rule or (error.context.get("rule") if isinstance(error, GovernanceRefusal)
                                             else None), policy=policy, step_id=step_id)
    return Refused(error, [NewEvent(stream, event) for event in (refused, *extra)])


def agent_disabled(run_id: str | None, policy: CompiledPolicy | None = None) -> GovernanceRefusal:
    """The canonical refusal for a disabled agent (SPEC §4); it names the policy that governs (or would
    govern) the call's run."""
    return GovernanceRefusal("This agent is disabled.", code="agent_disabled", status=403, run_id=run_id,
                             context={"rule": "agent.disabled", **policy_fields(policy),
                                      "next": "Ask an operator to enable the agent."})


@dataclass
class SettleStep:
    """Close a step exactly once: append its `StepCompleted` only while the step is still `started`.

    With `completed`, that event is recorded. Without it the step is closed as `reason` says: by default
    abandoned (its process died or its caller vanished after forwarding) and charged its reservation,
    never booked as $0; with `charge_reservation=False` (nothing was forwarded) at no cost.
    With `run_id` (or `budget_from_run`, for the sweeper, which knows nothing of the call: the step's own
    run), the run is read too: `run_after` holds its spend, reservations and tokens as they are once this
    settlement is folded in (what the budget headers report), and the caps of the policy the run is bound
    to raise their alerts (`BudgetAlerted`) and `BudgetExceeded`.
    """

    step_id: str
    completed: StepCompleted | None = None
    reason: str = "the call was never settled (process stopped or caller vanished)"
    charge_reservation: bool = True
    run_id: str | None = None
    budget_from_run: bool = False
    run_after: RunState | None = None
    then: tuple[NewEvent, ...] = ()  # appended with the settlement, only if it happens (a held answer's)
    settled_now: bool = False  # after `execute`: this command closed the step (and appended `then`)

    def __post_init__(self) -> None:
        self._step = Lookup.of("steps", "status", "run_id", "provider", "model", "reserved_pusd", "reserved_tokens",
                               id=self.step_id)
        self._run = _run_lookup(self.run_id) if self.run_id is not None else None

    def lookups(self) -> Sequence[Lookup]:
        return (self._step,) if self._run is None else (self._step, self._run)

    def more_lookups(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[Lookup]:
        """The step's run (`budget_from_run`), the policy version it is bound to, and — when that policy
        alerts on the agent's hourly cap — the agent's spend over the last hour."""
        step = found[self._step]
        if step is None or step["status"] != "started":
            return ()
        if self._run is None:
            if not self.budget_from_run:
                return ()
            self._run = _run_lookup(step["run_id"])
            return (self._run,)
        run = found.get(self._run)
        wanted: list[Lookup] = []
        policy = _known_policy(found, None if run is None else _run_ref(run), wanted)
        if run is not None and policy is not None and budgets.hour_alerts(policy):
            wanted.append(budgets.hour_spend(run["agent_id"], now))
        return wanted

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        step = found[self._step]
        if step is None:
            raise StoreError(f"step {self.step_id} does not exist", status=500, code="unknown_step")
        if step["status"] != "started":
            return ()
        event = self.completed or StepCompleted(
            step_id=self.step_id, run_id=step["run_id"],
            status="abandoned" if self.charge_reservation else "cancelled", provider=step["provider"],
            model=step["model"], usage={}, cost_pusd=step["reserved_pusd"] if self.charge_reservation else 0,
            estimated=self.charge_reservation, latency_ms=0, error=self.reason)
        self.settled_now = True
        events = [NewEvent(run_stream(step["run_id"]), event), *self.then]
        run = found[self._run] if self._run is not None else None
        if run is None:
            return events
        before = _state(run["id"], run, None)
        tokens = Usage.from_dict(event.usage).total
        cost = event.cost_pusd or 0
        self.run_after = RunState(
            run["id"], step_count=before.step_count, spend_pusd=before.spend_pusd + cost,
            reserved_pusd=before.reserved_pusd - step["reserved_pusd"], tokens_used=before.tokens_used + tokens,
            reserved_tokens=before.reserved_tokens - step["reserved_tokens"], budget_add_pusd=before.budget_add_pusd)
        policy = _found_policy(found, _run_ref(run))
        if policy is not None:
            hour = budgets.hour_after(found, policy, run["agent_id"], now, cost)
            events.extend(NewEvent(run_stream(run["id"]), e)
                          for e in budgets.signals(run, policy, self.run_after, self.step_id, hour))
        return events


def _operated(run_id: str) -> Lookup:
    return Lookup.of("runs", "id", "status", id=run_id)


def _operated_run(found: Mapping[Lookup, Row | None], run_id: str) -> Row:
    """The run an operator stops or resumes: 404 when unknown, 409 once completed."""
    run = found[_operated(run_id)]
    if run is None:
        raise NotFound(f"Run {run_id} not found.")
    if run["status"] == "completed":
        raise _run_closed(run_id, run["status"])
    return run


@dataclass
class StopRun:
    """The kill switch: refuse every later call of the run (403 `run_force_stopped`) until it is resumed.

    Stopping a stopped run changes nothing; a completed run cannot be stopped (409). Cutting the calls
    already in flight is the proxy's part (`rungate.proxy.inflight`), after this is recorded.
    """

    run_id: str
    reason: str | None = None
    stopped: bool = False

    def lookups(self) -> Sequence[Lookup]:
        return (_operated(self.run_id),)

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        run = _operated_run(found, self.run_id)
        if run["status"] == "stopped":
            return ()
        self.stopped = True
        return (NewEvent(run_stream(self.run_id), RunStopped(run_id=self.run_id, reason=self.reason)),)


@dataclass
class ResumeRun:
    """Let a stopped (or blocked) run take calls again, optionally adding `add_pusd` to its USD budget.

    On an active run only the top-up applies; a completed run cannot be resumed (409).
    """

    run_id: str
    add_pusd: int = 0

    def lookups(self) -> Sequence[Lookup]:
        return (_operated(self.run_id),)

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        run = _operated_run(found, self.run_id)
        if run["status"] == "active" and self.add_pusd == 0:
            return ()
        return (NewEvent(run_stream(self.run_id), RunResumed(run_id=self.run_id, add_pusd=self.add_pusd)),)


@dataclass
class CompleteRun:
    """Close a run on the agent's request; completing a closed run changes nothing (idempotent)."""

    agent_id: str
    run_id: str
    ended_reason: str
    metadata: dict[str, Any]
    # Only the refusal of a disabled agent (before its body is read): changes nothing if it was enabled meanwhile.
    refusing_disabled: bool = False

    def __post_init__(self) -> None:
        self._run = Lookup.of("runs", id=self.run_id)
        self._agent = _admitting_agent(self.agent_id)

    def lookups(self) -> Sequence[Lookup]:
        return (self._run, self._agent)

    def _own_run(self, found: Mapping[Lookup, Row | None]) -> Row | None:
        run = found[self._run]
        return run if run is not None and run["agent_id"] == self.agent_id else None

    def more_lookups(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[Lookup]:
        wanted: list[Lookup] = []
        agent, run = found[self._agent], self._own_run(found)
        if agent is not None and agent["disabled"] and run is not None:  # its refusal names the run's policy
            _known_policy(found, _run_ref(run), wanted)
        return wanted

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        agent, run = found[self._agent], self._own_run(found)
        if agent is None:
            raise Unauthorized("Unknown agent token.")
        if agent["disabled"]:  # judged here, not at authentication, so the refusal is recorded with the policy
            policy = _found_policy(found, _run_ref(run)) if run is not None else None
            raise refusal(self.agent_id, self.run_id if run is not None else None, "complete", None,
                          agent_disabled(self.run_id if run is not None else None, policy),
                          policy=None if policy is None else policy.ref, on_run=run is not None)
        if self.refusing_disabled:
            return ()
        if run is None:
            raise NotFound(f"Run {self.run_id} not found.")  # another agent's run looks absent
        if run["status"] in CLOSED:
            return ()
        return (NewEvent(run_stream(self.run_id), RunCompleted(
            run_id=self.run_id, status="completed", ended_reason=self.ended_reason, metadata=self.metadata)),)


@dataclass
class LogToolStep:
    """Record a tool step the agent reports; starts the run when the id is new (the SDK may log first).

    The run's policy applies as it does to model calls: a blocked tool and a run past `max_steps` are
    refused (and the refusal recorded); a stopped run refuses the step. A step's own cost is always
    recorded — it was spent — and a run over its budget refuses the next model call instead.
    A step whose tool call an approval rule gates is held instead of recorded (`held`); the same request
    sent again (`fingerprint`) gets the hold's state (`hold`, `hold_outcome`), and once approved the step is
    recorded once, under the held step's id (a logged step is approved or rejected as it is, not edited).
    """

    agent_id: str
    run_id: str
    step: ToolStepLogged
    fingerprint: str = ""
    policy: CompiledPolicy | None = None
    warnings: list[str] = field(default_factory=list)
    held: Hold | None = None
    hold: Row | None = None
    hold_outcome: str | None = None
    # Only the refusal of a disabled agent's call (before its body is read): records nothing if the agent was
    # enabled meanwhile.
    refusing_disabled: bool = False

    def __post_init__(self) -> None:
        self._run = Lookup.of("runs", *_RUN_COLUMNS, id=self.run_id)
        self._agent = Lookup.of("agents", "disabled", "policy_id", id=self.agent_id)

    def lookups(self) -> Sequence[Lookup]:
        return (self._run, self._agent)

    def _ref_lookup(self, found: Mapping[Lookup, Row | None]) -> Lookup | None:
        agent, run = found[self._agent], found[self._run]
        if run is None and agent is not None and agent["policy_id"] is not None:
            return Lookup.of("policies", "id", "version", id=agent["policy_id"], deleted=0)
        return None

    def _ref(self, found: Mapping[Lookup, Row | None]) -> tuple[str, int] | None:
        run = found[self._run]
        if run is not None:
            return _run_ref(run)
        ref_lookup = self._ref_lookup(found)
        row = found.get(ref_lookup) if ref_lookup is not None else None
        return (row["id"], int(row["version"])) if row is not None else None

    def more_lookups(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[Lookup]:
        wanted = [lookup for lookup in (self._ref_lookup(found),) if lookup is not None]
        policy = _known_policy(found, self._ref(found), wanted)
        if policy is not None and found[self._run] is not None and budgets.hour_alerts(policy) and self.step.cost_pusd:
            wanted.append(budgets.hour_spend(self.agent_id, now))
        if policy is not None and policy.approvals and found[self._run] is not None and self.fingerprint:
            _hold_and_gates(found, self.run_id, self.fingerprint, wanted)
        return wanted

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        run = found[self._run]
        events: list[NewEvent] = []
        if run is not None and run["agent_id"] != self.agent_id:
            raise refusal(self.agent_id, self.run_id, "steps", None, _run_unavailable())
        ref = self._ref(found)
        if ref is not None:
            self.policy = cached_policy(*ref) or _compile(found, *ref)
        own = run is not None  # refusals inside the agent's own run are on the run's stream
        agent = found[self._agent]
        if agent is None:
            raise Unauthorized("Unknown agent token.")
        if agent["disabled"]:  # judged here, not at authentication, so the refusal is recorded and names the policy
            raise refusal(self.agent_id, self.run_id, "steps", None, agent_disabled(self.run_id, self.policy),
                          policy=None if self.policy is None else self.policy.ref, on_run=own)
        if self.refusing_disabled:
            return []
        if run is not None and run["status"] == "stopped":
            raise refusal(self.agent_id, self.run_id, "steps", None, force_stopped(self.run_id, self.policy),
                          policy=None if self.policy is None else self.policy.ref, on_run=own)
        if run is not None and run["status"] in CLOSED:
            raise refusal(self.agent_id, self.run_id, "steps", None, _run_closed(self.run_id, run["status"]),
                          on_run=own)
        if self.step.run_id != self.run_id:
            raise ValueError("the step belongs to another run")
        if run is not None and self.policy is not None and self.policy.approvals and self.fingerprint:
            hold = found.get(hold_lookup(self.run_id, self.fingerprint))
            if hold is not None:  # the same step sent again: its hold decides, not the rules
                return self._retry_held(hold, run, found, now)
        decisions: list[dict[str, Any]] = []
        if self.policy is not None:
            state = _state(self.run_id, run, None)
            ask = CallAsk("", "", 0, 0, True, (self.step.tool,), kind="tool")
            for verdict in evaluate(self.policy, state, ask):
                if not verdict.shadow:
                    raise refusal(self.agent_id, self.run_id, "steps", None,
                                  governance_error(self.policy, self.run_id, verdict, self.step.step_id),
                                  rule=verdict.rule, policy=self.policy.ref, on_run=own,
                                  step_id=self.step.step_id)
                self.warnings.append(f"shadow: {verdict.code} ({verdict.rule}): {verdict.message}")
                decisions.append({"rule": verdict.rule, "code": verdict.code, "mode": "shadow",
                                  "message": verdict.message})
        if run is None:
            events.append(NewEvent(run_stream(self.run_id), RunStarted(
                run_id=self.run_id, agent_id=self.agent_id, auto=False,
                policy=None if self.policy is None else self.policy.ref)))
        if self.policy is not None:  # the step names the policy version that admitted it, and its shadow verdicts
            self.step = self.step.model_copy(update={"policy": self.policy.ref, "warnings": decisions})
        gate_events, held = self._gate(now)
        if held:
            return [*events, *gate_events]
        return [*events, *self._logged(run, found, now), *gate_events]

    def _gate(self, now: str) -> tuple[list[NewEvent], bool]:
        """Events for the approval rule that gates this step's tool call, and whether it holds the step
        (nothing is recorded as done then); a shadow rule only records that it would have held it."""
        if self.policy is None or not self.policy.approvals or not self.fingerprint:
            return [], False
        match = self.policy.approvals.gate(self.step.tool, self.step.args, self.step.step_id)
        if match is None:
            return [], False
        if match.mode == "shadow":
            event, warning = shadowed(match, self.run_id, self.step.step_id)
            self.warnings.append(warning)
            return [event], False
        self.held = hold_answer(
            run_id=self.run_id, agent_id=self.agent_id, step_id=self.step.step_id, origin="step", endpoint="steps",
            fingerprint=self.fingerprint, stream=False, http_status=201, headers={},
            body=canonical_json(self.step.payload()).encode(), matches=[match], policy=self.policy, now=now)
        return list(self.held.events), True

    def _logged(self, run: Row | None, found: Mapping[Lookup, Row | None], now: str) -> list[NewEvent]:
        """The step itself, and the alerts its cost raises on the run's caps."""
        events = [NewEvent(run_stream(self.run_id), self.step)]
        cost, usage = self.step.cost_pusd or 0, self.step.usage
        if run is not None and self.policy is not None:
            # A tool's own cost and tokens count towards the run's caps and alerts like a model call's do.
            before = _state(self.run_id, run, None)
            after = replace(before, spend_pusd=before.spend_pusd + cost,
                            tokens_used=before.tokens_used + usage.get("input", 0) + usage.get("output", 0))
            hour = budgets.hour_after(found, self.policy, self.agent_id, now, cost)
            events.extend(NewEvent(run_stream(self.run_id), e)
                          for e in budgets.signals(run, self.policy, after, self.step.step_id, hour))
        return events

    def _retry_held(self, hold: Row, run: Row, found: Mapping[Lookup, Row | None], now: str) -> list[NewEvent]:
        outcome, retried = held_retry(found, hold, self.run_id, now)
        if outcome == "rejected":
            raise refusal(self.agent_id, self.run_id, "steps", None,
                          approval_rejected(self.run_id, hold, now, self.policy), rule=f"approvals.{hold['rule']}",
                          policy=None if self.policy is None else self.policy.ref, on_run=True)
        self.hold, self.hold_outcome = hold, "pending" if outcome == "pending" else "released"
        if outcome == "pending" or hold["released"]:
            return [retried]
        # Approved: the held step is recorded now, once, under its own id (a step's arguments are not edited).
        update: dict[str, Any] = {"step_id": hold["step_id"]}
        if self.policy is not None:
            update["policy"] = self.policy.ref
        self.step = self.step.model_copy(update=update)
        return [*self._logged(run, found, now), retried]


@dataclass
class CloseIdleRun:
    """Close an auto-run whose last activity is older than its idle window (re-checked atomically).

    The window is the run's own (its policy's `runs.idle_timeout_s`) or, without one, `idle_timeout_s`.
    """

    run_id: str
    idle_timeout_s: int

    def lookups(self) -> Sequence[Lookup]:
        return (Lookup.of("runs", "status", "open_steps", "last_activity_at", "idle_timeout_s", id=self.run_id),
                open_holds(self.run_id))

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        run = found[self.lookups()[0]]
        if run is None or run["status"] != "active" or not _idle(run, now, idle_window(run, self.idle_timeout_s)):
            return ()
        if _held_up(found, self.run_id):  # an answer waits for its approval (or its delivery)
            return ()
        return (NewEvent(run_stream(self.run_id), RunCompleted(
            run_id=self.run_id, status="completed", ended_reason="idle_timeout")),)
