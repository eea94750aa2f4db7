"""Responses API calls served by Anthropic: requests, answers and streams translate faithfully, the real openai
SDK accepts what comes back (plain, streamed, through its stream helper), and hostile input fails cleanly."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pydantic
import pytest
from aiohttp import web
from anthropic.types import message_create_params
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.responses import Response

from rungate.providers.metering import ResponsesStreamMeter
from rungate.providers.sse import SSEEvent, SSEParser, encode_event
from rungate.translate.common import ToolNames, Translated, Untranslatable
from rungate.translate.responses import MessagesToResponses, message_to_response, responses_to_messages
from rungate.usage import Usage

TARGET = "claude-sonnet-4-6"
AGENT_MODEL = "gpt-4o"
CREATED = 1767225600
ANTHROPIC_REQUEST = pydantic.TypeAdapter(message_create_params.MessageCreateParamsNonStreaming)


def translate(body: dict[str, Any]) -> Translated:
    return responses_to_messages(body, model=TARGET, max_tokens_default=4096)


def materialise(value: Any) -> Any:
    """Consume pydantic's lazy `Iterable` validators so every nested item really gets validated."""
    if isinstance(value, dict):
        return {key: materialise(item) for key, item in value.items()}
    if isinstance(value, list | tuple) or hasattr(value, "__next__"):
        return [materialise(item) for item in value]
    return value


def assert_valid_anthropic_request(body: dict[str, Any]) -> None:
    """The body conforms to the anthropic SDK's own request types (streaming flag aside)."""
    materialise(ANTHROPIC_REQUEST.validate_python({key: value for key, value in body.items() if key != "stream"}))


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


PNG = "iVBORw0KGgo="
PDF = "JVBERi0xLjQK"


# --------------------------------------------------------------------------------------------------
# 1. Requests


def test_string_input_becomes_one_user_turn_with_the_default_max_tokens() -> None:
    # Given a minimal Responses request
    # When it is translated for an Anthropic target
    result = translate({"model": AGENT_MODEL, "input": "Hello"})
    # Then it is a Messages request for the target model with the required max_tokens
    assert result.body == {"model": TARGET, "max_tokens": 4096, "messages": [user("Hello")]}
    assert result.warnings == []
    assert_valid_anthropic_request(result.body)


def test_instructions_and_system_and_developer_messages_become_the_system_blocks_in_order() -> None:
    body = {"model": AGENT_MODEL, "instructions": "Be brief.",
            "input": [{"role": "developer", "content": "Answer in French."},
                      {"role": "user", "content": "Hi"},
                      {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "No emoji."}]}]}
    result = translate(body)
    assert result.body["system"] == [{"type": "text", "text": "Be brief."},
                                     {"type": "text", "text": "Answer in French."},
                                     {"type": "text", "text": "No emoji."}]
    assert result.body["messages"] == [user("Hi")]
    assert_valid_anthropic_request(result.body)


def test_every_supported_item_and_part_type_is_carried() -> None:
    # Given an input list using every supported item and content-part type
    body = {"model": AGENT_MODEL, "input": [
        {"role": "user", "content": [
            {"type": "input_text", "text": "Look at these"},
            {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}", "detail": "high"},
            {"type": "input_image", "image_url": "https://example.com/cat.jpg"},
            {"type": "input_file", "filename": "spec.pdf", "file_data": f"data:application/pdf;base64,{PDF}"},
            {"type": "input_file", "file_url": "https://example.com/paper.pdf"},
            {"type": "input_file", "filename": "notes.txt", "file_data": "data:text/plain;base64,bm90ZXM="},
        ]},
        {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "lookup",
         "arguments": '{"q": "cat"}', "status": "completed"},
        {"type": "function_call_output", "call_id": "call_1",
         "output": [{"type": "input_text", "text": "a cat"},
                    {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}"}]},
        {"role": "user", "content": "Thanks"},
    ]}
    # When it is translated
    result = translate(body)
    # Then each item lands in the matching Anthropic turn and block
    assert result.body["messages"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "Look at these"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": PDF},
             "title": "spec.pdf"},
            {"type": "document", "source": {"type": "url", "url": "https://example.com/paper.pdf"}},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "notes"},
             "title": "notes.txt"},
        ]},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                          {"type": "tool_use", "id": "call_1", "name": "lookup",
                                           "input": {"q": "cat"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1",
             "content": [{"type": "text", "text": "a cat"},
                         {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]},
            {"type": "text", "text": "Thanks"}]},
    ]
    assert result.warnings == []
    assert_valid_anthropic_request(result.body)


