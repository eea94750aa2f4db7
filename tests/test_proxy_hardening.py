"""Regression tests for review findings: hostile or broken upstreams and clients, exactly-once settlement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from projections import ALL
from rungate.admin import CreateAgent
from rungate.config import load_settings
from rungate.events.catalogue import StepCompleted
from rungate.ids import token_hash
from rungate.proxy.app import create_app
from rungate.runs import AdmitCall, CallFacts, SettleStep
from rungate.store import SQLiteEventStore
from tests.conftest import ADMIN_TOKEN, Gateway

CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}


async def post(gateway: Gateway, path: str, body: Any, headers: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession() as http, http.post(gateway.url + path, data=orjson.dumps(body),
                                                          headers=headers) as resp:
        raw = await resp.read()
        return resp.status, orjson.loads(raw) if resp.content_type == "application/json" else raw, dict(resp.headers)


def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", "content-type": "application/json"}


async def test_a_step_settles_exactly_once_and_an_orphan_is_charged_its_reservation(tmp_path: Path) -> None:
    store = SQLiteEventStore(tmp_path / "once.db", projections=ALL)
    await store.start()
    try:
        create = CreateAgent("once", {})
        await store.execute(create)
        facts = CallFacts(agent_id=create.agent_id, token_hash=token_hash(create.token), run_id="r-once",
                          new_run=False, endpoint="chat",
                          provider="openai", model="mock-gpt", stream=False, fingerprint="f", reserved_pusd=900,
                          idle_timeout_s=900)
        served, orphan = AdmitCall(facts), AdmitCall(facts)
        await store.execute(served)
        await store.execute(orphan)
        done = StepCompleted(step_id=served.step_id, run_id="r-once", status="ok", provider="openai",
                             model="mock-gpt", usage={"input": 3, "output": 2}, cost_pusd=40, latency_ms=1)
        first = await store.execute(SettleStep(served.step_id, done))
        again = await store.execute(SettleStep(served.step_id, done))  # a retried settlement books nothing
        abandoned = await store.execute(SettleStep(orphan.step_id))  # the sweeper's settlement of an orphan
        late = await store.execute(SettleStep(orphan.step_id, done))
        run = await store.fetchone("SELECT * FROM runs WHERE id = 'r-once'")
    finally:
        await store.close()
    assert len(first) == 1 and again == [] and late == []
    assert abandoned[0].data["status"] == "abandoned" and abandoned[0].data["cost_pusd"] == 900
    assert run is not None
    assert (run["spend_pusd"], run["reserved_pusd"], run["open_steps"], run["step_count"]) == (940, 0, 0, 2)


async def test_the_sweeper_settles_orphaned_steps(tmp_path: Path, aiohttp_server: Any) -> None:
    db = tmp_path / "orphans.db"
    store = SQLiteEventStore(db, projections=ALL)
    await store.start()
    create = CreateAgent("orphaned", {})
    await store.execute(create)
    admit = AdmitCall(CallFacts(agent_id=create.agent_id, token_hash=token_hash(create.token), run_id="r-orphan",
                                new_run=False, endpoint="chat",
                                provider="openai", model="mock-gpt", stream=False, fingerprint="f",
                                reserved_pusd=500, idle_timeout_s=900))
    await store.execute(admit)  # then the process "dies" before settling
    await store.close()
    import asyncio

    import rungate.proxy.app as app_module

    app_module.ORPHAN_GRACE_S = 0  # the test does not wait a minute past the silence timeout
    try:
        settings = load_settings(env={"RUNGATE_DATABASE_URL": f"sqlite:///{db}", "RUNGATE_UPSTREAM_TIMEOUT_S": "1",
                                      "RUNGATE_ADMIN_TOKEN": ADMIN_TOKEN, "RUNGATE_LOG_LEVEL": "warning"})
        await asyncio.sleep(1.1)
        server = await aiohttp_server(create_app(settings))
        async with aiohttp.ClientSession() as http:
            for _ in range(50):
                async with http.get(str(server.make_url("/api/runs/r-orphan/steps")),
                                    headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
                    steps = (await resp.json())["data"]
                if steps[0]["status"] != "started":
                    break
                await asyncio.sleep(0.1)
    finally:
        app_module.ORPHAN_GRACE_S = 60
    assert steps[0]["status"] == "abandoned" and steps[0]["cost_usd"] == "0.0000000005"


def _sse_upstream(events: list[bytes], headers: dict[str, str] | None = None) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **(headers or {})})
        await response.prepare(request)
        for event in events:
            await response.write(event)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def _gateway_with(upstream: web.Application, aiohttp_server: Any, tmp_path: Path,
                        host: str | None = None) -> tuple[Any, str]:
    """Rungate in front of `upstream`, reached as `host` (default: its loopback address)."""
    up = await aiohttp_server(upstream)
    base = str(up.make_url("/v1")) if host is None else f"http://{host}:{up.port}/v1"
    app = create_app(load_settings(env={
        "RUNGATE_DATABASE_URL": f"sqlite:///{tmp_path}/custom.db", "RUNGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "RUNGATE_OPENAI_BASE_URL": base, "OPENAI_API_KEY": "sk-custom-upstream-1",
        "RUNGATE_LOG_LEVEL": "warning"}))
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as http, http.post(
            str(server.make_url("/api/agents")), json={"name": "custom"},
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
        token: str = (await resp.json())["data"]["token"]
    return server, token


CHUNK = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"mock-gpt","choices":[{"index":0,' \
        b'"delta":{"content":"hello"},"finish_reason":null}]}\n\n'


async def test_an_unreadable_upstream_event_ends_the_stream_with_an_error_event(aiohttp_server: Any,
                                                                               tmp_path: Path) -> None:
    huge = b"data: " + b"x" * (9 * 1024 * 1024) + b"\n\n"  # beyond the SSE parser's 8 MiB bound
    server, token = await _gateway_with(_sse_upstream([CHUNK, huge]), aiohttp_server, tmp_path)
    async with aiohttp.ClientSession() as http, http.post(
            str(server.make_url("/v1/chat/completions")), headers=auth(token),
            json={**CHAT, "stream": True, "rungate": {"run_id": "huge"}}) as resp:
        body = await resp.read()
        run_id = resp.headers["x-rungate-run-id"]
    assert body.startswith(CHUNK)
    assert b"HTTP/1.1" not in body  # no second response written into the stream
    assert b'"error"' in body and b"event: rungate" in body
    async with aiohttp.ClientSession() as http, http.get(
            str(server.make_url(f"/api/runs/{run_id}/steps")), headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        [step] = (await r.json())["data"]
    assert step["status"] == "cut" and step["tokens"]["output"] > 0


async def test_the_upstream_cannot_speak_for_rungate(aiohttp_server: Any, tmp_path: Path) -> None:
    done = b"data: [DONE]\n\n"
    upstream = _sse_upstream([CHUNK, done], {"x-rungate-cost-usd": "0.00", "x-rungate-warning": "spoofed"})
    server, token = await _gateway_with(upstream, aiohttp_server, tmp_path)
    async with aiohttp.ClientSession() as http, http.post(
            str(server.make_url("/v1/chat/completions")), headers=auth(token), json={**CHAT, "stream": True}) as resp:
        await resp.read()
        assert "x-rungate-cost-usd" not in resp.headers and "x-rungate-warning" not in resp.headers
        assert resp.headers["x-rungate-request-id"].startswith("req_")


async def test_hostile_inputs_are_refused_before_anything_goes_upstream(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    status, body, _ = await post(gateway, "/v1/chat/completions",
                                 {**CHAT, "model": "gpt-4o-mini\r\nx-injected: 1"}, auth(token))
    assert status == 400 and body["error"]["code"] == "missing_model"
    status, body, _ = await post(gateway, "/v1/chat/completions", {**CHAT, "model": "m" * 300}, auth(token))
    assert status == 400
    assert gateway.upstream_requests == []
    # a stream_options that is not an object is not a server error
    status, _, _ = await post(gateway, "/v1/chat/completions", {**CHAT, "stream": True, "stream_options": "yes"},
                              auth(token))
    assert status == 200


async def test_the_forwarded_body_is_what_rungate_decided_on(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    # duplicate keys: Rungate decides on the last one, and forwards exactly that
    raw = b'{"model": "gpt-4o", "model": "mock-gpt", "messages": [{"role": "user", "content": "dup"}]}'
    async with aiohttp.ClientSession() as http, http.post(gateway.url + "/v1/chat/completions", data=raw,
                                                          headers={"authorization": f"Bearer {token}"},
                                                          skip_auto_headers=["Content-Type"]) as resp:
        assert resp.status == 200  # no Content-Type header at all is taken as JSON
        assert resp.headers["x-rungate-model"] == "mock-gpt"
    assert gateway.upstream_requests[-1]["body"]["model"] == "mock-gpt"


async def test_a_provider_key_refused_upstream_is_a_502_not_the_agents_401(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    client = openai.AsyncOpenAI(api_key=token, base_url=gateway.url + "/v1", max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "[status:401]"}])
    await client.close()
    assert caught.value.status_code == 502
    body: Any = caught.value.body
    assert body["type"] == "provider_error" and body["details"][0]["error"] == "provider_auth_failed"
    assert caught.value.response.headers["x-rungate-step-id"].startswith("stp_")


async def test_a_disabled_agent_cannot_log_steps_or_complete_runs(gateway: Gateway) -> None:
    token = await gateway.new_agent("to-disable")
    status, _, _ = await post(gateway, "/v1/chat/completions", {**CHAT, "rungate": {"run_id": "dis-1"}}, auth(token))
    assert status == 200
    _, agents = await gateway.admin("GET", "/api/agents")
    agent_id = next(a["id"] for a in agents["data"] if a["name"] == "to-disable")
    await gateway.admin("PATCH", f"/api/agents/{agent_id}", {"status": "disabled"})
    for path, body in (("/v1/runs/dis-1/steps", {"tool": "x", "cost_usd": "1"}), ("/v1/runs/dis-1/complete", {}),
                       ("/v1/chat/completions", CHAT)):
        status, answer, _ = await post(gateway, path, body, auth(token))
        assert status == 403 and answer["error"]["code"] == "agent_disabled", path


async def test_conflicts_tell_sdks_not_to_retry_and_bad_filters_are_400(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    await post(gateway, "/v1/chat/completions", {**CHAT, "rungate": {"run_id": "nr-1"}}, auth(token))
    await post(gateway, "/v1/runs/nr-1/complete", {}, auth(token))
    status, _, headers = await post(gateway, "/v1/chat/completions", {**CHAT, "rungate": {"run_id": "nr-1"}},
                                    auth(token))
    assert status == 409 and headers["x-should-retry"] == "false"
    status, _ = await gateway.admin("GET", "/api/runs?since=yesterday")
    assert status == 400
    status, body = await gateway.admin("GET", "/api/runs?since=2020-01-01T00:00:00Z&limit=5")
    assert status == 200 and body["data"]


async def test_cookies_an_upstream_sets_are_never_sent_upstream_again(aiohttp_server: Any, tmp_path: Path) -> None:
    # One upstream session serves every agent: a cookie the provider set for one agent's call (a load
    # balancer's, say) must not ride along on the next call, least of all another agent's.
    cookies_seen: list[str | None] = []

    async def chat(request: web.Request) -> web.Response:
        cookies_seen.append(request.headers.get("Cookie"))
        body = {"id": "c", "object": "chat.completion", "created": 1, "model": "mock-gpt",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
        response = web.json_response(body)
        response.set_cookie("lb_session", f"agent-call-{len(cookies_seen)}", path="/")
        return response

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", chat)
    # By name, not by address: a cookie jar keeps no cookies of a bare IP address.
    server, token = await _gateway_with(upstream, aiohttp_server, tmp_path, host="localhost")
    for _ in range(3):
        async with aiohttp.ClientSession() as http, http.post(
                str(server.make_url("/v1/chat/completions")), headers=auth(token), json=CHAT) as resp:
            assert resp.status == 200, await resp.text()
    assert cookies_seen == [None, None, None]
