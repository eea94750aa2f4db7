"""Wire-format builders for the mock provider (private; see `rungate.providers.mock`).

Everything here is a pure function of a `Plan` (what to answer) and the request body, so the same
request always renders to the same bytes. SSE helpers return a list of fully framed events; the last
element is always the stream's terminal event (`[DONE]`, `response.completed`/`incomplete`,
`message_stop`), which lets the caller cut a stream before it.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Any

import orjson

CREATED = 1767225600
"""Fixed `created` / `created_at` timestamp (2026-01-01T00:00:00Z) of every mock answer."""

ARG_PIECE = 8
"""Characters of tool-call argument JSON per streamed fragment."""

MODEL_IDS = ("gpt-4o", "gpt-4o-mini", "o4-mini", "text-embedding-3-small", "claude-sonnet-4-6",
             "claude-haiku-4-5")

Json = dict[str, Any]


@dataclass(frozen=True)
class ToolCall:
    """One tool call requested by a `[tool:NAME {args}]` directive; `arguments` is compact JSON."""

    name: str
    arguments: str

    @property
    def tokens(self) -> int:
        """Output tokens charged for this call."""
        return max(1, math.ceil(len(self.arguments) / 4))

    def pieces(self) -> list[str]:
        """The argument JSON split into streaming fragments."""
        return [self.arguments[i:i + ARG_PIECE] for i in range(0, len(self.arguments), ARG_PIECE)]


@dataclass(frozen=True)
class Plan:
    """What the mock answers: text pieces (concatenating to the reply) or tool calls, and usage."""

    digest: str
    model: str
    pieces: tuple[str, ...]
    tool_calls: tuple[ToolCall, ...]
    truncated: bool
    input_tokens: int
    cached_tokens: int
    reasoning_tokens: int

    @property
    def text(self) -> str:
        """The full reply text (empty when answering with tool calls)."""
        return "".join(self.pieces)

    @property
    def output_tokens(self) -> int:
        """Visible output tokens: reply words, or the tool calls' argument sizes."""
        if self.tool_calls:
            return sum(call.tokens for call in self.tool_calls)
        return len(self.pieces)

    def call_id(self, prefix: str, index: int) -> str:
        """Deterministic id of tool call `index`, e.g. `call_mock_<digest>_0`."""
        return f"{prefix}_mock_{self.digest}_{index}"


def sse_data(payload: Json | str) -> bytes:
    """One OpenAI Chat SSE event (a lone `data:` line)."""
    data = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
    return b"data: " + data + b"\n\n"


def sse_event(payload: Json) -> bytes:
    """One named SSE event (`event:` line + `data:` line) whose name is the payload's `type`."""
    return b"event: " + str(payload["type"]).encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


# --- errors ---------------------------------------------------------------------------------------

_OPENAI_ERRORS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
    402: ("billing_error", "payment_required"), 403: ("permission_error", "permission_denied"),
    404: ("invalid_request_error", "model_not_found"), 429: ("requests", "rate_limit_exceeded"),
}
_ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                     403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                     429: "rate_limit_error", 500: "api_error", 504: "timeout_error",
                     529: "overloaded_error"}


