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
"""

from __future__ import annotations

import math
import re
from typing import Any

from rungate.translate.common import (
    ToolNames,
    Translated,
    Untranslatable,
    note,
    safe_tool_id,
    tool_arguments,
    tool_input,
)

__all__ = ["EFFORT_BUDGETS", "PLACEHOLDER_USER", "chat_to_messages", "messages_to_chat", "with_prefill"]

PLACEHOLDER_USER = "(continued)"
# reasoning_effort -> thinking budget; back: <= 2048 low, <= 8192 medium, else high (low/medium/high survive both ways).
EFFORT_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384, "xhigh": 24576, "max": 32000}
_MIN_BUDGET = 1024
_ANTHROPIC_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)(?:;[^,]*)?;base64,(.*)", re.DOTALL)

# Fields with no equivalent on the other side, dropped with a warning unless they hold a value that changes nothing.
_CHAT_DROPPED: dict[str, tuple[Any, ...]] = {
    "seed": (), "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "prediction": (),
    "store": (False,), "metadata": ({},), "service_tier": ("auto", "default"), "verbosity": (),
    "prompt_cache_key": (), "prompt_cache_retention": (), "prompt_cache_options": (), "moderation": (),
}
_CHAT_HANDLED = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options", "n", "temperature",
    "top_p", "stop", "logprobs", "top_logprobs", "user", "safety_identifier", "response_format", "reasoning_effort",
    "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "modalities", "audio",
    "web_search_options", *_CHAT_DROPPED,
})
_MESSAGES_DROPPED: dict[str, tuple[Any, ...]] = {
    "top_k": (), "service_tier": ("auto",), "context_management": (), "inference_geo": (), "speed": (),
    "diagnostics": (),
}
_MESSAGES_HANDLED = frozenset({
    "model", "messages", "system", "max_tokens", "stream", "temperature", "top_p", "stop_sequences", "tools",
    "tool_choice", "metadata", "thinking", "output_config", "cache_control", "mcp_servers", "container",
    *_MESSAGES_DROPPED,
})


# --------------------------------------------------------------------------------------------------
# Field readers: absent and null are None; a value of the wrong type is Untranslatable.


def _int(body: dict[str, Any], key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if type(value) is not int or value < minimum:
        raise Untranslatable(key, f"{key} must be an integer of at least {minimum}")
    return value


def _number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if type(value) is int:
        return value
    if type(value) is not float or not math.isfinite(value):
        raise Untranslatable(key, f"{key} must be a number")
    return value


def _bool(body: dict[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise Untranslatable(key, f"{key} must be true or false")
    return value


def _dict(body: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = body.get(key)
    if value is not None and not isinstance(value, dict):
        raise Untranslatable(key, f"{key} must be an object")
    return value


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise Untranslatable(what, f"a {what} lacks its name or id")
    return value


def _drop_fields(body: dict[str, Any], handled: frozenset[str], dropped: dict[str, tuple[Any, ...]],
                 target: str, warnings: list[str]) -> None:
    lost = [k for k, neutral in dropped.items() if body.get(k) is not None and body[k] not in neutral]
    if lost:
        note(warnings, f"{target} has no equivalent of {', '.join(lost)}; dropped.")
    unknown = sorted(k for k in body if k not in handled)
    if unknown:
        note(warnings, f"Unknown request fields were dropped: {', '.join(unknown)}.")


# --------------------------------------------------------------------------------------------------
# OpenAI Chat -> Anthropic Messages


def chat_to_messages(body: dict[str, Any], *, model: str, max_tokens_default: int) -> Translated:
    """OpenAI Chat Completions request -> Anthropic Messages request for target `model`.

    max_tokens = max_completion_tokens ?? max_tokens ?? max_tokens_default (plus the thinking budget when
    reasoning_effort turns thinking on and the agent set no limit). Keeps `stream`; drops `stream_options`
    (Anthropic always reports usage). Raises `Untranslatable` for what cannot be carried (see the module doc).
    """
    if not isinstance(body, dict):
        raise Untranslatable("request", "the request body is not a JSON object")
    warnings: list[str] = []
    _refuse_chat_features(body)
    system, messages = _chat_history(body.get("messages"), warnings)
    out: dict[str, Any] = {"model": model}
    if system:
        out["system"] = system
    out["messages"] = messages
    limit = _int(body, "max_completion_tokens", 1) or _int(body, "max_tokens", 1)
    out["max_tokens"] = limit or max_tokens_default
    if (stream := _bool(body, "stream")) is not None:
        out["stream"] = stream
    tools = _chat_tools(body.get("tools"))
    if tools:
        out["tools"] = tools
    tool_choice = _chat_tool_choice(body.get("tool_choice"), _bool(body, "parallel_tool_calls"), bool(tools))
    if tool_choice:
        out["tool_choice"] = tool_choice
    thinking = _thinking(body.get("reasoning_effort"), tool_choice, messages, limit, out, warnings)
    if (temperature := _number(body, "temperature")) is not None:
        if thinking and temperature != 1:
            note(warnings, "temperature was dropped: Anthropic allows no temperature with thinking on.")
        elif not 0 <= temperature <= 1:
            out["temperature"] = min(max(temperature, 0), 1)
            note(warnings, f"temperature {temperature} was clamped to Anthropic's range 0-1.")
        else:
            out["temperature"] = temperature
    if (top_p := _number(body, "top_p")) is not None:
        if thinking and top_p < 0.95:
            note(warnings, "top_p was dropped: Anthropic allows only top_p >= 0.95 with thinking on.")
        else:
            out["top_p"] = top_p
    if stop := _stop_sequences(body.get("stop"), warnings):
        out["stop_sequences"] = stop
    user = body.get("safety_identifier") or body.get("user")
    if user:
        out["metadata"] = {"user_id": _name(user, "user")}
    if fmt := _chat_response_format(_dict(body, "response_format"), warnings):
        out["output_config"] = {"format": fmt}
    _drop_fields(body, _CHAT_HANDLED, _CHAT_DROPPED, "Anthropic", warnings)
    return Translated(out, warnings)


def _refuse_chat_features(body: dict[str, Any]) -> None:
    if _int(body, "n", 1) not in (None, 1):
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


def _chat_history(messages: Any, warnings: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if not isinstance(messages, list) or not messages:
        raise Untranslatable("messages", "messages must be a non-empty array")
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict):
            raise Untranslatable("messages", "every message must be an object")
        role = message.get("role")
        if isinstance(message.get("name"), str) and message["name"]:
            note(warnings, "Message `name` fields were dropped: Anthropic has no equivalent.")
        if role in ("system", "developer"):
            system.extend(_chat_text_blocks(message.get("content")))
            continue
        if role == "user":
            blocks = _chat_user_blocks(message.get("content"))
        elif role == "assistant":
            blocks = _chat_assistant_blocks(message, warnings)
        elif role == "tool":
            role, blocks = "user", [_chat_tool_result(message)]
        else:
            raise Untranslatable("role", f"messages with role {role!r} cannot be carried to Anthropic")
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            # Stable sort: tool_result blocks must open the user turn that answers the tool calls.
            merged = turns[-1]["content"] + blocks
            turns[-1]["content"] = sorted(merged, key=lambda block: block["type"] != "tool_result")
        else:
            turns.append({"role": role, "content": blocks})
    if turns and turns[-1]["role"] == "assistant":
        turns.pop()
        note(warnings, "The final assistant message was dropped: Anthropic would continue it as a prefill.")
    if not turns:
        raise Untranslatable("messages", "the request has no user message for Anthropic")
    if turns[0]["role"] == "assistant":
        turns.insert(0, {"role": "user", "content": [{"type": "text", "text": PLACEHOLDER_USER}]})
        note(warnings, f"A user turn {PLACEHOLDER_USER!r} was added: Anthropic conversations start with the user.")
    return system, turns


def _chat_assistant_blocks(message: dict[str, Any], warnings: list[str]) -> list[dict[str, Any]]:
    if message.get("function_call") is not None:
        raise Untranslatable("legacy functions", "legacy `function_call` history is not translated")
    if message.get("audio") is not None:
        raise Untranslatable("audio", "assistant audio in the history cannot be carried to Anthropic")
    content = message.get("content")
    blocks = _chat_text_blocks(content, refusals=True)
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal.strip() and not isinstance(content, str):
        blocks.append({"type": "text", "text": refusal})
    calls = message.get("tool_calls")
    if calls is None:
        return blocks
    if not isinstance(calls, list):
        raise Untranslatable("tool_calls", "tool_calls must be an array")
    for call in calls:
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            raise Untranslatable("custom tools", "only function tool calls can be carried to Anthropic")
        function = call.get("function")
        if not isinstance(function, dict):
            raise Untranslatable("tool_calls", "a tool call lacks its function")
        call_id = _name(call.get("id"), "tool call")
        arguments, warning = tool_input(function.get("arguments"), call_id)
        if warning:
            note(warnings, warning)
        blocks.append({"type": "tool_use", "id": safe_tool_id(call_id),
                       "name": _name(function.get("name"), "tool call"), "input": arguments})
    return blocks


def _chat_tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise Untranslatable("tools", "tools must be an array")
    out: list[dict[str, Any]] = []
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise Untranslatable("custom tools", "only function tools can be carried to Anthropic")
        function = _dict(tool, "function") or {}
        name = _name(function.get("name"), "tool")
        if not _ANTHROPIC_TOOL_NAME.match(name):
            raise Untranslatable("tool name", f"the tool name {name!r} is not valid for Anthropic")
        schema = _dict(function, "parameters")
        schema = {"type": "object", "properties": {}} if schema is None else schema
        converted: dict[str, Any] = {"name": name, "input_schema": schema if "type" in schema
                                     else {"type": "object", **schema}}
        if isinstance(function.get("description"), str):
            converted["description"] = function["description"]
        if isinstance(function.get("strict"), bool):
            converted["strict"] = function["strict"]
        out.append(converted)
    return out


def _chat_tool_choice(choice: Any, parallel: bool | None, has_tools: bool) -> dict[str, Any] | None:
    if not has_tools:
        if choice in (None, "auto", "none"):
            return None
        raise Untranslatable("tool_choice", "tool_choice requires a tool but the request defines none")
    converted: dict[str, Any]
    if choice is None or choice == "auto":
        converted = {"type": "auto"}
    elif choice == "none":
        return {"type": "none"}
    elif choice == "required":
        converted = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        converted = {"type": "tool", "name": _name(choice["function"].get("name"), "tool_choice")}
    else:
        kind = choice.get("type") if isinstance(choice, dict) else choice
        raise Untranslatable("tool_choice", f"tool_choice {kind!r} has no Anthropic equivalent")
    if parallel is False:
        converted["disable_parallel_tool_use"] = True
    elif choice is None:
        return None
    return converted


def _thinking(effort: Any, tool_choice: dict[str, Any] | None, messages: list[dict[str, Any]], limit: int | None,
              out: dict[str, Any], warnings: list[str]) -> bool:
    """Turn reasoning_effort into `thinking` on `out` (adjusting max_tokens); whether thinking is on."""
    if effort is None or effort == "none":
        return False
    if not isinstance(effort, str) or effort not in EFFORT_BUDGETS:
        raise Untranslatable("reasoning_effort", f"reasoning_effort {effort!r} is not known")
    budget = EFFORT_BUDGETS[effort]
    if tool_choice is not None and tool_choice["type"] in ("any", "tool"):
        note(warnings, "reasoning_effort was dropped: Anthropic allows no thinking when a tool call is forced.")
        return False
    last_assistant = next((m for m in reversed(messages) if m["role"] == "assistant"), None)
    if last_assistant and any(block["type"] == "tool_use" for block in last_assistant["content"]):
        # Anthropic wants the signed thinking block of a tool loop's last turn; an OpenAI history has none.
        note(warnings, "reasoning_effort was dropped: the tool loop began without Anthropic thinking blocks.")
        return False
    if limit is None:
        out["max_tokens"] += budget
    elif limit <= budget:
        budget = limit // 2
        if budget < _MIN_BUDGET:
            note(warnings, f"reasoning_effort was dropped: max tokens {limit} leave no room to think.")
            return False
    out["thinking"] = {"type": "enabled", "budget_tokens": budget}
    return True


def _stop_sequences(stop: Any, warnings: list[str]) -> list[str]:
    if stop is None:
        return []
    sequences = [stop] if isinstance(stop, str) else stop
    if not isinstance(sequences, list) or not all(isinstance(s, str) for s in sequences):
        raise Untranslatable("stop", "stop must be a string or an array of strings")
    if any(not s.strip() for s in sequences):
        note(warnings, "Whitespace-only stop sequences were dropped: Anthropic does not accept them.")
    return [s for s in sequences if s.strip()]


def _chat_response_format(response_format: dict[str, Any] | None, warnings: list[str]) -> dict[str, Any] | None:
    kind = None if response_format is None else response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        note(warnings, "response_format json_object was dropped: Anthropic has no JSON mode without a schema.")
        return None
    if kind == "json_schema":
        spec = response_format.get("json_schema") if response_format else None
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(schema, dict):
            return {"type": "json_schema", "schema": schema}
    raise Untranslatable("response_format", f"response_format {kind!r} cannot be carried to Anthropic")


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
    messages = _system_message(body.get("system"))
    messages.extend(_messages_history(body.get("messages"), names, warnings))
    out: dict[str, Any] = {"model": model, "messages": messages}
    if (max_tokens := _int(body, "max_tokens", 0)) == 0:
        raise Untranslatable("max_tokens", "max_tokens 0 (a cache pre-warm) has no OpenAI equivalent")
    if max_tokens is not None:
        out["max_completion_tokens"] = max_tokens
    if (stream := _bool(body, "stream")) is not None:
        out["stream"] = stream
        if stream:
            out["stream_options"] = {"include_usage": True}
    for key in ("temperature", "top_p"):
        if (value := _number(body, key)) is not None:
            out[key] = value
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise Untranslatable("stop_sequences", "OpenAI takes at most 4 stop strings")
        if stop:
            out["stop"] = stop
    _messages_tools(body, names, out)
    metadata = _dict(body, "metadata") or {}
    if metadata.get("user_id"):
        out["user"] = _name(metadata["user_id"], "metadata.user_id")
    if set(metadata) - {"user_id"}:
        note(warnings, "metadata other than user_id was dropped: OpenAI has no equivalent.")
    _reasoning_and_format(body, out, warnings)
    _drop_fields(body, _MESSAGES_HANDLED, _MESSAGES_DROPPED, "OpenAI", warnings)
    return Translated(out, warnings, names)


def _system_message(system: Any) -> list[dict[str, Any]]:
    if system is None:
        return []
    if isinstance(system, str):
        blocks = [{"type": "text", "text": system}]
    elif isinstance(system, list):
        blocks = system
    else:
        raise Untranslatable("system", "system must be a string or an array of text blocks")
    content = _chat_content(_text_parts(blocks, "system"))
    return [{"role": "system", "content": content}] if content else []


def _messages_history(messages: Any, names: ToolNames, warnings: list[str]) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise Untranslatable("messages", "messages must be a non-empty array")
    turns: list[tuple[str, list[Any]]] = []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise Untranslatable("messages", "every message must be a user or assistant object")
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise Untranslatable("messages", "message content must be a string or an array of blocks")
        if turns and turns[-1][0] == role:  # Anthropic itself joins consecutive same-role turns
            turns[-1][1].extend(content)
        else:
            turns.append((role, list(content)))
    out: list[dict[str, Any]] = []
    for role, blocks in turns:
        if role == "user":
            out.extend(_messages_user(blocks))
        elif assistant := _messages_assistant(blocks, names, warnings):
            out.append(assistant)
    if turns[-1][0] == "assistant" and out and out[-1]["role"] == "assistant":
        note(warnings, "The final assistant turn (a prefill) was sent as history: OpenAI does not continue it.")
    return out


def _messages_assistant(blocks: list[Any], names: ToolNames, warnings: list[str]) -> dict[str, Any] | None:
    texts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for block in blocks:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.extend(_text_parts([block], "assistant"))
        elif kind == "tool_use":
            calls.append({"id": _name(block.get("id"), "tool_use"), "type": "function", "function": {
                "name": names.for_openai(_name(block.get("name"), "tool_use")),
                "arguments": tool_arguments(block.get("input"))}})
        elif kind in ("thinking", "redacted_thinking"):
            note(warnings, "Thinking blocks in the history were dropped: OpenAI Chat cannot carry them.")
        else:
            raise Untranslatable("server tools" if "tool" in str(kind) else "content",
                                 f"assistant {kind!r} blocks cannot be carried to OpenAI")
    if not texts and not calls:
        return None
    message: dict[str, Any] = {"role": "assistant", "content": _chat_content(texts)}
    if calls:
        message["tool_calls"] = calls
    return message


def _messages_tools(body: dict[str, Any], names: ToolNames, out: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise Untranslatable("tools", "tools must be an array")
    converted: list[dict[str, Any]] = []
    for tool in tools or []:
        kind = tool.get("type") if isinstance(tool, dict) else "invalid"
        if kind not in (None, "custom"):
            raise Untranslatable("server tools", f"the tool type {kind!r} has no OpenAI Chat equivalent")
        schema = _dict(tool, "input_schema")
        function: dict[str, Any] = {"name": names.for_openai(_name(tool.get("name"), "tool")),
                                    "parameters": schema or {"type": "object", "properties": {}}}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        if isinstance(tool.get("strict"), bool):
            function["strict"] = tool["strict"]
        converted.append({"type": "function", "function": function})
    choice = _dict(body, "tool_choice")
    kind = None if choice is None else choice.get("type")
    if not converted:
        if kind in (None, "auto", "none"):
            return
        raise Untranslatable("tool_choice", "tool_choice requires a tool but the request defines none")
    out["tools"] = converted
    if choice is None:
        return
    if kind == "tool":
        out["tool_choice"] = {"type": "function",
                              "function": {"name": names.for_openai(_name(choice.get("name"), "tool_choice"))}}
    elif kind in ("auto", "any", "none"):
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    else:
        raise Untranslatable("tool_choice", f"tool_choice {kind!r} has no OpenAI equivalent")
    if choice.get("disable_parallel_tool_use") is True and kind != "none":
        out["parallel_tool_calls"] = False


def _reasoning_and_format(body: dict[str, Any], out: dict[str, Any], warnings: list[str]) -> None:
    thinking = _dict(body, "thinking")
    if thinking is not None and thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if type(budget) is not int:
            raise Untranslatable("thinking", "thinking.budget_tokens must be an integer")
        out["reasoning_effort"] = "low" if budget <= 2048 else "medium" if budget <= 8192 else "high"
    config = _dict(body, "output_config") or {}
    effort = config.get("effort")
    if effort is not None:
        if not isinstance(effort, str) or effort not in EFFORT_BUDGETS:
            raise Untranslatable("output_config", f"output_config.effort {effort!r} is not known")
        out["reasoning_effort"] = effort
    fmt = config.get("format")
    if fmt is not None:
        schema = fmt.get("schema") if isinstance(fmt, dict) and fmt.get("type") == "json_schema" else None
        if not isinstance(schema, dict):
            raise Untranslatable("output_config", "only a json_schema output format can be carried to OpenAI")
        out["response_format"] = {"type": "json_schema",
                                  "json_schema": {"name": "output", "schema": schema, "strict": True}}
    if set(config) - {"effort", "format"}:
        note(warnings, "output_config fields other than effort and format were dropped.")


# --------------------------------------------------------------------------------------------------
# Content: OpenAI message parts <-> Anthropic content blocks


def _text_block(text: Any) -> list[dict[str, Any]]:
    if not isinstance(text, str):
        raise Untranslatable("content", "a text part lacks its text")
    return [{"type": "text", "text": text}] if text.strip() else []


def _chat_text_blocks(content: Any, refusals: bool = False) -> list[dict[str, Any]]:
    """Text blocks of a system, developer, assistant or tool message's content (blank text dropped)."""
    if content is None:
        return []
    if isinstance(content, str):
        return _text_block(content)
    if not isinstance(content, list):
        raise Untranslatable("content", "message content must be a string or an array of parts")
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks += _text_block(part.get("text"))
        elif kind == "refusal" and refusals:
            blocks += _text_block(part.get("refusal"))
        else:
            raise Untranslatable("content", f"{kind!r} parts cannot appear in this message")
    return blocks


