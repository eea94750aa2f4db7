"""Request translation between OpenAI Chat Completions and Anthropic Messages (provider-formats.md 3.1, 3.7)."""

from __future__ import annotations

import copy
import json
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rungate.translate.common import RAW_ARGUMENTS, Translated, Untranslatable
from rungate.translate.requests import PLACEHOLDER_USER, chat_to_messages, messages_to_chat, with_prefill

USER = {"role": "user", "content": "hi"}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
A_TOOL = {"name": "get_weather", "description": "Weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
PNG = "iVBORw0KGgo="
OBJECT = {"type": "object"}
LONG_NAME = "mcp__workspace_server__" + "very_long_tool_name_" * 4  # 103 characters: fine for Anthropic only


def to_messages(fields: dict[str, Any], default: int = 1000) -> Translated:
    """Translate an OpenAI request made of `fields` (messages default to one user turn)."""
    return chat_to_messages({"model": "gpt-4o", "messages": [USER], **fields}, model="claude-x",
                            max_tokens_default=default)


def to_chat(fields: dict[str, Any]) -> Translated:
    """Translate an Anthropic request made of `fields` (messages default to one user turn)."""
    return messages_to_chat({"model": "claude-x", "max_tokens": 1000, "messages": [USER], **fields}, model="gpt-4o")


def subset(body: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    return {key: body.get(key) for key in expected}


def assert_warned(translated: Translated, fragment: str | None) -> None:
    if fragment is None:
        assert translated.warnings == []
    else:
        assert any(fragment in warning for warning in translated.warnings), translated.warnings


# --------------------------------------------------------------------------------------------------
# OpenAI -> Anthropic: top-level fields


@pytest.mark.parametrize(("fields", "expected", "warning"), [
    pytest.param({}, {"model": "claude-x", "max_tokens": 1000, "stream": None}, None, id="defaults"),
    pytest.param({"max_tokens": 50}, {"max_tokens": 50}, None, id="max_tokens"),
    pytest.param({"max_tokens": 50, "max_completion_tokens": 70}, {"max_tokens": 70}, None, id="max_completion_wins"),
    pytest.param({"max_completion_tokens": None, "max_tokens": 40}, {"max_tokens": 40}, None, id="null_is_absent"),
    pytest.param({"stream": True, "stream_options": {"include_usage": True}},
                 {"stream": True, "stream_options": None}, None, id="stream_options_dropped"),
    pytest.param({"temperature": 0.3, "top_p": 0.9}, {"temperature": 0.3, "top_p": 0.9}, None, id="sampling_kept"),
    pytest.param({"temperature": 1.7}, {"temperature": 1}, "clamped", id="temperature_clamped"),
    pytest.param({"stop": "END"}, {"stop_sequences": ["END"]}, None, id="stop_string"),
    pytest.param({"stop": ["a", "  ", "b"]}, {"stop_sequences": ["a", "b"]}, "Whitespace-only", id="stop_blank"),
    pytest.param({"user": "u-1"}, {"metadata": {"user_id": "u-1"}}, None, id="user"),
    pytest.param({"user": "u-1", "safety_identifier": "s-1"}, {"metadata": {"user_id": "s-1"}}, None,
                 id="safety_identifier_wins"),
    pytest.param({"seed": 7, "frequency_penalty": 0.5, "presence_penalty": 0, "logit_bias": {"1": 2}},
                 {"seed": None, "logit_bias": None}, "Anthropic has no equivalent of seed, frequency_penalty, "
                 "logit_bias", id="knobs_dropped"),
    pytest.param({"metadata": {"k": "v"}}, {"metadata": None}, "no equivalent of metadata", id="metadata_dropped"),
    pytest.param({"n": 1, "logprobs": False}, {"n": None}, None, id="neutral_values_silent"),
    pytest.param({"frobnicate": 1, "zeta": 2}, {"frobnicate": None}, "Unknown request fields were dropped: "
                 "frobnicate, zeta", id="unknown_fields"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": OBJECT}}},
                 {"output_config": {"format": {"type": "json_schema", "schema": OBJECT}}}, None, id="json_schema"),
    pytest.param({"response_format": {"type": "text"}}, {"output_config": None}, None, id="response_format_text"),
    pytest.param({"response_format": {"type": "json_object"}}, {"output_config": None}, "json_object",
                 id="json_object_dropped"),
    pytest.param({"reasoning_effort": "medium"}, {"thinking": None, "max_tokens": 1000}, "no room to think",
                 id="effort_beyond_a_small_default"),
    pytest.param({"reasoning_effort": "high", "max_completion_tokens": 20000},
                 {"thinking": {"type": "enabled", "budget_tokens": 16384}, "max_tokens": 20000}, None,
                 id="effort_within_limit"),
    pytest.param({"reasoning_effort": "high", "max_completion_tokens": 4000},
                 {"thinking": {"type": "enabled", "budget_tokens": 2000}, "max_tokens": 4000}, None,
                 id="effort_budget_below_max_tokens"),
    pytest.param({"reasoning_effort": "low", "max_tokens": 1500}, {"thinking": None, "max_tokens": 1500},
                 "no room to think", id="effort_no_room"),
    pytest.param({"reasoning_effort": "none"}, {"thinking": None}, None, id="effort_none"),
    pytest.param({"reasoning_effort": "low", "temperature": 0.2, "top_p": 0.5, "max_completion_tokens": 8000},
                 {"thinking": {"type": "enabled", "budget_tokens": 2048}, "temperature": None, "top_p": None},
                 "temperature was dropped", id="thinking_drops_sampling"),
    pytest.param({"reasoning_effort": "low", "tools": [TOOL], "tool_choice": "required"},
                 {"thinking": None, "tool_choice": {"type": "any"}}, "tool call is forced",
                 id="forced_tool_disables_thinking"),
])
def test_chat_fields_to_messages(fields: dict[str, Any], expected: dict[str, Any], warning: str | None) -> None:
    # Given an OpenAI request with these fields, when translated to Anthropic
    translated = to_messages(fields)
    # Then the Anthropic body carries them as expected, warning about what was dropped
    assert subset(translated.body, expected) == expected
    assert_warned(translated, warning)


@pytest.mark.parametrize(("choice", "parallel", "expected"), [
    pytest.param(None, None, None, id="default"),
    pytest.param("auto", None, {"type": "auto"}, id="auto"),
    pytest.param("none", None, {"type": "none"}, id="none"),
    pytest.param("required", None, {"type": "any"}, id="required"),
    pytest.param({"type": "function", "function": {"name": "get_weather"}}, None,
                 {"type": "tool", "name": "get_weather"}, id="function"),
    pytest.param(None, False, {"type": "auto", "disable_parallel_tool_use": True}, id="serial_default"),
    pytest.param("required", False, {"type": "any", "disable_parallel_tool_use": True}, id="serial_required"),
    pytest.param("none", False, {"type": "none"}, id="serial_none"),
    pytest.param("auto", True, {"type": "auto"}, id="parallel_true"),
])
def test_tool_choice_to_messages(choice: Any, parallel: bool | None, expected: dict[str, Any] | None) -> None:
    translated = to_messages({"tools": [TOOL], "tool_choice": choice, "parallel_tool_calls": parallel})
    assert translated.body.get("tool_choice") == expected
    assert translated.body["tools"] == [A_TOOL]


def test_tool_definitions_to_messages() -> None:
    # Given function tools with and without parameters, one strict
    tools = [TOOL, {"type": "function", "function": {"name": "now"}},
             {"type": "function", "function": {"name": "s", "parameters": {"properties": {}}, "strict": True}}]
    # When translated, then each becomes an Anthropic tool with an object input_schema
    assert to_messages({"tools": tools}).body["tools"] == [
        A_TOOL,
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
        {"name": "s", "input_schema": {"type": "object", "properties": {}}, "strict": True},
    ]


@pytest.mark.parametrize(("fields", "feature"), [
    pytest.param({"n": 2}, "n > 1", id="n"),
    pytest.param({"logprobs": True}, "logprobs", id="logprobs"),
    pytest.param({"top_logprobs": 3}, "logprobs", id="top_logprobs"),
    pytest.param({"modalities": ["text", "audio"]}, "audio output", id="audio_output"),
    pytest.param({"functions": [{"name": "f"}]}, "legacy functions", id="functions"),
    pytest.param({"web_search_options": {}}, "web search", id="web_search"),
    pytest.param({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "custom tools", id="custom_tool"),
    pytest.param({"tools": [TOOL], "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}, "tool_choice",
                 id="allowed_tools"),
    pytest.param({"tool_choice": "required"}, "tool_choice", id="tool_choice_without_tools"),
    pytest.param({"reasoning_effort": "turbo"}, "reasoning_effort", id="unknown_effort"),
    pytest.param({"temperature": "hot"}, "temperature", id="temperature_type"),
    pytest.param({"max_tokens": 0}, "max_tokens", id="max_tokens_zero"),
    pytest.param({"stream": "yes"}, "stream", id="stream_type"),
    pytest.param({"stop": [1]}, "stop", id="stop_type"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format",
                 id="schema_missing"),
    pytest.param({"messages": []}, "messages", id="no_messages"),
    pytest.param({"messages": [{"role": "system", "content": "s"}]}, "messages", id="only_system"),
    pytest.param({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "role", id="function_role"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
                 "audio input", id="audio_input"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}]},
                 "file_id", id="file_id"),
    pytest.param({"messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_data": "data:text/csv;base64,YQ==", "filename": "a.csv"}}]}]},
                 "file type", id="csv_file"),
    pytest.param({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/bmp;base64,Qk0="}}]}]}, "image type", id="bmp"),
    pytest.param({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]}, "content", id="ftp_image"),
    pytest.param({"messages": [USER, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "custom", "custom": {"name": "x", "input": "y"}}]}]}, "custom tools", id="custom_call"),
])
def test_untranslatable_chat_requests(fields: dict[str, Any], feature: str) -> None:
    with pytest.raises(Untranslatable) as raised:
        to_messages(fields)
    assert raised.value.feature == feature


