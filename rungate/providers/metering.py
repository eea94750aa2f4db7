"""Token metering and tool-call extraction for OpenAI and Anthropic bodies and streams (pure, no I/O).

Contracts shared by everything here:

- Input is untrusted JSON. Nothing raises on unexpected shapes: a field of the wrong type, a negative
  number or a boolean where a count is expected is treated as missing, and counts are never negative.
- Non-stream `usage_from_*` return None when the body carries no usable usage; the mapping to `Usage`
  follows `rungate.usage` (OpenAI: `input` = prompt - cached; Anthropic: `input` = `input_tokens`).
- Stream meters take parsed `SSEEvent`s in order. `feed` returns whether to forward the event to the
  client; data that is not valid JSON is forwarded and ignored for metering.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import orjson

from rungate.providers.sse import SSEEvent
from rungate.usage import Usage

__all__ = [
    "ChatStreamMeter",
    "InputEstimate",
    "MessagesStreamMeter",
    "ResponsesStreamMeter",
    "ToolCall",
    "estimate_input",
    "estimate_input_tokens",
    "prepare_chat_stream_request",
    "tool_calls_from_chat",
    "tool_calls_from_messages",
    "tool_calls_from_responses",
    "usage_from_chat",
    "usage_from_embeddings",
    "usage_from_messages",
    "usage_from_responses",
]


@dataclass(slots=True)
class ToolCall:
    """A tool call requested by the model; `arguments` is the JSON text as the model produced it.

    `id` is the id the tool result must reference (Chat `id`, Responses `call_id`, Anthropic `id`).
    For Anthropic non-stream bodies, whose `input` is already an object, `arguments` is its compact JSON.
    """

    id: str | None
    name: str
    arguments: str


# --------------------------------------------------------------------------------------------------
# Defensive JSON access


def _count(value: Any) -> int | None:
    """A token count: a non-negative int (bool excluded), else None."""
    if type(value) is int and value >= 0:
        return value
    return None


def _index(value: Any) -> int | None:
    """An index field: any int (bool excluded), else None."""
    return value if type(value) is int else None


def _dict(obj: Any, key: str) -> dict[str, Any] | None:
    if isinstance(obj, dict):
        value = obj.get(key)
        if isinstance(value, dict):
            return value
    return None


def _list(obj: Any, key: str) -> list[Any]:
    if isinstance(obj, dict):
        value = obj.get(key)
        if isinstance(value, list):
            return value
    return []


def _str(obj: Any, key: str) -> str | None:
    if isinstance(obj, dict):
        value = obj.get(key)
        if isinstance(value, str):
            return value
    return None


def _utf8_size(text: str) -> int:
    """Bytes of `text` in UTF-8 (a lone surrogate, which JSON can carry, counts as its three bytes)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _json_size(value: Any) -> int:
    """Bytes of the compact JSON of `value` in UTF-8; never raises."""
    try:
        return len(orjson.dumps(value))
    except TypeError:  # orjson.JSONEncodeError subclasses TypeError (huge ints, lone surrogates)
        return _utf8_size(str(value))


def _json_text(value: Any) -> str:
    """Compact JSON for `value`; never raises (falls back to `str`)."""
    try:
        return orjson.dumps(value).decode("utf-8")
    except TypeError:  # orjson.JSONEncodeError subclasses TypeError
        return str(value)


