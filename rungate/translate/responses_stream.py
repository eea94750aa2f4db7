"""Anthropic Messages streams served to OpenAI Responses clients, event by event (pure, no I/O).

The Responses output shapes (`response` object, `message` and `function_call` items, usage) come from
`rungate.translate.responses_output`, shared with the non-stream translator so both paths give the same thing;
the ones this module used to define are still importable from it.

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
from dataclasses import dataclass, field
from typing import Any

import orjson

from rungate.providers.metering import usage_from_messages
from rungate.providers.sse import SSEEvent, encode_event
from rungate.translate.common import ToolNames
from rungate.translate.responses_output import (
    compact_json,
    dropped_warning,
    function_call_item,
    function_call_item_id,
    message_item,
    message_item_id,
    output_text_part,
    response_id_for,
    response_object,
    responses_usage,
    terminal_status,
)

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
                                   "part": output_text_part("")}))
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
                self._emit({"type": "response.content_part.done", **where, "part": output_text_part(text)}),
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
