"""A fake upstream that fails on command: the mock provider behind a middleware that takes one scripted
fault per request (then answers normally), and logs every request it saw with its arrival time.

Faults (strings, consumed in order from `app[FAULTS]`; an empty queue means "ok"):

    ok                   the mock provider's normal answer
    status:N[:RA]        HTTP N with the provider's error body (`retry-after: RA` when given)
    context_length       400 saying the prompt is too long, in the provider's words
    content_filter       400 refusing the prompt for its content (OpenAI `content_filter` code)
    reset                close the connection before any response byte
    hang                 never answer (until the server stops)
    slow:S               wait S seconds, then answer normally
    slowfirst:S          stream: send the headers and the opening event, wait S seconds, then the rest
    cut:N                stream: send the first N events, then drop the connection
    stall:N:S            stream: send the first N events, then go silent for S seconds, then drop
    malformed:N          stream: send N events, then one whose data is not JSON, then the rest
    nodone               stream: every event but the terminal one (`[DONE]` / `message_stop`), then a clean end
    errstream            stream: the opening event, then the provider's error event (overloaded), then a clean end
    continue             stream: continue the scripted answer after the request's final assistant turn (an
                         Anthropic prefill, or an OpenAI assistant message), as a model asked to continue does

While `app[DOWN_UNTIL][0]` (a `time.monotonic()` deadline) is in the future, every request gets a 503 first,
whatever is scripted: a provider that is down for a while, then recovers.

Scripted streams answer "Hello world, this is the answer." in events of one word (OpenAI chat or
Anthropic Messages, by path), usage included.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import orjson
from aiohttp import web

from rungate.providers.mock import create_mock_app
from rungate.providers.sse import encode_event

FAULTS = web.AppKey("faults", list)
FAULT_LOG = web.AppKey("fault_log", list)  # (monotonic time, path, fault)
FAULT_BODIES = web.AppKey("fault_bodies", list)  # the request bodies of scripted streams
DOWN_UNTIL = web.AppKey("down_until", list)  # [t]: down (503) until this monotonic time
WORDS = ["Hello ", "world, ", "this ", "is ", "the ", "answer."]
TEXT = "".join(WORDS)


def _anthropic(request: web.Request) -> bool:
    return request.path.endswith("/messages")


def _error(request: web.Request, status: int, message: str, code: str | None = None,
           retry_after: str | None = None) -> web.Response:
    if _anthropic(request):
        kind = {400: "invalid_request_error", 429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error")
        body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                          "param": None, "code": code}}
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    return web.json_response(body, status=status, headers=headers)


def chat_events(model: str, words: list[str] | None = None) -> list[bytes]:
    words = WORDS if words is None else words
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return encode_event(orjson.dumps({"id": "chatcmpl-fault", "object": "chat.completion.chunk",
                                          "created": 1767225600, "model": model,
                                          "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}))
    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": word}) for word in words]
    events.append(chunk({}, "stop"))
    events.append(encode_event(orjson.dumps({
        "id": "chatcmpl-fault", "object": "chat.completion.chunk", "created": 1767225600, "model": model,
        "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": len(words),
                                 "total_tokens": 10 + len(words)}})))
    events.append(b"data: [DONE]\n\n")
    return events


async def send_responses_stream(request: web.Request, events: list[dict[str, Any]]) -> web.StreamResponse:
    """Answer `request` with a Responses API stream of `events` (each given its `sequence_number`)."""
    stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await stream.prepare(request)
    for number, event in enumerate(events):
        await stream.write(encode_event(orjson.dumps({**event, "sequence_number": number}), event["type"]))
    await stream.write_eof()
    return stream


def messages_events(model: str, words: list[str] | None = None) -> list[bytes]:
    words = WORDS if words is None else words
    def event(name: str, data: dict[str, Any]) -> bytes:
        return encode_event(orjson.dumps({"type": name, **data}), name)
    events = [event("message_start", {"message": {
        "id": "msg_fault", "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 1, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0}}}),
        event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})]
    events += [event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": word}})
               for word in words]
    events.append(event("content_block_stop", {"index": 0}))
    events.append(event("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                          "usage": {"output_tokens": len(words)}}))
    events.append(event("message_stop", {}))
    return events


def _prefill(body: dict[str, Any]) -> str:
    """The text of the request's final assistant turn ("" when it does not end with one)."""
    messages = body.get("messages") or []
    last = messages[-1] if messages else {}
    if last.get("role") != "assistant":
        return ""
    content = last.get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))