def _arguments(value: Any) -> str:
    """Tool arguments as text: strings as-is, other JSON values serialised, missing as ""."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return _json_text(value)


_INVALID = object()


# --------------------------------------------------------------------------------------------------
# Non-stream usage


def _openai_usage(usage: Any, in_key: str, out_key: str, in_details: str, out_details: str) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage.get(in_key))
    completion = _count(usage.get(out_key))
    if prompt is None and completion is None:
        return None
    prompt = prompt or 0
    completion = completion or 0
    cached = min(_count(_dict_get(usage, in_details, "cached_tokens")) or 0, prompt)
    reasoning = min(_count(_dict_get(usage, out_details, "reasoning_tokens")) or 0, completion)
    return Usage(input=prompt - cached, cached=cached, output=completion, reasoning=reasoning)


def _dict_get(obj: Any, key: str, sub: str) -> Any:
    inner = _dict(obj, key)
    return None if inner is None else inner.get(sub)


def usage_from_chat(body: Any) -> Usage | None:
    """Usage of a Chat Completions body (or stream chunk): input = prompt_tokens - cached_tokens."""
    return _openai_usage(
        body.get("usage") if isinstance(body, dict) else None,
        "prompt_tokens",
        "completion_tokens",
        "prompt_tokens_details",
        "completion_tokens_details",
    )


def usage_from_responses(body: Any) -> Usage | None:
    """Usage of a Responses API `response` object: input = input_tokens - cached_tokens; web_searches = its
    `web_search_call` output items (OpenAI bills each search of its built-in tool; the usage object does not
    count them)."""
    usage = _openai_usage(
        body.get("usage") if isinstance(body, dict) else None,
        "input_tokens",
        "output_tokens",
        "input_tokens_details",
        "output_tokens_details",
    )
    searches = _web_searches(body)
    return replace(usage, web_searches=searches) if usage is not None and searches else usage


def _web_searches(body: Any) -> int:
    """The `web_search_call` items in a Responses API `response` object's `output`."""
    return sum(1 for item in _list(body, "output") if _str(item, "type") == _WEB_SEARCH_CALL)


_WEB_SEARCH_CALL = "web_search_call"


def usage_from_embeddings(body: Any) -> Usage | None:
    """Usage of an embeddings body: input = prompt_tokens (falls back to total_tokens), output 0."""
    usage = _dict(body, "usage")
    if usage is None:
        return None
    prompt = _count(usage.get("prompt_tokens"))
    if prompt is None:
        prompt = _count(usage.get("total_tokens"))
    return None if prompt is None else Usage(input=prompt)


# How far from the end of an embeddings answer its usage object may start to be read off the bytes.
_USAGE_TAIL_BYTES = 64 * 1024
_USAGE_KEY = b'"usage"'
_WHITESPACE = b" \t\r\n"


def embeddings_usage_at_end(payload: bytes) -> Usage | None:
    """The usage of an embeddings answer read off its last bytes, without reading its vectors; None when it
    is not found there (the caller then reads the answer whole).

    Found only as the answer's own last member: the key `"usage"` (its last occurrence), a colon, an object,
    then nothing but the `}` that closes the answer. Nested deeper, an object would be followed by more than
    one closing bracket. An answer of numbers, base64 and a few short strings holds `"usage"` with both quotes
    unescaped only as a key; OpenAI writes it last.
    """
    # Only the ends are looked at (and copied): stripping the whole answer would copy its megabytes.
    tail = payload[-_USAGE_TAIL_BYTES:].rstrip(_WHITESPACE)
    key = tail.rfind(_USAGE_KEY)
    if key < 0 or not tail.endswith(b"}") or not payload[:_USAGE_TAIL_BYTES].lstrip(_WHITESPACE).startswith(b"{"):
        return None
    rest = tail[key + len(_USAGE_KEY):-1].lstrip(_WHITESPACE)  # the value, without the answer's closing `}`
    if not rest.startswith(b":"):
        return None
    try:
        value = orjson.loads(rest[1:])
    except orjson.JSONDecodeError:
        return None
    return usage_from_embeddings({"usage": value}) if isinstance(value, dict) else None


_ANTHROPIC_COUNTS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
)
_ANTHROPIC_NESTED = {
    "cache_creation": ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"),
    "output_tokens_details": ("thinking_tokens",),
    "server_tool_use": ("web_search_requests",),
}


