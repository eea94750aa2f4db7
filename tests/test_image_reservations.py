"""Images in a request are reserved at what an image can cost on the serving model, not by their bytes: an image
by URL is a few dozen bytes and up to some 1,600 tokens (48,169 on gpt-4o-mini), a screenshot in base64 is a
megabyte and the same few thousand tokens at most. Counted by bytes, the first let concurrent calls take a run
past its cap (issue 3's zero overshoot) and the second refused calls that fit it many times over."""

from __future__ import annotations

import asyncio
import base64
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
from aiohttp import web

from rungate.config import load_settings
from rungate.prices import DEFAULT_IMAGE_INPUT_TOKENS, PriceTable, format_usd
from rungate.providers.metering import estimate_input
from rungate.proxy.app import create_app
from tests.conftest import ADMIN_TOKEN, send_messages

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CLAUDE = "mock-claude"  # priced: input 1.00, output 2.00 per 1M tokens; no image entry: 1,600 tokens per image
MAX_TOKENS = 5
IMAGE_URL = "https://images.example/chart.png"


def billing_upstream() -> web.Application:
    """Anthropic messages and OpenAI chat that take a quarter second and bill each image at the model's most (the
    worst case a provider may bill: a large image), its text at the estimate, and the whole output allowed."""
    prices = PriceTable.load()

    def input_tokens(body: dict[str, Any]) -> int:
        estimate = estimate_input(body)
        price = prices.lookup(body["model"])
        return estimate.tokens + estimate.images * (price.image_tokens if price else DEFAULT_IMAGE_INPUT_TOKENS)

    async def messages(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(0.25)
        return web.json_response({
            "id": "msg_image", "type": "message", "role": "assistant", "model": body["model"],
            "content": [{"type": "text", "text": "a chart"}], "stop_reason": "max_tokens", "stop_sequence": None,
            "usage": {"input_tokens": input_tokens(body), "output_tokens": body["max_tokens"]}})

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({
            "id": "chatcmpl-image", "object": "chat.completion", "created": 1765000000, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": "a chart", "refusal": None}}],
            "usage": {"prompt_tokens": input_tokens(body), "completion_tokens": body["max_tokens"],
                      "total_tokens": input_tokens(body) + body["max_tokens"]}})

    app = web.Application(client_max_size=8 * 1024 * 1024)  # screenshots in base64 are megabytes
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def _gateway(aiohttp_server: Any, tmp_path: Path) -> str:
    upstream = await aiohttp_server(billing_upstream())
    root = str(upstream.make_url("")).rstrip("/")
    app = create_app(load_settings(env={
        "RUNGATE_DATABASE_URL": f"sqlite:///{tmp_path}/images.db", "RUNGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "RUNGATE_ANTHROPIC_BASE_URL": root, "ANTHROPIC_API_KEY": "sk-ant-images-1",
        "RUNGATE_OPENAI_BASE_URL": root + "/v1", "OPENAI_API_KEY": "sk-images-1", "RUNGATE_LOG_LEVEL": "warning"}))
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


async def _agent_under(http: aiohttp.ClientSession, root: str, name: str, budget: dict[str, Any]) -> str:
    async with http.put(root + f"/api/policies/by-name/{name}", headers=ADMIN, json={"budget": budget}) as resp:
        assert resp.status == 201, await resp.text()
    async with http.post(root + "/api/agents", headers=ADMIN, json={"name": name, "policy": name}) as resp:
        token: str = (await resp.json())["data"]["token"]
    return token


def image_message(text: str) -> dict[str, Any]:
    """An Anthropic request with one image by URL: 60 bytes of JSON, up to 1,600 tokens."""
    return {"model": CLAUDE, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": IMAGE_URL}},
        {"type": "text", "text": text}]}]}


async def test_concurrent_calls_with_images_cannot_overshoot_the_run_cap(aiohttp_server: Any,
                                                                         tmp_path: Path) -> None:
    root = await _gateway(aiohttp_server, tmp_path)
    prices = PriceTable.load()
    body = image_message("what does this chart show?")
    estimate = estimate_input(body)
    assert estimate.images == 1 and estimate.tokens < 40  # the image's bytes are not its tokens
    worst = prices.max_cost_pico(CLAUDE, estimate.tokens + DEFAULT_IMAGE_INPUT_TOKENS, MAX_TOKENS)
    assert worst is not None
    # given a run cap that three worst cases fit (and some thirty calls, were an image a few dozen bytes of tokens)
    cap = 3 * worst
    async with aiohttp.ClientSession() as http:
        token = await _agent_under(http, root, "vision", {"hard_limit_usd": format_usd(cap)})
        # when twelve calls, each with an image the provider bills at its most, arrive together
        answers = await asyncio.gather(*(send_messages(http, root, token, "vision-run", body) for _ in range(12)))
        # then three are admitted, the others refused with the image counted in what they asked for
        assert sorted(status for status, _ in answers) == [200] * 3 + [402] * 9
        refusal = next(answer for status, answer in answers if status == 402)
        assert Decimal(refusal["error"]["context"]["requested_usd"]) == Decimal(format_usd(worst))
        # and the run spent what the provider billed, within its cap, with nothing left reserved
        async with http.get(root + "/api/runs/vision-run", headers=ADMIN) as resp:
            run = (await resp.json())["data"]
    assert Decimal(run["spend_usd"]) == 3 * Decimal(format_usd(worst)) <= Decimal(format_usd(cap))
    assert run["reserved_usd"] == "0"


