"""Run life-cycle commands: admit a call into a run, complete a run, log a tool step, close idle runs.

Each command is a pure decision over rows the store fetches inside the write transaction, so two
concurrent calls can never both start the same run or both see a run open that one of them closes.
Governance rules (issue 3) plug into `AdmitCall.decide`: it is the one place a call is let in.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rungate.clock import iso_minus
from rungate.errors import Conflict, GovernanceRefusal, NotFound, RungateError, StoreError, Unauthorized
from rungate.events import NewEvent, stream_name
from rungate.events.catalogue import (
    CallRefused,
    RunCompleted,
    RunStarted,
    StepCompleted,
    StepStarted,
    ToolStepLogged,
)
from rungate.ids import new_id
from rungate.store.base import Lookup, Refused, Row

CLOSED = ("completed", "stopped", "blocked")
# What admission reads of a run (the write transaction fetches only these).
_RUN_COLUMNS = ("id", "agent_id", "status", "open_steps", "last_activity_at")


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


def _idle(run: Row, now: str, idle_timeout_s: int) -> bool:
    """An auto-run is idle when no call is in flight and nothing happened within the window."""
    return bool(run["open_steps"] == 0 and run["last_activity_at"] < iso_minus(now, idle_timeout_s))


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


@dataclass
class AdmitCall:
    """Resolve the call's run (explicit, auto or new) and record `StepStarted` before anything leaves.

    After `execute`, `run_id`, `step_id` and `started_run` tell the proxy what was decided.
    """

    facts: CallFacts
    step_id: str = field(default_factory=lambda: new_id("stp"))
    run_id: str = ""
    started_run: bool = False

    def __post_init__(self) -> None:
        # Built once: the store asks for them and `decide` indexes its rows by them.
        f = self.facts
        run = (Lookup.of("runs", *_RUN_COLUMNS, id=f.run_id) if f.run_id is not None
               else Lookup.of("runs", *_RUN_COLUMNS, agent_id=f.agent_id, auto=1, status="active"))
        self._lookups = (Lookup.of("agents", "disabled", "token_hash", id=f.agent_id), run)

    def lookups(self) -> Sequence[Lookup]:
        return self._lookups

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        f = self.facts
        agent_lookup, run_lookup = self.lookups()
        agent = found[agent_lookup]
        # Re-checked atomically with admission: an agent disabled or deleted, or a token rotated, a moment ago
        # lets nothing more in (authentication may have read a cached row).
        if agent is None or not hmac.compare_digest(agent["token_hash"], f.token_hash):
            raise Unauthorized("Unknown agent token.")
        if agent["disabled"]:
            self._refuse(agent_disabled(f.run_id))
        run = found[run_lookup]
        events: list[NewEvent] = []
        if f.run_id is not None:
            if run is None:
                events.append(NewEvent(run_stream(f.run_id),
                                       RunStarted(run_id=f.run_id, agent_id=f.agent_id, auto=False)))
                self.started_run = True
            elif run["agent_id"] != f.agent_id:
                self._refuse(_run_unavailable())
            elif run["status"] in CLOSED:
                self._refuse(_run_closed(f.run_id, run["status"]))
            self.run_id = f.run_id
        else:
            idle = run is not None and _idle(run, now, f.idle_timeout_s)
            if run is not None and (idle or f.new_run):
                events.append(NewEvent(run_stream(run["id"]), RunCompleted(
                    run_id=run["id"], status="completed", ended_reason="idle_timeout" if idle else "new_run")))
                run = None
            if run is None:
                self.run_id = new_id("run")
                events.append(NewEvent(run_stream(self.run_id),
                                       RunStarted(run_id=self.run_id, agent_id=f.agent_id, auto=True)))
                self.started_run = True
            else:
                self.run_id = run["id"]
        events.append(NewEvent(run_stream(self.run_id), StepStarted(
            step_id=self.step_id, run_id=self.run_id, kind="llm", endpoint=f.endpoint, provider=f.provider,
            model=f.model, stream=f.stream, fingerprint=f.fingerprint, reserved_pusd=f.reserved_pusd)))
        return events

    def _refuse(self, error: RungateError) -> None:
        f = self.facts
        raise refusal(f.agent_id, f.run_id, f.endpoint, f.model, error)


def refusal(agent_id: str, run_id: str | None, endpoint: str, model: str | None, error: RungateError) -> Refused:
    """Refuse a call with `error` and record the refusal (`CallRefused`) on the agent's stream."""
    return Refused(error, [NewEvent(stream_name("agent", agent_id), CallRefused(
        agent_id=agent_id, run_id=run_id, endpoint=endpoint, model=model, status=error.status, code=error.code,
        reason=error.message))])


