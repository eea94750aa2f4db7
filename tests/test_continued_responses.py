"""A Responses API call that continues an earlier answer (`previous_response_id`) is billed that answer's input
and output as input, which its own body does not show: a reservation counts them, as recorded when the earlier
answer went through Rungate (its id and tokens, per agent). Without that, a call of a few bytes that carries a
long conversation reserved a few tokens, and the run could pass its cap by the whole conversation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
from aiohttp import web

from rungate.config import load_settings
from rungate.providers.metering import estimate_input_tokens
from rungate.proxy.app import create_app
from tests.conftest import ADMIN_TOKEN
from tests.faults import send_responses_stream

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MODEL = "gpt-4.1"
OUTPUT = 10


def stateful_upstream() -> web.Application:
    """OpenAI Responses that remember their answers: a call's input is its own (1,000 tokens a call: the files it
    reads, say) plus, when it continues an answer, that answer's input and output; every answer uses the whole
    output allowed. Plain bodies or streams."""
    totals: dict[str, int] = {}

    async def responses(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        previous = body.get("previous_response_id")
        input_tokens = 1000 + (totals[previous] if previous else 0)
        output_tokens = body.get("max_output_tokens", OUTPUT)
        response_id = f"resp_{len(totals) + 1}"
        totals[response_id] = input_tokens + output_tokens
        response = {"id": response_id, "object": "response", "created_at": 1765000000, "status": "completed",
                    "model": body["model"], "previous_response_id": previous, "error": None,
                    "incomplete_details": None, "tools": [], "parallel_tool_calls": True, "tool_choice": "auto",
                    "output": [{"type": "message", "id": f"msg_{response_id}", "status": "completed",
                                "role": "assistant",
                                "content": [{"type": "output_text", "text": "noted", "annotations": []}]}],
                    "usage": {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                              "total_tokens": input_tokens + output_tokens}}
        if not body.get("stream"):
            return web.json_response(response)
        return await send_responses_stream(request, [
            {"type": "response.created", "response": {**response, "status": "in_progress", "output": [],
                                                      "usage": None}},
            {"type": "response.output_item.done", "output_index": 0, "item": response["output"][0]},
            {"type": "response.completed", "response": response}])

    app = web.Application()
    app.router.add_post("/v1/responses", responses)
    return app


async def _gateway(aiohttp_server: Any, tmp_path: Path) -> str:
    upstream = await aiohttp_server(stateful_upstream())
    server = await aiohttp_server(create_app(load_settings(env={
        "RUNGATE_DATABASE_URL": f"sqlite:///{tmp_path}/continued.db", "RUNGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "RUNGATE_OPENAI_BASE_URL": str(upstream.make_url("/v1")), "OPENAI_API_KEY": "sk-continued-1",
        "RUNGATE_LOG_LEVEL": "warning"})))
    return str(server.make_url("")).rstrip("/")


async def _agent(http: aiohttp.ClientSession, root: str, name: str, cap_tokens: int) -> str:
    async with http.put(root + f"/api/policies/by-name/{name}", headers=ADMIN,
                        json={"budget": {"hard_limit_tokens": cap_tokens}}) as resp:
        assert resp.status == 201, await resp.text()
    async with http.post(root + "/api/agents", headers=ADMIN, json={"name": name, "policy": name}) as resp:
        token: str = (await resp.json())["data"]["token"]
    return token


async def _reserved_tokens(http: aiohttp.ClientSession, root: str, run_id: str) -> list[int]:
    async with http.get(root + f"/api/runs/{run_id}/events", headers=ADMIN) as resp:
        events = [orjson.loads(line) for line in (await resp.read()).splitlines()]
    return [event["data"]["reserved_tokens"] for event in events if event["type"] == "StepStarted"]


async def test_a_call_that_continues_an_answer_reserves_its_tokens(aiohttp_server: Any, tmp_path: Path) -> None:
    root = await _gateway(aiohttp_server, tmp_path)
    async with aiohttp.ClientSession() as http:
        token = await _agent(http, root, "chatty", 100_000)
        client = openai.AsyncOpenAI(api_key=token, base_url=root + "/v1", max_retries=0)
        run = {"x-rungate-run-id": "conversation"}
        async with client:
            # given an answer (1,010 tokens) and one that continues it, streamed (2,020 tokens)
            first = await client.responses.create(model=MODEL, input="read the files", max_output_tokens=OUTPUT,
                                                  extra_headers=run)
            async with client.responses.stream(model=MODEL, input="and now?", previous_response_id=first.id,
                                               max_output_tokens=OUTPUT, extra_headers=run) as stream:
                second = await stream.get_final_response()
            # when a third call continues the second
            third = await client.responses.create(model=MODEL, input="go on", previous_response_id=second.id,
                                                  max_output_tokens=OUTPUT, extra_headers=run)
        assert third.usage is not None and third.usage.input_tokens == 1000 + 2020
        # then each call reserved its own body's estimate plus what the answer it continues carried
        reserved = await _reserved_tokens(http, root, "conversation")
        own = [estimate_input_tokens({"input": text}) for text in ("read the files", "and now?", "go on")]
        assert reserved == [own[0] + OUTPUT, own[1] + 1010 + OUTPUT, own[2] + 2020 + OUTPUT]


async def test_a_continued_conversation_cannot_take_a_run_past_its_token_cap(aiohttp_server: Any,
                                                                             tmp_path: Path) -> None:
    root = await _gateway(aiohttp_server, tmp_path)
    async with aiohttp.ClientSession() as http:
        # given a run with a cap of 4,000 tokens, and three answers in a chain (1,010 + 2,020 tokens so far)
        token = await _agent(http, root, "capped", 4000)
        headers = {"Authorization": f"Bearer {token}", "content-type": "application/json",
                   "x-rungate-run-id": "chain"}
        previous = None
        statuses = []
        for text in ("read the files", "and now?", "go on"):
            body: dict[str, Any] = {"model": MODEL, "input": text, "max_output_tokens": OUTPUT}
            if previous is not None:
                body["previous_response_id"] = previous
            async with http.post(root + "/v1/responses", data=orjson.dumps(body), headers=headers) as resp:
                statuses.append(resp.status)
                answer = await resp.json()
            previous = answer.get("id", previous)
        # then the third, which would bring 2,020 tokens of conversation and 1,000 of its own, is refused before
        # it goes upstream (its ask names the carried tokens), and the run stays within its cap
        assert statuses == [200, 200, 402]
        context = answer["error"]["context"]
        assert context["requested_tokens"] == estimate_input_tokens({"input": "go on"}) + 2020 + OUTPUT
        async with http.get(root + "/api/runs/chain", headers=ADMIN) as resp:
            run = (await resp.json())["data"]
        assert run["tokens"]["input"] + run["tokens"]["output"] == 1010 + 2020 <= 4000


async def test_another_agents_answer_carries_nothing(aiohttp_server: Any, tmp_path: Path) -> None:
    root = await _gateway(aiohttp_server, tmp_path)
    async with aiohttp.ClientSession() as http:
        owner = await _agent(http, root, "owner", 100_000)
        other = await _agent(http, root, "other", 100_000)
        async with openai.AsyncOpenAI(api_key=owner, base_url=root + "/v1", max_retries=0) as client:
            first = await client.responses.create(model=MODEL, input="read the files", max_output_tokens=OUTPUT,
                                                  extra_headers={"x-rungate-run-id": "owner-run"})
        # an answer is known by id only to the agent whose call it was: another agent's call (which the provider
        # may accept, as Rungate's key made both) is reserved by its own body, and learns nothing of it
        async with openai.AsyncOpenAI(api_key=other, base_url=root + "/v1", max_retries=0) as client:
            await client.responses.create(model=MODEL, input="and now?", previous_response_id=first.id,
                                          max_output_tokens=OUTPUT, extra_headers={"x-rungate-run-id": "other-run"})
        assert await _reserved_tokens(http, root, "other-run") == [estimate_input_tokens({"input": "and now?"})
                                                                  + OUTPUT]
