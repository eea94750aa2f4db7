"""Request bodies: OpenAI Chat Completions <-> Anthropic Messages (pure, no I/O).

`chat_to_messages` and `messages_to_chat` return a `Translated` whose body asks the other vendor for the same
thing (reference/provider-formats.md section 3.1 and 3.7). The input is never mutated; the output may share
nested values with it (tool schemas, JSON Schema of structured outputs).

- A request the target cannot serve faithfully raises `Untranslatable` (its `feature` names what): n > 1,
  logprobs, audio, `file_id` files, legacy functions, custom tools and tool calls, allowed_tools, web search,
  Anthropic server tools and MCP servers, unsupported image or file types, and values of the wrong type.
- Whatever is dropped is named in `warnings`, once: sampling knobs the target lacks, unknown top-level fields,
  thinking blocks, a trailing assistant turn (OpenAI -> Anthropic, where it would be a prefill). Anthropic's
  `cache_control` hints and OpenAI's `stream_options` are dropped quietly: they change no answer.
- reasoning_effort <-> thinking through `EFFORT_BUDGETS`; thinking is left off (with a warning) when a tool call
  is forced or the history's last assistant turn made tool calls (Anthropic would want its signed thinking).
- OpenAI -> Anthropic shapes history as Anthropic requires: system/developer messages (wherever they are) become
  top-level `system` text blocks; consecutive same-role turns merge, with `tool_result` blocks first; blank text
  is dropped; a history opening with an assistant turn gets a `PLACEHOLDER_USER` turn before it.
- Anthropic -> OpenAI: tool names OpenAI rejects are shortened through `Translated.tool_names`.

This module holds the entry points and `with_prefill`; the work is done by `request_fields` (top-level fields,
tools, reasoning), `request_messages` (the history, turn by turn) and `request_content` (content parts).
"""

from __future__ import annotations

from typing import Any

from rungate.translate.common import ToolNames, Translated, Untranslatable, note
from rungate.translate.request_fields import (
    CHAT_DROPPED,
    CHAT_HANDLED,
    EFFORT_BUDGETS,
    MESSAGES_DROPPED,
    MESSAGES_HANDLED,
    bool_field,
    chat_response_format,
    chat_tool_choice,
    chat_tools,
    dict_field,
    drop_fields,
    int_field,
    messages_tools,
    name_field,
    number_field,
    reasoning_and_format,
    stop_sequences,
    thinking_from_effort,
)
from rungate.translate.request_messages import PLACEHOLDER_USER, chat_history, messages_history, system_message

__all__ = ["EFFORT_BUDGETS", "PLACEHOLDER_USER", "chat_to_messages", "messages_to_chat", "with_prefill"]


# --------------------------------------------------------------------------------------------------
# OpenAI Chat -> Anthropic Messages


def chat_to_messages(body: dict[str, Any], *, model: str, max_tokens_default: int) -> Translated:
    """OpenAI Chat Completions request -> Anthropic Messages request for target `model`.

    max_tokens = max_completion_tokens ?? max_tokens ?? max_tokens_default (the whole output allowance: a
    thinking budget that reasoning_effort turns on fits inside it). Keeps `stream`; drops `stream_options`
    (Anthropic always reports usage). Raises `Untranslatable` for what cannot be carried (see the module doc).
    """
    if not isinstance(body, dict):
        raise Untranslatable("request", "the request body is not a JSON object")
    warnings: list[str] = []
    _refuse_chat_features(body)
    system, messages = chat_history(body.get("messages"), warnings)
    out: dict[str, Any] = {"model": model}
    if system:
        out["system"] = system
    out["messages"] = messages
    limit = int_field(body, "max_completion_tokens", 1) or int_field(body, "max_tokens", 1)
    out["max_tokens"] = limit or max_tokens_default
    if (stream := bool_field(body, "stream")) is not None:
        out["stream"] = stream
    tools = chat_tools(body.get("tools"))
    if tools:
        out["tools"] = tools
    tool_choice = chat_tool_choice(body.get("tool_choice"), bool_field(body, "parallel_tool_calls"), bool(tools))
    if tool_choice:
        out["tool_choice"] = tool_choice
    thinking = thinking_from_effort(body.get("reasoning_effort"), tool_choice, messages, limit, out, warnings)
    if (temperature := number_field(body, "temperature")) is not None:
        if thinking and temperature != 1:
            note(warnings, "temperature was dropped: Anthropic allows no temperature with thinking on.")
        elif not 0 <= temperature <= 1:
            out["temperature"] = min(max(temperature, 0), 1)
            note(warnings, f"temperature {temperature} was clamped to Anthropic's range 0-1.")
        else:
            out["temperature"] = temperature
    if (top_p := number_field(body, "top_p")) is not None:
        if thinking and top_p < 0.95:
            note(warnings, "top_p was dropped: Anthropic allows only top_p >= 0.95 with thinking on.")
        else:
            out["top_p"] = top_p
    if stop := stop_sequences(body.get("stop"), warnings):
        out["stop_sequences"] = stop
    user = body.get("safety_identifier") or body.get("user")
    if user:
        out["metadata"] = {"user_id": name_field(user, "user")}
    if fmt := chat_response_format(dict_field(body, "response_format"), warnings):
        out["output_config"] = {"format": fmt}
    drop_fields(body, CHAT_HANDLED, CHAT_DROPPED, "Anthropic", warnings)
    return Translated(out, warnings)