@pytest.mark.parametrize("body", [None, [], "x"])
def test_non_object_bodies_are_untranslatable(body: Any) -> None:
    with pytest.raises(Untranslatable):
        chat_to_messages(body, model="m", max_tokens_default=1)
    with pytest.raises(Untranslatable):
        messages_to_chat(body, model="m")
    with pytest.raises(Untranslatable):
        with_prefill(body, "x")


# --------------------------------------------------------------------------------------------------
# OpenAI -> Anthropic: history


def test_system_and_developer_messages_anywhere_become_system_blocks() -> None:
    # Given system and developer messages before and between user turns
    translated = to_messages({"messages": [
        {"role": "system", "content": "Be brief."}, USER,
        {"role": "developer", "content": [{"type": "text", "text": "Use metric."}, {"type": "text", "text": " "}]},
        {"role": "user", "content": "again"}]})
    # Then they are hoisted in order, and the user turns around them merge into one
    assert translated.body["system"] == [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use metric."}]
    assert translated.body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "again"}]}]


def test_parallel_tool_calls_and_results_become_one_user_turn() -> None:
    # Given an assistant turn with two tool calls, their two tool messages and a follow-up user message
    translated = to_messages({"messages": [
        USER,
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_a", "content": "20C"},
        {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "5C"}]},
        {"role": "user", "content": "Which is warmer?"},
    ]})
    # Then Anthropic gets text + two tool_use blocks, then ONE user turn with both results first, text after
    assert translated.body["messages"][1:] == [
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_b", "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_a", "content": "20C"},
            {"type": "tool_result", "tool_use_id": "call_b", "content": [{"type": "text", "text": "5C"}]},
            {"type": "text", "text": "Which is warmer?"}]},
    ]
    assert translated.warnings == []


