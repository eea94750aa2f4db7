"""Usage and tool-call extraction from OpenAI / Anthropic bodies and streams (provider-formats.md shapes)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rungate.providers.metering import (
    ChatStreamMeter,
    MessagesStreamMeter,
    ResponsesStreamMeter,
    ToolCall,
    embeddings_usage_at_end,
    estimate_input,
    estimate_input_tokens,
    prepare_chat_stream_request,
    tool_calls_from_chat,
    tool_calls_from_messages,
    tool_calls_from_responses,
    usage_from_chat,
    usage_from_embeddings,
    usage_from_messages,
    usage_from_responses,
    web_search_limit,
)
from rungate.providers.sse import SSEEvent, SSEParser, encode_event
from rungate.usage import Usage

Meter = ChatStreamMeter | ResponsesStreamMeter | MessagesStreamMeter


def sse(*items: Any) -> bytes:
    """Encode stream items: a dict (data only), a str (raw data), or (event name, dict | str)."""
    out = b""
    for item in items:
        name, payload = item if isinstance(item, tuple) else (None, item)
        out += encode_event(payload if isinstance(payload, str) else orjson.dumps(payload), name)
    return out


def typed(*payloads: dict[str, Any]) -> bytes:
    """Anthropic / Responses style: every event carries `event: <type>`."""
    return sse(*((p["type"], p) for p in payloads))


def run(meter: Meter, stream: bytes, chunk: int = 7) -> bytes:
    """Parse `stream` in small chunks, feed the meter, return the bytes that would reach the client."""
    parser = SSEParser()
    forwarded = b""
    for i in range(0, len(stream), chunk):
        for event in parser.feed(stream[i : i + chunk]):
            if meter.feed(event):
                forwarded += event.raw
    for event in parser.flush():
        if meter.feed(event):
            forwarded += event.raw
    return forwarded


# --------------------------------------------------------------------------------------------------
# OpenAI Chat Completions stream


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1764000000,
        "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_1",
        "service_tier": "default",
        "obfuscation": "q3Xz",
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": None,
    }
    body.update(extra)
    return body


CHAT_USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 85,
    "total_tokens": 1285,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 30,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
CHAT_USAGE_MAPPED = Usage(input=176, cached=1024, output=85, reasoning=30)

CHAT_HEAD = [
    chunk({"role": "assistant", "content": "", "refusal": None}),
    chunk({"content": "Checking "}),
    chunk({"content": "both."}),
]
CHAT_TOOLS = [
    chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        }
    ),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
    chunk(
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": ""},
                }
            ]
        }
    ),
    chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"tz": "CET"}'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]}),
    chunk({}, finish="tool_calls"),
]
CHAT_USAGE_CHUNK = chunk(None, usage=CHAT_USAGE)
EXPECTED_CHAT_CALLS = [
    ToolCall("call_a", "get_weather", '{"city": "Paris"}'),
    ToolCall("call_b", "get_time", '{"tz": "CET"}'),
]


@pytest.mark.parametrize("client_wants_usage", [True, False])
def test_chat_stream_parallel_tools_and_usage_chunk(client_wants_usage: bool) -> None:
    stream = sse(*CHAT_HEAD, *CHAT_TOOLS, CHAT_USAGE_CHUNK, "[DONE]")
    meter = ChatStreamMeter(client_wants_usage)
    forwarded = run(meter, stream)

    usage_event = sse(CHAT_USAGE_CHUNK)
    assert usage_event in stream
    assert forwarded == (stream if client_wants_usage else stream.replace(usage_event, b""))
    assert meter.usage == CHAT_USAGE_MAPPED
    assert meter.done
    assert meter.error is None
    assert meter.tool_calls == EXPECTED_CHAT_CALLS
    assert meter.output_text_bytes == len("Checking both.") + len('{"city": "Paris"}{"tz": "CET"}')
    assert meter.estimated_usage(5) == CHAT_USAGE_MAPPED


def test_chat_stream_keeps_non_usage_empty_choice_chunks() -> None:
    meter = ChatStreamMeter(client_wants_usage=False)
    assert meter.feed(SSEEvent(b"", None, orjson.dumps(chunk(None)).decode(), False))  # usage null
    assert meter.feed(SSEEvent(b"", None, "[DONE]", False))


def test_chat_stream_multiple_choices_keep_calls_apart() -> None:
    meter = ChatStreamMeter(True)
    for index, name in ((0, "a"), (1, "b")):
        body = chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": f"call_{name}", "function": {"name": name, "arguments": "{}"}}
                ]
            }
        )
        body["choices"][0]["index"] = index
        run(meter, sse(body))
    assert meter.tool_calls == [ToolCall("call_a", "a", "{}"), ToolCall("call_b", "b", "{}")]


def test_chat_stream_legacy_function_call() -> None:
    meter = ChatStreamMeter(True)
    run(
        meter,
        sse(
            chunk({"function_call": {"name": "f", "arguments": '{"x"'}}),
            chunk({"function_call": {"arguments": ": 1}"}}),
        ),
    )
    assert meter.tool_calls == [ToolCall(None, "f", '{"x": 1}')]


# --------------------------------------------------------------------------------------------------
# OpenAI Responses stream

RESPONSE_USAGE = {
    "input_tokens": 2300,
    "input_tokens_details": {"cached_tokens": 2048},
    "output_tokens": 120,
    "output_tokens_details": {"reasoning_tokens": 64},
    "total_tokens": 2420,
}
RESPONSE_USAGE_MAPPED = Usage(input=252, cached=2048, output=120, reasoning=64)
FUNCTION_ITEM = {
    "type": "function_call",
    "id": "fc_1",
    "call_id": "call_1",
    "name": "get_weather",
    "arguments": "",
    "status": "in_progress",
}


def response_object(status: str, usage: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1764000000,
        "status": status,
        "model": "gpt-5",
        "output": [
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {
                "type": "message",
                "id": "msg_1",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}],
            },
            {**FUNCTION_ITEM, "arguments": '{"city":"Paris"}', "status": "completed"},
        ],
        "usage": usage,
        "error": None,
        "incomplete_details": None,
    }


RESPONSES_BODY: list[dict[str, Any]] = [
    {"type": "response.created", "sequence_number": 0, "response": response_object("in_progress", None)},
    {"type": "response.in_progress", "sequence_number": 1, "response": response_object("in_progress", None)},
    {
        "type": "response.output_item.added",
        "sequence_number": 2,
        "output_index": 0,
        "item": {"type": "reasoning", "id": "rs_1", "summary": []},
    },
    {
        "type": "response.output_item.added",
        "sequence_number": 3,
        "output_index": 1,
        "item": {
            "type": "message",
            "id": "msg_1",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        },
    },
    {
        "type": "response.content_part.added",
        "sequence_number": 4,
        "item_id": "msg_1",
        "output_index": 1,
        "content_index": 0,
        "part": {"type": "output_text", "text": "", "annotations": []},
    },
    {
        "type": "response.output_text.delta",
        "sequence_number": 5,
        "item_id": "msg_1",
        "output_index": 1,
        "content_index": 0,
        "delta": "Let me ",
        "logprobs": [],
    },
    {
        "type": "response.output_text.delta",
        "sequence_number": 6,
        "item_id": "msg_1",
        "output_index": 1,
        "content_index": 0,
        "delta": "check.",
        "logprobs": [],
    },
    {
        "type": "response.output_text.done",
        "sequence_number": 7,
        "item_id": "msg_1",
        "output_index": 1,
        "content_index": 0,
        "text": "Let me check.",
    },
    {"type": "response.output_item.added", "sequence_number": 8, "output_index": 2, "item": FUNCTION_ITEM},
    {
        "type": "response.function_call_arguments.delta",
        "sequence_number": 9,
        "item_id": "fc_1",
        "output_index": 2,
        "delta": '{"city":',
    },
    {
        "type": "response.function_call_arguments.delta",
        "sequence_number": 10,
        "item_id": "fc_1",
        "output_index": 2,
        "delta": '"Paris"}',
    },
]
RESPONSES_TAIL: list[dict[str, Any]] = [
    {
        "type": "response.function_call_arguments.done",
        "sequence_number": 11,
        "item_id": "fc_1",
        "output_index": 2,
        "arguments": '{"city":"Paris"}',
    },
    {
        "type": "response.output_item.done",
        "sequence_number": 12,
        "output_index": 2,
        "item": {**FUNCTION_ITEM, "arguments": '{"city":"Paris"}', "status": "completed"},
    },
]


@pytest.mark.parametrize("terminal", ["response.completed", "response.incomplete", "response.failed"])
def test_responses_stream_usage_from_terminal_event(terminal: str) -> None:
    final = response_object(terminal.split(".")[1], RESPONSE_USAGE)
    if terminal == "response.failed":
        final["error"] = {"code": "server_error", "message": "The model failed."}
    stream = typed(
        *RESPONSES_BODY, *RESPONSES_TAIL, {"type": terminal, "sequence_number": 13, "response": final}
    )
    meter = ResponsesStreamMeter()
    assert run(meter, stream) == stream
    assert meter.usage == RESPONSE_USAGE_MAPPED
    assert meter.done
    assert meter.tool_calls == [ToolCall("call_1", "get_weather", '{"city":"Paris"}')]
    assert meter.output_text_bytes == len("Let me check.") + len('{"city":"Paris"}')
    if terminal == "response.failed":
        assert meter.error == {"code": "server_error", "message": "The model failed."}
    else:
        assert meter.error is None


def test_responses_stream_cut_before_completion_is_estimated() -> None:
    meter = ResponsesStreamMeter()
    run(meter, typed(*RESPONSES_BODY))
    assert meter.usage is None and not meter.done
    assert meter.tool_calls == [ToolCall("call_1", "get_weather", '{"city":"Paris"}')]
    chars = len("Let me check.") + len('{"city":"Paris"}')
    assert meter.estimated_usage(800) == Usage(input=800, output=math.ceil(chars / 4))


def test_responses_tool_call_from_final_response_only() -> None:
    meter = ResponsesStreamMeter()
    final = response_object("completed", RESPONSE_USAGE)
    run(meter, typed({"type": "response.completed", "sequence_number": 0, "response": final}))
    assert meter.tool_calls == [ToolCall("call_1", "get_weather", '{"city":"Paris"}')]


def search_item(n: int, status: str = "completed") -> dict[str, Any]:
    return {"type": "web_search_call", "id": f"ws_{n}", "status": status,
            "action": {"type": "search", "query": f"query {n}"}}


def test_a_responses_answer_counts_its_web_search_calls() -> None:
    # OpenAI bills each call of its built-in web search; the usage object does not count them, the output does
    body = response_object("completed", RESPONSE_USAGE)
    body["output"] = [search_item(1), search_item(2), *body["output"]]
    assert usage_from_responses(body) == replace(RESPONSE_USAGE_MAPPED, web_searches=2)
    assert usage_from_responses(response_object("completed", RESPONSE_USAGE)) == RESPONSE_USAGE_MAPPED
    assert usage_from_responses({**body, "usage": None}) is None  # searches without usage: an estimate's job


def test_a_responses_stream_counts_the_searches_of_its_final_output_or_those_it_announced() -> None:
    final = response_object("completed", RESPONSE_USAGE)
    final["output"] = [search_item(0), *final["output"]]
    announced = [{"type": "response.output_item.added", "sequence_number": 100 + n, "output_index": 10 + n,
                  "item": search_item(n, "in_progress")} for n in range(3)]
    announced.append({"type": "response.output_item.done", "sequence_number": 110, "output_index": 10,
                      "item": search_item(0)})  # the same search, done: counted once
    # the final output lists one search, the stream announced three: three were run (and billed)
    meter = ResponsesStreamMeter()
    run(meter, typed(*announced, {"type": "response.completed", "sequence_number": 120, "response": final}))
    assert meter.usage == replace(RESPONSE_USAGE_MAPPED, web_searches=3)
    # the final output alone
    meter = ResponsesStreamMeter()
    run(meter, typed({"type": "response.completed", "sequence_number": 0, "response": final}))
    assert meter.usage == replace(RESPONSE_USAGE_MAPPED, web_searches=1)
    # a stream cut after announcing them is charged its estimate and the searches it announced
    meter = ResponsesStreamMeter()
    run(meter, typed(*RESPONSES_BODY, *announced))
    assert meter.usage is None
    assert meter.estimated_usage(800).web_searches == 3


@pytest.mark.parametrize(("body", "limit"), [
    ({"tools": [{"type": "web_search"}], "max_tool_calls": 4}, 4),
    ({"tools": [{"type": "web_search_preview_2025_03_11"}], "max_tool_calls": 2}, 2),
    ({"tools": [{"type": "web_search"}]}, 0),  # unbounded: nothing to reserve
    ({"tools": [{"type": "function", "name": "f"}], "max_tool_calls": 4}, 0),  # no search tool
    ({"tools": [{"type": "web_search"}], "max_tool_calls": -1}, 0),
    ({"tools": [{"type": "web_search"}], "max_tool_calls": True}, 0),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}], "max_tool_calls": 9}, 5),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
                {"type": "web_search"}], "max_tool_calls": 9}, 14),
])
def test_web_search_limit_reads_max_uses_or_max_tool_calls(body: dict[str, Any], limit: int) -> None:
    assert web_search_limit(body) == limit


# --------------------------------------------------------------------------------------------------
# Anthropic Messages stream

MESSAGE_START_USAGE = {
    "input_tokens": 25,
    "cache_creation_input_tokens": 1000,
    "cache_read_input_tokens": 2000,
    "cache_creation": {"ephemeral_5m_input_tokens": 400, "ephemeral_1h_input_tokens": 600},
    "output_tokens": 1,
    "service_tier": "standard",
}
ANTHROPIC_HEAD: list[dict[str, Any]] = [
    {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "claude-sonnet-4-5",
            "stop_reason": None,
            "stop_sequence": None,
            "usage": MESSAGE_START_USAGE,
        },
    },
    {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
    },
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "thinking_delta", "thinking": "Weather tool."},
    },
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "signature_delta", "signature": "EqQBCgIYAh"},
    },
    {"type": "content_block_stop", "index": 0},
    {"type": "ping"},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hello"}},
    {"type": "content_block_stop", "index": 1},
    {
        "type": "content_block_start",
        "index": 2,
        "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
    },
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ""}},
    {
        "type": "content_block_delta",
        "index": 2,
        "delta": {"type": "input_json_delta", "partial_json": '{"city": "Par'},
    },
    {
        "type": "content_block_delta",
        "index": 2,
        "delta": {"type": "input_json_delta", "partial_json": 'is"}'},
    },
    {"type": "content_block_stop", "index": 2},
    {
        "type": "content_block_start",
        "index": 3,
        "content_block": {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {}},
    },
    {"type": "content_block_stop", "index": 3},
]
ANTHROPIC_CHARS = len("Weather tool.") + len("Hello") + len('{"city": "Paris"}')


def test_messages_stream_cumulative_message_delta() -> None:
    stream = typed(
        *ANTHROPIC_HEAD,
        {
            "type": "message_delta",
            "delta": {"stop_reason": None, "stop_sequence": None},
            "usage": {"output_tokens": 10},
        },
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {
                "output_tokens": 42,
                "input_tokens": None,
                "cache_read_input_tokens": 2100,
                "output_tokens_details": {"thinking_tokens": 5},
            },
        },
        {"type": "message_stop"},
    )
    meter = MessagesStreamMeter()
    assert run(meter, stream) == stream
    expected = Usage(input=25, cached=2100, cache_write=400, cache_write_1h=600, output=42, reasoning=5)
    assert meter.usage == expected
    assert meter.estimated_usage(1) == expected
    assert meter.done and meter.error is None
    assert meter.tool_calls == [
        ToolCall("toolu_1", "get_weather", '{"city": "Paris"}'),
        ToolCall("toolu_2", "now", "{}"),
    ]
    assert meter.output_text_bytes == ANTHROPIC_CHARS


def test_messages_stream_counts_the_web_searches_of_its_last_message_delta() -> None:
    stream = typed(
        *ANTHROPIC_HEAD,
        {"type": "message_delta", "usage": {"output_tokens": 5, "server_tool_use": {"web_search_requests": 1}}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": 9, "server_tool_use": {"web_search_requests": 3}}},
        {"type": "message_stop"},
    )
    meter = MessagesStreamMeter()
    run(meter, stream)
    assert meter.usage is not None and meter.usage.web_searches == 3  # cumulative: the last count, not a sum
    assert meter.usage.as_dict()["web_searches"] == 3
    assert "web_searches" not in Usage(input=1).as_dict()  # stored only when there were some


def test_messages_stream_cut_before_message_delta_keeps_input_side() -> None:
    meter = MessagesStreamMeter()
    run(meter, typed(*ANTHROPIC_HEAD))
    assert not meter.done
    assert meter.usage == Usage(input=25, cached=2000, cache_write=400, cache_write_1h=600, output=1)
    assert meter.estimated_usage(9999) == Usage(
        input=25, cached=2000, cache_write=400, cache_write_1h=600, output=math.ceil(ANTHROPIC_CHARS / 4)
    )


def test_messages_stream_without_cache_split() -> None:
    meter = MessagesStreamMeter()
    start = {
        "type": "message_start",
        "message": {
            "usage": {
                "input_tokens": 10,
                "cache_creation_input_tokens": 7,
                "cache_read_input_tokens": 0,
                "output_tokens": 1,
            }
        },
    }
    run(
        meter,
        typed(start, {"type": "message_delta", "usage": {"output_tokens": 3}}, {"type": "message_stop"}),
    )
    assert meter.usage == Usage(input=10, cache_write=7, output=3)


# --------------------------------------------------------------------------------------------------
# Cut streams, errors, malformed lines


def test_cut_streams_estimate_from_text() -> None:
    chat = ChatStreamMeter(False)
    run(chat, sse(*CHAT_HEAD))
    assert chat.usage is None and not chat.done
    assert chat.estimated_usage(300) == Usage(input=300, output=math.ceil(len("Checking both.") / 4))

    only_role = ChatStreamMeter(False)
    run(only_role, sse(CHAT_HEAD[0]))
    assert only_role.estimated_usage(300) == Usage(input=300, output=1)  # a delta was seen

    nothing = MessagesStreamMeter()
    assert nothing.estimated_usage(300) == Usage(input=300, output=0)
    assert ResponsesStreamMeter().estimated_usage(-5) == Usage()


@pytest.mark.parametrize(
    ("meter", "stream", "expected"),
    [
        (
            ChatStreamMeter(False),
            sse(
                CHAT_HEAD[1],
                {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}},
            ),
            {"message": "boom", "type": "server_error", "param": None, "code": None},
        ),
        (
            MessagesStreamMeter(),
            typed(
                ANTHROPIC_HEAD[0],
                {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            ),
            {"type": "overloaded_error", "message": "Overloaded"},
        ),
        (
            ResponsesStreamMeter(),
            typed(
                {"type": "error", "code": "server_error", "message": "x", "param": None, "sequence_number": 3}
            ),
            {"type": "error", "code": "server_error", "message": "x", "param": None, "sequence_number": 3},
        ),
        (
            ResponsesStreamMeter(),
            typed(
                {"type": "error", "sequence_number": 3, "error": {"code": "rate_limit", "message": "slow"}}
            ),
            {"code": "rate_limit", "message": "slow"},
        ),
        (MessagesStreamMeter(), sse(("error", "upstream died")), {"message": "upstream died"}),
    ],
)
def test_mid_stream_errors_are_captured_and_forwarded(
    meter: Meter, stream: bytes, expected: dict[str, Any]
) -> None:
    assert run(meter, stream) == stream
    assert meter.error == expected
    assert not meter.done


@pytest.mark.parametrize(
    "meter",
    [ChatStreamMeter(False), ResponsesStreamMeter(), MessagesStreamMeter()],
    ids=["chat", "responses", "messages"],
)
def test_malformed_and_odd_lines_are_forwarded_and_ignored(meter: Meter) -> None:
    stream = (
        b": keepalive\n\n"
        b"data: {not json\n\n"
        b'event: message_start\ndata: {"type": "message_start", "message": \n\n'
        b"data: 12345678901234567890123456789\n\n"
        b"data: [1, 2\n\n"
        b'data: "string"\n\n'
        b"data: null\n\n"
        b"id: 4\nretry: 10\n\n"
        b"data: " + b"[" * 2000 + b"\n\n"
    )
    assert run(meter, stream) == stream
    assert meter.usage is None and meter.error is None and not meter.done
    assert meter.tool_calls == [] and meter.output_text_bytes == 0


def test_stream_meters_ignore_invalid_usage_values() -> None:
    chat = ChatStreamMeter(True)
    run(chat, sse(chunk(None, usage={"prompt_tokens": -3, "completion_tokens": True}), "[DONE]"))
    assert chat.usage is None and chat.done

    messages = MessagesStreamMeter()
    start = {"type": "message_start", "message": {"usage": {"input_tokens": "9", "output_tokens": 1.5}}}
    run(messages, typed(start, {"type": "message_delta", "usage": {"output_tokens": False}}))
    assert messages.usage is None


# --------------------------------------------------------------------------------------------------
# Non-stream usage


@pytest.mark.parametrize(
    ("func", "body", "expected"),
    [
        (usage_from_chat, {"usage": CHAT_USAGE}, CHAT_USAGE_MAPPED),
        (
            usage_from_chat,
            {"usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}},
            Usage(input=10, output=2),
        ),
        (
            usage_from_chat,
            {
                "usage": {
                    "prompt_tokens": 10,
                    "completion_tokens": 2,
                    "prompt_tokens_details": None,
                    "completion_tokens_details": None,
                }
            },
            Usage(input=10, output=2),
        ),
        (usage_from_chat, {"choices": []}, None),
        (usage_from_chat, {"usage": None}, None),
        (usage_from_chat, {"usage": {}}, None),
        (usage_from_chat, {"usage": {"prompt_tokens": True, "completion_tokens": -1}}, None),
        (
            usage_from_chat,
            {
                "usage": {
                    "prompt_tokens": 10,
                    "completion_tokens": "5",
                    "prompt_tokens_details": {"cached_tokens": -4},
                }
            },
            Usage(input=10),
        ),
        (
            usage_from_chat,
            {
                "usage": {
                    "prompt_tokens": 10,
                    "completion_tokens": 3,
                    "prompt_tokens_details": {"cached_tokens": 50},
                    "completion_tokens_details": {"reasoning_tokens": 9},
                }
            },
            Usage(input=0, cached=10, output=3, reasoning=3),
        ),
        (usage_from_chat, {"usage": {"prompt_tokens": 10.0, "completion_tokens": 3}}, Usage(output=3)),
        (usage_from_chat, "not a dict", None),
        (usage_from_responses, response_object("completed", RESPONSE_USAGE), RESPONSE_USAGE_MAPPED),
        (usage_from_responses, response_object("in_progress", None), None),
        (usage_from_responses, {"usage": {"input_tokens": 5, "output_tokens": 0}}, Usage(input=5)),
        (
            usage_from_embeddings,
            {
                "object": "list",
                "data": [],
                "model": "text-embedding-3-small",
                "usage": {"prompt_tokens": 8, "total_tokens": 8},
            },
            Usage(input=8),
        ),
        (usage_from_embeddings, {"usage": {"total_tokens": 8}}, Usage(input=8)),
        (usage_from_embeddings, {"usage": {"prompt_tokens": None}}, None),
        (usage_from_embeddings, {}, None),
        (
            usage_from_messages,
            {
                "usage": {
                    "input_tokens": 12,
                    "output_tokens": 30,
                    "cache_creation_input_tokens": 100,
                    "cache_read_input_tokens": 200,
                }
            },
            Usage(input=12, output=30, cached=200, cache_write=100),
        ),
        (
            usage_from_messages,
            {
                "usage": {
                    "input_tokens": 12,
                    "output_tokens": 30,
                    "cache_creation_input_tokens": 100,
                    "cache_read_input_tokens": 200,
                    "cache_creation": {"ephemeral_5m_input_tokens": 40, "ephemeral_1h_input_tokens": 60},
                    "output_tokens_details": {"thinking_tokens": 11},
                    "server_tool_use": {"web_search_requests": 1},
                    "service_tier": "standard",
                }
            },
            Usage(input=12, output=30, cached=200, cache_write=40, cache_write_1h=60, reasoning=11, web_searches=1),
        ),
        (
            usage_from_messages,
            {
                "usage": {
                    "input_tokens": 1,
                    "output_tokens": 2,
                    "cache_creation_input_tokens": 100,
                    "cache_creation": {"ephemeral_1h_input_tokens": 60},
                }
            },
            Usage(input=1, output=2, cache_write=40, cache_write_1h=60),
        ),
        (
            usage_from_messages,
            {
                "usage": {
                    "input_tokens": 1,
                    "output_tokens": 2,
                    "cache_creation_input_tokens": 9,
                    "cache_creation": None,
                    "cache_read_input_tokens": None,
                }
            },
            Usage(input=1, output=2, cache_write=9),
        ),
        (
            usage_from_messages,
            {
                "usage": {
                    "input_tokens": 1,
                    "output_tokens": 2,
                    "cache_creation": {"ephemeral_5m_input_tokens": -1},
                }
            },
            Usage(input=1, output=2),
        ),
        (usage_from_messages, {"usage": {"service_tier": "standard"}}, None),
        (usage_from_messages, {"type": "message"}, None),
    ],
)
def test_usage_mapping(func: Any, body: Any, expected: Usage | None) -> None:
    assert func(body) == expected


# --------------------------------------------------------------------------------------------------
# Non-stream tool calls


def test_tool_calls_from_chat() -> None:
    body = {
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_a",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                        },
                        {
                            "id": "call_b",
                            "type": "function",
                            "function": {"name": "get_time", "arguments": "{}"},
                        },
                        "garbage",
                        {"id": "call_c", "type": "function"},
                    ],
                },
            },
            {
                "index": 1,
                "message": {"role": "assistant", "function_call": {"name": "legacy", "arguments": "{}"}},
            },
            {"index": 2, "message": None},
        ]
    }
    assert tool_calls_from_chat(body) == [
        ToolCall("call_a", "get_weather", '{"city":"Paris"}'),
        ToolCall("call_b", "get_time", "{}"),
        ToolCall(None, "legacy", "{}"),
    ]
    assert tool_calls_from_chat({"choices": None}) == [] == tool_calls_from_chat([])


def test_tool_calls_from_responses() -> None:
    assert tool_calls_from_responses(response_object("completed", RESPONSE_USAGE)) == [
        ToolCall("call_1", "get_weather", '{"city":"Paris"}')
    ]
    assert tool_calls_from_responses({"output": "x"}) == []


def test_tool_calls_from_messages() -> None:
    body = {
        "type": "message",
        "content": [
            {"type": "text", "text": "On it."},
            {
                "type": "tool_use",
                "id": "toolu_1",
                "name": "get_weather",
                "input": {"city": "Paris", "days": 2},
            },
            {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {}},
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "x"}},
        ],
    }
    assert tool_calls_from_messages(body) == [
        ToolCall("toolu_1", "get_weather", '{"city":"Paris","days":2}'),
        ToolCall("toolu_2", "now", "{}"),
    ]


# --------------------------------------------------------------------------------------------------
# Request helpers


@pytest.mark.parametrize(
    ("body", "sent_options", "client_wants"),
    [
        ({"stream": True}, {"include_usage": True}, False),
        ({"stream": True, "stream_options": {"include_usage": True}}, {"include_usage": True}, True),
        (
            {"stream": True, "stream_options": {"include_usage": False, "include_obfuscation": False}},
            {"include_usage": True, "include_obfuscation": False},
            False,
        ),
        ({"stream": True, "stream_options": None}, {"include_usage": True}, False),
        ({"stream": False}, None, False),
        ({}, None, False),
    ],
)
def test_prepare_chat_stream_request(body: dict[str, Any], sent_options: Any, client_wants: bool) -> None:
    original = orjson.loads(orjson.dumps(body))
    upstream, wants = prepare_chat_stream_request(body)
    assert wants is client_wants
    assert upstream.get("stream_options") == sent_options or (sent_options is None and upstream == body)
    assert body == original  # never mutated
    assert {k: v for k, v in upstream.items() if k != "stream_options"} == {
        k: v for k, v in body.items() if k != "stream_options"
    }


def test_estimate_input_tokens() -> None:
    messages = [{"role": "user", "content": "x" * 400}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    body = {"model": "gpt-4o", "messages": messages, "tools": tools, "temperature": 0.2}
    expected = math.ceil((len(orjson.dumps(messages)) + len(orjson.dumps(tools))) / 4)
    assert estimate_input_tokens(body) == expected
    anthropic = {"model": "claude", "system": "be brief", "messages": messages, "max_tokens": 10}
    assert estimate_input_tokens(anthropic) == math.ceil(
        (len(orjson.dumps("be brief")) + len(orjson.dumps(messages))) / 4
    )
    assert estimate_input_tokens({"model": "m", "input": ""}) == 1
    assert estimate_input_tokens({}) == 1
    assert estimate_input_tokens({"input": 2**70}) >= 1  # not JSON-encodable by orjson: still estimated
    assert estimate_input_tokens({"input": "\ud800" * 8}) >= 6  # a lone surrogate: 3 bytes, not an error


IMAGE_URL = "https://images.example/chart.png"
BASE64_PNG = "data:image/png;base64," + "iVBORw0KGgo" * 30_000  # 330 KB of an image in base64


@pytest.mark.parametrize(("body", "images"), [
    # OpenAI chat: image_url parts, by URL or inline
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "compare"},
                                                  {"type": "image_url", "image_url": {"url": IMAGE_URL}},
                                                  {"type": "image_url", "image_url": {"url": BASE64_PNG}}]}]}, 2),
    # Responses: input_image parts, and a computer-use screenshot sent back
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "compare"},
                                             {"type": "input_image", "image_url": BASE64_PNG, "detail": "high"}]},
                {"type": "computer_call_output", "call_id": "c1",
                 "output": {"type": "computer_screenshot", "image_url": BASE64_PNG}}]}, 2),
    # Anthropic: image blocks in a message and in a tool result
    ({"system": "be brief", "messages": [
        {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": IMAGE_URL}},
                                     {"type": "text", "text": "compare"}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": BASE64_PNG[22:]}}]}]}]},
     2),
])
def test_the_estimate_counts_image_parts_instead_of_their_bytes(body: dict[str, Any], images: int) -> None:
    estimate = estimate_input(body)
    assert estimate.images == images
    assert estimate.tokens < 80  # the words and the structure; the images' bytes are left out
    assert estimate_input_tokens(body) == estimate.tokens


def test_words_about_images_and_tool_schemas_are_text() -> None:
    text = {"messages": [{"role": "user", "content": 'describe an "image_url" of {"type": "image"}'}],
            "tools": [{"type": "function", "function": {"name": "draw", "parameters": {
                "type": "object", "properties": {"image": {"type": "string"}, "kind": {"enum": ["image"]}}}}}]}
    assert estimate_input(text) == (estimate_input_tokens(text), 0)
    assert estimate_input_tokens(text) == math.ceil(
        (len(orjson.dumps(text["messages"])) + len(orjson.dumps(text["tools"]))) / 4)


def test_estimates_count_bytes_so_non_latin_text_is_not_a_quarter_token_per_character() -> None:
    chinese = "预算控制" * 100  # 400 characters, 1,200 UTF-8 bytes; tokenizers give about one token each
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": chinese}]}
    assert estimate_input_tokens(body) >= 300  # by characters it would have been about 100
    meter = ChatStreamMeter(False)
    run(meter, sse({"id": "c", "choices": [{"index": 0, "delta": {"content": chinese}}]}))
    assert meter.output_text_bytes == 1200
    assert meter.estimated_usage(1).output == 300


# --------------------------------------------------------------------------------------------------
# Robustness: nothing raises on arbitrary JSON-ish input

KEYS = st.sampled_from(
    [
        "usage",
        "prompt_tokens",
        "completion_tokens",
        "prompt_tokens_details",
        "cached_tokens",
        "completion_tokens_details",
        "reasoning_tokens",
        "input_tokens",
        "output_tokens",
        "input_tokens_details",
        "output_tokens_details",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "cache_creation",
        "ephemeral_5m_input_tokens",
        "ephemeral_1h_input_tokens",
        "thinking_tokens",
        "total_tokens",
        "choices",
        "delta",
        "index",
        "content",
        "refusal",
        "tool_calls",
        "function",
        "function_call",
        "name",
        "arguments",
        "id",
        "message",
        "response",
        "output",
        "item",
        "item_id",
        "output_index",
        "call_id",
        "type",
        "error",
        "content_block",
        "partial_json",
        "text",
        "thinking",
        "input",
    ]
) | st.text(max_size=4)
TYPES = st.sampled_from(
    [
        "message_start",
        "message_delta",
        "message_stop",
        "content_block_start",
        "content_block_delta",
        "error",
        "response.completed",
        "response.failed",
        "response.incomplete",
        "response.output_item.added",
        "response.output_item.done",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_text.delta",
        "function_call",
        "tool_use",
        "text_delta",
        "input_json_delta",
        "thinking_delta",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | TYPES
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=6),
    max_leaves=40,
)
PAYLOAD = st.builds(
    lambda t, d: {**d, "type": t} if t else d, st.none() | TYPES, st.dictionaries(KEYS, JSONISH, max_size=8)
)


def check_usage(usage: Usage | None) -> None:
    if usage is not None:
        assert all(type(v) is int and v >= 0 for v in usage.as_dict().values())


@settings(max_examples=400)
@given(body=PAYLOAD | JSONISH)
def test_non_stream_functions_never_raise(body: Any) -> None:
    for func in (usage_from_chat, usage_from_responses, usage_from_messages, usage_from_embeddings):
        check_usage(func(body))
    for extract in (tool_calls_from_chat, tool_calls_from_responses, tool_calls_from_messages):
        for call in extract(body):
            assert isinstance(call.name, str) and isinstance(call.arguments, str)
    assert estimate_input_tokens(body) >= 1


@settings(max_examples=300)
@given(payloads=st.lists(st.tuples(st.none() | TYPES, PAYLOAD | JSONISH), max_size=8), wants=st.booleans())
def test_stream_meters_never_raise(payloads: list[tuple[str | None, Any]], wants: bool) -> None:
    stream = sse(*((name, orjson.dumps(p).decode()) for name, p in payloads))
    for meter in (ChatStreamMeter(wants), ResponsesStreamMeter(), MessagesStreamMeter()):
        run(meter, stream, chunk=13)
        check_usage(meter.usage)
        check_usage(meter.estimated_usage(10))
        assert meter.output_text_bytes >= 0
        for call in meter.tool_calls:
            assert isinstance(call.name, str) and isinstance(call.arguments, str)
        assert meter.error is None or isinstance(meter.error, dict)


# --- an embeddings answer's usage, read off its end -------------------------------------------------------

OPENAI_EMBEDDINGS = {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [0.25, -0.5, 1e-7]}
                                                for i in range(3)],
                     "model": "text-embedding-3-small", "usage": {"prompt_tokens": 9, "total_tokens": 9}}


@pytest.mark.parametrize("answer", [
    orjson.dumps(OPENAI_EMBEDDINGS),
    orjson.dumps(OPENAI_EMBEDDINGS, option=orjson.OPT_INDENT_2) + b"\n",
    orjson.dumps({**OPENAI_EMBEDDINGS, "model": 'x"usage":{"prompt_tokens":1}'}),  # escaped quotes in a string
    orjson.dumps({**OPENAI_EMBEDDINGS, "usage": {"total_tokens": 9}}),
], ids=["compact", "indented", "key-in-a-string", "total-only"])
def test_an_embeddings_answer_s_usage_is_read_off_its_end(answer: bytes) -> None:
    assert embeddings_usage_at_end(answer) == usage_from_embeddings(orjson.loads(answer)) == Usage(input=9)


@pytest.mark.parametrize("answer", [
    orjson.dumps({"usage": {"prompt_tokens": 9}, **{k: v for k, v in OPENAI_EMBEDDINGS.items() if k != "usage"}}),
    # an item's own usage, last in the answer: nested, so not the answer's
    orjson.dumps({"object": "list", "data": [{"embedding": [0.1], "usage": {"prompt_tokens": 1}}]}),
    orjson.dumps({"object": "list", "data": [], "usage": None}),
    b'{"object": "list", "usage": {"prompt_tokens": 9,}}',
    b'["usage", {"prompt_tokens": 9}]',
    b"",
], ids=["usage-first", "nested", "null", "broken", "not-an-object", "empty"])
def test_usage_not_last_in_the_answer_is_left_to_a_whole_read(answer: bytes) -> None:
    assert embeddings_usage_at_end(answer) is None


@settings(max_examples=300)
@given(data=st.lists(st.dictionaries(KEYS, JSONISH, max_size=4), max_size=4),  # KEYS holds "usage"
       usage=JSONISH, order=st.permutations(["object", "data", "model", "usage"]))
def test_usage_read_off_the_end_never_differs_from_a_whole_read(data: list[Any], usage: Any,
                                                                order: list[str]) -> None:
    answer = {"object": "list", "data": data, "model": "m", "usage": usage}
    raw = orjson.dumps({key: answer[key] for key in order})
    found = embeddings_usage_at_end(raw)
    assert found is None or found == usage_from_embeddings(orjson.loads(raw))
    if order[-1] == "usage" and usage_from_embeddings(answer) is not None and b'"usage"' not in orjson.dumps(usage):
        assert found == usage_from_embeddings(answer)  # the answer's own usage, last (and plain): always found