def openai_error(status: int, message: str) -> Json:
    """OpenAI error body for `status`."""
    kind, code = _OPENAI_ERRORS.get(status, ("server_error" if status >= 500 else "invalid_request_error",
                                              None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def anthropic_error(status: int, message: str, digest: str) -> Json:
    """Anthropic error body for `status`."""
    kind = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": f"req_mock_{digest}"}


# --- OpenAI Chat Completions ----------------------------------------------------------------------

def _chat_usage(plan: Plan) -> Json:
    prompt = plan.input_tokens + plan.cached_tokens
    completion = plan.output_tokens + plan.reasoning_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": plan.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": plan.reasoning_tokens, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def _finish_reason(plan: Plan) -> str:
    return "tool_calls" if plan.tool_calls else "length" if plan.truncated else "stop"


def chat_completion(plan: Plan) -> Json:
    """A non-streaming `chat.completion` object."""
    message: Json = {"role": "assistant", "content": None if plan.tool_calls else plan.text, "refusal": None,
                     "annotations": []}
    if plan.tool_calls:
        message["tool_calls"] = [
            {"id": plan.call_id("call", i), "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}
            for i, call in enumerate(plan.tool_calls)]
    return {"id": f"chatcmpl-mock-{plan.digest}", "object": "chat.completion", "created": CREATED,
            "model": plan.model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": _finish_reason(plan)}],
            "usage": _chat_usage(plan), "service_tier": "default", "system_fingerprint": "fp_mock"}


def chat_events(plan: Plan, include_usage: bool) -> list[bytes]:
    """The `chat.completion.chunk` SSE stream, ending in `data: [DONE]`."""
    def chunk(delta: Json, finish: str | None = None) -> bytes:
        return sse_data({"id": f"chatcmpl-mock-{plan.digest}", "object": "chat.completion.chunk",
                         "created": CREATED, "model": plan.model, "service_tier": "default",
                         "system_fingerprint": "fp_mock",
                         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                         "usage": None})

    events = [chunk({"role": "assistant", "content": None if plan.tool_calls else "", "refusal": None})]
    events += [chunk({"content": piece}) for piece in plan.pieces]
    for i, call in enumerate(plan.tool_calls):
        events.append(chunk({"tool_calls": [{"index": i, "id": plan.call_id("call", i), "type": "function",
                                             "function": {"name": call.name, "arguments": ""}}]}))
        events += [chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
                   for piece in call.pieces()]
    events.append(chunk({}, _finish_reason(plan)))
    if include_usage:
        events.append(sse_data({"id": f"chatcmpl-mock-{plan.digest}", "object": "chat.completion.chunk",
                                "created": CREATED, "model": plan.model, "service_tier": "default",
                                "system_fingerprint": "fp_mock", "choices": [], "usage": _chat_usage(plan)}))
    events.append(sse_data("[DONE]"))
    return events


# --- OpenAI Responses -----------------------------------------------------------------------------

def _responses_items(plan: Plan) -> list[Json]:
    if plan.tool_calls:
        return [{"type": "function_call", "id": plan.call_id("fc", i), "call_id": plan.call_id("call", i),
                 "name": call.name, "arguments": call.arguments, "status": "completed"}
                for i, call in enumerate(plan.tool_calls)]
    return [{"type": "message", "id": f"msg_mock_{plan.digest}", "role": "assistant",
             "status": "incomplete" if plan.truncated else "completed",
             "content": [{"type": "output_text", "text": plan.text, "annotations": [], "logprobs": []}]}]


def response_object(plan: Plan, body: Json, *, final: bool) -> Json:
    """A `response` object: the finished one (`final`) or the in-progress snapshot of a stream."""
    incomplete = final and plan.truncated and not plan.tool_calls
    usage = None
    if final:
        output = plan.output_tokens + plan.reasoning_tokens
        usage = {"input_tokens": plan.input_tokens + plan.cached_tokens,
                 "input_tokens_details": {"cached_tokens": plan.cached_tokens, "cache_write_tokens": 0},
                 "output_tokens": output,
                 "output_tokens_details": {"reasoning_tokens": plan.reasoning_tokens},
                 "total_tokens": plan.input_tokens + plan.cached_tokens + output}
    return {"id": f"resp_mock_{plan.digest}", "object": "response", "created_at": CREATED,
            "status": ("incomplete" if incomplete else "completed") if final else "in_progress",
            "background": False, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "metadata": body.get("metadata") or {}, "model": plan.model,
            "output": _responses_items(plan) if final else [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None}, "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0), "text": {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
            "top_p": body.get("top_p", 1.0), "truncation": body.get("truncation", "disabled"),
            "usage": usage, "user": None}


def responses_events(plan: Plan, body: Json) -> list[bytes]:
    """The Responses SSE stream (`event:` + `data:` with `sequence_number`), ending in the terminal event."""
    snapshot = response_object(plan, body, final=False)
    events: list[Json] = [{"type": "response.created", "response": snapshot},
                          {"type": "response.in_progress", "response": snapshot}]
    for index, item in enumerate(_responses_items(plan)):
        where = {"item_id": item["id"], "output_index": index}
        if item["type"] == "function_call":
            call = plan.tool_calls[index]
            events.append({"type": "response.output_item.added", "output_index": index,
                           "item": {**item, "arguments": "", "status": "in_progress"}})
            events += [{"type": "response.function_call_arguments.delta", **where, "delta": piece}
                       for piece in call.pieces()]
            events.append({"type": "response.function_call_arguments.done", **where, "name": call.name,
                           "arguments": call.arguments})
        else:
            part = item["content"][0]
            events.append({"type": "response.output_item.added", "output_index": index,
                           "item": {**item, "status": "in_progress", "content": []}})
            events.append({"type": "response.content_part.added", **where, "content_index": 0,
                           "part": {**part, "text": ""}})
            events += [{"type": "response.output_text.delta", **where, "content_index": 0, "delta": piece,
                        "logprobs": []} for piece in plan.pieces]
            events.append({"type": "response.output_text.done", **where, "content_index": 0,
                           "text": plan.text, "logprobs": []})
            events.append({"type": "response.content_part.done", **where, "content_index": 0, "part": part})
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
    final = response_object(plan, body, final=True)
    events.append({"type": f"response.{final['status']}", "response": final})
    return [sse_event({**event, "sequence_number": seq}) for seq, event in enumerate(events)]


# --- Anthropic Messages ---------------------------------------------------------------------------

def _anthropic_usage(plan: Plan, output_tokens: int) -> Json:
    return {"input_tokens": plan.input_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": plan.cached_tokens,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "output_tokens": output_tokens, "service_tier": "standard"}


def _stop_reason(plan: Plan) -> str:
    return "tool_use" if plan.tool_calls else "max_tokens" if plan.truncated else "end_turn"


def _anthropic_blocks(plan: Plan) -> list[Json]:
    if plan.tool_calls:
        return [{"type": "tool_use", "id": plan.call_id("toolu", i), "name": call.name,
                 "input": orjson.loads(call.arguments)} for i, call in enumerate(plan.tool_calls)]
    return [{"type": "text", "text": plan.text, "citations": None}] if plan.pieces else []


def anthropic_message(plan: Plan) -> Json:
    """A non-streaming Messages `message` object."""
    return {"id": f"msg_mock_{plan.digest}", "type": "message", "role": "assistant", "model": plan.model,
            "content": _anthropic_blocks(plan), "stop_reason": _stop_reason(plan), "stop_sequence": None,
            "usage": _anthropic_usage(plan, plan.output_tokens)}


def anthropic_events(plan: Plan) -> list[bytes]:
    """The Messages SSE stream (`event:` + `data:` lines), ending in `message_stop`."""
    start = {**anthropic_message(plan), "content": [], "stop_reason": None,
             "usage": _anthropic_usage(plan, min(1, plan.output_tokens))}
    events: list[Json] = [{"type": "message_start", "message": start}, {"type": "ping"}]
    for index, block in enumerate(_anthropic_blocks(plan)):
        if block["type"] == "tool_use":
            events.append({"type": "content_block_start", "index": index,
                           "content_block": {**block, "input": {}}})
            pieces = ["", *plan.tool_calls[index].pieces()]
            events += [{"type": "content_block_delta", "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": piece}} for piece in pieces]
        else:
            events.append({"type": "content_block_start", "index": index,
                           "content_block": {"type": "text", "text": "", "citations": None}})
            events += [{"type": "content_block_delta", "index": index,
                        "delta": {"type": "text_delta", "text": piece}} for piece in plan.pieces]
        events.append({"type": "content_block_stop", "index": index})
    usage = _anthropic_usage(plan, plan.output_tokens)
    del usage["cache_creation"], usage["service_tier"]
    events.append({"type": "message_delta", "usage": usage,
                   "delta": {"stop_reason": _stop_reason(plan), "stop_sequence": None}})
    events.append({"type": "message_stop"})
    return [sse_event(event) for event in events]


# --- embeddings and models ------------------------------------------------------------------------

def _vector(item: Any, dimensions: int) -> list[float]:
    seed = orjson.dumps(item)
    raw = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range((dimensions + 7) // 8))
    values = [(word / 0xFFFFFFFF) * 2 - 1 for word in struct.unpack(f">{dimensions}I", raw[:dimensions * 4])]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    # Round through float32 so the float and base64 encodings carry exactly the same numbers.
    return list(struct.unpack(f"<{dimensions}f", struct.pack(f"<{dimensions}f", *(v / norm for v in values))))


def embeddings(body: Json, inputs: list[Any], dimensions: int) -> Json:
    """An embeddings list: one unit vector per input, derived from a hash of that input."""
    as_base64 = body.get("encoding_format") == "base64"
    data: list[Json] = []
    tokens = 0
    for index, item in enumerate(inputs):
        vector = _vector(item, dimensions)
        packed = struct.pack(f"<{dimensions}f", *vector)
        encoded: Any = base64.b64encode(packed).decode() if as_base64 else vector
        data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens += len(item) if isinstance(item, list) else max(1, math.ceil(len(str(item)) / 4))
    return {"object": "list", "data": data, "model": body["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def models(anthropic: bool) -> Json:
    """The model list, in Anthropic's shape when the caller is an Anthropic client."""
    if anthropic:
        data = [{"type": "model", "id": m, "display_name": m, "created_at": "2026-01-01T00:00:00Z"}
                for m in MODEL_IDS]
        return {"data": data, "has_more": False, "first_id": MODEL_IDS[0], "last_id": MODEL_IDS[-1]}
    return {"object": "list", "data": [{"id": m, "object": "model", "created": CREATED,
                                        "owned_by": "anthropic" if m.startswith("claude") else "openai"}
                                       for m in MODEL_IDS]}
