"""OpenAI Responses API calls served by an Anthropic target: request and answer (pure, no I/O).

`responses_to_messages(body, model=, max_tokens_default=)` turns a `POST /v1/responses` body into a
`POST /v1/messages` body for `model`:

- `instructions` and every `system`/`developer` message (wherever it is) -> `system` text blocks, in order.
- `input` as a string -> one user turn. As a list of items: messages (content a string or `input_text`,
  `output_text`, `refusal`, `input_image`, `input_file` parts), `function_call` items -> `tool_use` blocks
  (`id` = `safe_tool_id(call_id)`, `input` = the parsed arguments), `function_call_output` items ->
  `tool_result` blocks. Consecutive items of one role form one turn (so a run of function calls is one
  assistant turn with several `tool_use`, a run of outputs one user turn), tool results first in it.
- Function tools -> Anthropic tools (`parameters` -> `input_schema`, `strict: true` kept); `tool_choice`
  auto/none/required/function -> auto/none/any/tool; `parallel_tool_calls: false` ->
  `disable_parallel_tool_use`; `max_output_tokens` (else `max_tokens_default`) -> `max_tokens`;
  `temperature` (clamped to 0..1) and `top_p` (dropped when both are set: newer Claude models refuse the
  pair); `stream`; `text.format` json_schema -> `output_config.format`; `safety_identifier`/`user` ->
  `metadata.user_id`.
- Raises `Untranslatable` for what Anthropic cannot carry: server-side state (`previous_response_id`,
  `conversation`, `prompt`, `item_reference`), `background`, built-in and custom tools, encrypted reasoning,
  OpenAI file ids, logprobs, `n > 1`, json_object mode, and shapes that are not a valid request.
- Known keys without an Anthropic counterpart (`metadata`, `store`, `reasoning`, `include`, ...) and
  unknown keys are dropped, each named in `warnings`.

The `input` items are carried by `rungate.translate.responses_input`.

`message_to_response(answer, model=, tool_names=)` turns an Anthropic `message` into a Responses `response`
object; `MessagesToResponses` (from `responses_stream`, re-exported here) does the same for a stream. Both
build their output with `rungate.translate.responses_output`, so they give the same output items: a `message`
item per run of text blocks, a `function_call` item per `tool_use`, `status` "incomplete" when the answer was
cut short, usage counting cache reads and writes as input.
"""

from __future__ import annotations

import time
from typing import Any

from rungate.providers.metering import usage_from_messages
from rungate.translate.common import ANTHROPIC_TOOL_NAME, ToolNames, Translated, Untranslatable, text_blocks
from rungate.translate.responses_input import describe, input_turns, need
from rungate.translate.responses_output import (
    compact_json,
    dropped_warning,
    function_call_item,
    function_call_item_id,
    message_item,
    message_item_id,
    response_id_for,
    response_object,
    responses_usage,
    terminal_status,
)
from rungate.translate.responses_stream import MessagesToResponses

__all__ = ["MessagesToResponses", "message_to_response", "responses_to_messages"]

# Keys that make the answer depend on something Anthropic does not have.
_REFUSED: dict[str, str] = {
    "previous_response_id": "server-side conversation state (previous_response_id) lives at OpenAI",
    "conversation": "server-side conversations live at OpenAI",
    "prompt": "stored prompt templates live at OpenAI",
}
# Keys dropped with a warning when set: no Anthropic counterpart, and the answer is still the model's answer.
_DROPPED: dict[str, str] = {
    "metadata": "Anthropic's metadata carries only a user id",
    "store": "Anthropic keeps no responses for later retrieval",
    "reasoning": "reasoning settings have no portable Anthropic equivalent",
    "include": "no extra output (encrypted reasoning, sources) is available from Anthropic",
    "stream_options": "Anthropic streams have no such options",
    "truncation": "Anthropic does not truncate input automatically",
    "service_tier": "OpenAI service tiers do not apply",
    "max_tool_calls": "it limits OpenAI's built-in tool calls",
    "prompt_cache_key": "Anthropic caches by prefix, without a key",
    "prompt_cache_retention": "Anthropic cache lifetimes are set per block",
    "prompt_cache_options": "Anthropic cache lifetimes are set per block",
    "context_management": "OpenAI's context management does not apply",
    "moderation": "OpenAI moderation does not apply",
    "image": "OpenAI image settings do not apply",
    "access_programs": "OpenAI access programs do not apply",
    "background_options": "background mode is not used",
}
# Values of dropped keys that ask for nothing, so dropping them loses nothing.
_HARMLESS: dict[str, tuple[Any, ...]] = {"store": (False,), "truncation": ("disabled",)}
_TRANSLATED = frozenset({"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls",
                         "max_output_tokens", "temperature", "top_p", "stream", "text", "user",
                         "safety_identifier", "background", "n", "top_logprobs"})