def _anthropic_usage(usage: Any) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    inp = _count(usage.get("input_tokens"))
    out = _count(usage.get("output_tokens"))
    read = _count(usage.get("cache_read_input_tokens"))
    create = _count(usage.get("cache_creation_input_tokens"))
    split_5m = _count(_dict_get(usage, "cache_creation", "ephemeral_5m_input_tokens"))
    split_1h = _count(_dict_get(usage, "cache_creation", "ephemeral_1h_input_tokens"))
    if all(v is None for v in (inp, out, read, create, split_5m, split_1h)):
        return None
    if split_5m is None and split_1h is None:
        write_5m, write_1h = create or 0, 0
    else:
        write_1h = split_1h or 0
        write_5m = split_5m if split_5m is not None else max((create or 0) - write_1h, 0)
    output = out or 0
    thinking = _count(_dict_get(usage, "output_tokens_details", "thinking_tokens")) or 0
    return Usage(
        input=inp or 0,
        output=output,
        cached=read or 0,
        cache_write=write_5m,
        cache_write_1h=write_1h,
        reasoning=min(thinking, output),
        web_searches=_count(_dict_get(usage, "server_tool_use", "web_search_requests")) or 0,
    )


def usage_from_messages(body: Any) -> Usage | None:
    """Usage of an Anthropic Messages body.

    input = input_tokens; cached = cache_read_input_tokens; cache_write = the 5-minute part of the
    `cache_creation` split when present (else cache_creation_input_tokens); cache_write_1h = the 1-hour
    part; output = output_tokens; reasoning = output_tokens_details.thinking_tokens when present;
    web_searches = server_tool_use.web_search_requests.
    """
    return _anthropic_usage(body.get("usage") if isinstance(body, dict) else None)


# --------------------------------------------------------------------------------------------------
# Non-stream tool calls


def tool_calls_from_chat(body: Any) -> list[ToolCall]:
    """Tool calls of every choice of a Chat Completions body (legacy `function_call` included)."""
    calls: list[ToolCall] = []
    for choice in _list(body, "choices"):
        message = _dict(choice, "message")
        if message is None:
            continue
        for call in _list(message, "tool_calls"):
            function = _dict(call, "function")
            custom = _dict(call, "custom")  # a custom tool: free-form `input` text instead of JSON arguments
            if function is not None:
                calls.append(ToolCall(_str(call, "id"), _str(function, "name") or "",
                                      _arguments(function.get("arguments"))))
            elif custom is not None:
                calls.append(ToolCall(_str(call, "id"), _str(custom, "name") or "", _str(custom, "input") or ""))
        legacy = _dict(message, "function_call")
        if legacy is not None:
            calls.append(ToolCall(None, _str(legacy, "name") or "", _arguments(legacy.get("arguments"))))
    return calls


def tool_calls_from_responses(body: Any) -> list[ToolCall]:
    """`function_call` items of a Responses API `response` object; `id` is the item's `call_id`."""
    calls: list[ToolCall] = []
    for item in _list(body, "output"):
        kind = _str(item, "type")
        if kind in ("function_call", "custom_tool_call"):
            call_id = _str(item, "call_id") or _str(item, "id")
            arguments = _arguments(item.get("arguments")) if kind == "function_call" else _str(item, "input") or ""
            calls.append(ToolCall(call_id, _str(item, "name") or "", arguments))
    return calls


def tool_calls_from_messages(body: Any) -> list[ToolCall]:
    """`tool_use` content blocks of an Anthropic Messages body; `arguments` is the compact JSON of `input`."""
    calls: list[ToolCall] = []
    for block in _list(body, "content"):
        if _str(block, "type") == "tool_use":
            tool_input = block.get("input")
            calls.append(
                ToolCall(
                    _str(block, "id"),
                    _str(block, "name") or "",
                    _json_text({} if tool_input is None else tool_input),
                )
            )
    return calls


# --------------------------------------------------------------------------------------------------
# Request helpers


