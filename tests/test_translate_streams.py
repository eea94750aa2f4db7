"""Stream translation Anthropic <-> OpenAI Chat, event by event, and stitching a continuation into one stream.

Checked three ways: the emitted events parse into exactly the expected JSON; the real `openai` and
`anthropic` SDKs, reading the translated bytes from a loopback server, see the answer (text, tool calls,
stop reason, usage, errors); and properties over random splits of answers into deltas.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rungate.providers.sse import SSEEvent, SSEParser, encode_event
from rungate.translate.common import ToolNames
from rungate.translate.continuation import ChatContinuation, MessagesContinuation
from rungate.translate.streams import DONE, AnthropicToChat, ChatToAnthropic

MODEL = "gpt-4o"
CLAUDE = "claude-sonnet-4-5"
CREATED = 1767225600
CID = "chatcmpl-test"
Serve = Callable[[bytes], Awaitable[str]]

# --------------------------------------------------------------------------------------------------
# Building upstream events and reading client events


def event(data: Any, name: str | None = None) -> SSEEvent:
    text = data if isinstance(data, str) else json.dumps(data)
    return SSEEvent(raw=encode_event(text, name), event=name, data=text, is_comment=False)


def anth(kind: str, **fields: Any) -> SSEEvent:
    return event({"type": kind, **fields}, kind)


def chat(payload: dict[str, Any]) -> SSEEvent:
    return event(payload)


CHAT_DONE = event("[DONE]")
PING = anth("ping")


def anthropic_stream(blocks: list[tuple[Any, ...]], stop: str = "end_turn", start_usage: dict[str, int] | None = None,
                     end_usage: dict[str, int] | None = None, end: bool = True) -> list[SSEEvent]:
    """An Anthropic stream: blocks are ("text", pieces), ("tool", id, name, pieces) or ("thinking", pieces)."""
    usage = start_usage or {"input_tokens": 10, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                            "output_tokens": 1}
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": CLAUDE, "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": usage}
    events = [anth("message_start", message=message), PING]
    for i, block in enumerate(blocks):
        if block[0] == "text":
            events.append(anth("content_block_start", index=i, content_block={"type": "text", "text": ""}))
            events += [anth("content_block_delta", index=i, delta={"type": "text_delta", "text": p}) for p in block[1]]
        elif block[0] == "tool":
            start = {"type": "tool_use", "id": block[1], "name": block[2], "input": {}}
            events.append(anth("content_block_start", index=i, content_block=start))
            events += [anth("content_block_delta", index=i, delta={"type": "input_json_delta", "partial_json": p})
                       for p in ["", *block[3]]]
        else:
            events.append(anth("content_block_start", index=i,
                               content_block={"type": "thinking", "thinking": "", "signature": ""}))
            events += [anth("content_block_delta", index=i, delta={"type": "thinking_delta", "thinking": p})
                       for p in block[1]]
            events.append(anth("content_block_delta", index=i, delta={"type": "signature_delta", "signature": "s"}))
        events.append(anth("content_block_stop", index=i))
    if end:
        events.append(anth("message_delta", delta={"stop_reason": stop, "stop_sequence": None},
                           usage=end_usage or {"output_tokens": 7}))
        events.append(anth("message_stop"))
    return events


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-2024",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], "usage": None}


def chat_stream(pieces: list[str], calls: list[tuple[str, str, list[str]]] | None = None, finish: str = "stop",
                usage: dict[str, Any] | None = None, end: bool = True) -> list[SSEEvent]:
    """An OpenAI stream with include_usage: role chunk, text pieces, tool calls (id, name, argument pieces)."""
    events = [chat(chunk({"role": "assistant", "content": "", "refusal": None}))]
    events += [chat(chunk({"content": p})) for p in pieces]
    for i, (call_id, name, args) in enumerate(calls or []):
        first = {"index": i, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        events.append(chat(chunk({"tool_calls": [first]})))
        events += [chat(chunk({"tool_calls": [{"index": i, "function": {"arguments": a}}]})) for a in args]
    if end:
        events.append(chat(chunk({}, finish)))
        usage = usage or {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}
        events.append(chat({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1,
                            "model": "gpt-4o-2024", "choices": [], "usage": usage}))
        events.append(CHAT_DONE)
    return events


def run(translator: Any, events: list[SSEEvent]) -> list[bytes]:
    out: list[bytes] = []
    for e in events:
        out += translator.feed(e)
    return out


def parse(out: list[bytes]) -> list[tuple[str | None, Any]]:
    """Every emitted item is one complete event; returns (event name, JSON or "[DONE]")."""
    parsed: list[tuple[str | None, Any]] = []
    for item in out:
        parser = SSEParser()
        events = parser.feed(item)
        assert len(events) == 1 and parser.flush() == [], item
        data = events[0].data
        parsed.append((events[0].event, data if data == "[DONE]" else json.loads(data)))
    return parsed


def to_chat(**kw: Any) -> AnthropicToChat:
    kw.setdefault("include_usage", True)
    kw.setdefault("tool_names", ToolNames())
    return AnthropicToChat(model=MODEL, created=CREATED, chunk_id=CID, **kw)


def to_messages(**kw: Any) -> ChatToAnthropic:
    kw.setdefault("tool_names", ToolNames())
    return ChatToAnthropic(model=CLAUDE, message_id="msg_t", **kw)


def oc(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    """An expected OpenAI client chunk (include_usage on)."""
    return {"id": CID, "object": "chat.completion.chunk", "created": CREATED, "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], "usage": None}


def usage_chunk(usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": CID, "object": "chat.completion.chunk", "created": CREATED, "model": MODEL, "choices": [],
            "usage": usage}


def chat_usage(prompt: int, completion: int, cached: int = 0, writes: int = 0) -> dict[str, Any]:
    details: dict[str, int] = {"cached_tokens": cached}
    if writes:
        details["cache_write_tokens"] = writes
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": details, "completion_tokens_details": {"reasoning_tokens": 0}}


def msg_usage(inp: int, out: int, write: int = 0, read: int = 0) -> dict[str, int]:
    return {"input_tokens": inp, "output_tokens": out, "cache_creation_input_tokens": write,
            "cache_read_input_tokens": read}


def message_start(inp: int = 0) -> tuple[str, Any]:
    message = {"id": "msg_t", "type": "message", "role": "assistant", "model": CLAUDE, "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": msg_usage(inp, 0)}
    return ("message_start", {"type": "message_start", "message": message})


def a_ev(kind: str, **fields: Any) -> tuple[str, Any]:
    return (kind, {"type": kind, **fields})


def text_start(i: int) -> tuple[str, Any]:
    return a_ev("content_block_start", index=i, content_block={"type": "text", "text": ""})


def text_delta(i: int, text: str) -> tuple[str, Any]:
    return a_ev("content_block_delta", index=i, delta={"type": "text_delta", "text": text})


def json_delta(i: int, text: str) -> tuple[str, Any]:
    return a_ev("content_block_delta", index=i, delta={"type": "input_json_delta", "partial_json": text})


def end_events(stop: str, usage: dict[str, int]) -> list[tuple[str, Any]]:
    return [a_ev("message_delta", delta={"stop_reason": stop, "stop_sequence": None}, usage=usage),
            a_ev("message_stop")]


# --------------------------------------------------------------------------------------------------
# Anthropic -> OpenAI chat: exact events


def test_text_answer_becomes_role_content_finish_usage_and_done() -> None:
    # Given an Anthropic text answer with a ping and a text block in two deltas
    t = to_chat()
    out = run(t, anthropic_stream([("text", ["Hel", "lo"])]))
    # Then the client gets a role chunk, two content chunks, a finish chunk, the usage chunk and DONE last
    assert parse(out) == [
        (None, oc({"role": "assistant", "content": ""})),
        (None, oc({"content": "Hel"})),
        (None, oc({"content": "lo"})),
        (None, oc({}, "stop")),
        (None, usage_chunk(chat_usage(10, 7))),
        (None, "[DONE]"),
    ]
    assert out[-1] == DONE and t.finished and t.text == "Hello" and t.warnings == []


def test_text_and_two_parallel_tool_calls_use_their_own_index_counter() -> None:
    # Given text (block 0) then two tool_use blocks (blocks 1 and 2), the first one's name restored
    names = ToolNames(restore={"short_name": "the.agents.long/name"})
    t = to_chat(tool_names=names)
    blocks = [("text", ["Checking."]), ("tool", "toolu_a", "short_name", ['{"city":', ' "Paris"}']),
              ("tool", "toolu_b", "time", ['{"tz": "CET"}'])]
    out = parse(run(t, anthropic_stream(blocks, stop="tool_use", end_usage={"output_tokens": 30})))
    # Then the tool calls are OpenAI indexes 0 and 1, empty partial_json skipped, finish tool_calls
    assert out[1:-2] == [
        (None, oc({"content": "Checking."})),
        (None, oc({"tool_calls": [{"index": 0, "id": "toolu_a", "type": "function",
                                   "function": {"name": "the.agents.long/name", "arguments": ""}}]})),
        (None, oc({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]})),
        (None, oc({"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]})),
        (None, oc({"tool_calls": [{"index": 1, "id": "toolu_b", "type": "function",
                                   "function": {"name": "time", "arguments": ""}}]})),
        (None, oc({"tool_calls": [{"index": 1, "function": {"arguments": '{"tz": "CET"}'}}]})),
        (None, oc({}, "tool_calls")),
    ]
    assert out[-2] == (None, usage_chunk(chat_usage(10, 30)))


def test_tool_call_only_without_usage_and_a_call_with_no_arguments_gets_empty_object() -> None:
    # Given a tool-only answer whose call streams no argument text, for a client that did not ask for usage
    t = to_chat(include_usage=False)
    out = parse(run(t, anthropic_stream([("tool", "toolu_x", "now", [])], stop="tool_use")))
    base = {"id": CID, "object": "chat.completion.chunk", "created": CREATED, "model": MODEL}

    def c(delta: dict[str, Any], finish: str | None = None) -> tuple[None, dict[str, Any]]:
        return (None, {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    # Then no chunk carries usage, no usage chunk is sent, and the arguments are "{}"
    assert out == [
        c({"role": "assistant", "content": ""}),
        c({"tool_calls": [{"index": 0, "id": "toolu_x", "type": "function",
                           "function": {"name": "now", "arguments": ""}}]}),
        c({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
        c({}, "tool_calls"),
        (None, "[DONE]"),
    ]


def test_thinking_blocks_and_citations_are_dropped_with_one_warning_each() -> None:
    # Given thinking (twice), a text block with a citation delta
    t = to_chat()
    events = anthropic_stream([("thinking", ["hmm", "so"]), ("thinking", ["again"]), ("text", ["Yes."])])
    events.insert(-3, anth("content_block_delta", index=2, delta={"type": "citations_delta", "citation": {}}))
    out = parse(run(t, events))
    # Then only the text reaches the client, and each reason is recorded once
    assert [c for _, c in out[1:3]] == [oc({"content": "Yes."}), oc({}, "stop")]
    assert t.warnings == ["thinking blocks were dropped: OpenAI Chat Completions cannot carry them",
                          "citations were dropped: OpenAI Chat Completions cannot carry them"]


def test_cache_reads_and_writes_count_in_prompt_tokens_and_message_delta_usage_overwrites() -> None:
    # Given a start usage with cache fields and a final cumulative message_delta usage
    t = to_chat()
    start = {"input_tokens": 5, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 1000, "output_tokens": 1}
    end = {"input_tokens": 5, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 1000, "output_tokens": 9}
    out = parse(run(t, anthropic_stream([("text", ["a"])], start_usage=start, end_usage=end)))
    # Then prompt_tokens = input + cache read + cache write, cached_tokens = reads, completion = the final count
    assert out[-2] == (None, usage_chunk(chat_usage(1105, 9, cached=1000, writes=100)))


def test_anthropic_error_mid_stream_becomes_an_openai_error_payload() -> None:
    # Given a stream that fails after some text
    t = to_chat()
    events = anthropic_stream([("text", ["Hi"])], end=False)
    events.append(anth("error", error={"type": "overloaded_error", "message": "Overloaded"}))
    out = parse(run(t, events))
    # Then the last client event is a top-level error object, and the stream is neither finished nor resumable
    assert out[-1] == (None, {"error": {"message": "Overloaded", "type": "server_error", "param": None,
                                        "code": "overloaded_error"}})
    assert not t.finished and not t.resumable


def test_pings_comments_and_unknown_events_give_nothing_and_bad_json_raises() -> None:
    t = to_chat()
    comment = SSEEvent(raw=b": keepalive\n\n", event=None, data="", is_comment=True)
    assert t.feed(PING) == [] and t.feed(comment) == [] and t.feed(anth("brand_new_event", x=1)) == []
    with pytest.raises(ValueError):
        t.feed(event("{not json", "content_block_delta"))
    with pytest.raises(ValueError):
        t.feed(event("[1, 2]", "content_block_delta"))


# --------------------------------------------------------------------------------------------------
# OpenAI chat -> Anthropic: exact events


def test_text_answer_becomes_a_complete_anthropic_event_sequence() -> None:
    # Given an OpenAI text answer with include_usage
    t = to_messages(input_tokens=12)
    out = run(t, chat_stream(["Hel", "lo"]))
    # Then message_start (complete usage), one text block, message_delta after the usage chunk, message_stop
    assert parse(out) == [
        message_start(12),
        text_start(0), text_delta(0, "Hel"), text_delta(0, "lo"), a_ev("content_block_stop", index=0),
        *end_events("end_turn", msg_usage(20, 5)),
    ]
    assert all(item.startswith(b"event: ") for item in out) and t.finished and t.text == "Hello"


def test_text_and_two_tool_calls_become_consecutive_blocks_one_open_at_a_time() -> None:
    # Given text then two tool calls whose names the request translator had shortened
    names = ToolNames()
    long_name = "namespace.tool/" + "x" * 70
    short = names.for_openai(long_name)
    t = to_messages(tool_names=names)
    out = parse(run(t, chat_stream(["Ok."], [("call_1", short, ['{"a"', ": 1}"]), ("call_2", "b", ["{}"])],
                                   finish="tool_calls")))
    # Then: text block 0, tool blocks 1 and 2 with the agent's own names, stop_reason tool_use
    assert out == [
        message_start(),
        text_start(0), text_delta(0, "Ok."), a_ev("content_block_stop", index=0),
        a_ev("content_block_start", index=1,
             content_block={"type": "tool_use", "id": "call_1", "name": long_name, "input": {}}),
        json_delta(1, '{"a"'), json_delta(1, ": 1}"), a_ev("content_block_stop", index=1),
        a_ev("content_block_start", index=2, content_block={"type": "tool_use", "id": "call_2", "name": "b",
                                                            "input": {}}),
        json_delta(2, "{}"), a_ev("content_block_stop", index=2),
        *end_events("tool_use", msg_usage(20, 5)),
    ]


def test_content_and_finish_reason_in_one_chunk_and_cached_usage() -> None:
    # Given a fake-streaming upstream: one chunk with content and finish_reason, usage with cached tokens
    t = to_messages()
    usage = {"prompt_tokens": 1200, "completion_tokens": 3, "total_tokens": 1203,
             "prompt_tokens_details": {"cached_tokens": 1024}}
    events = [chat(chunk({"role": "assistant", "content": "All at once."}, "length")),
              chat({"id": "x", "choices": [], "usage": usage}), CHAT_DONE]
    out = parse(run(t, events))
    # Then the text comes before the block closes, the stop is held until usage, input excludes cache reads
    assert out == [message_start(), text_start(0), text_delta(0, "All at once."), a_ev("content_block_stop", index=0),
                   *end_events("max_tokens", msg_usage(176, 3, read=1024))]


def test_usage_on_the_finish_chunk_waits_for_done_and_other_choices_are_dropped() -> None:
    # Given an OpenAI-compatible upstream that puts usage on the finish chunk and sends a second choice
    t = to_messages()
    last = chunk({}, "stop")
    last["usage"] = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    second = chunk({"content": "other"})
    second["choices"][0]["index"] = 1
    out = parse(run(t, [chat(chunk({"content": "Hi"})), chat(second), chat(last)]))
    # Then nothing ends before [DONE], which then carries that usage; the second choice is dropped with a warning
    assert a_ev("message_stop") not in out and not t.finished and not t.resumable
    assert parse(t.feed(CHAT_DONE)) == end_events("end_turn", msg_usage(7, 2))
    assert t.text == "Hi" and t.warnings == [
        "choices other than the first were dropped: Anthropic Messages has one answer"]


def test_tool_call_only_answer() -> None:
    t = to_messages()
    out = parse(run(t, chat_stream([], [("call_9", "lookup", ['{"q":"x"}'])], finish="tool_calls")))
    assert out[1:4] == [
        a_ev("content_block_start", index=0,
             content_block={"type": "tool_use", "id": "call_9", "name": "lookup", "input": {}}),
        json_delta(0, '{"q":"x"}'), a_ev("content_block_stop", index=0)]
    assert out[4][1]["delta"]["stop_reason"] == "tool_use"


def test_refusal_becomes_text_with_stop_reason_refusal() -> None:
    t = to_messages()
    events = [chat(chunk({"role": "assistant", "refusal": "I can't help with that."})),
              chat(chunk({}, "stop")), CHAT_DONE]
    out = parse(run(t, events))
    # Then: the refusal is a text block; without a usage chunk, [DONE] ends the message with the input estimate
    assert out == [message_start(), text_start(0), text_delta(0, "I can't help with that."),
                   a_ev("content_block_stop", index=0), *end_events("refusal", msg_usage(0, 0))]


def test_openai_error_mid_stream_becomes_an_error_event_and_bad_input_raises() -> None:
    t = to_messages()
    out = parse(run(t, chat_stream(["Hi"], end=False) + [
        chat({"error": {"message": "boom", "type": "server_error", "param": None, "code": None}})]))
    assert out[-1] == a_ev("error", error={"type": "api_error", "message": "boom"})
    assert not t.finished and not t.resumable
    with pytest.raises(ValueError):
        to_messages().feed(event("{oops"))


def test_interleaved_tool_call_fragments_raise_rather_than_truncate() -> None:
    t = to_messages()
    events = chat_stream([], [("c1", "a", ['{"x":']), ("c2", "b", ["{}"])], end=False)
    run(t, events)
    with pytest.raises(ValueError, match="interleaved"):
        t.feed(chat(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]})))


# --------------------------------------------------------------------------------------------------
# Real SDKs reading translated bytes


@pytest.fixture
async def serve(aiohttp_server: Any) -> Serve:
    """Serve `body` as an event stream at /v1/chat/completions and /v1/messages; returns the server root."""
    async def start(body: bytes) -> str:
        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(body)
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        app.router.add_post("/v1/messages", handler)
        server = await aiohttp_server(app)
        return str(server.make_url("")).rstrip("/")
    return start


MESSAGES = [{"role": "user", "content": "hi"}]


async def openai_collect(root: str) -> tuple[str, dict[int, dict[str, str]], str | None, Any]:
    client = openai.AsyncOpenAI(base_url=root + "/v1", api_key="x", max_retries=0)
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                                  stream_options={"include_usage": True})
    text, calls, finish, usage = "", {}, None, None
    async for c in stream:
        usage = c.usage or usage
        for choice in c.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                acc = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                acc["id"] += call.id or ""
                acc["name"] += (call.function.name or "") if call.function else ""
                acc["arguments"] += (call.function.arguments or "") if call.function else ""
    await client.close()
    return text, calls, finish, usage


async def test_openai_sdk_reads_translated_text_tool_calls_and_cached_usage(serve: Serve) -> None:
    # Given an Anthropic answer with text, two tool calls and cache usage, translated for an OpenAI client
    start = {"input_tokens": 3, "cache_creation_input_tokens": 40, "cache_read_input_tokens": 500, "output_tokens": 1}
    blocks = [("text", ["Let me ", "check."]), ("tool", "toolu_1", "weather", ['{"city"', ': "Oslo"}']),
              ("tool", "toolu_2", "clock", ["{}"])]
    body = b"".join(run(to_chat(), anthropic_stream(blocks, "tool_use", start, {"output_tokens": 21})))
    root = await serve(body)
    # When the SDK streams it
    text, calls, finish, usage = await openai_collect(root)
    # Then it sees the text, both calls by index, the finish reason and the converted usage
    assert text == "Let me check." and finish == "tool_calls"
    assert calls == {0: {"id": "toolu_1", "name": "weather", "arguments": '{"city": "Oslo"}'},
                     1: {"id": "toolu_2", "name": "clock", "arguments": "{}"}}
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (543, 21, 564)
    assert usage.prompt_tokens_details.cached_tokens == 500
    # And the SDK's stream helper accumulates the same final completion
    client = openai.AsyncOpenAI(base_url=root + "/v1", api_key="x", max_retries=0)
    async with client.chat.completions.stream(model=MODEL, messages=MESSAGES,
                                              stream_options={"include_usage": True}) as helper:
        final = await helper.get_final_completion()
    await client.close()
    message = final.choices[0].message
    assert message.content == "Let me check." and final.choices[0].finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []] == [
        ("toolu_1", "weather", '{"city": "Oslo"}'), ("toolu_2", "clock", "{}")]
    assert final.usage is not None and final.usage.prompt_tokens == 543


async def test_openai_sdk_raises_on_a_translated_mid_stream_error(serve: Serve) -> None:
    events = anthropic_stream([("text", ["partial"])], end=False) + [
        anth("error", error={"type": "overloaded_error", "message": "Overloaded"})]
    root = await serve(b"".join(run(to_chat(), events)))
    with pytest.raises(openai.APIError, match="Overloaded"):
        await openai_collect(root)


async def anthropic_final(root: str) -> anthropic.types.Message:
    client = anthropic.AsyncAnthropic(base_url=root, api_key="x", max_retries=0)
    async with client.messages.stream(model=CLAUDE, max_tokens=100, messages=MESSAGES) as stream:
        final = await stream.get_final_message()
    await client.close()
    return final


async def test_anthropic_sdk_reads_translated_text_tool_use_and_usage(serve: Serve) -> None:
    # Given an OpenAI answer with text and a tool call, cached prompt tokens, translated for an Anthropic client
    usage = {"prompt_tokens": 300, "completion_tokens": 17, "total_tokens": 317,
             "prompt_tokens_details": {"cached_tokens": 256}}
    events = chat_stream(["Looking ", "it up."], [("call_7", "search", ['{"q": ', '"rungate"}'])], "tool_calls", usage)
    root = await serve(b"".join(run(to_messages(input_tokens=44), events)))
    # When the SDK's stream helper reads it
    final = await anthropic_final(root)
    # Then the final message has the text, the parsed tool input, the stop reason and the complete usage
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[0].text == "Looking it up."
    tool = final.content[1]
    assert (tool.id, tool.name, tool.input) == ("call_7", "search", {"q": "rungate"})
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (44, 17)
    assert (final.usage.cache_read_input_tokens, final.usage.cache_creation_input_tokens) == (256, 0)


async def test_anthropic_sdk_raises_on_a_translated_mid_stream_error(serve: Serve) -> None:
    failure = chat({"error": {"message": "upstream died", "type": "server_error"}})
    events = chat_stream(["partial"], end=False) + [failure]
    root = await serve(b"".join(run(to_messages(), events)))
    with pytest.raises(anthropic.APIStatusError, match="upstream died"):
        await anthropic_final(root)


# --------------------------------------------------------------------------------------------------
# Continuation: a second upstream continues a broken answer in the same client stream


async def test_anthropic_to_chat_continuation_gives_one_answer_without_duplicate_whitespace(serve: Serve) -> None:
    # Given a first Anthropic stream cut after "The answer is " (trailing space sent to the client)
    t = to_chat()
    out = run(t, anthropic_stream([("text", ["The answer", " is "])], end=False))
    assert t.resumable and t.text == "The answer is "
    # When a second Anthropic stream (prefill stripped to "The answer is") continues with " 42."
    t.continue_after_break()
    out += run(t, anthropic_stream([("text", [" ", "42."])], end_usage={"output_tokens": 3},
                                   start_usage=msg_usage(30, 1)))
    chunks = [c for _, c in parse(out)]
    # Then the client saw one role chunk, the joined text, one finish, usage = second's + the first's output
    assert sum(1 for c in chunks if c != "[DONE]" and c["choices"] and "role" in c["choices"][0]["delta"]) == 1
    assert t.text == "The answer is 42." and t.finished
    assert chunks[-2] == usage_chunk(chat_usage(30, 3 + 4))  # 14 bytes relayed before the break: 4 tokens
    root = await serve(b"".join(out))
    text, _, finish, usage = await openai_collect(root)
    assert (text, finish, usage.completion_tokens) == ("The answer is 42.", "stop", 7)


async def test_chat_to_anthropic_continuation_keeps_one_message_and_text_block(serve: Serve) -> None:
    # Given a first OpenAI stream cut mid-text
    t = to_messages(input_tokens=9)
    out = run(t, chat_stream(["Once upon", " a time\n"], end=False))
    # When a second OpenAI stream continues (its own role chunk, "\n" repeated, then a tool call)
    t.continue_after_break(sent_output_tokens=5)
    out += run(t, chat_stream(["\nthere was", " a fox."], [("call_1", "tell", ["{}"])], "tool_calls"))
    parsed = parse(out)
    # Then: one message_start, the text continues in block 0, the tool call is block 1
    assert [name for name, _ in parsed].count("message_start") == 1
    assert parsed[-2][1]["usage"] == msg_usage(20, 5 + 5)
    final = await anthropic_final(await serve(b"".join(out)))
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[0].text == "Once upon a time\nthere was a fox."
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 10


async def test_messages_pass_through_continuation(serve: Serve) -> None:
    # Given an Anthropic client served by Anthropic, the first stream cut inside an open text block
    stitch = MessagesContinuation()
    first = anthropic_stream([("text", ["Roses are red,", "\n\n"])], end=False)[:-1]  # no content_block_stop
    out = run(stitch, first)
    assert out == [e.raw for e in first]  # relayed byte for byte
    # When a second Anthropic stream continues, repeating the "\n\n" the prefill had stripped
    stitch.continue_after_break()
    second = anthropic_stream([("text", ["\n\nViolets", " are blue."])], start_usage=msg_usage(50, 1, read=10),
                              end_usage={"output_tokens": 4})
    out += run(stitch, second)
    parsed = parse(out)
    assert [n for n, _ in parsed].count("message_start") == 1
    final = await anthropic_final(await serve(b"".join(out)))
    assert [b.type for b in final.content] == ["text"]
    assert final.content[0].text == "Roses are red,\n\nViolets are blue."
    assert final.stop_reason == "end_turn"
    # Usage: the second's input side (message_start), output = 4 + ceil(16 bytes / 4)
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens, final.usage.output_tokens) == (50, 10, 8)


async def test_messages_continuation_closes_the_open_block_before_new_blocks(serve: Serve) -> None:
    stitch = MessagesContinuation()
    run(stitch, anthropic_stream([("text", ["Step one. "])], end=False)[:-1])
    stitch.continue_after_break(strip_prefix="")
    out = run(stitch, anthropic_stream([("thinking", ["hm"]), ("text", ["Step two."])]))
    assert parse(out)[:2] == [a_ev("ping"), a_ev("content_block_stop", index=0)]  # the open block closed first
    names_and_indexes = [(n, d.get("index")) for n, d in parse(out) if n and n.startswith("content_block_start")]
    assert names_and_indexes == [("content_block_start", 1), ("content_block_start", 2)]


async def test_chat_pass_through_continuation_and_cross_vendor_continuation(serve: Serve) -> None:
    # Given an OpenAI client served by OpenAI, the first stream cut after "Hello, "
    stitch = ChatContinuation()
    first = chat_stream(["Hello,", " "], end=False)
    out = run(stitch, first)
    assert out == [e.raw for e in first]
    stitch.continue_after_break()
    # When an OpenAI stream continues, then (a second break) an Anthropic one continues through the same stitcher
    out += run(stitch, chat_stream([" wor"], end=False))
    stitch.continue_after_break(sent_output_tokens=3)
    t = AnthropicToChat(model="other", include_usage=True, tool_names=ToolNames(), client=stitch)
    out += run(t, anthropic_stream([("text", ["ld!"])], start_usage=msg_usage(8, 1), end_usage={"output_tokens": 2}))
    chunks = [c for _, c in parse(out)]
    # Then every chunk has the first stream's id and model, one role chunk, the text joined once
    assert {(c["id"], c["model"]) for c in chunks if c != "[DONE]"} == {("chatcmpl-up", "gpt-4o-2024")}
    assert sum(1 for c in chunks if c != "[DONE]" and c["choices"] and "role" in c["choices"][0]["delta"]) == 1
    assert stitch.text == "Hello, world!" and t.finished
    text, _, finish, usage = await openai_collect(await serve(b"".join(out)))
    assert (text, finish, usage.prompt_tokens, usage.completion_tokens) == ("Hello, world!", "stop", 8, 5)


def test_a_stream_with_a_tool_call_or_a_finish_is_not_resumable() -> None:
    t = to_chat()
    run(t, anthropic_stream([("tool", "toolu_1", "x", ['{"a'])], end=False))
    assert not t.resumable
    with pytest.raises(RuntimeError):
        t.continue_after_break()
    c = to_messages()
    run(c, chat_stream(["done"])[:-2])  # finish_reason seen, usage not yet
    assert not c.resumable and not to_messages().resumable  # nor a stream that never started


def test_strip_prefix_matches_across_deltas_and_stops_at_the_first_difference() -> None:
    # Given a client that has "A:\n " and a continuation starting "\n", " ", "\n", "B"
    stitch = ChatContinuation()
    run(stitch, chat_stream(["A:\n "], end=False))
    stitch.continue_after_break()
    out = run(stitch, chat_stream(["\n", " ", "\nB"], end=False))
    # Then "\n " is not relayed again, the second "\n" (a difference) is, and empty chunks are dropped
    assert [c["choices"][0]["delta"] for _, c in parse(out)] == [{"content": "\nB"}]
    assert stitch.text == "A:\n \nB"


# --------------------------------------------------------------------------------------------------
# Properties: whatever the splits, the text and the tool arguments arrive whole


TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=40)
ARGS = st.dictionaries(st.text(min_size=1, max_size=5), st.integers() | st.text(max_size=8), max_size=3)


@st.composite
def split(draw: st.DrawFn, whole: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(0, len(whole)), max_size=6)))
    bounds = [0, *cuts, len(whole)]
    return [whole[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if whole[a:b]]


@st.composite
def answer(draw: st.DrawFn) -> tuple[str, list[str], list[tuple[str, str, str, list[str]]]]:
    text = draw(TEXT)
    calls = []
    for i, args in enumerate(draw(st.lists(ARGS, max_size=3))):
        raw = json.dumps(args)
        calls.append((f"call_{i}", f"tool_{i}", raw, draw(split(raw))))
    return text, draw(split(text)), calls


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer())
def test_property_anthropic_to_chat_keeps_text_and_arguments(case: Any) -> None:
    text, pieces, calls = case
    blocks: list[tuple[Any, ...]] = [("text", pieces), *[("tool", i, n, p) for i, n, _, p in calls]]
    chunks = [c for _, c in parse(run(to_chat(), anthropic_stream(blocks)))]
    content = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks[:-2] if ch["choices"])
    args: dict[int, str] = {}
    for ch in chunks[:-2]:
        for call in ch["choices"][0]["delta"].get("tool_calls", []):
            args[call["index"]] = args.get(call["index"], "") + call["function"]["arguments"]
    assert content == text
    assert args == {i: raw for i, (_, _, raw, _) in enumerate(calls)}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer())
def test_property_chat_to_anthropic_keeps_text_and_arguments(case: Any) -> None:
    text, pieces, calls = case
    events = parse(run(to_messages(), chat_stream(pieces, [(i, n, p) for i, n, _, p in calls], "tool_calls")))
    texts: dict[int, str] = {}
    inputs: dict[int, str] = {}
    open_blocks: list[int] = []
    for name, data in events:
        if name == "content_block_start":
            assert not open_blocks and data["index"] == len(texts) + len(inputs)  # one open, consecutive
            open_blocks.append(data["index"])
            (texts if data["content_block"]["type"] == "text" else inputs)[data["index"]] = ""
        elif name == "content_block_delta":
            if data["delta"]["type"] == "text_delta":
                texts[data["index"]] += data["delta"]["text"]
            else:
                inputs[data["index"]] += data["delta"]["partial_json"]
        elif name == "content_block_stop":
            assert open_blocks.pop() == data["index"]
    assert list(texts.values()) == [text]
    assert list(inputs.values()) == [raw for _, _, raw, _ in calls]


@settings(max_examples=60, deadline=None)
@given(TEXT, TEXT, st.data())
def test_property_continuation_joins_the_two_halves_once(head: str, tail: str, data: st.DataObject) -> None:
    # Given a first stream cut after `head`, a second continuing with `tail` (after repeating head's trailing
    # whitespace, as a model continuing a stripped prefill does)
    t = to_chat()
    run(t, anthropic_stream([("text", data.draw(split(head)))], end=False))
    t.continue_after_break()
    repeated = head[len(head.rstrip()):]
    out = run(t, anthropic_stream([("text", data.draw(split(repeated + tail)))]))
    # Then the client's text is head + tail exactly: the repeated whitespace is relayed once
    assert t.text == head + tail
    assert t.finished and out[-1] == DONE
