"""Edit and approve: a held answer released with an operator's arguments in place of the model's.

Given real answers of the built-in mock provider (all three formats, streamed and not, one and two parallel
tool calls, arguments long enough to be streamed in several fragments), when one call's arguments are
rewritten, then that call carries exactly the edited arguments for the project's own parsers and for the
real `openai` / `anthropic` SDKs (validating models, raw stream events and the SDKs' stream helpers), and
every other byte of the answer is unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from rungate.providers.metering import (
    ChatStreamMeter,
    MessagesStreamMeter,
    ResponsesStreamMeter,
    ToolCall,
    tool_calls_from_chat,
    tool_calls_from_messages,
    tool_calls_from_responses,
)
from rungate.providers.mock import create_mock_app
from rungate.providers.sse import SSEEvent, SSEParser, encode_event
from rungate.proxy.held import rewrite_answer, rewrite_stream

FORMATS = ("chat", "responses", "messages")
PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses", "messages": "/v1/messages"}
MODELS = {"chat": "gpt-4o", "responses": "gpt-4o", "messages": "claude-sonnet-4-6"}
REFUND = {"amount_usd": 1240.0, "order_id": "ord_0001", "reason": "parcel arrived damaged"}
LOOKUP = {"order_id": "ord_0001", "include": ["items", "history"]}
EDIT = {"amount_usd": 500.0, "order_id": "ord_0001", "reason": "partial refund, approved by ops ✓",
        "note": "two\nlines and a \"quote\""}
CALLS: dict[int, list[tuple[str, dict[str, Any]]]] = {
    1: [("issue_refund", REFUND)], 2: [("issue_refund", REFUND), ("lookup_order", LOOKUP)]}


@dataclass
class Answer:
    """A real answer of the mock provider and the tool calls the project's parsers read from it."""

    fmt: str
    stream: bool
    raw: bytes
    calls: list[ToolCall]

    def rewrite(self, edits: Mapping[str, Any]) -> bytes:
        return (rewrite_stream if self.stream else rewrite_answer)(self.fmt, self.raw, edits)


def request_body(fmt: str, text: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODELS[fmt], "stream": stream}
    if fmt == "responses":
        body["input"] = text
    else:
        body["messages"] = [{"role": "user", "content": text}]
    if fmt == "messages":
        body["max_tokens"] = 1024
    if fmt == "chat" and stream:
        body["stream_options"] = {"include_usage": True}
    return body


