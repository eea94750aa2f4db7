"""Rewriting the arguments of chosen tool calls inside a held answer ("edit and approve", SPEC §5).

Pure functions, no I/O. `rewrite_answer` takes a non-streamed body, `rewrite_stream` a whole SSE stream
(the raw bytes as they would have been relayed); both return the answer with the arguments of each tool
call whose id is a key of `edits` replaced by that value, in the caller's own format:

- `"chat"`: `choices[*].message.tool_calls[*]` matched by `id`; `function.arguments` becomes the JSON text.
- `"responses"`: `function_call` items matched by `call_id`; `arguments` becomes the JSON text.
- `"messages"`: `tool_use` blocks matched by `id`; `input` becomes the object.

Contracts shared by both:

- Every value of `edits` must be a dict of JSON values (else `ValueError`); its text is orjson's compact JSON.
  Ids that match no tool call are ignored. Empty `edits`, or none matching, return the input itself.
- Streams: an event that is not touched keeps its exact bytes (comments, `[DONE]`, usage chunks, events of
  other calls); a touched event is re-encoded as `event:` (when it had one) + one compact `data:` line.
  The result is checked with the project's stream meters: if an edited call does not come out with exactly
  the edited arguments (a shape this module does not understand), `ValueError` is raised rather than
  releasing the model's original arguments.
- A non-streamed body that is not JSON raises `ValueError` (it cannot have been held for a tool call).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from rungate.providers.metering import ToolCall
from rungate.providers.sse import SSEEvent, SSEParser, encode_event
from rungate.proxy.formats import CHAT, MESSAGES, RESPONSES, WireFormat

__all__ = ["rewrite_answer", "rewrite_stream"]

# The formats an answer can be held in; each one's own readers check what a rewrite produced.
_WIRE: dict[str, WireFormat] = {f.name: f for f in (CHAT, RESPONSES, MESSAGES)}
FORMATS = tuple(_WIRE)

_Action = Literal["keep", "replace", "drop"]


def rewrite_answer(fmt: str, body: bytes, edits: Mapping[str, Any]) -> bytes:
    """A non-streamed answer of format `fmt` ("chat" | "responses" | "messages") with the arguments of each
    tool call whose id is a key of `edits` replaced by that value (a JSON object)."""
    _check_format(fmt)
    if not edits:
        return body
    texts = _texts(edits)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError("the held answer is not JSON") from exc
    result = orjson.dumps(payload) if _BODY_REWRITERS[fmt](payload, texts) else body
    _verify(_WIRE[fmt].tool_calls(payload), texts)
    return result


def rewrite_stream(fmt: str, stream: bytes, edits: Mapping[str, Any]) -> bytes:
    """The same for a whole SSE stream (the raw bytes as relayed: `event:`/`data:` lines, blank-line separated)."""
    _check_format(fmt)
    if not edits:
        return stream
    rewriter = _STREAM_REWRITERS[fmt](_texts(edits))
    for event in _events(stream):
        rewriter.feed(event)
    result = rewriter.result() if rewriter.changed else stream
    make_meter = _WIRE[fmt].meter
    assert make_meter is not None  # every format in _WIRE streams
    meter = make_meter(True)
    for event in _events(result):
        meter.feed(event)
    _verify(meter.tool_calls, rewriter.texts)
    return result


# --------------------------------------------------------------------------------------------------
# Shared helpers


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown answer format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _texts(edits: Mapping[str, Any]) -> dict[str, str]:
    """The compact JSON text of every edit; `ValueError` when a value is not a JSON object."""
    texts: dict[str, str] = {}
    for call_id, value in edits.items():
        if not isinstance(value, dict):
            raise ValueError(f"the edited arguments of {call_id!r} must be a JSON object")
        try:
            texts[call_id] = orjson.dumps(value).decode("utf-8")
        except TypeError as exc:  # orjson.JSONEncodeError subclasses TypeError
            raise ValueError(f"the edited arguments of {call_id!r} are not JSON: {exc}") from exc
    return texts


def _verify(calls: list[ToolCall], texts: Mapping[str, str]) -> None:
    """Raise unless every call with an edited id carries exactly the edited arguments' text.

    Text, not parsed values: Python's `==` would take `1`, `1.0` and `true` for the same argument.
    """
    for call in calls:
        if call.id is not None and call.id in texts and call.arguments != texts[call.id]:
            raise ValueError(f"the edit of tool call {call.id!r} could not be applied to this answer")


def _events(stream: bytes) -> list[SSEEvent]:
    parser = SSEParser(max_event_bytes=max(len(stream), 1))  # the whole stream is at hand: no event is too big
    return parser.feed(stream) + parser.flush()


def _dicts(obj: Any, key: str) -> list[dict[str, Any]]:
    """The dict elements of the list `obj[key]` (nothing when `obj` or the list is of another shape)."""
    value = obj.get(key) if isinstance(obj, dict) else None
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _dict(obj: Any, key: str) -> dict[str, Any] | None:
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, dict) else None


def _index(value: Any, default: int) -> int:
    """An index field as the meters read it: an int (bool excluded), else `default` (the position)."""
    return value if type(value) is int else default


def _edit_of(texts: Mapping[str, str], obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return texts.get(value) if isinstance(value, str) else None


# --------------------------------------------------------------------------------------------------
# Non-stream bodies: each rewriter mutates the parsed body and returns whether it changed anything.


def _chat_body(body: Any, texts: Mapping[str, str]) -> bool:
    changed = False
    for choice in _dicts(body, "choices"):
        for call in _dicts(_dict(choice, "message"), "tool_calls"):
            text = _edit_of(texts, call, "id")
            function = _dict(call, "function")
            if text is not None and function is not None and function.get("arguments") != text:
                function["arguments"] = text
                changed = True
    return changed


def _responses_body(response: Any, texts: Mapping[str, str]) -> bool:
    changed = False
    for item in _dicts(response, "output"):
        text = _edit_of(texts, item, "call_id")
        if item.get("type") == "function_call" and text is not None and item.get("arguments") != text:
            item["arguments"] = text
            changed = True
    return changed


def _messages_body(body: Any, texts: Mapping[str, str]) -> bool:
    changed = False
    for block in _dicts(body, "content"):
        text = _edit_of(texts, block, "id")
        if block.get("type") == "tool_use" and text is not None:
            block["input"] = orjson.loads(text)
            changed = True
    return changed


_BODY_REWRITERS: dict[str, Callable[[Any, Mapping[str, str]], bool]] = {
    "chat": _chat_body, "responses": _responses_body, "messages": _messages_body}


# --------------------------------------------------------------------------------------------------
# Streams


@dataclass(slots=True)
class _Call:
    """An edited call being streamed: its edited text, and whether an argument fragment already carried it."""

    text: str
    sent: bool = False
    inserted: bytes = b""  # an event to emit right after the call's start event (Messages, when no delta came)


class _StreamRewriter:
    """Feeds events in order; `result()` joins the kept raw bytes, re-encoded events and insertions."""

    def __init__(self, texts: dict[str, str]) -> None:
        self.texts = texts
        self.changed = False
        self._out: list[bytes | _Call] = []

    def feed(self, event: SSEEvent) -> None:
        payload: Any = None
        if not event.is_comment:
            try:
                payload = orjson.loads(event.data)
            except orjson.JSONDecodeError:
                payload = None  # `[DONE]` and the like: never touched
        action = self._rewrite(payload) if isinstance(payload, dict) else "keep"
        if action == "keep":
            self._out.append(event.raw)
        elif action == "replace":
            self._out.append(encode_event(orjson.dumps(payload), event.event))
        if action != "keep":
            self.changed = True

    def result(self) -> bytes:
        return b"".join(part if isinstance(part, bytes) else part.inserted for part in self._out)

    def _rewrite(self, payload: dict[str, Any]) -> _Action:
        raise NotImplementedError


class _ChatRewriter(_StreamRewriter):
    """The fragment that first carries an edited call's `id` gets the whole text, its later fragments ""."""

    def __init__(self, texts: dict[str, str]) -> None:
        super().__init__(texts)
        self._edited: dict[tuple[int, int], bool] = {}  # (choice index, call index) -> edited, once its id came

    def _rewrite(self, payload: dict[str, Any]) -> _Action:
        action: _Action = "keep"
        for position, choice in enumerate(_dicts(payload, "choices")):
            delta = _dict(choice, "delta")
            choice_index = _index(choice.get("index"), position)
            for call_position, fragment in enumerate(_dicts(delta, "tool_calls")):
                key = (choice_index, _index(fragment.get("index"), call_position))
                if isinstance(fragment.get("id"), str) and key not in self._edited:
                    text = _edit_of(self.texts, fragment, "id")
                    self._edited[key] = text is not None
                elif self._edited.get(key):
                    text = ""
                else:
                    continue
                function = _dict(fragment, "function")
                if text is None or (function is None and not text):
                    continue
                if function is None:
                    function = fragment["function"] = {}
                if function.get("arguments") != text and (text or "arguments" in function):
                    function["arguments"] = text
                    action = "replace"
        return action


