"""Answer streams translated event by event: Anthropic Messages SSE <-> OpenAI Chat Completions chunks (pure).

Each translator takes the upstream's parsed `SSEEvent`s in order and returns, per event, the complete
encoded SSE events to send the client (often none). Contract (reference/provider-formats.md §3.5):

- `AnthropicToChat` (OpenAI client, Anthropic upstream): one role chunk at `message_start`; text deltas
  become `delta.content`; each `tool_use` block becomes a tool call whose OpenAI `index` counts tool calls
  only (never the Anthropic block index), its name restored by `tool_names.original`, its `arguments` the
  non-empty `partial_json` pieces (a call that streamed none gets its start `input`, `{}` when empty, at
  `content_block_stop`); `message_delta` gives one finish chunk; `message_stop` gives the usage chunk
  (`choices: []`, only when `include_usage`; `prompt_tokens` counts cache reads and writes) and then
  `DONE`. An upstream `error` becomes `data: {"error": {...}}`, which the OpenAI SDK raises on.
- `ChatToAnthropic` (Anthropic client, OpenAI upstream asked for `include_usage`): a complete
  `message_start` before anything else; text (and `refusal`, which also makes the stop reason `refusal`)
  and tool calls become blocks, one open at a time, at consecutive indexes; the finish reason is held
  until the usage chunk (`choices: []`) or `[DONE]`, then `message_delta` carries the stop reason and a
  complete usage object (`input_tokens`, `output_tokens`, both cache fields) and `message_stop` follows.
  Every event has an `event:` line and a `type` field. An upstream `{"error": ...}` becomes `event: error`.
- Dropped on purpose (each reason named once in `warnings`): thinking, redacted thinking, signatures,
  citations and server-tool blocks (OpenAI Chat cannot carry them); choices other than index 0.
- `ping`, comments and unknown event types give nothing; after the stream's end every event gives nothing.
- Data that is not a JSON object raises `ValueError` (the proxy treats the upstream as broken); so does an
  OpenAI upstream interleaving fragments of two tool calls (never seen from OpenAI), since relaying it one
  block at a time would hand the client a truncated input.

Both translators write through a client-side stitcher (`rungate.translate.continuation`), which records
what the client was sent and, after `continue_after_break()`, turns a second upstream's stream into the
continuation of the same client stream (see that module for the rules, the usage and whitespace choices).
Pass `client=` to continue a stream the client got from another upstream (e.g. a relayed OpenAI stream
continued by Anthropic): the stitcher that relayed it, already switched with `continue_after_break()`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from rungate.providers.metering import usage_from_chat, usage_from_messages
from rungate.providers.sse import SSEEvent
from rungate.translate.common import (
    ANTHROPIC_USAGE_COUNTS,
    ToolNames,
    anthropic_stop_reason,
    as_dict,
    as_str,
    count,
    index,
    openai_finish_reason,
    usage_to_chat,
    usage_to_messages,
)
from rungate.translate.continuation import DONE, ChatContinuation, Json, MessagesContinuation, load_event
from rungate.usage import Usage

__all__ = ["DONE", "AnthropicToChat", "ChatToAnthropic"]

# Anthropic error type -> OpenAI error type (§3.6); the Anthropic type is kept as `code`.
_TO_OPENAI_ERROR = {"api_error": "server_error", "overloaded_error": "server_error", "timeout_error": "server_error",
                    "request_too_large": "invalid_request_error"}
# OpenAI error type or code -> Anthropic error type.
_TO_ANTHROPIC_ERROR = {
    "invalid_request_error": "invalid_request_error", "authentication_error": "authentication_error",
    "invalid_api_key": "authentication_error", "permission_error": "permission_error",
    "not_found_error": "not_found_error", "rate_limit_exceeded": "rate_limit_error",
    "rate_limit_error": "rate_limit_error", "insufficient_quota": "billing_error",
    "server_is_overloaded": "overloaded_error", "timeout": "timeout_error",
}


class _Translator:
    """What both directions share: warnings, JSON loading, the stitcher and the continuation switch."""

    _client: ChatContinuation | MessagesContinuation

    def __init__(self) -> None:
        self.warnings: list[str] = []
        """Why something was dropped, each reason once (the proxy reports them)."""

    def _warn(self, reason: str) -> None:
        if reason not in self.warnings:
            self.warnings.append(reason)

    @property
    def finished(self) -> bool:
        """True once the client stream's terminal event (`[DONE]` / `message_stop`) was emitted."""
        return self._client.finished

    @property
    def text(self) -> str:
        """The answer text relayed to the client so far (for continuing a broken answer)."""
        return self._client.text

    @property
    def resumable(self) -> bool:
        """True when `continue_after_break` may be called (see `rungate.translate.continuation`)."""
        return self._client.resumable

    def continue_after_break(self, *, strip_prefix: str | None = None, sent_output_tokens: int | None = None) -> None:
        """Take the events fed next as a second upstream (this one's format) continuing the broken answer.

        Only the continuation reaches the client: no second role chunk / `message_start`, the text goes on
        in the same stream; `strip_prefix` and `sent_output_tokens` are described in
        `rungate.translate.continuation`. Raises RuntimeError when not `resumable`.
        """
        if not self.resumable:
            raise RuntimeError("the client stream cannot be continued (not started, ended, failed or has tool calls)")
        self._client.continue_after_break(strip_prefix=strip_prefix, sent_output_tokens=sent_output_tokens)
        self._reset_upstream()

    def _reset_upstream(self) -> None:
        raise NotImplementedError


