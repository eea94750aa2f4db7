"""Approval gates (SPEC §5): holding an answer that calls a gated tool, operators' decisions, expiry.

A held answer is one `AnswerHeld` event (the answer itself, exactly as the client would have received it)
and one `ApprovalRequested` per gated tool call, appended atomically with the step's settlement. What
happens to retries of the held request is decided at admission (`rungate.runs.AdmitCall`); what happens
to a gate is decided here, by an operator (`DecideApproval`) or by the clock (`ExpireGate`).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from rungate.clock import iso_plus
from rungate.enforce.gates import GateMatch
from rungate.enforce.policy import CompiledPolicy
from rungate.errors import BadRequest, Conflict, NotFound
from rungate.events import NewEvent, stream_name
from rungate.events.catalogue import (
    AnswerHeld,
    ApprovalDecisionRefused,
    ApprovalExpired,
    ApprovalGranted,
    ApprovalRejected,
    ApprovalRequested,
    ApprovalShadowed,
    HeldAnswerRetried,
)
from rungate.ids import new_id
from rungate.store.base import Lookup, Refused, Row

RETRY_AFTER_S = 5  # what a 202 asks the agent to wait before retrying
MAX_REASON_CHARS = 2000
MAX_DECIDER_CHARS = 200


def _run_stream(run_id: str) -> str:
    return stream_name("run", run_id)


@dataclass
class Hold:
    """The events that hold one answer, and the gates they open (for the 202 body)."""

    hold_id: str
    events: tuple[NewEvent, ...]
    gates: tuple[ApprovalRequested, ...]
    mode: str  # "202" or "hold": how the call waits unless it asks otherwise (`x-rungate-approval-mode`)


def hold_answer(*, run_id: str, agent_id: str, step_id: str, origin: str, endpoint: str, fingerprint: str,
                stream: bool, http_status: int, headers: Mapping[str, str], body: bytes,
                matches: Sequence[GateMatch], policy: CompiledPolicy, now: str) -> Hold:
    """Hold `body` behind one gate per match (at least one). Each gate expires by its own rule; the hold's
    `expires_at` (the earliest) and `on_expiry` are for display: its state is read off its gates."""
    if not matches:
        raise ValueError("a hold needs at least one gate")
    hold_id = new_id("hold")
    gates = tuple(ApprovalRequested(
        gate_id=new_id("gate"), hold_id=hold_id, run_id=run_id, agent_id=agent_id, rule=m.rule, tool=m.tool,
        tool_call_id=m.tool_call_id, args=m.args, args_text=m.args_text,
        channel=m.channel, expires_at=iso_plus(now, m.expires_in), on_expiry=m.on_expiry, policy=policy.ref)
        for m in matches)
    try:
        text, encoding = body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(body).decode("ascii"), "base64"
    held = AnswerHeld(
        hold_id=hold_id, run_id=run_id, agent_id=agent_id, step_id=step_id, origin=origin, endpoint=endpoint,
        fingerprint=fingerprint, stream=stream, http_status=http_status, headers=dict(headers), body=text,
        body_encoding=encoding, gate_ids=[g.gate_id for g in gates], rule=gates[0].rule,
        expires_at=min(g.expires_at for g in gates),
        on_expiry="approve" if all(g.on_expiry == "approve" for g in gates) else "reject",
        mode="hold" if any(m.mode == "hold" for m in matches) else "202", policy=policy.ref)
    stream_id = _run_stream(run_id)
    return Hold(hold_id, (NewEvent(stream_id, held), *(NewEvent(stream_id, g) for g in gates)), gates, held.mode)


def shadowed(match: GateMatch, run_id: str, step_id: str) -> tuple[NewEvent, str]:
    """What a shadow rule that would have held a call leaves: its event, and the agent's warning."""
    return (NewEvent(_run_stream(run_id), ApprovalShadowed(run_id=run_id, step_id=step_id, rule=match.rule,
                                                           tool=match.tool)),
            f"shadow: tool_approval_required (approvals.{match.rule}): {match.tool} would wait for approval")


def held_body(row: Row) -> bytes:
    """The held answer's bytes, as stored in a `holds` row."""
    if row["body_encoding"] == "base64":
        return base64.b64decode(row["body"])
    return str(row["body"]).encode("utf-8")


def gate_lookup(gate_id: str) -> Lookup:
    """One gate, as decisions and hold states read it."""
    return Lookup.of("gates", "id", "hold_id", "run_id", "agent_id", "status", "expires_at", "on_expiry",
                     "tool_call_id", "edited_args", id=gate_id)


