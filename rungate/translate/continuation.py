"""The client side of a translated or relayed stream, and stitching a second upstream into it (pure, no I/O).

A stitcher owns one stream *as the client sees it*, in the client's format: `ChatContinuation` for an
OpenAI Chat Completions client, `MessagesContinuation` for an Anthropic Messages client. It serves in two
phases.

1. Relay. Every event the client is sent passes through it: a same-format upstream's events via
   `feed(event)` (returned as their exact bytes), a translator's events via `relay(...)` (the translators
   in `rungate.translate.streams` route their output through one). The stitcher records what the client
   has seen: ids, the answer text, open content blocks, tool calls, whether the answer ended.
2. Continuation. When the upstream breaks mid-answer and `resumable` is True, the proxy calls
   `continue_after_break()` and asks another target to continue the answer (Anthropic: the text so far as
   an assistant prefill; OpenAI: as an assistant message). The second upstream's events, fed the same way,
   come out as the rest of the SAME client stream:
   - Chat: no second role chunk; `id`, `created` and `model` are those the client first saw; tool-call
     indexes continue after the ones already sent.
   - Messages: no second `message_start`; a text block left open by the break absorbs the second
     upstream's first text block; other blocks are renumbered after the client's, and a block left open
     is closed before a new one starts or before `message_delta`.
   - Usage (choice documented): the client's final usage is the second upstream's usage (its input side
     already counts the prompt plus the relayed partial answer) with its output increased by the output the
     client got before the break: `sent_output_tokens` when the proxy knows it, else the larger of the
     output count the client was shown and ceil(UTF-8 bytes of relayed text, tool arguments and thinking /
     4) (the metering estimate). The proxy records the two upstream calls as two steps with their own usage.
   - Duplicate whitespace: an Anthropic prefill must not end in whitespace, so the second request carried
     the text with its trailing whitespace stripped, and the model usually starts by producing it again.
     `strip_prefix` (default: the trailing whitespace of the text the client already has, `str.rstrip`'s
     notion) is matched character by character against the start of the continuation's text, and the
     matched characters are not relayed again; matching ends at the first character that differs, at the
     first tool call, or when `strip_prefix` is used up. Pass `strip_prefix=""` to relay everything.
   `continue_after_break` may be called again for a third upstream.

Events that are not JSON (a `[DONE]` and comments aside) raise `ValueError`: the proxy treats the
upstream as broken. An upstream error event is relayed, and the stream is then no longer resumable.
"""

from __future__ import annotations

from typing import Any

import orjson

from rungate.providers.sse import SSEEvent, encode_event
from rungate.translate.common import ANTHROPIC_USAGE_COUNTS, as_dict, count, index, utf8_size

__all__ = ["DONE", "ChatContinuation", "MessagesContinuation", "load_event"]

DONE: bytes = b"data: [DONE]\n\n"
"""The OpenAI stream terminator, emitted as its own item."""

Json = dict[str, Any]


