"""OpenAI Responses `input` items -> Anthropic Messages turns (pure, no I/O).

`input_turns` carries out the `input` rules of `rungate.translate.responses` (see its module docstring):
messages and their content parts, `function_call` items -> `tool_use` blocks, `function_call_output` items ->
`tool_result` blocks, system and developer messages -> `system` text blocks. Also home of `need` and
`describe`, the readers the request and answer translators share: a value of the wrong type is
`Untranslatable`, naming where it is.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from rungate.translate.common import (
    ANTHROPIC_IMAGE_TYPES,
    ANTHROPIC_TOOL_NAME,
    Untranslatable,
    safe_tool_id,
    text_blocks,
)

__all__ = ["describe", "input_turns", "need"]

_DATA_URL = re.compile(r"^data:([^;,]*)(?:;[^;,]*)*;base64,(.*)$", re.DOTALL)


def describe(value: Any) -> str:
    """A value named in a refusal: itself when a string, else its type."""
    return value if isinstance(value, str) else type(value).__name__


def need(obj: dict[str, Any], key: str, kind: type[Any], where: str) -> Any:
    """`obj[key]` when it is a `kind` (bool excluded), else `Untranslatable` naming `where`."""
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise Untranslatable(where, f"{where}: `{key}` must be {kind.__name__}, not {type(value).__name__}")
    return value


def input_turns(items: Any, system: list[dict[str, Any]], warnings: list[str]) -> list[dict[str, Any]]:
    """Anthropic turns for Responses `input`; system and developer text goes to `system`."""
    if isinstance(items, str):
        blocks = text_blocks(items)
        return [{"role": "user", "content": blocks}] if blocks else []
    if not isinstance(items, list):
        raise Untranslatable("input", "`input` must be a string or a list of items")
    turns: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": list(blocks)})

    for position, item in enumerate(items):
        where = f"input[{position}]"
        if not isinstance(item, dict):
            raise Untranslatable("input", f"{where} is not an object")
        kind = item.get("type", "message")
        if kind == "message":
            role, blocks = _message(item, where)
            if role == "system":
                system.extend(blocks)
            else:
                add(role, blocks)
        elif kind == "function_call":
            add("assistant", [_tool_use(item, where, warnings)])
        elif kind == "function_call_output":
            add("user", [_tool_result(item, where)])
        elif kind == "reasoning":
            if item.get("encrypted_content") is not None:
                raise Untranslatable("encrypted reasoning", f"{where}: OpenAI's encrypted reasoning cannot be read")
            if "reasoning dropped" not in " ".join(warnings):
                warnings.append("reasoning dropped: OpenAI reasoning items cannot become signed Anthropic thinking")
        elif kind == "item_reference":
            raise Untranslatable("item_reference", f"{where}: item references point at items stored at OpenAI")
        else:
            raise Untranslatable(f"input item {describe(kind)}", f"{where}: {describe(kind)} items have no "
                                 "Anthropic equivalent")
    for turn in turns:
        if turn["role"] == "user":
            # Anthropic wants the answers to the previous turn's tool calls first (reference §3.7).
            turn["content"].sort(key=lambda block: block["type"] != "tool_result")
    return turns


def _message(item: dict[str, Any], where: str) -> tuple[str, list[dict[str, Any]]]:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise Untranslatable("role", f"{where}: role {describe(role)} is not user, assistant, system or developer")
    target = "system" if role in ("system", "developer") else role
    content = item.get("content")
    if isinstance(content, str):
        return target, text_blocks(content)
    if not isinstance(content, list):
        raise Untranslatable("content", f"{where}: `content` must be a string or a list of parts")
    blocks: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        blocks += _part(part, target, f"{where}.content[{index}]")
    return target, blocks


def _part(part: Any, role: str, where: str) -> list[dict[str, Any]]:
    """One content part as Anthropic blocks (`role` "tool" for function_call_output parts)."""
    if not isinstance(part, dict):
        raise Untranslatable("content", f"{where} is not an object")
    kind = part.get("type")
    if kind in ("input_text", "output_text") or (kind == "refusal" and role == "assistant"):
        return text_blocks(need(part, "refusal" if kind == "refusal" else "text", str, where))
    if kind in ("input_image", "input_file") and role in ("user", "tool"):
        return [_image(part, where) if kind == "input_image" else _file(part, where)]
    raise Untranslatable(f"content part {describe(kind)}",
                         f"{where}: {describe(kind)} parts cannot go into an Anthropic {role} turn")


def _image(part: dict[str, Any], where: str) -> dict[str, Any]:
    if part.get("file_id") is not None:
        raise Untranslatable("input_image file_id", f"{where}: OpenAI file ids mean nothing to Anthropic")
    url = need(part, "image_url", str, where)
    match = _DATA_URL.match(url)
    if match:
        media_type = match.group(1).lower()
        if media_type not in ANTHROPIC_IMAGE_TYPES:
            raise Untranslatable("image type", f"{where}: Anthropic takes JPEG, PNG, GIF and WebP, not {media_type}")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": match.group(2)}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise Untranslatable("image url", f"{where}: `image_url` must be a data URL or an http(s) URL")


def _file(part: dict[str, Any], where: str) -> dict[str, Any]:
    if part.get("file_id") is not None:
        raise Untranslatable("input_file file_id", f"{where}: OpenAI file ids mean nothing to Anthropic")
    data, url = part.get("file_data"), part.get("file_url")
    if isinstance(data, str):
        match = _DATA_URL.match(data)
        media_type, payload = (match.group(1).lower(), match.group(2)) if match else ("application/pdf", data)
        if media_type == "application/pdf":
            source = {"type": "base64", "media_type": media_type, "data": payload}
        elif media_type == "text/plain":
            try:
                text = base64.b64decode(payload, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                raise Untranslatable("input_file", f"{where}: `file_data` is not base64 UTF-8 text") from None
            source = {"type": "text", "media_type": media_type, "data": text}
        else:
            raise Untranslatable("file type", f"{where}: Anthropic documents are PDF or plain text, not {media_type}")
    elif isinstance(url, str) and url.startswith(("https://", "http://")):
        source = {"type": "url", "url": url}
    else:
        raise Untranslatable("input_file", f"{where}: an input_file needs `file_data` or an http(s) `file_url`")
    block: dict[str, Any] = {"type": "document", "source": source}
    if isinstance(part.get("filename"), str) and part["filename"]:
        block["title"] = part["filename"]
    return block


def _tool_use(item: dict[str, Any], where: str, warnings: list[str]) -> dict[str, Any]:
    call_id = need(item, "call_id", str, where)
    name = need(item, "name", str, where)
    if not ANTHROPIC_TOOL_NAME.match(name):
        raise Untranslatable("tool name", f"{where}: {name!r} is not a valid Anthropic tool name")
    arguments = item.get("arguments")
    tool_input: Any = arguments
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        tool_input = {}
    elif isinstance(arguments, str):
        try:
            tool_input = json.loads(arguments)
        except (ValueError, RecursionError):
            tool_input = None
        if not isinstance(tool_input, dict):
            # Anthropic's `input` must be an object; keep the model's text rather than lose the call.
            warnings.append(f"{where}: arguments of call {call_id} are not a JSON object; sent as _raw_arguments")
            tool_input = {"_raw_arguments": arguments}
    elif not isinstance(arguments, dict):
        raise Untranslatable("function_call", f"{where}: `arguments` must be a JSON string")
    return {"type": "tool_use", "id": safe_tool_id(call_id), "name": name, "input": tool_input}


def _tool_result(item: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = need(item, "call_id", str, where)
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": safe_tool_id(call_id)}
    output = item.get("output")
    if isinstance(output, list):
        parts: list[dict[str, Any]] = []
        for index, part in enumerate(output):
            parts += _part(part, "tool", f"{where}.output[{index}]")
        if parts:
            block["content"] = parts
    elif isinstance(output, str):
        if output:
            block["content"] = output
    else:
        raise Untranslatable("function_call_output", f"{where}: `output` must be a string or a list of parts")
    return block