def prepare_chat_stream_request(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Return (body to send upstream, whether the client itself asked for streaming usage).

    When `stream` is true, the returned body is a copy with `stream_options.include_usage = True` (other
    `stream_options` keys kept) so the upstream always reports usage; the caller must then drop the
    usage-only chunk for clients that did not ask (see `ChatStreamMeter`). Otherwise `body` is returned
    unchanged. The input dict is never mutated.
    """
    options = body.get("stream_options")
    wants = isinstance(options, dict) and options.get("include_usage") is True
    if body.get("stream") is not True:
        return body, wants
    new_options = dict(options) if isinstance(options, dict) else {}
    new_options["include_usage"] = True
    upstream = dict(body)
    upstream["stream_options"] = new_options
    return upstream, wants


_INPUT_PARTS = ("messages", "input", "instructions", "system", "tools")
# Content parts that are images (OpenAI chat, Responses, Anthropic, a computer-use screenshot): a provider bills one
# by its pixels, up to a limit of its own, whatever its bytes say. Tool definitions hold none.
_IMAGE_PARTS = frozenset({"image_url", "input_image", "image", "computer_screenshot"})
_HOLDS_IMAGES = ("messages", "input", "system")


class InputEstimate(NamedTuple):
    """A request's input, as a reservation counts it: `tokens` for its text and structure, and `images` image
    parts, each taken at the serving model's most per image (`ModelPrice.image_tokens`)."""

    tokens: int
    images: int


def estimate_input(body: Any) -> InputEstimate:
    """Rough input size: ceil(UTF-8 bytes of the JSON of messages/input/instructions/system/tools / 4), >= 1,
    leaving out the image parts, which are counted instead.

    Bytes, not characters: a CJK character (three bytes) is most of a token, not a quarter of one. An image's
    bytes say nothing of its tokens: a 1 MB screenshot in base64 would read as 330,000 tokens, an image by URL as
    twenty, where either costs at most some 1,600 (a model's own limit). Used for budget reservations and as the
    fallback when a provider reports no usage.
    """
    size = images = 0
    if isinstance(body, dict):
        for key in _INPUT_PARTS:
            if key not in body:
                continue
            value = body[key]
            try:
                dumped = orjson.dumps(value)
            except TypeError:  # orjson.JSONEncodeError subclasses TypeError (huge ints, lone surrogates)
                size += _utf8_size(str(value))
                continue
            size += len(dumped)
            if key in _HOLDS_IMAGES and b'image' in dumped:  # a cheap test first: most requests carry no image
                found, their_bytes = _image_parts(value)
                images += found
                size -= their_bytes
    return InputEstimate(max(1, -(-size // 4)), images)


def estimate_input_tokens(body: Any) -> int:
    """The text part of `estimate_input` (what a request's input is estimated at, images aside)."""
    return estimate_input(body).tokens


def _image_parts(value: Any) -> tuple[int, int]:
    """The image parts inside `value` and the bytes of their JSON."""
    count = size = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("type") in _IMAGE_PARTS:
                count += 1
                size += _json_size(item)
            else:
                stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count, size


def web_search_limit(body: Any) -> int:
    """The most server-side web searches a request allows: the sum of `max_uses` over its `web_search_*` tools
    (Anthropic), or, when it offers a web search tool without one (OpenAI Responses: `web_search`,
    `web_search_preview`), its `max_tool_calls`, the bound on all its built-in tool calls. A search tool with
    neither bound adds nothing: its searches have no limit to reserve."""
    tools = body.get("tools") if isinstance(body, dict) else None
    limit = 0
    unbounded = False
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, dict) and str(tool.get("type", "")).startswith("web_search"):
            uses = _count(tool.get("max_uses"))
            if uses is None:
                unbounded = True
            limit += uses or 0
    if unbounded:
        limit += _count(body.get("max_tool_calls")) or 0
    return limit


# --------------------------------------------------------------------------------------------------
# Stream meters


@dataclass(slots=True)
class _CallAcc:
    id: str | None = None
    name: str = ""
    parts: list[str] = field(default_factory=list)
    final: str | None = None  # complete arguments from a `done` event, authoritative

    def to_call(self, default_arguments: str = "") -> ToolCall:
        arguments = self.final if self.final is not None else "".join(self.parts)
        return ToolCall(self.id, self.name, arguments or default_arguments)


class _StreamMeter:
    """State shared by the three stream meters (see the subclasses for what each event contributes)."""

    def __init__(self) -> None:
        self._usage: Usage | None = None
        self._done = False
        self._error: dict[str, Any] | None = None
        self._text_bytes = 0
        self._delta_seen = False
        self.malformed = False  # an event whose data is not JSON: the stream is broken
        self.response_id: str | None = None  # a Responses API stream's response id, once seen

    @property
    def usage(self) -> Usage | None:
        """The provider-reported usage once seen, else None (possibly partial: see `usage_final`)."""
        return self._usage

    @property
    def usage_final(self) -> bool:
        """Whether `usage` is the provider's count for the whole answer (OpenAI reports usage once, at the
        end; Anthropic reports the input side first and the output at the end)."""
        return self._usage is not None

    @property
    def done(self) -> bool:
        """True once the stream's terminal event was seen."""
        return self._done

    @property
    def error(self) -> dict[str, Any] | None:
        """The first mid-stream error object seen (the nested `error` object when there is one)."""
        return self._error

    @property
    def output_text_bytes(self) -> int:
        """UTF-8 bytes of the text, reasoning and tool-argument deltas seen."""
        return self._text_bytes

    @property
    def tool_calls(self) -> list[ToolCall]:
        """Tool calls accumulated so far (a new list each time)."""
        return []

    @property
    def tool_names(self) -> tuple[str, ...]:
        """The names of the tool calls seen so far, in order: cheap (no arguments are joined), for watching a
        stream event by event."""
        return tuple(acc.name for acc in self._accumulators())

    def _accumulators(self) -> Iterable[_CallAcc]:
        return ()

    def feed(self, event: SSEEvent) -> bool:
        """Meter one event; return True to forward it to the client."""
        raise NotImplementedError

    def _load(self, event: SSEEvent) -> Any:
        """The event's JSON payload; `_INVALID` (and `malformed` set) when its data is not JSON."""
        try:
            return orjson.loads(event.data)
        except orjson.JSONDecodeError:
            if event.data:
                self.malformed = True
            return _INVALID

    def estimated_usage(self, input_estimate: int) -> Usage:
        """The reported usage if any; else input = `input_estimate`, output = ceil(UTF-8 bytes / 4).

        The output estimate is at least 1 once any text or argument delta was seen, else 0.
        """
        if self._usage is not None:
            return self._usage
        return Usage(input=max(input_estimate, 0), output=self._estimated_output())

    def _estimated_output(self) -> int:
        if not self._delta_seen:
            return 0
        return max(1, -(-self._text_bytes // 4))

    def _delta(self, text: Any) -> None:
        if isinstance(text, str):
            self._delta_seen = True
            self._text_bytes += _utf8_size(text)

    def _set_error(self, payload: Any) -> None:
        if self._error is not None:
            return
        if isinstance(payload, dict):
            nested = payload.get("error")
            self._error = nested if isinstance(nested, dict) else payload
        else:
            self._error = {"message": payload if isinstance(payload, str) else _json_text(payload)}


class ChatStreamMeter(_StreamMeter):
    """Meters a Chat Completions stream (`data:`-only events, ended by `data: [DONE]`).

    Usage comes from the usage chunk (`choices: []` with `usage`); that chunk is dropped (feed returns
    False) when the client did not ask for usage, since the proxy injected `include_usage`. Tool calls
    are accumulated per (choice index, tool-call index), argument fragments concatenated. A payload with
    a top-level `error` key is recorded as `error`.
    """

    def __init__(self, client_wants_usage: bool) -> None:
        super().__init__()
        self._client_wants_usage = client_wants_usage
        self._calls: dict[tuple[int, int], _CallAcc] = {}

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [self._calls[key].to_call() for key in sorted(self._calls)]

    def _accumulators(self) -> Iterable[_CallAcc]:
        return (self._calls[key] for key in sorted(self._calls))

    def feed(self, event: SSEEvent) -> bool:
        if event.is_comment:
            return True
        if event.data.strip() == "[DONE]":
            self._done = True
            return True
        payload = self._load(event)
        if not isinstance(payload, dict):
            return True
        if payload.get("error") is not None:
            self._set_error(payload)
        if isinstance(payload.get("usage"), dict):
            usage = usage_from_chat(payload)
            if usage is not None:
                self._usage = usage
        choices = payload.get("choices")
        if isinstance(choices, list):
            for position, choice in enumerate(choices):
                # Inline, not a call per field: a stream is mostly text deltas, and its per-event metering
                # showed as one of the proxy's larger items (about 40% fewer instructions for it).
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if not isinstance(delta, dict):
                    continue
                text = delta.get("content")
                if isinstance(text, str):
                    self._delta(text)
                text = delta.get("refusal")
                if isinstance(text, str):
                    self._delta(text)
                if "tool_calls" in delta or "function_call" in delta:
                    self._tool_deltas(position, choice, delta)
            if not choices and payload.get("usage") is not None and not self._client_wants_usage:
                return False
        return True

    def _tool_deltas(self, position: int, choice: dict[str, Any], delta: dict[str, Any]) -> None:
        """The tool-call fragments of one choice's delta (its `index`, else its position, names the choice)."""
        choice_index = _index(choice.get("index"))
        if choice_index is None:
            choice_index = position
        for call_position, call in enumerate(_list(delta, "tool_calls")):
            if not isinstance(call, dict):
                continue
            call_index = _index(call.get("index"))
            self._fragment((choice_index, call_position if call_index is None else call_index), call)
        legacy = _dict(delta, "function_call")
        if legacy is not None:
            self._fragment((choice_index, -1), {"function": legacy})

    def _fragment(self, key: tuple[int, int], call: dict[str, Any]) -> None:
        acc = self._calls.get(key)
        if acc is None:
            acc = self._calls[key] = _CallAcc()
        call_id = _str(call, "id")
        if call_id and acc.id is None:
            acc.id = call_id
        function = _dict(call, "function") or _dict(call, "custom")  # a custom tool: `input` pieces
        if function is None:
            return
        name = _str(function, "name")
        if name:  # joined across fragments, as the SDKs accumulate them (a split name is still the name)
            acc.name += name
        arguments = function.get("arguments", function.get("input"))
        if isinstance(arguments, str):
            acc.parts.append(arguments)
            self._delta(arguments)


_RESPONSES_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_RESPONSES_TEXT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
    }
)


class ResponsesStreamMeter(_StreamMeter):
    """Meters a Responses API stream (`event: <type>` + JSON data with the same `type`).

    Usage comes from `response.usage` of `response.completed` / `response.incomplete` /
    `response.failed` (which also end the stream; so does `data: [DONE]`), with the web searches its final
    `output` lists, or as many `web_search_call` items as were announced if that is more (a stream cut short
    is charged the searches it announced). Function calls come from
    `response.output_item.added|done`, `response.function_call_arguments.delta|done` and the final
    response's `output`. `event: error` (or `type: error`) and `response.failed`'s `response.error` are
    recorded as `error`. Every event is forwarded.
    """

    def __init__(self) -> None:
        super().__init__()
        self._calls: dict[str, _CallAcc] = {}
        self._by_index: dict[int, str] = {}
        # The `web_search_call` items announced so far, by output index (or id): each search was billed, even
        # when the stream is cut before the final response counts them.
        self._searches: set[int | str] = set()

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [acc.to_call() for acc in self._calls.values()]

    def estimated_usage(self, input_estimate: int) -> Usage:
        return self._with_announced_searches(super().estimated_usage(input_estimate))

    def _with_announced_searches(self, usage: Usage) -> Usage:
        """`usage` counting the searches the stream announced, where they are more than it says: each was run
        (and billed), also when the stream was cut or its final `output` leaves one out."""
        searches = len(self._searches)
        return replace(usage, web_searches=searches) if searches > usage.web_searches else usage

    def _accumulators(self) -> Iterable[_CallAcc]:
        return self._calls.values()

    def feed(self, event: SSEEvent) -> bool:
        if event.is_comment:
            return True
        if event.data.strip() == "[DONE]":
            self._done = True
            return True
        payload = self._load(event)
        if not isinstance(payload, dict):
            if event.event == "error" and event.data:
                self._set_error(event.data)
            return True
        kind = _str(payload, "type") or event.event
        if kind == "error" or event.event == "error":
            self._set_error(payload)
        elif kind in _RESPONSES_TERMINAL:
            self._done = True
            response = _dict(payload, "response")
            self.response_id = _str(response, "id") or self.response_id
            usage = usage_from_responses(response)
            if usage is not None:
                self._usage = self._with_announced_searches(usage)
            failure = _dict(response, "error")
            if kind == "response.failed" and failure is not None:
                self._set_error(failure)
            for position, item in enumerate(_list(response, "output")):
                self._item(position, item, final=True)
        elif kind in _RESPONSES_TEXT_DELTAS:
            self._delta(payload.get("delta"))
        elif kind == "response.created":
            self.response_id = _str(_dict(payload, "response"), "id")
        elif kind in ("response.output_item.added", "response.output_item.done"):
            self._item(_index(payload.get("output_index")), payload.get("item"), kind.endswith(".done"))
        elif kind in ("response.function_call_arguments.delta", "response.custom_tool_call_input.delta"):
            delta = payload.get("delta")
            self._delta(delta)
            if isinstance(delta, str):
                self._acc(payload.get("item_id"), _index(payload.get("output_index"))).parts.append(delta)
        elif kind in ("response.function_call_arguments.done", "response.custom_tool_call_input.done"):
            arguments = payload.get("arguments", payload.get("input"))
            if isinstance(arguments, str):
                self._acc(payload.get("item_id"), _index(payload.get("output_index"))).final = arguments
        return True

    def _acc(self, item_id: Any, output_index: int | None) -> _CallAcc:
        key: str | None = item_id if isinstance(item_id, str) else None
        if key is None and output_index is not None:
            key = self._by_index.get(output_index, f"#{output_index}")
        if key is None:
            key = f"#anon{len(self._calls)}"
        if output_index is not None:
            self._by_index.setdefault(output_index, key)
        acc = self._calls.get(key)
        if acc is None:
            acc = self._calls[key] = _CallAcc()
        return acc

    def _item(self, output_index: int | None, item: Any, final: bool) -> None:
        kind = _str(item, "type")
        if kind == _WEB_SEARCH_CALL:
            key = output_index if output_index is not None else _str(item, "id")
            if key is not None:
                self._searches.add(key)
            return
        if kind not in ("function_call", "custom_tool_call"):
            return
        acc = self._acc(item.get("id"), output_index)
        call_id = _str(item, "call_id")
        if call_id:
            acc.id = call_id
        name = _str(item, "name")
        if name:
            acc.name = name
        arguments = item.get("arguments" if kind == "function_call" else "input")
        if final and isinstance(arguments, str):
            acc.final = arguments


class MessagesStreamMeter(_StreamMeter):
    """Meters an Anthropic Messages stream (`event: <type>` + JSON data with the same `type`).

    Usage: the input side from `message_start.message.usage`, then every `message_delta.usage` overwrites
    the fields it carries with valid counts (cumulative semantics; null or invalid values are ignored).
    `usage` is therefore available from `message_start` on; until a `message_delta` with usage arrives,
    `estimated_usage` keeps the reported input side and takes the larger of the reported and the
    estimated output. Tool calls come from `tool_use` `content_block_start` + `input_json_delta`.
    `message_stop` ends the stream; `event: error` is recorded as `error`. Every event is forwarded.
    """

    def __init__(self) -> None:
        super().__init__()
        self._fields: dict[str, Any] = {}
        self._final_output = False
        self._calls: dict[int, _CallAcc] = {}
        self._start_inputs: dict[int, str] = {}

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [self._calls[i].to_call(self._start_inputs.get(i, "{}")) for i in sorted(self._calls)]

    def _accumulators(self) -> Iterable[_CallAcc]:
        return (self._calls[i] for i in sorted(self._calls))

    @property
    def usage_final(self) -> bool:
        return self._final_output

    def estimated_usage(self, input_estimate: int) -> Usage:
        usage = self._usage
        if usage is None:
            return super().estimated_usage(input_estimate)
        if self._final_output:
            return usage
        output = max(usage.output, self._estimated_output())
        return Usage(
            input=usage.input,
            output=output,
            cached=usage.cached,
            cache_write=usage.cache_write,
            cache_write_1h=usage.cache_write_1h,
            reasoning=min(usage.reasoning, output),
        )

    def feed(self, event: SSEEvent) -> bool:
        if event.is_comment:
            return True
        payload = self._load(event)
        if not isinstance(payload, dict):
            if event.event == "error" and event.data:
                self._set_error(event.data)
            return True
        kind = _str(payload, "type") or event.event
        if kind == "error" or event.event == "error":
            self._set_error(payload)
        elif kind == "message_start":
            self._merge_usage(_dict_get(payload, "message", "usage"))
        elif kind == "message_delta":
            if self._merge_usage(payload.get("usage")):
                self._final_output = True
        elif kind == "message_stop":
            self._done = True
        elif kind == "content_block_start":
            self._block_start(_index(payload.get("index")), _dict(payload, "content_block"))
        elif kind == "content_block_delta":
            self._block_delta(_index(payload.get("index")), _dict(payload, "delta"))
        return True

    def _merge_usage(self, usage: Any) -> bool:
        """Overwrite the known usage fields with the valid counts in `usage`; True if it had any."""
        if not isinstance(usage, dict):
            return False
        changed = False
        for key in _ANTHROPIC_COUNTS:
            value = _count(usage.get(key))
            if value is not None:
                self._fields[key] = value
                changed = True
        for key, subkeys in _ANTHROPIC_NESTED.items():
            nested = usage.get(key)
            if not isinstance(nested, dict):
                continue
            for sub in subkeys:
                value = _count(nested.get(sub))
                if value is not None:
                    self._fields.setdefault(key, {})[sub] = value
                    changed = True
        if changed:
            self._usage = _anthropic_usage(self._fields)
        return changed

    def _block_start(self, index: int | None, block: dict[str, Any] | None) -> None:
        if index is None or block is None or _str(block, "type") != "tool_use":
            return
        self._calls[index] = _CallAcc(id=_str(block, "id"), name=_str(block, "name") or "")
        tool_input = block.get("input")
        self._start_inputs[index] = _json_text({} if tool_input is None else tool_input)

    def _block_delta(self, index: int | None, delta: dict[str, Any] | None) -> None:
        if delta is None:
            return
        kind = _str(delta, "type")
        if kind == "text_delta":
            self._delta(delta.get("text"))
        elif kind == "thinking_delta":
            self._delta(delta.get("thinking"))
        elif kind == "input_json_delta":
            partial = delta.get("partial_json")
            self._delta(partial)
            if isinstance(partial, str) and index is not None and index in self._calls:
                self._calls[index].parts.append(partial)