# --------------------------------------------------------------------------------------------------
# Requests


def responses_to_messages(body: dict[str, Any], *, model: str, max_tokens_default: int) -> Translated:
    """Responses request -> Anthropic Messages request for target `model` (see the module docstring)."""
    if not isinstance(body, dict):
        raise Untranslatable("request", "the request body is not a JSON object")
    _refuse_unportable(body)
    warnings: list[str] = []
    system: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise Untranslatable("instructions", "`instructions` must be a string")
        system += text_blocks(instructions)
    if "input" not in body:
        raise Untranslatable("input", "a request without `input` relies on server-side state")
    messages = input_turns(body["input"], system, warnings)
    if not messages:
        raise Untranslatable("input", "the request has no user or assistant content to send")
    out: dict[str, Any] = {"model": model, "max_tokens": max_tokens_default, "messages": messages}
    if system:
        out["system"] = system
    max_tokens = body.get("max_output_tokens")
    if max_tokens is not None:
        if type(max_tokens) is not int or max_tokens < 1:
            raise Untranslatable("max_output_tokens", "`max_output_tokens` must be a positive integer")
        out["max_tokens"] = max_tokens
    _sampling(body, out, warnings)
    stream = body.get("stream")
    if stream is not None:
        if not isinstance(stream, bool):
            raise Untranslatable("stream", "`stream` must be a boolean")
        if stream:
            out["stream"] = True
    tools = _tools(body.get("tools"))
    if tools:
        out["tools"] = tools
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"), bool(tools), warnings)
    if choice is not None:
        out["tool_choice"] = choice
    _text_config(body.get("text"), out, warnings)
    user = body.get("safety_identifier") or body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise Untranslatable("user", "`user` / `safety_identifier` must be a string")
        out["metadata"] = {"user_id": user}
    for key, why in _DROPPED.items():
        value = body.get(key)
        if value is not None and value not in _HARMLESS.get(key, ()) and value not in ({}, []):
            warnings.append(f"{key} dropped: {why}")
    unknown = sorted(key for key in body if key not in _TRANSLATED and key not in _DROPPED)
    if unknown:
        warnings.append("unknown request keys dropped: " + ", ".join(unknown))
    return Translated(body=out, warnings=warnings, tool_names=ToolNames())


def _refuse_unportable(body: dict[str, Any]) -> None:
    for key, why in _REFUSED.items():
        if body.get(key) is not None:
            raise Untranslatable(key, f"{key} cannot be served by Anthropic: {why}")
    if body.get("background") not in (None, False):
        raise Untranslatable("background", "background responses are stored and polled at OpenAI")
    if body.get("n") not in (None, 1):
        raise Untranslatable("n > 1", "Anthropic returns one answer per call")
    if body.get("top_logprobs") not in (None, 0):
        raise Untranslatable("logprobs", "Anthropic returns no log probabilities")
    include = body.get("include")
    if isinstance(include, list) and "message.output_text.logprobs" in include:
        raise Untranslatable("logprobs", "Anthropic returns no log probabilities")


def _sampling(body: dict[str, Any], out: dict[str, Any], warnings: list[str]) -> None:
    temperature, top_p = body.get("temperature"), body.get("top_p")
    if temperature is not None:
        value = _number(temperature, "temperature")
        if value > 1:
            warnings.append(f"temperature {value:g} clamped to 1: Anthropic's range is 0..1")
            value = 1.0
        out["temperature"] = value
    if top_p is not None:
        value = _number(top_p, "top_p")
        if value > 1:
            raise Untranslatable("top_p", "`top_p` must be at most 1")
        if temperature is not None:
            warnings.append("top_p dropped: newer Claude models refuse temperature and top_p together")
        else:
            out["top_p"] = value


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or value < 0:
        raise Untranslatable(key, f"`{key}` must be a non-negative number")
    return float(value)


def _tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise Untranslatable("tools", "`tools` must be a list")
    out: list[dict[str, Any]] = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise Untranslatable("tools", f"{where} is not an object")
        kind = tool.get("type")
        if kind != "function":
            raise Untranslatable(f"built-in tool {describe(kind)}",
                                 f"{where}: the {describe(kind)} tool has no Anthropic equivalent")
        name = need(tool, "name", str, where)
        if not ANTHROPIC_TOOL_NAME.match(name):
            raise Untranslatable("tool name", f"{where}: {name!r} is not a valid Anthropic tool name")
        schema = tool.get("parameters")
        if schema is None:
            schema = {"type": "object", "properties": {}}
        elif not isinstance(schema, dict):
            raise Untranslatable("tools", f"{where}: `parameters` must be a JSON schema object")
        converted: dict[str, Any] = {"name": name, "input_schema": schema}
        description = tool.get("description")
        if isinstance(description, str) and description:
            converted["description"] = description
        if tool.get("strict") is True:
            converted["strict"] = True
        out.append(converted)
    return out


