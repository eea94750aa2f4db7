"""A call that asks for prompt caching reserves its input at the dearest cache-write rate: a provider may bill
every input token as written to the cache (Anthropic's 1-hour writes cost twice the input rate), and the run's
cap must hold all the same (issue 3's zero overshoot)."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from rungate.config import load_settings
from rungate.prices import PriceTable, format_usd
from rungate.providers.metering import estimate_input_tokens
from rungate.proxy.app import create_app
from tests.conftest import ADMIN_TOKEN, send_messages

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MODEL = "mock-claude"  # priced: input 1.00, 5-minute writes 1.25, 1-hour writes 2.00, output 2.00 per 1M tokens
MAX_TOKENS = 1


def caching_upstream() -> web.Application:
    """Anthropic messages that take half a second and bill every input token as a 1-hour cache write."""
    async def messages(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(0.5)
        written = estimate_input_tokens(body)
        return web.json_response({
            "id": "msg_cache", "type": "message", "role": "assistant", "model": body["model"],
            "content": [{"type": "text", "text": "ok"}], "stop_reason": "max_tokens", "stop_sequence": None,
            "usage": {"input_tokens": 0, "cache_creation_input_tokens": written, "cache_read_input_tokens": 0,
                      "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": written},
                      "output_tokens": body["max_tokens"]}})

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    return app


def cached_call(text: str) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": MAX_TOKENS,
            "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
            "messages": [{"role": "user", "content": text}]}


async def _gateway(aiohttp_server: Any, tmp_path: Path) -> str:
    upstream = await aiohttp_server(caching_upstream())
    app = create_app(load_settings(env={
        "RUNGATE_DATABASE_URL": f"sqlite:///{tmp_path}/cache.db", "RUNGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "RUNGATE_ANTHROPIC_BASE_URL": str(upstream.make_url("")).rstrip("/"), "ANTHROPIC_API_KEY": "sk-ant-cache-1",
        "RUNGATE_LOG_LEVEL": "warning"}))
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


async def _agent_under_cap(http: aiohttp.ClientSession, root: str, name: str, cap_pusd: int) -> str:
    async with http.put(root + f"/api/policies/by-name/{name}", headers=ADMIN,
                        json={"budget": {"hard_limit_usd": format_usd(cap_pusd)}}) as resp:
        assert resp.status == 201, await resp.text()
    async with http.post(root + "/api/agents", headers=ADMIN, json={"name": name, "policy": name}) as resp:
        token: str = (await resp.json())["data"]["token"]
    return token


async def test_concurrent_cached_calls_cannot_overshoot_the_run_cap(aiohttp_server: Any, tmp_path: Path) -> None:
    root = await _gateway(aiohttp_server, tmp_path)
    prices = PriceTable.load()
    body = cached_call("summarise the report")
    tokens = estimate_input_tokens(body)
    at_input_rate = prices.max_cost_pico(MODEL, tokens, MAX_TOKENS)
    at_write_rate = prices.max_cost_pico(MODEL, tokens, MAX_TOKENS, cache_writes=True)
    assert at_input_rate is not None and at_write_rate is not None
    assert at_write_rate == tokens * 2_000_000 + MAX_TOKENS * 2_000_000  # pico-USD: 2.00 per 1M tokens each
    # given a run cap that two calls' input-rate worst cases fit, but only one call billed at the write rate
    cap = 2 * at_input_rate
    assert at_write_rate <= cap < 2 * at_write_rate
    async with aiohttp.ClientSession() as http:
        token = await _agent_under_cap(http, root, "cached", cap)
        # when two such calls arrive together
        answers = await asyncio.gather(*(send_messages(http, root, token, "cached-run", body) for _ in range(2)))
        # then one is admitted and the other refused with the write-rate worst case as what it asked for
        assert sorted(status for status, _ in answers) == [200, 402]
        [refusal] = [answer for status, answer in answers if status == 402]
        assert Decimal(refusal["error"]["context"]["requested_usd"]) == Decimal(format_usd(at_write_rate))
        # and the run spent what the provider billed, within its cap, with nothing left reserved
        async with http.get(root + "/api/runs/cached-run", headers=ADMIN) as resp:
            run = (await resp.json())["data"]
    assert Decimal(run["spend_usd"]) == Decimal(format_usd(at_write_rate)) <= Decimal(format_usd(cap))
    assert run["reserved_usd"] == "0"


async def test_the_words_cache_control_in_a_message_reserve_at_the_input_rate(aiohttp_server: Any,
                                                                              tmp_path: Path) -> None:
    root = await _gateway(aiohttp_server, tmp_path)
    prices = PriceTable.load()
    plain = {"model": MODEL, "max_tokens": MAX_TOKENS,
             "messages": [{"role": "user", "content": 'what does "cache_control": {"type": "ephemeral"} do?'}]}
    tokens = estimate_input_tokens(plain)
    async with aiohttp.ClientSession() as http:
        token = await _agent_under_cap(http, root, "tiny", 1)  # a cap no call fits: the refusal shows the ask
        status, refusal = await send_messages(http, root, token, "tiny-run", plain)
    assert status == 402
    assert Decimal(refusal["error"]["context"]["requested_usd"]) == Decimal(
        format_usd(prices.max_cost_pico(MODEL, tokens, MAX_TOKENS) or 0))


async def test_an_openai_format_body_that_asks_for_caching_reserves_at_the_write_rate(aiohttp_server: Any,
                                                                                       tmp_path: Path) -> None:
    # An OpenAI-compatible target may serve Anthropic models and honour `cache_control` in content parts: the
    # worst case of such a body is priced at the model's dearest write rate whatever the format it came in.
    root = await _gateway(aiohttp_server, tmp_path)
    prices = PriceTable.load()
    body = {"model": MODEL, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "summarise the report", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]}
    tokens = estimate_input_tokens(body)
    at_write_rate = prices.max_cost_pico(MODEL, tokens, MAX_TOKENS, cache_writes=True)
    assert at_write_rate is not None and at_write_rate > (prices.max_cost_pico(MODEL, tokens, MAX_TOKENS) or 0)
    async with aiohttp.ClientSession() as http:
        token = await _agent_under_cap(http, root, "openai-cached", 1)  # no call fits: the refusal shows the ask
        async with http.post(root + "/v1/chat/completions", data=orjson.dumps(body), headers={
                "authorization": f"Bearer {token}", "content-type": "application/json"}) as resp:
            status, refusal = resp.status, await resp.json()
    assert status == 402
    assert Decimal(refusal["error"]["context"]["requested_usd"]) == Decimal(format_usd(at_write_rate))