@pytest.mark.parametrize(("arguments", "expected", "warning"), [
    pytest.param("", {}, None, id="empty"),
    pytest.param(None, {}, None, id="null"),
    pytest.param('{"a": [1, {"b": "x"}]}', {"a": [1, {"b": "x"}]}, None, id="object"),
    pytest.param('{"a": 1, "b": "unfinis', {"a": 1, "b": "unfinis"}, "cut-short", id="truncated_string"),
    pytest.param('{"a": [1, 2,', {"a": [1, 2]}, "cut-short", id="truncated_array"),
    pytest.param("{not json", {RAW_ARGUMENTS: "{not json"}, "not a JSON object", id="broken"),
    pytest.param('{"a":', {RAW_ARGUMENTS: '{"a":'}, "not a JSON object", id="unrepairable"),
    pytest.param("[1, 2]", {RAW_ARGUMENTS: "[1, 2]"}, "not a JSON object", id="array"),
    pytest.param('{"x": NaN}', {RAW_ARGUMENTS: '{"x": NaN}'}, "not a JSON object", id="nan"),
])
def test_history_tool_call_arguments(arguments: Any, expected: dict[str, Any], warning: str | None) -> None:
    translated = to_messages({"messages": [
        USER, {"role": "assistant", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "done"}]})
    assert translated.body["messages"][1]["content"] == [{"type": "tool_use", "id": "call_1", "name": "f",
                                                          "input": expected}]
    assert_warned(translated, warning)


def test_tool_ids_are_made_safe_on_both_sides() -> None:
    translated = to_messages({"messages": [
        USER, {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call.1:x", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call.1:x", "content": "ok"}]})
    # The assistant turn with empty text holds only the tool_use; both ids are sanitised the same way
    assert translated.body["messages"][1]["content"][0]["id"] == "call_1_x"
    assert translated.body["messages"][2]["content"][0]["tool_use_id"] == "call_1_x"
    assert len(translated.body["messages"][1]["content"]) == 1


