"""Top-level request fields: OpenAI Chat Completions <-> Anthropic Messages (pure, no I/O).

What `rungate.translate.requests` needs besides the history: readers of single fields (absent and null are
None; a value of the wrong type is `Untranslatable`), the fields each direction handles or drops, and the
conversion of tools, tool_choice, reasoning (`EFFORT_BUDGETS`), stop sequences and structured-output formats.
"""

from __future__ import annotations

import math
from typing import Any

from rungate.translate.common import ANTHROPIC_TOOL_NAME, ToolNames, Untranslatable, note

__all__ = [
    "CHAT_DROPPED",
    "CHAT_HANDLED",
    "EFFORT_BUDGETS",
    "MESSAGES_DROPPED",
    "MESSAGES_HANDLED",
    "bool_field",
    "chat_response_format",
    "chat_tool_choice",
    "chat_tools",
    "dict_field",
    "drop_fields",
    "int_field",
    "messages_tools",
    "name_field",
    "number_field",
    "reasoning_and_format",
    "stop_sequences",
    "thinking_from_effort",
]

# reasoning_effort -> thinking budget; back: <= 2048 low, <= 8192 medium, else high (low/medium/high survive both ways).
EFFORT_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384, "xhigh": 24576, "max": 32000}
_MIN_BUDGET = 1024

# Fields with no equivalent on the other side, dropped with a warning unless they hold a value that changes nothing.
CHAT_DROPPED: dict[str, tuple[Any, ...]] = {
    "seed": (), "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "prediction": (),
    "store": (False,), "metadata": ({},), "service_tier": ("auto", "default"), "verbosity": (),
    "prompt_cache_key": (), "prompt_cache_retention": (), "prompt_cache_options": (), "moderation": (),
}
CHAT_HANDLED = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options", "n", "temperature",
    "top_p", "stop", "logprobs", "top_logprobs", "user", "safety_identifier", "response_format", "reasoning_effort",
    "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "modalities", "audio",
    "web_search_options", *CHAT_DROPPED,
})
MESSAGES_DROPPED: dict[str, tuple[Any, ...]] = {
    "top_k": (), "service_tier": ("auto",), "context_management": (), "inference_geo": (), "speed": (),
    "diagnostics": (),
}
MESSAGES_HANDLED = frozenset({
    "model", "messages", "system", "max_tokens", "stream", "temperature", "top_p", "stop_sequences", "tools",
    "tool_choice", "metadata", "thinking", "output_config", "cache_control", "mcp_servers", "container",
    *MESSAGES_DROPPED,
})


# --------------------------------------------------------------------------------------------------
# Field readers: absent and null are None; a value of the wrong type is Untranslatable.


def int_field(body: dict[str, Any], key: str, minimum: int) -> int | None:
    """An integer field of at least `minimum`."""
    value = body.get(key)
    if value is None:
        return None
    if type(value) is not int or value < minimum:
        raise Untranslatable(key, f"{key} must be an integer of at least {minimum}")
    return value


def number_field(body: dict[str, Any], key: str) -> float | None:
    """A finite number field."""
    value = body.get(key)
    if value is None:
        return None
    if type(value) is int:
        return value
    if type(value) is not float or not math.isfinite(value):
        raise Untranslatable(key, f"{key} must be a number")
    return value


def bool_field(body: dict[str, Any], key: str) -> bool | None:
    """A true/false field."""
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise Untranslatable(key, f"{key} must be true or false")
    return value


def dict_field(body: dict[str, Any], key: str) -> dict[str, Any] | None:
    """An object field."""
    value = body.get(key)
    if value is not None and not isinstance(value, dict):
        raise Untranslatable(key, f"{key} must be an object")
    return value


def name_field(value: Any, what: str) -> str:
    """`value` when it is a non-empty string (a name or id); `what` names the thing lacking it."""
    if not isinstance(value, str) or not value:
        raise Untranslatable(what, f"a {what} lacks its name or id")
    return value


def drop_fields(body: dict[str, Any], handled: frozenset[str], dropped: dict[str, tuple[Any, ...]],
                 target: str, warnings: list[str]) -> None:
    """Name in `warnings` the fields `target` has no equivalent of, and the unknown ones."""
    lost = [k for k, neutral in dropped.items() if body.get(k) is not None and body[k] not in neutral]
    if lost:
        note(warnings, f"{target} has no equivalent of {', '.join(lost)}; dropped.")
    unknown = sorted(k for k in body if k not in handled)
    if unknown:
        note(warnings, f"Unknown request fields were dropped: {', '.join(unknown)}.")


# --------------------------------------------------------------------------------------------------
# OpenAI Chat -> Anthropic Messages


