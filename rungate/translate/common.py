"""Vocabulary every translator shares: results, refusals, stop reasons, usage, tool names, defensive readers."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from rungate.usage import Usage

__all__ = [
    "ANTHROPIC_IMAGE_TYPES",
    "ANTHROPIC_TOOL_NAME",
    "ANTHROPIC_TO_OPENAI_FINISH",
    "ANTHROPIC_USAGE_COUNTS",
    "OPENAI_TO_ANTHROPIC_STOP",
    "OPENAI_TOOL_NAME_MAX",
    "RAW_ARGUMENTS",
    "ToolNames",
    "Translated",
    "Untranslatable",
    "anthropic_stop_reason",
    "as_dict",
    "as_str",
    "count",
    "index",
    "json_text",
    "note",
    "openai_finish_reason",
    "safe_tool_id",
    "text_blocks",
    "tool_arguments",
    "tool_input",
    "usage_to_chat",
    "usage_to_messages",
    "usage_to_responses",
    "utf8_size",
]


class Untranslatable(ValueError):
    """The request uses something the other format cannot carry; `feature` names it (e.g. "n > 1")."""

    def __init__(self, feature: str, message: str) -> None:
        super().__init__(message)
        self.feature = feature


@dataclass
class Translated:
    """A translated request: the target-format body, what was dropped, and how to map answers back.

    `tool_names` restores tool names the target format had to shorten (OpenAI allows 64 characters,
    Anthropic 128); answer and stream translators take it to give the agent its own names back.
    """

    body: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    tool_names: ToolNames = field(default_factory=lambda: ToolNames())


OPENAI_TOOL_NAME_MAX = 64
ANTHROPIC_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
ANTHROPIC_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
# The token counts of an Anthropic `usage` object (the other fields are details).
ANTHROPIC_USAGE_COUNTS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
_TOOL_NAME_OK = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ID_BAD = re.compile(r"[^A-Za-z0-9_-]")


@dataclass
class ToolNames:
    """Target-side tool names the translator had to change, mapped back to the agent's own names."""

    restore: dict[str, str] = field(default_factory=dict)

    def for_openai(self, name: str) -> str:
        """A name OpenAI accepts (`[A-Za-z0-9_-]{1,64}`): unchanged when valid, else a stable shortened form
        (a prefix plus 8 hex digits of its SHA-256) remembered for `original`."""
        if _TOOL_NAME_OK.match(name):
            return name
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        short = f"{_ID_BAD.sub('_', name)[:55]}_{digest}"
        self.restore[short] = name
        return short

    def original(self, name: str) -> str:
        """The agent's name for a target-side name."""
        return self.restore.get(name, name)


def safe_tool_id(tool_id: str) -> str:
    """A tool-call id Anthropic accepts (`^[A-Za-z0-9_-]+$`): other characters become `_` (deterministic, so
    the same function maps a `tool_result`'s `tool_use_id` to the same value)."""
    cleaned = _ID_BAD.sub("_", tool_id)
    return cleaned or "_"


# Anthropic `stop_reason` -> OpenAI `finish_reason` (reference/provider-formats.md §3.3).
ANTHROPIC_TO_OPENAI_FINISH: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
    "model_context_window_exceeded": "length",
    "compaction": "length",
}
# OpenAI `finish_reason` -> Anthropic `stop_reason`.
OPENAI_TO_ANTHROPIC_STOP: dict[str, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def openai_finish_reason(stop_reason: Any) -> str:
    """The OpenAI finish reason for an Anthropic stop reason (unknown or missing: `stop`)."""
    return ANTHROPIC_TO_OPENAI_FINISH.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def anthropic_stop_reason(finish_reason: Any) -> str:
    """The Anthropic stop reason for an OpenAI finish reason (unknown or missing: `end_turn`)."""
    return OPENAI_TO_ANTHROPIC_STOP.get(finish_reason, "end_turn") if isinstance(finish_reason, str) else "end_turn"


def usage_to_chat(usage: Usage) -> dict[str, Any]:
    """A Chat Completions `usage` object: `prompt_tokens` counts every input token (cache reads and writes
    included), `cached_tokens` the cache reads, `reasoning_tokens` the reasoning part of the output."""
    prompt = usage.total_input
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": usage.output,
        "total_tokens": prompt + usage.output,
        "prompt_tokens_details": {"cached_tokens": usage.cached},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning},
    }
    writes = usage.cache_write + usage.cache_write_1h
    if writes:
        out["prompt_tokens_details"]["cache_write_tokens"] = writes
    return out


