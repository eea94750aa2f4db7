"""Built-in mock LLM provider speaking the real OpenAI and Anthropic wire formats.

`create_mock_app()` returns an aiohttp application serving

    POST /v1/chat/completions   OpenAI Chat Completions: JSON, or SSE (`data:` lines, `data: [DONE]`)
    POST /v1/responses          OpenAI Responses: JSON, or SSE (`event:` + `data:`, `sequence_number`)
    POST /v1/embeddings         OpenAI embeddings: float arrays, or base64 float32 (`encoding_format`)
    GET  /v1/models             OpenAI model list (Anthropic's list shape when `anthropic-version` is sent)
    POST /v1/messages           Anthropic Messages: JSON, or SSE (`event:` + `data:`, one `ping`)

so an OpenAI SDK uses `base_url=<root>/v1` and an Anthropic SDK `base_url=<root>`. No key is checked.

Answers. The reply text is `"Mock reply: "` + the last user text, truncated to 200 characters. The
"last user text" is the text of the last user message (text parts joined by spaces; for Responses a
string `input` counts as one). When the conversation ends in tool results instead (OpenAI `tool`
messages, an Anthropic user turn holding only `tool_result` blocks, Responses `function_call_output`
items), the reply echoes the results' text and directives are not read, so agent tool loops end.
Streams send the reply one word (plus its trailing whitespace) per delta; deltas concatenate to the text.

Determinism. The answer is a pure function of the raw request body: ids are `chatcmpl-mock-<h>`,
`resp_mock_<h>`, `msg_mock_<h>`, tool call ids `call_mock_<h>_<i>` / `toolu_mock_<h>_<i>`, where `<h>`
is the first 16 hex digits of the body's SHA-256; `created` / `created_at` is always 1767225600.

Usage. Uncached input tokens = max(1, ceil(len(compact JSON of `messages` / `input`) / 4)). Output
tokens = words in the reply, or per tool call max(1, ceil(len(argument JSON) / 4)). `max_tokens`,
`max_completion_tokens` (wins over `max_tokens`) and `max_output_tokens` cut the reply to that many
words and report `finish_reason: "length"` / `stop_reason: "max_tokens"` / `status: "incomplete"`
(tool calls are never cut). Embeddings: ceil(len(text) / 4) per string, or the length of a token list.

Directives, read from the last user text only (a malformed directive is plain text):

    [tool:NAME {json}]  answer with a call to tool NAME with these arguments (a JSON object; may be
                        omitted for `{}`). Several directives give parallel calls, in order. OpenAI:
                        `tool_calls`, `finish_reason: "tool_calls"`; Responses: `function_call` items;
                        Anthropic: `tool_use` blocks, `stop_reason: "tool_use"`.
    [status:CODE]       answer HTTP CODE (400-599) with the provider's error body; 429 adds
                        `retry-after: 1`. Applies to streaming requests too (before any event).
    [cut:N]             streaming only: send the first N SSE events, then close the connection
                        abruptly; the terminal event (`[DONE]`, `response.completed`,
                        `message_stop`) is never sent, whatever N is.
    [cached:N]          N extra input tokens reported as cache hits: OpenAI `cached_tokens` (and
                        inside `prompt_tokens` / `input_tokens`); Anthropic `cache_read_input_tokens`
                        (`input_tokens` stays the uncached count).
    [reasoning:N]       OpenAI only: N reasoning tokens, added to `completion_tokens` / `output_tokens`.
    [sleep:MS]          wait MS milliseconds (at most 10000) before answering.

Of several `status`/`cut`/`cached`/`reasoning`/`sleep` directives of one kind, the first wins.

Recording. Every request appends `{"path", "headers" (names lower-cased), "body" (parsed JSON or
None)}` to `app[MOCK_REQUESTS]`, so tests can assert what a proxy forwarded. A body that is not a JSON
object, or lacks a required field, gets a 400 in the provider's error format, like the real APIs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from rungate.providers import _mock_formats as fmt
from rungate.providers._mock_formats import Json, Plan, ToolCall

__all__ = ["MOCK_REQUESTS", "create_mock_app"]

MOCK_REQUESTS = web.AppKey("mock_requests", list)
"""App key of the request log: a list of `{"path", "headers", "body"}` dicts, oldest first."""

REPLY_PREFIX = "Mock reply: "
MAX_ECHO = 200
MAX_SLEEP_MS = 10_000
DEFAULT_DIMENSIONS = 16

_TOOL = re.compile(r"\[tool:([A-Za-z0-9_-]{1,64})")
_SIMPLE = re.compile(r"\[(status|cut|cached|reasoning|sleep):(\d{1,9})\]")
_WORD = re.compile(r"\S+\s*")
_DECODER = json.JSONDecoder()
_TEXT_PARTS = ("text", "input_text", "output_text")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class _Directives:
    tools: tuple[ToolCall, ...] = ()
    values: dict[str, int] = field(default_factory=dict)


def _parse_tools(text: str) -> tuple[ToolCall, ...]:
    calls: list[ToolCall] = []
    pos = 0
    while match := _TOOL.search(text, pos):
        pos = match.end()
        start = len(text) - len(text[pos:].lstrip())
        args: Any = {}
        if not text.startswith("]", start):
            try:
                args, start = _DECODER.raw_decode(text, start)
            except ValueError:
                continue
            start = len(text) - len(text[start:].lstrip())
        if isinstance(args, dict) and text.startswith("]", start):
            calls.append(ToolCall(match.group(1), orjson.dumps(args).decode()))
            pos = start + 1
    return tuple(calls)


def _parse_directives(text: str) -> _Directives:
    values: dict[str, int] = {}
    for name, number in _SIMPLE.findall(text):
        value = int(number)
        if name == "status" and not 400 <= value <= 599:
            continue
        values.setdefault(name, min(value, MAX_SLEEP_MS) if name == "sleep" else value)
    return _Directives(_parse_tools(text), values)


def _text_of(content: Any) -> str:
    """The text of a message `content`: a string, or the text parts of a list joined by spaces."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part["text"] for part in content
                        if isinstance(part, dict) and part.get("type") in _TEXT_PARTS
                        and isinstance(part.get("text"), str))
    return ""


