"""Governance (SPEC §4): policy documents over the API, binding runs to versions, and the rules the
admission enforces — models, offered tools, runaway limits, run budgets by reservation, shadow mode."""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from rungate.prices import PriceTable, format_usd
from rungate.providers.metering import estimate_input_tokens
from tests.conftest import ADMIN_TOKEN, Gateway
from tests.openapi_check import validate_response

CHAT = "/v1/chat/completions"


def oa(gateway: Gateway, token: str, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=token, base_url=gateway.url + "/v1", max_retries=0,
                              default_headers=headers or None)


async def put_policy(gateway: Gateway, name: str, document: dict[str, Any], status: int = 201) -> dict[str, Any]:
    code, body = await gateway.admin("PUT", f"/api/policies/by-name/{name}", document)
    assert code == status, body
    validate_response("PUT", "/api/policies/by-name/{name}", code, body)
    policy: dict[str, Any] = body["data"]
    return policy


async def agent_with_policy(gateway: Gateway, name: str, policy: str | None) -> str:
    code, body = await gateway.admin("POST", "/api/agents", {"name": name, "policy": policy})
    assert code == 201, body
    validate_response("POST", "/api/agents", 201, body)
    token: str = body["data"]["token"]
    return token


async def post(gateway: Gateway, token: str, body: dict[str, Any], **headers: str) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as http, http.post(
            gateway.url + CHAT, data=orjson.dumps(body),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json", **headers}) as resp:
        raw = await resp.read()
        return resp.status, resp.headers, orjson.loads(raw) if raw[:1] == b"{" else raw


def chat(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "mock-gpt", "messages": [{"role": "user", "content": text}], **extra}


# --- the documents ---------------------------------------------------------------------------------


async def test_policies_are_versioned_documents_and_bad_ones_change_nothing(gateway: Gateway) -> None:
    # given a policy created over the API
    first = await put_policy(gateway, "prod", {"budget": {"hard_limit_usd": 5}, "models": {"allowed": ["mock-*"]}})
    assert first["version"] == 1 and first["budget"]["hard_limit_usd"] == "5" and first["name"] == "prod"
    # when the same document is applied again, nothing changes; a changed one is version 2
    same = await put_policy(gateway, "prod", {"budget": {"hard_limit_usd": "5.00"}, "models": {"allowed": ["mock-*"]}},
                            status=200)
    assert same["version"] == 1
    second = await put_policy(gateway, "prod", {"budget": {"hard_limit_usd": "7.5"}}, status=200)
    assert second["version"] == 2 and second["id"] == first["id"] and "models" not in second
    # and an invalid document is refused with every problem, and nothing changes
    code, body = await gateway.admin("PUT", "/api/policies/by-name/prod", {
        "budget": {"hard_limit_usd": "lots", "on_exceed": "pray"}, "modles": {}, "runaway": {"max_steps": 0}})
    assert code == 400 and body["error"]["code"] == "invalid_policy"
    problems = {(p["path"], p["reason"]) for p in body["error"]["problems"]}
    assert {p for p, _ in problems} == {"budget.hard_limit_usd", "budget.on_exceed", "modles", "runaway.max_steps"}
    assert ("modles", "unknown key") in problems
    code, body = await gateway.admin("GET", f"/api/policies/{first['id']}")
    assert code == 200 and body["data"]["version"] == 2
    validate_response("GET", "/api/policies/{policy_id}", 200, body)
    # every version stays readable
    code, body = await gateway.admin("GET", f"/api/policies/{first['id']}/versions")
    assert code == 200 and [v["version"] for v in body["data"]] == [1, 2]
    validate_response("GET", "/api/policies/{policy_id}/versions", 200, body)
    code, body = await gateway.admin("GET", f"/api/policies/{first['id']}/versions/1")
    assert code == 200 and body["data"]["budget"]["hard_limit_usd"] == "5"
    validate_response("GET", "/api/policies/{policy_id}/versions/{version}", 200, body)
    # POST refuses a taken name; the list shows live policies; a policy in use cannot be deleted
    code, body = await gateway.admin("POST", "/api/policies", {"name": "prod"})
    assert code == 409 and body["error"]["code"] == "name_taken"
    await agent_with_policy(gateway, "user-of-prod", "prod")
    code, body = await gateway.admin("DELETE", f"/api/policies/{first['id']}")
    assert code == 409 and body["error"]["code"] == "policy_in_use"
    code, body = await gateway.admin("POST", "/api/policies", {"name": "spare", "mode": "shadow"})
    assert code == 201
    validate_response("POST", "/api/policies", 201, body)
    code, listed = await gateway.admin("GET", "/api/policies")
    assert [p["name"] for p in listed["data"]] == ["prod", "spare"]
    validate_response("GET", "/api/policies", 200, listed)
    code, _ = await gateway.admin("DELETE", f"/api/policies/{body['data']['id']}")
    assert code == 200
    code, listed = await gateway.admin("GET", "/api/policies")
    assert [p["name"] for p in listed["data"]] == ["prod"]


async def test_a_run_keeps_the_policy_version_it_started_with(gateway: Gateway) -> None:
    await put_policy(gateway, "steps", {"runaway": {"max_steps": 2}})
    token = await agent_with_policy(gateway, "bound", "steps")
    async with oa(gateway, token) as client:
        await _bound_run(gateway, client)


async def _bound_run(gateway: Gateway, client: openai.AsyncOpenAI) -> None:
    # given a run started under version 1 (two steps allowed)
    first = await client.chat.completions.with_raw_response.create(model="mock-gpt",
                                                                  messages=[{"role": "user", "content": "a"}])
    run_id = first.headers["x-rungate-run-id"]
    # when the policy changes to allow more steps
    await put_policy(gateway, "steps", {"runaway": {"max_steps": 10}}, status=200)
    # then the running run still stops after two steps, under version 1
    await client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "b"}])
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "c"}])
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "runaway_prevention"
    assert error["context"]["rule"] == "runaway.max_steps" and error["context"]["policy_version"] == 1
    assert error["run_id"] == run_id and error["details"] == error["context"]
    # and a new run binds to version 2
    fresh = await client.chat.completions.with_raw_response.create(
        model="mock-gpt", messages=[{"role": "user", "content": "d"}], extra_headers={"x-rungate-new-run": "true"})
    code, run = await gateway.admin("GET", f"/api/runs/{fresh.headers['x-rungate-run-id']}")
    assert run["data"]["policy"]["version"] == 2 and run["data"]["policy"]["name"] == "steps"
    code, old = await gateway.admin("GET", f"/api/runs/{run_id}")
    assert old["data"]["policy"]["version"] == 1


