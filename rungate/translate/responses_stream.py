"""Anthropic Messages streams served to OpenAI Responses clients, event by event (pure, no I/O).

Also home of the Responses output shapes (`response` object, `message` and `function_call` items, usage)
that `rungate.translate.responses` shares for non-stream answers, so both paths give the agent the same thing.

Contract of `MessagesToResponses`:

- `feed(event)` takes one upstream Anthropic event (as `SSEParser` gives it) and returns the Responses events
  to send on, each fully framed: an `event: <type>` line and a `data:` JSON object whose `type` matches,
  with a `sequence_number` counting from 0 across the whole stream.
- Order: `response.created` and `response.in_progress` (at `message_start`); per output item
  `response.output_item.added`, then either `response.content_part.added`, `response.output_text.delta`...,
  `response.output_text.done`, `response.content_part.done` (a `message` item) or
  `response.function_call_arguments.delta`..., `response.function_call_arguments.done` (a `function_call`
  item), then `response.output_item.done`; last `response.completed`, or `response.incomplete` when the
  answer was cut short (`max_tokens`, context window: `max_output_tokens`; `refusal`: `content_filter`),
  carrying the whole response object with usage (the only place a Responses stream reports usage).
- A run of text blocks forms one `message` item with one `output_text` part, opened at the first non-empty
  text; a `tool_use` block closes it and becomes a `function_call` item (`call_id` = the tool_use id,
  `arguments` = the concatenated `partial_json`, `"{}"` when there was none). Thinking, signatures, citations
  and server-tool blocks are dropped, each kind named once in `warnings`.
- An upstream `error` event becomes a Responses `error` event (`type`, `code`, `message`, `param`,
  `sequence_number`) that also carries those fields nested under `error`: the openai SDK raises `APIError`
  on a stream payload with an `error` key, and only then. The translator is then `failed` and ignores the rest.
- `ping`, comments and unknown event types produce nothing; so does anything after the terminal event.
- Malformed upstream data (not JSON, not an object, a field of the wrong type, content before
  `message_start`, a delta for a block that is not open) raises `ValueError`: the proxy treats the stream
  as broken.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from rungate.providers.metering import usage_from_messages
from rungate.providers.sse import SSEEvent, encode_event
from rungate.translate.common import ToolNames, safe_tool_id, usage_to_responses
from rungate.usage import Usage

__all__ = [
    "MessagesToResponses",
    "compact_json",
    "function_call_item",
    "message_item",
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

# Anthropic mid-stream `error.type` -> (OpenAI error type, OpenAI error code); reference §3.6.
_ERRORS: dict[str, tuple[str, str]] = {
    "invalid_request_error": ("invalid_request_error", "invalid_request_error"),
    "authentication_error": ("authentication_error", "invalid_api_key"),
    "billing_error": ("billing_error", "billing_error"),
    "permission_error": ("permission_error", "permission_error"),
    "not_found_error": ("not_found_error", "not_found_error"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit_error": ("rate_limit_exceeded", "rate_limit_exceeded"),
    "api_error": ("server_error", "server_error"),
    "timeout_error": ("server_error", "server_error"),
    "overloaded_error": ("server_error", "server_error"),
}

_DROPPED_KINDS: dict[str, str] = {
    "thinking": "thinking dropped: a Responses answer cannot carry Anthropic thinking blocks",
    "redacted_thinking": "redacted thinking dropped: a Responses answer cannot carry Anthropic thinking blocks",
    "citations": "citations dropped: Anthropic citations have no Responses annotation equivalent",
}


# --------------------------------------------------------------------------------------------------
# Responses output shapes (shared with the non-stream translator)


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


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """An assistant `message` output item with one `output_text` part."""
    return {"type": "message", "id": item_id, "role": "assistant", "status": status, "content": [_text_part(text)]}


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


# --------------------------------------------------------------------------------------------------
# The stream translator


def _load(data: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:  # the stdlib takes what orjson refuses but JSON allows (lone surrogate escapes)
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"upstream event is not JSON: {exc}") from None


def _field(obj: dict[str, Any], key: str, kind: type[Any]) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"upstream `{key}` is not {kind.__name__}: {type(value).__name__}")
    return value


@dataclass(slots=True)
class _Message:
    output_index: int
    item_id: str
    parts: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Call:
    output_index: int
    item_id: str
    call_id: str
    name: str
    parts: list[str] = field(default_factory=list)


class MessagesToResponses:
    """Anthropic SSE events (upstream) -> Responses SSE events (to the agent); see the module docstring."""

    def __init__(self, *, model: str, tool_names: ToolNames, response_id: str | None = None,
                 created: int | None = None) -> None:
        self.warnings: list[str] = []
        self._model = model
        self._names = tool_names
        self._response_id = response_id
        self._created = int(time.time()) if created is None else created
        self._seq = 0
        self._started = False
        self._finished = False
        self._failed = False
        self._next_index = 0  # output_index of the next item
        self._messages = 0  # message items opened so far (for their ids)
        self._message: _Message | None = None
        self._text_blocks: set[int] = set()  # open Anthropic text blocks
        self._calls: dict[int, _Call] = {}  # open tool_use blocks by Anthropic index
        self._items: dict[int, dict[str, Any]] = {}  # finished output items by output_index
        self._text: list[str] = []
        self._usage: dict[str, Any] = {}  # Anthropic usage fields, later values overwriting earlier ones
        self._stop_reason: Any = None
        self._dropped: set[str] = set()

    @property
    def finished(self) -> bool:
        """True once the terminal `response.completed` / `response.incomplete` event was emitted."""
        return self._finished

    @property
    def failed(self) -> bool:
        """True once an upstream error was relayed as an `error` event (the stream is over)."""
        return self._failed

    @property
    def text(self) -> str:
        """The answer text relayed so far."""
        return "".join(self._text)

    def feed(self, event: SSEEvent) -> list[bytes]:
        """Translate one upstream event; returns the framed Responses events to send, in order."""
        if event.is_comment or self._finished or self._failed:
            return []
        if not event.data.strip():
            return self._error({}) if event.event == "error" else []
        try:
            payload = _load(event.data)
        except ValueError:
            if event.event == "error":  # an error is an error even when its body is not JSON
                return self._error({"message": event.data})
            raise
        if not isinstance(payload, dict):
            raise ValueError("upstream event is not a JSON object")
        kind = payload.get("type")
        if not isinstance(kind, str):
            kind = event.event
        if kind == "error" or event.event == "error":
            return self._error(payload)
        if kind == "message_start":
            return self._message_start(payload)
        if kind not in ("content_block_start", "content_block_delta", "content_block_stop", "message_delta",
                        "message_stop"):
            return []  # ping, and event types newer than this translator
        if not self._started:
            raise ValueError(f"upstream {kind} before message_start")
        if kind == "content_block_start":
            return self._block_start(_field(payload, "index", int), _field(payload, "content_block", dict))
        if kind == "content_block_delta":
            return self._block_delta(_field(payload, "index", int), _field(payload, "delta", dict))
        if kind == "content_block_stop":
            return self._block_stop(_field(payload, "index", int))
        if kind == "message_delta":
            delta = payload.get("delta")
            if delta is not None:
                if not isinstance(delta, dict):
                    raise ValueError("upstream message_delta.delta is not an object")
                if "stop_reason" in delta:
                    self._stop_reason = delta["stop_reason"]
            self._merge_usage(payload.get("usage"))
            return []
        return self._message_stop()

    # -- events --------------------------------------------------------------------------------------

    def _emit(self, payload: dict[str, Any]) -> bytes:
        payload["sequence_number"] = self._seq
        self._seq += 1
        return encode_event(compact_json(payload), payload["type"])

    def _response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None,
                  reason: str | None = None) -> dict[str, Any]:
        assert self._response_id is not None
        return response_object(response_id=self._response_id, created=self._created, model=self._model,
                               status=status, output=output, usage=usage, incomplete_reason=reason)

    def _message_start(self, payload: dict[str, Any]) -> list[bytes]:
        if self._started:
            raise ValueError("upstream message_start repeated")
        message = _field(payload, "message", dict)
        self._merge_usage(message.get("usage"))
        self._started = True
        if self._response_id is None:
            self._response_id = response_id_for(message.get("id"))
        snapshot = self._response("in_progress", [], None)
        return [self._emit({"type": "response.created", "response": snapshot}),
                self._emit({"type": "response.in_progress", "response": snapshot})]

    def _merge_usage(self, usage: Any) -> None:
        # Anthropic usage is cumulative: a later value overwrites (reference §2.4).
        if usage is None:
            return
        if not isinstance(usage, dict):
            raise ValueError("upstream usage is not an object")
        self._usage.update((key, value) for key, value in usage.items() if value is not None)

    def _block_start(self, index: int, block: dict[str, Any]) -> list[bytes]:
        if index in self._text_blocks or index in self._calls:
            raise ValueError(f"upstream content block {index} started twice")
        kind = block.get("type")
        if kind == "text":
            self._text_blocks.add(index)
            text = block.get("text", "")
            if not isinstance(text, str):
                raise ValueError("upstream text block's `text` is not a string")
            return self._text_delta(text)
        if kind == "tool_use":
            out = self._close_message("completed")
            call_id = _field(block, "id", str)
            output_index = self._next_index
            self._next_index += 1
            call = _Call(output_index, function_call_item_id(call_id, output_index), call_id,
                         self._names.original(_field(block, "name", str)))
            self._calls[index] = call
            item = function_call_item(call.item_id, call_id, call.name, "", "in_progress")
            out.append(self._emit({"type": "response.output_item.added", "output_index": output_index,
                                   "item": item}))
            initial = block.get("input")
            # Streamed tool_use blocks start with `input: {}`; a non-empty one is the whole input at once.
            if isinstance(initial, dict) and initial:
                out += self._arguments_delta(call, compact_json(initial))
            return out
        self._drop(kind if isinstance(kind, str) else "unknown")
        return []

    def _block_delta(self, index: int, delta: dict[str, Any]) -> list[bytes]:
        kind = delta.get("type")
        if kind == "text_delta":
            if index not in self._text_blocks:
                raise ValueError(f"upstream text delta for content block {index}, which is not an open text block")
            return self._text_delta(_field(delta, "text", str))
        if kind == "input_json_delta":
            call = self._calls.get(index)
            if call is None:
                raise ValueError(f"upstream input_json delta for content block {index}, which is not a tool_use")
            return self._arguments_delta(call, _field(delta, "partial_json", str))
        if kind == "citations_delta":
            self._drop("citations")
        return []  # thinking and signature deltas belong to dropped blocks

    def _block_stop(self, index: int) -> list[bytes]:
        call = self._calls.pop(index, None)
        if call is not None:
            return self._close_call(call, "completed")
        self._text_blocks.discard(index)  # the message item stays open for a following text block
        return []

    def _message_stop(self) -> list[bytes]:
        status, reason = terminal_status(self._stop_reason)
        out = self._close_message(status)
        for index in sorted(self._calls, key=lambda i: self._calls[i].output_index):
            out += self._close_call(self._calls[index], "incomplete")
        self._calls.clear()
        usage = responses_usage(usage_from_messages({"usage": self._usage}))
        output = [self._items[i] for i in sorted(self._items)]
        out.append(self._emit({"type": f"response.{status}", "response": self._response(status, output, usage,
                                                                                          reason)}))
        self._finished = True
        return out

    def _error(self, payload: dict[str, Any]) -> list[bytes]:
        nested = payload.get("error")
        error = nested if isinstance(nested, dict) else payload
        upstream_type = error.get("type")
        message = error.get("message")
        if not isinstance(message, str) or not message:
            message = "The upstream provider reported an error mid-stream."
        kind, code = _ERRORS.get(upstream_type, ("server_error", "server_error")) if isinstance(
            upstream_type, str) else ("server_error", "server_error")
        self._failed = True
        return [self._emit({"type": "error", "code": code, "message": message, "param": None,
                            "error": {"type": kind, "code": code, "message": message, "param": None}})]

    # -- items ---------------------------------------------------------------------------------------

    def _text_delta(self, text: str) -> list[bytes]:
        if not text:
            return []
        out: list[bytes] = []
        message = self._message
        if message is None:
            item_id = message_item_id(self._response_id or "", self._messages)
            message = self._message = _Message(self._next_index, item_id)
            self._next_index += 1
            self._messages += 1
            where = {"item_id": message.item_id, "output_index": message.output_index}
            item = {"type": "message", "id": message.item_id, "role": "assistant", "status": "in_progress",
                    "content": []}
            out.append(self._emit({"type": "response.output_item.added", "output_index": message.output_index,
                                   "item": item}))
            out.append(self._emit({"type": "response.content_part.added", **where, "content_index": 0,
                                   "part": _text_part("")}))
        message.parts.append(text)
        self._text.append(text)
        out.append(self._emit({"type": "response.output_text.delta", "item_id": message.item_id,
                               "output_index": message.output_index, "content_index": 0, "delta": text,
                               "logprobs": []}))
        return out

    def _close_message(self, status: str) -> list[bytes]:
        message = self._message
        if message is None:
            return []
        self._message = None
        text = "".join(message.parts)
        where = {"item_id": message.item_id, "output_index": message.output_index, "content_index": 0}
        item = message_item(message.item_id, text, status)
        self._items[message.output_index] = item
        return [self._emit({"type": "response.output_text.done", **where, "text": text, "logprobs": []}),
                self._emit({"type": "response.content_part.done", **where, "part": _text_part(text)}),
                self._emit({"type": "response.output_item.done", "output_index": message.output_index,
                            "item": item})]

    def _arguments_delta(self, call: _Call, fragment: str) -> list[bytes]:
        if not fragment:  # Anthropic's first partial_json is often ""
            return []
        call.parts.append(fragment)
        return [self._emit({"type": "response.function_call_arguments.delta", "item_id": call.item_id,
                            "output_index": call.output_index, "delta": fragment})]

    def _close_call(self, call: _Call, status: str) -> list[bytes]:
        out: list[bytes] = []
        if not call.parts:  # a call without arguments: "{}", sent as a delta too so deltas add up to `arguments`
            out += self._arguments_delta(call, "{}")
        arguments = "".join(call.parts)
        item = function_call_item(call.item_id, call.call_id, call.name, arguments, status)
        self._items[call.output_index] = item
        out.append(self._emit({"type": "response.function_call_arguments.done", "item_id": call.item_id,
                               "output_index": call.output_index, "arguments": arguments}))
        out.append(self._emit({"type": "response.output_item.done", "output_index": call.output_index,
                               "item": item}))
        return out

    def _drop(self, kind: str) -> None:
        if kind not in self._dropped:
            self._dropped.add(kind)
            self.warnings.append(dropped_warning(kind))