def _chat_user_blocks(content: Any) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        return _chat_text_blocks(content)
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks += _text_block(part.get("text"))
        elif kind == "image_url":
            blocks.append(_image_block(part.get("image_url")))
        elif kind == "file":
            blocks.append(_document_block(part.get("file")))
        elif kind == "input_audio":
            raise Untranslatable("audio input", "Anthropic does not take audio input")
        else:
            raise Untranslatable("content", f"{kind!r} parts cannot be carried to Anthropic")
    return blocks


def _data_url(url: str) -> tuple[str, str]:
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise Untranslatable("content", "a URL is neither http(s) nor a base64 data URL")
    return match.group(1).lower(), match.group(2)


def _image_block(image: Any) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise Untranslatable("image", "an image part lacks its url")
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    media_type, data = _data_url(url)
    media_type = "image/jpeg" if media_type == "image/jpg" else media_type
    if media_type not in _IMAGE_TYPES:
        raise Untranslatable("image type", f"Anthropic takes JPEG, PNG, GIF and WebP images, not {media_type}")
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _document_block(file: Any) -> dict[str, Any]:
    if not isinstance(file, dict) or file.get("file_id") is not None:
        raise Untranslatable("file_id", "uploaded OpenAI files (file_id) cannot be read by Anthropic")
    data, filename = file.get("file_data"), file.get("filename")
    if not isinstance(data, str):
        raise Untranslatable("file", "a file part lacks its file_data")
    if data.startswith("data:"):
        media_type, data = _data_url(data)
    else:  # bare base64, typed only by its file name
        media_type = "application/pdf" if isinstance(filename, str) and filename.lower().endswith(".pdf") else "?"
    if media_type != "application/pdf":
        raise Untranslatable("file type", "only PDF files can be carried to Anthropic")
    block: dict[str, Any] = {"type": "document", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if isinstance(filename, str) and filename:
        block["title"] = filename
    return block


def _chat_tool_result(message: dict[str, Any]) -> dict[str, Any]:
    call_id = _name(message.get("tool_call_id"), "tool message")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": safe_tool_id(call_id)}
    content = message.get("content")
    if isinstance(content, str):
        if content.strip():
            block["content"] = content
    elif blocks := _chat_text_blocks(content):
        block["content"] = blocks
    return block


def _text_parts(blocks: list[Any], where: str) -> list[dict[str, Any]]:
    """OpenAI text parts for Anthropic text blocks (blank ones, cache_control and citations dropped)."""
    parts: list[dict[str, Any]] = []
    for block in blocks:
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise Untranslatable("content", f"{where} content must be text blocks")
        if block["text"].strip():
            parts.append({"type": "text", "text": block["text"]})
    return parts


def _chat_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]] | None:
    """Message content: one text part as a string, several parts as an array, none as None."""
    if len(parts) == 1 and parts[0]["type"] == "text":
        return str(parts[0]["text"])
    return parts or None