def test_a_full_parallel_tool_loop_history_alternates_turns_with_results_first() -> None:
    # Given a history: question, two parallel calls, their outputs, an answer, a follow-up
    body = {"model": AGENT_MODEL, "input": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "function_call", "call_id": "call_a", "name": "weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "call.b", "name": "weather", "arguments": ""},
        {"type": "function_call_output", "call_id": "call_a", "output": "18C"},
        {"type": "function_call_output", "call_id": "call.b", "output": "24C"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Paris 18C, Rome 24C."}]},
        {"role": "user", "content": "And Oslo?"},
    ]}
    result = translate(body)
    # Then the calls are one assistant turn, the outputs one user turn, ids made Anthropic-safe on both sides
    assert result.body["messages"] == [
        user("Weather in Paris and Rome?"),
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "call_a", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_b", "name": "weather", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_a", "content": "18C"},
            {"type": "tool_result", "tool_use_id": "call_b", "content": "24C"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Paris 18C, Rome 24C."}]},
        user("And Oslo?"),
    ]
    assert_valid_anthropic_request(result.body)


def test_tool_results_go_before_user_text_in_a_merged_user_turn() -> None:
    body = {"model": AGENT_MODEL, "input": [
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"role": "user", "content": "by the way"},
        {"type": "function_call_output", "call_id": "c1", "output": "done"},
    ]}
    messages = translate(body).body["messages"]
    assert messages[1] == {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "done"},
                                                       {"type": "text", "text": "by the way"}]}


