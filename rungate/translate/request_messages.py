"""Conversation history: OpenAI Chat messages <-> Anthropic Messages turns (pure, no I/O).

- OpenAI -> Anthropic (`chat_history`): system/developer messages (wherever they are) become top-level
  `system` text blocks; consecutive same-role turns merge, with `tool_result` blocks first; blank text is
  dropped; a trailing assistant turn is dropped (with a warning) and a history opening with an assistant turn
  gets a `PLACEHOLDER_USER` turn before it.
- Anthropic -> OpenAI (`system_message`, `messages_history`): consecutive same-role turns are joined as
  Anthropic joins them; each `tool_result` becomes a tool message, images it holds go to the user message
  after it; thinking blocks are dropped with a warning.
"""

from __future__ import annotations

from typing import Any

from rungate.translate.common import ToolNames, Untranslatable, note, safe_tool_id, tool_arguments, tool_input
from rungate.translate.request_content import (
    chat_content,
    chat_text_blocks,
    chat_user_blocks,
    document_part,
    image_part,
    text_parts,
)
from rungate.translate.request_fields import name_field

__all__ = ["PLACEHOLDER_USER", "chat_history", "messages_history", "system_message"]

PLACEHOLDER_USER = "(continued)"


# --------------------------------------------------------------------------------------------------
# OpenAI Chat -> Anthropic Messages


def chat_history(messages: Any, warnings: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Anthropic (`system` blocks, turns) for OpenAI messages (see the module docstring)."""
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
            system.extend(chat_text_blocks(message.get("content")))
            continue
        if role == "user":
            blocks = chat_user_blocks(message.get("content"))
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
    blocks = chat_text_blocks(content, refusals=True)
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
        call_id = name_field(call.get("id"), "tool call")
        arguments, warning = tool_input(function.get("arguments"), call_id)
        if warning:
            note(warnings, warning)
        blocks.append({"type": "tool_use", "id": safe_tool_id(call_id),
                       "name": name_field(function.get("name"), "tool call"), "input": arguments})
    return blocks


def _chat_tool_result(message: dict[str, Any]) -> dict[str, Any]:
    call_id = name_field(message.get("tool_call_id"), "tool message")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": safe_tool_id(call_id)}
    content = message.get("content")
    if isinstance(content, str):
        if content.strip():
            block["content"] = content
    elif blocks := chat_text_blocks(content):
        block["content"] = blocks
    return block


# --------------------------------------------------------------------------------------------------
# Anthropic Messages -> OpenAI Chat


def system_message(system: Any) -> list[dict[str, Any]]:
    """The OpenAI system message for Anthropic `system` (none when it holds no text)."""
    if system is None:
        return []
    if isinstance(system, str):
        blocks = [{"type": "text", "text": system}]
    elif isinstance(system, list):
        blocks = system
    else:
        raise Untranslatable("system", "system must be a string or an array of text blocks")
    content = chat_content(text_parts(blocks, "system"))
    return [{"role": "system", "content": content}] if content else []


def messages_history(messages: Any, names: ToolNames, warnings: list[str]) -> list[dict[str, Any]]:
    """OpenAI messages for Anthropic turns (see the module docstring)."""
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
            texts.extend(text_parts([block], "assistant"))
        elif kind == "tool_use":
            calls.append({"id": name_field(block.get("id"), "tool_use"), "type": "function", "function": {
                "name": names.for_openai(name_field(block.get("name"), "tool_use")),
                "arguments": tool_arguments(block.get("input"))}})
        elif kind in ("thinking", "redacted_thinking"):
            note(warnings, "Thinking blocks in the history were dropped: OpenAI Chat cannot carry them.")
        else:
            raise Untranslatable("server tools" if "tool" in str(kind) else "content",
                                 f"assistant {kind!r} blocks cannot be carried to OpenAI")
    if not texts and not calls:
        return None
    message: dict[str, Any] = {"role": "assistant", "content": chat_content(texts)}
    if calls:
        message["tool_calls"] = calls
    return message


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
            parts += text_parts([block], "user")
        elif kind == "image":
            parts.append(image_part(block))
        elif kind == "document":
            parts.append(document_part(block))
        else:
            raise Untranslatable("content", f"user {kind!r} blocks cannot be carried to OpenAI")
    content = chat_content(tool_images + parts)
    return tools + ([{"role": "user", "content": content}] if content else [])


def _messages_tool_result(block: dict[str, Any], images: list[dict[str, Any]]) -> dict[str, Any]:
    """A tool message; images the result holds go to `images` (OpenAI tool messages are text only)."""
    call_id = name_field(block.get("tool_use_id"), "tool_result")
    content = block.get("content")
    texts: list[dict[str, Any]] = []
    found: list[dict[str, Any]] = []
    if isinstance(content, str):
        texts = [{"type": "text", "text": content}] if content else []
    elif isinstance(content, list):
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "image":
                found.append(image_part(item))
            elif kind == "text":
                texts += text_parts([item], "tool_result")
            else:
                raise Untranslatable("content", f"tool_result {kind!r} blocks cannot be carried to OpenAI")
    elif content is not None:
        raise Untranslatable("content", "tool_result content must be a string or an array of blocks")
    if found:
        images += [{"type": "text", "text": f"Images returned by tool call {call_id}:"}, *found]
    if block.get("is_error") is True:  # OpenAI has no error flag on tool messages
        first = texts[0]["text"] if texts else ""
        texts[:1] = [{"type": "text", "text": f"Error: {first}" if first else "Error"}]
    return {"role": "tool", "tool_call_id": call_id, "content": chat_content(texts) or ""}