@pytest.mark.parametrize(("part", "block"), [
    pytest.param({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "high"}},
                 {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}, id="png"),
    pytest.param({"type": "image_url", "image_url": {"url": f"data:image/jpg;base64,{PNG}"}},
                 {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": PNG}}, id="jpg"),
    pytest.param({"type": "image_url", "image_url": {"url": "https://x.test/cat.webp", "detail": "low"}},
                 {"type": "image", "source": {"type": "url", "url": "https://x.test/cat.webp"}}, id="url"),
    pytest.param({"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}},
                 {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                                 "data": "JVBERi0="}, "title": "a.pdf"}, id="pdf_data_url"),
    pytest.param({"type": "file", "file": {"file_data": "JVBERi0=", "filename": "b.PDF"}},
                 {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                                 "data": "JVBERi0="}, "title": "b.PDF"}, id="pdf_bare_base64"),
])
def test_user_parts_to_blocks(part: dict[str, Any], block: dict[str, Any]) -> None:
    translated = to_messages({"messages": [{"role": "user", "content": [{"type": "text", "text": "Look:"}, part]}]})
    assert translated.body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Look:"}, block]}]


def test_consecutive_assistant_turns_merge_and_empty_text_is_dropped() -> None:
    translated = to_messages({"messages": [
        USER, {"role": "assistant", "content": "one"}, {"role": "user", "content": ""},
        {"role": "assistant", "content": [{"type": "text", "text": "two"}, {"type": "refusal", "refusal": "no"}]},
        {"role": "user", "content": "ok"}]})
    assert translated.body["messages"][1] == {"role": "assistant", "content": [
        {"type": "text", "text": "one"}, {"type": "text", "text": "two"}, {"type": "text", "text": "no"}]}
    assert len(translated.body["messages"]) == 3


def test_history_starting_with_assistant_gets_a_placeholder_user_turn() -> None:
    translated = to_messages({"messages": [{"role": "system", "content": "s"},
                                           {"role": "assistant", "content": "Hello!"}, USER]})
    assert translated.body["messages"][0] == {"role": "user", "content": [{"type": "text", "text": PLACEHOLDER_USER}]}
    assert_warned(translated, "user turn")


def test_trailing_assistant_message_is_dropped_with_a_warning() -> None:
    translated = to_messages({"messages": [USER, {"role": "assistant", "content": "Sure, "}]})
    assert translated.body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert_warned(translated, "prefill")


def test_message_names_are_dropped_with_one_warning() -> None:
    translated = to_messages({"messages": [{**USER, "name": "ann"}, {"role": "user", "content": "x", "name": "bob"}]})
    assert translated.warnings == ["Message `name` fields were dropped: Anthropic has no equivalent."]