def _role(item: Any) -> Any:
    return item.get("role") if isinstance(item, dict) else None


def _chat_turn(messages: list[Any]) -> tuple[str, bool]:
    """(last user text, whether directives apply) of a Chat Completions conversation."""
    results: list[str] = []
    for message in reversed(messages):
        if _role(message) not in ("tool", "function"):
            break
        results.insert(0, _text_of(message.get("content")))
    if results:
        return " ".join(results), False
    for message in reversed(messages):
        if _role(message) == "user":
            return _text_of(message.get("content")), True
    return "", False


def _anthropic_turn(messages: list[Any]) -> tuple[str, bool]:
    """(last user text, whether directives apply) of a Messages conversation."""
    for message in reversed(messages):
        if _role(message) != "user":
            continue
        content = message.get("content")
        text = _text_of(content)
        if text or not isinstance(content, list):
            return text, True
        return " ".join(_text_of(block.get("content")) for block in content
                        if isinstance(block, dict) and block.get("type") == "tool_result"), False
    return "", False


def _responses_turn(items: Any) -> tuple[str, bool]:
    """(last user text, whether directives apply) of a Responses `input`."""
    if isinstance(items, str):
        return items, True
    results: list[str] = []
    for item in reversed(items):
        if not (isinstance(item, dict) and item.get("type") == "function_call_output"):
            break
        results.insert(0, _text_of(item.get("output")))
    if results:
        return " ".join(results), False
    for item in reversed(items):
        if _role(item) == "user":
            return _text_of(item.get("content")), True
    return "", False


