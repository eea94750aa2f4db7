"""Reading request bodies: size limit after decompression, strict JSON, content type."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import hdrs, web

from rungate.errors import BadRequest, PayloadTooLarge


async def read_body(request: web.Request, limit: int) -> bytes:
    """The (decompressed) body; `PayloadTooLarge` past `limit` bytes.

    The application's `client_max_size` is the same limit, and aiohttp applies it to the bytes as they are
    decompressed, so a small gzip bomb is refused too.
    """
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"Request body exceeds the {limit}-byte limit.")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"Request body exceeds the {limit}-byte limit.") from None
    if len(body) > limit:
        raise PayloadTooLarge(f"Request body exceeds the {limit}-byte limit.")
    return body


def _is_json_type(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


async def read_json_object(request: web.Request, limit: int, *,
                           allow_empty: bool = False) -> tuple[bytes, dict[str, Any]]:
    """The body as raw bytes and as a JSON object.

    Refuses (400) a non-JSON content type, malformed JSON, `NaN`/`Infinity` (orjson rejects them) and
    anything but an object. An empty body is `{}` when `allow_empty` (bodyless admin POSTs).
    """
    raw = await read_body(request, limit)
    if not raw.strip():
        if allow_empty:
            return raw, {}
        raise BadRequest("Request body is empty; expected a JSON object.")
    # No Content-Type at all is taken as JSON (curl -d sends one, SDKs send application/json).
    if hdrs.CONTENT_TYPE in request.headers and not _is_json_type(request.content_type):
        raise BadRequest(f"Content-Type must be application/json, got {request.content_type}.",
                         code="unsupported_content_type")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise BadRequest("Request body must be a JSON object.", code="invalid_json")
    return raw, value