async def test_a_pinned_policy_binds_a_new_run_and_is_reported_when_ignored(gateway: Gateway) -> None:
    await put_policy(gateway, "strict", {"models": {"allowed": ["gpt-4o-mini"]}})
    await put_policy(gateway, "strict", {"models": {"allowed": ["mock-*"]}}, status=200)
    token = await agent_with_policy(gateway, "pinner", None)
    # pinned to version 1: mock-gpt is not allowed there
    status, _, body = await post(gateway, token, chat(), **{"x-rungate-policy": "strict@1",
                                                           "x-rungate-run-id": "pinned-1"})
    assert status == 403 and body["error"]["code"] == "model_not_allowed"
    assert body["error"]["context"]["allowed"] == ["gpt-4o-mini"]
    # pinned to the current version (by name), in the body's `rungate` key
    status, headers, _ = await post(gateway, token, {**chat(), "rungate": {"run_id": "pinned-2", "policy": "strict"}})
    assert status == 200
    code, run = await gateway.admin("GET", "/api/runs/pinned-2")
    assert run["data"]["policy"]["version"] == 2
    # a later pin on the same run is ignored, and said so
    status, headers, _ = await post(gateway, token, chat(), **{"x-rungate-policy": "strict@1",
                                                              "x-rungate-run-id": "pinned-2"})
    assert status == 200 and "x-rungate-policy ignored" in headers["x-rungate-warning"]
    # an unknown or malformed pin is a 400
    status, _, body = await post(gateway, token, chat(), **{"x-rungate-policy": "nope", "x-rungate-run-id": "p3"})
    assert status == 400 and body["error"]["code"] == "unknown_policy"
    status, _, body = await post(gateway, token, chat(), **{"x-rungate-policy": "bad name!"})
    assert status == 400 and body["error"]["code"] == "invalid_policy_name"


# --- the rules -------------------------------------------------------------------------------------


async def test_models_are_refused_in_each_sdks_own_way_and_the_refusal_is_recorded(gateway: Gateway) -> None:
    await put_policy(gateway, "models", {"models": {"allowed": ["openai/mock-*", "mock-claude"],
                                                    "blocked": ["mock-gpt-blocked*"]}})
    token = await agent_with_policy(gateway, "picky", "models")
    async with oa(gateway, token) as client:
        assert await client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    body = refused.value.body
    assert isinstance(body, dict) and body["type"] == "governance_block" and body["code"] == "model_not_allowed"
    assert body["context"]["requested"] == "gpt-4o" and body["context"]["rule"] == "models.allowed"
    assert body["context"]["policy_name"] == "models"
    async with anthropic.AsyncAnthropic(api_key=token, base_url=gateway.url, max_retries=0) as ant:
        with pytest.raises(anthropic.PermissionDeniedError) as blocked:
            await ant.messages.create(model="claude-haiku-4-5", max_tokens=10,
                                      messages=[{"role": "user", "content": "x"}])
    assert isinstance(blocked.value.body, dict) and blocked.value.body["error"]["code"] == "model_not_allowed"
    # the refusals are events naming the rule and the policy version
    code, agents = await gateway.admin("GET", "/api/agents")
    agent_id = next(a["id"] for a in agents["data"] if a["name"] == "picky")
    # (on the run's stream, so its audit trail and `rungate replay` show them)
    _, runs = await gateway.admin("GET", f"/api/runs?agent_id={agent_id}")
    trail = await _run_events(gateway, runs["data"][0]["id"])
    events = [e for e in trail if e["type"] == "CallRefused"]
    assert [(e["data"]["code"], e["data"]["rule"], e["data"]["policy"]["version"]) for e in events] == [
        ("model_not_allowed", "models.allowed", 1), ("model_not_allowed", "models.allowed", 1)]
    # and each attempt outside the list is a policy drift
    drifts = [e["data"] for e in trail if e["type"] == "PolicyDrifted"]
    assert [(d["model"], d["enforced"]) for d in drifts] == [("gpt-4o", True), ("claude-haiku-4-5", True)]


async def _agent_events(gateway: Gateway, agent_id: str) -> list[dict[str, Any]]:
    from rungate.proxy.keys import STORE

    store = gateway.app[STORE]
    return [r._asdict() for r in await store.read_stream(f"agent-{agent_id}")]


async def _agent_decisions(gateway: Gateway, agent_id: str) -> list[dict[str, Any]]:
    """The agent's own stream and each of its runs' (those through the audit API), in log order: a refusal
    inside a run is on the run's stream, one with no run of the agent's on the agent's."""
    events = await _agent_events(gateway, agent_id)
    _, runs = await gateway.admin("GET", f"/api/runs?agent_id={agent_id}")
    for run in runs["data"]:
        events += await _run_events(gateway, run["id"])
    return sorted(events, key=lambda e: e["position"])


async def test_blocked_tools_are_refused_under_any_spelling(gateway: Gateway) -> None:
    await put_policy(gateway, "no-shell", {"tools": {"blocked": ["shell_exec", "delete_*"]}})
    token = await agent_with_policy(gateway, "tooler", "no-shell")
    fine = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    status, _, _ = await post(gateway, token, chat(tools=[fine]))
    assert status == 200
    for spelling in ("Shell-Exec", " shell.exec", "mcp__box__shell_exec", "DELETE_FILES", "mcp_box_shell_exec",
                     "srv__shell_exec", "mcp.box.shell_exec", "a/b/shell_exec", "\uff53\uff48\uff45\uff4c\uff4c_exec",
                     "shell\u200bexec", "mcp__fs__delete_file"):
        tool = {"type": "function", "function": {"name": spelling, "parameters": {"type": "object"}}}
        status, _, body = await post(gateway, token, chat(tools=[fine, tool]))
        assert status == 403 and body["error"]["code"] == "tool_blocked", spelling
        assert body["error"]["context"]["tool"] == spelling
    async with anthropic.AsyncAnthropic(api_key=token, base_url=gateway.url, max_retries=0) as ant:
        with pytest.raises(anthropic.PermissionDeniedError):
            await ant.messages.create(model="mock-claude", max_tokens=10, messages=[{"role": "user", "content": "x"}],
                                      tools=[{"name": "shell_exec", "input_schema": {"type": "object"}}])


