"""Retry and failover across a route's targets (SPEC §6), driven by the real SDKs against a fake upstream
that fails on command (tests/faults.py) in front of a healthy one (the mock provider).

Each fault gives its documented outcome in bounded time; the failing upstream's own log shows how many
requests it got (no hammering); every attempt is a settled step and nothing stays reserved.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
import yaml
from aiohttp.test_utils import TestServer

from tests.conftest import Gateway, GatewayFactory
from tests.faults import DOWN_UNTIL, FAULT_BODIES, FAULT_LOG, FAULTS, TEXT, create_fault_app
from tests.openapi_check import validate_response

USER = [{"role": "user", "content": "hi"}]


class Setup:
    """A gateway whose model `main` routes to the fault server first (model `gpt-4o-mini`), then to the
    healthy mock (model `gpt-4.1-mini`); `claude-main` likewise for the Anthropic format."""

    def __init__(self, gateway: Gateway, faults: TestServer, token: str) -> None:
        self.gateway, self.faults, self.token = gateway, faults, token

    def script(self, *faults: str) -> None:
        self.faults.app[FAULTS].extend(faults)

    @property
    def primary_requests(self) -> list[tuple[float, str, str]]:
        return [entry for entry in self.faults.app[FAULT_LOG] if entry[1] != "/v1/models"]

    def openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(api_key=self.token, base_url=self.gateway.url + "/v1", max_retries=0)

    def anthropic(self) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(api_key=self.token, base_url=self.gateway.url, max_retries=0)

    async def steps(self, run_id: str) -> list[dict[str, Any]]:
        status, body = await self.gateway.admin("GET", f"/api/runs/{run_id}/steps")
        assert status == 200
        return list(body["data"])

    async def events(self, run_id: str) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as http, http.get(
                f"{self.gateway.url}/api/runs/{run_id}/events",
                headers={"Authorization": "Bearer rg_adm_" + "t" * 40}) as resp:
            return [orjson.loads(line) for line in (await resp.read()).splitlines() if line.strip()]


def _routes(faults: TestServer, primary: dict[str, Any] | None = None) -> dict[str, Any]:
    first = {"base_url": str(faults.make_url("/v1")), "timeouts": {"first_token_s": 1.5, "idle_s": 1.5},
             **(primary or {})}
    return {"routes": {
        "main": [{"provider": "openai", "model": "gpt-4o-mini", **first},
                 {"provider": "openai", "model": "gpt-4.1-mini"}],
        "claude-main": [{"provider": "anthropic", "model": "claude-haiku-4-5",
                         "base_url": str(faults.make_url("")).rstrip("/"), "timeouts": {"first_token_s": 1.5}},
                        {"provider": "anthropic", "model": "claude-sonnet-4-5"}],
        "long": [{"provider": "openai", "model": "gpt-4o-mini", **first},
                 {"provider": "openai", "model": "gpt-4o-mini"},
                 {"provider": "openai", "model": "gpt-4.1"}],
    }}


@pytest.fixture
async def setup(make_gateway: GatewayFactory, aiohttp_server: Any, tmp_path: Path) -> AsyncIterator[Setup]:
    faults = await aiohttp_server(create_fault_app())
    config = tmp_path / "rungate.yaml"
    config.write_text(yaml.safe_dump(_routes(faults)))
    gateway = await make_gateway(RUNGATE_CONFIG=str(config), RUNGATE_RETRY_BASE_S="0.05",
                                 RUNGATE_BREAKER_THRESHOLD="3", RUNGATE_BREAKER_COOLDOWN_S="1")
    yield Setup(gateway, faults, await gateway.new_agent())
    await _every_step_settled(gateway)


async def _every_step_settled(gateway: Gateway) -> None:
    """Whatever a test did, no step stays open and no run holds a reservation once its calls are answered."""
    status, runs = await gateway.admin("GET", "/api/runs?limit=200")
    assert status == 200
    for run in runs["data"]:
        assert run["reserved_usd"] == "0", run
        _, steps = await gateway.admin("GET", f"/api/runs/{run['id']}/steps")
        assert all(step["status"] != "started" for step in steps["data"]), steps


async def _chat(setup: Setup, model: str = "main", **extra: Any) -> Any:
    client = setup.openai()
    try:
        return await client.chat.completions.with_raw_response.create(model=model, messages=USER, **extra)
    finally:
        await client.close()


async def _no_reservation_left(setup: Setup, run_id: str) -> dict[str, Any]:
    status, body = await setup.gateway.admin("GET", f"/api/runs/{run_id}")
    assert status == 200
    assert body["data"]["reserved_usd"] == "0"
    return dict(body["data"])


async def test_a_healthy_primary_serves_alone(setup: Setup) -> None:
    raw = await _chat(setup)
    assert raw.headers["x-rungate-failover"] == "0"
    assert raw.headers["x-rungate-model"] == "gpt-4o-mini"
    assert raw.parse().model == "gpt-4o-mini"
    assert len(setup.primary_requests) == 1


async def test_a_500_once_is_retried_on_the_same_target(setup: Setup) -> None:
    setup.script("status:500")
    raw = await _chat(setup)
    assert raw.headers["x-rungate-failover"] == "1"
    assert raw.headers["x-rungate-model"] == "gpt-4o-mini"
    assert [fault for _, _, fault in setup.primary_requests] == ["status:500", "ok"]
    run_id = raw.headers["x-rungate-run-id"]
    steps = await setup.steps(run_id)
    assert [s["status"] for s in steps] == ["error", "ok"]
    events = [e for e in await setup.events(run_id) if e["type"] == "StepFailedOver"]
    assert len(events) == 1 and events[0]["data"]["retry"] is True
    assert events[0]["data"]["step_id"] == steps[0]["id"] and events[0]["data"]["to_step_id"] == steps[1]["id"]
    await _no_reservation_left(setup, run_id)


async def test_a_persistent_503_is_retried_once_then_failed_over(setup: Setup) -> None:
    setup.script("status:503", "status:503")
    raw = await _chat(setup)
    assert raw.parse().choices[0].message.content.startswith("Mock reply")
    assert raw.headers["x-rungate-failover"] == "2"
    assert (raw.headers["x-rungate-provider"], raw.headers["x-rungate-model"]) == ("openai", "gpt-4.1-mini")
    assert len(setup.primary_requests) == 2  # one retry, no hammering
    run_id = raw.headers["x-rungate-run-id"]
    steps = await setup.steps(run_id)
    assert [(s["model"], s["status"]) for s in steps] == [
        ("gpt-4o-mini", "error"), ("gpt-4o-mini", "error"), ("gpt-4.1-mini", "ok")]
    # Charged at the serving target's price: the failed attempts cost nothing.
    assert steps[0]["cost_usd"] == "0" and steps[1]["cost_usd"] == "0"
    run = await _no_reservation_left(setup, run_id)
    assert run["spend_usd"] == steps[2]["cost_usd"] and run["step_count"] == 3


async def test_429_with_a_short_retry_after_waits_for_it(setup: Setup) -> None:
    setup.script("status:429:1")
    started = time.monotonic()
    raw = await _chat(setup)
    assert time.monotonic() - started >= 0.95
    assert raw.headers["x-rungate-model"] == "gpt-4o-mini" and raw.headers["x-rungate-failover"] == "1"
    times = [t for t, _, _ in setup.primary_requests]
    assert len(times) == 2 and times[1] - times[0] >= 0.95


async def test_429_with_a_long_retry_after_fails_over_at_once(setup: Setup) -> None:
    setup.script("status:429:120")
    started = time.monotonic()
    raw = await _chat(setup)
    assert time.monotonic() - started < 5
    assert raw.headers["x-rungate-model"] == "gpt-4.1-mini"
    assert len(setup.primary_requests) == 1


async def test_429_without_retry_after_backs_off_with_jitter(setup: Setup) -> None:
    setup.script("status:429", "status:429")
    raw = await _chat(setup)
    assert raw.headers["x-rungate-model"] == "gpt-4.1-mini"
    times = [t for t, _, _ in setup.primary_requests]
    assert len(times) == 2
    assert 0.02 <= times[1] - times[0] < 1.0  # RUNGATE_RETRY_BASE_S=0.05: between 0.025 and 0.05 s, plus noise


async def test_529_overloaded_fails_over_for_an_anthropic_client(setup: Setup) -> None:
    setup.script("status:529", "status:529")
    client = setup.anthropic()
    raw = await client.messages.with_raw_response.create(model="claude-main", max_tokens=50, messages=USER)
    await client.close()
    assert raw.headers["x-rungate-model"] == "claude-sonnet-4-5"
    assert (await raw.parse()).content[0].text.startswith("Mock reply")  # type: ignore[union-attr]
    assert len(setup.primary_requests) == 2


async def test_a_reset_before_headers_is_retried_then_failed_over(setup: Setup) -> None:
    setup.script("reset", "reset")
    raw = await _chat(setup)
    assert raw.headers["x-rungate-model"] == "gpt-4.1-mini"
    assert len(setup.primary_requests) == 2


async def test_a_silent_target_is_failed_over_at_once_not_retried(setup: Setup) -> None:
    setup.script("hang")
    started = time.monotonic()
    raw = await _chat(setup)
    elapsed = time.monotonic() - started
    assert raw.headers["x-rungate-model"] == "gpt-4.1-mini"
    assert 1.4 <= elapsed < 5  # a plain answer comes whole: its silence limit (idle_s 1.5 s), then the next target
    assert len(setup.primary_requests) == 1
    steps = await setup.steps(raw.headers["x-rungate-run-id"])
    assert steps[0]["status"] == "upstream_error"
    # The request went out and the provider may have been generating: charged its reservation, never $0.
    assert steps[0]["cost_usd"] not in (None, "0")


async def test_a_refused_connection_fails_over(make_gateway: GatewayFactory, aiohttp_server: Any,
                                               tmp_path: Path, unused_tcp_port: int) -> None:
    config = tmp_path / "rungate.yaml"
    config.write_text(yaml.safe_dump({"routes": {"main": [
        {"provider": "openai", "model": "gpt-4o-mini", "base_url": f"http://127.0.0.1:{unused_tcp_port}/v1"},
        {"provider": "openai", "model": "gpt-4.1-mini"}]}}))
    gateway = await make_gateway(RUNGATE_CONFIG=str(config), RUNGATE_RETRY_BASE_S="0.05")
    client = openai.AsyncOpenAI(api_key=await gateway.new_agent(), base_url=gateway.url + "/v1", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="main", messages=USER)
    await client.close()
    assert raw.headers["x-rungate-model"] == "gpt-4.1-mini" and raw.headers["x-rungate-failover"] == "2"
    steps = await Setup(gateway, None, "").steps(raw.headers["x-rungate-run-id"])  # type: ignore[arg-type]
    assert [s["status"] for s in steps] == ["upstream_error", "upstream_error", "ok"]


async def test_context_length_is_not_retried_on_the_same_model(setup: Setup) -> None:
    setup.script("context_length")
    raw = await _chat(setup, model="long")
    # the second target asks the same model: skipped; the third (another model) serves
    assert raw.headers["x-rungate-model"] == "gpt-4.1"
    assert [fault for _, _, fault in setup.primary_requests] == ["context_length"]
    assert len(await setup.steps(raw.headers["x-rungate-run-id"])) == 2


async def test_a_content_filter_refusal_is_the_agents_answer(setup: Setup) -> None:
    setup.script("content_filter")
    client = setup.openai()
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="main", messages=USER)
    await client.close()
    assert caught.value.code == "content_filter"
    assert "safety system" in caught.value.message
    assert len(setup.primary_requests) == 1  # not retried, not failed over


async def test_every_target_failing_is_a_502_listing_each_attempt(setup: Setup) -> None:
    client = setup.openai()
    setup.script("status:503", "status:503")
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="main", messages=[{"role": "user", "content": "[status:500]"}])
    await client.close()
    assert caught.value.status_code == 502
    body: Any = caught.value.body
    assert body["code"] == "provider_error"
    assert [(a["model"], a["status"]) for a in body["details"]] == [
        ("gpt-4o-mini", 503), ("gpt-4o-mini", 503), ("gpt-4.1-mini", 500), ("gpt-4.1-mini", 500)]
    run_id = caught.value.response.headers["x-rungate-run-id"]
    await _no_reservation_left(setup, run_id)


async def test_a_stream_cut_before_its_first_token_fails_over_cleanly(setup: Setup) -> None:
    setup.script("cut:1", "cut:1")  # only the opening (role) chunk, then the line drops
    client = setup.openai()
    stream = await client.chat.completions.create(model="main", messages=USER, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    await client.close()
    assert text.startswith("Mock reply")
    assert len(setup.primary_requests) == 2


async def test_a_slow_first_token_fails_over_within_its_limit(setup: Setup) -> None:
    setup.script("slowfirst:30")
    client = setup.openai()
    started = time.monotonic()
    stream = await client.chat.completions.create(model="main", messages=USER, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    await client.close()
    assert text.startswith("Mock reply")
    assert time.monotonic() - started < 5
    assert len(setup.primary_requests) == 1  # a silent target is not retried


async def test_a_malformed_chunk_before_the_first_token_fails_over(setup: Setup) -> None:
    setup.script("malformed:1", "malformed:1")
    client = setup.openai()
    stream = await client.chat.completions.create(model="main", messages=USER, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    await client.close()
    assert text.startswith("Mock reply")


async def test_a_stream_cut_after_tokens_ends_with_an_error_the_sdk_raises(setup: Setup) -> None:
    setup.script("cut:3")  # the role chunk and two words reached the agent
    assert (await _text_before_the_error(setup, "main")).startswith("Hello world, \0")
    assert len(setup.primary_requests) == 1  # after tokens went out, the call is never silently re-run


async def _text_before_the_error(setup: Setup, model: str, **extra: Any) -> str:
    """The text an OpenAI agent streamed before its SDK raised the stream's error event (it must raise); the
    error's message follows a NUL."""
    client = setup.openai()
    seen: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        stream = await client.chat.completions.create(model=model, messages=USER, stream=True, **extra)
        async for chunk in stream:
            if chunk.choices:
                seen.append(chunk.choices[0].delta.content or "")
    await client.close()
    return "".join(seen) + "\0" + str(caught.value)


