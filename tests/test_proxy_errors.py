"""Bad input and faults: clear errors in the caller's own format, and nothing lost or half-written."""

from __future__ import annotations

import asyncio
import gzip
import sys
import zlib
from collections.abc import Callable
from typing import Any

import aiohttp
import anthropic
import brotli
import openai
import orjson
import pytest

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

from tests.conftest import Gateway, GatewayFactory


async def raw_post(gateway: Gateway, path: str, data: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.post(gateway.url + path, data=data, headers=headers) as resp:
        body = await resp.read()
        return resp.status, orjson.loads(body) if body else None


@pytest.mark.parametrize(("data", "content_type", "code"), [
    (b"{not json", "application/json", "invalid_json"),
    (b"[1, 2]", "application/json", "invalid_json"),
    (b'{"model": NaN, "messages": []}', "application/json", "invalid_json"),
    (b'{"messages": []}', "application/json", "missing_model"),
    (b'{"model": "mock-gpt"}', "application/json", "missing_messages"),
    (b"model=mock-gpt", "application/x-www-form-urlencoded", "unsupported_content_type"),
])
async def test_bad_openai_requests_get_openai_shaped_400s(gateway: Gateway, data: bytes, content_type: str,
                                                          code: str) -> None:
    token = await gateway.new_agent()
    status, body = await raw_post(gateway, "/v1/chat/completions", data,
                                  {"authorization": f"Bearer {token}", "content-type": content_type})
    assert status == 400
    assert body["error"]["code"] == code and body["error"]["type"] == "invalid_request_error"
    assert gateway.upstream_requests == []


async def test_bad_anthropic_request_gets_an_anthropic_error_the_sdk_understands(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    client = anthropic.AsyncAnthropic(api_key=token, base_url=gateway.url, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.messages.create(model="", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    await client.close()
    assert caught.value.body["type"] == "error"  # type: ignore[index]
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


async def test_unknown_token_is_401_for_both_sdks(gateway: Gateway) -> None:
    oclient = openai.AsyncOpenAI(api_key="rg_agt_unknown", base_url=gateway.url + "/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await oclient.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "x"}])
    await oclient.close()
    aclient = anthropic.AsyncAnthropic(api_key="rg_agt_unknown", base_url=gateway.url, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        await aclient.messages.create(model="mock-claude", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    await aclient.close()
    status, body = await raw_post(gateway, "/v1/chat/completions", b"{}", {"content-type": "application/json"})
    assert status == 401 and body["error"]["code"] == "unauthorized"


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress, "zstd": zstd.compress}


@pytest.mark.parametrize("encoding", sorted(COMPRESSORS))
async def test_body_limit_is_checked_after_decompression(make_gateway: GatewayFactory, encoding: str) -> None:
    gateway = await make_gateway(RUNGATE_MAX_BODY_BYTES="4096")
    token = await gateway.new_agent()
    big = orjson.dumps({"model": "mock-gpt", "messages": [{"role": "user", "content": "a" * 10000}]})
    compressed = COMPRESSORS[encoding](big)
    assert len(compressed) < 4096  # small on the wire, large once inflated
    status, body = await raw_post(gateway, "/v1/chat/completions", compressed,
                                  {"authorization": f"Bearer {token}", "content-type": "application/json",
                                   "content-encoding": encoding})
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    # a bomb: 10 MB inflated from a few kilobytes is refused too
    bomb = COMPRESSORS[encoding](b'{"model": "mock-gpt", "messages": [], "x": "' + b"0" * 10**7 + b'"}')
    status, body = await raw_post(gateway, "/v1/chat/completions", bomb,
                                  {"authorization": f"Bearer {token}", "content-type": "application/json",
                                   "content-encoding": encoding})
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    status, body = await raw_post(gateway, "/v1/chat/completions", big,
                                  {"authorization": f"Bearer {token}", "content-type": "application/json"})
    assert status == 413
    assert gateway.upstream_requests == []


@pytest.mark.parametrize("encoding", sorted(COMPRESSORS))
async def test_a_compressed_body_is_served_as_the_plain_one(gateway: Gateway, encoding: str) -> None:
    token = await gateway.new_agent()
    # brotli and zstd bodies got aiohttp's plain-text 400 ("Please install `Brotli`") before their decoders
    plain = {"model": "mock-gpt", "messages": [{"role": "user", "content": f"sent as {encoding}"}]}
    status, body = await raw_post(gateway, "/v1/chat/completions", COMPRESSORS[encoding](orjson.dumps(plain)),
                                  {"authorization": f"Bearer {token}", "content-type": "application/json",
                                   "content-encoding": encoding})
    assert status == 200 and body["object"] == "chat.completion"
    assert gateway.upstream_requests[-1]["body"]["messages"] == plain["messages"]


async def test_unreachable_upstream_is_502_provider_error_and_recorded(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(RUNGATE_OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    token = await gateway.new_agent()
    client = openai.AsyncOpenAI(api_key=token, base_url=gateway.url + "/v1", max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "x"}],
                                             extra_headers={"x-rungate-run-id": "down-1"})
    await client.close()
    assert caught.value.status_code == 502
    body: Any = caught.value.body
    assert body["type"] == "provider_error" and body["details"][0]["provider"] == "openai"
    _, steps = await gateway.admin("GET", "/api/runs/down-1/steps")
    [step] = steps["data"]
    assert step["status"] == "upstream_error" and step["cost_usd"] == "0"
    _, run = await gateway.admin("GET", "/api/runs/down-1")
    assert run["data"]["reserved_usd"] == "0"


async def test_upstream_error_status_is_relayed_and_not_charged(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    client = openai.AsyncOpenAI(api_key=token, base_url=gateway.url + "/v1", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "[status:429]"}],
                                             extra_headers={"x-rungate-run-id": "limited"})
    await client.close()
    _, steps = await gateway.admin("GET", "/api/runs/limited/steps")
    assert steps["data"][0]["status"] == "error" and steps["data"][0]["http_status"] == 429


async def test_database_error_is_503_and_nothing_is_forwarded(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    from rungate.proxy.keys import STORE

    await gateway.app[STORE].close()  # the database goes away under a running server
    status, body = await raw_post(gateway, "/v1/chat/completions",
                                  orjson.dumps({"model": "mock-gpt", "messages": [{"role": "user", "content": "x"}]}),
                                  {"authorization": f"Bearer {token}", "content-type": "application/json"})
    assert status == 503 and body["error"]["code"] == "store_unavailable"
    assert gateway.upstream_requests == []
    async with aiohttp.ClientSession() as http, http.get(gateway.url + "/health") as resp:
        assert resp.status == 503


async def test_cut_stream_ends_with_an_error_event_and_is_charged(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    client = openai.AsyncOpenAI(api_key=token, base_url=gateway.url + "/v1", max_retries=0)
    seen: list[str] = []
    with pytest.raises(openai.APIError):
        stream = await client.chat.completions.create(
            model="mock-gpt", stream=True, messages=[{"role": "user", "content": "one two three four [cut:4]"}],
            extra_headers={"x-rungate-run-id": "cut-1"})
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")
    await client.close()
    assert seen  # tokens reached the client before the cut
    _, steps = await gateway.admin("GET", "/api/runs/cut-1/steps")
    [step] = steps["data"]
    assert step["status"] == "cut" and step["estimated"] is True
    assert float(step["cost_usd"]) > 0 and step["tokens"]["output"] > 0


async def test_client_disconnect_mid_stream_still_records_the_step(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    body = orjson.dumps({"model": "mock-claude", "max_tokens": 500, "stream": True, "messages": [
        {"role": "user", "content": "slow " * 40 + "[sleep:300]"}]})
    async with aiohttp.ClientSession() as http:
        resp = await http.post(gateway.url + "/v1/messages", data=body,
                               headers={"x-api-key": token, "content-type": "application/json",
                                        "x-rungate-run-id": "gone-1"})
        await resp.content.readuntil(b"\n\n")  # the first event arrived
        resp.close()  # then the client walks away
    for _ in range(100):
        _, steps = await gateway.admin("GET", "/api/runs/gone-1/steps")
        if steps["data"] and steps["data"][0]["status"] != "started":
            break
        await asyncio.sleep(0.05)
    [step] = steps["data"]
    assert step["status"] in {"client_closed", "ok"}
    assert step["tokens"]["input"] > 0
    _, run = await gateway.admin("GET", "/api/runs/gone-1")
    assert run["data"]["reserved_usd"] == "0"


async def test_admin_api_requires_the_admin_token(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"authorization": f"Bearer {token}"}, {"authorization": "Bearer rg_adm_wrong"}):
            async with http.get(gateway.url + "/api/runs", headers=headers) as resp:
                assert resp.status == 401
                assert (await resp.json())["error"]["code"] == "unauthorized"


async def test_locked_database_is_503_and_nothing_is_forwarded(gateway: Gateway) -> None:
    """Reads still work (WAL) but the write lock is held elsewhere: admission cannot be recorded."""
    import sqlite3

    token = await gateway.new_agent()
    blocker = sqlite3.connect(gateway.db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        status, body = await raw_post(
            gateway, "/v1/chat/completions",
            orjson.dumps({"model": "mock-gpt", "messages": [{"role": "user", "content": "x"}]}),
            {"authorization": f"Bearer {token}", "content-type": "application/json"})
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert status == 503 and body["error"]["code"] == "store_unavailable"
    assert gateway.upstream_requests == []
    # Once the lock is gone the same call goes through: no restart needed.
    status, _ = await raw_post(gateway, "/v1/chat/completions",
                               orjson.dumps({"model": "mock-gpt", "messages": [{"role": "user", "content": "x"}]}),
                               {"authorization": f"Bearer {token}", "content-type": "application/json"})
    assert status == 200


async def test_errors_outside_the_proxy_use_the_admin_shape(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.url + "/health") as resp:
            assert resp.status == 405
            body = await resp.json()
        async with http.get(gateway.url + "/nowhere") as resp:
            assert resp.status == 404
            missing = await resp.json()
    assert body["error"]["code"] == "method_not_allowed" and set(body["error"]) == {"code", "message"}
    assert missing["error"]["code"] == "not_found"


async def test_a_full_disk_is_503_with_nothing_forwarded_unrecorded_and_recovers_without_a_restart(
        gateway: Gateway) -> None:
    from rungate.proxy.keys import STORE
    from tests.store_helpers import read_only

    token = await gateway.new_agent()
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    conn = gateway.app[STORE]._conn
    assert conn is not None
    # given a database that may not grow by one page more (SQLite answers as it does when the disk is full)
    conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
    statuses, codes = [], set()
    for i in range(60):
        status, body = await raw_post(gateway, "/v1/chat/completions", orjson.dumps(
            {"model": "mock-gpt", "messages": [{"role": "user", "content": f"fill {i} " + "x" * 400}]}), headers)
        statuses.append(status)
        if status != 200:
            codes.add(body["error"]["code"])
    # then calls are refused with 503 once it is full, in the caller's format
    assert 503 in statuses and codes == {"store_unavailable"}, (statuses, codes)
    # when space is back, the next call goes through without a restart
    conn.execute("PRAGMA max_page_count = 1073741823")
    status, _ = await raw_post(gateway, "/v1/chat/completions", orjson.dumps(
        {"model": "mock-gpt", "messages": [{"role": "user", "content": "after"}]}), headers)
    assert status == 200
    # and every call that went upstream has its admission in the log: none was forwarded unrecorded
    with read_only(gateway.db_path) as db:
        admitted = db.execute("SELECT count(*) FROM events WHERE type = 'StepStarted'").fetchone()[0]
    forwarded = len(gateway.upstream_requests)
    assert statuses.count(200) + 1 <= forwarded < len(statuses) + 1 <= 61  # refused calls mostly never left
    assert admitted >= forwarded, (admitted, forwarded)
    assert (await gateway.app[STORE].verify()).ok
