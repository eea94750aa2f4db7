"""Content: OpenAI message parts <-> Anthropic content blocks (pure, no I/O).

Blank text parts and blocks are dropped both ways. OpenAI -> Anthropic takes text, images (http(s) URLs or
base64 data URLs of JPEG, PNG, GIF or WebP) and PDF files; Anthropic -> OpenAI takes text, images and PDF or
text documents. Anything else (audio, `file_id` files, other types) is `Untranslatable`.
"""

from __future__ import annotations

import re
from typing import Any

from rungate.translate.common import ANTHROPIC_IMAGE_TYPES, Untranslatable, text_blocks

__all__ = [
    "chat_content",
    "chat_text_blocks",
    "chat_user_blocks",
    "document_part",
    "image_part",
    "text_parts",
]

_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)(?:;[^,]*)?;base64,(.*)", re.DOTALL)


# --------------------------------------------------------------------------------------------------
# OpenAI message parts -> Anthropic content blocks


def chat_text_blocks(content: Any, refusals: bool = False) -> list[dict[str, Any]]:
    """Text blocks of a system, developer, assistant or tool message's content (blank text dropped)."""
    if content is None:
        return []
    if isinstance(content, str):
        return text_blocks(content)
    if not isinstance(content, list):
        raise Untranslatable("content", "message content must be a string or an array of parts")
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks += text_blocks(part.get("text"))
        elif kind == "refusal" and refusals:
            blocks += text_blocks(part.get("refusal"))
        else:
            raise Untranslatable("content", f"{kind!r} parts cannot appear in this message")
    return blocks


def chat_user_blocks(content: Any) -> list[dict[str, Any]]:
    """Anthropic content blocks of a user message's content."""
    if not isinstance(content, list):
        return chat_text_blocks(content)
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks += text_blocks(part.get("text"))
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
    if media_type not in ANTHROPIC_IMAGE_TYPES:
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


# --------------------------------------------------------------------------------------------------
# Anthropic content blocks -> OpenAI message parts


def text_parts(blocks: list[Any], where: str) -> list[dict[str, Any]]:
    """OpenAI text parts for Anthropic text blocks (blank ones, cache_control and citations dropped)."""
    parts: list[dict[str, Any]] = []
    for block in blocks:
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise Untranslatable("content", f"{where} content must be text blocks")
        if block["text"].strip():
            parts.append({"type": "text", "text": block["text"]})
    return parts


def chat_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]] | None:
    """Message content: one text part as a string, several parts as an array, none as None."""
    if len(parts) == 1 and parts[0]["type"] == "text":
        return str(parts[0]["text"])
    return parts or None


def image_part(block: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI image_url part for an Anthropic image block."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source, dict) and isinstance(source.get("media_type"), str) \
            and isinstance(source.get("data"), str):
        return {"type": "image_url", "image_url": {"url": f"data:{source['media_type']};base64,{source['data']}"}}
    if kind == "url" and isinstance(source, dict) and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise Untranslatable("file_id" if kind == "file" else "image", f"{kind!r} image sources cannot reach OpenAI")


def document_part(block: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI part for an Anthropic document block: text, or a PDF file."""
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