def events_of(data: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    return parser.feed(data) + parser.flush()


def payload_of(event: SSEEvent) -> Any:
    try:
        return orjson.loads(event.data)
    except orjson.JSONDecodeError:
        return None


def calls_of(fmt: str, stream: bool, data: bytes) -> list[ToolCall]:
    """The tool calls in `data` as the project's own parsers read them."""
    if not stream:
        parse: Callable[[Any], list[ToolCall]] = {"chat": tool_calls_from_chat, "responses": tool_calls_from_responses,
                                                  "messages": tool_calls_from_messages}[fmt]
        return parse(orjson.loads(data))
    meter = {"chat": ChatStreamMeter(client_wants_usage=True), "responses": ResponsesStreamMeter(),
             "messages": MessagesStreamMeter()}[fmt]
    for event in events_of(data):
        assert meter.feed(event)
    assert meter.done
    return meter.tool_calls


def about_first_call(fmt: str, first_id: str, event: SSEEvent) -> bool:
    """Whether a stream event says anything about the first tool call (output / block / tool index 0)."""
    payload = payload_of(event)
    if not isinstance(payload, dict):
        return False
    if fmt == "chat":
        return any(call.get("index") == 0 for choice in payload.get("choices") or []
                   for call in choice.get("delta", {}).get("tool_calls") or [])
    if fmt == "messages":
        return bool(payload.get("index") == 0)
    output = (payload.get("response") or {}).get("output") or []
    return payload.get("output_index") == 0 or any(item.get("call_id") == first_id for item in output)


def argument_pieces(fmt: str, data: bytes) -> list[str]:
    """The argument fragments the stream sends for the first tool call, empty ones included."""
    pieces: list[str] = []
    for event in events_of(data):
        payload = payload_of(event)
        if not isinstance(payload, dict):
            continue
        if fmt == "chat":
            for choice in payload.get("choices") or []:
                for call in choice["delta"].get("tool_calls") or []:
                    if call["index"] == 0 and "arguments" in call.get("function", {}):
                        pieces.append(call["function"]["arguments"])
        elif fmt == "responses":
            if payload["type"] == "response.function_call_arguments.delta" and payload["output_index"] == 0:
                pieces.append(payload["delta"])
        elif payload["type"] == "content_block_delta" and payload["index"] == 0:
            pieces.append(payload["delta"]["partial_json"])
    return pieces


def is_argument_delta(fmt: str, event: SSEEvent) -> bool:
    payload = payload_of(event)
    if fmt == "responses":
        return bool(payload["type"] == "response.function_call_arguments.delta")
    return bool(payload["type"] == "content_block_delta" and payload["delta"]["type"] == "input_json_delta")


def without_arguments(value: Any) -> Any:
    """`value` without the fields that state tool arguments (`arguments`, `partial_json`, a string `delta`)."""
    if isinstance(value, list):
        return [without_arguments(item) for item in value]
    if isinstance(value, dict):
        return {key: without_arguments(item) for key, item in value.items()
                if key not in ("arguments", "partial_json") and not (key == "delta" and isinstance(item, str))}
    return value


@pytest.fixture
async def mock(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(create_mock_app(), host="127.0.0.1")
    return server


async def fetch(server: TestServer, fmt: str, stream: bool, ncalls: int) -> Answer:
    text = "Please handle this. " + " ".join(f"[tool:{name} {json.dumps(args)}]" for name, args in CALLS[ncalls])
    async with aiohttp.ClientSession() as http, http.post(server.make_url(PATHS[fmt]),
                                                          json=request_body(fmt, text, stream)) as resp:
        assert resp.status == 200
        raw = await resp.read()
    calls = calls_of(fmt, stream, raw)
    assert [(c.name, orjson.loads(c.arguments)) for c in calls] == CALLS[ncalls]
    return Answer(fmt, stream, raw, calls)


async def replay(aiohttp_server: Any, stream: bytes) -> TestServer:
    """A tiny upstream that answers every generation call with `stream` as an SSE body."""
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=stream, content_type="text/event-stream")

    app = web.Application()
    for path in PATHS.values():
        app.router.add_post(path, handle)
    server: TestServer = await aiohttp_server(app, host="127.0.0.1")
    return server


CASES = [(fmt, stream, ncalls) for fmt in FORMATS for stream in (False, True) for ncalls in (1, 2)]


@pytest.mark.parametrize(("fmt", "stream", "ncalls"), CASES)
async def test_one_call_is_rewritten_and_every_other_byte_is_kept(mock: TestServer, fmt: str, stream: bool,
                                                                  ncalls: int) -> None:
    answer = await fetch(mock, fmt, stream, ncalls)
    first = answer.calls[0]
    if stream:  # the mock really splits these arguments into several fragments
        assert len([piece for piece in argument_pieces(fmt, answer.raw) if piece]) > 3

    out = answer.rewrite({first.id or "": EDIT})

    calls = calls_of(fmt, stream, out)
    assert orjson.loads(calls[0].arguments) == EDIT
    assert (calls[0].id, calls[0].name) == (first.id, first.name)
    assert calls[1:] == answer.calls[1:]
    if not stream:
        # Only the edited call's arguments differ, in that format's encoding (a JSON string or an object).
        if fmt == "messages":
            old, new = orjson.dumps(REFUND), orjson.dumps(EDIT)
        else:
            old, new = orjson.dumps(first.arguments), orjson.dumps(orjson.dumps(EDIT).decode())
        assert answer.raw.count(old) == 1
        assert out == answer.raw.replace(old, new)
    else:
        untouched = [e.raw for e in events_of(answer.raw) if not about_first_call(fmt, first.id or "", e)]
        assert [e.raw for e in events_of(out) if not about_first_call(fmt, first.id or "", e)] == untouched
        # The events about the edited call say what they said before, bar the arguments, under the same
        # `event:` names; only the argument deltas after the first are gone (Chat keeps them, blanked).
        before = [e for e in events_of(answer.raw) if about_first_call(fmt, first.id or "", e)]
        kept: list[SSEEvent] = []
        for event in before:
            if fmt == "chat" or not is_argument_delta(fmt, event) or not any(
                    is_argument_delta(fmt, k) for k in kept):
                kept.append(event)
        after = [e for e in events_of(out) if about_first_call(fmt, first.id or "", e)]
        assert [(e.event, without_arguments(payload_of(e))) for e in after] == [
            (e.event, without_arguments(payload_of(e))) for e in kept]
        terminal = events_of(answer.raw)[-1]  # `[DONE]` / `message_stop` (`response.completed` is edited)
        assert out.endswith(terminal.raw) or about_first_call(fmt, first.id or "", terminal)
        pieces = argument_pieces(fmt, out)
        assert pieces[0] == orjson.dumps(EDIT).decode()
        # Chat keeps its later fragments with "" arguments; the other formats drop them.
        assert pieces[1:] == ([""] * (len(argument_pieces(fmt, answer.raw)) - 1) if fmt == "chat" else [])


@pytest.mark.parametrize("ncalls", [1, 2])
@pytest.mark.parametrize("fmt", FORMATS)
async def test_rewritten_bodies_validate_in_the_real_sdks(mock: TestServer, fmt: str, ncalls: int) -> None:
    answer = await fetch(mock, fmt, False, ncalls)

    out = answer.rewrite({answer.calls[0].id or "": EDIT})

    expected = [EDIT, LOOKUP][:ncalls]
    if fmt == "chat":
        completion = openai.types.chat.ChatCompletion.model_validate_json(out)
        tool_calls = completion.choices[0].message.tool_calls or []
        got = [json.loads(call.function.arguments) for call in tool_calls if call.type == "function"]
        assert [call.id for call in tool_calls] == [c.id for c in answer.calls]
    elif fmt == "responses":
        response = openai.types.responses.Response.model_validate_json(out)
        items = [item for item in response.output if item.type == "function_call"]
        got = [json.loads(item.arguments) for item in items]
        assert [item.call_id for item in items] == [c.id for c in answer.calls]
    else:
        message = anthropic.types.Message.model_validate_json(out)
        blocks = [block for block in message.content if block.type == "tool_use"]
        got = [block.input for block in blocks]
        assert [block.id for block in blocks] == [c.id for c in answer.calls]
    assert got == expected


Arguments = dict[str, str]
"""{tool call id: arguments JSON text}, in the order the calls appear."""
MESSAGES: Any = [{"role": "user", "content": "go"}]


async def chat_sdk(root: str) -> tuple[Arguments, Arguments]:
    """(raw chunks accumulated by hand, the SDK's `chat.completions.stream()` helper's final completion)."""
    raw: Arguments = {}
    ids: dict[int, str] = {}
    async with openai.AsyncOpenAI(base_url=root + "/v1", api_key="x", max_retries=0) as oai:
        async for chunk in await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True):
            for choice in chunk.choices:
                for call in choice.delta.tool_calls or []:
                    if call.id:
                        ids[call.index] = call.id
                        raw.setdefault(call.id, "")
                    if call.function and call.function.arguments:
                        raw[ids[call.index]] += call.function.arguments
        async with oai.chat.completions.stream(model="gpt-4o", messages=MESSAGES) as helper:
            completion = await helper.get_final_completion()
    return raw, {call.id: call.function.arguments for call in completion.choices[0].message.tool_calls or []}


