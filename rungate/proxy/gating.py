"""The proxy's side of approval gates (SPEC §5): which tool calls of an answer are gated, the 202 body, and
the held answer as it is released (with the operator's edited arguments, in the caller's own format).

The handler does the I/O; everything here is a pure function of the policy, the answer and stored rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from rungate.approvals import RETRY_AFTER_S, held_body
from rungate.enforce.gates import GateMatch
from rungate.enforce.policy import CompiledPolicy
from rungate.providers.metering import ToolCall
from rungate.proxy.held import rewrite_answer, rewrite_stream
from rungate.store import Row

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


def released_answer(fmt: str, hold: Row, gates: Sequence[Row]) -> bytes:
    """The held answer's bytes, with each approved gate's `edited_args` in place of what the model sent."""
    body = held_body(hold)
    edits = {g["tool_call_id"]: orjson.loads(g["edited_args"]) for g in gates
             if g["edited_args"] is not None and g["tool_call_id"] is not None}
    if not edits:
        return body
    return rewrite_stream(fmt, body, edits) if hold["stream"] else rewrite_answer(fmt, body, edits)


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
