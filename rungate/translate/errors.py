"""Error answers in the agent's format: Anthropic errors for OpenAI agents and back (pure, no I/O).

Statuses are kept so the SDKs retry exactly as they would have (reference/provider-formats.md 3.6), with two
exceptions: Anthropic's 529 "overloaded" becomes 503 for OpenAI agents (OpenAI never sends 529; both are
retried), and OpenAI's 429 `insufficient_quota` becomes 402 `billing_error` for Anthropic agents (a 429 would
be retried although no retry can succeed). A status that is not an HTTP error (not an int in 400-599) becomes
502. The provider's message is kept, since it carries the reason (a content filter, a context length).

A context-length error keeps its meaning across: an Anthropic "prompt is too long" reaches OpenAI agents with
code `context_length_exceeded`, and an OpenAI `context_length_exceeded` reaches Anthropic agents with a message
starting "prompt is too long: " (what Anthropic agents look for).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["error_for_anthropic", "error_for_openai", "is_context_length_error"]

# Anthropic error.type -> (OpenAI error.type, error.code).
_TO_OPENAI: dict[str, tuple[str, str | None]] = {
    "invalid_request_error": ("invalid_request_error", None),
    "authentication_error": ("authentication_error", "invalid_api_key"),
    "billing_error": ("billing_error", None),
    "permission_error": ("permission_error", None),
    "not_found_error": ("not_found_error", None),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit_error": ("rate_limit_error", "rate_limit_exceeded"),
    "api_error": ("server_error", None),
    "timeout_error": ("server_error", "timeout"),
    "overloaded_error": ("server_error", "overloaded"),
}
# Status -> the error type each vendor uses for it when the body does not say.
_OPENAI_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                     403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
_ANTHROPIC_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                        403: "permission_error", 404: "not_found_error", 408: "timeout_error",
                        413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
                        504: "timeout_error", 529: "overloaded_error"}
_ANTHROPIC_TOO_LONG = re.compile(
    r"prompt is too long|exceeds? (?:the )?(?:model'?s? )?context (?:window|length|limit)|context window", re.I)
_OPENAI_TOO_LONG = re.compile(r"maximum context length", re.I)
_TOO_LONG_PREFIX = "prompt is too long: "


def _status(status: Any) -> int:
    return status if type(status) is int and 400 <= status <= 599 else 502


def _error(payload: Any) -> dict[str, Any]:
    """The inner error object of either vendor's body ({} when there is none)."""
    inner = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(inner, str):  # {"error": "text"}, as some OpenAI-compatible servers answer
        return {"message": inner}
    return inner if isinstance(inner, dict) else {}


def _text(error: dict[str, Any], key: str) -> str | None:
    value = error.get(key)
    return value if isinstance(value, str) and value else None


def error_for_openai(status: int, payload: Any) -> tuple[int, dict[str, Any]]:
    """An Anthropic error answer (status, decoded JSON body or None) -> (status, OpenAI error body
    `{"error": {"message", "type", "param": None, "code"}}`); 529 -> 503, other statuses kept."""
    status = _status(status)
    error = _error(payload)
    kind = _text(error, "type")
    if kind in _TO_OPENAI:
        openai_type, code = _TO_OPENAI[kind]
    else:
        openai_type = _OPENAI_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
        code = None
    if is_context_length_error(status, payload):
        code = "context_length_exceeded"
    message = _text(error, "message") or f"The upstream provider answered with status {status}."
    body = {"error": {"message": message, "type": openai_type, "param": None, "code": code}}
    return (503 if status == 529 else status), body


def error_for_anthropic(status: int, payload: Any) -> tuple[int, dict[str, Any]]:
    """An OpenAI error answer (status, decoded JSON body or None) -> (status, Anthropic error body
    `{"type": "error", "error": {"type", "message"}}`); 429 insufficient_quota -> 402 billing_error."""
    status = _status(status)
    error = _error(payload)
    code, kind = _text(error, "code"), _text(error, "type")
    message = _text(error, "message") or code or kind or f"The upstream provider answered with status {status}."
    if status == 429 and "insufficient_quota" in (code, kind):
        status, anthropic_type = 402, "billing_error"
    else:
        anthropic_type = _ANTHROPIC_BY_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    if is_context_length_error(status, payload) and not _ANTHROPIC_TOO_LONG.search(message):
        message = _TOO_LONG_PREFIX + message
    return status, {"type": "error", "error": {"type": anthropic_type, "message": message}}


def is_context_length_error(status: int, payload: Any) -> bool:
    """Whether an error answer of either vendor says the prompt is too long for the model: OpenAI's code
    `context_length_exceeded` (or its "maximum context length" message), or an Anthropic 400
    `invalid_request_error` whose message says the prompt is too long / exceeds the context window."""
    error = _error(payload)
    if _text(error, "code") == "context_length_exceeded":
        return True
    message = _text(error, "message") or ""
    if status != 400:
        return False
    if _text(error, "type") == "invalid_request_error" and _ANTHROPIC_TOO_LONG.search(message):
        return True
    return bool(_OPENAI_TOO_LONG.search(message))
