"""Responses API output shapes built from Anthropic answers (pure, no I/O).

The `response` object, its `message` and `function_call` items, their ids, status and usage, shared by the
non-stream translator (`rungate.translate.responses`) and the stream translator
(`rungate.translate.responses_stream`) so both paths give the agent the same thing.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import orjson

from rungate.translate.common import safe_tool_id, usage_to_responses
from rungate.usage import Usage

__all__ = [
    "compact_json",
    "dropped_warning",
    "function_call_item",
    "function_call_item_id",
    "message_item",
    "message_item_id",
    "output_text_part",
    "response_id_for",
    "response_object",
    "responses_usage",
    "terminal_status",
]

# Anthropic stop reasons that cut the answer short -> Responses `incomplete_details.reason`.
_INCOMPLETE: dict[str, str] = {
    "max_tokens": "max_output_tokens",
    "model_context_window_exceeded": "max_output_tokens",
    "refusal": "content_filter",
}

_DROPPED_KINDS: dict[str, str] = {
    "thinking": "thinking dropped: a Responses answer cannot carry Anthropic thinking blocks",
    "redacted_thinking": "redacted thinking dropped: a Responses answer cannot carry Anthropic thinking blocks",
    "citations": "citations dropped: Anthropic citations have no Responses annotation equivalent",
}


def terminal_status(stop_reason: Any) -> tuple[str, str | None]:
    """(`status`, `incomplete_details.reason`) of the response for an Anthropic stop reason."""
    reason = _INCOMPLETE.get(stop_reason) if isinstance(stop_reason, str) else None
    return ("incomplete", reason) if reason else ("completed", None)


def dropped_warning(kind: str) -> str:
    """The warning for content of Anthropic `kind` that a Responses answer cannot carry."""
    return _DROPPED_KINDS.get(kind, f"{kind} content dropped: it has no Responses equivalent")


def compact_json(value: Any) -> str:
    """Compact JSON text of a decoded JSON value; ValueError when it cannot be serialised."""
    try:
        return orjson.dumps(value).decode("utf-8")
    except TypeError:  # orjson refuses ints beyond 64 bits, lone surrogates and deep nesting
        pass
    try:
        return json.dumps(value, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"not serialisable as JSON: {exc}") from None


def response_id_for(message_id: Any) -> str:
    """A `resp_...` id derived from the Anthropic message id (a fresh one when there is none)."""
    if isinstance(message_id, str) and message_id:
        return "resp_" + safe_tool_id(message_id.removeprefix("msg_"))
    return "resp_" + uuid.uuid4().hex


def message_item_id(response_id: str, ordinal: int) -> str:
    """Id of the `ordinal`-th message item of a response (unique within it)."""
    base = "msg_" + response_id.removeprefix("resp_")
    return base if ordinal == 0 else f"{base}_{ordinal}"


def function_call_item_id(call_id: str, output_index: int) -> str:
    """Id of a function_call item (the output index keeps it unique even if call ids repeat)."""
    return f"fc_{safe_tool_id(call_id)}_{output_index}"


def output_text_part(text: str) -> dict[str, Any]:
    """An `output_text` content part."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """An assistant `message` output item with one `output_text` part."""
    return {"type": "message", "id": item_id, "role": "assistant", "status": status,
            "content": [output_text_part(text)]}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    """A `function_call` output item."""
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def responses_usage(usage: Usage | None) -> dict[str, Any] | None:
    """The Responses `usage` object (None when the upstream reported none)."""
    if usage is None:
        return None
    out = usage_to_responses(usage)
    # The openai SDK's `InputTokensDetails` requires `cache_write_tokens`; Anthropic bills cache writes.
    out["input_tokens_details"]["cache_write_tokens"] = usage.cache_write + usage.cache_write_1h
    return out


def response_object(*, response_id: str, created: int, model: str, status: str, output: list[dict[str, Any]],
                    usage: dict[str, Any] | None, incomplete_reason: str | None = None) -> dict[str, Any]:
    """A Responses `response` object. Request echoes (tools, tool_choice, sampling) carry defaults: the
    translators see only the answer; the proxy may overwrite them from the agent's request."""
    return {
        "id": response_id, "object": "response", "created_at": created, "status": status, "background": False,
        "error": None, "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": None, "max_output_tokens": None, "metadata": {}, "model": model, "output": output,
        "parallel_tool_calls": True, "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
        "store": False, "temperature": None, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
        "tools": [], "top_p": None, "truncation": "disabled", "usage": usage, "user": None,
    }