def test_continuing_a_tool_loop_disables_thinking() -> None:
    translated = to_messages({"reasoning_effort": "high", "messages": [
        USER, {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r"}]})
    assert "thinking" not in translated.body
    assert_warned(translated, "tool loop")


# --------------------------------------------------------------------------------------------------
# Anthropic -> OpenAI


@pytest.mark.parametrize(("fields", "expected", "warning"), [
    pytest.param({}, {"model": "gpt-4o", "max_completion_tokens": 1000, "max_tokens": None, "stream": None}, None,
                 id="defaults"),
    pytest.param({"stream": True}, {"stream": True, "stream_options": {"include_usage": True}}, None, id="stream"),
    pytest.param({"stream": False}, {"stream": False, "stream_options": None}, None, id="no_stream"),
    pytest.param({"temperature": 0.5, "top_p": 0.8}, {"temperature": 0.5, "top_p": 0.8}, None, id="sampling"),
    pytest.param({"top_k": 40}, {"top_k": None}, "no equivalent of top_k", id="top_k_dropped"),
    pytest.param({"stop_sequences": ["END", "STOP"]}, {"stop": ["END", "STOP"]}, None, id="stop"),
    pytest.param({"system": "Be brief."}, {"messages": [{"role": "system", "content": "Be brief."}, USER]}, None,
                 id="system_string"),
    pytest.param({"system": [{"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}},
                             {"type": "text", "text": "B"}]},
                 {"messages": [{"role": "system", "content": [{"type": "text", "text": "A"},
                                                              {"type": "text", "text": "B"}]}, USER]}, None,
                 id="system_blocks"),
    pytest.param({"metadata": {"user_id": "u-1"}}, {"user": "u-1"}, None, id="user_id"),
    pytest.param({"metadata": {"user_id": "u-1", "tag": "x"}}, {"user": "u-1"}, "metadata other than user_id",
                 id="metadata_dropped"),
    pytest.param({"thinking": {"type": "enabled", "budget_tokens": 2048}}, {"reasoning_effort": "low"}, None,
                 id="thinking_low"),
    pytest.param({"thinking": {"type": "enabled", "budget_tokens": 8000}}, {"reasoning_effort": "medium"}, None,
                 id="thinking_medium"),
    pytest.param({"thinking": {"type": "enabled", "budget_tokens": 30000}}, {"reasoning_effort": "high"}, None,
                 id="thinking_high"),
    pytest.param({"thinking": {"type": "disabled"}}, {"reasoning_effort": None}, None, id="thinking_disabled"),
    pytest.param({"output_config": {"effort": "xhigh"}}, {"reasoning_effort": "xhigh"}, None, id="effort"),
    pytest.param({"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}},
                 {"response_format": {"type": "json_schema", "json_schema": {
                     "name": "output", "schema": {"type": "object"}, "strict": True}}}, None, id="json_schema"),
    pytest.param({"cache_control": {"type": "ephemeral"}}, {"cache_control": None}, None, id="cache_control_quiet"),
    pytest.param({"service_tier": "standard_only", "zz": 1}, {"service_tier": None}, "Unknown request fields "
                 "were dropped: zz", id="unknown_fields"),
])
def test_messages_fields_to_chat(fields: dict[str, Any], expected: dict[str, Any], warning: str | None) -> None:
    translated = to_chat(fields)
    assert subset(translated.body, expected) == expected
    assert_warned(translated, warning)


@pytest.mark.parametrize(("choice", "expected"), [
    pytest.param({"type": "auto"}, {"tool_choice": "auto"}, id="auto"),
    pytest.param({"type": "any"}, {"tool_choice": "required"}, id="any"),
    pytest.param({"type": "none"}, {"tool_choice": "none"}, id="none"),
    pytest.param({"type": "tool", "name": "get_weather"},
                 {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, id="tool"),
    pytest.param({"type": "any", "disable_parallel_tool_use": True},
                 {"tool_choice": "required", "parallel_tool_calls": False}, id="serial_any"),
    pytest.param({"type": "none", "disable_parallel_tool_use": True},
                 {"tool_choice": "none", "parallel_tool_calls": None}, id="serial_none"),
])
def test_tool_choice_to_chat(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    translated = to_chat({"tools": [A_TOOL], "tool_choice": choice})
    assert subset(translated.body, expected) == expected
    assert translated.body["tools"] == [TOOL]


def test_long_tool_names_are_shortened_consistently_and_restorable() -> None:
    # Given a tool whose name OpenAI rejects (> 64 characters), used in history and tool_choice
    translated = to_chat({"tools": [{**A_TOOL, "name": LONG_NAME}], "tool_choice": {"type": "tool", "name": LONG_NAME},
                          "messages": [USER, {"role": "assistant", "content": [
                              {"type": "tool_use", "id": "toolu_1", "name": LONG_NAME, "input": {"city": "Rome"}}]},
                              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]}]})
    short = translated.body["tools"][0]["function"]["name"]
    # Then the same short name is used everywhere, and tool_names gives the agent's name back
    assert len(short) <= 64 and short != LONG_NAME
    assert translated.body["tool_choice"]["function"]["name"] == short
    assert translated.body["messages"][1]["tool_calls"][0]["function"] == {"name": short,
                                                                          "arguments": '{"city":"Rome"}'}
    assert translated.tool_names.original(short) == LONG_NAME


def test_tool_results_split_into_tool_messages_before_user_text() -> None:
    # Given a user turn with an error result, a result holding an image, and text
    translated = to_chat({"messages": [USER, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_a", "name": "shot", "input": {}},
        {"type": "tool_use", "id": "toolu_b", "name": "read", "input": {"p": "x"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_a", "content": [
                {"type": "text", "text": "captured"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]},
            {"type": "tool_result", "tool_use_id": "toolu_b", "is_error": True, "content": "no such file"},
            {"type": "text", "text": "Go on."}]}]})
    # Then: tool messages first (error prefixed), then a user message with the image and the text
    assert translated.body["messages"][1:] == [
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "toolu_a", "type": "function", "function": {"name": "shot", "arguments": "{}"}},
            {"id": "toolu_b", "type": "function", "function": {"name": "read", "arguments": '{"p":"x"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_a", "content": "captured"},
        {"role": "tool", "tool_call_id": "toolu_b", "content": "Error: no such file"},
        {"role": "user", "content": [
            {"type": "text", "text": "Images returned by tool call toolu_a:"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            {"type": "text", "text": "Go on."}]},
    ]
    # And the thinking block is named as dropped
    assert translated.warnings == ["Thinking blocks in the history were dropped: OpenAI Chat cannot carry them."]


@pytest.mark.parametrize(("block", "part"), [
    pytest.param({"type": "image", "source": {"type": "base64", "media_type": "image/gif", "data": PNG}},
                 {"type": "image_url", "image_url": {"url": f"data:image/gif;base64,{PNG}"}}, id="base64_image"),
    pytest.param({"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}},
                 {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}, id="url_image"),
    pytest.param({"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVB="}},
                 {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVB=",
                                           "filename": "document.pdf"}}, id="pdf"),
    pytest.param({"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "notes"}},
                 {"type": "text", "text": "notes"}, id="text_document"),
])
def test_user_blocks_to_parts(block: dict[str, Any], part: dict[str, Any]) -> None:
    translated = to_chat({"messages": [{"role": "user", "content": [block, {"type": "text", "text": "?"}]}]})
    assert translated.body["messages"] == [{"role": "user", "content": [part, {"type": "text", "text": "?"}]}]


def test_trailing_assistant_prefill_is_kept_with_a_warning() -> None:
    translated = to_chat({"messages": [USER, {"role": "assistant", "content": "{"}]})
    assert translated.body["messages"][-1] == {"role": "assistant", "content": "{"}
    assert_warned(translated, "OpenAI does not continue it")


@pytest.mark.parametrize(("fields", "feature"), [
    pytest.param({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools", id="web_search"),
    pytest.param({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "server tools", id="bash"),
    pytest.param({"mcp_servers": [{"type": "url", "url": "https://m"}]}, "server tools", id="mcp"),
    pytest.param({"messages": [USER, {"role": "assistant", "content": [
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}]}]}, "server tools",
                 id="server_tool_use_block"),
    pytest.param({"max_tokens": 0}, "max_tokens", id="prewarm"),
    pytest.param({"stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences", id="five_stops"),
    pytest.param({"tool_choice": {"type": "any"}}, "tool_choice", id="tool_choice_without_tools"),
    pytest.param({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "file", "file_id": "file_1"}}]}]}, "file_id", id="image_file"),
    pytest.param({"messages": [{"role": "system", "content": "x"}]}, "messages", id="system_role"),
    pytest.param({"thinking": {"type": "enabled", "budget_tokens": "lots"}}, "thinking", id="budget_type"),
    pytest.param({"output_config": {"format": {"type": "regex"}}}, "output_config", id="format_type"),
])
def test_untranslatable_messages_requests(fields: dict[str, Any], feature: str) -> None:
    with pytest.raises(Untranslatable) as raised:
        to_chat(fields)
    assert raised.value.feature == feature


# --------------------------------------------------------------------------------------------------
# with_prefill


@pytest.mark.parametrize(("messages", "text", "last"), [
    pytest.param([USER], "The answer is ", {"role": "assistant", "content": "The answer is"}, id="new_turn"),
    pytest.param([USER, {"role": "assistant", "content": "Once"}], " upon a time\n",
                 {"role": "assistant", "content": "Once upon a time"}, id="append_string"),
    pytest.param([USER, {"role": "assistant", "content": [{"type": "text", "text": "A", "cache_control": {}}]}],
                 "B ", {"role": "assistant", "content": [{"type": "text", "text": "AB", "cache_control": {}}]},
                 id="append_block"),
    pytest.param([USER], "  \n", USER, id="blank_text_adds_nothing"),
])
def test_with_prefill(messages: list[dict[str, Any]], text: str, last: dict[str, Any]) -> None:
    body: dict[str, Any] = {"model": "claude-x", "max_tokens": 10, "messages": messages}
    before = copy.deepcopy(body)
    prefilled = with_prefill(body, text)
    assert prefilled["messages"][-1] == last
    assert prefilled["messages"][:len(messages) - 1] == messages[:-1]
    assert body == before  # the input is not mutated


# --------------------------------------------------------------------------------------------------
# Properties: a round trip keeps the meaning


IDENT = st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=10)
TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=20)
NONBLANK = TEXT.filter(lambda s: s.strip() != "")
SCALARS = (st.none() | st.booleans() | st.integers(-10**9, 10**9)
           | st.floats(allow_nan=False, allow_infinity=False) | TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)
OBJECTS = st.dictionaries(TEXT, JSON, max_size=4)
SCHEMAS = st.builds(lambda props: {"type": "object", "properties": {p: {"type": "string"} for p in props}},
                    st.lists(IDENT, max_size=3))


def chat_content(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return text | st.lists(text.map(lambda t: {"type": "text", "text": t}), min_size=1, max_size=3)


@st.composite
def chat_requests(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(IDENT, max_size=3, unique=True))
    tools = [{"type": "function", "function": {"name": n, "description": draw(TEXT), "parameters": draw(SCHEMAS)}}
             for n in names]
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        messages.append({"role": draw(st.sampled_from(["system", "developer"])), "content": draw(chat_content(TEXT))})
    messages.append({"role": "user", "content": draw(chat_content(NONBLANK))})
    for turn in range(draw(st.integers(0, 3))):
        assistant: dict[str, Any] = {"role": "assistant", "content": draw(st.none() | chat_content(TEXT))}
        calls = [{"id": f"call_{turn}_{i}{draw(IDENT)}", "type": "function",
                  "function": {"name": draw(st.sampled_from(names)), "arguments": json.dumps(draw(OBJECTS))}}
                 for i in range(draw(st.integers(0, 3) if names else st.just(0)))]
        if calls:
            assistant["tool_calls"] = calls
        messages.append(assistant)
        messages += [{"role": "tool", "tool_call_id": c["id"], "content": draw(chat_content(TEXT))} for c in calls]
        if draw(st.booleans()):
            messages.append({"role": draw(st.sampled_from(["user", "developer"])), "content": draw(chat_content(TEXT))})
    messages.append({"role": "user", "content": draw(chat_content(NONBLANK))})
    return {"model": "gpt-4o", "messages": messages, **({"tools": tools} if tools else {})}


def texts(content: Any) -> list[str]:
    if content is None:
        return []
    parts = [content] if isinstance(content, str) else [p["text"] for p in content]
    return [t for t in parts if t.strip()]


def flat_chat(messages: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """The meaning of an OpenAI history: system texts first, then texts, tool calls and results in order."""
    system: list[tuple[Any, ...]] = []
    items: list[tuple[Any, ...]] = []
    for m in messages:
        if m["role"] in ("system", "developer"):
            system += [("text", "system", t) for t in texts(m["content"])]
        elif m["role"] == "tool":
            items.append(("result", m["tool_call_id"], "".join(texts(m["content"]))))
        else:
            items += [("text", m["role"], t) for t in texts(m.get("content"))]
            items += [("call", c["id"], c["function"]["name"], json.loads(c["function"]["arguments"] or "{}"))
                      for c in m.get("tool_calls", [])]
    return system + items


def chat_tools(body: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(t["function"]["name"], t["function"]["parameters"]) for t in body.get("tools", [])]


@settings(max_examples=100, deadline=None)
@given(chat_requests())
def test_chat_round_trip_keeps_meaning(request: dict[str, Any]) -> None:
    there = chat_to_messages(request, model="claude-x", max_tokens_default=512)
    back = messages_to_chat(there.body, model="gpt-4o")
    assert flat_chat(back.body["messages"]) == flat_chat(request["messages"])
    assert chat_tools(back.body) == chat_tools(request)
    assert back.body["max_completion_tokens"] == 512
    assert there.warnings == [] and back.warnings == []


TOOL_NAME = IDENT | st.text(alphabet=string.ascii_letters + "_", min_size=65, max_size=128)


def block_content(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return text | st.lists(text.map(lambda t: {"type": "text", "text": t}), min_size=1, max_size=3)


@st.composite
def messages_requests(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(TOOL_NAME, max_size=3, unique=True))
    body: dict[str, Any] = {"model": "claude-x", "max_tokens": 700, "messages": [
        {"role": "user", "content": draw(block_content(NONBLANK))}]}
    if names:
        body["tools"] = [{"name": n, "description": draw(TEXT), "input_schema": draw(SCHEMAS)} for n in names]
    if draw(st.booleans()):
        body["system"] = draw(block_content(NONBLANK))
    for turn in range(draw(st.integers(0, 3))):
        calls = [{"type": "tool_use", "id": f"toolu_{turn}_{i}{draw(IDENT)}", "name": draw(st.sampled_from(names)),
                  "input": draw(OBJECTS)} for i in range(draw(st.integers(0, 3) if names else st.just(0)))]
        said = draw(st.lists(NONBLANK.map(lambda t: {"type": "text", "text": t}), min_size=0 if calls else 1,
                             max_size=2))
        body["messages"].append({"role": "assistant", "content": said + calls})
        results = [{"type": "tool_result", "tool_use_id": c["id"], "content": draw(block_content(NONBLANK))}
                   for c in calls]
        follow = draw(st.lists(NONBLANK.map(lambda t: {"type": "text", "text": t}), min_size=0 if calls else 1,
                               max_size=2))
        body["messages"].append({"role": "user", "content": results + follow})
    return body


def flat_messages(body: dict[str, Any], restore: Any = lambda name: name) -> list[tuple[Any, ...]]:
    """The meaning of an Anthropic request: system texts, then texts, tool uses and results in order."""
    system = body.get("system")
    items: list[tuple[Any, ...]] = [("text", "system", t) for t in texts(system)] if system else []
    for m in body["messages"]:
        blocks = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        for b in blocks:
            if b["type"] == "text":
                items += [("text", m["role"], t) for t in texts(b["text"])]
            elif b["type"] == "tool_use":
                items.append(("call", b["id"], restore(b["name"]), b["input"]))
            else:
                items.append(("result", b["tool_use_id"], "".join(texts(b.get("content")))))
    return items


@settings(max_examples=100, deadline=None)
@given(messages_requests())
def test_messages_round_trip_keeps_meaning(request: dict[str, Any]) -> None:
    there = messages_to_chat(request, model="gpt-4o")
    back = chat_to_messages(there.body, model="claude-x", max_tokens_default=1)
    assert flat_messages(back.body, there.tool_names.original) == flat_messages(request)
    assert [(there.tool_names.original(t["name"]), t["input_schema"]) for t in back.body.get("tools", [])] == \
        [(t["name"], t["input_schema"]) for t in request.get("tools", [])]
    assert all(len(t["function"]["name"]) <= 64 for t in there.body.get("tools", []))
    assert back.body["max_tokens"] == 700
    assert there.warnings == [] and back.warnings == []


# --------------------------------------------------------------------------------------------------
# Properties: hostile input raises Untranslatable or nothing


VOCABULARY = st.sampled_from([
    "role", "content", "type", "text", "messages", "tools", "tool_choice", "tool_calls", "function", "name",
    "arguments", "id", "tool_call_id", "tool_use_id", "input", "input_schema", "parameters", "image_url", "url",
    "source", "file", "file_data", "system", "stop", "stop_sequences", "max_tokens", "temperature", "metadata",
    "thinking", "budget_tokens", "response_format", "json_schema", "schema", "output_config", "format", "is_error",
    "user", "assistant", "tool", "developer", "tool_use", "tool_result", "image", "document", "base64", "auto",
    "any", "none", "required", "media_type", "data", "reasoning_effort", "stream", "refusal", "parallel_tool_calls",
])
HOSTILE_SCALARS = SCALARS | st.integers() | st.floats() | VOCABULARY | st.just(f"data:image/png;base64,{PNG}") | st.just("https://x.test/a.png")
HOSTILE = st.recursive(HOSTILE_SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(VOCABULARY | TEXT, inner, max_size=5), max_leaves=30)


FIELDS = st.sampled_from([
    "max_tokens", "max_completion_tokens", "stream", "stream_options", "n", "temperature", "top_p", "top_k", "stop",
    "stop_sequences", "logprobs", "top_logprobs", "user", "safety_identifier", "metadata", "response_format",
    "reasoning_effort", "thinking", "output_config", "tools", "tool_choice", "parallel_tool_calls", "functions",
    "function_call", "modalities", "audio", "web_search_options", "seed", "logit_bias", "service_tier", "system",
    "mcp_servers", "container", "cache_control", "refusal", "name", "is_error", "tool_calls", "content",
])


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[dict[str, Any]]) -> Any:
    """A valid request with one nested value replaced (or one field added) by hostile JSON."""
    body = copy.deepcopy(draw(valid))
    node: Any = body
    for _ in range(8):
        keys = sorted(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if isinstance(node, dict) and draw(st.integers(0, 3)) == 0:
            node[draw(FIELDS)] = draw(HOSTILE)
            break
        if not keys:
            break
        key = draw(st.sampled_from(keys))
        if draw(st.integers(0, 3)) == 0:
            node[key] = draw(HOSTILE)
            break
        node = node[key]
    return body


def only_untranslatable(body: Any) -> None:
    for translate in (lambda: chat_to_messages(body, model="m", max_tokens_default=64),
                      lambda: messages_to_chat(body, model="m"), lambda: with_prefill(body, "x ")):
        try:
            translate()
        except Untranslatable:
            pass


@settings(max_examples=150, deadline=None)
@given(HOSTILE)
def test_arbitrary_json_raises_only_untranslatable(body: Any) -> None:
    only_untranslatable(body)
    only_untranslatable({"model": "m", "max_tokens": 5, "messages": body})


@settings(max_examples=150, deadline=None)
@given(mutated(chat_requests()) | mutated(messages_requests()))
def test_mutated_requests_raise_only_untranslatable(body: Any) -> None:
    only_untranslatable(body)


def test_a_thinking_budget_fits_inside_the_default_output_allowance() -> None:
    # The proxy's default is the target model's own output limit: max_tokens must not grow past it.
    body = to_messages({"reasoning_effort": "medium"}, default=64000).body
    assert body["max_tokens"] == 64000 and body["thinking"] == {"type": "enabled", "budget_tokens": 8192}
