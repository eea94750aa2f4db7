"""Server-side web search is billed per search besides the tokens (Anthropic's web search tool, OpenAI's built-in
`web_search` in the Responses API): a call that searched records, and is charged, its searches at the price table's
`web_search_per_1k` (plain answers and streams alike), and a call reserves the fees of the searches its tools allow
(Anthropic's `max_uses`, OpenAI's `max_tool_calls`)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
from aiohttp import web

from rungate.config import load_settings
from rungate.prices import PriceTable, format_usd
from rungate.providers.metering import estimate_input_tokens, web_search_limit
from rungate.proxy.app import create_app
from rungate.usage import Usage
from tests.conftest import ADMIN_TOKEN
from tests.faults import send_responses_stream

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


OPENAI_MODEL = "gpt-4.1"
OPENAI_USAGE = {"input_tokens": 300, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 50,
                "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 350}


def _search_item(n: int, status: str) -> dict[str, Any]:
    return {"type": "web_search_call", "id": f"ws_{n}", "status": status,
            "action": {"type": "search", "query": f"what changed today, part {n}"}}


def searching_responses_upstream() -> web.Application:
    """OpenAI Responses whose answers ran three web searches (three `web_search_call` output items, which the
    usage object does not count), as a plain body or as a stream."""
    async def responses(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        message = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": "found it", "annotations": []}]}
        output = [*(_search_item(n, "completed") for n in range(SEARCHES)), message]
        response = {"id": "resp_search", "object": "response", "created_at": 1765000000, "status": "completed",
                    "model": body["model"], "output": output, "usage": OPENAI_USAGE, "error": None,
                    "incomplete_details": None, "tools": body.get("tools", []), "parallel_tool_calls": True,
                    "tool_choice": "auto"}
        if not body.get("stream"):
            return web.json_response(response)
        events: list[dict[str, Any]] = [{"type": "response.created",
                                         "response": {**response, "status": "in_progress", "output": [],
                                                      "usage": None}}]
        for n in range(SEARCHES):
            events.append({"type": "response.output_item.added", "output_index": n,
                           "item": _search_item(n, "in_progress")})
            events.append({"type": "response.output_item.done", "output_index": n,
                           "item": _search_item(n, "completed")})
        events.append({"type": "response.output_item.done", "output_index": SEARCHES, "item": message})
        events.append({"type": "response.completed", "response": response})
        return await send_responses_stream(request, events)

    app = web.Application()
    app.router.add_post("/v1/responses", responses)
    return app


async def _gateway(aiohttp_server: Any, tmp_path: Path, upstream_app: web.Application | None = None) -> str:
    """Rungate in front of `searching_upstream` (or `upstream_app`, as OpenAI), on a fresh database; its root
    URL."""
    env = {"RUNGATE_DATABASE_URL": f"sqlite:///{tmp_path}/fees.db", "RUNGATE_ADMIN_TOKEN": ADMIN_TOKEN,
           "RUNGATE_LOG_LEVEL": "warning"}
    if upstream_app is None:
        upstream = await aiohttp_server(searching_upstream())
        env |= {"RUNGATE_ANTHROPIC_BASE_URL": str(upstream.make_url("")).rstrip("/"),
                "ANTHROPIC_API_KEY": "sk-ant-fees-1"}
    else:
        upstream = await aiohttp_server(upstream_app)
        env |= {"RUNGATE_OPENAI_BASE_URL": str(upstream.make_url("/v1")), "OPENAI_API_KEY": "sk-fees-1"}
    server = await aiohttp_server(create_app(load_settings(env=env)))
    return str(server.make_url("")).rstrip("/")


async def _capped_agent(http: aiohttp.ClientSession, root: str) -> str:
    """An agent under a run cap no call fits (its refusals show what a call asks for); its token."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with http.put(root + "/api/policies/by-name/tiny", headers=admin,
                        json={"budget": {"hard_limit_usd": "0.000001"}}) as resp:
        assert resp.status == 201
    async with http.post(root + "/api/agents", headers=admin, json={"name": "capped", "policy": "tiny"}) as resp:
        token: str = (await resp.json())["data"]["token"]
    return token


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
    prices = PriceTable.load()
    async with aiohttp.ClientSession() as http:
        token = await _capped_agent(http, root)
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