async def test_repeating_the_same_request_is_runaway(gateway: Gateway) -> None:
    await put_policy(gateway, "repeats", {"runaway": {"max_repeats": 2}})
    token = await agent_with_policy(gateway, "looper", "repeats")
    for _ in range(2):
        status, _, _ = await post(gateway, token, chat("same"), **{"x-rungate-run-id": "loop"})
        assert status == 200
    status, _, body = await post(gateway, token, chat("same"), **{"x-rungate-run-id": "loop"})
    assert status == 403 and body["error"]["code"] == "runaway_prevention"
    assert body["error"]["context"]["rule"] == "runaway.max_repeats"
    status, _, _ = await post(gateway, token, chat("different"), **{"x-rungate-run-id": "loop"})
    assert status == 200


async def test_shadow_mode_records_and_warns_but_lets_the_call_through(gateway: Gateway) -> None:
    await put_policy(gateway, "watch", {"mode": "shadow", "models": {"allowed": ["gpt-4o-mini"]},
                                        "runaway": {"max_steps": 1}})
    token = await agent_with_policy(gateway, "watched", "watch")
    for _ in range(2):
        status, headers, _ = await post(gateway, token, chat(), **{"x-rungate-run-id": "shadowed"})
        assert status == 200 and "shadow: model_not_allowed" in headers["x-rungate-warning"]
    assert "runaway_prevention" in headers["x-rungate-warning"]
    code, steps = await gateway.admin("GET", "/api/runs/shadowed/steps")
    assert len(steps["data"]) == 2
    code, run = await gateway.admin("GET", "/api/runs/shadowed")
    drifts = [e["data"] for e in await _run_events(gateway, "shadowed") if e["type"] == "PolicyDrifted"]
    assert [d["enforced"] for d in drifts] == [False, False]
    started = [e for e in await _run_events(gateway, "shadowed") if e["type"] == "StepStarted"]
    assert {w["code"] for w in started[1]["data"]["warnings"]} == {"model_not_allowed", "runaway_prevention"}


async def test_shadow_mode_records_a_tool_the_answer_calls_and_warns_of_it(gateway: Gateway) -> None:
    # A shadow tools.blocked once let a model's call of the tool through with no warning and no record.
    await put_policy(gateway, "watch-tools", {"tools": {"blocked": ["shell_exec"], "mode": "shadow"}})
    token = await agent_with_policy(gateway, "tool-watched", "watch-tools")
    status, headers, answer = await post(gateway, token, chat('[tool:shell_exec {"cmd": "ls"}]'),
                                         **{"x-rungate-run-id": "shadow-tools"})
    assert status == 200 and answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "shell_exec"
    assert "shadow: tool_blocked (tools.blocked)" in headers["x-rungate-warning"]
    async with aiohttp.ClientSession() as http, http.post(
            gateway.url + "/v1/chat/completions", json={**chat('[tool:shell_exec {"cmd": "ls"}]'), "stream": True},
            headers={"Authorization": f"Bearer {token}", "x-rungate-run-id": "shadow-tools"}) as resp:
        raw = await resp.read()
    assert resp.status == 200 and b"shell_exec" in raw  # delivered: shadow mode refuses nothing
    # and a logged step of the tool: its ToolStepLogged records the verdict, as the header reports it
    async with aiohttp.ClientSession() as http, http.post(
            gateway.url + "/v1/runs/shadow-tools/steps", json={"tool": "shell_exec"},
            headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 201 and "shadow: tool_blocked" in resp.headers["x-rungate-warning"]
    trail = await _run_events(gateway, "shadow-tools")
    completed = [e["data"] for e in trail if e["type"] in ("StepCompleted", "ToolStepLogged")]
    assert [[(w["rule"], w["mode"]) for w in c["warnings"]] for c in completed] == [
        [("tools.blocked", "shadow")], [("tools.blocked", "shadow")], [("tools.blocked", "shadow")]]


async def test_a_run_budget_refuses_the_call_that_would_not_fit_and_headers_are_exact(gateway: Gateway) -> None:
    prices = PriceTable.load()
    body = chat("budgeted call", max_tokens=50)
    worst = prices.max_cost_pico("mock-gpt", estimate_input_tokens(body), 50)
    assert worst is not None
    # given a budget of exactly two worst-case calls
    await put_policy(gateway, "two-calls", {"budget": {"hard_limit_usd": format_usd(2 * worst)}})
    token = await agent_with_policy(gateway, "thrifty", "two-calls")
    status, headers, first = await post(gateway, token, body, **{"x-rungate-run-id": "budget-run"})
    assert status == 200
    spent = Decimal(headers["x-rungate-cost-usd"])
    assert Decimal(headers["x-rungate-budget-remaining-usd"]) == Decimal(format_usd(2 * worst)) - spent
    # when calls go on (each spends less than it reserves), until one's worst case no longer fits
    for _ in range(60):
        status, headers, answer = await post(gateway, token, body, **{"x-rungate-run-id": "budget-run"})
        if status == 402:
            break
        assert status == 200
        remaining = Decimal(headers["x-rungate-budget-remaining-usd"])
        spent += Decimal(headers["x-rungate-cost-usd"])
        assert remaining == Decimal(format_usd(2 * worst)) - spent  # exact after settlement
    # then the refusal says why, in decimal strings
    assert status == 402
    error = answer["error"]
    assert error["code"] == "budget_exceeded" and error["context"]["rule"] == "stop_on_budget"
    assert error["context"]["limit_usd"] == format_usd(2 * worst) and error["context"]["step_that_tripped"]
    assert Decimal(error["context"]["cumulative_spend_usd"]) == spent
    assert spent + Decimal(error["context"]["requested_usd"]) > Decimal(format_usd(2 * worst))
    code, run = await gateway.admin("GET", "/api/runs/budget-run")
    validate_response("GET", "/api/runs/{run_id}", 200, run)
    assert Decimal(run["data"]["spend_usd"]) == spent <= Decimal(format_usd(2 * worst))
    assert run["data"]["reserved_usd"] == "0" and run["data"]["budget_limit_usd"] == format_usd(2 * worst)
    assert Decimal(run["data"]["budget_remaining_usd"]) == Decimal(format_usd(2 * worst)) - spent


async def test_two_hundred_simultaneous_calls_fit_exactly_ten_worst_cases(gateway: Gateway) -> None:
    """Issue 3's proof: a run budget that fits exactly 10 worst-case calls admits exactly 10 of 200 at once;
    spend stays under the cap and nothing stays reserved, with streams cut at random among them (20 rounds)."""
    prices = PriceTable.load()
    # Every request has the same worst case (same-length text; `[cut:99]` outlasts the mock's stream), and an
    # answer that is not cut costs exactly that: the reply is longer than `max_tokens`, so it is cut to 40
    # tokens, and the mock counts input as Rungate estimates it. Cut streams settle for less, but only after
    # the mock's three-second pause, when all 200 have been decided (one second once proved too short in CI).
    words = " w" * 45
    body = chat(f"concurrent [sleep:3000] [cut:99]{words}", max_tokens=40)
    worst = prices.max_cost_pico("mock-gpt", estimate_input_tokens(body), 40)
    assert worst is not None
    await put_policy(gateway, "ten", {"budget": {"hard_limit_usd": format_usd(10 * worst)}})
    token = await agent_with_policy(gateway, "crowd", "ten")
    rng = random.Random(4)
    cap = Decimal(format_usd(10 * worst))

    async def one(run_id: str, http: aiohttp.ClientSession) -> int:
        streamed = rng.random() < 0.3
        request = chat(f"concurrent [sleep:3000] [cut:{rng.randint(10, 30) if rng.random() < 0.5 else 99}]{words}",
                       max_tokens=40, stream=streamed)
        assert estimate_input_tokens(request) == estimate_input_tokens(body)
        async with http.post(gateway.url + CHAT, data=orjson.dumps(request),
                             headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                                      "x-rungate-run-id": run_id}) as resp:
            await resp.read()
            return resp.status

    for round_ in range(20):
        run_id = f"crowd-{round_}"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            statuses = await asyncio.gather(*(one(run_id, http) for _ in range(200)))
        assert statuses.count(200) == 10 and statuses.count(402) == 190, (round_, sorted(set(statuses)))
        code, run = await gateway.admin("GET", f"/api/runs/{run_id}")
        assert Decimal(run["data"]["spend_usd"]) <= cap and run["data"]["reserved_usd"] == "0"
        assert run["data"]["step_count"] == 10