def test_unparseable_arguments_in_history_are_kept_as_raw_text_with_a_warning() -> None:
    body = {"model": AGENT_MODEL, "input": [
        {"role": "user", "content": "go"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"cut": "tru'},
        {"type": "function_call_output", "call_id": "c1", "output": "error"},
    ]}
    result = translate(body)
    assert result.body["messages"][1]["content"][0]["input"] == {"_raw_arguments": '{"cut": "tru'}
    assert any("_raw_arguments" in warning for warning in result.warnings)


WEATHER_TOOL = {"type": "function", "name": "weather", "description": "Current weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                               "additionalProperties": False},
                "strict": True}


def test_function_tools_become_anthropic_tools() -> None:
    bare = {"type": "function", "name": "ping", "parameters": None, "strict": False}
    result = translate({"model": AGENT_MODEL, "input": "hi", "tools": [WEATHER_TOOL, bare]})
    assert result.body["tools"] == [
        {"name": "weather", "description": "Current weather", "input_schema": WEATHER_TOOL["parameters"],
         "strict": True},
        {"name": "ping", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in result.body  # Anthropic's default is auto already
    assert_valid_anthropic_request(result.body)


@pytest.mark.parametrize(("tool_choice", "parallel", "expected"), [
    ("auto", None, {"type": "auto"}),
    ("none", None, {"type": "none"}),
    ("required", None, {"type": "any"}),
    ({"type": "function", "name": "weather"}, None, {"type": "tool", "name": "weather"}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    ({"type": "function", "name": "weather"}, False, {"type": "tool", "name": "weather",
                                                      "disable_parallel_tool_use": True}),
    ("none", False, {"type": "none"}),
    (None, True, None),
])
def test_tool_choice_variants(tool_choice: Any, parallel: bool | None, expected: dict[str, Any] | None) -> None:
    body: dict[str, Any] = {"model": AGENT_MODEL, "input": "hi", "tools": [WEATHER_TOOL]}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    result = translate(body)
    assert result.body.get("tool_choice") == expected
    assert_valid_anthropic_request(result.body)


def test_a_forcing_tool_choice_without_tools_is_dropped_with_a_warning() -> None:
    result = translate({"model": AGENT_MODEL, "input": "hi", "tool_choice": "required"})
    assert "tool_choice" not in result.body
    assert any("tool_choice" in warning for warning in result.warnings)


def test_sampling_limits_stream_format_and_identity_are_mapped() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    body = {"model": AGENT_MODEL, "input": "hi", "max_output_tokens": 300, "temperature": 1.5, "top_p": 0.9,
            "stream": True, "safety_identifier": "user-42",
            "text": {"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}}}
    result = translate(body)
    assert result.body["max_tokens"] == 300
    assert result.body["temperature"] == 1.0
    assert "top_p" not in result.body
    assert result.body["stream"] is True
    assert result.body["metadata"] == {"user_id": "user-42"}
    assert result.body["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert any("temperature" in warning for warning in result.warnings)
    assert any(warning.startswith("top_p dropped") for warning in result.warnings)
    assert_valid_anthropic_request(result.body)


def test_top_p_alone_is_kept() -> None:
    assert translate({"model": AGENT_MODEL, "input": "hi", "top_p": 0.5}).body["top_p"] == 0.5


def test_metadata_other_known_and_unknown_keys_are_dropped_with_warnings_naming_them() -> None:
    body = {"model": AGENT_MODEL, "input": "hi", "metadata": {"run": "7"}, "store": True,
            "reasoning": {"effort": "high"}, "truncation": "disabled", "frobnicate": 1, "zap": None}
    result = translate(body)
    assert "metadata" not in result.body
    assert any(warning.startswith("metadata dropped") for warning in result.warnings)
    assert any(warning.startswith("store dropped") for warning in result.warnings)
    assert any(warning.startswith("reasoning dropped") for warning in result.warnings)
    assert not any(warning.startswith("truncation") for warning in result.warnings)  # "disabled" asks for nothing
    assert "unknown request keys dropped: frobnicate, zap" in result.warnings


def test_reasoning_items_without_encrypted_content_are_dropped_with_a_warning() -> None:
    body = {"model": AGENT_MODEL, "input": [
        {"role": "user", "content": "hi"},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "thinking"}]},
        {"role": "assistant", "content": "hello"}]}
    result = translate(body)
    assert [turn["role"] for turn in result.body["messages"]] == ["user", "assistant"]
    assert any(warning.startswith("reasoning dropped") for warning in result.warnings)


@pytest.mark.parametrize(("change", "feature"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"background": True}, "background"),
    ({"n": 2}, "n > 1"),
    ({"top_logprobs": 3}, "logprobs"),
    ({"include": ["message.output_text.logprobs"]}, "logprobs"),
    ({"tools": [{"type": "web_search"}]}, "built-in tool web_search"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "built-in tool file_search"),
    ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "built-in tool code_interpreter"),
    ({"tools": [{"type": "computer_use_preview", "display_width": 1, "display_height": 1,
                 "environment": "linux"}]}, "built-in tool computer_use_preview"),
    ({"tools": [{"type": "mcp", "server_label": "x", "server_url": "https://x"}]}, "built-in tool mcp"),
    ({"tools": [{"type": "custom", "name": "grammar_tool"}]}, "built-in tool custom"),
    ({"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}}, "tool_choice allowed_tools"),
    ({"text": {"format": {"type": "json_object"}}}, "json_object"),
    ({"input": [{"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"}]},
     "encrypted reasoning"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]},
     "input_file file_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
     "input_image file_id"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "item_reference"),
    ({"input": [{"type": "web_search_call", "id": "ws_1", "status": "completed"}]}, "input item web_search_call"),
    ({"input": [{"role": "user", "content": [{"type": "input_image",
                                              "image_url": "data:image/bmp;base64,Qk0="}]}]}, "image type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "role"),
    ({"input": ""}, "input"),
])
def test_what_anthropic_cannot_carry_is_untranslatable(change: dict[str, Any], feature: str) -> None:
    # Given a request using something Anthropic has no equivalent for
    body = {"model": AGENT_MODEL, "input": "hi", **change}
    # When it is translated, Then it is refused naming the feature
    with pytest.raises(Untranslatable) as caught:
        translate(body)
    assert caught.value.feature == feature


# --------------------------------------------------------------------------------------------------
# 2. Answers, validated with the real openai SDK model


def anthropic_message(content: list[dict[str, Any]], stop_reason: str = "end_turn", **usage: int) -> dict[str, Any]:
    counts = {"input_tokens": 10, "output_tokens": 20, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    return {"id": "msg_01XYZ", "type": "message", "role": "assistant", "model": TARGET, "content": content,
            "stop_reason": stop_reason, "stop_sequence": None, "usage": {**counts, **usage}}


def test_an_answer_with_text_tool_calls_and_cache_usage_is_a_valid_response() -> None:
    # Given an Anthropic answer with thinking, text and two tool calls, and cache reads and writes
    answer = anthropic_message([
        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
        {"type": "text", "text": "Let me check ", "citations": None},
        {"type": "text", "text": "both."},
        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {"city": "Rome", "days": [1, 2]}},
    ], stop_reason="tool_use", cache_read_input_tokens=100, cache_creation_input_tokens=50)
    # When it is translated and validated by the openai SDK
    result = message_to_response(answer, model=AGENT_MODEL, tool_names=ToolNames(), created=CREATED)
    response = Response.model_validate(result.body)
    # Then the agent sees its own model, the text, both calls and usage counting every input token
    assert response.status == "completed"
    assert response.model == AGENT_MODEL
    assert response.created_at == CREATED
    assert response.output_text == "Let me check both."
    calls = [item for item in response.output if item.type == "function_call"]
    assert [(call.call_id, call.name, json.loads(call.arguments)) for call in calls] == [
        ("toolu_1", "weather", {"city": "Paris"}), ("toolu_2", "weather", {"city": "Rome", "days": [1, 2]})]
    assert calls[0].arguments == '{"city":"Paris"}'  # compact JSON
    assert all(call.status == "completed" for call in calls)
    assert response.usage is not None
    assert response.usage.input_tokens == 160
    assert response.usage.input_tokens_details.cached_tokens == 100
    assert response.usage.input_tokens_details.cache_write_tokens == 50
    assert response.usage.output_tokens == 20
    assert response.usage.total_tokens == 180
    assert [item.type for item in response.output] == ["message", "function_call", "function_call"]
    assert any("thinking" in warning for warning in result.warnings)


def test_a_truncated_answer_is_incomplete_with_max_output_tokens() -> None:
    answer = anthropic_message([{"type": "text", "text": "Once upon a"}], stop_reason="max_tokens")
    response = Response.model_validate(message_to_response(answer, model=AGENT_MODEL, tool_names=ToolNames()).body)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "Once upon a"


def test_tool_names_shortened_on_the_way_out_are_restored() -> None:
    names = ToolNames()
    short = names.for_openai("x" * 100)
    answer = anthropic_message([{"type": "tool_use", "id": "toolu_1", "name": short, "input": {}}], "tool_use")
    body = message_to_response(answer, model=AGENT_MODEL, tool_names=names).body
    assert body["output"][0]["name"] == "x" * 100
    assert body["output"][0]["arguments"] == "{}"


def test_an_answer_with_only_tool_calls_has_no_message_item() -> None:
    answer = anthropic_message([{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}], "tool_use")
    response = Response.model_validate(message_to_response(answer, model=AGENT_MODEL, tool_names=ToolNames()).body)
    assert [item.type for item in response.output] == ["function_call"]
    assert response.output_text == ""


@pytest.mark.parametrize("answer", [
    None, [], "text", {"type": "error", "error": {"type": "api_error", "message": "boom"}},
    {"type": "message", "content": "not a list"},
    {"type": "message", "content": [{"type": "text", "text": 5}]},
    {"type": "message", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": "x"}]},
    {"type": "message", "content": ["block"]},
])
def test_what_is_not_a_message_is_untranslatable(answer: Any) -> None:
    with pytest.raises(Untranslatable):
        message_to_response(answer, model=AGENT_MODEL, tool_names=ToolNames())


# --------------------------------------------------------------------------------------------------
# Anthropic streams


def sse(payload: dict[str, Any]) -> SSEEvent:
    events = SSEParser().feed(encode_event(orjson.dumps(payload).decode(), str(payload["type"])))
    assert len(events) == 1
    return events[0]


def anthropic_stream(text: list[str] = (), calls: list[tuple[str, str, list[str]]] = (), *,  # type: ignore[assignment]
                     stop_reason: str = "end_turn", thinking: bool = False, error_after: int | None = None,
                     ) -> list[SSEEvent]:
    """An upstream Messages stream: optional thinking, a text block, then tool_use blocks."""
    payloads = anthropic_payloads(text, calls, stop_reason=stop_reason, thinking=thinking)
    if error_after is not None:
        payloads = payloads[:error_after] + [
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}]
    return [sse(payload) for payload in payloads]


def anthropic_payloads(text: list[str], calls: list[tuple[str, str, list[str]]], *, stop_reason: str,
                       thinking: bool = False) -> list[dict[str, Any]]:
    """The data objects of an upstream Messages stream, in order."""
    start_usage = {"input_tokens": 12, "cache_creation_input_tokens": 30, "cache_read_input_tokens": 200,
                   "output_tokens": 1}
    payloads: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"id": "msg_01STREAM", "type": "message", "role": "assistant",
                                              "content": [], "model": TARGET, "stop_reason": None,
                                              "stop_sequence": None, "usage": start_usage}},
        {"type": "ping"}]
    index = 0
    if thinking:
        payloads += [{"type": "content_block_start", "index": index,
                      "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
                     {"type": "content_block_delta", "index": index,
                      "delta": {"type": "thinking_delta", "thinking": "pondering"}},
                     {"type": "content_block_delta", "index": index,
                      "delta": {"type": "signature_delta", "signature": "c2ln"}},
                     {"type": "content_block_stop", "index": index}]
        index += 1
    if text:
        payloads.append({"type": "content_block_start", "index": index,
                         "content_block": {"type": "text", "text": "", "citations": None}})
        payloads += [{"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}}
                     for piece in text]
        payloads.append({"type": "content_block_stop", "index": index})
        index += 1
    for call_id, name, fragments in calls:
        payloads.append({"type": "content_block_start", "index": index,
                         "content_block": {"type": "tool_use", "id": call_id, "name": name, "input": {}}})
        payloads += [{"type": "content_block_delta", "index": index,
                      "delta": {"type": "input_json_delta", "partial_json": piece}} for piece in ["", *fragments]]
        payloads.append({"type": "content_block_stop", "index": index})
        index += 1
    payloads += [{"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                  "usage": {"output_tokens": 42}},
                 {"type": "message_stop"}]
    return payloads


def translate_stream(events: list[SSEEvent], names: ToolNames | None = None) -> tuple[bytes, MessagesToResponses]:
    translator = MessagesToResponses(model=AGENT_MODEL, tool_names=names or ToolNames(), created=CREATED)
    out = b"".join(chunk for event in events for chunk in translator.feed(event))
    return out, translator


def parsed(stream: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    parser = SSEParser()
    return [(event.event, json.loads(event.data)) for event in parser.feed(stream) + parser.flush()]


def test_a_stream_emits_the_responses_event_sequence_with_matching_names_and_sequence_numbers() -> None:
    # Given an upstream stream with thinking, text and a tool call
    stream, translator = translate_stream(anthropic_stream(["Hel", "lo"], [("toolu_9", "lookup", ['{"q":', '"x"}'])],
                                                           stop_reason="tool_use", thinking=True))
    events = parsed(stream)
    # Then every event names itself, numbers count up from 0 and the order is the Responses one
    assert all(name == payload["type"] for name, payload in events)
    assert [payload["sequence_number"] for _, payload in events] == list(range(len(events)))
    assert [name for name, _ in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert translator.finished and translator.text == "Hello"
    assert any("thinking" in warning for warning in translator.warnings)
    final = Response.model_validate(events[-1][1]["response"])
    assert final.id == events[0][1]["response"]["id"]
    assert final.output_text == "Hello"
    assert final.usage is not None and final.usage.input_tokens == 242 and final.usage.output_tokens == 42


def test_the_project_meter_reads_the_translated_stream() -> None:
    stream, _ = translate_stream(anthropic_stream(["Hi"], [("toolu_1", "f", ['{"a":1}'])], stop_reason="tool_use"))
    meter = ResponsesStreamMeter()
    for event in SSEParser().feed(stream):
        assert meter.feed(event)
    assert meter.done
    # OpenAI usage cannot tell cache writes apart: the meter sees them as uncached input (cost the upstream stream)
    assert meter.usage == Usage(input=12 + 30, cached=200, output=42)
    assert [(call.id, call.name, call.arguments) for call in meter.tool_calls] == [("toolu_1", "f", '{"a":1}')]


def test_a_call_without_argument_fragments_gets_empty_object_arguments() -> None:
    stream, _ = translate_stream(anthropic_stream([], [("toolu_1", "now", [])], stop_reason="tool_use"))
    events = parsed(stream)
    deltas = [payload["delta"] for name, payload in events if name == "response.function_call_arguments.delta"]
    final = Response.model_validate(events[-1][1]["response"])
    assert deltas == ["{}"]
    assert final.output[0].type == "function_call" and final.output[0].arguments == "{}"


def test_a_truncated_stream_ends_with_response_incomplete() -> None:
    stream, translator = translate_stream(anthropic_stream(["Once upon"], stop_reason="max_tokens"))
    name, payload = parsed(stream)[-1]
    assert name == "response.incomplete"
    response = Response.model_validate(payload["response"])
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert translator.finished


def test_an_upstream_error_becomes_a_responses_error_event_and_ends_the_translation() -> None:
    events = anthropic_stream(["partial"], error_after=4)
    stream, translator = translate_stream([*events, *anthropic_stream(["ignored"])[2:]])
    name, payload = parsed(stream)[-1]
    assert name == "error"
    assert payload["message"] == "Overloaded" and payload["code"] == "server_error" and payload["param"] is None
    assert payload["error"]["message"] == "Overloaded"
    assert translator.failed and not translator.finished
    assert translator.text == "partial"


@pytest.mark.parametrize("data", ["{not json", "[1, 2]", '"text"'])
def test_malformed_upstream_data_is_a_value_error(data: str) -> None:
    translator = MessagesToResponses(model=AGENT_MODEL, tool_names=ToolNames())
    with pytest.raises(ValueError):
        translator.feed(SSEEvent(raw=b"", event="content_block_delta", data=data, is_comment=False))


def test_pings_comments_and_unknown_events_produce_nothing() -> None:
    translator = MessagesToResponses(model=AGENT_MODEL, tool_names=ToolNames())
    assert translator.feed(sse({"type": "ping"})) == []
    assert translator.feed(SSEEvent(raw=b": keepalive\n\n", event=None, data="", is_comment=True)) == []
    assert translator.feed(sse({"type": "brand_new_event", "x": 1})) == []


def test_content_before_message_start_is_a_broken_stream() -> None:
    translator = MessagesToResponses(model=AGENT_MODEL, tool_names=ToolNames())
    with pytest.raises(ValueError):
        translator.feed(sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}}))


# --------------------------------------------------------------------------------------------------
# 3. The real openai SDK against a tiny server speaking the translated format

UPSTREAM = web.AppKey("upstream", dict)


async def responses_endpoint(request: web.Request) -> web.StreamResponse:
    """Translates the SDK's request for Anthropic, then answers with the scripted upstream answer translated back."""
    state = request.app[UPSTREAM]
    body = await request.json()
    translated = translate(body)
    state["requests"].append(translated.body)
    if not body.get("stream"):
        answer = message_to_response(state["message"], model=body["model"], tool_names=translated.tool_names)
        return web.json_response(answer.body)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    translator = MessagesToResponses(model=body["model"], tool_names=translated.tool_names)
    for event in state["events"]:
        for chunk in translator.feed(event):
            await response.write(chunk)
    await response.write_eof()
    return response


@pytest.fixture
async def sdk(aiohttp_server: Any) -> AsyncIterator[tuple[openai.AsyncOpenAI, dict[str, Any]]]:
    app = web.Application()
    state: dict[str, Any] = {"requests": [], "events": [], "message": None}
    app[UPSTREAM] = state
    app.router.add_post("/v1/responses", responses_endpoint)
    server = await aiohttp_server(app)
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="x", max_retries=0)
    yield client, state
    await client.close()


SDK_TOOLS: list[Any] = [WEATHER_TOOL]


async def test_sdk_plain_call_round_trips_through_both_translations(sdk: Any) -> None:
    client, state = sdk
    state["message"] = anthropic_message(
        [{"type": "text", "text": "Checking."},
         {"type": "tool_use", "id": "toolu_7", "name": "weather", "input": {"city": "Oslo"}}],
        stop_reason="tool_use", cache_read_input_tokens=5)
    response = await client.responses.create(model=AGENT_MODEL, input="Weather in Oslo?", instructions="Be brief.",
                                             tools=SDK_TOOLS, tool_choice="required", max_output_tokens=64)
    sent = state["requests"][0]
    assert sent["system"] == [{"type": "text", "text": "Be brief."}]
    assert sent["tool_choice"] == {"type": "any"} and sent["max_tokens"] == 64
    assert_valid_anthropic_request(sent)
    assert response.output_text == "Checking."
    call = response.output[1]
    assert call.type == "function_call" and call.call_id == "toolu_7" and json.loads(call.arguments) == {"city": "Oslo"}
    assert response.usage is not None and response.usage.input_tokens == 15
    assert response.usage.input_tokens_details.cached_tokens == 5


async def test_sdk_create_stream_yields_typed_events_ending_in_completed(sdk: Any) -> None:
    client, state = sdk
    state["events"] = anthropic_stream(["Sun", "ny."], [("toolu_3", "weather", ['{"city"', ':"Rome"}'])],
                                       stop_reason="tool_use", thinking=True)
    stream = await client.responses.create(model=AGENT_MODEL, input="Weather?", tools=SDK_TOOLS, stream=True)
    events = [event async for event in stream]
    assert state["requests"][0]["stream"] is True
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    done = [event for event in events if event.type == "response.function_call_arguments.done"]
    final = events[-1]
    assert deltas == "Sunny."
    assert [json.loads(event.arguments) for event in done] == [{"city": "Rome"}]
    assert final.type == "response.completed"
    assert final.response.status == "completed"
    assert final.response.output_text == "Sunny."
    call = final.response.output[1]
    assert call.type == "function_call" and call.call_id == "toolu_3" and call.name == "weather"
    assert final.response.usage is not None
    assert final.response.usage.input_tokens == 242
    assert final.response.usage.input_tokens_details.cached_tokens == 200
    assert final.response.usage.output_tokens == 42


async def test_sdk_stream_helper_assembles_the_final_response(sdk: Any) -> None:
    client, state = sdk
    state["events"] = anthropic_stream(["It is ", "raining."], [("toolu_4", "weather", ['{"city":"Bergen"}'])],
                                       stop_reason="tool_use")
    async with client.responses.stream(model=AGENT_MODEL, input="Weather?", tools=SDK_TOOLS) as stream:
        final = await stream.get_final_response()
    assert final.status == "completed"
    assert final.output_text == "It is raining."
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(call.call_id, call.name, call.arguments) for call in calls] == [
        ("toolu_4", "weather", '{"city":"Bergen"}')]
    assert calls[0].parsed_arguments == {"city": "Bergen"}  # strict tool: the helper parsed the arguments
    assert final.usage is not None and final.usage.total_tokens == 242 + 42


