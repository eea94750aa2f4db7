"""The one place exceptions become HTTP responses, plus per-request log context.

Proxy routes answer in the caller's wire format (OpenAI `{"error": …}`, Anthropic adds `"type": "error"`);
governance refusals carry the canonical body of SPEC §4; admin routes answer `{"error": {"code", "message"}}`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from rungate.errors import ClientError, GovernanceRefusal, ProviderError, RungateError
from rungate.ids import new_id
from rungate.log import get_logger
from rungate.proxy.formats import client_error_inner, error_body
from rungate.proxy.keys import REQUEST_ID, STREAM_STARTED

log = get_logger("rungate.http")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_KEPT_HEADERS = frozenset({"allow"})
_HTTP_CODES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


def _is_anthropic(request: web.Request) -> bool:
    """Anthropic's routes: `/v1/messages` and anything under it (`/v1/messages/count_tokens`, not served)."""
    path = request.path.rstrip("/")
    return path.endswith("/messages") or "/messages/" in path


def render_error(request: web.Request, exc: RungateError) -> web.Response:
    """The JSON response for `exc` as the caller on this route expects it."""
    headers = dict(exc.headers)
    if not request.path.startswith("/v1/"):  # admin, health and spec routes: the admin error shape
        inner: dict[str, Any] = {"code": exc.code, "message": exc.message, **exc.extra}
        return web.json_response({"error": inner}, status=exc.status, headers=headers)
    anthropic = _is_anthropic(request)
    if isinstance(exc, GovernanceRefusal):
        inner = {"type": "governance_block", "code": exc.code, "message": exc.message, "run_id": exc.run_id,
                 "context": exc.context, "details": exc.context}
    elif isinstance(exc, ProviderError):
        inner = {"type": "provider_error", "code": exc.code, "message": exc.message, "details": exc.attempts}
    elif isinstance(exc, ClientError):
        inner = client_error_inner(anthropic, exc.status, exc.code, exc.message)
        inner.update({k: v for k, v in exc.extra.items() if k not in inner})
    else:
        inner = client_error_inner(anthropic, exc.status, exc.code, exc.message)
    return web.json_response(error_body(anthropic, inner), status=exc.status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind request context for logs and render every error through `render_error`."""
    request_id = new_id("req")
    request[REQUEST_ID] = request_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id, path=request.path, method=request.method)
    try:
        return await handler(request)
    except Exception as exc:
        if request.get(STREAM_STARTED):  # headers are out: a second response cannot follow; drop the connection
            log.exception("error_after_stream_started")
            raise
        return _render_exception(request, exc)


def _render_exception(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The response for an exception caught by the middleware (called inside its `except`)."""
    if isinstance(exc, RungateError):
        if exc.status >= 500:
            log.warning("request_failed", code=exc.code, status=exc.status)
        return render_error(request, exc)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc  # redirects and the like are answers, not errors
        message = exc.reason if exc.status != 404 else f"No route for {request.method} {request.path}."
        code = _HTTP_CODES.get(exc.status, "http_error")
        # What aiohttp's answer says besides its body stays (a 405's `Allow`, which RFC 9110 requires).
        kept = {name: value for name, value in exc.headers.items() if name.lower() in _KEPT_HEADERS}
        return render_error(request, ClientError(message, status=exc.status, code=code, headers=kept))
    log.exception("unhandled_error")
    return render_error(request, RungateError("Internal error; see the server log.", status=500))


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: every answer, streamed or not, names its request id."""
    if REQUEST_ID in request:
        response.headers["x-rungate-request-id"] = request[REQUEST_ID]
