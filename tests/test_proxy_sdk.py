"""The stock `openai` and `anthropic` SDKs drive Rungate against a real aiohttp fake upstream.

Given an agent token, when the SDKs call Rungate (stream and not, both formats), then they get the
provider's answers unchanged, Rungate's headers and trailer, and the run records every step and cost.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from rungate.prices import PriceTable
from rungate.proxy.formats import CHAT, EMBEDDINGS
from rungate.proxy.forward import LARGE_ANSWER_BYTES, _read_answer
from rungate.usage import Usage
from tests.conftest import ANTHROPIC_KEY, OPENAI_KEY, Gateway

PRICES = PriceTable.load()


def oa(gateway: Gateway, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=token, base_url=gateway.url + "/v1", max_retries=0)


def an(gateway: Gateway, token: str, *, as_bearer: bool = False) -> anthropic.AsyncAnthropic:
    if as_bearer:
        return anthropic.AsyncAnthropic(auth_token=token, base_url=gateway.url, max_retries=0)
    return anthropic.AsyncAnthropic(api_key=token, base_url=gateway.url, max_retries=0)


async def run_view(gateway: Gateway, run_id: str) -> dict[str, Any]:
    status, body = await gateway.admin("GET", f"/api/runs/{run_id}")
    assert status == 200, body
    run: dict[str, Any] = body["data"]
    return run


async def steps_of(gateway: Gateway, run_id: str) -> list[dict[str, Any]]:
    status, body = await gateway.admin("GET", f"/api/runs/{run_id}/steps")
    assert status == 200, body
    steps: list[dict[str, Any]] = body["data"]
    return steps


def cost_of(model: str, usage: Usage) -> str:
    cost = PRICES.cost(model, usage)
    assert cost is not None
    return str(cost.normalize()) if cost else "0"


async def test_openai_chat_non_stream_is_relayed_with_headers_and_recorded(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    client = oa(gateway, token)
    raw = await client.chat.completions.with_raw_response.create(
        model="mock-gpt", messages=[{"role": "user", "content": "hello world"}],
        extra_headers={"x-rungate-run-id": "run-a"})
    completion = raw.parse()
    await client.close()

    assert completion.choices[0].message.content == "Mock reply: hello world"
    assert raw.headers["x-rungate-run-id"] == "run-a"
    assert raw.headers["x-rungate-provider"] == "openai"
    assert raw.headers["x-rungate-model"] == "mock-gpt"
    assert raw.headers["x-rungate-failover"] == "0"
    usage = completion.usage
    assert usage is not None
    assert raw.headers["x-rungate-tokens-used"] == str(usage.total_tokens)
    expected = cost_of("mock-gpt", Usage(input=usage.prompt_tokens, output=usage.completion_tokens))
    assert Decimal(raw.headers["x-rungate-cost-usd"]) == Decimal(expected)
    # The provider key replaced the agent token upstream; Rungate's headers did not travel.
    sent = gateway.upstream_requests[-1]
    assert sent["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert not any(h.startswith("x-rungate") for h in sent["headers"])

    run = await run_view(gateway, "run-a")
    assert run["status"] == "active" and run["step_count"] == 1
    assert Decimal(run["spend_usd"]) == Decimal(expected)
    assert run["reserved_usd"] == "0"
    [step] = await steps_of(gateway, "run-a")
    assert step["id"] == raw.headers["x-rungate-step-id"]
    assert step["tokens"]["input"] == usage.prompt_tokens and step["tokens"]["output"] == usage.completion_tokens


async def test_bytes_are_the_providers_bytes(gateway: Gateway) -> None:
    """Where Rungate changes nothing, the client gets exactly what a direct call returns."""
    token = await gateway.new_agent()
    body = orjson.dumps({"model": "mock-gpt", "messages": [{"role": "user", "content": "same bytes"}]})
    async with aiohttp.ClientSession() as http:
        async with http.post(str(gateway.upstream.make_url("/v1/chat/completions")), data=body,
                             headers={"content-type": "application/json"}) as direct:
            direct_bytes = await direct.read()
        async with http.post(gateway.url + "/v1/chat/completions", data=body,
                             headers={"content-type": "application/json", "authorization": f"Bearer {token}"}) as via:
            via_bytes = await via.read()
        stream_body = orjson.dumps({"model": "mock-claude", "max_tokens": 50, "stream": True,
                                    "messages": [{"role": "user", "content": "same stream"}]})
        async with http.post(str(gateway.upstream.make_url("/v1/messages")), data=stream_body,
                             headers={"content-type": "application/json"}) as direct:
            direct_stream = await direct.read()
        async with http.post(gateway.url + "/v1/messages", data=stream_body,
                             headers={"content-type": "application/json", "x-api-key": token}) as via:
            via_stream = await via.read()
    assert via_bytes == direct_bytes
    # The Anthropic stream is the provider's bytes followed by one `event: rungate` trailer.
    assert via_stream.startswith(direct_stream)
    trailer = via_stream[len(direct_stream):]
    assert trailer.startswith(b"event: rungate\ndata: ") and trailer.endswith(b"\n\n")


async def test_openai_stream_usage_is_metered_and_the_extra_chunk_stripped(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    client = oa(gateway, token)
    stream = await client.chat.completions.create(
        model="mock-gpt", stream=True, messages=[{"role": "user", "content": "count these words please"}],
        extra_headers={"x-rungate-run-id": "run-s"})
    chunks = [chunk async for chunk in stream]
    await client.close()

    # The client did not ask for usage: every chunk it sees has choices (naive chunk.choices[0] is safe).
    assert chunks and all(chunk.choices for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Mock reply: count these words please"
    # ...but Rungate asked upstream for it, and metered it.
    assert gateway.upstream_requests[-1]["body"]["stream_options"] == {"include_usage": True}
    [step] = await steps_of(gateway, "run-s")
    assert step["status"] == "ok" and step["estimated"] is False and step["tokens"]["output"] == 6
    assert Decimal(step["cost_usd"]) > 0


async def test_openai_stream_keeps_usage_when_the_client_asked(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    client = oa(gateway, token)
    stream = await client.chat.completions.create(
        model="mock-gpt", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "with usage"}])
    chunks = [chunk async for chunk in stream]
    await client.close()
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


async def test_trailer_reaches_raw_sse_clients(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    async with aiohttp.ClientSession() as http, http.post(
            gateway.url + "/v1/chat/completions", headers={"authorization": f"Bearer {token}"},
            json={"model": "mock-gpt", "stream": True, "messages": [{"role": "user", "content": "trailer"}],
                  "rungate": {"run_id": "run-t"}}) as resp:
        text = (await resp.read()).decode()
    events = [e for e in text.split("\n\n") if e]
    assert events[-2] == "data: [DONE]"
    name, data = events[-1].split("\n", 1)
    assert name == "event: rungate"
    trailer = orjson.loads(data.removeprefix("data: "))
    assert trailer["run_id"] == "run-t" and trailer["provider"] == "openai" and trailer["model"] == "mock-gpt"
    assert trailer["tokens"]["output"] == 3
    assert Decimal(trailer["cost_usd"]) > 0
    # The body's `rungate` key was removed before forwarding.
    assert "rungate" not in gateway.upstream_requests[-1]["body"]


async def test_openai_tool_call_stream_is_recorded(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    client = oa(gateway, token)
    async with client.chat.completions.stream(
            model="mock-gpt", messages=[{"role": "user", "content": 'go [tool:issue_refund {"amount_usd": 12}]'}],
            tools=[{"type": "function", "function": {"name": "issue_refund", "parameters": {"type": "object"}}}],
            extra_headers={"x-rungate-run-id": "run-tool"}) as stream:
        final = await stream.get_final_completion()
    await client.close()
    call = final.choices[0].message.tool_calls
    assert call and call[0].function.name == "issue_refund"
    [step] = await steps_of(gateway, "run-tool")
    assert step["tool_calls"][0]["name"] == "issue_refund"
    assert orjson.loads(step["tool_calls"][0]["arguments"]) == {"amount_usd": 12}


async def test_openai_responses_stream_and_non_stream(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    client = oa(gateway, token)
    response = await client.responses.create(model="mock-gpt", input="responses api",
                                             extra_headers={"x-rungate-run-id": "run-r"})
    assert response.output_text == "Mock reply: responses api"
    events = []
    async with client.responses.stream(model="mock-gpt", input="streamed responses",
                                       extra_headers={"x-rungate-run-id": "run-r"}) as stream:
        async for event in stream:
            events.append(event.type)
        final = await stream.get_final_response()
    await client.close()
    assert final.output_text == "Mock reply: streamed responses"
    assert "response.completed" in events
    steps = await steps_of(gateway, "run-r")
    assert [s["endpoint"] for s in steps] == ["responses", "responses"]
    assert all(s["status"] == "ok" and not s["estimated"] for s in steps)


async def test_embeddings_are_metered(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    client = oa(gateway, token)
    result = await client.embeddings.create(model="mock-embedding", input=["a b c", "d e"],
                                            extra_headers={"x-rungate-run-id": "run-e"})
    await client.close()
    assert len(result.data) == 2
    [step] = await steps_of(gateway, "run-e")
    assert step["endpoint"] == "embeddings" and step["tokens"]["input"] == result.usage.prompt_tokens


@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_a_large_embeddings_answer_reaches_the_agent_whole_and_is_metered(gateway: Gateway,
                                                                               encoding: str) -> None:
    # Past LARGE_ANSWER_BYTES Rungate reads only the answer's usage, off its end; the agent gets every byte.
    inputs = [f"document {i} " * 20 for i in range(48)]
    token = await gateway.new_agent()
    async with aiohttp.ClientSession() as http:
        body = {"model": "mock-embedding", "input": inputs, "dimensions": 1536, "encoding_format": encoding}
        async with http.post(gateway.upstream.make_url("/v1/embeddings"), json=body) as resp:
            direct = await resp.read()
        async with http.post(gateway.url + "/v1/embeddings", json=body, headers={
                "authorization": f"Bearer {token}", "x-rungate-run-id": "run-big-e"}) as resp:
            assert resp.status == 200
            relayed = await resp.read()
    assert len(relayed) > LARGE_ANSWER_BYTES
    assert relayed == direct
    answer = orjson.loads(relayed)
    assert len(answer["data"]) == 48
    [step] = await steps_of(gateway, "run-big-e")
    assert step["status"] == "ok" and not step["estimated"]
    tokens = answer["usage"]["prompt_tokens"]
    assert step["tokens"]["input"] == tokens > 0
    assert Decimal(step["cost_usd"]) == Decimal(cost_of("mock-embedding", Usage(input=tokens)))


def test_only_a_large_embeddings_answer_is_read_off_its_end() -> None:
    vectors = [{"object": "embedding", "index": i, "embedding": [0.5] * 2048} for i in range(40)]
    large = orjson.dumps({"object": "list", "data": vectors, "model": "m", "usage": {"prompt_tokens": 7}})
    small = orjson.dumps({"object": "list", "data": vectors[:1], "model": "m", "usage": {"prompt_tokens": 7}})
    assert len(large) > LARGE_ANSWER_BYTES > len(small)
    assert _read_answer(EMBEDDINGS, large) == ({}, Usage(input=7))  # the vectors were not read
    parsed, usage = _read_answer(EMBEDDINGS, small)
    assert parsed == orjson.loads(small) and usage == Usage(input=7)
    # usage first: read whole, and metered the same
    reordered = orjson.dumps({"usage": {"prompt_tokens": 7}, "object": "list", "data": vectors})
    parsed, usage = _read_answer(EMBEDDINGS, reordered)
    assert parsed == orjson.loads(reordered) and usage == Usage(input=7)
    # a chat answer is always read whole
    chat = orjson.dumps({"choices": [{"message": {"content": "x" * LARGE_ANSWER_BYTES}}], "usage": {
        "prompt_tokens": 1, "completion_tokens": 2}})
    parsed, usage = _read_answer(CHAT, chat)
    assert parsed == orjson.loads(chat) and usage == Usage(input=1, output=2)


@pytest.mark.parametrize("as_bearer", [False, True], ids=["x-api-key", "bearer"])
async def test_anthropic_messages_non_stream(gateway: Gateway, as_bearer: bool) -> None:
    token = await gateway.new_agent()
    client = an(gateway, token, as_bearer=as_bearer)
    raw = await client.messages.with_raw_response.create(
        model="mock-claude", max_tokens=64, messages=[{"role": "user", "content": "hello claude"}],
        extra_headers={"x-rungate-run-id": "run-m"})
    message = await raw.parse()
    await client.close()
    assert message.content[0].type == "text" and message.content[0].text == "Mock reply: hello claude"
    assert raw.headers["x-rungate-provider"] == "anthropic"
    sent = gateway.upstream_requests[-1]["headers"]
    assert sent["x-api-key"] == ANTHROPIC_KEY and "authorization" not in sent
    assert sent["anthropic-version"]  # forwarded from the SDK unchanged
    [step] = await steps_of(gateway, "run-m")
    assert step["tokens"] == {"input": message.usage.input_tokens, "output": message.usage.output_tokens,
                              "cached": 0, "cache_write": 0, "reasoning": 0}


async def test_anthropic_stream_with_cache_and_tool_use(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    client = an(gateway, token)
    async with client.messages.stream(
            model="mock-claude", max_tokens=200, extra_headers={"x-rungate-run-id": "run-ms"},
            tools=[{"name": "lookup", "input_schema": {"type": "object"}}],
            messages=[{"role": "user", "content": 'find [cached:100] [tool:lookup {"q": "x"}]'}]) as stream:
        async for _event in stream:
            pass
        message = await stream.get_final_message()
    await client.close()
    assert message.stop_reason == "tool_use"
    assert message.usage.cache_read_input_tokens == 100
    [step] = await steps_of(gateway, "run-ms")
    assert step["tokens"]["cached"] == 100
    assert step["tool_calls"][0]["name"] == "lookup"
    usage = Usage(input=message.usage.input_tokens, cached=100, output=message.usage.output_tokens)
    assert Decimal(step["cost_usd"]) == Decimal(cost_of("mock-claude", usage))


async def test_doubled_v1_path_is_tolerated(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    client = anthropic.AsyncAnthropic(api_key=token, base_url=gateway.url + "/v1", max_retries=0)
    message = await client.messages.create(model="mock-claude", max_tokens=20,
                                           messages=[{"role": "user", "content": "doubled"}])
    await client.close()
    assert message.content[0].type == "text"


async def test_models_list_in_both_formats(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    client = oa(gateway, token)
    ids = [m.id async for m in client.models.list()]
    await client.close()
    assert "gpt-4o" in ids and "claude-haiku-4-5" in ids
    aclient = an(gateway, token)
    page = await aclient.models.list()
    await aclient.close()
    assert page.data and all(m.id.startswith("claude") or m.id.startswith("mock") for m in page.data)


async def test_unknown_model_is_recorded_unpriced_never_zero(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    client = oa(gateway, token)
    raw = await client.chat.completions.with_raw_response.create(
        model="experimental-model-x", messages=[{"role": "user", "content": "unpriced"}],
        extra_headers={"x-rungate-run-id": "run-u"})
    await client.close()
    assert raw.headers["x-rungate-cost-usd"] == "unpriced"
    assert "no price" in raw.headers["x-rungate-warning"]
    [step] = await steps_of(gateway, "run-u")
    assert step["cost_usd"] is None and step["unpriced"] is True
    run = await run_view(gateway, "run-u")
    assert run["unpriced_steps"] == 1