def _tool_choice(choice: Any, parallel: Any, has_tools: bool, warnings: list[str]) -> dict[str, Any] | None:
    if parallel is not None and not isinstance(parallel, bool):
        raise Untranslatable("parallel_tool_calls", "`parallel_tool_calls` must be a boolean")
    converted: dict[str, Any]
    if choice is None or choice == "auto":
        converted = {"type": "auto"}
    elif choice == "none":
        converted = {"type": "none"}
    elif choice == "required":
        converted = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        converted = {"type": "tool", "name": need(choice, "name", str, "tool_choice")}
    else:
        kind = choice.get("type") if isinstance(choice, dict) else choice
        raise Untranslatable(f"tool_choice {describe(kind)}", f"tool_choice {describe(kind)} has no Anthropic "
                             "equivalent")
    if not has_tools:
        # Anthropic refuses a tool_choice without tools; only a forcing one asked for something.
        if converted["type"] in ("any", "tool"):
            warnings.append("tool_choice dropped: the request has no tools to choose from")
        return None
    if parallel is False and converted["type"] != "none":
        converted["disable_parallel_tool_use"] = True
    return None if choice is None and parallel is not False else converted


def _text_config(text: Any, out: dict[str, Any], warnings: list[str]) -> None:
    if text is None:
        return
    if not isinstance(text, dict):
        raise Untranslatable("text", "`text` must be an object")
    fmt = text.get("format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_schema":
            schema = need(fmt, "schema", dict, "text.format")
            out["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
        elif kind == "json_object":
            raise Untranslatable("json_object", "Anthropic has no schema-less JSON mode")
        elif kind != "text":
            raise Untranslatable("text.format", f"text.format {describe(kind)} has no Anthropic equivalent")
    if text.get("verbosity") not in (None, "medium"):
        warnings.append("text.verbosity dropped: Anthropic has no verbosity setting")
    extra = sorted(key for key in text if key not in ("format", "verbosity"))
    if extra:
        warnings.append("unknown text keys dropped: " + ", ".join(extra))


# --------------------------------------------------------------------------------------------------
# Answers


def message_to_response(answer: Any, *, model: str, tool_names: ToolNames, created: int | None = None) -> Translated:
    """Anthropic `message` -> a Responses `response` object (see the module docstring); `Translated.body` is
    the response. Raises Untranslatable when the answer is not a recognisable message."""
    content = answer.get("content") if isinstance(answer, dict) else None
    if not isinstance(answer, dict) or answer.get("type") != "message" or not isinstance(content, list):
        raise Untranslatable("answer", "the upstream answer is not an Anthropic message")
    warnings: list[str] = []
    response_id = response_id_for(answer.get("id"))
    status, reason = terminal_status(answer.get("stop_reason"))
    output: list[dict[str, Any]] = []
    pending: list[str] = []  # the current run of text blocks
    messages = 0

    def flush() -> None:
        nonlocal messages
        text = "".join(pending)
        pending.clear()
        if text:
            output.append(message_item(message_item_id(response_id, messages), text, "completed"))
            messages += 1

    for index, block in enumerate(content):
        where = f"content[{index}]"
        if not isinstance(block, dict):
            raise Untranslatable("answer", f"{where} of the upstream answer is not an object")
        kind = block.get("type")
        if kind == "text":
            pending.append(need(block, "text", str, where))
            if block.get("citations") and dropped_warning("citations") not in warnings:
                warnings.append(dropped_warning("citations"))
        elif kind == "tool_use":
            flush()
            call_id = need(block, "id", str, where)
            name = tool_names.original(need(block, "name", str, where))
            tool_input = need(block, "input", dict, where)
            try:
                arguments = compact_json(tool_input)
            except ValueError as exc:
                raise Untranslatable("answer", f"{where}: {exc}") from None
            output.append(function_call_item(function_call_item_id(call_id, len(output)), call_id, name, arguments,
                                             "completed"))
        else:
            warning = dropped_warning(describe(kind))
            if warning not in warnings:
                warnings.append(warning)
    flush()
    if status == "incomplete" and output and output[-1]["type"] == "message":
        output[-1]["status"] = "incomplete"
    body = response_object(response_id=response_id, created=int(time.time()) if created is None else created,
                           model=model, status=status, output=output,
                           usage=responses_usage(usage_from_messages(answer)), incomplete_reason=reason)
    return Translated(body=body, warnings=warnings, tool_names=tool_names)