async def responses_sdk(root: str) -> tuple[Arguments, Arguments]:
    """(argument deltas accumulated by hand, the `responses.stream()` helper's final response); the
    `function_call_arguments.done` events must agree with the deltas."""
    raw: Arguments = {}
    done: Arguments = {}
    call_ids: dict[str, str] = {}
    async with openai.AsyncOpenAI(base_url=root + "/v1", api_key="x", max_retries=0) as oai:
        async for event in await oai.responses.create(model="gpt-4o", input="go", stream=True):
            if event.type == "response.output_item.added" and event.item.type == "function_call":
                call_ids[event.item.id or ""] = event.item.call_id
                raw[event.item.call_id] = ""
            elif event.type == "response.function_call_arguments.delta":
                raw[call_ids[event.item_id]] += event.delta
            elif event.type == "response.function_call_arguments.done":
                done[call_ids[event.item_id]] = event.arguments
        async with oai.responses.stream(model="gpt-4o", input="go") as helper:
            response = await helper.get_final_response()
    assert done == raw
    return raw, {item.call_id: item.arguments for item in response.output if item.type == "function_call"}


async def messages_sdk(root: str) -> tuple[Arguments, Arguments]:
    """(`input_json_delta`s accumulated by hand, the `messages.stream()` helper's final message)."""
    raw: Arguments = {}
    by_index: dict[int, str] = {}
    async with anthropic.AsyncAnthropic(base_url=root, api_key="x", max_retries=0) as ant:
        async for event in await ant.messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=MESSAGES,
                                                     stream=True):
            if event.type == "content_block_start" and event.content_block.type == "tool_use":
                by_index[event.index] = event.content_block.id
                raw[event.content_block.id] = ""
            elif event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                raw[by_index[event.index]] += event.delta.partial_json
        async with ant.messages.stream(model="claude-sonnet-4-6", max_tokens=64, messages=MESSAGES) as helper:
            message = await helper.get_final_message()
    return raw, {block.id: orjson.dumps(block.input).decode() for block in message.content
                 if block.type == "tool_use"}


