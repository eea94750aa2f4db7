"""The proxy's side of approval gates (SPEC §5): which tool calls of an answer are gated, the 202 body, and
the held answer as it is released (with the operator's edited arguments, in the caller's own format).

The handler does the I/O; everything here is a pure function of the policy, the answer and stored rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from aiohttp import web

from rungate import queries
from rungate.approvals import RETRY_AFTER_S, held_body, refuse_unless_editable
from rungate.enforce.gates import GateMatch
from rungate.enforce.policy import CompiledPolicy
from rungate.errors import Conflict, StoreError
from rungate.providers.metering import ToolCall
from rungate.proxy.held import rewrite_answer, rewrite_stream
from rungate.store import EventStore, Row

APPROVAL_MODE_HEADER = "x-rungate-approval-mode"
APPROVAL_MODES = ("202", "hold")


def buffers_stream(policy: CompiledPolicy | None, offered: Sequence[str]) -> bool:
    """Whether a streamed answer must be held back until it is complete: its run's policy gates a tool the
    request offers, so the answer may call it and the 202 must come before any SSE byte."""
    return policy is not None and bool(policy.approvals) and policy.approvals.offers_gated_tool(offered)


def gate_matches(policy: CompiledPolicy | None,
                 tool_calls: Sequence[ToolCall]) -> tuple[list[GateMatch], list[GateMatch]]:
    """The answer's tool calls that need approval (enforced), and those a shadow rule would have held."""
    if policy is None or not policy.approvals:
        return [], []
    enforced: list[GateMatch] = []
    shadowed: list[GateMatch] = []
    for call in tool_calls:
        match = policy.approvals.gate(call.name, call.arguments, call.id)
        if match is not None:
            (shadowed if match.mode == "shadow" else enforced).append(match)
    return enforced, shadowed


def _gate_fields(gate: Mapping[str, Any]) -> dict[str, Any]:
    args = gate["args"]
    if isinstance(args, str):  # a stored row: JSON text
        args = orjson.loads(args)
    return {"gate_id": gate["id"] if "id" in gate else gate["gate_id"], "tool": gate["tool"], "args": args,
            "rule": gate["rule"], "channel": gate["channel"], "expires_at": gate["expires_at"]}


def awaiting_body(run_id: str, hold_id: str, gates: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The SPEC §5 body of a 202: every gate in `approval_requests`, the first one in `context`."""
    fields = [_gate_fields(g) for g in gates]
    first = fields[0]
    tools = ", ".join(sorted({f["tool"] for f in fields}))
    return {
        "status": "awaiting_approval",
        "message": f"The answer calls {tools}, which needs a human's approval. Retry the same request after"
                   f" {RETRY_AFTER_S} s; it is answered once the call is approved.",
        "run_id": run_id,
        "hold_id": hold_id,
        "approval_requests": [{"id": f["gate_id"], "tool": f["tool"], "rule": f["rule"],
                               "expires_at": f["expires_at"]} for f in fields],
        "context": {"gate_id": first["gate_id"], "run_id": run_id, "rule": first["rule"],
                    "proposed_action": {"tool": first["tool"], "args": first["args"]},
                    "approver_channel": first["channel"], "expires_at": first["expires_at"],
                    "retry_after_s": RETRY_AFTER_S},
    }


def _rewritten(hold: Row, edits: Mapping[str, Any]) -> bytes:
    body = held_body(hold)
    if not edits:
        return body
    fmt = str(hold["endpoint"])
    return rewrite_stream(fmt, body, edits) if hold["stream"] else rewrite_answer(fmt, body, edits)


def awaiting_response(run_id: str, hold_id: str, gates: Sequence[Mapping[str, Any]],
                      headers: Mapping[str, str]) -> web.Response:
    """202 (SPEC §5): the answer is held until a human decides; the agent retries the same request after
    `Retry-After`. `headers` are the route's own (`x-rungate-*`)."""
    return web.json_response(awaiting_body(run_id, hold_id, gates), status=202,
                             headers={**headers, "Retry-After": str(RETRY_AFTER_S)},
                             dumps=lambda v: orjson.dumps(v).decode())


def released_answer(hold: Row, gates: Sequence[Row]) -> bytes:
    """The held answer's bytes, with each approved gate's `edited_args` in place of what the model sent
    (in the format it was held in; `check_edit` made sure at approval that each edit applies)."""
    edits = {g["tool_call_id"]: orjson.loads(g["edited_args"]) for g in gates
             if g["edited_args"] is not None and g["tool_call_id"] is not None}
    try:
        return _rewritten(hold, edits)
    except ValueError as exc:
        raise StoreError(f"the held answer cannot be released: {exc}", status=500, code="held_answer_unreadable") \
            from None


def check_edit(hold: Row, gate: Row, edited: Mapping[str, Any]) -> None:
    """409 `edit_not_applicable` unless replacing this gate's call arguments with `edited` changes the held
    answer exactly there (a call the answer names by id, in a format the rewriter reads)."""
    refuse_unless_editable(gate, hold)
    try:
        changed = _rewritten(hold, {gate["tool_call_id"]: dict(edited)})
    except ValueError as exc:
        raise Conflict(f"The edited arguments cannot be put into the held answer: {exc}",
                       code="edit_not_applicable") from None
    if changed == held_body(hold) and gate["args"] != orjson.dumps(dict(edited), option=orjson.OPT_SORT_KEYS).decode():
        raise Conflict("The held answer has no call with this id to edit.", code="edit_not_applicable")


def refusal_answer(fmt: str, model: str, hold_id: str, message: str, code: str = "approval_rejected") -> bytes:
    """What a hold-mode call gets when its gate is rejected, in a 200 the stock SDKs parse (their status line
    went out long ago): a normal answer that refuses — OpenAI chat `finish_reason: "content_filter"` with
    `message.refusal`, Anthropic `stop_reason: "refusal"`, Responses `status: "incomplete"` with a refusal
    part — plus a `rungate` key naming the outcome for clients that look."""
    outcome = {"code": code, "hold_id": hold_id, "message": message}
    if fmt == "messages":
        body: dict[str, Any] = {
            "id": f"msg_{hold_id}", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": message}], "stop_reason": "refusal", "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}
    elif fmt == "responses":
        body = {
            "id": f"resp_{hold_id}", "object": "response", "created_at": 0, "model": model, "status": "incomplete",
            "incomplete_details": {"reason": "content_filter"}, "error": None, "parallel_tool_calls": True,
            "tool_choice": "auto", "tools": [],
            "output": [{"type": "message", "id": f"msg_{hold_id}", "role": "assistant", "status": "incomplete",
                        "content": [{"type": "refusal", "refusal": message}]}],
            "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                      "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}}
    else:
        body = {
            "id": f"chatcmpl-{hold_id}", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "content_filter", "logprobs": None,
                         "message": {"role": "assistant", "content": None, "refusal": message}}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
    body["rungate"] = outcome
    return orjson.dumps(body)


async def checked_edit(store: EventStore, gate_id: str, edited: Mapping[str, Any] | None) -> None:
    """`check_edit` for an operator's decision, reading the gate and its hold (a held answer never changes,
    so reading it outside the decision's transaction is sound). Unknown gate: left to the decision (404)."""
    if edited is None:
        return
    gate = await queries.get_approval_request(store, gate_id)
    hold = None if gate is None else await queries.get_hold(store, gate["hold_id"])
    if gate is not None and hold is not None:
        check_edit(hold, gate, edited)