def _limit(body: Json, *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _plan(digest: str, body: Json, counted: Any, text: str, directives: _Directives,
          limit: int | None) -> Plan:
    pieces: list[str] = [] if directives.tools else _WORD.findall(REPLY_PREFIX + text[:MAX_ECHO])
    truncated = limit is not None and len(pieces) > limit
    if truncated:
        pieces = pieces[:limit]
        if pieces:
            pieces[-1] = pieces[-1].rstrip()
    return Plan(digest=digest, model=str(body["model"]), pieces=tuple(pieces), tool_calls=directives.tools,
                truncated=truncated, input_tokens=max(1, math.ceil(len(orjson.dumps(counted)) / 4)),
                cached_tokens=directives.values.get("cached", 0),
                reasoning_tokens=directives.values.get("reasoning", 0))


def _invalid(body: Any, required: dict[str, type | tuple[type, ...]]) -> str | None:
    """Why `body` is not an acceptable request, or None."""
    if not isinstance(body, dict):
        return "We could not parse the JSON body of your request: expected a JSON object."
    for name, kind in required.items():
        value = body.get(name)
        if value is None:
            return f"Missing required parameter: '{name}'."
        if isinstance(value, bool) or not isinstance(value, kind):
            return f"Invalid type for '{name}'."
        if isinstance(value, list) and not value:
            return f"Invalid '{name}': empty array."
    return None


def _id_headers(anthropic: bool, digest: str) -> dict[str, str]:
    return {"request-id" if anthropic else "x-request-id": f"req_mock_{digest}"}


def _json(payload: Json, headers: dict[str, str], status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json",
                        headers=headers)


def _error(anthropic: bool, status: int, message: str, digest: str) -> web.Response:
    headers = _id_headers(anthropic, digest)
    if status == 429:
        headers["retry-after"] = "1"
    payload = fmt.anthropic_error(status, message, digest) if anthropic else fmt.openai_error(status, message)
    return _json(payload, headers, status)


async def _stream(request: web.Request, events: list[bytes], cut: int | None,
                  headers: dict[str, str]) -> web.StreamResponse:
    """Write `events` as an SSE response; with `cut`, only the first `cut` of them, then drop the line."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           **headers})
    await response.prepare(request)
    if cut is not None:
        events = events[:min(cut, len(events) - 1)]
        if not events:
            await response.write(b": mock stream\n\n")  # an SSE comment, so the headers go out first
    for event in events:
        await response.write(event)
    if cut is None:
        await response.write_eof()
    elif request.transport is not None:
        request.transport.close()
    return response


async def _record(request: web.Request) -> tuple[bytes, Any]:
    raw = await request.read()
    try:
        body: Any = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        body = None
    request.app[MOCK_REQUESTS].append({"path": request.path,
                                       "headers": {k.lower(): v for k, v in request.headers.items()},
                                       "body": body})
    return raw, body


@dataclass(frozen=True)
class _Route:
    """How one generation endpoint reads a request and renders an answer."""

    anthropic: bool
    required: dict[str, type | tuple[type, ...]]
    conversation: str
    turn: Callable[[Any], tuple[str, bool]]
    limits: tuple[str, ...]
    render: Callable[[Plan, Json], Json]
    stream: Callable[[Plan, Json], list[bytes]]


def _include_usage(body: Json) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


_CHAT = _Route(False, {"model": str, "messages": list}, "messages", _chat_turn,
               ("max_completion_tokens", "max_tokens"), lambda plan, body: fmt.chat_completion(plan),
               lambda plan, body: fmt.chat_events(plan, _include_usage(body)))
_RESPONSES = _Route(False, {"model": str, "input": (str, list)}, "input", _responses_turn,
                    ("max_output_tokens",), lambda plan, body: fmt.response_object(plan, body, final=True),
                    fmt.responses_events)
_MESSAGES = _Route(True, {"model": str, "messages": list, "max_tokens": int}, "messages", _anthropic_turn,
                   ("max_tokens",), lambda plan, body: fmt.anthropic_message(plan),
                   lambda plan, body: fmt.anthropic_events(plan))


def _generation(route: _Route) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        raw, body = await _record(request)
        digest = hashlib.sha256(raw).hexdigest()[:16]
        problem = _invalid(body, route.required)
        if problem is not None:
            return _error(route.anthropic, 400, problem, digest)
        text, live = route.turn(body[route.conversation])
        directives = _parse_directives(text) if live else _Directives()
        if "sleep" in directives.values:
            await asyncio.sleep(directives.values["sleep"] / 1000)
        status = directives.values.get("status")
        if status is not None:
            message = f"Mock error: status {status} requested by directive."
            return _error(route.anthropic, status, message, digest)
        plan = _plan(digest, body, body[route.conversation], text, directives, _limit(body, *route.limits))
        headers = _id_headers(route.anthropic, digest)
        if body.get("stream") is True:
            return await _stream(request, route.stream(plan, body), directives.values.get("cut"), headers)
        return _json(route.render(plan, body), headers)

    return handle


def _embedding_inputs(value: Any) -> list[Any]:
    """The list of embedding inputs: strings or token lists (a flat int list is one input)."""
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [value]
    return value if isinstance(value, list) else [value]


async def _embeddings(request: web.Request) -> web.StreamResponse:
    raw, body = await _record(request)
    digest = hashlib.sha256(raw).hexdigest()[:16]
    problem = _invalid(body, {"model": str, "input": (str, list)})
    if problem is not None:
        return _error(False, 400, problem, digest)
    dimensions = body.get("dimensions")
    if isinstance(dimensions, bool) or not (isinstance(dimensions, int) and 1 <= dimensions <= 4096):
        dimensions = DEFAULT_DIMENSIONS
    inputs = _embedding_inputs(body["input"])
    return _json(fmt.embeddings(body, inputs, dimensions), _id_headers(False, digest))


async def _models(request: web.Request) -> web.StreamResponse:
    await _record(request)
    return _json(fmt.models("anthropic-version" in request.headers), {})


def create_mock_app() -> web.Application:
    """Build the mock provider application (see the module docstring for routes and directives)."""
    app = web.Application()
    app[MOCK_REQUESTS] = []
    app.router.add_post("/v1/chat/completions", _generation(_CHAT))
    app.router.add_post("/v1/responses", _generation(_RESPONSES))
    app.router.add_post("/v1/messages", _generation(_MESSAGES))
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_get("/v1/models", _models)
    return app
