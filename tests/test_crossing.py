"""Calls served by the other vendor (SPEC §6), through the real proxy with the stock SDKs.

Given routes whose only target is of the other vendor (`gpt-x` and `resp-x` -> Anthropic, `claude-x` ->
OpenAI), when an agent calls Rungate in its own format, then the mock upstream is asked only in the other
format (checked on its request log), and the agent gets answers, tool calls, usage, errors and streams in
the format it sent: tool loops close with the ids it was given, usage and cost are the serving provider's
at the serving model's price, a request that cannot be carried is a 400 that sends nothing upstream, and
a broken stream ends with an error the SDK raises. Routes `gpt-mixed` / `claude-mixed` put a same-vendor
target on the fault server (tests/faults.py) first, then the other vendor: failover crosses vendors.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
import yaml
from aiohttp.test_utils import TestServer

from rungate.prices import PriceTable
from rungate.usage import Usage
from tests.conftest import ANTHROPIC_KEY, OPENAI_KEY, Gateway, GatewayFactory
from tests.faults import FAULT_LOG, FAULTS, create_fault_app
from tests.test_governance import agent_with_policy, put_policy

pytestmark = pytest.mark.timeout(30)

PRICES = PriceTable.load({})
PRICE_FILE = orjson.loads(next((Path(__file__).parents[1] / "rungate" / "data").glob("prices-*.json")).read_bytes())
WEATHER = '[tool:get_weather {"city":"Paris"}]'
BOTH = WEATHER + ' [tool:get_time {"tz":"CET"}]'
_SCHEMA = {"weather": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                       "additionalProperties": False},
           "time": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"],
                    "additionalProperties": False}}
CHAT_TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": _SCHEMA["weather"], "strict": True}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone",
                                      "parameters": _SCHEMA["time"], "strict": True}}]
MESSAGES_TOOLS: list[Any] = [
    {"name": "get_weather", "description": "Weather in a city", "input_schema": _SCHEMA["weather"]},
    {"name": "get_time", "description": "Time in a zone", "input_schema": _SCHEMA["time"]}]
RESPONSES_TOOLS: list[Any] = [
    {"type": "function", "name": "get_weather", "description": "Weather in a city",
     "parameters": _SCHEMA["weather"], "strict": True}]


class Env:
    """A gateway with the crossing routes, the fault server behind the `*-mixed` primaries, an agent."""

    def __init__(self, gateway: Gateway, faults: TestServer, token: str) -> None:
        self.gateway, self.faults, self.token = gateway, faults, token
        self.clients: list[openai.AsyncOpenAI | anthropic.AsyncAnthropic] = []  # closed by the fixture

    def openai(self) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(api_key=self.token, base_url=self.gateway.url + "/v1", max_retries=0)
        self.clients.append(client)
        return client

    def anthropic(self, token: str | None = None) -> anthropic.AsyncAnthropic:
        client = anthropic.AsyncAnthropic(api_key=token or self.token, base_url=self.gateway.url, max_retries=0)
        self.clients.append(client)
        return client

    def asked(self, path: str | None = None) -> list[dict[str, Any]]:
        """The bodies the (healthy) mock upstream got, on `path` or on any path."""
        return [r["body"] for r in self.gateway.upstream_requests if path is None or r["path"] == path]

    @property
    def paths(self) -> set[str]:
        return {r["path"] for r in self.gateway.upstream_requests}

    async def steps(self, run_id: str) -> list[dict[str, Any]]:
        status, body = await self.gateway.admin("GET", f"/api/runs/{run_id}/steps")
        assert status == 200, body
        return list(body["data"])

    async def settled(self, run_id: str) -> dict[str, Any]:
        """The run, asserting nothing is left reserved."""
        status, body = await self.gateway.admin("GET", f"/api/runs/{run_id}")
        assert status == 200, body
        assert body["data"]["reserved_usd"] == "0"
        return dict(body["data"])

    async def raw(self, path: str, body: dict[str, Any], token: str | None = None) -> tuple[int, Any, bytes]:
        """POST with plain aiohttp: (status, headers, raw body)."""
        async with aiohttp.ClientSession() as http, http.post(
                self.gateway.url + path, json=body, headers={"Authorization": f"Bearer {token or self.token}",
                                                             "anthropic-version": "2023-06-01"}) as resp:
            return resp.status, resp.headers, await resp.read()


@pytest.fixture
async def env(make_gateway: GatewayFactory, aiohttp_server: Any, tmp_path: Path) -> AsyncIterator[Env]:
    faults = await aiohttp_server(create_fault_app())
    fast = {"timeouts": {"first_token_s": 3}}
    config = tmp_path / "rungate.yaml"
    config.write_text(yaml.safe_dump({"routes": {
        "gpt-x": [{"provider": "anthropic", "model": "claude-haiku-4-5"}],
        "claude-x": [{"provider": "openai", "model": "gpt-4o-mini"}],
        "resp-x": [{"provider": "anthropic", "model": "claude-haiku-4-5"}],
        "gpt-mixed": [{"provider": "openai", "model": "gpt-4o-mini", "base_url": str(faults.make_url("/v1")), **fast},
                      {"provider": "anthropic", "model": "claude-haiku-4-5"}],
        "claude-mixed": [{"provider": "anthropic", "model": "claude-haiku-4-5",
                          "base_url": str(faults.make_url("")).rstrip("/"), **fast},
                         {"provider": "openai", "model": "gpt-4o-mini"}],
    }}))
    gateway = await make_gateway(RUNGATE_CONFIG=str(config), RUNGATE_RETRY_BASE_S="0.02")
    env = Env(gateway, faults, await gateway.new_agent())
    yield env
    for client in env.clients:
        await client.close()


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def sse(raw: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) of each SSE event of a raw body (comments skipped)."""
    events = []
    for block in raw.decode().split("\n\n"):
        lines = [line for line in block.splitlines() if line and not line.startswith(":")]
        if lines:
            name = next((line[6:].strip() for line in lines if line.startswith("event:")), None)
            data = "\n".join(line[5:].strip() for line in lines if line.startswith("data:"))
            events.append((name, data))
    return events