async def test_an_openai_responses_call_that_searched_is_charged_its_searches(aiohttp_server: Any,
                                                                              tmp_path: Path) -> None:
    root = await _gateway(aiohttp_server, tmp_path, searching_responses_upstream())
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as http, http.post(root + "/api/agents", json={"name": "researcher"},
                                                          headers=admin) as resp:
        token = (await resp.json())["data"]["token"]
    expected = PriceTable.load().cost_pico(OPENAI_MODEL, Usage(input=300, output=50, web_searches=SEARCHES))
    tokens_only = PriceTable.load().cost_pico(OPENAI_MODEL, Usage(input=300, output=50))
    assert expected is not None and tokens_only is not None
    assert expected - tokens_only == SEARCHES * 10_000_000_000  # $0.01 each, in pico
    client = openai.AsyncOpenAI(api_key=token, base_url=root + "/v1", max_retries=0)
    tools: Any = [{"type": "web_search"}]
    async with client:
        # when the model searches three times, in a plain answer and in a stream
        plain = await client.responses.with_raw_response.create(
            model=OPENAI_MODEL, input="what changed today?", tools=tools,
            extra_headers={"x-rungate-run-id": "researching"})
        async with client.responses.stream(model=OPENAI_MODEL, input="what changed today?", tools=tools,
                                           extra_headers={"x-rungate-run-id": "researching"}) as stream:
            final = await stream.get_final_response()
    # then each step is charged the tokens plus three searches at $10 per 1,000, and records them
    assert plain.headers["x-rungate-cost-usd"] == format_usd(expected)
    assert plain.parse().output_text == final.output_text == "found it"
    async with aiohttp.ClientSession() as http:
        async with http.get(root + "/api/runs/researching/steps", headers=admin) as resp:
            steps = (await resp.json())["data"]
        async with http.get(root + "/api/runs/researching/events", headers=admin) as resp:
            events = [orjson.loads(line) for line in (await resp.read()).splitlines()]
    assert [Decimal(step["cost_usd"]) for step in steps] == [Decimal(format_usd(expected))] * 2
    completed = [event["data"] for event in events if event["type"] == "StepCompleted"]
    assert [data["usage"].get("web_searches") for data in completed] == [SEARCHES, SEARCHES]


async def test_an_openai_responses_call_reserves_the_searches_its_max_tool_calls_allows(aiohttp_server: Any,
                                                                                       tmp_path: Path) -> None:
    root = await _gateway(aiohttp_server, tmp_path, searching_responses_upstream())
    prices = PriceTable.load()
    async with aiohttp.ClientSession() as http:
        token = await _capped_agent(http, root)
        asked = {}
        for calls in (None, 7):  # a search without a bound, then at most 7 built-in tool calls
            body: dict[str, Any] = {"model": OPENAI_MODEL, "max_output_tokens": 100, "tools": [{"type": "web_search"}],
                                    "input": "what changed today?"}
            if calls is not None:
                body["max_tool_calls"] = calls
            async with http.post(root + "/v1/responses", data=orjson.dumps(body), headers={
                    "Authorization": f"Bearer {token}", "content-type": "application/json",
                    "x-rungate-run-id": f"capped-{calls}"}) as resp:
                assert resp.status == 402
                asked[calls] = Decimal((await resp.json())["error"]["context"]["requested_usd"])
            assert web_search_limit(body) == (calls or 0)
            worst = prices.max_cost_pico(OPENAI_MODEL, estimate_input_tokens(body), 100, web_searches=calls or 0)
            assert worst is not None and asked[calls] == Decimal(format_usd(worst))
    # the seven allowed calls add $0.07 to the worst case (the two bodies differ by `"max_tool_calls":7,` too)
    assert asked[7] - asked[None] >= Decimal("0.07")