async def test_a_stream_without_its_final_event_is_finalised_with_its_usage(setup: Setup) -> None:
    setup.script("nodone")
    text = await _text_before_the_error(setup, "main", stream_options={"include_usage": True})
    assert text.startswith(TEXT + "\0")
    status, runs = await setup.gateway.admin("GET", "/api/runs")
    steps = await setup.steps(runs["data"][0]["id"])
    assert steps[0]["status"] == "cut" and steps[0]["tokens"]["output"] == 6  # the usage chunk arrived


async def test_an_open_circuit_skips_the_primary_and_recovers(setup: Setup) -> None:
    # Failures open the primary's circuit at the third (threshold 3): the second call's retry is not sent.
    setup.script(*["status:503"] * 3)
    for _ in range(2):
        raw = await _chat(setup)
        assert raw.headers["x-rungate-model"] == "gpt-4.1-mini"
    status, health = await setup.gateway.admin("GET", "/api/providers/health")
    assert status == 200
    validate_response("GET", "/api/providers/health", 200, health)
    primary = next(t for t in health["data"] if t["model"] == "gpt-4o-mini" and "/v1" in t["base_url"]
                   and str(setup.faults.port) in t["base_url"])
    assert primary["state"] == "open" and primary["failed"] == 3
    before = len(setup.primary_requests)
    assert before == 3
    raw = await _chat(setup)  # skipped while open: straight to the next target
    assert raw.headers["x-rungate-model"] == "gpt-4.1-mini" and len(setup.primary_requests) == before
    await asyncio.sleep(1.1)  # the cooldown passes: one probe goes to the primary, which has recovered
    raw = await _chat(setup)
    assert raw.headers["x-rungate-model"] == "gpt-4o-mini"
    status, health = await setup.gateway.admin("GET", "/api/providers/health")
    primary = next(t for t in health["data"] if str(setup.faults.port) in t["base_url"])
    assert primary["state"] == "closed"