async def test_sdk_raises_on_an_upstream_error_mid_stream(sdk: Any) -> None:
    client, state = sdk
    state["events"] = anthropic_stream(["partial"], error_after=4)
    stream = await client.responses.create(model=AGENT_MODEL, input="hi", stream=True)
    seen: list[str] = []
    with pytest.raises(openai.APIError, match="Overloaded"):
        async for event in stream:
            seen.append(event.type)
    assert "response.output_text.delta" in seen


async def test_sdk_stream_helper_raises_on_an_upstream_error(sdk: Any) -> None:
    client, state = sdk
    state["events"] = anthropic_stream(["partial"], error_after=3)
    with pytest.raises(openai.APIError, match="Overloaded"):
        async with client.responses.stream(model=AGENT_MODEL, input="hi") as stream:
            await stream.get_final_response()


# --------------------------------------------------------------------------------------------------
# 4. Properties

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
JSON_OBJECTS = st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=4)


@st.composite
def split(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=6))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@st.composite
def answers(draw: st.DrawFn) -> tuple[list[str], list[tuple[str, str, dict[str, Any], list[str]]]]:
    text = draw(st.lists(st.text(max_size=8), max_size=6))
    calls = []
    for index in range(draw(st.integers(0, 3))):
        arguments = draw(JSON_OBJECTS)
        calls.append((f"toolu_{index}", draw(st.from_regex(r"[a-z_]{1,12}", fullmatch=True)), arguments,
                      draw(split(json.dumps(arguments)))))
    return text, calls


