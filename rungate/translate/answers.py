"""Non-stream answers: Anthropic `message` <-> OpenAI `chat.completion` (pure, no I/O).

Each function takes the decoded answer of the target and returns, in `Translated.body`, the answer the agent
expects in its own format (reference/provider-formats.md sections 3.2-3.4), carrying the model name the agent
asked for and its own tool names (through the `ToolNames` of the request's translation).

- An answer that is not a recognisable message / chat completion raises `Untranslatable` (feature "answer");
  a part of a recognisable answer that the agent's format cannot hold (thinking blocks, citations, a block
  type this module does not know) is dropped and named in `warnings`.
- Usage follows `rungate.translate.common`: an OpenAI agent's `prompt_tokens` counts cache reads and writes,
  an Anthropic agent's `input_tokens` does not.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from rungate.providers.metering import usage_from_chat, usage_from_messages
from rungate.translate.common import (
    ToolNames,
    Translated,
    Untranslatable,
    anthropic_stop_reason,
    note,
    openai_finish_reason,
    safe_tool_id,
    tool_arguments,
    tool_input,
    usage_to_chat,
    usage_to_messages,
)
from rungate.usage import Usage

__all__ = ["chat_to_message", "message_to_chat"]


def message_to_chat(answer: Any, *, model: str, tool_names: ToolNames, created: int | None = None) -> Translated:
    """Anthropic `message` answer -> OpenAI `chat.completion`.

    Text blocks are joined into `content` (None when there is no text); `tool_use` blocks become `tool_calls`
    (arguments: the compact JSON of `input`; names restored through `tool_names`); thinking blocks are dropped
    with a warning; `stop_reason` maps to `finish_reason` (`refusal` -> `content_filter`). `id` is
    "chatcmpl-" + the message id; `created` defaults to now. Raises `Untranslatable` (feature "answer") when
    `answer` is not a message.
    """
    content = answer.get("content") if isinstance(answer, dict) else None
    if not isinstance(content, list) or answer.get("type", "message") != "message":
        raise Untranslatable("answer", "the Anthropic answer is not a message")
    warnings: list[str] = []
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block, dict) and isinstance(block.get("text"), str):
            texts.append(block["text"])
            if block.get("citations"):
                note(warnings, "Citations in the answer were dropped: OpenAI Chat cannot carry them.")
        elif kind == "tool_use" and isinstance(block, dict):
            calls.append(_tool_call(block, tool_names, len(calls)))
        elif kind in ("thinking", "redacted_thinking"):
            note(warnings, "Thinking blocks in the answer were dropped: OpenAI Chat cannot carry them.")
        else:
            note(warnings, f"An answer block of type {kind!r} was dropped: OpenAI Chat cannot carry it.")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    source_id = answer.get("id")
    body: dict[str, Any] = {
        "id": f"chatcmpl-{source_id}" if isinstance(source_id, str) and source_id else f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": openai_finish_reason(answer.get("stop_reason"))}],
        "usage": usage_to_chat(usage_from_messages(answer) or Usage()),
    }
    return Translated(body, warnings, tool_names)


def _tool_call(block: dict[str, Any], tool_names: ToolNames, position: int) -> dict[str, Any]:
    call_id = block.get("id")
    name = block.get("name")
    return {
        "id": call_id if isinstance(call_id, str) and call_id else f"call_{position}",
        "type": "function",
        "function": {"name": tool_names.original(name) if isinstance(name, str) else "",
                     "arguments": tool_arguments(block.get("input"))},
    }


def chat_to_message(answer: Any, *, model: str, tool_names: ToolNames) -> Translated:
    """OpenAI `chat.completion` -> Anthropic `message`.

    `content` becomes a text block (omitted when empty); a `refusal` becomes a text block and stop_reason
    "refusal"; `tool_calls` become `tool_use` blocks whose `input` is the parsed arguments (JSON cut short is
    closed when trivially possible, anything else that is not an object travels as `{"_raw_arguments": text}`,
    with a warning) and whose names are restored through `tool_names`. `id` is "msg_" + the completion id
    (without its "chatcmpl-"). Only the first choice is used. Raises `Untranslatable` (feature "answer") when
    `answer` is not a chat completion or has no choices.
    """
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict) \
            or not isinstance(choices[0].get("message"), dict) or answer.get("object") != "chat.completion":
        raise Untranslatable("answer", "the OpenAI answer is not a chat completion with a choice")
    first: dict[str, Any] = choices[0]
    message: dict[str, Any] = first["message"]
    warnings: list[str] = []
    if len(choices) > 1:
        note(warnings, "Only the first of several choices was kept: Anthropic answers hold one message.")
    blocks: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, list):  # content parts, as some OpenAI-compatible servers answer
        text = "".join(p["text"] for p in text if isinstance(p, dict) and isinstance(p.get("text"), str))
    if isinstance(text, str) and text:
        blocks.append({"type": "text", "text": text})
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        blocks.append({"type": "text", "text": refusal})
    calls = message.get("tool_calls")
    for position, call in enumerate(calls if isinstance(calls, list) else []):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(call, dict):
            note(warnings, "A tool call that is not a function call was dropped: Anthropic cannot carry it.")
            continue
        raw_id = call.get("id")
        call_id = safe_tool_id(raw_id) if isinstance(raw_id, str) and raw_id else f"toolu_{position}"
        arguments, warning = tool_input(function.get("arguments"), call_id)
        if warning:
            note(warnings, warning)
        name = function.get("name")
        blocks.append({"type": "tool_use", "id": call_id,
                       "name": tool_names.original(name) if isinstance(name, str) else "", "input": arguments})
    if message.get("function_call") is not None:
        note(warnings, "A legacy function_call in the answer was dropped: Anthropic cannot carry it.")
    if isinstance(refusal, str) and refusal:
        stop_reason = "refusal"
    elif any(block["type"] == "tool_use" for block in blocks) and first.get("finish_reason") == "stop":
        stop_reason = "tool_use"  # OpenAI says "stop" when tool_choice forced the call
    else:
        stop_reason = anthropic_stop_reason(first.get("finish_reason"))
    source_id = answer.get("id")
    body: dict[str, Any] = {
        "id": "msg_" + (source_id.removeprefix("chatcmpl-") if isinstance(source_id, str) and source_id
                        else uuid.uuid4().hex),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage_to_messages(usage_from_chat(answer) or Usage()),
    }
    return Translated(body, warnings, tool_names)