def _expired(gate: Row) -> NewEvent:
    outcome = "approved" if gate["on_expiry"] == "approve" else "rejected"
    return NewEvent(_run_stream(gate["run_id"]), ApprovalExpired(
        gate_id=gate["id"], hold_id=gate["hold_id"], run_id=gate["run_id"], outcome=outcome))


def check_decision(decided_by: Any, reason: Any, edited_args: Any = None) -> tuple[str, str | None]:
    """Validate an operator's decision fields (400 with the field named); returns (decided_by, reason)."""
    if decided_by is None:
        decided_by = "admin"
    if not isinstance(decided_by, str) or not decided_by.strip() or len(decided_by) > MAX_DECIDER_CHARS \
            or not decided_by.isprintable():
        raise BadRequest(f"decided_by must be a printable string of at most {MAX_DECIDER_CHARS} characters.",
                         code="invalid_decided_by")
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS):
        raise BadRequest(f"reason must be a string of at most {MAX_REASON_CHARS} characters.", code="invalid_reason")
    if edited_args is not None and not isinstance(edited_args, dict):
        raise BadRequest("edited_args must be a JSON object: the tool call's new arguments.",
                         code="invalid_edited_args")
    return decided_by.strip(), reason


def refuse_unless_editable(gate: Row, hold: Row | None) -> None:
    """409 `edit_not_applicable` unless the gate's call can take edited arguments: a call a model answer
    names by id (a logged step is the agent's own call, approved or rejected as it is)."""
    if gate["tool_call_id"] is None or hold is None or hold["origin"] != "answer":
        raise Conflict("This call's arguments cannot be edited (a logged step, or a call without an id):"
                       " approve or reject it as it is.", code="edit_not_applicable")