@settings(max_examples=200, deadline=None)
@given(answers())
def test_streamed_text_and_arguments_arrive_whole(answer: tuple[list[str], list[Any]]) -> None:
    # Given text split into deltas and tool calls whose JSON arguments are split into fragments
    text, calls = answer
    events = anthropic_stream(text, [(call_id, name, fragments) for call_id, name, _, fragments in calls],
                              stop_reason="tool_use" if calls else "end_turn")
    # When the stream is translated
    stream, translator = translate_stream(events)
    out = parsed(stream)
    # Then the final response carries exactly the text and the argument objects
    final = Response.model_validate(out[-1][1]["response"])
    assert final.output_text == "".join(text) == translator.text
    got = [(item.call_id, item.name, json.loads(item.arguments)) for item in final.output
           if item.type == "function_call"]
    assert got == [(call_id, name, arguments) for call_id, name, arguments, _ in calls]
    # And the deltas the agent saw add up to the same arguments
    deltas: dict[str, str] = {}
    for name, payload in out:
        if name == "response.function_call_arguments.delta":
            deltas[payload["item_id"]] = deltas.get(payload["item_id"], "") + payload["delta"]
    assert [deltas[item.id or ""] for item in final.output if item.type == "function_call"] == [
        item.arguments for item in final.output if item.type == "function_call"]


