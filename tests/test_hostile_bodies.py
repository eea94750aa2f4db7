"""Hostile input that used to reach a 500: each is now a 4xx in the caller's own format, nothing forwarded."""

from __future__ import annotations

import asyncio
import base64
import gzip
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest

from rungate.proxy.bodies import MAX_JSON_DEPTH
from rungate.proxy.handler import MAX_OUTPUT_TOKENS
from rungate.proxy.routes import MAX_LATENCY_MS, MAX_STATUS_CHARS
from tests.conftest import ADMIN_TOKEN, Gateway

CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "mock-claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


async def send(gateway: Gateway, path: str, data: bytes, headers: dict[str, str],
               method: str = "POST") -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession(auto_decompress=False) as http, http.request(
            method, gateway.url + path, data=data, headers=headers) as resp:
        raw = await resp.read()
        body = orjson.loads(raw) if resp.content_type == "application/json" else raw
        return resp.status, body, dict(resp.headers)


def agent(token: str, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", "content-type": "application/json", **extra}


def with_nested(template: dict[str, Any], depth: int, pad: int = 0) -> bytes:
    """`template` as JSON plus a key `x` holding arrays nested so that the whole body is `depth` levels deep
    (built as text: orjson itself writes no more than 254 levels), the innermost holding a string of `pad`
    bytes when `pad` is given."""
    inner = depth - 1
    core = b'"' + b"p" * pad + b'"' if pad else b""
    return orjson.dumps(template)[:-1] + b', "x": ' + b"[" * inner + core + b"]" * inner + b"}"


def openai_error(body: Any, code: str) -> bool:
    return body["error"]["code"] == code and body["error"]["type"] == "invalid_request_error"


def anthropic_error(body: Any) -> bool:
    return body["type"] == "error" and body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("path", "body", "key"), [
    ("/v1/chat/completions", CHAT, "max_tokens"),
    ("/v1/chat/completions", CHAT, "max_completion_tokens"),
    ("/v1/responses", {"model": "mock-gpt", "input": "hi"}, "max_output_tokens"),
    ("/v1/messages", MESSAGES, "max_tokens"),
])
async def test_an_output_limit_no_model_has_is_a_400(gateway: Gateway, path: str, body: dict[str, Any],
                                                     key: str) -> None:
    token = await gateway.new_agent()
    # 1e13 tokens once overflowed the 64-bit ledger while the admission was written: a 500 `write_failed`
    status, answer, _ = await send(gateway, path, orjson.dumps({**body, key: 10**13}), agent(token))
    assert status == 400
    assert anthropic_error(answer) if path == "/v1/messages" else openai_error(answer, "invalid_max_tokens")
    assert str(MAX_OUTPUT_TOKENS) in orjson.dumps(answer).decode()
    status, _, _ = await send(gateway, path, orjson.dumps({**body, key: 50}), agent(token))
    assert status == 200
    assert len(gateway.upstream_requests) == 1