def agent_disabled(run_id: str | None) -> GovernanceRefusal:
    """The canonical refusal for a disabled agent (SPEC §4)."""
    return GovernanceRefusal("This agent is disabled.", code="agent_disabled", status=403, run_id=run_id,
                             context={"rule": "agent.disabled", "policy_id": None, "policy_name": None,
                                      "policy_version": None, "next": "Ask an operator to enable the agent."})


@dataclass
class SettleStep:
    """Close a step exactly once: append its `StepCompleted` only while the step is still `started`.

    With `completed`, that event is recorded. Without it the step is closed as `reason` says: by default
    abandoned (its process died or its caller vanished after forwarding) and charged its reservation,
    never booked as $0; with `charge_reservation=False` (nothing was forwarded) at no cost.
    """

    step_id: str
    completed: StepCompleted | None = None
    reason: str = "the call was never settled (process stopped or caller vanished)"
    charge_reservation: bool = True

    def __post_init__(self) -> None:
        self._step = Lookup.of("steps", "status", "run_id", "provider", "model", "reserved_pusd", id=self.step_id)

    def lookups(self) -> Sequence[Lookup]:
        return (self._step,)

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
        return (NewEvent(run_stream(step["run_id"]), event),)


@dataclass
class CompleteRun:
    """Close a run on the agent's request; completing a closed run changes nothing (idempotent)."""

    agent_id: str
    run_id: str
    ended_reason: str
    metadata: dict[str, Any]

    def lookups(self) -> Sequence[Lookup]:
        return (Lookup.of("runs", id=self.run_id),)

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        run = found[self.lookups()[0]]
        if run is None or run["agent_id"] != self.agent_id:
            raise NotFound(f"Run {self.run_id} not found.")  # another agent's run looks absent
        if run["status"] in CLOSED:
            return ()
        return (NewEvent(run_stream(self.run_id), RunCompleted(
            run_id=self.run_id, status="completed", ended_reason=self.ended_reason, metadata=self.metadata)),)


@dataclass
class LogToolStep:
    """Record a tool step the agent reports; starts the run when the id is new (the SDK may log first)."""

    agent_id: str
    run_id: str
    step: ToolStepLogged

    def lookups(self) -> Sequence[Lookup]:
        return (Lookup.of("runs", id=self.run_id),)

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        run = found[self.lookups()[0]]
        events: list[NewEvent] = []
        if run is None:
            events.append(NewEvent(run_stream(self.run_id),
                                   RunStarted(run_id=self.run_id, agent_id=self.agent_id, auto=False)))
        elif run["agent_id"] != self.agent_id:
            raise refusal(self.agent_id, self.run_id, "steps", None, _run_unavailable())
        elif run["status"] in CLOSED:
            raise refusal(self.agent_id, self.run_id, "steps", None, _run_closed(self.run_id, run["status"]))
        if self.step.run_id != self.run_id:
            raise ValueError("the step belongs to another run")
        events.append(NewEvent(run_stream(self.run_id), self.step))
        return events


@dataclass
class CloseIdleRun:
    """Close an auto-run whose last activity is older than the idle window (re-checked atomically)."""

    run_id: str
    idle_timeout_s: int

    def lookups(self) -> Sequence[Lookup]:
        return (Lookup.of("runs", id=self.run_id),)

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        run = found[self.lookups()[0]]
        if run is None or run["status"] != "active" or not _idle(run, now, self.idle_timeout_s):
            return ()
        return (NewEvent(run_stream(self.run_id), RunCompleted(
            run_id=self.run_id, status="completed", ended_reason="idle_timeout")),)