async def _stream(request: web.Request, fault: str) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    request.app[FAULT_BODIES].append(body)
    events = (messages_events if _anthropic(request) else chat_events)(str(body.get("model")))
    if fault == "continue":  # the rest of the scripted answer, after what the prefill already says
        pieces = re.findall(r"\s*\S+", TEXT[len(_prefill(body)):])  # a model starts with the space it needs
        events = (messages_events if _anthropic(request) else chat_events)(str(body.get("model")), pieces)
    name, _, rest = fault.partition(":")
    args = [float(a) for a in rest.split(":")] if rest else []
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    if name == "slowfirst":
        await response.write(events[0])
        await asyncio.sleep(args[0])
        events = events[1:]
    elif name in ("cut", "stall"):
        for item in events[:int(args[0])]:
            await response.write(item)
        if name == "stall":
            await asyncio.sleep(args[1])
        if request.transport is not None:
            request.transport.close()
        return response
    elif name == "malformed":
        at = int(args[0])
        events = [*events[:at], b"data: {this is not json\n\n", *events[at:]]
    elif name == "nodone":
        events = events[:-1]
    elif name == "errstream":
        error = {"type": "overloaded_error", "message": "Overloaded"}
        events = [events[0], encode_event(orjson.dumps({"type": "error", "error": error}), "error")
                  if _anthropic(request) else encode_event(orjson.dumps({"error": {**error, "code": None}}))]
    for item in events:
        await response.write(item)
    await response.write_eof()
    return response


@web.middleware
async def _inject(request: web.Request, handler: Any) -> web.StreamResponse:
    queue: list[str] = request.app[FAULTS]
    down = request.method == "POST" and time.monotonic() < request.app[DOWN_UNTIL][0]
    fault = "status:503" if down else queue.pop(0) if queue and request.method == "POST" else "ok"
    request.app[FAULT_LOG].append((time.monotonic(), request.path, fault))
    name, _, rest = fault.partition(":")
    if name == "status":
        status, _, retry_after = rest.partition(":")
        return _error(request, int(status), f"Fault: status {status}.", retry_after=retry_after or None)
    if name == "context_length":
        if _anthropic(request):
            return _error(request, 400, "prompt is too long: 215000 tokens > 200000 maximum")
        return _error(request, 400, "This model's maximum context length is 128000 tokens. However, your messages"
                      " resulted in 215000 tokens.", code="context_length_exceeded")
    if name == "content_filter":
        return _error(request, 400, "Your request was rejected as a result of our safety system.",
                      code="content_filter")
    if name == "reset":
        if request.transport is not None:
            request.transport.close()
        return web.Response()
    if name == "hang":
        await asyncio.sleep(3600)
    if name == "slow":
        await asyncio.sleep(float(rest))
    if name in ("slowfirst", "cut", "stall", "malformed", "nodone", "continue", "errstream"):
        return await _stream(request, fault)
    return await handler(request)  # type: ignore[no-any-return]


def create_fault_app() -> web.Application:
    """The mock provider with the fault middleware in front; script faults with `app[FAULTS].extend([...])`."""
    app = create_mock_app()
    app.middlewares.append(_inject)
    app[FAULTS] = []
    app[FAULT_LOG] = []
    app[FAULT_BODIES] = []
    app[DOWN_UNTIL] = [0.0]
    return app
