"""Reading request bodies: size limit after decompression, content encoding, strict JSON, nesting depth,
content type."""

from __future__ import annotations

import json
from typing import Any

import orjson
from aiohttp import hdrs, web

from rungate.errors import BadRequest, ClientError, PayloadTooLarge

# The encodings aiohttp decodes (brotli and zstd through the packages Rungate depends on for them). Any other
# would reach the JSON parser still encoded.
_DECODED_ENCODINGS = frozenset({"", "identity", "gzip", "x-gzip", "deflate", "br", "zstd"})
# How deep a body's arrays and objects may nest. orjson reads 1024 levels but writes only 254, and a body is
# written again (its fingerprint, events that carry it) with a few levels around it: past this, refuse it.
MAX_JSON_DEPTH = 128
_ORJSON_WRITE_DEPTH = 254
_PADDING = _ORJSON_WRITE_DEPTH - MAX_JSON_DEPTH
# orjson reads an integer beyond 64 bits as a float, and a body is forwarded as Rungate writes it again: such a
# number would reach the provider changed. Only a body with a run of 19 digits or more (2**63 has 19) can hold
# one; only then is it looked at closely.
_LONG_RUN = b"0" * 19
# Both checks look first at the body's shape: every digit mapped to "0", every "[" and "{" to "[", all else to a
# space. One pass in C (about a nanosecond a byte) gives the bracket count and the digit runs; the regular
# expression `[0-9]{19}` it replaced tried a match at every position, 3.4 ms for a 200 KB body.
_SHAPE = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x5B if byte in b"[{" else 0x20 for byte in range(256))
_INT_RANGE = range(-(2**63), 2**64)
_ALWAYS_DEPTH_CHECKED = 16 * 1024  # bytes: see `read_json_object`


async def read_body(request: web.Request, limit: int) -> bytes:
    """The (decompressed) body; `PayloadTooLarge` past `limit` bytes.

    The application's `client_max_size` is the same limit, and aiohttp applies it to the bytes as they are
    decompressed, so a small gzip bomb is refused too.
    """
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"Request body exceeds the {limit}-byte limit.")
    encoding = request.headers.get(hdrs.CONTENT_ENCODING)
    if encoding is not None and any(part.strip().lower() not in _DECODED_ENCODINGS for part in encoding.split(",")):
        raise ClientError(f"Content-Encoding {encoding!r} is not supported; send the body plain or as gzip, deflate,"
                          " br or zstd.", status=415, code="unsupported_content_encoding")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"Request body exceeds the {limit}-byte limit.") from None
    except web.RequestPayloadError:  # not what its Content-Encoding says (or cut short)
        raise BadRequest(f"Request body could not be read as sent (Content-Encoding {encoding or 'none'}).",
                         code="invalid_body") from None
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
    shape = raw.translate(_SHAPE)
    # Small bodies are looked at closely only with enough brackets; a large one always, as writing it again costs
    # less than counting its brackets (orjson writes 200 KB in 10 us; counting takes 120).
    if (len(raw) > _ALWAYS_DEPTH_CHECKED or shape.count(b"[") > MAX_JSON_DEPTH) and _too_deep(value):
        raise BadRequest(f"Request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep.",
                         code="invalid_json")
    if _LONG_RUN in shape and _has_huge_integer(raw):
        raise BadRequest("Request body holds an integer beyond 64 bits; Rungate reads, records and forwards numbers"
                         " only within that range.", code="invalid_json")
    return raw, value


def _has_huge_integer(raw: bytes) -> bool:
    """Whether the JSON text `raw` (already known to be valid) holds an integer outside the 64-bit range."""
    found = False

    def check(text: str) -> int:
        nonlocal found
        # Past 20 digits it is out of range whatever they are (and `int` refuses a string of thousands).
        found = found or len(text.lstrip("-")) > 20 or int(text) not in _INT_RANGE
        return 0

    try:
        json.loads(raw, parse_int=check)
    except ValueError:  # what orjson read, the standard parser refuses: nothing it could say about integers
        return False
    return found


def _too_deep(value: dict[str, Any]) -> bool:
    """Whether `value` nests deeper than `MAX_JSON_DEPTH`: orjson, asked to write it inside enough levels of
    padding, reaches its own limit exactly then (asked of large bodies, and of small ones with that many brackets)."""
    padded: Any = value
    for _ in range(_PADDING):
        padded = [padded]
    try:
        orjson.dumps(padded)
    except orjson.JSONEncodeError:
        return True
    return False