async def test_every_circuit_open_is_a_502_naming_them(setup: Setup) -> None:
    setup.script(*["status:503"] * 6)
    client = setup.openai()
    for _ in range(3):  # primary fails twice per call; the fallback is failed by directive
        with pytest.raises(openai.APIStatusError):
            await client.chat.completions.create(model="main", messages=[{"role": "user", "content": "[status:503]"}])
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="main", messages=USER)
    await client.close()
    assert caught.value.status_code == 502
    body: Any = caught.value.body
    assert {a["error"] for a in body["details"]} == {"circuit_open"}


async def test_providers_health_needs_the_admin_token(setup: Setup) -> None:
    async with aiohttp.ClientSession() as http, http.get(setup.gateway.url + "/api/providers/health") as resp:
        assert resp.status == 401


@pytest.fixture
async def continuing(make_gateway: GatewayFactory, aiohttp_server: Any, tmp_path: Path) -> AsyncIterator[Setup]:
    """`main` goes to an OpenAI target, then to an Anthropic one (which accepts a prefill), both on the fault
    server; `claude-main` to two Anthropic targets there."""
    faults = await aiohttp_server(create_fault_app())
    openai_url, anthropic_url = str(faults.make_url("/v1")), str(faults.make_url("")).rstrip("/")
    config = tmp_path / "rungate.yaml"
    config.write_text(yaml.safe_dump({"routes": {
        "main": [{"provider": "openai", "model": "gpt-4o-mini", "base_url": openai_url},
                 {"provider": "anthropic", "model": "claude-haiku-4-5", "base_url": anthropic_url}],
        "claude-main": [{"provider": "anthropic", "model": "claude-haiku-4-5", "base_url": anthropic_url},
                        {"provider": "anthropic", "model": "claude-sonnet-4-5", "base_url": anthropic_url}],
        "no-prefill": [{"provider": "openai", "model": "gpt-4o-mini", "base_url": openai_url},
                       {"provider": "openai", "model": "gpt-4.1-mini", "base_url": openai_url}],
    }}))
    gateway = await make_gateway(RUNGATE_CONFIG=str(config), RUNGATE_RETRY_BASE_S="0.05")
    yield Setup(gateway, faults, await gateway.new_agent())
    await _every_step_settled(gateway)