def test_the_documented_policy_schema_is_the_one_validation_uses() -> None:
    import json
    from pathlib import Path

    from rungate.enforce.policy import json_schema, openapi_components
    from rungate.openapi import load_spec

    schemas = load_spec()["components"]["schemas"]
    for name, schema in openapi_components().items():
        assert schemas[name] == schema, f"openapi/rungate.yaml: {name} drifted from rungate.enforce.policy"
    stored = json.loads((Path(__file__).parent.parent / "openapi" / "policy.schema.json").read_text())
    assert stored == json_schema(), "openapi/policy.schema.json drifted; regenerate it from json_schema()"


# --- one engine for every route --------------------------------------------------------------------

ROUTES: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {
    "chat": ("/v1/chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}]}, {}),
    "responses": ("/v1/responses", {"model": "MODEL", "input": "hi"}, {}),
    "messages": ("/v1/messages", {"model": "MODEL", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]},
                 {"anthropic-version": "2023-06-01"}),
    "embeddings": ("/v1/embeddings", {"model": "MODEL", "input": "hi"}, {}),
    "steps": ("/v1/runs/RUN/steps", {"tool": "search", "status": "ok"}, {}),
}
MODELS = {"chat": "mock-gpt", "responses": "mock-gpt", "messages": "mock-claude", "embeddings": "mock-embed",
          "steps": ""}


async def _route_call(gateway: Gateway, token: str, route: str, run_id: str, model: str | None = None,
                      **extra: Any) -> tuple[int, Any]:
    path, body, headers = ROUTES[route]
    body = orjson.loads(orjson.dumps(body).replace(b"MODEL", (model or MODELS[route]).encode()))
    body.update(extra)
    async with aiohttp.ClientSession() as http, http.post(
            gateway.url + path.replace("RUN", run_id), json=body,
            headers={"Authorization": f"Bearer {token}", "x-rungate-run-id": run_id, **headers}) as resp:
        return resp.status, await resp.json()


def _code(body: Any) -> str:
    error = body["error"]
    return str(error["code"])


@pytest.mark.parametrize("route", sorted(ROUTES))
async def test_no_route_skips_a_check(gateway: Gateway, route: str) -> None:
    """Every proxied route and logged steps go through the same admission: each check refuses on each."""
    await put_policy(gateway, "engine", {"models": {"allowed": ["mock-*"]}, "tools": {"blocked": ["shell_exec"]},
                                         "runaway": {"max_steps": 1}})
    token = await agent_with_policy(gateway, f"engine-{route}", "engine")
    # models (not for logged steps, which name no model)
    if route != "steps":
        status, body = await _route_call(gateway, token, route, f"{route}-m", model="gpt-4o")
        assert (status, _code(body)) == (403, "model_not_allowed"), body
    # blocked tools: offered to the model, or logged as run
    if route in ("chat", "messages", "responses", "steps"):
        tool = {"chat": [{"type": "function", "function": {"name": "Shell-Exec"}}],
                "responses": [{"type": "function", "name": "shell_exec", "parameters": {}}],
                "messages": [{"name": "shell_exec", "input_schema": {"type": "object"}}]}.get(route)
        extra = {"tools": tool} if tool is not None else {"tool": "mcp__box__shell_exec"}
        status, body = await _route_call(gateway, token, route, f"{route}-t", **extra)
        assert (status, _code(body)) == (403, "tool_blocked"), body
    # runaway: one step allowed, the second refused
    status, body = await _route_call(gateway, token, route, f"{route}-r")
    assert status in (200, 201), body
    status, body = await _route_call(gateway, token, route, f"{route}-r")
    assert (status, _code(body)) == (403, "runaway_prevention"), body
    # the kill switch
    code, _ = await gateway.admin("POST", f"/api/runs/{route}-r/stop")
    assert code == 200
    status, body = await _route_call(gateway, token, route, f"{route}-r")
    assert (status, _code(body)) == (403, "run_force_stopped"), body