SDK_READERS = {"chat": chat_sdk, "responses": responses_sdk, "messages": messages_sdk}


@pytest.mark.parametrize("ncalls", [1, 2])
@pytest.mark.parametrize("fmt", FORMATS)
async def test_rewritten_streams_read_back_in_the_real_sdks(mock: TestServer, aiohttp_server: Any, fmt: str,
                                                            ncalls: int) -> None:
    answer = await fetch(mock, fmt, True, ncalls)
    out = answer.rewrite({answer.calls[0].id or "": EDIT})
    server = await replay(aiohttp_server, out)

    raw, final = await SDK_READERS[fmt](str(server.make_url("")).rstrip("/"))

    expected = {call.id: call.arguments for call in answer.calls[1:]} | {answer.calls[0].id: orjson.dumps(EDIT)}
    for got in (raw, final):
        assert list(got) == [call.id for call in answer.calls]
        assert {key: orjson.loads(value) for key, value in got.items()} == {
            key: orjson.loads(value) for key, value in expected.items()}


@pytest.mark.parametrize(("fmt", "stream"), [(fmt, stream) for fmt in FORMATS for stream in (False, True)])
async def test_empty_or_unknown_edits_return_the_answer_byte_for_byte(mock: TestServer, fmt: str,
                                                                      stream: bool) -> None:
    answer = await fetch(mock, fmt, stream, 2)

    assert answer.rewrite({}) == answer.raw
    assert answer.rewrite({"call_not_in_this_answer": EDIT}) == answer.raw


async def test_both_parallel_calls_can_be_edited_at_once(mock: TestServer) -> None:
    for fmt in FORMATS:
        for stream in (False, True):
            answer = await fetch(mock, fmt, stream, 2)
            second = {"order_id": "ord_0002"}

            out = answer.rewrite({answer.calls[0].id or "": EDIT, answer.calls[1].id or "": second})

            assert [orjson.loads(c.arguments) for c in calls_of(fmt, stream, out)] == [EDIT, second], (fmt, stream)


