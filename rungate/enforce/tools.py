"""Tool names in requests: what a call offers the model (OpenAI chat, Responses and Anthropic shapes)."""

from __future__ import annotations

from typing import Any


def offered_tools(body: dict[str, Any]) -> tuple[str, ...]:
    """The names of the tools a request offers: `tools[].function.name` or `.custom.name` (chat),
    `tools[].name` (Responses, Anthropic), a built-in tool's `type`, and legacy `functions[].name`; in order,
    without repeats."""
    names: list[str] = []
    for key in ("tools", "functions"):
        items = body.get(key)
        if not isinstance(items, list):
            continue
        for item in items:
            if not isinstance(item, dict):
                continue
            function = item.get("function", item.get("custom"))  # chat: a function or a custom tool
            name = function.get("name") if isinstance(function, dict) else None
            if not isinstance(name, str):
                name = item.get("name")
            if not isinstance(name, str):
                name = item.get("type") if item.get("type") not in (None, "function") else None
            if isinstance(name, str) and name and name not in names:
                names.append(name)
    return tuple(names)