class AnthropicToChat(_Translator):
    """Anthropic Messages SSE events (upstream) -> OpenAI chat.completion.chunk SSE events (to the agent)."""

    def __init__(self, *, model: str, include_usage: bool, tool_names: ToolNames, created: int | None = None,
                 chunk_id: str | None = None, client: ChatContinuation | None = None) -> None:
        super().__init__()
        self._client: ChatContinuation = client if client is not None else ChatContinuation()
        self._model = model
        self._include_usage = include_usage
        self._tool_names = tool_names
        self._created = int(time.time()) if created is None else created
        self._id = chunk_id if chunk_id is not None else f"chatcmpl-{uuid.uuid4().hex}"
        self._reset_upstream()

    def _reset_upstream(self) -> None:
        self._started = False
        self._tool_count = 0
        self._kinds: dict[int, str] = {}  # Anthropic block index -> "text", "tool" or "dropped"
        self._tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool-call index
        self._start_inputs: dict[int, Any] = {}
        self._streamed_args: set[int] = set()
        self._usage: dict[str, Any] = {}
        self._finish: str | None = None

    def feed(self, event: SSEEvent) -> list[bytes]:
        """The client events for one upstream event; [] for none.

        `message_stop` -> (the usage chunk with `"choices": []` when `include_usage`) then `DONE` as the last
        item. An upstream `error` event -> one `data: {"error": {...}}` event.
        """
        if self._client.finished or event.is_comment or not event.data.strip():
            return []
        payload = load_event(event)
        kind = payload.get("type") if isinstance(payload.get("type"), str) else event.event
        chunks: list[Json] = []
        if kind == "message_start":
            self._merge_usage(as_dict(payload.get("message")).get("usage"))
            chunks += self._start()
        elif kind == "content_block_start":
            block = as_dict(payload.get("content_block"))
            chunks += self._start() + self._block_start(index(payload.get("index")), block)
        elif kind == "content_block_delta":
            chunks += self._start() + self._block_delta(index(payload.get("index")), as_dict(payload.get("delta")))
        elif kind == "content_block_stop":
            chunks += self._block_stop(index(payload.get("index")))
        elif kind == "message_delta":
            self._merge_usage(payload.get("usage"))
            chunks += self._start() + self._finish_chunk(as_dict(payload.get("delta")).get("stop_reason"))
        elif kind == "message_stop":
            return self._end()
        elif kind == "error":
            error = as_dict(payload.get("error"))
            kind = as_str(error.get("type")) or "api_error"
            message = as_str(error.get("message")) or "The upstream stream failed."
            chunks.append({"error": {"message": message, "type": _TO_OPENAI_ERROR.get(kind, kind),
                                     "param": None, "code": kind}})
        return [item for chunk in chunks for item in self._client.relay(chunk)]

    def _chunk(self, delta: Json, finish: str | None = None) -> Json:
        chunk: Json = {"id": self._id, "object": "chat.completion.chunk", "created": self._created,
                       "model": self._model,
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if self._include_usage:
            chunk["usage"] = None  # as OpenAI does when the usage chunk follows
        return chunk

    def _start(self) -> list[Json]:
        if self._started:
            return []
        self._started = True
        return [self._chunk({"role": "assistant", "content": ""})]

    def _block_start(self, position: int | None, block: Json) -> list[Json]:
        if position is None:
            return []
        kind = block.get("type")
        if kind == "text":
            self._kinds[position] = "text"
            text = as_str(block.get("text"))
            return [self._chunk({"content": text})] if text else []
        if kind == "tool_use":
            self._kinds[position] = "tool"
            self._tools[position] = self._tool_count
            self._tool_count += 1
            self._start_inputs[position] = block.get("input")
            call = {"index": self._tools[position], "id": as_str(block.get("id")), "type": "function",
                    "function": {"name": self._tool_names.original(as_str(block.get("name"))), "arguments": ""}}
            return [self._chunk({"tool_calls": [call]})]
        self._kinds[position] = "dropped"
        self._warn(f"{kind} blocks were dropped: OpenAI Chat Completions cannot carry them")
        return []

    def _block_delta(self, position: int | None, delta: Json) -> list[Json]:
        kind = delta.get("type")
        if position is None or self._kinds.get(position) == "dropped":
            return []
        if kind == "text_delta" and self._kinds.get(position) == "text":
            text = as_str(delta.get("text"))
            return [self._chunk({"content": text})] if text else []
        if kind == "input_json_delta" and position in self._tools:
            piece = as_str(delta.get("partial_json"))
            if not piece:  # Anthropic often opens with "": an empty fragment says nothing
                return []
            self._streamed_args.add(position)
            return [self._args_chunk(position, piece)]
        if kind == "citations_delta":
            self._warn("citations were dropped: OpenAI Chat Completions cannot carry them")
        return []

    def _args_chunk(self, position: int, arguments: str) -> Json:
        return self._chunk({"tool_calls": [{"index": self._tools[position], "function": {"arguments": arguments}}]})

    def _block_stop(self, position: int | None) -> list[Json]:
        if position is None or position not in self._tools or position in self._streamed_args:
            return []
        # A call that streamed no arguments: its start `input` is the whole input (`{}` for a tool without any).
        self._streamed_args.add(position)
        start = self._start_inputs.get(position)
        return [self._args_chunk(position, orjson.dumps(start if isinstance(start, dict) else {}).decode())]

    def _finish_chunk(self, stop_reason: Any) -> list[Json]:
        if self._finish is not None:
            return []
        self._finish = openai_finish_reason(stop_reason)
        return [self._chunk({}, self._finish)]

    def _end(self) -> list[bytes]:
        chunks = self._start() + self._finish_chunk("tool_use" if self._tool_count else "end_turn")
        if self._include_usage:
            usage = usage_from_messages({"usage": self._usage}) or Usage()
            chunks.append({"id": self._id, "object": "chat.completion.chunk", "created": self._created,
                           "model": self._model, "choices": [], "usage": usage_to_chat(usage)})
        return [item for chunk in chunks for item in self._client.relay(chunk)] + self._client.relay_done()

    def _merge_usage(self, usage: Any) -> None:
        """`message_delta.usage` is cumulative: the counts it carries overwrite those seen before."""
        for key, value in as_dict(usage).items():
            if (key in ANTHROPIC_USAGE_COUNTS and count(value) is not None) \
                    or key in ("cache_creation", "output_tokens_details"):
                self._usage[key] = value


class ChatToAnthropic(_Translator):
    """OpenAI chat.completion.chunk SSE events (upstream, requested with include_usage) -> Anthropic SSE."""

    def __init__(self, *, model: str, tool_names: ToolNames, message_id: str | None = None, input_tokens: int = 0,
                 client: MessagesContinuation | None = None) -> None:
        super().__init__()
        self._client: MessagesContinuation = client if client is not None else MessagesContinuation()
        self._model = model
        self._tool_names = tool_names
        self._message_id = message_id if message_id is not None else f"msg_{uuid.uuid4().hex}"
        self._input_tokens = max(input_tokens, 0)
        self._reset_upstream()

    def _reset_upstream(self) -> None:
        self._started = False
        self._next = 0
        self._open: tuple[str, int, int] | None = None  # ("text" | "tool", Anthropic index, OpenAI index)
        self._tools: dict[int, int] = {}  # OpenAI tool-call index -> Anthropic block index
        self._stop: str | None = None
        self._refused = False
        self._usage: Usage | None = None

    def feed(self, event: SSEEvent) -> list[bytes]:
        """The client events for one upstream event; [] for none (see the module docstring for the order)."""
        if self._client.finished or event.is_comment or not event.data.strip():
            return []
        if event.data.strip() == "[DONE]":
            return self._emit(self._end())
        payload = load_event(event)
        if payload.get("error") is not None:
            return self._emit([self._error(payload["error"])])
        if isinstance(payload.get("usage"), dict):
            self._usage = usage_from_chat(payload) or self._usage
        events: list[Json] = []
        choices = payload.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            if index(choice.get("index")) not in (None, 0):
                self._warn("choices other than the first were dropped: Anthropic Messages has one answer")
                continue
            events += self._start() + self._delta(as_dict(choice.get("delta")))
            if choice.get("finish_reason") is not None:
                events += self._close()
                self._stop = "refusal" if self._refused else anthropic_stop_reason(choice["finish_reason"])
        if isinstance(choices, list) and not choices and self._usage is not None and self._stop is not None:
            events += self._end()  # the usage chunk: the answer is complete
        return self._emit(events)

    @property
    def resumable(self) -> bool:
        """As the stitcher's, and False once the upstream gave its finish reason (the answer is complete)."""
        return self._client.resumable and self._stop is None

    def _emit(self, events: list[Json]) -> list[bytes]:
        return [item for event in events for item in self._client.relay(event)]

    def _start(self) -> list[Json]:
        if self._started:
            return []
        self._started = True
        usage = {"input_tokens": self._input_tokens, "output_tokens": 0, "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": 0}
        message: Json = {"id": self._message_id, "type": "message", "role": "assistant", "model": self._model,
                   "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}
        return [{"type": "message_start", "message": message}]

    def _delta(self, delta: Json) -> list[Json]:
        events: list[Json] = []
        for key in ("content", "refusal"):
            text = as_str(delta.get(key))
            if text:
                self._refused = self._refused or key == "refusal"
                events += self._text(text)
        calls = delta.get("tool_calls")
        for position, call in enumerate(calls if isinstance(calls, list) else ()):
            if isinstance(call, dict):
                events += self._tool_fragment(position, call)
        return events

    def _text(self, text: str) -> list[Json]:
        events: list[Json] = []
        if self._open is None or self._open[0] != "text":
            events += self._close()
            self._open = ("text", self._next, -1)
            events.append({"type": "content_block_start", "index": self._next,
                           "content_block": {"type": "text", "text": ""}})
            self._next += 1
        events.append({"type": "content_block_delta", "index": self._open[1],
                       "delta": {"type": "text_delta", "text": text}})
        return events

    def _tool_fragment(self, position: int, call: Json) -> list[Json]:
        number = index(call.get("index"))
        number = position if number is None else number
        function = as_dict(call.get("function"))
        arguments = as_str(function.get("arguments"))
        events: list[Json] = []
        if number not in self._tools:
            events += self._close()
            call_id = as_str(call.get("id")) or f"toolu_{uuid.uuid4().hex[:24]}"
            name = self._tool_names.original(as_str(function.get("name")))
            self._tools[number] = self._next
            self._open = ("tool", self._next, number)
            events.append({"type": "content_block_start", "index": self._next,
                           "content_block": {"type": "tool_use", "id": call_id, "name": name, "input": {}}})
            self._next += 1
        elif self._open != ("tool", self._tools[number], number):
            if arguments:
                raise ValueError(f"upstream interleaved the fragments of tool call {number} with another call")
            return []
        if arguments:
            events.append({"type": "content_block_delta", "index": self._tools[number],
                           "delta": {"type": "input_json_delta", "partial_json": arguments}})
        return events

    def _close(self) -> list[Json]:
        if self._open is None:
            return []
        stop = {"type": "content_block_stop", "index": self._open[1]}
        self._open = None
        return [stop]

    def _end(self) -> list[Json]:
        usage = self._usage if self._usage is not None else Usage(input=self._input_tokens)
        delta = {"stop_reason": self._stop or ("refusal" if self._refused else "end_turn"), "stop_sequence": None}
        return [*self._start(), *self._close(),
                {"type": "message_delta", "delta": delta, "usage": usage_to_messages(usage)},
                {"type": "message_stop"}]

    def _error(self, error: Any) -> Json:
        error = error if isinstance(error, dict) else {"message": str(error)}
        kind = _TO_ANTHROPIC_ERROR.get(as_str(error.get("code"))) or _TO_ANTHROPIC_ERROR.get(as_str(error.get("type")))
        message = as_str(error.get("message")) or "The upstream stream failed."
        return {"type": "error", "error": {"type": kind or "api_error", "message": message}}
