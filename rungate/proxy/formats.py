"""The wire formats the proxy speaks: where each goes upstream, how it is metered, how errors look.

A format is chosen by the route the agent called; the agent always gets answers, errors and stream
events in the format it sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from rungate.providers.metering import (
    ChatStreamMeter,
    MessagesStreamMeter,
    ResponsesStreamMeter,
    ToolCall,
    tool_calls_from_chat,
    tool_calls_from_messages,
    tool_calls_from_responses,
    usage_from_chat,
    usage_from_embeddings,
    usage_from_messages,
    usage_from_responses,
)
from rungate.providers.sse import encode_event
from rungate.usage import Usage

StreamMeter = ChatStreamMeter | ResponsesStreamMeter | MessagesStreamMeter


@dataclass(frozen=True)
class WireFormat:
    """One proxied endpoint family."""

    name: str
    provider: str
    upstream_path: str
    required: tuple[str, ...]
    max_tokens_keys: tuple[str, ...]
    usage: Callable[[Any], Usage | None]
    tool_calls: Callable[[Any], list[ToolCall]]
    meter: Callable[[bool], StreamMeter] | None


CHAT = WireFormat("chat", "openai", "/chat/completions", ("messages",), ("max_completion_tokens", "max_tokens"),
                  usage_from_chat, tool_calls_from_chat, ChatStreamMeter)
RESPONSES = WireFormat("responses", "openai", "/responses", (), ("max_output_tokens",),
                       usage_from_responses, tool_calls_from_responses, lambda _wants: ResponsesStreamMeter())
MESSAGES = WireFormat("messages", "anthropic", "/v1/messages", ("messages",), ("max_tokens",),
                      usage_from_messages, tool_calls_from_messages, lambda _wants: MessagesStreamMeter())
EMBEDDINGS = WireFormat("embeddings", "openai", "/embeddings", ("input",), (), usage_from_embeddings,
                        lambda _body: [], None)


def error_body(anthropic: bool, inner: dict[str, Any]) -> dict[str, Any]:
    """Wrap an error object in the caller's envelope: OpenAI `{"error"}`, Anthropic adds `"type": "error"`."""
    return {"type": "error", "error": inner} if anthropic else {"error": inner}


def client_error_inner(anthropic: bool, status: int, code: str, message: str) -> dict[str, Any]:
    """A plain (non-governance) error in the caller's own vocabulary, so SDKs map it to their classes."""
    if anthropic:
        kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 409: "invalid_request_error", 413: "request_too_large",
                429: "rate_limit_error", 503: "api_error"}.get(status, "api_error")
        return {"type": kind, "message": message, "code": code}
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error")
    return {"message": message, "type": kind, "param": None, "code": code}


BROKEN_STREAM = "upstream_stream_broken"


def stream_error_event(fmt: WireFormat, message: str, code: str = BROKEN_STREAM) -> bytes:
    """A protocol-correct in-stream error: both SDKs raise on it instead of seeing a clean end.

    A stream that broke is a server error; one a governance decision ended (`code` such as `tool_blocked` or
    `run_force_stopped`) says so in its type (`governance_block`; Anthropic's `permission_error`, what its
    403 refusals are) and carries the refusal's code, so an SDK can tell the two apart.
    """
    governed = code != BROKEN_STREAM
    if fmt.name == "messages":
        error: dict[str, str] = {"type": "permission_error" if governed else "api_error", "message": message}
        if governed:
            error["code"] = code
        return encode_event(orjson.dumps({"type": "error", "error": error}), "error")
    kind = "governance_block" if governed else "server_error"
    if fmt.name == "responses":  # the openai SDK raises only when the event nests an `error` object
        return encode_event(orjson.dumps({"type": "error", "code": code, "message": message, "param": None,
                                          "error": {"type": kind, "code": code, "message": message,
                                                    "param": None}}), "error")
    return encode_event(orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}))