async def test_a_tool_use_block_without_input_deltas_gets_one_right_after_its_start(mock: TestServer) -> None:
    answer = await fetch(mock, "messages", True, 2)
    stripped = b"".join(e.raw for e in events_of(answer.raw)
                        if not (e.event == "content_block_delta" and payload_of(e)["index"] == 0))

    out = rewrite_stream("messages", stripped, {answer.calls[0].id or "": EDIT})

    events = events_of(out)
    kinds = [(e.event, payload_of(e).get("index")) for e in events]
    start = kinds.index(("content_block_start", 0))
    assert kinds[start + 1:start + 3] == [("content_block_delta", 0), ("content_block_stop", 0)]
    inserted = payload_of(events[start + 1])
    assert inserted == {"type": "content_block_delta", "index": 0,
                        "delta": {"type": "input_json_delta", "partial_json": orjson.dumps(EDIT).decode()}}
    assert [orjson.loads(c.arguments) for c in calls_of("messages", True, out)] == [EDIT, LOOKUP]
    assert b"".join(e.raw for i, e in enumerate(events) if i != start + 1) == stripped


async def test_a_stream_the_edit_cannot_be_applied_to_is_refused(mock: TestServer) -> None:
    # Given a chat stream whose call id only arrives after a first argument fragment (so that fragment
    # would keep the model's text), when it is rewritten, then it raises rather than release stale arguments.
    answer = await fetch(mock, "chat", True, 1)
    events = events_of(answer.raw)
    payloads = [payload_of(e) for e in events]
    calls = [i for i, p in enumerate(payloads) if isinstance(p, dict) and p["choices"]
             and p["choices"][0]["delta"].get("tool_calls")]
    call_id = payloads[calls[0]]["choices"][0]["delta"]["tool_calls"][0].pop("id")
    payloads[calls[2]]["choices"][0]["delta"]["tool_calls"][0]["id"] = call_id
    moved = b"".join(encode_event(orjson.dumps(payloads[i])) if i in (calls[0], calls[2]) else e.raw
                     for i, e in enumerate(events))

    with pytest.raises(ValueError, match="could not be applied"):
        rewrite_stream("chat", moved, {call_id: EDIT})


async def test_bad_edits_and_bad_input_are_refused(mock: TestServer) -> None:
    answer = await fetch(mock, "chat", False, 1)
    call_id = answer.calls[0].id or ""

    with pytest.raises(ValueError, match="JSON object"):
        rewrite_answer("chat", answer.raw, {call_id: [1, 2]})
    with pytest.raises(ValueError, match="JSON object"):
        rewrite_stream("chat", answer.raw, {call_id: "{}"})
    with pytest.raises(ValueError, match="not JSON"):
        rewrite_answer("chat", answer.raw, {call_id: {"bad": {1, 2}}})
    with pytest.raises(ValueError, match="unknown answer format"):
        rewrite_answer("completions", answer.raw, {call_id: EDIT})
    with pytest.raises(ValueError, match="not JSON"):
        rewrite_answer("chat", b"<html>502</html>", {call_id: EDIT})


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8")),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


async def test_any_json_object_survives_every_format(mock: TestServer) -> None:
    answers = [await fetch(mock, fmt, stream, 2) for fmt in FORMATS for stream in (False, True)]

    @settings(max_examples=60, deadline=None)
    @given(edit=st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=6))
    def check(edit: dict[str, Any]) -> None:
        for answer in answers:
            out = answer.rewrite({answer.calls[1].id or "": edit})
            calls = calls_of(answer.fmt, answer.stream, out)
            assert calls[0] == answer.calls[0]
            assert calls[1].arguments == orjson.dumps(edit).decode()

    check()