def load_event(event: SSEEvent) -> Json:
    """The JSON object an event's data holds; `ValueError` when it is not a JSON object."""
    try:
        payload = orjson.loads(event.data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"upstream event data is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ValueError("upstream event data is not a JSON object")
    return payload


class _PrefixStripper:
    """Drops the characters of `prefix` from the start of the continuation's text (see the module docstring)."""

    def __init__(self, prefix: str) -> None:
        self._pending = prefix

    def __call__(self, text: str) -> str:
        matched = 0
        while matched < len(text) and matched < len(self._pending) and text[matched] == self._pending[matched]:
            matched += 1
        # Matching goes on into the next delta only if this whole delta was part of the prefix.
        self._pending = self._pending[matched:] if matched == len(text) else ""
        return text[matched:]

    def stop(self) -> None:
        self._pending = ""


class _Stitcher:
    """What both stitchers share: the relayed text, the output estimate and the phase switch."""

    def __init__(self) -> None:
        self._continuing = False
        self._parts: list[str] = []
        self._bytes = 0  # UTF-8 bytes of text, tool arguments and thinking relayed: the output estimate
        self._shown_output = 0  # the largest output count the client was shown
        self._carried = 0
        self._strip = _PrefixStripper("")
        self._tools = 0
        self._errored = False
        self._finished = False

    @property
    def text(self) -> str:
        """The answer text the client has been sent so far (both phases)."""
        return "".join(self._parts)

    @property
    def finished(self) -> bool:
        """True once the stream's terminal event was relayed."""
        return self._finished

    def _ended(self) -> bool:
        raise NotImplementedError

    @property
    def resumable(self) -> bool:
        """True when a second upstream may continue: the stream was started, has not ended or failed, and the
        client was sent no tool call (a half-relayed call cannot be continued by another model)."""
        return not (self._ended() or self._finished or self._errored or self._tools)

    def continue_after_break(self, *, strip_prefix: str | None = None, sent_output_tokens: int | None = None) -> None:
        """Switch to continuation: the events fed next are a second upstream continuing the answer.

        `strip_prefix` and `sent_output_tokens` are described in the module docstring. Raises RuntimeError
        when the stream is not `resumable`.
        """
        if not self.resumable:
            raise RuntimeError("the client stream cannot be continued (not started, ended, failed or has tool calls)")
        sent = self.text
        if strip_prefix is None:
            strip_prefix = sent[len(sent.rstrip()):]
        if sent_output_tokens is None:
            sent_output_tokens = max(self._shown_output, -(-self._bytes // 4))
        self._carried = sent_output_tokens
        self._strip = _PrefixStripper(strip_prefix)
        self._continuing = True
        self._reset_upstream()

    def _reset_upstream(self) -> None:
        raise NotImplementedError

    def _add_text(self, text: Any) -> None:
        if isinstance(text, str) and text:
            self._parts.append(text)
            self._bytes += utf8_size(text)

    def _add_bytes(self, text: Any) -> None:
        if isinstance(text, str):
            self._bytes += utf8_size(text)


class ChatContinuation(_Stitcher):
    """An OpenAI Chat Completions client's stream (chunks, an optional usage chunk, `[DONE]`)."""

    def __init__(self) -> None:
        super().__init__()
        self._id: Any = None
        self._created: Any = None
        self._model: Any = None
        self._started = False
        self._finish_sent = False
        self._tool_base = 0

    def _ended(self) -> bool:
        return not self._started or self._finish_sent

    def _reset_upstream(self) -> None:
        self._tool_base = self._tools

    def feed(self, event: SSEEvent) -> list[bytes]:
        """One event of a same-format upstream: its exact bytes while relaying, rewritten when continuing."""
        if event.is_comment or not event.data.strip():
            return [event.raw]
        if event.data.strip() == "[DONE]":
            self._finished = True
            return [DONE] if self._continuing else [event.raw]
        payload = self._process(load_event(event))
        if payload is None:
            return []
        return [encode_event(orjson.dumps(payload))] if self._continuing else [event.raw]

    def relay(self, payload: Json) -> list[bytes]:
        """One chunk (or `{"error": ...}` payload) from a translator, recorded and encoded."""
        kept = self._process(payload)
        return [] if kept is None else [encode_event(orjson.dumps(kept))]

    def relay_done(self) -> list[bytes]:
        """The `[DONE]` terminator."""
        self._finished = True
        return [DONE]

    def _process(self, payload: Json) -> Json | None:
        if payload.get("error") is not None:
            self._errored = True
            return payload
        if self._continuing:
            rewritten = self._rewrite(payload)
            if rewritten is None:
                return None
            payload = rewritten
        self._observe(payload)
        return payload

    def _observe(self, payload: Json) -> None:
        if self._id is None:
            self._id, self._created, self._model = payload.get("id"), payload.get("created"), payload.get("model")
        usage = payload.get("usage")
        if isinstance(usage, dict):
            self._shown_output = max(self._shown_output, count(usage.get("completion_tokens")) or 0)
        choices = payload.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            self._started = True
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._add_text(delta.get("content"))
                self._add_text(delta.get("refusal"))
                calls = delta.get("tool_calls")
                for call in calls if isinstance(calls, list) else ():
                    position = index(call.get("index")) if isinstance(call, dict) else None
                    if position is not None:
                        self._tools = max(self._tools, position + 1)
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict):
                        self._add_bytes(function.get("arguments"))
            if choice.get("finish_reason") is not None:
                self._finish_sent = True

    def _rewrite(self, payload: Json) -> Json | None:
        """The second upstream's chunk as the continuation of the client's stream; None to drop it."""
        out = dict(payload)
        for key, value in (("id", self._id), ("created", self._created), ("model", self._model)):
            if value is not None:
                out[key] = value
        usage = payload.get("usage")
        if isinstance(usage, dict):
            out["usage"] = usage = dict(usage)
            for key in ("completion_tokens", "total_tokens"):
                value = count(usage.get(key))
                if value is not None:
                    usage[key] = value + self._carried
        choices = payload.get("choices")
        if isinstance(choices, list) and choices:
            kept = [c for c in (self._rewrite_choice(choice) for choice in choices) if c is not None]
            if not kept and not isinstance(usage, dict):
                return None
            out["choices"] = kept
        return out

    def _rewrite_choice(self, choice: Any) -> Any:
        if not isinstance(choice, dict) or not isinstance(choice.get("delta"), dict):
            return choice
        delta = dict(choice["delta"])
        delta.pop("role", None)  # the client got its role chunk from the first upstream
        if isinstance(delta.get("content"), str):
            delta["content"] = self._strip(delta["content"])
        for key in ("content", "refusal", "tool_calls"):
            if delta.get(key) in (None, "", []):
                delta.pop(key, None)
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            self._strip.stop()
            delta["tool_calls"] = [
                {**call, "index": call["index"] + self._tool_base}
                if isinstance(call, dict) and index(call.get("index")) is not None else call
                for call in calls
            ]
        if not delta and choice.get("finish_reason") is None and choice.get("logprobs") is None:
            return None
        return {**choice, "delta": delta}


class MessagesContinuation(_Stitcher):
    """An Anthropic Messages client's stream (`event:` + JSON data, `message_start` ... `message_stop`)."""

    def __init__(self) -> None:
        super().__init__()
        self._started = False
        self._stopped = False  # message_delta relayed: the answer is complete
        self._next = 0  # the next client block index
        self._open: tuple[int, str] | None = None  # the client's open block: (index, type)
        self._map: dict[int, int] = {}  # continuation: upstream block index -> client block index
        self._merge: int | None = None  # continuation: the open text block the first text block joins
        self._fields: dict[str, Any] = {}  # continuation: the second upstream's usage fields so far

    def _ended(self) -> bool:
        return not self._started or self._stopped

    def _reset_upstream(self) -> None:
        self._map = {}
        self._fields = {}
        self._merge = self._open[0] if self._open is not None and self._open[1] == "text" else None

    def feed(self, event: SSEEvent) -> list[bytes]:
        """One event of a same-format upstream: its exact bytes while relaying, rewritten when continuing."""
        if event.is_comment or not event.data.strip():
            return [event.raw]
        payload = load_event(event)
        kind = payload.get("type") if isinstance(payload.get("type"), str) else event.event
        events = self._process(kind or "", payload)
        if not self._continuing:
            return [event.raw]
        return [encode_event(orjson.dumps(data), event=name) for name, data in events]

    def relay(self, payload: Json) -> list[bytes]:
        """One event from a translator (`payload["type"]` names it), recorded and encoded."""
        return [encode_event(orjson.dumps(data), event=name) for name, data in self._process(payload["type"], payload)]

    def _process(self, kind: str, payload: Json) -> list[tuple[str, Json]]:
        events = self._rewrite(kind, payload) if self._continuing else [(kind, payload)]
        for name, data in events:
            self._observe(name, data)
        return events

    def _observe(self, kind: str, payload: Json) -> None:
        if kind == "message_start":
            self._started = True
            message = payload.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            self._show(usage)
        elif kind == "content_block_start":
            position, block = index(payload.get("index")), payload.get("content_block")
            if position is None or not isinstance(block, dict):
                return
            self._open = (position, str(block.get("type")))
            self._next = max(self._next, position + 1)
            if block.get("type") in ("tool_use", "server_tool_use"):
                self._tools += 1
            self._add_text(block.get("text"))
        elif kind == "content_block_delta":
            delta = payload.get("delta")
            if isinstance(delta, dict):
                self._add_text(delta.get("text"))
                self._add_bytes(delta.get("partial_json"))
                self._add_bytes(delta.get("thinking"))
        elif kind == "content_block_stop":
            if self._open is not None and self._open[0] == payload.get("index"):
                self._open = None
        elif kind == "message_delta":
            self._stopped = True
            self._show(payload.get("usage"))
        elif kind == "message_stop":
            self._finished = True
        elif kind == "error":
            self._errored = True

    def _show(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self._shown_output = max(self._shown_output, count(usage.get("output_tokens")) or 0)

    def _close_open(self) -> list[tuple[str, Json]]:
        if self._open is None:
            return []
        return [("content_block_stop", {"type": "content_block_stop", "index": self._open[0]})]

    def _rewrite(self, kind: str, payload: Json) -> list[tuple[str, Json]]:
        """The second upstream's event as the continuation of the client's stream (zero or more events)."""
        position = index(payload.get("index"))
        if kind == "message_start":
            message = payload.get("message")
            self._merge_usage(message.get("usage") if isinstance(message, dict) else None)
            return []  # the client has its message_start
        if kind == "content_block_start" and position is not None:
            return self._block_start(position, payload)
        if kind in ("content_block_delta", "content_block_stop") and position is not None:
            if position not in self._map:
                return []  # a block this stream never started
            out = {**payload, "index": self._map[position]}
            delta = payload.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("text"), str):
                out["delta"] = {**delta, "text": self._strip(delta["text"])}
                if not out["delta"]["text"]:
                    return []
            elif kind == "content_block_delta":
                self._strip.stop()
            return [(kind, out)]
        if kind == "message_delta":
            self._merge_usage(payload.get("usage"))
            usage: Json = {**as_dict(payload.get("usage")), **self._fields}
            for key in ANTHROPIC_USAGE_COUNTS:
                usage.setdefault(key, 0)
            usage["output_tokens"] += self._carried
            return [*self._close_open(), (kind, {**payload, "usage": usage})]
        return [(kind, payload)]

    def _block_start(self, position: int, payload: Json) -> list[tuple[str, Json]]:
        block = payload.get("content_block")
        block = dict(block) if isinstance(block, dict) else {}
        initial = block.get("text")
        if isinstance(initial, str):
            block["text"] = initial = self._strip(initial)
        if block.get("type") == "text" and self._merge is not None:
            # The break left a text block open: the continuation's first text block joins it.
            self._map[position], self._merge = self._merge, None
            if not initial:
                return []
            delta = {"type": "content_block_delta", "index": self._map[position],
                     "delta": {"type": "text_delta", "text": initial}}
            return [("content_block_delta", delta)]
        if block.get("type") != "text":
            self._strip.stop()
        self._merge = None
        out = self._close_open()
        self._map[position] = self._next
        return [*out, ("content_block_start", {**payload, "index": self._next, "content_block": block})]

    def _merge_usage(self, usage: Any) -> None:
        """Cumulative semantics: the counts an event carries overwrite those seen before."""
        if not isinstance(usage, dict):
            return
        for key in ANTHROPIC_USAGE_COUNTS:
            value = count(usage.get(key))
            if value is not None:
                self._fields[key] = value