async def test_a_worst_case_beyond_what_one_call_may_reserve_is_a_400(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    # 128 answers of 1e8 tokens at gpt-4o's output price: $128,000, more than the $100,000 one call may hold
    body = {**CHAT, "model": "gpt-4o", "n": 128, "max_tokens": MAX_OUTPUT_TOKENS}
    status, answer, _ = await send(gateway, "/v1/chat/completions", orjson.dumps(body), agent(token))
    assert status == 400 and openai_error(answer, "reservation_too_large")
    assert "(128000.0" in answer["error"]["message"]
    assert gateway.upstream_requests == []
    _, runs = await gateway.admin("GET", "/api/runs")
    assert runs["data"] == []  # refused before anything was written: not even a run


@pytest.mark.parametrize(("path", "template"), [
    ("/v1/chat/completions", CHAT), ("/v1/messages", MESSAGES), ("/v1/runs/deep-1/steps", {"tool": "t"}),
])
# Small bodies are checked closely only past MAX_JSON_DEPTH brackets, large ones (over 16 KB) always.
@pytest.mark.parametrize("pad", [0, 20_000])
async def test_json_nested_past_the_limit_is_a_400_and_up_to_it_is_served(gateway: Gateway, path: str,
                                                                          template: dict[str, Any], pad: int) -> None:
    token = await gateway.new_agent()
    # 254 to 1023 levels were read (orjson reads 1024) and then failed to be written again: a 500
    for depth in (MAX_JSON_DEPTH + 1, 300, 1000):
        status, answer, _ = await send(gateway, path, with_nested(template, depth, pad), agent(token))
        assert status == 400, depth
        assert anthropic_error(answer) if path == "/v1/messages" else openai_error(answer, "invalid_json")
    assert gateway.upstream_requests == []
    status, _, _ = await send(gateway, path, with_nested(template, MAX_JSON_DEPTH, pad), agent(token))
    assert status in (200, 201)


@pytest.mark.parametrize(("path", "template"), [("/v1/chat/completions", CHAT), ("/v1/messages", MESSAGES)])
async def test_an_integer_beyond_64_bits_is_a_400_and_one_within_reaches_the_provider_unchanged(
        gateway: Gateway, path: str, template: dict[str, Any]) -> None:
    token = await gateway.new_agent()
    # Such a number was read as a float and forwarded as one: 2**64 reached the provider as 1.8446744073709552e19
    for number in (b"18446744073709551616", b"-9223372036854775809", b"9" * 5000):
        data = orjson.dumps(template)[:-1] + b', "metadata": {"seed": ' + number + b"}}"
        status, answer, _ = await send(gateway, path, data, agent(token))
        assert status == 400, number[:30]
        assert anthropic_error(answer) if path == "/v1/messages" else openai_error(answer, "invalid_json")
    assert gateway.upstream_requests == []
    # the edges of the 64-bit range, and a long run of digits inside a string, are forwarded as they were sent
    for number in (2**64 - 1, -(2**63)):
        body = {**template, "metadata": {"seed": number, "note": "1" * 40}}
        status, _, _ = await send(gateway, path, orjson.dumps(body), agent(token))
        assert status == 200
        assert gateway.upstream_requests[-1]["body"]["metadata"] == {"seed": number, "note": "1" * 40}


async def test_a_body_that_is_not_what_its_content_encoding_says_is_a_400(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    plain = orjson.dumps(CHAT)
    for data in (plain, gzip.compress(plain) + b"trailing garbage"):
        status, answer, _ = await send(gateway, "/v1/chat/completions", data,
                                       agent(token, **{"content-encoding": "gzip"}))
        assert status == 400 and openai_error(answer, "invalid_body")
    status, answer, _ = await send(gateway, "/v1/messages", orjson.dumps(MESSAGES),
                                   agent(token, **{"content-encoding": "gzip"}))
    assert status == 400 and anthropic_error(answer)
    assert gateway.upstream_requests == []
    status, _, _ = await send(gateway, "/v1/chat/completions", gzip.compress(plain),
                              agent(token, **{"content-encoding": "gzip"}))
    assert status == 200


async def test_an_encoding_rungate_cannot_decode_is_a_415(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    for encoding in ("foo", "gzip, foo"):
        status, answer, _ = await send(gateway, "/v1/chat/completions", orjson.dumps(CHAT),
                                       agent(token, **{"content-encoding": encoding}))
        assert status == 415 and answer["error"]["code"] == "unsupported_content_encoding"
    assert gateway.upstream_requests == []
    status, _, _ = await send(gateway, "/v1/chat/completions", orjson.dumps(CHAT),
                              agent(token, **{"content-encoding": "identity"}))
    assert status == 200


async def raw_request(gateway: Gateway, head: bytes, body: bytes) -> bytes:
    """Send bytes as they are (a header that is not UTF-8) and read the status line."""
    parts = urlsplit(gateway.url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(head + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


@pytest.mark.parametrize(("request_line", "header"), [
    (b"POST /v1/chat/completions", b"Authorization: Bearer \xff\xfe"),
    (b"POST /v1/messages", b"x-api-key: \xc3\x28"),
    (b"GET /api/runs", b"Authorization: Bearer \xff\xfe"),
])
async def test_a_token_that_is_not_utf8_is_a_401(gateway: Gateway, request_line: bytes, header: bytes) -> None:
    answer = await raw_request(gateway, request_line + b" HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n"
                               b"Content-Type: application/json\r\n", orjson.dumps(CHAT))
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


async def test_tool_steps_refuse_latencies_and_statuses_the_ledger_cannot_hold(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    for bad in (b'"latency_ms": 1e300', b'"latency_ms": 9999999999999999999',
                b'"latency_ms": %d' % (MAX_LATENCY_MS + 1), b'"status": ""',
                b'"status": "%s"' % (b"s" * (MAX_STATUS_CHARS + 1)), b'"status": "ok\\nforged"'):
        status, answer, _ = await send(gateway, "/v1/runs/lat-1/steps", b'{"tool": "t", ' + bad + b"}", agent(token))
        assert status == 400 and openai_error(answer, "invalid_request"), bad
    status, answer, _ = await send(gateway, "/v1/runs/lat-1/steps",
                                   orjson.dumps({"tool": "t", "latency_ms": 1500.7, "status": "error"}), agent(token))
    assert status == 201 and answer["data"]["latency_ms"] == 1500


async def test_run_options_of_the_wrong_kind_are_refused_not_ignored(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    status, answer, _ = await send(gateway, "/v1/chat/completions",
                                   orjson.dumps({**CHAT, "rungate": {"new_run": "yes"}}), agent(token))
    assert status == 400 and openai_error(answer, "invalid_rungate_options")
    status, answer, _ = await send(gateway, "/v1/chat/completions", orjson.dumps(CHAT),
                                   agent(token, **{"x-rungate-new-run": "perhaps"}))
    assert status == 400 and openai_error(answer, "invalid_rungate_options")
    assert gateway.upstream_requests == []
    status, _, first = await send(gateway, "/v1/chat/completions", orjson.dumps(CHAT), agent(token))
    status, _, second = await send(gateway, "/v1/chat/completions", orjson.dumps(CHAT),
                                   agent(token, **{"x-rungate-new-run": "True"}))
    assert status == 200 and second["x-rungate-run-id"] != first["x-rungate-run-id"]
    status, _, third = await send(gateway, "/v1/chat/completions", orjson.dumps(CHAT),
                                  agent(token, **{"x-rungate-new-run": "false"}))
    assert status == 200 and third["x-rungate-run-id"] == second["x-rungate-run-id"]


async def test_a_405_names_the_allowed_methods_and_anthropic_paths_answer_in_anthropic_shape(
        gateway: Gateway) -> None:
    token = await gateway.new_agent()
    status, answer, headers = await send(gateway, "/v1/chat/completions", b"", agent(token), method="GET")
    assert status == 405 and "POST" in headers["Allow"]
    assert answer["error"]["code"] == "method_not_allowed"
    status, answer, _ = await send(gateway, "/v1/messages/count_tokens", orjson.dumps(MESSAGES), agent(token))
    assert status == 404 and answer["type"] == "error" and answer["error"]["type"] == "not_found_error"


async def test_admin_input_that_would_fail_later_is_refused_at_once(gateway: Gateway) -> None:
    # A provider key with a line break was stored, then failed every call to the provider with a 500.
    status, answer = await gateway.admin("POST", "/api/provider-keys", {
        "provider": "openai", "name": "nl", "api_key": "sk-abcdefgh\r\nX-Injected: yes"})
    assert status == 400 and answer["error"]["code"] == "invalid_api_key"
    _, keys = await gateway.admin("GET", "/api/provider-keys")
    assert [k["name"] for k in keys["data"]] == []
    # An agent asked for disabled was created active; a bad status was ignored.
    status, answer = await gateway.admin("POST", "/api/agents", {"name": "odd", "status": "paused"})
    assert status == 400 and answer["error"]["code"] == "invalid_status"
    status, answer = await gateway.admin("POST", "/api/agents", {"name": "off", "status": "disabled"})
    assert status == 201 and answer["data"]["status"] == "disabled" and answer["data"]["token"]
    status, answer = await gateway.admin("POST", "/api/agents", {"name": "p", "policy_id": "pol_missing"})
    assert status == 404
    forged = base64.urlsafe_b64encode(b'{"a": 1, "b": 2}').decode()  # two items, but not the two strings
    for query in ("/api/agents?status=paused", "/api/runs?offset=-1", "/api/runs?offset=1&cursor=abc",
                  f"/api/runs?cursor={forged}", "/api/provider-keys?provider=bogus"):
        status, answer = await gateway.admin("GET", query)
        assert status == 400, query


async def test_an_admin_body_that_gives_a_key_twice_is_refused(gateway: Gateway) -> None:
    # JSON keeps the last of two equal keys: this policy would have capped runs at $9, not $1.
    raw = b'{"budget": {"hard_limit_usd": "1.00", "hard_limit_usd": "9"}}'
    status, answer, _ = await send(gateway, "/api/policies/by-name/dup", raw,
                                   {"authorization": f"Bearer {ADMIN_TOKEN}", "content-type": "application/json"},
                                   method="PUT")
    assert status == 400 and answer["error"]["code"] == "duplicate_key"
    assert "hard_limit_usd" in answer["error"]["message"]
    _, policies = await gateway.admin("GET", "/api/policies")
    assert policies["data"] == []
    status, _, _ = await send(gateway, "/api/policies/by-name/dup", b'{"budget": {"hard_limit_usd": "1.00"}}',
                              {"authorization": f"Bearer {ADMIN_TOKEN}", "content-type": "application/json"},
                              method="PUT")
    assert status in (200, 201)
