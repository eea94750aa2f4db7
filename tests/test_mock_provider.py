"""The built-in mock provider, driven by the real OpenAI and Anthropic SDKs over loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import ClientPayloadError, ClientSession
from aiohttp.test_utils import TestServer

from rungate.providers.mock import MOCK_REQUESTS, create_mock_app

CREATED = 1767225600
WEATHER = '[tool:get_weather {"city": "Paris", "units": "metric"}]'
TIME = '[tool:get_time {"tz": "Europe/Paris"}]'


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def _input_tokens(conversation: Any) -> int:
    return max(1, math.ceil(len(orjson.dumps(conversation)) / 4))


@pytest.fixture
async def server(aiohttp_server: Any) -> TestServer:
    result: TestServer = await aiohttp_server(create_mock_app(), host="127.0.0.1")
    return result


@pytest.fixture
async def oai(server: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{server.make_url('/v1')}", api_key="x", max_retries=0)
    yield client
    await client.close()


@pytest.fixture
async def ant(server: TestServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(base_url=str(server.make_url("")), api_key="x", max_retries=0)
    yield client
    await client.close()


@pytest.fixture
async def raw(server: TestServer) -> AsyncIterator[ClientSession]:
    async with ClientSession(base_url=str(server.make_url(""))) as session:
        yield session


# --- OpenAI Chat Completions ----------------------------------------------------------------------

async def test_chat_non_stream_reply_ids_and_usage(oai: openai.AsyncOpenAI) -> None:
    messages = [{"role": "system", "content": "be brief"}, *_user("hello brave new world")]
    completion = await oai.chat.completions.create(model="gpt-4o", messages=messages)
    assert completion.id.startswith("chatcmpl-mock-") and len(completion.id) == len("chatcmpl-mock-") + 16
    assert (completion.object, completion.created, completion.model) == ("chat.completion", CREATED, "gpt-4o")
    choice = completion.choices[0]
    assert choice.message.content == "Mock reply: hello brave new world"
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == _input_tokens(messages)
    assert usage.completion_tokens == 6
    assert usage.total_tokens == usage.prompt_tokens + 6


async def test_chat_reply_echo_is_truncated_to_200_chars(oai: openai.AsyncOpenAI) -> None:
    text = "x" * 150 + " " + "y" * 150
    completion = await oai.chat.completions.create(model="gpt-4o", messages=_user(text))
    assert completion.choices[0].message.content == "Mock reply: " + text[:200]


async def test_chat_stream_is_incremental_and_has_no_usage_chunk_by_default(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(model="gpt-4o", messages=_user("one two three four"),
                                               stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(chunk.choices for chunk in chunks), "no usage chunk without include_usage"
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert pieces == ["Mock ", "reply: ", "one ", "two ", "three ", "four"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert {chunk.id for chunk in chunks} == {chunks[0].id}


async def test_chat_stream_usage_chunk_only_with_include_usage(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(model="gpt-4o", messages=_user("count me"), stream=True,
                                               stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 4 and last.usage.prompt_tokens == _input_tokens(_user("count me"))
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "stop"


async def test_chat_stream_wire_format(raw: ClientSession) -> None:
    body = {"model": "gpt-4o", "messages": _user("hi"), "stream": True}
    async with raw.post("/v1/chat/completions", json=body) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        text = await response.text()
    events = text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: ") for event in events[:-1])
    assert '"usage":null' in events[0]


async def test_chat_tool_call_directives_give_parallel_calls(oai: openai.AsyncOpenAI) -> None:
    completion = await oai.chat.completions.create(model="gpt-4o", messages=_user(f"do {WEATHER} {TIME}"))
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 2
    assert [call.function.name for call in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "units": "metric"}
    assert json.loads(calls[1].function.arguments) == {"tz": "Europe/Paris"}
    assert calls[0].id.startswith("call_mock_") and calls[0].id != calls[1].id
    usage = completion.usage
    assert usage is not None
    expected = sum(max(1, math.ceil(len(call.function.arguments) / 4)) for call in calls)
    assert usage.completion_tokens == expected


async def test_chat_tool_call_stream_fragments(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(model="gpt-4o", messages=_user(f"{WEATHER} {TIME}"),
                                               stream=True)
    fragments = [fragment async for chunk in stream if chunk.choices
                 for fragment in (chunk.choices[0].delta.tool_calls or [])]
    arguments: dict[int, str] = {}
    for index in (0, 1):
        mine = [f for f in fragments if f.index == index]
        first, rest = mine[0], mine[1:]
        assert first.id is not None and first.id.startswith("call_mock_") and first.type == "function"
        assert first.function is not None and first.function.arguments == ""
        assert len(rest) >= 2 and all(f.id is None and f.function is not None for f in rest)
        arguments[index] = "".join(f.function.arguments or "" for f in rest if f.function)
    assert json.loads(arguments[0]) == {"city": "Paris", "units": "metric"}
    assert json.loads(arguments[1]) == {"tz": "Europe/Paris"}


async def test_chat_stream_helper_accumulates_tool_calls(oai: openai.AsyncOpenAI) -> None:
    async with oai.chat.completions.stream(model="gpt-4o", messages=_user(WEATHER)) as stream:
        final = await stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls is not None and final.choices[0].finish_reason == "tool_calls"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "units": "metric"}


async def test_chat_max_tokens_truncates_with_length(oai: openai.AsyncOpenAI) -> None:
    completion = await oai.chat.completions.create(model="gpt-4o", messages=_user("a b c d e"),
                                                   max_completion_tokens=3)
    assert completion.choices[0].message.content == "Mock reply: a"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 3


async def test_chat_cached_and_reasoning_directives(oai: openai.AsyncOpenAI) -> None:
    messages = _user("think [cached:7] [reasoning:5]")
    completion = await oai.chat.completions.create(model="o4-mini", messages=messages)
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens_details and usage.completion_tokens_details
    assert usage.prompt_tokens_details.cached_tokens == 7
    assert usage.prompt_tokens == _input_tokens(messages) + 7
    assert usage.completion_tokens_details.reasoning_tokens == 5
    assert usage.completion_tokens == 5 + 5  # five reply words plus five reasoning tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_chat_status_directive_raises_rate_limit(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await oai.chat.completions.create(model="gpt-4o", messages=_user("[status:429]"))
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.code == "rate_limit_exceeded"


@pytest.mark.parametrize(("status", "error"), [
    (400, openai.BadRequestError), (402, openai.APIStatusError),
    (404, openai.NotFoundError), (503, openai.InternalServerError),
])
async def test_chat_status_directive_maps_to_sdk_exceptions(oai: openai.AsyncOpenAI, status: int,
                                                           error: type[openai.APIStatusError]) -> None:
    with pytest.raises(error) as caught:
        await oai.chat.completions.create(model="gpt-4o", messages=_user(f"x [status:{status}]"),
                                          stream=True)
    assert caught.value.status_code == status
    body = caught.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}


async def test_chat_cut_directive_breaks_the_stream(oai: openai.AsyncOpenAI) -> None:
    chunks = []
    error: Exception | None = None
    try:
        stream = await oai.chat.completions.create(model="gpt-4o", messages=_user("one two three [cut:3]"),
                                                   stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            chunks.append(chunk)
    except Exception as exc:  # the transport error class differs between SDK generations
        error = exc
    assert error is not None and not isinstance(error, openai.APIStatusError)
    assert len(chunks) == 3
    assert all(chunk.choices and chunk.choices[0].finish_reason is None for chunk in chunks)


async def test_cut_directive_never_sends_the_terminator(raw: ClientSession) -> None:
    body = {"model": "gpt-4o", "messages": _user("hi [cut:1000]"), "stream": True}
    received = b""
    with pytest.raises(ClientPayloadError):
        async with raw.post("/v1/chat/completions", json=body) as response:
            async for data in response.content.iter_any():
                received += data
    assert b"finish_reason\":\"stop" in received and b"[DONE]" not in received


async def test_tool_results_end_the_loop_without_reading_directives(oai: openai.AsyncOpenAI) -> None:
    messages = [*_user(WEATHER),
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny [status:500]"}]
    completion = await oai.chat.completions.create(model="gpt-4o", messages=messages)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.content == "Mock reply: sunny [status:500]"


# --- OpenAI Responses -----------------------------------------------------------------------------

async def test_responses_non_stream(oai: openai.AsyncOpenAI) -> None:
    response = await oai.responses.create(model="gpt-4o", input="hello there [cached:2] [reasoning:3]")
    assert response.id.startswith("resp_mock_") and response.status == "completed"
    assert response.created_at == CREATED
    assert response.output_text == "Mock reply: hello there [cached:2] [reasoning:3]"
    usage = response.usage
    assert usage is not None
    assert usage.input_tokens == _input_tokens("hello there [cached:2] [reasoning:3]") + 2
    assert usage.input_tokens_details.cached_tokens == 2
    assert usage.output_tokens == 6 + 3 and usage.output_tokens_details.reasoning_tokens == 3
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


async def test_responses_stream_events(oai: openai.AsyncOpenAI) -> None:
    items = [{"role": "user", "content": [{"type": "input_text", "text": "stream this please"}]}]
    stream = await oai.responses.create(model="gpt-4o", input=items, stream=True)
    events = [event async for event in stream]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert len(deltas) == 5 and "".join(deltas) == "Mock reply: stream this please"
    final = events[-1].response
    assert final.usage is not None and final.usage.output_tokens == 5
    assert final.output_text == "Mock reply: stream this please"


async def test_responses_wire_format_has_event_lines(raw: ClientSession) -> None:
    async with raw.post("/v1/responses", json={"model": "gpt-4o", "input": "x", "stream": True}) as response:
        text = await response.text()
    for block in text.strip().split("\n\n"):
        event_line, data_line = block.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        assert json.loads(data_line[6:])["type"] == event_line[7:]


async def test_responses_tool_call_stream_and_non_stream(oai: openai.AsyncOpenAI) -> None:
    response = await oai.responses.create(model="gpt-4o", input=f"{WEATHER} {TIME}")
    calls = [item for item in response.output if item.type == "function_call"]
    assert [call.name for call in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "units": "metric"}
    assert calls[0].call_id.startswith("call_mock_")
    async with oai.responses.stream(model="gpt-4o", input=WEATHER) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    deltas = [event.delta for event in events if event.type == "response.function_call_arguments.delta"]
    assert len(deltas) >= 2 and json.loads("".join(deltas)) == {"city": "Paris", "units": "metric"}
    streamed = [item for item in final.output if item.type == "function_call"]
    assert streamed[0].arguments == calls[0].arguments


async def test_responses_max_output_tokens_makes_it_incomplete(oai: openai.AsyncOpenAI) -> None:
    response = await oai.responses.create(model="gpt-4o", input="a b c d", max_output_tokens=2)
    assert response.status == "incomplete"
    details = response.incomplete_details
    assert details is not None and details.reason == "max_output_tokens"
    assert response.output_text == "Mock reply:"
    stream = await oai.responses.create(model="gpt-4o", input="a b c d", max_output_tokens=2, stream=True)
    events = [event async for event in stream]
    assert events[-1].type == "response.incomplete"


async def test_responses_status_directive(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        await oai.responses.create(model="gpt-4o", input="[status:401]")
    assert caught.value.status_code == 401


# --- embeddings and models ------------------------------------------------------------------------

async def test_embeddings_float_and_deterministic(oai: openai.AsyncOpenAI) -> None:
    result = await oai.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta", "alpha"])
    vectors = [item.embedding for item in result.data]
    assert [item.index for item in result.data] == [0, 1, 2]
    assert all(len(vector) == 16 for vector in vectors)
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
    assert math.isclose(sum(v * v for v in vectors[1]), 1.0, rel_tol=1e-5)
    assert result.usage.prompt_tokens == 2 + 1 + 2 and result.usage.total_tokens == 5
    small = await oai.embeddings.create(model="text-embedding-3-small", input="alpha", dimensions=4)
    assert len(small.data[0].embedding) == 4


async def test_embeddings_base64_matches_float(raw: ClientSession) -> None:
    body: dict[str, Any] = {"model": "text-embedding-3-small", "input": "gamma"}
    async with raw.post("/v1/embeddings", json=body) as response:
        floats = (await response.json())["data"][0]["embedding"]
    async with raw.post("/v1/embeddings", json={**body, "encoding_format": "base64"}) as response:
        encoded = (await response.json())["data"][0]["embedding"]
    assert isinstance(encoded, str)
    decoded = struct.unpack("<16f", base64.b64decode(encoded))
    assert list(decoded) == floats


async def test_models_list(oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic) -> None:
    page = await oai.models.list()
    ids = [model.id for model in page.data]
    assert "gpt-4o" in ids and all(model.object == "model" for model in page.data)
    anthropic_page = await ant.models.list()
    assert "claude-sonnet-4-6" in [model.id for model in anthropic_page.data]


# --- Anthropic Messages ---------------------------------------------------------------------------

async def test_messages_non_stream(ant: anthropic.AsyncAnthropic) -> None:
    messages = _user("hello claude [cached:9]")
    message = await ant.messages.create(model="claude-sonnet-4-6", max_tokens=100, messages=messages)
    assert message.id.startswith("msg_mock_") and message.stop_reason == "end_turn"
    assert message.content[0].type == "text"
    assert message.content[0].text == "Mock reply: hello claude [cached:9]"
    assert message.usage.input_tokens == _input_tokens(messages)
    assert message.usage.cache_read_input_tokens == 9 and message.usage.cache_creation_input_tokens == 0
    assert message.usage.output_tokens == 5


async def test_messages_stream_helper_and_event_order(ant: anthropic.AsyncAnthropic) -> None:
    messages = _user("stream me now [cached:3]")
    async with ant.messages.stream(model="claude-sonnet-4-6", max_tokens=100, messages=messages) as stream:
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert texts == ["Mock ", "reply: ", "stream ", "me ", "now ", "[cached:3]"]
    assert final.content[0].type == "text" and final.content[0].text == "".join(texts)
    assert final.usage.output_tokens == 6 and final.usage.cache_read_input_tokens == 3
    assert final.usage.input_tokens == _input_tokens(messages)


async def test_messages_wire_format(raw: ClientSession) -> None:
    body = {"model": "claude", "max_tokens": 50, "messages": _user("hi"), "stream": True}
    async with raw.post("/v1/messages", json=body) as response:
        text = await response.text()
    blocks = [block.split("\n") for block in text.strip().split("\n\n")]
    names = [lines[0].removeprefix("event: ") for lines in blocks]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"] and names.count("ping") == 1
    start = json.loads(blocks[0][1].removeprefix("data: "))
    assert set(start["message"]["usage"]) >= {"input_tokens", "output_tokens", "cache_creation_input_tokens",
                                              "cache_read_input_tokens"}
    delta = json.loads(blocks[-2][1].removeprefix("data: "))
    assert delta["usage"]["output_tokens"] == 3 and delta["delta"]["stop_reason"] == "end_turn"


async def test_messages_tool_use_non_stream_and_stream(ant: anthropic.AsyncAnthropic) -> None:
    messages = _user(f"please {WEATHER} {TIME}")
    message = await ant.messages.create(model="claude", max_tokens=100, messages=messages)
    assert message.stop_reason == "tool_use"
    blocks = [block for block in message.content if block.type == "tool_use"]
    assert [block.name for block in blocks] == ["get_weather", "get_time"]
    assert blocks[0].input == {"city": "Paris", "units": "metric"} and blocks[0].id.startswith("toolu_mock_")
    async with ant.messages.stream(model="claude", max_tokens=100, messages=messages) as stream:
        partials = [event.partial_json async for event in stream if event.type == "input_json"]
        final = await stream.get_final_message()
    assert len(partials) >= 4 and partials[0] == ""
    streamed = [block for block in final.content if block.type == "tool_use"]
    assert [(b.name, b.input) for b in streamed] == [(b.name, b.input) for b in blocks]
    assert all(b.id.startswith("toolu_mock_") for b in streamed)
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == message.usage.output_tokens


async def test_messages_max_tokens(ant: anthropic.AsyncAnthropic) -> None:
    message = await ant.messages.create(model="claude", max_tokens=2, messages=_user("a b c"))
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 2
    assert message.content[0].type == "text" and message.content[0].text == "Mock reply:"


@pytest.mark.parametrize(("status", "error", "kind"), [
    (400, anthropic.BadRequestError, "invalid_request_error"),
    (429, anthropic.RateLimitError, "rate_limit_error"),
    (529, anthropic.InternalServerError, "overloaded_error"),
])
async def test_messages_status_directive(ant: anthropic.AsyncAnthropic, status: int,
                                         error: type[anthropic.APIStatusError], kind: str) -> None:
    with pytest.raises(error) as caught:
        await ant.messages.create(model="claude", max_tokens=10, messages=_user(f"[status:{status}]"))
    assert caught.value.status_code == status
    assert isinstance(caught.value.body, dict) and caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == kind
    assert (caught.value.response.headers.get("retry-after") == "1") == (status == 429)


async def test_messages_cut_directive(ant: anthropic.AsyncAnthropic) -> None:
    seen: list[str] = []
    error: Exception | None = None
    try:
        async with ant.messages.stream(model="claude", max_tokens=100,
                                       messages=_user("one two three [cut:4]")) as stream:
            async for event in stream:
                seen.append(event.type)
    except Exception as exc:  # the SDK lets the HTTP library's "incomplete body" error through
        error = exc
    assert error is not None and not isinstance(error, anthropic.APIStatusError)
    assert "message_stop" not in seen and "message_delta" not in seen
    assert seen[:2] == ["message_start", "content_block_start"]


async def test_messages_missing_max_tokens_is_a_400(raw: ClientSession) -> None:
    async with raw.post("/v1/messages", json={"model": "claude", "messages": _user("hi")}) as response:
        assert response.status == 400
        body = await response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]


# --- cross-cutting --------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/responses"])
@pytest.mark.parametrize("stream", [False, True])
async def test_identical_requests_give_identical_bytes(raw: ClientSession, path: str, stream: bool) -> None:
    body = {"model": "m", "max_tokens": 50, "messages": _user(f"same {WEATHER}"), "input": "same",
            "stream": stream}
    payload = orjson.dumps(body)
    answers = []
    for data in (payload, payload, orjson.dumps({**body, "model": "other"})):
        async with raw.post(path, data=data, headers={"Content-Type": "application/json"}) as response:
            assert response.status == 200
            answers.append(await response.read())
    assert answers[0] == answers[1]
    assert answers[0] != answers[2]


async def test_requests_are_recorded(server: TestServer, oai: openai.AsyncOpenAI) -> None:
    await oai.chat.completions.create(model="gpt-4o", messages=_user("record me"))
    await oai.models.list()
    log = server.app[MOCK_REQUESTS]
    assert [entry["path"] for entry in log] == ["/v1/chat/completions", "/v1/models"]
    assert log[0]["headers"]["authorization"] == "Bearer x"
    assert log[0]["body"] == {"model": "gpt-4o", "messages": _user("record me")}
    assert log[1]["body"] is None


async def test_sleep_directive_delays_the_answer(oai: openai.AsyncOpenAI) -> None:
    started = time.monotonic()
    completion = await oai.chat.completions.create(model="gpt-4o", messages=_user("[sleep:300] hi"))
    assert time.monotonic() - started >= 0.3
    assert completion.choices[0].finish_reason == "stop"


async def test_sleep_directive_can_trip_a_client_timeout(server: TestServer) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server.make_url('/v1')}", api_key="x", max_retries=0, timeout=0.2)
    try:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="gpt-4o", messages=_user("[sleep:2000]"))
    finally:
        await client.close()
        await asyncio.sleep(0)