def mock_input_tokens(conversation: Any) -> int:
    """The mock's uncached input count for what it was sent (its documented formula)."""
    return max(1, math.ceil(len(orjson.dumps(conversation)) / 4))


def words(text: str) -> int:
    return len(re.findall(r"\S+\s*", text))


def list_price(model: str, usage: Usage) -> Decimal:
    """The cost by hand from the shipped price file (USD per million tokens)."""
    price = PRICE_FILE["models"][model]
    return (usage.input * Decimal(price["input"]) + usage.cached * Decimal(price["cache_read"])
            + usage.output * Decimal(price["output"])) / 1_000_000


# ---------------------------------------------------------------------------------------------------------
# 1. The other vendor is asked, in its own format


async def test_a_chat_call_routed_to_anthropic_is_asked_as_anthropic_messages(env: Env) -> None:
    client = env.openai()
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-x", temperature=1.5, tools=CHAT_TOOLS, tool_choice="required", parallel_tool_calls=False,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"},
                  {"role": "developer", "content": "Answer in English."}])
    answer = raw.parse()
    assert env.paths == {"/v1/messages"}
    [request] = env.gateway.upstream_requests
    sent = request["body"]
    assert request["headers"]["x-api-key"] == ANTHROPIC_KEY and "authorization" not in request["headers"]
    assert request["headers"]["anthropic-version"]
    assert sent["model"] == "claude-haiku-4-5"
    assert sent["system"] == [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Answer in English."}]
    assert sent["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]
    assert sent["max_tokens"] == PRICE_FILE["models"]["claude-haiku-4-5"]["max_output_tokens"]
    assert sent["temperature"] == 1
    assert sent["tools"][0] == {"name": "get_weather", "description": "Weather in a city",
                                "input_schema": _SCHEMA["weather"], "strict": True}
    assert sent["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert not {"n", "parallel_tool_calls", "stream_options"} & set(sent)
    assert answer.object == "chat.completion" and answer.model == "gpt-x"
    assert answer.choices[0].message.content == "Mock reply: hello there"
    assert answer.choices[0].finish_reason == "stop"
    assert (raw.headers["x-rungate-provider"], raw.headers["x-rungate-model"]) == ("anthropic", "claude-haiku-4-5")
    assert "clamped" in raw.headers["x-rungate-warning"]


async def test_a_messages_call_routed_to_openai_is_asked_as_chat_completions(env: Env) -> None:
    client = env.anthropic()
    raw = await client.messages.with_raw_response.create(
        model="claude-x", max_tokens=300, system="Be brief.", stop_sequences=["END"], tools=MESSAGES_TOOLS,
        tool_choice={"type": "tool", "name": "get_time"}, messages=user("hello there"))
    answer = await raw.parse()
    assert env.paths == {"/v1/chat/completions"}
    [request] = env.gateway.upstream_requests
    sent = request["body"]
    assert request["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert "x-api-key" not in request["headers"] and "anthropic-version" not in request["headers"]
    assert sent["model"] == "gpt-4o-mini"
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    assert sent["max_completion_tokens"] == 300 and "max_tokens" not in sent
    assert sent["stop"] == ["END"]
    assert sent["tools"][1] == {"type": "function", "function": {
        "name": "get_time", "description": "Time in a zone", "parameters": _SCHEMA["time"]}}
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    assert answer.type == "message" and answer.role == "assistant" and answer.model == "claude-x"
    assert answer.content[0].text == "Mock reply: hello there"  # type: ignore[union-attr]
    assert answer.stop_reason == "end_turn"
    assert (raw.headers["x-rungate-provider"], raw.headers["x-rungate-model"]) == ("openai", "gpt-4o-mini")


async def test_a_responses_call_routed_to_anthropic_is_asked_as_anthropic_messages(env: Env) -> None:
    client = env.openai()
    raw = await client.responses.with_raw_response.create(model="resp-x", instructions="Be brief.",
                                                          input="hello there", max_output_tokens=50)
    answer = raw.parse()
    assert env.paths == {"/v1/messages"}
    [sent] = env.asked()
    assert sent["model"] == "claude-haiku-4-5" and sent["max_tokens"] == 50
    assert sent["system"] == [{"type": "text", "text": "Be brief."}]
    assert sent["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]
    assert answer.object == "response" and answer.status == "completed" and answer.model == "resp-x"
    assert answer.output_text == "Mock reply: hello there"
    assert raw.headers["x-rungate-provider"] == "anthropic"


# ---------------------------------------------------------------------------------------------------------
# 2. Tool loops with the ids the agent was given


async def test_openai_agent_tool_loop_served_by_anthropic(env: Env) -> None:
    client = env.openai()
    messages: list[Any] = user(f"Weather? {WEATHER}")
    first = await client.chat.completions.create(model="gpt-x", messages=messages, tools=CHAT_TOOLS)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("toolu_")
    messages += [choice.message, {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    final = await client.chat.completions.create(model="gpt-x", messages=messages, tools=CHAT_TOOLS)
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content == "Mock reply: sunny, 21 C"
    assert env.paths == {"/v1/messages"}
    sent = env.asked()[-1]["messages"]
    assert sent[1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": call.id, "name": "get_weather", "input": {"city": "Paris"}}]}
    assert sent[2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21 C"}]}


async def test_openai_agent_parallel_tool_calls_streamed_from_anthropic(env: Env) -> None:
    client = env.openai()
    messages: list[Any] = user(f"Both? {BOTH}")
    async with client.chat.completions.stream(model="gpt-x", messages=messages, tools=CHAT_TOOLS) as stream:
        first = await stream.get_final_completion()
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    calls = message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert len({c.id for c in calls}) == 2
    messages.append({"role": "assistant", "content": None, "tool_calls": [
        {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
        for c in calls]})
    messages += [{"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"},
                 {"role": "tool", "tool_call_id": calls[1].id, "content": "noon"}]
    stream2 = await client.chat.completions.create(model="gpt-x", messages=messages, tools=CHAT_TOOLS, stream=True)
    chunks = [chunk async for chunk in stream2]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Mock reply: sunny noon"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert env.paths == {"/v1/messages"}
    sent = env.asked()[-1]
    assert sent["stream"] is True
    assert [b["id"] for b in sent["messages"][1]["content"]] == [c.id for c in calls]
    assert sent["messages"][2] == {"role": "user", "content": [  # both results in one user turn, in order
        {"type": "tool_result", "tool_use_id": calls[0].id, "content": "sunny"},
        {"type": "tool_result", "tool_use_id": calls[1].id, "content": "noon"}]}


async def test_openai_agent_tool_call_by_plain_stream_iteration(env: Env) -> None:
    client = env.openai()
    stream = await client.chat.completions.create(model="gpt-x", messages=user(WEATHER), tools=CHAT_TOOLS,
                                                  stream=True)
    ids, names, arguments, finish = [], [], "", []
    async for chunk in stream:
        for choice in chunk.choices:
            for fragment in choice.delta.tool_calls or []:
                assert fragment.index == 0
                if fragment.id:
                    ids.append(fragment.id)
                    names.append(fragment.function.name if fragment.function else None)
                arguments += (fragment.function.arguments or "") if fragment.function else ""
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    assert len(ids) == 1 and names == ["get_weather"] and finish == ["tool_calls"]
    assert json.loads(arguments) == {"city": "Paris"}


async def test_anthropic_agent_tool_loop_served_by_openai(env: Env) -> None:
    client = env.anthropic()
    messages: list[Any] = user(f"Weather? {WEATHER}")
    first = await client.messages.create(model="claude-x", max_tokens=200, messages=messages, tools=MESSAGES_TOOLS)
    assert first.stop_reason == "tool_use"
    [block] = first.content
    assert block.type == "tool_use" and block.name == "get_weather" and block.input == {"city": "Paris"}
    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id,
                                               "content": "sunny, 21 C"}]}]
    final = await client.messages.create(model="claude-x", max_tokens=200, messages=messages, tools=MESSAGES_TOOLS)
    assert final.stop_reason == "end_turn"
    assert final.content[0].text == "Mock reply: sunny, 21 C"  # type: ignore[union-attr]
    assert env.paths == {"/v1/chat/completions"}
    sent = env.asked()[-1]["messages"]
    assert sent[1]["tool_calls"] == [{"id": block.id, "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    assert sent[2] == {"role": "tool", "tool_call_id": block.id, "content": "sunny, 21 C"}


async def test_anthropic_agent_parallel_tool_loop_streamed_from_openai(env: Env) -> None:
    client = env.anthropic()
    messages: list[Any] = user(f"Both? {BOTH}")
    async with client.messages.stream(model="claude-x", max_tokens=200, messages=messages,
                                      tools=MESSAGES_TOOLS) as stream:
        first = await stream.get_final_message()
    assert first.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in first.content] == [  # type: ignore[union-attr]
        ("tool_use", "get_weather", {"city": "Paris"}), ("tool_use", "get_time", {"tz": "CET"})]
    ids = [b.id for b in first.content]  # type: ignore[union-attr]
    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                 {"role": "user", "content": [
                     {"type": "tool_result", "tool_use_id": ids[0], "content": "sunny"},
                     {"type": "tool_result", "tool_use_id": ids[1], "content": "noon"},
                     {"type": "text", "text": "thanks"}]}]
    async with client.messages.stream(model="claude-x", max_tokens=200, messages=messages,
                                      tools=MESSAGES_TOOLS) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "end_turn"
    assert final.content[0].text == "Mock reply: thanks"  # type: ignore[union-attr]
    sent = env.asked()[-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool", "tool", "user"]
    assert [m.get("tool_call_id") for m in sent["messages"][2:4]] == ids


# ---------------------------------------------------------------------------------------------------------
# 3. Usage and cost are the serving provider's, at the serving model's price


async def test_openai_agent_usage_and_cost_are_anthropics(env: Env) -> None:
    client = env.openai()
    raw = await client.chat.completions.with_raw_response.create(model="gpt-x", messages=user("hi [cached:1000]"))
    answer = raw.parse()
    [sent] = env.asked()
    uncached = mock_input_tokens(sent["messages"])
    output = words(answer.choices[0].message.content or "")
    usage = answer.usage
    assert usage is not None
    assert usage.prompt_tokens == uncached + 1000  # Anthropic input + cache reads (+ writes: none here)
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 1000
    assert usage.completion_tokens == output and usage.total_tokens == uncached + 1000 + output
    [step] = await env.steps(raw.headers["x-rungate-run-id"])
    assert (step["provider"], step["model"], step["status"]) == ("anthropic", "claude-haiku-4-5", "ok")
    assert step["tokens"]["input"] == uncached + 1000 and step["tokens"]["cached"] == 1000
    assert step["tokens"]["output"] == output and not step["estimated"]
    served = Usage(input=uncached, cached=1000, output=output)
    expected = list_price("claude-haiku-4-5", served)
    assert PRICES.cost_pico("claude-haiku-4-5", served) == expected * 10**12
    assert Decimal(step["cost_usd"]) == expected == Decimal(raw.headers["x-rungate-cost-usd"])
    assert expected != list_price("gpt-4o-mini", served)  # not the price of a model the agent named or implied
    assert raw.headers["x-rungate-tokens-used"] == str(uncached + 1000 + output)
    await env.settled(raw.headers["x-rungate-run-id"])


async def test_anthropic_agent_usage_and_cost_are_openais(env: Env) -> None:
    client = env.anthropic()
    raw = await client.messages.with_raw_response.create(model="claude-x", max_tokens=100,
                                                         messages=user("hi [cached:400]"))
    answer = await raw.parse()
    [sent] = env.asked()
    uncached = mock_input_tokens(sent["messages"])
    output = words(answer.content[0].text)  # type: ignore[union-attr]
    assert answer.usage.input_tokens == uncached  # OpenAI prompt_tokens minus its cached tokens
    assert answer.usage.cache_read_input_tokens == 400 and answer.usage.cache_creation_input_tokens == 0
    assert answer.usage.output_tokens == output
    [step] = await env.steps(raw.headers["x-rungate-run-id"])
    assert (step["provider"], step["model"]) == ("openai", "gpt-4o-mini")
    assert (step["tokens"]["input"], step["tokens"]["cached"], step["tokens"]["output"]) == (uncached + 400, 400,
                                                                                              output)
    expected = list_price("gpt-4o-mini", Usage(input=uncached, cached=400, output=output))
    assert Decimal(step["cost_usd"]) == expected == Decimal(raw.headers["x-rungate-cost-usd"])


async def test_streamed_usage_across_vendors_matches_the_step(env: Env) -> None:
    oai, ant = env.openai(), env.anthropic()
    stream = await oai.chat.completions.create(model="gpt-x", messages=user("one two [cached:64]"), stream=True,
                                               stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    async with ant.messages.stream(model="claude-x", max_tokens=100, messages=user("three [cached:32]")) as events:
        message = await events.get_final_message()
    to_anthropic, to_openai = env.asked("/v1/messages")[0], env.asked("/v1/chat/completions")[0]
    [usage_chunk] = [c for c in chunks if not c.choices]
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.prompt_tokens == mock_input_tokens(to_anthropic["messages"]) + 64
    assert message.usage.input_tokens == mock_input_tokens(to_openai["messages"])
    assert message.usage.cache_read_input_tokens == 32
    assert message.usage.output_tokens == words(message.content[0].text)  # type: ignore[union-attr]
    status, runs = await env.gateway.admin("GET", "/api/runs")
    assert status == 200
    steps = [s for run in runs["data"] for s in await env.steps(run["id"])]
    by_model = {s["model"]: s for s in steps}
    assert by_model["claude-haiku-4-5"]["tokens"]["input"] == usage_chunk.usage.prompt_tokens
    assert by_model["claude-haiku-4-5"]["tokens"]["output"] == usage_chunk.usage.completion_tokens
    assert by_model["gpt-4o-mini"]["tokens"]["input"] == message.usage.input_tokens + 32
    assert by_model["gpt-4o-mini"]["tokens"]["output"] == message.usage.output_tokens
    for step in steps:
        tokens = step["tokens"]
        served = Usage(input=tokens["input"] - tokens["cached"], cached=tokens["cached"], output=tokens["output"])
        assert Decimal(step["cost_usd"]) == list_price(step["model"], served)


# ---------------------------------------------------------------------------------------------------------
# 4. Responses API served by Anthropic


async def test_responses_function_tool_loop_served_by_anthropic(env: Env) -> None:
    client = env.openai()
    first = await client.responses.create(model="resp-x", input=f"Weather? {WEATHER}", tools=RESPONSES_TOOLS)
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    items: list[Any] = [{"role": "user", "content": f"Weather? {WEATHER}"}, call,
                        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    final = await client.responses.create(model="resp-x", input=items, tools=RESPONSES_TOOLS)
    assert final.output_text == "Mock reply: sunny" and final.status == "completed"
    async with client.responses.stream(model="resp-x", input=items, tools=RESPONSES_TOOLS) as stream:
        streamed = await stream.get_final_response()
    assert streamed.output_text == "Mock reply: sunny"
    assert streamed.usage is not None and streamed.usage.input_tokens == mock_input_tokens(env.asked()[-1]["messages"])
    assert env.paths == {"/v1/messages"}
    sent = env.asked()[-1]["messages"]
    assert sent[1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": call.call_id, "name": "get_weather", "input": {"city": "Paris"}}]}
    assert sent[2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call.call_id, "content": "sunny"}]}


async def test_responses_stream_of_a_tool_call_served_by_anthropic(env: Env) -> None:
    client = env.openai()
    stream = await client.responses.create(model="resp-x", input=WEATHER, tools=RESPONSES_TOOLS, stream=True)
    received: list[Any] = [event async for event in stream]
    assert received[-1].type == "rungate"  # the trailer (SPEC §3): the SDK yields it as one more event
    events = received[:-1]
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == {"city": "Paris"}
    final = events[-1].response
    assert final.output[0].type == "function_call" and final.output[0].name == "get_weather"


# ---------------------------------------------------------------------------------------------------------
# 5. Errors in the caller's format


async def test_an_anthropic_400_reaches_an_openai_agent_as_bad_request(env: Env) -> None:
    client = env.openai()
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="gpt-x", messages=user("[status:400]"))
    assert caught.value.type == "invalid_request_error"
    assert "status 400 requested by directive" in caught.value.message
    assert caught.value.response.headers["x-rungate-provider"] == "anthropic"
    with pytest.raises(openai.BadRequestError):  # a stream refused before its first event: the same error
        await client.chat.completions.create(model="gpt-x", messages=user("[status:400]"), stream=True)
    assert len(env.asked("/v1/messages")) == 2  # a 4xx about the request is the answer: not retried


async def test_an_openai_400_reaches_an_anthropic_agent_as_bad_request(env: Env) -> None:
    client = env.anthropic()
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.messages.create(model="claude-x", max_tokens=50, messages=user("[status:400]"))
    body: Any = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert len(env.asked("/v1/chat/completions")) == 1


async def test_a_529_from_the_only_anthropic_target_is_retried_then_a_502_for_an_openai_agent(env: Env) -> None:
    # Documented (README "Failover", SPEC 6.1): a routed call retries 529 once, then every target has failed:
    # 502 provider_error listing the attempts. The 529 -> 503 mapping of translate.errors is never reached.
    client = env.openai()
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="gpt-x", messages=user("[status:529]"))
    assert caught.value.status_code == 502
    body: Any = caught.value.body
    assert body["code"] == "provider_error" and body["type"] == "provider_error"
    assert [(a["provider"], a["status"]) for a in body["details"]] == [("anthropic", 529), ("anthropic", 529)]
    assert len(env.asked("/v1/messages")) == 2
    run_id = caught.value.response.headers["x-rungate-run-id"]
    assert [s["status"] for s in await env.steps(run_id)] == ["error", "error"]
    await env.settled(run_id)


async def test_a_request_that_cannot_be_carried_is_a_400_in_the_callers_format(env: Env) -> None:
    oai, ant = env.openai(), env.anthropic()
    with pytest.raises(openai.BadRequestError) as chat:
        await oai.chat.completions.create(model="gpt-x", n=2, messages=user("hi"))
    with pytest.raises(openai.BadRequestError) as responses:
        await oai.responses.create(model="resp-x", input="hi", previous_response_id="resp_123")
    with pytest.raises(anthropic.BadRequestError) as messages:
        await ant.messages.create(model="claude-x", max_tokens=50, messages=user("hi"),
                                  tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 1}])
    assert chat.value.code == "untranslatable_request" and "n > 1" in chat.value.message
    assert responses.value.code == "untranslatable_request"
    body: Any = messages.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "untranslatable_request"
    assert env.gateway.upstream_requests == []  # nothing went upstream
    status, runs = await env.gateway.admin("GET", "/api/runs")
    assert status == 200
    steps = [(s["status"], s["cost_usd"]) for run in runs["data"] for s in await env.steps(run["id"])]
    assert steps == [("skipped", "0")] * 3
    for run in runs["data"]:
        await env.settled(run["id"])
    # The call was admitted into a run and recorded as a step: like every proxied answer (SPEC §3), and like
    # the 502 of the same loop, the refusal names them.
    assert chat.value.response.headers.get("x-rungate-run-id") in {run["id"] for run in runs["data"]}


# ---------------------------------------------------------------------------------------------------------
# 6. Failover across vendors


async def test_openai_primary_failing_fails_over_to_anthropic(env: Env) -> None:
    env.faults.app[FAULTS].extend(["status:503", "status:503"])
    client = env.openai()
    raw = await client.chat.completions.with_raw_response.create(model="gpt-mixed", messages=user("hello"))
    answer = raw.parse()
    assert answer.object == "chat.completion" and answer.model == "gpt-mixed"
    assert answer.choices[0].message.content == "Mock reply: hello"
    assert raw.headers["x-rungate-failover"] == "2"
    assert (raw.headers["x-rungate-provider"], raw.headers["x-rungate-model"]) == ("anthropic", "claude-haiku-4-5")
    assert [path for _, path, _ in env.faults.app[FAULT_LOG]] == ["/v1/chat/completions"] * 2
    assert env.paths == {"/v1/messages"}
    run_id = raw.headers["x-rungate-run-id"]
    steps = await env.steps(run_id)
    assert [(s["provider"], s["model"], s["status"]) for s in steps] == [
        ("openai", "gpt-4o-mini", "error"), ("openai", "gpt-4o-mini", "error"),
        ("anthropic", "claude-haiku-4-5", "ok")]
    assert steps[0]["cost_usd"] == steps[1]["cost_usd"] == "0"
    assert Decimal(steps[2]["cost_usd"]) == Decimal(raw.headers["x-rungate-cost-usd"]) > 0
    run = await env.settled(run_id)
    assert run["spend_usd"] == steps[2]["cost_usd"]


async def test_a_chat_stream_fails_over_to_anthropic_with_the_usage_it_asked_for(env: Env) -> None:
    env.faults.app[FAULTS].extend(["status:503", "status:503"])
    status, headers, body = await env.raw("/v1/chat/completions", {
        "model": "gpt-mixed", "stream": True, "stream_options": {"include_usage": True}, "messages": user("hello")})
    assert status == 200 and headers["x-rungate-failover"] == "2" and headers["x-rungate-provider"] == "anthropic"
    datas = [data for _, data in sse(body)]
    chunks = [orjson.loads(data) for data in datas[:datas.index("[DONE]")]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "Mock reply: hello"
    assert [c["usage"]["completion_tokens"] for c in chunks if c["choices"] == []] == [3]
    trailer = orjson.loads(datas[-1])
    steps = await env.steps(trailer["run_id"])
    assert [(s["provider"], s["status"]) for s in steps] == [("openai", "error"), ("openai", "error"),
                                                              ("anthropic", "ok")]
    assert trailer["cost_usd"] == steps[2]["cost_usd"]
    await env.settled(trailer["run_id"])


async def test_a_stream_broken_before_its_first_token_fails_over_to_the_other_vendor(env: Env) -> None:
    env.faults.app[FAULTS].extend(["cut:1", "cut:1"])  # only the opening event, then the line drops
    client = env.anthropic()
    async with client.messages.stream(model="claude-mixed", max_tokens=100, messages=user("hello")) as stream:
        events = [event.type async for event in stream]
        message = await stream.get_final_message()
    # the trailer comes last (anthropic 2.x yields unknown events); one message, from the serving target only
    assert events.count("message_start") == 1 and events[-2:] == ["message_stop", "rungate"]
    assert message.content[0].text == "Mock reply: hello"  # type: ignore[union-attr]
    assert message.model == "claude-mixed"
    status, runs = await env.gateway.admin("GET", "/api/runs")
    steps = await env.steps(runs["data"][0]["id"])
    assert [(s["provider"], s["status"]) for s in steps] == [("anthropic", "cut"), ("anthropic", "cut"),
                                                              ("openai", "ok")]
    await env.settled(runs["data"][0]["id"])


# ---------------------------------------------------------------------------------------------------------
# 7. Streams translated, checked on the wire


async def test_an_anthropic_stream_from_an_openai_target_on_the_wire(env: Env) -> None:
    status, headers, body = await env.raw("/v1/messages", {"model": "claude-x", "max_tokens": 100, "stream": True,
                                                           "messages": user("hello big world")})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers["x-rungate-provider"] == "openai"
    events = sse(body)
    assert all(name is not None for name, _ in events)  # every event has its `event:` line
    names = [name for name, _ in events]
    assert b"[DONE]" not in body
    assert names == ["message_start", "content_block_start", *["content_block_delta"] * 5, "content_block_stop",
                     "message_delta", "message_stop", "rungate"]  # one delta per word of the mock's reply
    payloads = [orjson.loads(data) for _, data in events]
    assert all(p["type"] == name for (name, _), p in zip(events, payloads, strict=True))
    start = payloads[0]["message"]
    assert start["role"] == "assistant" and start["model"] == "claude-x" and set(start["usage"]) >= {
        "input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"}
    text = "".join(p["delta"]["text"] for p in payloads if p["type"] == "content_block_delta")
    assert text == "Mock reply: hello big world"
    delta = next(p for p in payloads if p["type"] == "message_delta")
    assert delta["delta"]["stop_reason"] == "end_turn" and delta["usage"]["output_tokens"] == 5
    trailer = payloads[-1]
    assert (trailer["provider"], trailer["model"]) == ("openai", "gpt-4o-mini")
    assert trailer["tokens"]["output"] == 5


@pytest.mark.parametrize("include_usage", [True, False])
async def test_a_chat_stream_from_an_anthropic_target_on_the_wire(env: Env, include_usage: bool) -> None:
    request: dict[str, Any] = {"model": "gpt-x", "stream": True, "messages": user("hello big world")}
    if include_usage:
        request["stream_options"] = {"include_usage": True}
    status, headers, body = await env.raw("/v1/chat/completions", request)
    assert status == 200 and headers["x-rungate-provider"] == "anthropic"
    events = sse(body)
    datas = [data for _, data in events]
    done = datas.index("[DONE]")
    assert events[done + 1:] and [name for name, _ in events[done + 1:]] == ["rungate"]  # the trailer follows
    chunks = [orjson.loads(data) for data in datas[:done]]
    assert all(name is None for name, _ in events[:done + 1])
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "gpt-x" for c in chunks)
    usage_chunks = [c for c in chunks if c["choices"] == []]
    assert len(usage_chunks) == (1 if include_usage else 0)
    if include_usage:
        assert chunks[-1] is usage_chunks[0]
        sent = env.asked()[0]
        assert usage_chunks[0]["usage"]["prompt_tokens"] == mock_input_tokens(sent["messages"])
        assert usage_chunks[0]["usage"]["completion_tokens"] == 5
    else:
        assert all(c.get("usage") is None for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Mock reply: hello big world"
    trailer = orjson.loads(datas[-1])
    assert trailer["type"] == "rungate" and trailer["tokens"]["output"] == 5


async def test_a_responses_stream_from_an_anthropic_target_on_the_wire(env: Env) -> None:
    status, _, body = await env.raw("/v1/responses", {"model": "resp-x", "stream": True, "input": "hello"})
    assert status == 200
    events = sse(body)
    assert all(name is not None for name, _ in events)
    assert events[-1][0] == "rungate" and events[-2][0] == "response.completed"
    payloads = [orjson.loads(data) for _, data in events[:-1]]
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))
    assert all(p["type"] == name for (name, _), p in zip(events, payloads, strict=False))
    assert payloads[-1]["response"]["output"][0]["content"][0]["text"] == "Mock reply: hello"


# ---------------------------------------------------------------------------------------------------------
# 8. A translated stream broken after tokens reached the agent ends with an error the SDK raises


async def test_a_chat_stream_from_anthropic_cut_after_tokens_raises(env: Env) -> None:
    client = env.openai()
    seen: list[str] = []
    # message_start, ping, content_block_start, then three text deltas reach Rungate; the line drops
    with pytest.raises(openai.APIError):
        stream = await client.chat.completions.create(model="gpt-x", messages=user("[cut:6] one two three"),
                                                      stream=True)
        async for chunk in stream:
            seen += [c.delta.content or "" for c in chunk.choices]
    assert "".join(seen) == "Mock reply: [cut:6] "
    assert len(env.asked()) == 1  # not re-run once tokens went out
    status, runs = await env.gateway.admin("GET", "/api/runs")
    [step] = await env.steps(runs["data"][0]["id"])
    assert step["status"] == "cut" and step["provider"] == "anthropic"
    await env.settled(runs["data"][0]["id"])


async def test_a_messages_stream_from_openai_cut_after_tokens_raises(env: Env) -> None:
    client = env.anthropic()
    seen: list[str] = []
    # the role chunk, then two text chunks reach Rungate; the line drops
    with pytest.raises(anthropic.APIStatusError):
        async with client.messages.stream(model="claude-x", max_tokens=100,
                                          messages=user("[cut:3] one two three")) as stream:
            async for text in stream.text_stream:
                seen.append(text)
    assert "".join(seen) == "Mock reply: "
    assert len(env.asked()) == 1


async def test_a_responses_stream_from_anthropic_cut_after_tokens_raises(env: Env) -> None:
    client = env.openai()
    seen: list[str] = []
    with pytest.raises(openai.APIError):
        stream = await client.responses.create(model="resp-x", input="[cut:5] one two three", stream=True)
        async for event in stream:
            if event.type == "response.output_text.delta":
                seen.append(event.delta)
    assert "".join(seen) == "Mock reply: "


# ---------------------------------------------------------------------------------------------------------
# Governance sees the agent's own tool names, whichever vendor serves


LONG_TOOL = "issue_refund_" + "x" * 60  # 72 characters: fine for Anthropic, too long for OpenAI (64)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_gated_tool_whose_name_openai_cannot_take_is_held_when_openai_serves(env: Env, stream: bool) -> None:
    # Rungate sends OpenAI a shortened name (55-character prefix, "_", 8 hex digits of its SHA-256) and gives
    # the agent its own name back; the approval rule names the agent's tool, so the answer must be held.
    await put_policy(env.gateway, "gated", {"approvals": [{"name": "refunds", "tool": LONG_TOOL}]})
    token = await agent_with_policy(env.gateway, "gated-agent", "gated")
    shortened = f"{LONG_TOOL[:55]}_{hashlib.sha256(LONG_TOOL.encode()).hexdigest()[:8]}"
    status, _, body = await env.raw("/v1/messages", {
        "model": "claude-x", "max_tokens": 100, "stream": stream, "messages": user(f"[tool:{shortened} {{}}]"),
        "tools": [{"name": LONG_TOOL, "input_schema": {"type": "object", "properties": {}}}]}, token=token)
    assert [t["function"]["name"] for t in env.asked()[-1]["tools"]] == [shortened]
    assert status == 202, body[:300]
    held = orjson.loads(body)
    assert held["status"] == "awaiting_approval"
    assert [g["tool"] for g in held["approval_requests"]] == [LONG_TOOL]


async def test_reasoning_effort_thinks_within_the_target_models_own_output_limit(env: Env) -> None:
    client = env.openai()
    answer = await client.chat.completions.create(model="gpt-x", reasoning_effort="medium", messages=user("hi"))
    [request] = env.gateway.upstream_requests
    sent = request["body"]
    assert sent["max_tokens"] == PRICE_FILE["models"]["claude-haiku-4-5"]["max_output_tokens"]  # not past it
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 8192}
    assert answer.choices[0].message.content == "Mock reply: hi"