async def test_budget_alerts_fire_once_per_threshold_and_exceeded_once_per_run(gateway: Gateway) -> None:
    prices = PriceTable.load()
    body = chat("alerting", max_tokens=30)
    worst = prices.max_cost_pico("mock-gpt", estimate_input_tokens(body), 30)
    assert worst is not None
    await put_policy(gateway, "alerts", {"budget": {"hard_limit_usd": format_usd(3 * worst), "alerts": [0.5, 0.1]}})
    token = await agent_with_policy(gateway, "alerted", "alerts")

    async def until_refused() -> None:
        for _ in range(200):
            status, _, _ = await post(gateway, token, body, **{"x-rungate-run-id": "alert-run"})
            if status == 402:
                return
            assert status == 200
        raise AssertionError("never refused")

    await until_refused()
    # an operator tops the run up; it runs into its (higher) cap again
    code, _ = await gateway.admin("POST", "/api/runs/alert-run/resume", {"add_usd": format_usd(worst)})
    assert code == 200
    await until_refused()
    events = [e["type"] for e in await _run_events(gateway, "alert-run")]
    alerts = [e for e in await _run_events(gateway, "alert-run") if e["type"] == "BudgetAlerted"]
    assert [a["data"]["threshold"] for a in alerts] == [0.1, 0.5]
    assert events.count("BudgetExceeded") == 1 and events.count("RunResumed") == 1