# Hostile input: mostly valid shapes with wrong values anywhere, so the fuzz reaches deep into the translators.

FUZZ = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.sampled_from(["type", "text", "role", "id", "name", "input"])
                                      | st.text(max_size=3), inner, max_size=3), max_leaves=6)


def sometimes(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly `valid`, one time in ten any JSON value."""
    return st.integers(0, 9).flatmap(lambda roll: FUZZ if roll == 0 else valid)


NAMES = st.from_regex(r"[a-z_]{1,8}", fullmatch=True)
URLS = st.sampled_from([f"data:image/png;base64,{PNG}", "data:image/bmp;base64,AA", "https://x.test/a.png",
                        f"data:application/pdf;base64,{PDF}", "data:text/plain;base64,@@", "ftp://x", PDF])
PARTS = st.fixed_dictionaries(
    {"type": sometimes(st.sampled_from(["input_text", "output_text", "refusal", "input_image", "input_file"]))},
    optional={"text": sometimes(st.text(max_size=5)), "refusal": sometimes(st.text(max_size=5)),
              "image_url": sometimes(URLS), "file_data": sometimes(URLS), "file_url": sometimes(URLS),
              "file_id": st.none() | FUZZ, "filename": sometimes(st.text(max_size=5))})
ITEMS = st.fixed_dictionaries(
    {"type": sometimes(st.sampled_from(["message", "function_call", "function_call_output", "reasoning"])),
     "role": sometimes(st.sampled_from(["user", "assistant", "system", "developer"])),
     "call_id": sometimes(NAMES), "name": sometimes(NAMES)},
    optional={              "content": sometimes(st.text(max_size=5) | st.lists(sometimes(PARTS), max_size=3)),
              "arguments": sometimes(JSON_OBJECTS.map(json.dumps) | st.text(max_size=5)),
              "output": sometimes(st.text(max_size=5) | st.lists(sometimes(PARTS), max_size=3)),
              "encrypted_content": st.none() | FUZZ})
TOOLS = st.fixed_dictionaries(
    {"type": sometimes(st.just("function")), "name": sometimes(NAMES)},
    optional={"parameters": st.none() | sometimes(JSON_OBJECTS), "description": sometimes(st.text(max_size=5)),
              "strict": sometimes(st.booleans())})
FORMATS = st.fixed_dictionaries({"type": sometimes(st.sampled_from(["text", "json_schema", "json_object"]))},
                                optional={"schema": sometimes(JSON_OBJECTS)})
REQUESTS = st.fixed_dictionaries(
    {"model": st.just(AGENT_MODEL),
     "input": sometimes(st.text(min_size=1, max_size=5) | st.lists(sometimes(ITEMS), min_size=1, max_size=5))},
    optional={"instructions": sometimes(st.text(max_size=5)),
              "tools": sometimes(st.lists(sometimes(TOOLS), max_size=3)),
              "tool_choice": sometimes(st.sampled_from(["auto", "none", "required",
                                                        {"type": "function", "name": "f"}])),
              "parallel_tool_calls": sometimes(st.booleans()), "max_output_tokens": sometimes(st.integers(-2, 9000)),
              "temperature": sometimes(st.floats(-1, 3)), "top_p": sometimes(st.floats(-1, 2)),
              "stream": sometimes(st.booleans()), "metadata": FUZZ, "user": sometimes(st.text(max_size=5)),
              "text": sometimes(st.fixed_dictionaries({"format": sometimes(FORMATS)})),
              "include": FUZZ, "store": FUZZ, "reasoning": FUZZ, "n": sometimes(st.just(1)),
              "background": sometimes(st.just(False))})


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(REQUESTS | FUZZ)
def test_hostile_requests_translate_or_are_untranslatable(body: Any) -> None:
    # Given any request, When it is translated, Then it is a valid Anthropic request or refused cleanly
    try:
        result = translate(body)
    except Untranslatable:
        return
    assert_valid_anthropic_request(result.body)


BLOCKS = st.fixed_dictionaries(
    {"type": sometimes(st.sampled_from(["text", "tool_use", "thinking", "server_tool_use"])),
     "text": sometimes(st.text(max_size=5)), "id": sometimes(NAMES), "name": sometimes(NAMES),
     "input": sometimes(JSON_OBJECTS)},
    optional={"citations": st.none() | FUZZ})
ANSWERS = st.fixed_dictionaries(
    {"type": sometimes(st.just("message")), "content": sometimes(st.lists(sometimes(BLOCKS), max_size=4))},
    optional={"id": sometimes(NAMES), "stop_reason": sometimes(st.sampled_from(["end_turn", "max_tokens", "refusal"])),
              "usage": sometimes(st.fixed_dictionaries({}, optional={
                  key: sometimes(st.integers(0, 99)) for key in ("input_tokens", "output_tokens",
                                                                 "cache_read_input_tokens")}))})


@settings(max_examples=300, deadline=None)
@given(ANSWERS | FUZZ)
def test_hostile_answers_translate_or_are_untranslatable(answer: Any) -> None:
    try:
        result = message_to_response(answer, model=AGENT_MODEL, tool_names=ToolNames(), created=CREATED)
    except Untranslatable:
        return
    Response.model_validate(result.body)


def corrupt(payload: Any, path_choice: int, replacement: Any) -> Any:
    """`payload` with one nested value (picked by `path_choice`) replaced."""
    spots: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key in node:
                spots.append((node, key))
                walk(node[key])
        elif isinstance(node, list):
            for index in range(len(node)):
                spots.append((node, index))
                walk(node[index])

    copy = json.loads(json.dumps(payload))
    walk(copy)
    if not spots:
        return replacement
    container, key = spots[path_choice % len(spots)]
    container[key] = replacement
    return copy


@st.composite
def hostile_streams(draw: st.DrawFn) -> list[str]:
    text, calls = draw(answers())
    payloads: list[Any] = anthropic_payloads(text, [(c, n, f) for c, n, _, f in calls],
                                             stop_reason=draw(st.sampled_from(["end_turn", "max_tokens"])),
                                             thinking=draw(st.booleans()))
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, len(payloads) - 1))
        operation = draw(st.sampled_from(["corrupt", "drop", "duplicate", "swap", "insert"]))
        if operation == "corrupt":
            payloads[position] = corrupt(payloads[position], draw(st.integers(0, 50)), draw(FUZZ))
        elif operation == "drop" and len(payloads) > 1:
            del payloads[position]
        elif operation == "duplicate":
            payloads.insert(position, payloads[position])
        elif operation == "swap":
            other = draw(st.integers(0, len(payloads) - 1))
            payloads[position], payloads[other] = payloads[other], payloads[position]
        else:
            payloads.insert(position, draw(FUZZ))
    return [json.dumps(payload) for payload in payloads] + draw(st.lists(st.text(max_size=4), max_size=1))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_streams())
def test_hostile_streams_translate_or_raise_value_error(datas: list[str]) -> None:
    # Given a stream with events dropped, repeated, reordered or with wrong values inside
    translator = MessagesToResponses(model=AGENT_MODEL, tool_names=ToolNames(), created=CREATED)
    out: list[bytes] = []
    # When it is translated, Then only ValueError may come out, and what was emitted is well framed
    try:
        for data in datas:
            out += translator.feed(SSEEvent(raw=b"", event=None, data=data, is_comment=False))
    except ValueError:
        pass
    events = parsed(b"".join(out))
    assert [payload["sequence_number"] for _, payload in events] == list(range(len(events)))
    assert all(name == payload["type"] for name, payload in events)
    if translator.finished:
        Response.model_validate(events[-1][1]["response"])