def _refuse_chat_features(body: dict[str, Any]) -> None:
    if int_field(body, "n", 1) not in (None, 1):
        raise Untranslatable("n > 1", "Anthropic returns one answer per call (n > 1)")
    if body.get("logprobs") is True or body.get("top_logprobs") not in (None, 0):
        raise Untranslatable("logprobs", "Anthropic returns no log probabilities")
    modalities = body.get("modalities")
    if body.get("audio") is not None or (isinstance(modalities, list) and "audio" in modalities):
        raise Untranslatable("audio output", "Anthropic cannot answer with audio")
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise Untranslatable("legacy functions", "legacy `functions` requests are not translated; use `tools`")
    if body.get("web_search_options") is not None:
        raise Untranslatable("web search", "web_search_options has no Anthropic Messages equivalent")


# --------------------------------------------------------------------------------------------------
# Anthropic Messages -> OpenAI Chat


def messages_to_chat(body: dict[str, Any], *, model: str) -> Translated:
    """Anthropic Messages request -> OpenAI Chat Completions request for target `model`.

    max_tokens -> max_completion_tokens; a streamed request also asks for usage (`stream_options`). Tool names
    OpenAI rejects are shortened (`Translated.tool_names` restores them). Thinking blocks in the history are
    dropped with a warning; a trailing assistant turn (a prefill) is sent as history with a warning, since
    OpenAI does not continue it. Raises `Untranslatable` for server tools, MCP servers and the like.
    """
    if not isinstance(body, dict):
        raise Untranslatable("request", "the request body is not a JSON object")
    if body.get("mcp_servers") is not None or body.get("container") is not None:
        raise Untranslatable("server tools", "Anthropic MCP servers and containers have no OpenAI equivalent")
    warnings: list[str] = []
    names = ToolNames()
    messages = system_message(body.get("system"))
    messages.extend(messages_history(body.get("messages"), names, warnings))
    out: dict[str, Any] = {"model": model, "messages": messages}
    if (max_tokens := int_field(body, "max_tokens", 0)) == 0:
        raise Untranslatable("max_tokens", "max_tokens 0 (a cache pre-warm) has no OpenAI equivalent")
    if max_tokens is not None:
        out["max_completion_tokens"] = max_tokens
    if (stream := bool_field(body, "stream")) is not None:
        out["stream"] = stream
        if stream:
            out["stream_options"] = {"include_usage": True}
    for key in ("temperature", "top_p"):
        if (value := number_field(body, key)) is not None:
            out[key] = value
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise Untranslatable("stop_sequences", "OpenAI takes at most 4 stop strings")
        if stop:
            out["stop"] = stop
    messages_tools(body, names, out)
    metadata = dict_field(body, "metadata") or {}
    if metadata.get("user_id"):
        out["user"] = name_field(metadata["user_id"], "metadata.user_id")
    if set(metadata) - {"user_id"}:
        note(warnings, "metadata other than user_id was dropped: OpenAI has no equivalent.")
    reasoning_and_format(body, out, warnings)
    drop_fields(body, MESSAGES_HANDLED, MESSAGES_DROPPED, "OpenAI", warnings)
    return Translated(out, warnings, names)


# --------------------------------------------------------------------------------------------------
# Prefill


def with_prefill(body: dict[str, Any], text: str) -> dict[str, Any]:
    """An Anthropic Messages request asking the model to continue an answer that already began with `text`.

    A copy of `body` whose final turn is an assistant message holding `text`: appended to the text of an
    existing final assistant turn, else a new assistant message. Trailing whitespace of that final text is
    stripped (Anthropic rejects it). `body` is not mutated; `Untranslatable` when it has no messages array.
    """
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list):
        raise Untranslatable("messages", "the request has no messages array to prefill")
    out = dict(body)
    messages = list(messages)
    out["messages"] = messages
    last = messages[-1] if messages else None
    if not (isinstance(last, dict) and last.get("role") == "assistant"):
        if text.rstrip():
            messages.append({"role": "assistant", "content": text.rstrip()})
        return out
    content = last.get("content")
    if isinstance(content, str):
        content = (content + text).rstrip()
    else:
        blocks = list(content) if isinstance(content, list) else []
        final = blocks[-1] if blocks else None
        if isinstance(final, dict) and final.get("type") == "text" and isinstance(final.get("text"), str):
            blocks[-1] = {**final, "text": (final["text"] + text).rstrip()}
        elif text.rstrip():
            blocks.append({"type": "text", "text": text.rstrip()})
        content = blocks
    messages[-1] = {**last, "content": content}
    return out