def usage_to_messages(usage: Usage) -> dict[str, Any]:
    """An Anthropic `usage` object: `input_tokens` excludes cache reads and writes, which have their own
    fields (a complete object: the Anthropic SDK's stream helper needs every field)."""
    out: dict[str, Any] = {
        "input_tokens": usage.input,
        "output_tokens": usage.output,
        "cache_creation_input_tokens": usage.cache_write + usage.cache_write_1h,
        "cache_read_input_tokens": usage.cached,
    }
    if usage.cache_write_1h:
        out["cache_creation"] = {"ephemeral_5m_input_tokens": usage.cache_write,
                                 "ephemeral_1h_input_tokens": usage.cache_write_1h}
    return out


def usage_to_responses(usage: Usage) -> dict[str, Any]:
    """A Responses API `usage` object (`input_tokens` counts every input token, like chat's prompt_tokens)."""
    prompt = usage.total_input
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": usage.cached},
        "output_tokens": usage.output,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning},
        "total_tokens": prompt + usage.output,
    }


def note(warnings: list[str], text: str) -> None:
    """Add a warning unless it is already there (each dropped thing is named once)."""
    if text not in warnings:
        warnings.append(text)


def text_blocks(text: Any) -> list[dict[str, Any]]:
    """Anthropic text blocks for `text`: none when it is blank (Anthropic refuses empty and whitespace-only
    text blocks); `Untranslatable` when it is not a string."""
    if not isinstance(text, str):
        raise Untranslatable("content", "a text part lacks its text")
    return [{"type": "text", "text": text}] if text.strip() else []


# Defensive readers of untrusted JSON values: a value of the wrong type reads as missing.


def as_dict(value: Any) -> dict[str, Any]:
    """`value` when it is a JSON object, else {}."""
    return value if isinstance(value, dict) else {}


def as_str(value: Any) -> str:
    """`value` when it is a string, else ""."""
    return value if isinstance(value, str) else ""


def count(value: Any) -> int | None:
    """A token count: a non-negative int (bool excluded), else None."""
    return value if type(value) is int and value >= 0 else None


def index(value: Any) -> int | None:
    """An index field: an int (bool excluded), else None."""
    return value if type(value) is int else None


def utf8_size(text: str) -> int:
    """Bytes of `text` in UTF-8 (a lone surrogate, which JSON can carry, counts as its three bytes)."""
    return len(text.encode("utf-8", "surrogatepass"))


def json_text(value: Any) -> str:
    """Compact JSON of a decoded value; `Untranslatable` when it has none (NaN, infinity, absurd nesting)."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise Untranslatable("tool input", "a tool input cannot be written as JSON") from exc


# The key under which tool-call arguments that are not a JSON object travel as Anthropic `input`.
RAW_ARGUMENTS = "_raw_arguments"


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_no_constants)


def _closed(text: str) -> str | None:
    """`text` with its open strings and brackets closed when it looks cut short, else None."""
    closers: list[str] = []
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            closers.append("}" if char == "{" else "]")
        elif char in "}]" and (not closers or closers.pop() != char):
            return None
    if not closers:
        return None
    if in_string:
        text = (text[:-1] if escaped else text) + '"'
    else:
        text = text.rstrip().removesuffix(",")
    return text + "".join(reversed(closers))


def tool_input(arguments: Any, call_id: str) -> tuple[dict[str, Any], str | None]:
    """Anthropic `tool_use.input` (an object) for OpenAI tool-call `arguments` (a JSON string), and a
    warning when the arguments had to be mended.

    "" or null is `{}`; JSON cut short (a model stopped by `max_tokens`) is closed when that is enough;
    anything else that is not a JSON object travels whole as `{"_raw_arguments": <the text>}`.
    """
    if arguments is None or arguments == "":
        return {}, None
    if not isinstance(arguments, str):
        if isinstance(arguments, dict):  # some OpenAI-compatible servers send the object itself
            return arguments, None
        arguments = json_text(arguments)
    try:
        value = _loads(arguments)
    except (ValueError, RecursionError):
        value = None
        mended = _closed(arguments)
        if mended is not None:
            try:
                value = _loads(mended)
            except (ValueError, RecursionError):
                value = None
            if isinstance(value, dict):
                return value, f"The arguments of tool call {call_id} were cut-short JSON; they were closed."
    if isinstance(value, dict):
        return value, None
    return {RAW_ARGUMENTS: arguments}, (
        f"The arguments of tool call {call_id} were not a JSON object; they were passed as {RAW_ARGUMENTS}."
    )


def tool_arguments(tool_input: Any) -> str:
    """OpenAI tool-call `arguments` for an Anthropic `tool_use.input`: its compact JSON, or the original
    text when `tool_input` only wraps arguments that were not an object (see `tool_input`)."""
    if isinstance(tool_input, dict) and len(tool_input) == 1 and isinstance(tool_input.get(RAW_ARGUMENTS), str):
        return str(tool_input[RAW_ARGUMENTS])
    return json_text({} if tool_input is None else tool_input)