def _messages_user(blocks: list[Any]) -> list[dict[str, Any]]:
    """One Anthropic user turn as OpenAI messages: a tool message per tool_result, then a user message."""
    tools: list[dict[str, Any]] = []
    tool_images: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in blocks:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_result":
            tools.append(_messages_tool_result(block, tool_images))
        elif kind == "text":
            parts += _text_parts([block], "user")
        elif kind == "image":
            parts.append(_image_part(block))
        elif kind == "document":
            parts.append(_document_part(block))
        else:
            raise Untranslatable("content", f"user {kind!r} blocks cannot be carried to OpenAI")
    content = _chat_content(tool_images + parts)
    return tools + ([{"role": "user", "content": content}] if content else [])


def _messages_tool_result(block: dict[str, Any], images: list[dict[str, Any]]) -> dict[str, Any]:
    """A tool message; images the result holds go to `images` (OpenAI tool messages are text only)."""
    call_id = _name(block.get("tool_use_id"), "tool_result")
    content = block.get("content")
    texts: list[dict[str, Any]] = []
    found: list[dict[str, Any]] = []
    if isinstance(content, str):
        texts = [{"type": "text", "text": content}] if content else []
    elif isinstance(content, list):
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "image":
                found.append(_image_part(item))
            elif kind == "text":
                texts += _text_parts([item], "tool_result")
            else:
                raise Untranslatable("content", f"tool_result {kind!r} blocks cannot be carried to OpenAI")
    elif content is not None:
        raise Untranslatable("content", "tool_result content must be a string or an array of blocks")
    if found:
        images += [{"type": "text", "text": f"Images returned by tool call {call_id}:"}, *found]
    if block.get("is_error") is True:  # OpenAI has no error flag on tool messages
        first = texts[0]["text"] if texts else ""
        texts[:1] = [{"type": "text", "text": f"Error: {first}" if first else "Error"}]
    return {"role": "tool", "tool_call_id": call_id, "content": _chat_content(texts) or ""}


def _image_part(block: dict[str, Any]) -> dict[str, Any]:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source, dict) and isinstance(source.get("media_type"), str) \
            and isinstance(source.get("data"), str):
        return {"type": "image_url", "image_url": {"url": f"data:{source['media_type']};base64,{source['data']}"}}
    if kind == "url" and isinstance(source, dict) and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise Untranslatable("file_id" if kind == "file" else "image", f"{kind!r} image sources cannot reach OpenAI")


def _document_part(block: dict[str, Any]) -> dict[str, Any]:
    source = block.get("source")
    source = source if isinstance(source, dict) else {}
    kind, data = source.get("type"), source.get("data")
    if kind == "text" and isinstance(data, str):
        return {"type": "text", "text": data}
    if kind == "base64" and source.get("media_type") == "application/pdf" and isinstance(data, str):
        title = block.get("title")
        return {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{data}",
                                         "filename": title if isinstance(title, str) and title else "document.pdf"}}
    raise Untranslatable("file_id" if kind == "file" else "document", f"{kind!r} documents cannot reach OpenAI")


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
