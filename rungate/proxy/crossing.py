"""Serving a call with a target of the other vendor (SPEC §6): which translators carry it there and back.

A `Crossing` names, for one client format and one target provider, the format spoken upstream and the
translators for the request, the plain answer, an error answer and the stream (see `rungate.translate`).
The proxy meters the upstream side (usage as the serving provider counts it, at its prices) and shows the
agent only the client side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from rungate.providers.sse import SSEEvent
from rungate.proxy.formats import CHAT, MESSAGES, WireFormat
from rungate.translate.answers import chat_to_message, message_to_chat
from rungate.translate.common import ToolNames, Translated
from rungate.translate.errors import error_for_anthropic, error_for_openai
from rungate.translate.requests import chat_to_messages, messages_to_chat
from rungate.translate.responses import message_to_response, responses_to_messages
from rungate.translate.responses_stream import MessagesToResponses
from rungate.translate.streams import AnthropicToChat, ChatToAnthropic

__all__ = ["CROSSINGS", "Crossing", "StreamTranslator"]


class StreamTranslator(Protocol):
    """Upstream SSE events in, the agent's SSE events out (each item one complete encoded event)."""

    warnings: list[str]

    def feed(self, event: SSEEvent) -> list[bytes]: ...

    @property
    def finished(self) -> bool: ...


@dataclass(frozen=True)
class Crossing:
    """How a call in one format is carried to a target of the other vendor and back."""

    upstream: WireFormat  # what the target speaks
    request: Callable[[dict[str, Any], str, int], Translated]  # (body, target model, default max_tokens)
    answer: Callable[[Any, str, ToolNames], Translated]  # (upstream answer, model shown, tool names)
    error: Callable[[int, Any], tuple[int, dict[str, Any]]]  # (status, upstream body) -> the agent's error
    # (model shown, tool names, input-token estimate, client asked for stream usage, the stitcher of a stream
    # another target may continue, or None) -> a fresh translator
    stream: Callable[[str, ToolNames, int, bool, Any], StreamTranslator]


CROSSINGS: dict[tuple[str, str], Crossing] = {
    ("chat", "anthropic"): Crossing(
        MESSAGES,
        lambda body, model, default: chat_to_messages(body, model=model, max_tokens_default=default),
        lambda answer, model, names: message_to_chat(answer, model=model, tool_names=names),
        error_for_openai,
        lambda model, names, _tokens, usage, client: AnthropicToChat(model=model, include_usage=usage,
                                                                     tool_names=names, client=client)),
    ("messages", "openai"): Crossing(
        CHAT,
        lambda body, model, _default: messages_to_chat(body, model=model),
        lambda answer, model, names: chat_to_message(answer, model=model, tool_names=names),
        error_for_anthropic,
        lambda model, names, tokens, _usage, client: ChatToAnthropic(model=model, tool_names=names,
                                                                     input_tokens=tokens, client=client)),
    ("responses", "anthropic"): Crossing(
        MESSAGES,
        lambda body, model, default: responses_to_messages(body, model=model, max_tokens_default=default),
        lambda answer, model, names: message_to_response(answer, model=model, tool_names=names),
        error_for_openai,
        # Responses streams are never continued elsewhere (no stitcher): `client` is always None here.
        lambda model, names, _tokens, _usage, _client: MessagesToResponses(model=model, tool_names=names)),
}