async def _run_events(gateway: Gateway, run_id: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(
            gateway.url + f"/api/runs/{run_id}/events", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        return [orjson.loads(line) for line in (await r.read()).splitlines() if line]


async def test_on_exceed_shrink_lowers_max_tokens_to_fit_while_a_useful_minimum_remains(gateway: Gateway) -> None:
    prices = PriceTable.load()
    body = chat("shrink me", max_tokens=1000)
    estimate = estimate_input_tokens(body)
    fits_200 = prices.max_cost_pico("mock-gpt", estimate, 200)
    assert fits_200 is not None
    # given a cap that fits the input and 200 output tokens, not 1000
    await put_policy(gateway, "shrinker", {"budget": {"hard_limit_usd": format_usd(fits_200), "on_exceed": "shrink"}})
    token = await agent_with_policy(gateway, "squeezed", "shrinker")
    status, headers, _ = await post(gateway, token, body, **{"x-rungate-run-id": "squeeze"})
    # then the call goes through with the output limit lowered to what fits, and says so
    assert status == 200 and "lowered to 200 tokens" in headers["x-rungate-warning"]
    assert gateway.upstream_requests[-1]["body"]["max_tokens"] == 200
    # and once less than a useful minimum fits, the call is refused as usual
    code, run = await gateway.admin("GET", "/api/runs/squeeze")
    assert Decimal(run["data"]["spend_usd"]) <= Decimal(format_usd(fits_200))
    for _ in range(40):
        status, headers, answer = await post(gateway, token, body, **{"x-rungate-run-id": "squeeze"})
        if status == 402:
            break
        assert status == 200 and "lowered to" in headers["x-rungate-warning"]
    assert status == 402 and answer["error"]["code"] == "budget_exceeded"
    code, run = await gateway.admin("GET", "/api/runs/squeeze")
    assert Decimal(run["data"]["spend_usd"]) <= Decimal(format_usd(fits_200)) and run["data"]["reserved_usd"] == "0"


async def test_on_exceed_shrink_fits_a_call_to_the_agents_hourly_cap_too(gateway: Gateway) -> None:
    prices = PriceTable.load()
    body = chat("shrink me hourly", max_tokens=1000)
    fits_150 = prices.max_cost_pico("mock-gpt", estimate_input_tokens(body), 150)
    assert fits_150 is not None
    # given no run cap, and an hourly cap that fits the input and 150 output tokens: a fresh agent's first call
    # was refused 402 hourly_cost_exceeded, told to wait for spend that did not exist
    await put_policy(gateway, "hour-shrinker", {"budget": {"agent_hourly_usd": format_usd(fits_150),
                                                           "on_exceed": "shrink"}})
    token = await agent_with_policy(gateway, "hour-squeezed", "hour-shrinker")
    status, headers, _ = await post(gateway, token, body)
    assert status == 200 and "lowered to 150 tokens" in headers["x-rungate-warning"]
    assert gateway.upstream_requests[-1]["body"]["max_tokens"] == 150
    # without shrink, the refusal says the call alone is too large, not to wait
    await put_policy(gateway, "hour-refuser", {"budget": {"agent_hourly_usd": format_usd(fits_150)}})
    token = await agent_with_policy(gateway, "hour-refused", "hour-refuser")
    status, _, answer = await post(gateway, token, body)
    assert status == 402 and answer["error"]["code"] == "hourly_cost_exceeded"
    assert answer["error"]["context"]["next"].startswith("Lower max_tokens")


async def test_rate_limits_refuse_with_an_accurate_retry_after(gateway: Gateway) -> None:
    body = chat("rated", max_tokens=10)
    per_call = estimate_input_tokens(body) + 10
    await put_policy(gateway, "rated", {"rate_limits": {"run": {"requests_per_minute": 3},
                                                        "agent": {"tokens_per_minute": 5 * per_call}}})
    token = await agent_with_policy(gateway, "rated", "rated")
    for _ in range(3):
        status, _, _ = await post(gateway, token, body, **{"x-rungate-run-id": "rated-1"})
        assert status == 200
    # the run's fourth request within the minute
    status, headers, answer = await post(gateway, token, body, **{"x-rungate-run-id": "rated-1"})
    assert status == 429 and answer["error"]["code"] == "rate_limited"
    assert answer["error"]["context"]["rule"] == "rate_limits.run.requests_per_minute"
    retry = int(headers["Retry-After"])
    assert 55 <= retry <= 60 and answer["error"]["context"]["retry_after_s"] == retry
    # another run of the agent is not limited by that run's window, but by the agent's tokens
    for _ in range(2):
        status, _, _ = await post(gateway, token, body, **{"x-rungate-run-id": "rated-2"})
        assert status == 200
    status, headers, answer = await post(gateway, token, body, **{"x-rungate-run-id": "rated-2"})
    assert status == 429 and answer["error"]["context"]["rule"] == "rate_limits.agent.tokens_per_minute"
    assert 1 <= int(headers["Retry-After"]) <= 60
    # the openai SDK sees a RateLimitError (it would retry after Retry-After; here retries are off)
    async with oa(gateway, token) as client:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="mock-gpt", max_tokens=10,
                                                 messages=[{"role": "user", "content": "rated"}])
    # a call larger than a whole minute's tokens is told so, and not invited to retry (no window would hold it)
    status, headers, answer = await post(gateway, token, chat("rated", max_tokens=6 * per_call),
                                         **{"x-rungate-run-id": "rated-3"})
    assert status == 429 and "Retry-After" not in headers and headers["x-should-retry"] == "false"
    assert answer["error"]["context"]["retry_after_s"] is None
    assert answer["error"]["context"]["next"].startswith("Lower max_tokens")


# --- regressions from review -----------------------------------------------------------------------


async def test_hostile_values_are_refused_cleanly(gateway: Gateway) -> None:
    code, body = await gateway.admin("PUT", "/api/policies/by-name/huge", {"runaway": {"max_repeats": 2**64 - 1}})
    assert code == 400 and body["error"]["problems"][0]["path"] == "runaway.max_repeats"
    policy = await put_policy(gateway, "watch-tools", {"mode": "shadow", "tools": {"blocked": ["evil*"]}})
    token = await agent_with_policy(gateway, "hostile", "watch-tools")
    tool = {"type": "function", "function": {"name": "evil\r\nX-Injected 1", "parameters": {"type": "object"}}}
    status, headers, _ = await post(gateway, token, chat(tools=[tool]))
    assert status == 200 and "X-Injected" not in headers and "\n" not in headers["x-rungate-warning"]
    async with aiohttp.ClientSession() as http, http.post(
            gateway.url + "/v1/runs/hostile-run/steps", json={"tool": "evil\r\nX: 1"},
            headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 400
    code, _ = await gateway.admin("GET", f"/api/policies/{policy['id']}/versions/²")
    assert code == 404
    status, _, _ = await post(gateway, token, chat(), **{"x-rungate-run-id": "topped"})
    code, body = await gateway.admin("POST", "/api/runs/topped/resume", {"add_usd": "10000000"})
    assert code == 400 and body["error"]["code"] == "invalid_amount"


async def test_a_stopped_auto_run_does_not_block_auto_runs_after_a_newer_one(gateway: Gateway) -> None:
    token = await gateway.new_agent("auto-stopper")
    status, headers, _ = await post(gateway, token, chat())
    first = headers["x-rungate-run-id"]
    assert (await gateway.admin("POST", f"/api/runs/{first}/stop"))[0] == 200
    status, _, body = await post(gateway, token, chat())
    assert status == 403 and body["error"]["code"] == "run_force_stopped"
    status, headers, _ = await post(gateway, token, chat(), **{"x-rungate-new-run": "true"})
    assert status == 200
    second = headers["x-rungate-run-id"]
    async with aiohttp.ClientSession() as http, http.post(
            gateway.url + f"/v1/runs/{second}/complete", json={}, headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200
    status, headers, _ = await post(gateway, token, chat())
    assert status == 200 and headers["x-rungate-run-id"] not in (first, second)


async def test_a_pinned_version_belongs_to_the_live_policy_of_that_name(gateway: Gateway) -> None:
    old = await put_policy(gateway, "pinned", {"models": {"allowed": ["nothing-*"]}})
    await put_policy(gateway, "pinned", {"models": {"allowed": ["still-nothing-*"]}}, status=200)
    # the old policy is renamed away; a new policy takes the name
    code, _ = await gateway.admin("PUT", f"/api/policies/{old['id']}", {"name": "renamed"})
    assert code == 200
    await put_policy(gateway, "pinned", {"models": {"allowed": ["mock-*"]}})
    token = await agent_with_policy(gateway, "pin-user", None)
    status, _, _ = await post(gateway, token, chat(), **{"x-rungate-policy": "pinned@1", "x-rungate-run-id": "pv1"})
    assert status == 200  # the new `pinned`, version 1 — not the renamed policy's version 1
    status, _, body = await post(gateway, token, chat(), **{"x-rungate-policy": "pinned@2", "x-rungate-run-id": "pv2"})
    assert status == 400 and body["error"]["code"] == "unknown_policy"


async def test_drift_is_recorded_when_another_rule_refuses_and_snapshots_are_matched(gateway: Gateway) -> None:
    await put_policy(gateway, "mixed", {"models": {"blocked": ["mock-gpt"], "mode": "shadow"},
                                        "tools": {"blocked": ["shell_exec"]}})
    token = await agent_with_policy(gateway, "mixed-user", "mixed")
    tool = {"type": "function", "function": {"name": "shell_exec", "parameters": {"type": "object"}}}
    status, _, body = await post(gateway, token, {**chat(tools=[tool]), "model": "mock-gpt-2024-08-06"})
    assert status == 403 and body["error"]["code"] == "tool_blocked"
    code, agents = await gateway.admin("GET", "/api/agents")
    agent_id = next(a["id"] for a in agents["data"] if a["name"] == "mixed-user")
    drifts = [e["data"] for e in await _agent_decisions(gateway, agent_id) if e["type"] == "PolicyDrifted"]
    assert [(d["model"], d["enforced"]) for d in drifts] == [("mock-gpt-2024-08-06", False)]


async def test_several_choices_reserve_several_answers_and_a_cold_cache_still_counts_repeats(
        gateway: Gateway) -> None:
    prices = PriceTable.load()
    body = chat("choices", max_tokens=100)
    one = prices.max_cost_pico("mock-gpt", estimate_input_tokens(body), 100)
    assert one is not None
    await put_policy(gateway, "one-answer", {"budget": {"hard_limit_usd": format_usd(2 * one)},
                                             "runaway": {"max_repeats": 1}})
    token = await agent_with_policy(gateway, "chooser", "one-answer")
    status, _, answer = await post(gateway, token, {**body, "n": 8}, **{"x-rungate-run-id": "choices"})
    assert status == 402 and Decimal(answer["error"]["context"]["requested_usd"]) > 2 * Decimal(format_usd(one))
    status, _, _ = await post(gateway, token, body, **{"x-rungate-run-id": "choices"})
    assert status == 200
    from rungate.enforce import policy as policy_module

    policy_module._COMPILED.clear()  # as after a restart: the first use compiles within the admission
    status, _, answer = await post(gateway, token, body, **{"x-rungate-run-id": "choices"})
    assert status == 403 and answer["error"]["code"] == "runaway_prevention"


async def test_the_agents_hourly_cap_spans_its_runs(gateway: Gateway) -> None:
    prices = PriceTable.load()
    body = chat("hourly", max_tokens=30)
    worst = prices.max_cost_pico("mock-gpt", estimate_input_tokens(body), 30)
    assert worst is not None
    await put_policy(gateway, "hourly", {"budget": {"agent_hourly_usd": format_usd(3 * worst)}})
    token = await agent_with_policy(gateway, "hourly-agent", "hourly")
    statuses = []
    for i in range(40):  # a new run each call: the cap is the agent's, across its runs
        status, _, answer = await post(gateway, token, body, **{"x-rungate-run-id": f"hour-{i}"})
        statuses.append(status)
        if status == 402:
            break
    assert statuses[-1] == 402 and set(statuses[:-1]) == {200}
    error = answer["error"]
    assert error["code"] == "hourly_cost_exceeded" and error["context"]["rule"] == "budget.agent_hourly_usd"
    spent = Decimal(error["context"]["hourly_spend_usd"])
    assert spent <= Decimal(format_usd(3 * worst)) < spent + Decimal(error["context"]["requested_usd"])
    code, runs = await gateway.admin("GET", "/api/runs?limit=500")
    total = sum(Decimal(r["spend_usd"]) for r in runs["data"] if r["id"].startswith("hour-"))
    assert total == spent


async def test_an_unknown_policy_on_an_agent_update_changes_nothing(gateway: Gateway) -> None:
    code, created = await gateway.admin("POST", "/api/agents", {"name": "steady"})
    agent_id = created["data"]["id"]
    code, body = await gateway.admin("PATCH", f"/api/agents/{agent_id}", {"name": "renamed", "policy": "nope"})
    assert code == 404 and body["error"]["code"] == "unknown_policy"
    code, agent = await gateway.admin("GET", f"/api/agents/{agent_id}")
    assert agent["data"]["name"] == "steady" and agent["data"]["policy"] is None
    await put_policy(gateway, "real", {"mode": "shadow"})
    code, agent = await gateway.admin("PATCH", f"/api/agents/{agent_id}", {"policy": "real"})
    assert code == 200 and agent["data"]["policy"]["name"] == "real"
    validate_response("PATCH", "/api/agents/{agent_id}", 200, agent)


async def test_a_blocked_tool_in_the_models_answer_is_not_delivered(gateway: Gateway) -> None:
    await put_policy(gateway, "no-shell-answers", {"tools": {"blocked": ["shell_exec"]}})
    token = await agent_with_policy(gateway, "answered", "no-shell-answers")
    ask = "run it [tool:shell_exec {\"cmd\": \"rm -rf /\"}]"
    # non-stream, in each format
    for route, model in (("chat", "mock-gpt"), ("responses", "mock-gpt"), ("messages", "mock-claude")):
        path, body, headers = ROUTES[route]
        request = orjson.loads(orjson.dumps(body).replace(b"MODEL", model.encode()).replace(b'"hi"',
                                                                                              orjson.dumps(ask)))
        async with aiohttp.ClientSession() as http, http.post(
                gateway.url + path, json=request, headers={"Authorization": f"Bearer {token}", **headers,
                                                          "x-rungate-run-id": f"answer-{route}"}) as resp:
            raw = await resp.read()
            assert resp.status == 403, (route, raw)
            assert b"rm -rf" not in raw and orjson.loads(raw)["error"]["code"] == "tool_blocked"
        code, steps = await gateway.admin("GET", f"/api/runs/answer-{route}/steps")
        [step] = steps["data"]
        assert step["status"] == "blocked" and Decimal(step["cost_usd"]) > 0  # paid for, not delivered
    # streamed: the event naming the tool never reaches the agent; the stream ends with an error event
    for route, model in (("chat", "mock-gpt"), ("messages", "mock-claude"), ("responses", "mock-gpt")):
        path, body, headers = ROUTES[route]
        request = orjson.loads(orjson.dumps(body).replace(b"MODEL", model.encode()).replace(b'"hi"',
                                                                                              orjson.dumps(ask)))
        async with aiohttp.ClientSession() as http, http.post(
                gateway.url + path, json={**request, "stream": True},
                headers={"Authorization": f"Bearer {token}", **headers,
                         "x-rungate-run-id": f"answer-s-{route}"}) as resp:
            raw = await resp.read()
        # its error event carries the refusal's code (not a broken stream's), so an SDK can tell the two apart
        assert resp.status == 200 and b"shell_exec" not in raw and b'"code":"tool_blocked"' in raw, (route, raw[-300:])
        code, steps = await gateway.admin("GET", f"/api/runs/answer-s-{route}/steps")
        assert [s["status"] for s in steps["data"]] == ["blocked"]
    # an allowed tool still goes through
    status, _, answer = await post(gateway, token, chat("[tool:get_weather {}]"))
    assert status == 200 and answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


async def test_a_logged_tool_cost_can_raise_the_runs_alerts(gateway: Gateway) -> None:
    await put_policy(gateway, "tool-alerts", {"budget": {"hard_limit_usd": "1.00", "alerts": [0.5]}})
    token = await agent_with_policy(gateway, "tool-spender", "tool-alerts")
    status, _, _ = await post(gateway, token, chat(), **{"x-rungate-run-id": "tool-alert-run"})
    assert status == 200
    async with aiohttp.ClientSession() as http:
        for cost in ("0.30", "0.30", "0.50"):
            async with http.post(gateway.url + "/v1/runs/tool-alert-run/steps", headers={
                    "Authorization": f"Bearer {token}"}, json={"tool": "paid_api", "cost_usd": cost}) as resp:
                assert resp.status == 201
    events = await _run_events(gateway, "tool-alert-run")
    assert [e["data"]["threshold"] for e in events if e["type"] == "BudgetAlerted"] == [0.5]
    assert [e["type"] for e in events].count("BudgetExceeded") == 1


async def test_a_run_that_used_its_cap_is_blocked_listed_and_resumed_by_an_operator(gateway: Gateway) -> None:
    await put_policy(gateway, "blocking", {"budget": {"hard_limit_usd": "1.00", "alerts": []}})
    token = await agent_with_policy(gateway, "blocked-agent", "blocking")
    client = oa(gateway, token, **{"x-rungate-run-id": "blocked-run"})
    await client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "hi"}])
    # given a logged tool step whose own cost uses the rest of the run's 1 USD
    async with aiohttp.ClientSession() as http, http.post(
            gateway.url + "/v1/runs/blocked-run/steps", headers={"Authorization": f"Bearer {token}"},
            json={"tool": "paid_api", "cost_usd": "1.00"}) as resp:
        assert resp.status == 201
    # when the operator looks, and the agent calls again with the stock SDK
    code, run = await gateway.admin("GET", "/api/runs/blocked-run")
    code_list, listed = await gateway.admin("GET", "/api/runs?status=blocked")
    with pytest.raises(openai.APIStatusError) as refused:
        await client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "again"}])
    # and then resumes it with a top-up
    resume_code, resumed = await gateway.admin("POST", "/api/runs/blocked-run/resume", {"add_usd": "1.00"})
    again = await client.chat.completions.with_raw_response.create(
        model="mock-gpt", messages=[{"role": "user", "content": "after the top-up"}])

    # then the run showed as blocked (and was listed so), its call was refused with 402 budget_exceeded
    assert code == 200 and run["data"]["status"] == "blocked" and run["data"]["budget_remaining_usd"] == "0"
    assert code_list == 200 and [r["id"] for r in listed["data"]] == ["blocked-run"]
    assert refused.value.status_code == 402
    assert refused.value.body["code"] == "budget_exceeded"  # type: ignore[index]
    # and the resume made it active again with room for the next call
    assert resume_code == 200 and resumed["data"]["status"] == "active"
    assert again.http_response.status_code == 200
    events = [e["type"] for e in await _run_events(gateway, "blocked-run")]
    assert events.count("RunBlocked") == 1 and events.index("RunBlocked") < events.index("RunResumed")


