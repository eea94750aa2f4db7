"""Non-stream answers and errors across OpenAI Chat and Anthropic Messages (provider-formats.md 3.2-3.4, 3.6).

Translated answers are validated with the vendors' own SDK models, as an agent's SDK would load them.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from anthropic.types import Message
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionMessage, ChatCompletionMessageFunctionToolCall

from rungate.translate.answers import chat_to_message, message_to_chat
from rungate.translate.common import RAW_ARGUMENTS, ToolNames, Untranslatable
from rungate.translate.errors import error_for_anthropic, error_for_openai, is_context_length_error
from rungate.translate.requests import messages_to_chat

LONG_NAME = "mcp__workspace_server__" + "very_long_tool_name_" * 4
NOW = 1_700_000_000


def anthropic_answer(content: list[Any], stop_reason: str | None = "end_turn", **extra: Any) -> dict[str, Any]:
    return {"id": "msg_01ABC", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": content, "stop_reason": stop_reason, "stop_sequence": None,
            "usage": {"input_tokens": 100, "output_tokens": 20, "cache_creation_input_tokens": 30,
                      "cache_read_input_tokens": 50}, **extra}


def chat_answer(message: dict[str, Any], finish_reason: str = "stop", **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-XYZ", "object": "chat.completion", "created": 1, "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "refusal": None, **message},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 200, "completion_tokens": 40, "total_tokens": 240,
                      "prompt_tokens_details": {"cached_tokens": 150},
                      "completion_tokens_details": {"reasoning_tokens": 10}}, **extra}


def function_calls(message: ChatCompletionMessage) -> list[tuple[str, str, str]]:
    """(id, name, arguments) of each tool call; every call must be a function call."""
    calls = message.tool_calls or []
    assert all(isinstance(c, ChatCompletionMessageFunctionToolCall) for c in calls)
    return [(c.id, c.function.name, c.function.arguments) for c in calls
            if isinstance(c, ChatCompletionMessageFunctionToolCall)]


def to_chat(answer: Any, names: ToolNames | None = None) -> tuple[ChatCompletion, list[str]]:
    translated = message_to_chat(answer, model="gpt-4o", tool_names=names or ToolNames(), created=NOW)
    return ChatCompletion.model_validate(translated.body), translated.warnings


def to_message(answer: Any, names: ToolNames | None = None) -> tuple[Message, list[str]]:
    translated = chat_to_message(answer, model="claude-x", tool_names=names or ToolNames())
    return Message.model_validate(translated.body), translated.warnings


# --------------------------------------------------------------------------------------------------
# Anthropic message -> OpenAI chat.completion


def test_message_with_text_and_parallel_tool_uses_to_chat() -> None:
    # Given an Anthropic answer with thinking, two text blocks and two tool_use blocks
    answer = anthropic_answer([
        {"type": "thinking", "thinking": "plan", "signature": "s"},
        {"type": "text", "text": "Checking "}, {"type": "text", "text": "both."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Oslo", "units": ["C"]}},
    ], "tool_use")
    # When translated for an OpenAI agent
    completion, warnings = to_chat(answer)
    # Then the SDK loads one choice with joined text and both calls as compact JSON
    assert (completion.id, completion.object, completion.created, completion.model) == (
        "chatcmpl-msg_01ABC", "chat.completion", NOW, "gpt-4o")
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking both."
    assert function_calls(choice.message) == [
        ("toolu_1", "get_weather", '{"city":"Paris"}'), ("toolu_2", "get_weather", '{"city":"Oslo","units":["C"]}')]
    assert warnings == ["Thinking blocks in the answer were dropped: OpenAI Chat cannot carry them."]


def test_message_usage_counts_cache_reads_and_writes_as_prompt_tokens() -> None:
    completion, _ = to_chat(anthropic_answer([{"type": "text", "text": "hi"}]))
    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (180, 20, 200)
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 50


def test_message_with_only_tool_calls_has_null_content_and_restored_names() -> None:
    # Given the request's translation shortened a long tool name
    request = messages_to_chat({"model": "c", "max_tokens": 9, "messages": [{"role": "user", "content": "x"}],
                                "tools": [{"name": LONG_NAME, "input_schema": {"type": "object"}}]}, model="gpt-4o")
    short = request.body["tools"][0]["function"]["name"]
    # When an answer calls it by the short name, then the agent sees its own name again
    completion, _ = to_chat(anthropic_answer([{"type": "tool_use", "id": "toolu_9", "name": short, "input": {}}],
                                             "tool_use"), request.tool_names)
    message = completion.choices[0].message
    assert message.content is None
    assert function_calls(message) == [("toolu_9", LONG_NAME, "{}")]


@pytest.mark.parametrize(("stop_reason", "finish_reason"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
    ("refusal", "content_filter"), ("pause_turn", "stop"), ("model_context_window_exceeded", "length"),
    (None, "stop"), ("something_new", "stop"),
])
def test_stop_reason_to_finish_reason(stop_reason: str | None, finish_reason: str) -> None:
    completion, _ = to_chat(anthropic_answer([{"type": "text", "text": "x"}], stop_reason))
    assert completion.choices[0].finish_reason == finish_reason


def test_message_without_usage_gets_zero_usage_and_unknown_blocks_are_named() -> None:
    answer = anthropic_answer([{"type": "web_search_tool_result", "content": []}])
    del answer["usage"]
    completion, warnings = to_chat(answer)
    assert completion.usage is not None and completion.usage.total_tokens == 0
    assert warnings == ["An answer block of type 'web_search_tool_result' was dropped: OpenAI Chat cannot carry it."]


@pytest.mark.parametrize("answer", [None, [], "text", {}, {"type": "error", "error": {}}, {"content": "x"},
                                    {"type": "message_start", "content": []}])
def test_unrecognisable_anthropic_answers_are_untranslatable(answer: Any) -> None:
    with pytest.raises(Untranslatable) as raised:
        message_to_chat(answer, model="m", tool_names=ToolNames())
    assert raised.value.feature == "answer"


# --------------------------------------------------------------------------------------------------
# OpenAI chat.completion -> Anthropic message


def test_chat_with_text_and_parallel_tool_calls_to_message() -> None:
    # Given an OpenAI answer with content and two tool calls (one id with characters Anthropic rejects)
    answer = chat_answer({"content": "On it.", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call:b", "type": "function", "function": {"name": "now", "arguments": ""}}]}, "tool_calls")
    # When translated for an Anthropic agent
    message, warnings = to_message(answer)
    # Then the SDK loads a text block and two tool_use blocks with parsed inputs
    assert (message.id, message.type, message.role, message.model) == ("msg_XYZ", "message", "assistant", "claude-x")
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    assert [b.model_dump(exclude_none=True) for b in message.content] == [
        {"type": "text", "text": "On it."},
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_b", "name": "now", "input": {}}]
    assert warnings == []


def test_chat_usage_splits_cached_tokens_out_of_input() -> None:
    message, _ = to_message(chat_answer({"content": "x"}))
    usage = message.usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens,
            usage.output_tokens) == (50, 150, 0, 40)


@pytest.mark.parametrize(("arguments", "expected", "warning"), [
    pytest.param('{"a": 1', {"a": 1}, "cut-short", id="truncated"),
    pytest.param("not json", {RAW_ARGUMENTS: "not json"}, "not a JSON object", id="broken"),
    pytest.param('"just a string"', {RAW_ARGUMENTS: '"just a string"'}, "not a JSON object", id="string"),
    pytest.param("null", {RAW_ARGUMENTS: "null"}, "not a JSON object", id="json_null"),
])
def test_chat_broken_arguments_are_repaired_or_wrapped(arguments: str, expected: dict[str, Any], warning: str) -> None:
    answer = chat_answer({"tool_calls": [{"id": "call_1", "type": "function",
                                          "function": {"name": "f", "arguments": arguments}}]}, "length")
    message, warnings = to_message(answer)
    block = message.content[0]
    assert block.type == "tool_use" and block.input == expected
    assert message.stop_reason == "max_tokens"
    assert len(warnings) == 1 and warning in warnings[0] and "call_1" in warnings[0]


def test_wrapped_arguments_travel_back_unchanged() -> None:
    # A wrapped input becomes the original arguments text again when it goes back to OpenAI
    message, _ = to_message(chat_answer({"tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1, 2"}}]}))
    back = message_to_chat(message.model_dump(), model="m", tool_names=ToolNames(), created=NOW)
    assert back.body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "[1, 2"


def test_refusal_becomes_text_and_stop_reason_refusal() -> None:
    message, _ = to_message(chat_answer({"refusal": "I can't help with that."}))
    assert message.stop_reason == "refusal"
    assert [b.model_dump(exclude_none=True) for b in message.content] == [
        {"type": "text", "text": "I can't help with that."}]


@pytest.mark.parametrize(("finish_reason", "has_calls", "stop_reason"), [
    ("stop", False, "end_turn"), ("length", False, "max_tokens"), ("tool_calls", True, "tool_use"),
    ("function_call", True, "tool_use"), ("content_filter", False, "refusal"),
    ("stop", True, "tool_use"),  # a forced tool_choice makes OpenAI answer "stop"
])
def test_finish_reason_to_stop_reason(finish_reason: str, has_calls: bool, stop_reason: str) -> None:
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}] if has_calls else []
    message, _ = to_message(chat_answer({"content": "", "tool_calls": calls or None}, finish_reason))
    assert message.stop_reason == stop_reason
    assert [b.type for b in message.content] == (["tool_use"] if has_calls else [])  # empty content omitted


def test_chat_names_are_restored_and_extra_choices_named() -> None:
    names = ToolNames()
    short = names.for_openai(LONG_NAME)
    answer = chat_answer({"tool_calls": [{"id": "c1", "type": "function",
                                          "function": {"name": short, "arguments": "{}"}}]}, "tool_calls")
    answer["choices"].append({**answer["choices"][0], "index": 1})
    message, warnings = to_message(answer, names)
    assert message.content[0].type == "tool_use" and message.content[0].name == LONG_NAME
    assert warnings == ["Only the first of several choices was kept: Anthropic answers hold one message."]


@pytest.mark.parametrize("answer", [
    None, {}, {"object": "chat.completion", "choices": []}, {"object": "chat.completion", "choices": [{}]},
    {"object": "chat.completion.chunk", "choices": [{"delta": {}, "message": {}}]},
    {"object": "chat.completion", "choices": "x"}, {"error": {"message": "boom"}},
])
def test_unrecognisable_chat_answers_are_untranslatable(answer: Any) -> None:
    with pytest.raises(Untranslatable) as raised:
        chat_to_message(answer, model="m", tool_names=ToolNames())
    assert raised.value.feature == "answer"


# --------------------------------------------------------------------------------------------------
# Round trip and hostile answers


IDENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=10)
TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=20)
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6)


@settings(max_examples=100, deadline=None)
@given(TEXT, st.lists(st.tuples(IDENT, IDENT, st.dictionaries(TEXT, JSON, max_size=3)), max_size=3),
       st.sampled_from(["end_turn", "max_tokens"]))
def test_answer_round_trip_keeps_meaning(text: str, calls: list[tuple[str, str, dict[str, Any]]],
                                         stop_reason: str) -> None:
    stop_reason = "tool_use" if calls and stop_reason == "end_turn" else stop_reason
    content = ([{"type": "text", "text": text}] if text else []) + [
        {"type": "tool_use", "id": f"toolu_{i}{cid}", "name": name, "input": args}
        for i, (cid, name, args) in enumerate(calls)]
    original = anthropic_answer(content, stop_reason)
    chat = message_to_chat(original, model="gpt-4o", tool_names=ToolNames(), created=NOW)
    ChatCompletion.model_validate(chat.body)
    back = chat_to_message(chat.body, model="claude-sonnet-4-5", tool_names=ToolNames())
    assert back.body["content"] == content
    assert back.body["stop_reason"] == stop_reason
    # OpenAI usage has no cache-write split: writes come back as plain input, the totals are kept
    usage = back.body["usage"]
    assert (usage["input_tokens"] + usage["cache_creation_input_tokens"], usage["cache_read_input_tokens"],
            usage["output_tokens"]) == (130, 50, 20)
    assert back.warnings == []


HOSTILE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT
    | st.sampled_from(["message", "chat.completion", "text", "tool_use", "thinking", "function", "assistant"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["id", "type", "object", "content", "choices", "message", "tool_calls", "function", "name",
                         "arguments", "input", "text", "usage", "stop_reason", "finish_reason", "refusal", "error",
                         "code", "message", "prompt_tokens", "input_tokens"]) | TEXT, inner, max_size=5),
    max_leaves=30)


@settings(max_examples=200, deadline=None)
@given(HOSTILE, st.integers(-1000, 1000) | st.sampled_from([400, 402, 429, 500, 529]))
def test_hostile_answers_and_errors_raise_only_untranslatable(answer: Any, status: int) -> None:
    for translate in (message_to_chat, chat_to_message):
        try:
            translate(answer, model="m", tool_names=ToolNames())
        except Untranslatable:
            pass
    for payload in (answer, {"error": answer}, {"type": "error", "error": answer}):
        assert isinstance(error_for_openai(status, payload)[1]["error"]["message"], str)
        assert isinstance(error_for_anthropic(status, payload)[1]["error"]["message"], str)
        assert isinstance(is_context_length_error(status, payload), bool)


# --------------------------------------------------------------------------------------------------
# Errors


def anthropic_error(kind: str, message: str = "boom") -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_1"}


def openai_error(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


@pytest.mark.parametrize(("status", "kind", "out_status", "out_type", "out_code"), [
    (400, "invalid_request_error", 400, "invalid_request_error", None),
    (401, "authentication_error", 401, "authentication_error", "invalid_api_key"),
    (402, "billing_error", 402, "billing_error", None),
    (403, "permission_error", 403, "permission_error", None),
    (404, "not_found_error", 404, "not_found_error", None),
    (413, "request_too_large", 413, "invalid_request_error", "request_too_large"),
    (429, "rate_limit_error", 429, "rate_limit_error", "rate_limit_exceeded"),
    (500, "api_error", 500, "server_error", None),
    (504, "timeout_error", 504, "server_error", "timeout"),
    (529, "overloaded_error", 503, "server_error", "overloaded"),
    (418, "teapot_error", 418, "invalid_request_error", None),
    (502, "mystery", 502, "server_error", None),
])
def test_anthropic_errors_for_openai_agents(status: int, kind: str, out_status: int, out_type: str,
                                            out_code: str | None) -> None:
    new_status, body = error_for_openai(status, anthropic_error(kind))
    assert new_status == out_status
    assert body == {"error": {"message": "boom", "type": out_type, "param": None, "code": out_code}}


@pytest.mark.parametrize(("status", "payload", "out_status", "out_type"), [
    (400, openai_error("bad", "invalid_request_error"), 400, "invalid_request_error"),
    (401, openai_error("bad key", "invalid_request_error", "invalid_api_key"), 401, "authentication_error"),
    (403, openai_error("region", "invalid_request_error", "unsupported_country_region_territory"), 403,
     "permission_error"),
    (404, openai_error("no model", "invalid_request_error", "model_not_found"), 404, "not_found_error"),
    (429, openai_error("slow down", "requests", "rate_limit_exceeded"), 429, "rate_limit_error"),
    (429, openai_error("You exceeded your current quota", "insufficient_quota", "insufficient_quota"), 402,
     "billing_error"),
    (500, openai_error("oops", "server_error"), 500, "api_error"),
    (503, openai_error("overloaded", "server_error"), 503, "overloaded_error"),
    (504, None, 504, "timeout_error"),
    (409, None, 409, "invalid_request_error"),
    (200, openai_error("odd", "x"), 502, "api_error"),
])
def test_openai_errors_for_anthropic_agents(status: int, payload: Any, out_status: int, out_type: str) -> None:
    new_status, body = error_for_anthropic(status, payload)
    assert new_status == out_status
    assert body["type"] == "error" and body["error"]["type"] == out_type
    expected = payload["error"]["message"] if payload else f"The upstream provider answered with status {status}."
    assert body["error"]["message"] == expected


def test_error_without_a_body_gets_a_message() -> None:
    status, body = error_for_openai(529, None)
    assert (status, body["error"]["type"], body["error"]["message"]) == (
        503, "server_error", "The upstream provider answered with status 529.")


OPENAI_TOO_LONG = openai_error("This model's maximum context length is 128000 tokens. However, your messages "
                               "resulted in 130000 tokens. Please reduce the length of the messages.",
                               "invalid_request_error", "context_length_exceeded")
ANTHROPIC_TOO_LONG = anthropic_error("invalid_request_error", "prompt is too long: 215000 tokens > 200000 maximum")


@pytest.mark.parametrize(("status", "payload", "expected"), [
    (400, OPENAI_TOO_LONG, True),
    (400, openai_error("This model's maximum context length is 8192 tokens.", "invalid_request_error"), True),
    (400, ANTHROPIC_TOO_LONG, True),
    (400, anthropic_error("invalid_request_error", "input length and `max_tokens` exceed context limit: "
                                                   "188240 + 21333 > 200000"), True),
    (400, anthropic_error("invalid_request_error", "messages: text content blocks must be non-empty"), False),
    (429, anthropic_error("rate_limit_error", "prompt is too long"), False),
    (400, openai_error("Invalid value for 'temperature'", "invalid_request_error", "invalid_value"), False),
    (400, None, False),
])
def test_context_length_detection(status: int, payload: Any, expected: bool) -> None:
    assert is_context_length_error(status, payload) is expected


def test_context_length_errors_keep_their_meaning_across() -> None:
    # An Anthropic "prompt is too long" reaches an OpenAI agent with OpenAI's code
    status, body = error_for_openai(400, ANTHROPIC_TOO_LONG)
    assert (status, body["error"]["code"]) == (400, "context_length_exceeded")
    assert body["error"]["message"] == "prompt is too long: 215000 tokens > 200000 maximum"
    # An OpenAI context_length_exceeded reaches an Anthropic agent as "prompt is too long: ..."
    status, body = error_for_anthropic(400, OPENAI_TOO_LONG)
    assert body["error"] == {"type": "invalid_request_error",
                             "message": "prompt is too long: " + OPENAI_TOO_LONG["error"]["message"]}
    assert is_context_length_error(status, body)
    assert json.loads(json.dumps(body)) == body