class _ResponsesRewriter(_StreamRewriter):
    """Every statement of an edited call's arguments is rewritten: the item added (a non-empty `arguments`
    placeholder becomes ""), the first argument delta (carries the whole text; later ones are dropped),
    `function_call_arguments.done`, `output_item.done` and the `output` of every `response` snapshot."""

    def __init__(self, texts: dict[str, str]) -> None:
        super().__init__(texts)
        self._by_id: dict[str, _Call] = {}
        self._by_index: dict[int, _Call] = {}

    def _rewrite(self, payload: dict[str, Any]) -> _Action:
        kind = payload.get("type")
        item = _dict(payload, "item")
        if kind == "response.output_item.added" and item is not None and item.get("type") == "function_call":
            text = _edit_of(self.texts, item, "call_id")
            if text is None:
                return "keep"
            call = _Call(text)
            if isinstance(item.get("id"), str):
                self._by_id[item["id"]] = call
            if type(payload.get("output_index")) is int:
                self._by_index[payload["output_index"]] = call
            return _set(item, "arguments", "") if item.get("arguments") else "keep"
        if kind in ("response.function_call_arguments.delta", "response.function_call_arguments.done"):
            item_id, output_index = payload.get("item_id"), payload.get("output_index")
            if isinstance(item_id, str):
                found = self._by_id.get(item_id)
            else:
                found = self._by_index.get(output_index) if type(output_index) is int else None
            if found is None:
                return "keep"
            if kind == "response.function_call_arguments.done":
                return _set(payload, "arguments", found.text)
            if found.sent:
                return "drop"
            found.sent = True
            return _set(payload, "delta", found.text)
        if kind == "response.output_item.done" and item is not None:
            return "replace" if _responses_body({"output": [item]}, self.texts) else "keep"
        response = _dict(payload, "response")
        return "replace" if response is not None and _responses_body(response, self.texts) else "keep"