@dataclass
class DecideApproval:
    """An operator approves (optionally with `edited_args`) or rejects a pending gate, exactly once.

    Unknown gate: 404. Already decided: 409 `approval_decided`. Past its expiry: 409 `approval_expired`,
    and the expiry is recorded (what the rule's `on_expiry` makes of it), so a late decision changes nothing.
    Edited arguments need a call the answer names by id, and a model answer (a logged step is the agent's
    own call: it is approved or rejected as it is): else 409 `edit_not_applicable`. Whether the edit fits
    the held answer itself is checked by the caller beforehand (`rungate.proxy.gating.check_edit`).
    """

    gate_id: str
    approve: bool
    decided_by: str
    reason: str | None = None
    edited_args: dict[str, Any] | None = None
    gate: Row | None = field(default=None, repr=False)

    def lookups(self) -> Sequence[Lookup]:
        return (gate_lookup(self.gate_id),)

    def more_lookups(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[Lookup]:
        return _hold_and_siblings(found, self.gate_id)

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        gate = self.gate = found[gate_lookup(self.gate_id)]
        if gate is None:
            raise NotFound(f"Approval request {self.gate_id} not found.")
        if self.approve and self.edited_args is not None:
            refuse_unless_editable(gate, found.get(hold_row_lookup(gate["hold_id"])))
        if gate["status"] != "pending":
            raise Conflict(f"Approval request {self.gate_id} is already {gate['status']}.", code="approval_decided",
                           extra={"status": gate["status"]})
        if gate["expires_at"] <= now:
            raise Refused(Conflict(f"Approval request {self.gate_id} expired at {gate['expires_at']}.",
                                   code="approval_expired", extra={"expires_at": gate["expires_at"]}),
                          [_expired(gate)])
        common = {"gate_id": gate["id"], "hold_id": gate["hold_id"], "run_id": gate["run_id"],
                  "decided_by": self.decided_by, "reason": self.reason}
        if self.approve:
            return (NewEvent(_run_stream(gate["run_id"]), ApprovalGranted(**common, edited_args=self.edited_args)),)
        return (NewEvent(_run_stream(gate["run_id"]), ApprovalRejected(**common)),
                *_close_siblings(found, gate, self.decided_by))


@dataclass
class ExpireGate:
    """Record that a pending gate outlived its expiry (the sweeper's part); a no-op otherwise."""

    gate_id: str

    def lookups(self) -> Sequence[Lookup]:
        return (gate_lookup(self.gate_id),)

    def more_lookups(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[Lookup]:
        return _hold_and_siblings(found, self.gate_id)

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        gate = found[gate_lookup(self.gate_id)]
        if gate is None or gate["status"] != "pending" or gate["expires_at"] > now:
            return ()
        if gate["on_expiry"] == "approve":
            return (_expired(gate),)
        return (_expired(gate), *_close_siblings(found, gate, "rungate"))


def _hold_and_siblings(found: Mapping[Lookup, Row | None], gate_id: str) -> list[Lookup]:
    """For `more_lookups`: the gate's hold, then every gate of that hold."""
    gate = found.get(gate_lookup(gate_id))
    if gate is None:
        return []
    hold = found.get(hold_row_lookup(gate["hold_id"]))
    return [hold_row_lookup(gate["hold_id"]), *(gate_lookups(hold) if hold is not None else ())]


def _close_siblings(found: Mapping[Lookup, Row | None], gate: Row, decided_by: str) -> list[NewEvent]:
    """`gate` rejects its answer: the answer's other gates still pending are rejected with it, each its own
    event (and webhook), so no one is left asked to decide a call that will never be delivered."""
    hold = found.get(hold_row_lookup(gate["hold_id"]))
    if hold is None:
        return []
    return [NewEvent(_run_stream(gate["run_id"]), ApprovalRejected(
        gate_id=other["id"], hold_id=other["hold_id"], run_id=other["run_id"], decided_by=decided_by,
        reason=f"another tool call of the same answer ({gate['id']}) was rejected"))
        for other in found_gates(found, hold)
        if other is not None and other["id"] != gate["id"] and other["status"] == "pending"]


def hold_row_lookup(hold_id: str) -> Lookup:
    """A hold's state by its id (what a waiting call and its delivery read)."""
    return Lookup.of("holds", "id", "run_id", "status", "rule", "decided_by", "reason", "gate_ids", "origin",
                     id=hold_id)


def gate_lookups(hold: Row) -> list[Lookup]:
    """The look-ups of every gate of `hold` (a row with `gate_ids`)."""
    return [gate_lookup(gate_id) for gate_id in orjson.loads(hold["gate_ids"])]


def gate_state(gate: Row, now: str) -> str:
    """`pending`, `approved` or `rejected`: one gate as it stands, a gate past its expiry (recorded or not)
    being what its rule's `on_expiry` makes of it."""
    status = str(gate["status"])
    if status == "expired" or (status == "pending" and gate["expires_at"] <= now):
        return "approved" if gate["on_expiry"] == "approve" else "rejected"
    return status


def hold_state(hold: Row, gates: Sequence[Row | None], now: str) -> str:
    """`pending`, `approved` or `rejected`: a held answer is approved once every one of its gates is
    (each by its own expiry too), rejected as soon as one is. Read off the gates themselves, so an expiry
    the sweeper has not recorded yet counts at once, and one gate's expiry never decides another's."""
    if hold["status"] != "pending":
        return str(hold["status"])
    states = [gate_state(g, now) for g in gates if g is not None]
    if len(states) < len(orjson.loads(hold["gate_ids"])):
        return "pending"  # a gate not read (never the case inside a command that asked for them all)
    if "rejected" in states:
        return "rejected"
    return "approved" if all(state == "approved" for state in states) else "pending"


def found_gates(found: Mapping[Lookup, Row | None], hold: Row) -> list[Row | None]:
    return [found.get(lookup) for lookup in gate_lookups(hold)]


@dataclass
class DeliverHold:
    """Record what a waiting (hold-mode) call is given once its hold is decided: `outcome` is `released`
    (the held answer) or `rejected` (a refusal), or `pending` when nothing is decided yet (nothing recorded)."""

    hold_id: str
    outcome: str = "pending"
    hold: Row | None = field(default=None, repr=False)

    def lookups(self) -> Sequence[Lookup]:
        return (hold_row_lookup(self.hold_id),)

    def more_lookups(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[Lookup]:
        hold = found[hold_row_lookup(self.hold_id)]
        return [] if hold is None else gate_lookups(hold)

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        hold = self.hold = found[hold_row_lookup(self.hold_id)]
        if hold is None:
            raise NotFound(f"Hold {self.hold_id} not found.")
        state = hold_state(hold, found_gates(found, hold), now)
        if state == "pending":
            return ()
        self.outcome = "released" if state == "approved" else "rejected"
        return (NewEvent(_run_stream(hold["run_id"]), HeldAnswerRetried(
            hold_id=self.hold_id, run_id=hold["run_id"], outcome=self.outcome)),)


def refused_decision(gate_id: str, agent_id: str | None, reason: str) -> tuple[NewEvent, ...]:
    """The record of someone without the right to decide a gate trying to (recorded on the agent's stream)."""
    stream = stream_name("agent", agent_id) if agent_id is not None else stream_name("gate", gate_id)
    return (NewEvent(stream, ApprovalDecisionRefused(gate_id=gate_id, agent_id=agent_id, reason=reason)),)