def chat_tools(tools: Any) -> list[dict[str, Any]]:
    """Anthropic tools for OpenAI function tools (`parameters` -> `input_schema`)."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise Untranslatable("tools", "tools must be an array")
    out: list[dict[str, Any]] = []
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise Untranslatable("custom tools", "only function tools can be carried to Anthropic")
        function = dict_field(tool, "function") or {}
        name = name_field(function.get("name"), "tool")
        if not ANTHROPIC_TOOL_NAME.match(name):
            raise Untranslatable("tool name", f"the tool name {name!r} is not valid for Anthropic")
        schema = dict_field(function, "parameters")
        schema = {"type": "object", "properties": {}} if schema is None else schema
        converted: dict[str, Any] = {"name": name, "input_schema": schema if "type" in schema
                                     else {"type": "object", **schema}}
        if isinstance(function.get("description"), str):
            converted["description"] = function["description"]
        if isinstance(function.get("strict"), bool):
            converted["strict"] = function["strict"]
        out.append(converted)
    return out


def chat_tool_choice(choice: Any, parallel: bool | None, has_tools: bool) -> dict[str, Any] | None:
    """Anthropic tool_choice for OpenAI tool_choice and parallel_tool_calls; None when the default."""
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
        converted = {"type": "tool", "name": name_field(choice["function"].get("name"), "tool_choice")}
    else:
        kind = choice.get("type") if isinstance(choice, dict) else choice
        raise Untranslatable("tool_choice", f"tool_choice {kind!r} has no Anthropic equivalent")
    if parallel is False:
        converted["disable_parallel_tool_use"] = True
    elif choice is None:
        return None
    return converted


def thinking_from_effort(effort: Any, tool_choice: dict[str, Any] | None, messages: list[dict[str, Any]],
                         limit: int | None, out: dict[str, Any], warnings: list[str]) -> bool:
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
    if limit is None:  # the default is the whole output allowance (the target's own limit): thinking fits in it
        limit = out["max_tokens"]
    if limit <= budget:
        budget = limit // 2
        if budget < _MIN_BUDGET:
            note(warnings, f"reasoning_effort was dropped: max tokens {limit} leave no room to think.")
            return False
    out["thinking"] = {"type": "enabled", "budget_tokens": budget}
    return True


def stop_sequences(stop: Any, warnings: list[str]) -> list[str]:
    """Anthropic stop_sequences for OpenAI `stop` (whitespace-only ones dropped with a warning)."""
    if stop is None:
        return []
    sequences = [stop] if isinstance(stop, str) else stop
    if not isinstance(sequences, list) or not all(isinstance(s, str) for s in sequences):
        raise Untranslatable("stop", "stop must be a string or an array of strings")
    if any(not s.strip() for s in sequences):
        note(warnings, "Whitespace-only stop sequences were dropped: Anthropic does not accept them.")
    return [s for s in sequences if s.strip()]


def chat_response_format(response_format: dict[str, Any] | None, warnings: list[str]) -> dict[str, Any] | None:
    """Anthropic `output_config.format` for OpenAI response_format; None when there is none."""
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


def messages_tools(body: dict[str, Any], names: ToolNames, out: dict[str, Any]) -> None:
    """Set OpenAI tools, tool_choice and parallel_tool_calls on `out` from Anthropic tools and tool_choice."""
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise Untranslatable("tools", "tools must be an array")
    converted: list[dict[str, Any]] = []
    for tool in tools or []:
        kind = tool.get("type") if isinstance(tool, dict) else "invalid"
        if kind not in (None, "custom"):
            raise Untranslatable("server tools", f"the tool type {kind!r} has no OpenAI Chat equivalent")
        schema = dict_field(tool, "input_schema")
        function: dict[str, Any] = {"name": names.for_openai(name_field(tool.get("name"), "tool")),
                                    "parameters": schema or {"type": "object", "properties": {}}}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        if isinstance(tool.get("strict"), bool):
            function["strict"] = tool["strict"]
        converted.append({"type": "function", "function": function})
    choice = dict_field(body, "tool_choice")
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
                              "function": {"name": names.for_openai(name_field(choice.get("name"), "tool_choice"))}}
    elif kind in ("auto", "any", "none"):
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    else:
        raise Untranslatable("tool_choice", f"tool_choice {kind!r} has no OpenAI equivalent")
    if choice.get("disable_parallel_tool_use") is True and kind != "none":
        out["parallel_tool_calls"] = False


def reasoning_and_format(body: dict[str, Any], out: dict[str, Any], warnings: list[str]) -> None:
    """Set OpenAI reasoning_effort and response_format on `out` from Anthropic thinking and output_config."""
    thinking = dict_field(body, "thinking")
    if thinking is not None and thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if type(budget) is not int:
            raise Untranslatable("thinking", "thinking.budget_tokens must be an integer")
        out["reasoning_effort"] = "low" if budget <= 2048 else "medium" if budget <= 8192 else "high"
    config = dict_field(body, "output_config") or {}
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