async def _models(gateway: Gateway, token: str, **headers: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(
            gateway.url + "/v1/models", headers={"Authorization": f"Bearer {token}", **headers}) as resp:
        return resp.status, await resp.json()


async def test_the_model_list_is_what_the_agents_policy_allows(gateway: Gateway) -> None:
    await put_policy(gateway, "narrow", {"models": {"allowed": ["mock-*", "main"], "blocked": ["mock-embedding"]},
                                         "routes": {"main": [{"provider": "openai", "model": "mock-gpt"}]}})
    await put_policy(gateway, "watching", {"mode": "shadow", "models": {"allowed": ["nothing-at-all"]}})
    free = await agent_with_policy(gateway, "free", None)
    narrow = await agent_with_policy(gateway, "narrow-agent", "narrow")
    # an agent under no policy sees every model Rungate can price
    status, everything = await _models(gateway, free)
    assert status == 200
    every = {m["id"] for m in everything["data"]}
    assert {"mock-gpt", "mock-claude", "mock-embedding", "gpt-4o"} <= every
    validate_response("GET", "/v1/models", 200, everything)
    # an agent under a policy sees what its model lists allow, and the names its routes give
    status, listed = await _models(gateway, narrow)
    assert status == 200 and {m["id"] for m in listed["data"]} == {"mock-gpt", "mock-claude", "main"}
    status, anthropic = await _models(gateway, narrow, **{"anthropic-version": "2023-06-01"})
    assert status == 200 and [m["id"] for m in anthropic["data"]] == ["mock-claude", "main"]  # main: translated
    validate_response("GET", "/v1/models", 200, anthropic)
    # a listed model is admitted, one left out is refused
    code, _, _ = await post(gateway, narrow, chat())
    assert code == 200
    code, _, refused = await post(gateway, narrow, chat(model="gpt-4o"))
    assert code == 403 and refused["error"]["code"] == "model_not_allowed"
    # a pinned policy lists its own models; lists in shadow mode refuse none; an unknown pin is a 400
    status, pinned = await _models(gateway, free, **{"x-rungate-policy": "narrow@1"})
    assert status == 200 and {m["id"] for m in pinned["data"]} == {"mock-gpt", "mock-claude", "main"}
    status, shadow = await _models(gateway, free, **{"x-rungate-policy": "watching"})
    assert status == 200 and {m["id"] for m in shadow["data"]} == every
    status, unknown = await _models(gateway, free, **{"x-rungate-policy": "nope"})
    assert status == 400 and unknown["error"]["code"] == "unknown_policy"


async def test_a_disabled_agents_logged_step_is_refused_naming_its_policy_and_recorded(gateway: Gateway) -> None:
    # It was refused at authentication: run_id and the policy fields null, and nothing in the log.
    await put_policy(gateway, "for-disabled", {"tools": {"blocked": ["rm_rf"]}})
    token = await agent_with_policy(gateway, "soon-off", "for-disabled")
    status, _, _ = await post(gateway, token, chat(), **{"x-rungate-run-id": "off-run"})
    assert status == 200
    _, agents = await gateway.admin("GET", "/api/agents?status=active")
    agent_id = next(a["id"] for a in agents["data"] if a["name"] == "soon-off")
    await gateway.admin("PATCH", f"/api/agents/{agent_id}", {"status": "disabled"})
    async with aiohttp.ClientSession() as http, http.post(
            gateway.url + "/v1/runs/off-run/steps", json={"tool": "lookup"},
            headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 403
        error = (await resp.json())["error"]
    assert error["code"] == "agent_disabled" and error["run_id"] == "off-run"
    assert (error["context"]["policy_name"], error["context"]["policy_version"]) == ("for-disabled", 1)
    # and a model call of the disabled agent in its run: refused and recorded on the run's stream the same way
    status, _, answer = await post(gateway, token, chat(), **{"x-rungate-run-id": "off-run"})
    assert status == 403 and answer["error"]["run_id"] == "off-run"
    assert answer["error"]["context"]["policy_name"] == "for-disabled"
    # and so is its completion of the run; its model listing names the policy too (a read: not recorded)
    for method, path in (("POST", "/v1/runs/off-run/complete"), ("GET", "/v1/models")):
        async with aiohttp.ClientSession() as http, http.request(
                method, gateway.url + path, headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 403, path
            error = (await resp.json())["error"]
        assert error["code"] == "agent_disabled" and error["context"]["policy_name"] == "for-disabled", path
    refused = [e["data"] for e in await _run_events(gateway, "off-run") if e["type"] == "CallRefused"]
    assert [(r["code"], r["endpoint"]) for r in refused] == [
        ("agent_disabled", "steps"), ("agent_disabled", "chat"), ("agent_disabled", "complete")]
    _, run = await gateway.admin("GET", "/api/runs/off-run")
    assert run["data"]["status"] == "active"  # refused: the run was not completed
