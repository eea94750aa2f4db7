"""Anthropic's server-side web search is billed per search besides the tokens: a call that searched records,
and is charged, its searches at the price table's `web_search_per_1k` (plain answers and streams alike), and a
call reserves the fees of the searches its tools allow (`max_uses`)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import orjson
from aiohttp import web

from rungate.config import load_settings
from rungate.prices import PriceTable, format_usd
from rungate.providers.metering import estimate_input_tokens, web_search_limit
from rungate.proxy.app import create_app
from rungate.usage import Usage
from tests.conftest import ADMIN_TOKEN

MODEL = "claude-sonnet-4-5"
SEARCHES = 3
USAGE = {"input_tokens": 120, "output_tokens": 40, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
         "server_tool_use": {"web_search_requests": SEARCHES}}


def searching_upstream() -> web.Application:
    """Anthropic messages whose answers report three web searches, as a plain body or as a stream."""
    async def messages(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        message = {"id": "msg_search", "type": "message", "role": "assistant", "model": body["model"],
                   "content": [{"type": "text", "text": "found it"}], "stop_reason": "end_turn",
                   "stop_sequence": None, "usage": USAGE}
        if not body.get("stream"):
            return web.json_response(message)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        start = {**message, "content": [], "stop_reason": None,
                 "usage": {"input_tokens": 120, "output_tokens": 1}}
        for name, data in (
                ("message_start", {"type": "message_start", "message": start}),
                ("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}}),
                ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": "found it"}}),
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                ("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                   "usage": {"output_tokens": 40, "server_tool_use": USAGE["server_tool_use"]}}),
                ("message_stop", {"type": "message_stop"})):
            await response.write(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    return app


async def _gateway(aiohttp_server: Any, tmp_path: Path) -> str:
    """Rungate in front of `searching_upstream`, on a fresh database; its root URL."""
    upstream = await aiohttp_server(searching_upstream())
    server = await aiohttp_server(create_app(load_settings(env={
        "RUNGATE_DATABASE_URL": f"sqlite:///{tmp_path}/fees.db", "RUNGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "RUNGATE_ANTHROPIC_BASE_URL": str(upstream.make_url("")).rstrip("/"), "ANTHROPIC_API_KEY": "sk-ant-fees-1",
        "RUNGATE_LOG_LEVEL": "warning"})))
    return str(server.make_url("")).rstrip("/")


async def test_a_call_that_searched_is_charged_its_searches(aiohttp_server: Any, tmp_path: Path) -> None:
    root = await _gateway(aiohttp_server, tmp_path)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as http, http.post(root + "/api/agents", json={"name": "searcher"},
                                                          headers=admin) as resp:
        token = (await resp.json())["data"]["token"]
    expected = PriceTable.load().cost_pico(MODEL, Usage(input=120, output=40, web_searches=SEARCHES))
    assert expected is not None
    client = anthropic.AsyncAnthropic(api_key=token, base_url=root, max_retries=0)
    tools: Any = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]
    messages: Any = [{"role": "user", "content": "what changed today?"}]
    async with client:
        # when the model searches three times, in a plain answer and in a stream
        plain = await client.messages.with_raw_response.create(
            model=MODEL, max_tokens=100, tools=tools, messages=messages,
            extra_headers={"x-rungate-run-id": "searching"})
        async with client.messages.stream(model=MODEL, max_tokens=100, tools=tools, messages=messages,
                                          extra_headers={"x-rungate-run-id": "searching"}) as stream:
            final = await stream.get_final_message()
    # then each step is charged the tokens plus three searches at $10 per 1,000
    assert plain.headers["x-rungate-cost-usd"] == format_usd(expected)
    assert final.content[0].type == "text" and final.content[0].text == "found it"
    async with aiohttp.ClientSession() as http, http.get(root + "/api/runs/searching/steps", headers=admin) as resp:
        steps = (await resp.json())["data"]
    assert [Decimal(step["cost_usd"]) for step in steps] == [Decimal(format_usd(expected))] * 2
    tokens_only = PriceTable.load().cost_pico(MODEL, Usage(input=120, output=40))
    assert tokens_only is not None and expected - tokens_only == SEARCHES * 10_000_000_000  # $0.01 each, in pico


async def test_a_call_reserves_the_fees_of_the_searches_it_allows(aiohttp_server: Any, tmp_path: Path) -> None:
    root = await _gateway(aiohttp_server, tmp_path)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    prices = PriceTable.load()
    async with aiohttp.ClientSession() as http:
        async with http.put(root + "/api/policies/by-name/tiny", headers=admin,
                            json={"budget": {"hard_limit_usd": "0.000001"}}) as resp:
            assert resp.status == 201
        async with http.post(root + "/api/agents", headers=admin, json={"name": "capped", "policy": "tiny"}) as resp:
            token = (await resp.json())["data"]["token"]
        asked = {}
        for uses in (None, 7):  # a search tool without max_uses, then one allowing 7 searches
            tool: dict[str, Any] = {"type": "web_search_20250305", "name": "web_search"}
            if uses is not None:
                tool["max_uses"] = uses
            body = {"model": MODEL, "max_tokens": 100, "tools": [tool],
                    "messages": [{"role": "user", "content": "what changed today?"}]}
            async with http.post(root + "/v1/messages", data=orjson.dumps(body), headers={
                    "x-api-key": token, "anthropic-version": "2023-06-01", "content-type": "application/json",
                    "x-rungate-run-id": f"capped-{uses}"}) as resp:
                assert resp.status == 402
                asked[uses] = Decimal((await resp.json())["error"]["context"]["requested_usd"])
            assert web_search_limit(body) == (uses or 0)
            worst = prices.max_cost_pico(MODEL, estimate_input_tokens(body), 100, web_searches=uses or 0)
            assert worst is not None and asked[uses] == Decimal(format_usd(worst))
    # the seven allowed searches add $0.07 to the worst case (the two bodies differ by `"max_uses":7,` too)
    assert asked[7] - asked[None] >= Decimal("0.07")