class _MessagesRewriter(_StreamRewriter):
    """The first `input_json_delta` of an edited block carries the whole text and later ones are dropped;
    with none before its `content_block_stop` (or the end), one is inserted right after its start. A
    non-empty `input` in the start event is emptied to `{}`, as the real API sends it."""

    def __init__(self, texts: dict[str, str]) -> None:
        super().__init__(texts)
        self._open: dict[int, _Call] = {}
        self._slot: _Call | None = None

    def feed(self, event: SSEEvent) -> None:
        self._slot = None
        super().feed(event)
        if self._slot is not None:
            self._out.append(self._slot)  # right after the start event: filled at stop when no delta came

    def result(self) -> bytes:
        for index in list(self._open):
            self._close(index)
        return super().result()

    def _rewrite(self, payload: dict[str, Any]) -> _Action:
        kind, index = payload.get("type"), payload.get("index")
        if type(index) is not int:
            return "keep"
        block = _dict(payload, "content_block")
        if kind == "content_block_start" and block is not None and block.get("type") == "tool_use":
            text = _edit_of(self.texts, block, "id")
            if text is None:
                return "keep"
            self._slot = self._open[index] = _Call(text)
            return _set(block, "input", {}) if block.get("input") not in (None, {}) else "keep"
        call = self._open.get(index)
        if call is None:
            return "keep"
        delta = _dict(payload, "delta")
        if kind == "content_block_delta" and delta is not None and delta.get("type") == "input_json_delta":
            if call.sent:
                return "drop"
            call.sent = True
            return _set(delta, "partial_json", call.text)
        if kind == "content_block_stop":
            self._close(index)
        return "keep"

    def _close(self, index: int) -> None:
        call = self._open.pop(index)
        if not call.sent:
            data = {"type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": call.text}}
            call.inserted = encode_event(orjson.dumps(data), "content_block_delta")
            self.changed = True


def _set(obj: dict[str, Any], key: str, value: Any) -> _Action:
    """Set `obj[key]`; "replace" when that changed it, else "keep"."""
    if key in obj and obj[key] == value:
        return "keep"
    obj[key] = value
    return "replace"


_STREAM_REWRITERS: dict[str, Callable[[dict[str, str]], _StreamRewriter]] = {
    "chat": _ChatRewriter, "responses": _ResponsesRewriter, "messages": _MessagesRewriter}