async def test_a_token_cap_counts_each_image_at_the_models_most(aiohttp_server: Any, tmp_path: Path) -> None:
    root = await _gateway(aiohttp_server, tmp_path)
    # two images by URL in OpenAI's chat format and one in a tool result of Anthropic's: each at the model's most
    chat = {"model": "gpt-4o-mini", "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "compare these"},
        {"type": "image_url", "image_url": {"url": IMAGE_URL, "detail": "high"}},
        {"type": "image_url", "image_url": {"url": IMAGE_URL + "?v=2"}}]}]}
    tool_result = {"model": CLAUDE, "max_tokens": MAX_TOKENS, "messages": [
        {"role": "user", "content": "take a screenshot"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "screenshot", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]}]}
    async with aiohttp.ClientSession() as http:
        token = await _agent_under(http, root, "few-tokens", {"hard_limit_tokens": 1000})
        async with http.post(root + "/v1/chat/completions", data=orjson.dumps(chat), headers={
                "authorization": f"Bearer {token}", "content-type": "application/json"}) as resp:
            status, refusal = resp.status, await resp.json()
        assert status == 402
        asked = refusal["error"]["context"]["requested_tokens"]
        assert asked == estimate_input(chat).tokens + 2 * 48_169 + MAX_TOKENS  # gpt-4o-mini: 2833 + 8 tiles x 5667
        status, refusal = await send_messages(http, root, token, "screenshots", tool_result)
    assert status == 402
    assert refusal["error"]["context"]["requested_tokens"] == (estimate_input(tool_result).tokens
                                                               + DEFAULT_IMAGE_INPUT_TOKENS + MAX_TOKENS)


async def test_a_large_screenshot_in_base64_is_admitted_under_a_cap_it_fits(aiohttp_server: Any,
                                                                             tmp_path: Path) -> None:
    root = await _gateway(aiohttp_server, tmp_path)
    prices = PriceTable.load()
    screenshot = "data:image/png;base64," + base64.b64encode(bytes(range(256)) * 4096).decode()  # 1 MB of PNG
    content: Any = [{"type": "text", "text": "what is on the screen?"},
                    {"type": "image_url", "image_url": {"url": screenshot}}]
    body = {"model": "gpt-4o", "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": content}]}
    estimate = estimate_input(body)
    assert estimate.images == 1 and estimate.tokens < 40
    worst = prices.max_cost_pico("gpt-4o", estimate.tokens + 1445, MAX_TOKENS)  # gpt-4o: 85 + 8 tiles x 170
    by_bytes = prices.max_cost_pico("gpt-4o", len(screenshot) // 4, MAX_TOKENS)
    assert worst is not None and by_bytes is not None and by_bytes > 100 * worst
    async with aiohttp.ClientSession() as http:
        # given a run cap of two worst cases, far under what the screenshot's bytes would have reserved
        token = await _agent_under(http, root, "screen-reader", {"hard_limit_usd": format_usd(2 * worst)})
        client = openai.AsyncOpenAI(api_key=token, base_url=root + "/v1", max_retries=0)
        async with client:
            # when the agent sends it with the stock SDK
            answer = await client.chat.completions.with_raw_response.create(
                model="gpt-4o", max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": content}],
                extra_headers={"x-rungate-run-id": "screen"})
        # then it is admitted, having reserved the image at gpt-4o's most, and charged what the provider billed
        assert answer.parse().choices[0].message.content == "a chart"
        assert answer.headers["x-rungate-cost-usd"] == format_usd(worst)
        async with http.get(root + "/api/runs/screen/events", headers=ADMIN) as resp:
            events = [orjson.loads(line) for line in (await resp.read()).splitlines()]
    [started] = [event["data"] for event in events if event["type"] == "StepStarted"]
    assert started["reserved_pusd"] == worst
    assert started["reserved_tokens"] == estimate.tokens + 1445 + MAX_TOKENS