async def test_a_stream_cut_after_tokens_is_continued_by_a_prefill_target(continuing: Setup) -> None:
    continuing.script("cut:3", "continue")  # "Hello world, " reached the agent, then the line dropped
    client = continuing.openai()
    stream = await client.chat.completions.create(model="main", messages=USER, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    await client.close()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TEXT  # one answer, no repeated whitespace
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert sum(1 for c in chunks if c.usage is not None) == 1
    # The continuation asked the Anthropic target to go on from the text already sent (its trailing space
    # stripped, as Anthropic requires).
    asked = continuing.faults.app[FAULT_BODIES][-1]
    assert asked["messages"][-1] == {"role": "assistant", "content": [{"type": "text", "text": "Hello world,"}]} \
        or asked["messages"][-1] == {"role": "assistant", "content": "Hello world,"}
    status, runs = await continuing.gateway.admin("GET", "/api/runs")
    run_id = runs["data"][0]["id"]
    steps = await continuing.steps(run_id)
    assert [(s["provider"], s["status"]) for s in steps] == [("openai", "cut"), ("anthropic", "ok")]
    assert steps[0]["tokens"]["output"] > 0  # what the first target relayed is charged
    moved = [e["data"] for e in await continuing.events(run_id) if e["type"] == "StepFailedOver"]
    assert len(moved) == 1 and moved[0]["continuation"] is True
    await _no_reservation_left(continuing, run_id)


async def test_an_anthropic_stream_cut_mid_answer_is_continued_in_the_same_stream(continuing: Setup) -> None:
    continuing.script("cut:4", "continue")  # message_start, block start, "Hello ", "world, "
    client = continuing.anthropic()
    async with client.messages.stream(model="claude-main", max_tokens=100, messages=USER) as stream:
        final = await stream.get_final_message()
    await client.close()
    assert [block.text for block in final.content] == [TEXT]  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens >= 6


async def test_no_prefill_target_means_the_stream_ends_with_an_error_not_a_clean_close(continuing: Setup) -> None:
    continuing.script("cut:3")
    assert (await _text_before_the_error(continuing, "no-prefill")).startswith("Hello world, \0")
    assert len(continuing.primary_requests) == 1  # never silently re-run


async def test_a_continuation_that_fails_too_ends_with_the_break_not_its_own_refusal(continuing: Setup) -> None:
    continuing.script("cut:3", "status:400")  # the prefill target refuses the continuation
    text, error = (await _text_before_the_error(continuing, "main")).split("\0")
    assert text == "Hello world, " and "broke off" in error


async def test_a_stream_stalled_after_tokens_is_continued_once_its_idle_limit_passes(
        make_gateway: GatewayFactory, aiohttp_server: Any, tmp_path: Path) -> None:
    faults = await aiohttp_server(create_fault_app())
    config = tmp_path / "rungate.yaml"
    config.write_text(yaml.safe_dump({"routes": {"main": [
        {"provider": "openai", "model": "gpt-4o-mini", "base_url": str(faults.make_url("/v1")),
         "timeouts": {"idle_s": 0.5}},
        {"provider": "anthropic", "model": "claude-haiku-4-5", "base_url": str(faults.make_url("")).rstrip("/")}]}}))
    gateway = await make_gateway(RUNGATE_CONFIG=str(config))
    setup = Setup(gateway, faults, await gateway.new_agent())
    setup.script("stall:3:30", "continue")  # two words, then silence
    client = setup.openai()
    started = time.monotonic()
    stream = await client.chat.completions.create(model="main", messages=USER, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    await client.close()
    assert text == TEXT
    assert time.monotonic() - started < 5  # the idle limit (0.5 s), not the stall (30 s)
    steps = await setup.steps((await gateway.admin("GET", "/api/runs"))[1]["data"][0]["id"])
    assert [s["status"] for s in steps] == ["cut", "ok"]


async def test_a_malformed_event_after_tokens_is_not_relayed_and_the_answer_is_continued(
        continuing: Setup) -> None:
    continuing.script("malformed:3", "continue")
    client = continuing.openai()
    stream = await client.chat.completions.create(model="main", messages=USER, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    await client.close()
    assert text == TEXT


async def test_a_policys_routes_win_and_its_model_list_filters_the_targets(
        make_gateway: GatewayFactory, aiohttp_server: Any, tmp_path: Path) -> None:
    faults = await aiohttp_server(create_fault_app())
    config = tmp_path / "rungate.yaml"
    config.write_text(yaml.safe_dump(_routes(faults)))
    gateway = await make_gateway(RUNGATE_CONFIG=str(config))
    # A named key for the policy's target: the route sends that key, not the default one.
    status, _ = await gateway.admin("POST", "/api/provider-keys",
                                    {"provider": "openai", "name": "team-key", "api_key": "sk-team-0123456789"})
    assert status == 201
    status, _ = await gateway.admin("PUT", "/api/policies/by-name/routed", {
        "models": {"allowed": ["main", "gpt-4.1*"]},
        "routes": {"main": [{"provider": "openai", "model": "gpt-4o"},  # not allowed: skipped
                            {"provider": "openai", "model": "gpt-4.1", "key": "team-key"}],
                   "nothing-allowed": [{"provider": "openai", "model": "gpt-4o"}]}})
    assert status in (200, 201)
    token = await gateway.new_agent("routed-agent")
    client = openai.AsyncOpenAI(api_key=token, base_url=gateway.url + "/v1", max_retries=0,
                                default_headers={"x-rungate-policy": "routed"})
    raw = await client.chat.completions.with_raw_response.create(model="main", messages=USER)
    assert raw.headers["x-rungate-model"] == "gpt-4.1"  # the policy's route, not the file's
    sent = gateway.upstream_requests[-1]
    assert sent["body"]["model"] == "gpt-4.1" and sent["headers"]["authorization"] == "Bearer sk-team-0123456789"
    assert faults.app[FAULT_LOG] == []  # the file's primary was never asked
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await client.chat.completions.create(model="nothing-allowed", messages=USER,
                                             extra_headers={"x-rungate-new-run": "true"})
    await client.close()
    assert caught.value.body["code"] == "model_not_allowed"  # type: ignore[index]


async def test_a_policy_route_naming_a_base_url_is_refused(gateway: Gateway) -> None:
    status, body = await gateway.admin("PUT", "/api/policies/by-name/sneaky", {
        "routes": {"x": [{"provider": "openai", "model": "gpt-4o", "base_url": "http://169.254.169.254/v1"}]}})
    assert status == 400
    assert any("base_url" in problem["path"] for problem in body["error"]["problems"])


async def test_every_target_refusing_the_request_format_is_a_400_in_the_callers_format(setup: Setup) -> None:
    client = setup.openai()
    with pytest.raises(openai.BadRequestError) as caught:  # n > 1 cannot be carried to Anthropic
        await client.chat.completions.create(model="claude-main", messages=USER, n=2)
    await client.close()
    assert caught.value.code == "untranslatable_request"
    assert setup.primary_requests == [] and setup.gateway.upstream_requests == []


async def test_a_retry_before_the_first_token_gets_headers_of_its_own(continuing: Setup) -> None:
    continuing.script("cut:2")  # message_start and a block start, no token: retried on the same target
    client = continuing.anthropic()
    async with client.messages.with_streaming_response.create(model="claude-main", max_tokens=100,
                                                              messages=USER, stream=True) as raw:
        headers = dict(raw.headers)
        await raw.read()
    await client.close()
    _, runs = await continuing.gateway.admin("GET", "/api/runs")
    steps = await continuing.steps(runs["data"][0]["id"])
    assert [s["status"] for s in steps] == ["cut", "ok"]
    assert headers["x-rungate-failover"] == "1" and headers["x-rungate-step-id"] == steps[-1]["id"]


async def test_request_errors_do_not_open_a_healthy_targets_circuit(setup: Setup) -> None:
    setup.script("context_length", "context_length", "context_length")  # threshold 3
    for _ in range(3):
        raw = await _chat(setup)
        assert raw.headers["x-rungate-model"] == "gpt-4.1-mini"
    raw = await _chat(setup)  # a request that fits goes to the primary again
    assert raw.headers["x-rungate-model"] == "gpt-4o-mini"
    _, health = await setup.gateway.admin("GET", "/api/providers/health")
    primary = next(t for t in health["data"] if str(setup.faults.port) in t["base_url"]
                   and t["model"] == "gpt-4o-mini")
    assert primary["state"] == "closed" and primary["failed"] == 0


async def test_a_call_the_probe_target_cannot_carry_does_not_hold_its_probe(
        make_gateway: GatewayFactory, aiohttp_server: Any, tmp_path: Path) -> None:
    faults = await aiohttp_server(create_fault_app())
    config = tmp_path / "rungate.yaml"
    config.write_text(yaml.safe_dump({"routes": {"x": [
        {"provider": "anthropic", "model": "claude-haiku-4-5", "base_url": str(faults.make_url("")).rstrip("/")},
        {"provider": "openai", "model": "gpt-4.1-mini"}]}}))
    gateway = await make_gateway(RUNGATE_CONFIG=str(config), RUNGATE_RETRY_BASE_S="0.01",
                                 RUNGATE_BREAKER_THRESHOLD="1", RUNGATE_BREAKER_COOLDOWN_S="0.3")
    setup = Setup(gateway, faults, await gateway.new_agent())
    setup.script("status:503")
    assert (await _chat(setup, model="x")).headers["x-rungate-model"] == "gpt-4.1-mini"  # the circuit opens
    await asyncio.sleep(0.4)
    raw = await _chat(setup, model="x", n=2)  # half-open; Anthropic cannot take n=2: served by the fallback
    assert raw.headers["x-rungate-model"] == "gpt-4.1-mini"
    before = len(setup.primary_requests)
    assert (await _chat(setup, model="x")).headers["x-rungate-model"] == "claude-haiku-4-5"  # probed, recovered
    assert len(setup.primary_requests) == before + 1
    await _every_step_settled(gateway)


async def test_attempts_of_one_call_are_not_repeats_of_it(setup: Setup) -> None:
    status, _ = await setup.gateway.admin("PUT", "/api/policies/by-name/rp", {"runaway": {"max_repeats": 2}})
    assert status in (200, 201)
    client = openai.AsyncOpenAI(api_key=await setup.gateway.new_agent("rp-agent"), max_retries=0,
                                base_url=setup.gateway.url + "/v1",
                                default_headers={"x-rungate-policy": "rp", "x-rungate-run-id": "run-rp-1"})
    setup.script("status:503", "status:503")
    await client.chat.completions.create(model="main", messages=USER)  # three attempts, one request
    second = await client.chat.completions.with_raw_response.create(model="main", messages=USER)
    await client.close()
    assert second.headers["x-rungate-failover"] == "0"  # the agent's second identical request is allowed


async def test_the_kill_switch_ends_a_wait_between_attempts(setup: Setup) -> None:
    setup.script("status:429:8")  # Retry-After 8 s (under the 10 s bound): the call waits to retry
    client = setup.openai()
    call = asyncio.ensure_future(client.chat.completions.create(
        model="main", messages=USER, extra_headers={"x-rungate-run-id": "run-stop-wait"}))
    await asyncio.sleep(0.5)
    status, _ = await setup.gateway.admin("POST", "/api/runs/run-stop-wait/stop", {"reason": "test"})
    assert status == 200
    started = time.monotonic()
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await call
    await client.close()
    assert time.monotonic() - started < 2
    assert caught.value.body["code"] == "run_force_stopped"  # type: ignore[index]
    assert len(setup.primary_requests) == 1


async def test_a_continuation_that_errs_before_its_first_token_is_passed_over(
        make_gateway: GatewayFactory, aiohttp_server: Any, tmp_path: Path) -> None:
    faults = await aiohttp_server(create_fault_app())
    anthropic_url = str(faults.make_url("")).rstrip("/")
    config = tmp_path / "rungate.yaml"
    config.write_text(yaml.safe_dump({"routes": {"main": [
        {"provider": "openai", "model": "gpt-4o-mini", "base_url": str(faults.make_url("/v1"))},
        {"provider": "anthropic", "model": "claude-haiku-4-5", "base_url": anthropic_url},
        {"provider": "anthropic", "model": "claude-sonnet-4-5", "base_url": anthropic_url}]}}))
    gateway = await make_gateway(RUNGATE_CONFIG=str(config))
    setup = Setup(gateway, faults, await gateway.new_agent())
    setup.script("cut:3", "errstream", "continue")  # the first continuation is overloaded before any token
    client = setup.openai()
    stream = await client.chat.completions.create(model="main", messages=USER, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    await client.close()
    assert text == TEXT  # the overload never reached the agent; the next target continued
    _, runs = await gateway.admin("GET", "/api/runs")
    steps = await setup.steps(runs["data"][0]["id"])
    assert [(s["model"], s["status"]) for s in steps] == [
        ("gpt-4o-mini", "cut"), ("claude-haiku-4-5", "cut"), ("claude-sonnet-4-5", "ok")]
    await _every_step_settled(gateway)


async def test_a_missing_route_key_is_recorded_against_its_target(
        make_gateway: GatewayFactory, aiohttp_server: Any, tmp_path: Path) -> None:
    config = tmp_path / "rungate.yaml"
    config.write_text(yaml.safe_dump({"routes": {"main": [
        {"provider": "openai", "model": "gpt-4o-mini", "key": "not-stored"},
        {"provider": "openai", "model": "gpt-4.1-mini"}]}}))
    gateway = await make_gateway(RUNGATE_CONFIG=str(config))
    client = openai.AsyncOpenAI(api_key=await gateway.new_agent(), base_url=gateway.url + "/v1", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="main", messages=USER)
    await client.close()
    assert raw.headers["x-rungate-model"] == "gpt-4.1-mini" and "x-rungate-warning" not in raw.headers
    steps = await Setup(gateway, None, "").steps(raw.headers["x-rungate-run-id"])  # type: ignore[arg-type]
    assert [(s["model"], s["status"], s["cost_usd"]) for s in steps] == [
        ("gpt-4o-mini", "upstream_error", "0"), ("gpt-4.1-mini", "ok", steps[1]["cost_usd"])]


async def test_a_held_answer_frees_its_targets_probe_before_the_approval_wait(setup: Setup) -> None:
    from tests.test_approvals import GATED, REFUND_TOOL, agent_with_policy, put_policy
    await put_policy(setup.gateway, "gated", GATED)
    token = await agent_with_policy(setup.gateway, "gated-agent", "gated")
    setup.script(*["status:503"] * 3)  # the primary's circuit opens (threshold 3)
    for _ in range(2):
        await _chat(setup)
    await asyncio.sleep(1.1)  # past the cooldown: the next call is the probe
    body = {"model": "main", "tools": [REFUND_TOOL], "messages": [
        {"role": "user", "content": 'refund [tool:issue_refund {"amount_usd": 900, "order": "A-17"}]'}]}

    async def held() -> None:
        async with aiohttp.ClientSession() as http, http.post(
                setup.gateway.url + "/v1/chat/completions", json=body,
                headers={"Authorization": f"Bearer {token}", "x-rungate-approval-mode": "hold"}) as resp:
            await resp.read()

    waiting = asyncio.ensure_future(held())  # the probe, answered and held for a human
    await asyncio.sleep(0.8)
    served = [(await _chat(setup)).headers["x-rungate-model"] for _ in range(2)]
    waiting.cancel()
    assert served == ["gpt-4o-mini", "gpt-4o-mini"]  # the probe's answer closed the circuit at once


async def test_a_primary_down_for_a_while_is_probed_not_hammered_and_serves_again_once_it_recovers(
        make_gateway: GatewayFactory, aiohttp_server: Any, tmp_path: Path) -> None:
    # A minute's outage, scaled down: down for 1.5 s against a 0.2 s cooldown (seven and a half cooldowns).
    faults = await aiohttp_server(create_fault_app())
    config = tmp_path / "rungate.yaml"
    config.write_text(yaml.safe_dump(_routes(faults)))
    gateway = await make_gateway(RUNGATE_CONFIG=str(config), RUNGATE_RETRY_BASE_S="0.01",
                                 RUNGATE_BREAKER_THRESHOLD="3", RUNGATE_BREAKER_COOLDOWN_S="0.2")
    setup = Setup(gateway, faults, await gateway.new_agent())
    faults.app[DOWN_UNTIL][0] = time.monotonic() + 1.5
    served: list[tuple[float, str]] = []
    started = time.monotonic()
    while time.monotonic() - started < 2.3:
        raw = await _chat(setup)  # every call is answered, whatever the primary's state
        served.append((time.monotonic() - started, raw.headers["x-rungate-model"]))
        await asyncio.sleep(0.02)
    down_requests = [t for t, _, fault in setup.primary_requests if fault == "status:503"]
    # Three failures open the circuit; then one probe per cooldown at most (not two per call).
    assert len(down_requests) <= 3 + 1.5 / 0.2 + 2
    assert sum(1 for t, model in served if t < 1.4 and model == "gpt-4.1-mini") >= 10
    assert all(model == "gpt-4o-mini" for t, model in served if t > 1.5 + 0.2 + 0.15)  # back to the primary
    await _every_step_settled(gateway)


FAULT_MIX = ["ok", "status:500", "status:503", "status:429", "status:529", "reset", "cut:1", "cut:2", "cut:3",
             "cut:5", "malformed:1", "malformed:4", "nodone", "errstream", "context_length", "content_filter"]


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_random_faults_keep_the_books_and_the_bounds(continuing: Setup, seed: int) -> None:
    """Random faults on both targets, stream and not: every call ends in a documented way, no target is asked
    more than twice per call, and nothing stays reserved (the fixture checks the steps and runs)."""
    rng = random.Random(seed)
    client = continuing.openai()
    for _ in range(16):
        faults = [rng.choice(FAULT_MIX) for _ in range(4)]
        continuing.faults.app[FAULTS][:] = [*faults, "continue"]
        before = len(continuing.primary_requests)
        stream = rng.random() < 0.5
        text, outcome = "", "ok"
        try:
            if stream:
                chunks = await client.chat.completions.create(model="main", messages=USER, stream=True)
                text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
            else:
                answer = await client.chat.completions.create(model="main", messages=USER)
                text = answer.choices[0].message.content or ""
        except openai.BadRequestError as exc:  # a content filter or an overlong prompt relayed as it came
            outcome = f"400 {exc.code}"
        except openai.APIStatusError as exc:
            assert exc.status_code == 502, (faults, exc)
            outcome = "502"
        except openai.APIError:
            outcome = "stream error event"
        asked = len(continuing.primary_requests) - before
        assert asked <= 2 * 2 + 1, (faults, asked)  # two targets, each at most tried and retried once (+ one)
        if outcome == "ok":  # one whole answer: the scripted one (continued or not), or the mock's
            assert text in (TEXT, "Mock reply: hi"), (faults, text)
    await client.close()


async def test_a_plain_answer_that_is_not_json_fails_over(setup: Setup) -> None:
    setup.script("nodone")  # an event stream where a JSON answer was asked for
    raw = await _chat(setup)
    assert raw.headers["x-rungate-model"] == "gpt-4.1-mini"
    assert raw.parse().choices[0].message.content.startswith("Mock reply")
    steps = await setup.steps(raw.headers["x-rungate-run-id"])
    assert [s["status"] for s in steps] == ["error", "ok"]
    assert steps[0]["cost_usd"] not in (None, "0")  # the provider answered: its prompt is charged
