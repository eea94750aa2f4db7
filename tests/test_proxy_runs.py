"""Run grouping (SPEC §3): explicit ids, the body's `rungate` key, auto-runs, new runs, closing, 409."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from tests.conftest import Gateway, GatewayFactory


async def chat(gateway: Gateway, token: str, *, headers: dict[str, str] | None = None,
               extra: dict[str, Any] | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    body = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}], **(extra or {})}
    async with aiohttp.ClientSession() as http, http.post(
            gateway.url + "/v1/chat/completions", data=orjson.dumps(body),
            headers={"authorization": f"Bearer {token}", "content-type": "application/json", **(headers or {})}) as r:
        return r.status, orjson.loads(await r.read()), dict(r.headers)


async def post(gateway: Gateway, token: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(
            gateway.url + path, json=body, headers={"authorization": f"Bearer {token}"}) as r:
        return r.status, orjson.loads(await r.read())


async def test_calls_without_an_id_share_one_auto_run(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    _, _, first = await chat(gateway, token)
    _, _, second = await chat(gateway, token)
    assert first["x-rungate-run-id"] == second["x-rungate-run-id"]
    assert first["x-rungate-run-id"].startswith("run_")
    status, body = await gateway.admin("GET", f"/api/runs/{first['x-rungate-run-id']}")
    assert status == 200 and body["data"]["auto"] is True and body["data"]["step_count"] == 2


async def test_new_run_header_starts_a_fresh_auto_run(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    _, _, first = await chat(gateway, token)
    _, _, second = await chat(gateway, token, headers={"X-Rungate-New-Run": "true"})
    assert first["x-rungate-run-id"] != second["x-rungate-run-id"]
    _, body = await gateway.admin("GET", f"/api/runs/{first['x-rungate-run-id']}")
    assert body["data"]["status"] == "completed" and body["data"]["ended_reason"] == "new_run"


async def test_auto_run_closes_after_the_idle_window(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(RUNGATE_IDLE_TIMEOUT_S="1")
    token = await gateway.new_agent()
    _, _, first = await chat(gateway, token)
    import asyncio

    await asyncio.sleep(1.2)
    _, _, second = await chat(gateway, token)
    assert first["x-rungate-run-id"] != second["x-rungate-run-id"]
    _, body = await gateway.admin("GET", f"/api/runs/{first['x-rungate-run-id']}")
    assert body["data"]["status"] == "completed" and body["data"]["ended_reason"] == "idle_timeout"


async def test_header_is_case_insensitive_and_body_key_works(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    _, _, by_header = await chat(gateway, token, headers={"X-RUNGATE-RUN-ID": "job-7"})
    _, _, by_body = await chat(gateway, token, extra={"rungate": {"run_id": "job-7"}})
    assert by_header["x-rungate-run-id"] == by_body["x-rungate-run-id"] == "job-7"
    assert "rungate" not in gateway.upstream_requests[-1]["body"]


async def test_complete_is_idempotent_and_a_closed_run_refuses_calls(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    await chat(gateway, token, headers={"x-rungate-run-id": "job-8"})
    status, first = await post(gateway, token, "/v1/runs/job-8/complete",
                               {"ended_reason": "done", "metadata": {"a": 1}})
    assert status == 200 and first["data"]["status"] == "completed" and first["data"]["metadata"] == {"a": 1}
    status, again = await post(gateway, token, "/v1/runs/job-8/complete", {"ended_reason": "other"})
    assert status == 200 and again["data"]["ended_reason"] == "done"
    forwarded_before = len(gateway.upstream_requests)
    status, body, _ = await chat(gateway, token, headers={"x-rungate-run-id": "job-8"})
    assert status == 409 and body["error"]["code"] == "run_closed"
    assert len(gateway.upstream_requests) == forwarded_before  # nothing went upstream


async def test_another_agents_run_is_not_reachable(gateway: Gateway) -> None:
    owner = await gateway.new_agent("owner")
    intruder = await gateway.new_agent("intruder")
    await chat(gateway, owner, headers={"x-rungate-run-id": "private-run"})
    status, body, _ = await chat(gateway, intruder, headers={"x-rungate-run-id": "private-run"})
    assert status == 409 and body["error"]["code"] == "run_unavailable"
    status, body = await post(gateway, intruder, "/v1/runs/private-run/complete", {})
    assert status == 404
    _, run = await gateway.admin("GET", "/api/runs/private-run")
    assert run["data"]["status"] == "active" and run["data"]["step_count"] == 1


async def test_tool_step_on_a_new_run_creates_it_and_bad_steps_are_refused(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    status, body = await post(gateway, token, "/v1/runs/tools-1/steps",
                              {"tool": "search", "args": {"q": "x"}, "cost_usd": "0.002", "tokens": {"input": 3}})
    assert status == 201 and body["data"]["kind"] == "tool" and body["data"]["cost_usd"] == "0.002"
    for bad in ({}, {"tool": ""}, {"tool": "x", "cost_usd": "NaN"}, {"tool": "x", "cost_usd": -1},
                {"tool": "x", "tokens": {"input": -2}}, {"tool": "x", "args": [1]}):
        status, body = await post(gateway, token, "/v1/runs/tools-1/steps", bad)
        assert status == 400, bad
    _, run = await gateway.admin("GET", "/api/runs/tools-1")
    assert run["data"]["step_count"] == 1 and run["data"]["spend_usd"] == "0.002"


async def test_invalid_run_ids_are_refused(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    status, body, _ = await chat(gateway, token, headers={"x-rungate-run-id": "bad id with spaces"})
    assert status == 400 and body["error"]["code"] == "invalid_run_id"
    status, body, _ = await chat(gateway, token, extra={"rungate": "not-an-object"})
    assert status == 400


async def test_run_list_filters_and_paginates(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    for name in ("p-1", "p-2", "p-3"):
        await chat(gateway, token, headers={"x-rungate-run-id": name})
    await post(gateway, token, "/v1/runs/p-2/complete", {})
    seen: list[str] = []
    cursor = ""
    while True:
        status, page = await gateway.admin("GET", f"/api/runs?limit=2{'&cursor=' + cursor if cursor else ''}")
        assert status == 200
        seen.extend(run["id"] for run in page["data"])
        if not page["next"]:
            break
        cursor = page["next"]
    assert sorted(seen) == ["p-1", "p-2", "p-3"] and len(seen) == 3
    _, completed = await gateway.admin("GET", "/api/runs?status=completed")
    assert [r["id"] for r in completed["data"]] == ["p-2"]
    status, _ = await gateway.admin("GET", "/api/runs?status=nonsense")
    assert status == 400


async def test_run_events_replay_exactly_as_stored(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    await chat(gateway, token, headers={"x-rungate-run-id": "replay-1"})
    await post(gateway, token, "/v1/runs/replay-1/complete", {"ended_reason": "done"})
    status, text = await gateway.admin("GET", "/api/runs/replay-1/events")
    assert status == 200
    lines = [orjson.loads(line) for line in text.splitlines()]
    assert [line["type"] for line in lines] == ["RunStarted", "StepStarted", "StepCompleted", "RunCompleted"]
    assert [line["version"] for line in lines] == [1, 2, 3, 4]
    assert all(line["stream"] == "run-replay-1" for line in lines)
    _, after = await gateway.admin("GET", f"/api/runs/replay-1/events?after={lines[1]['position']}")
    assert [orjson.loads(line)["type"] for line in after.splitlines()] == ["StepCompleted", "RunCompleted"]


async def test_a_tool_step_without_a_cost_is_flagged_unpriced(gateway: Gateway) -> None:
    token = await gateway.new_agent()
    status, body = await post(gateway, token, "/v1/runs/tools-2/steps", {"tool": "lookup"})
    assert status == 201 and body["data"]["cost_usd"] is None and body["data"]["unpriced"] is True
    _, run = await gateway.admin("GET", "/api/runs/tools-2")
    assert run["data"]["unpriced_steps"] == 1 and run["data"]["spend_usd"] == "0"


async def test_a_deleted_agent_is_refused_and_its_runs_remain(gateway: Gateway) -> None:
    token = await gateway.new_agent("short-lived")
    _, _, headers = await chat(gateway, token, headers={"x-rungate-run-id": "kept-run"})
    _, agents = await gateway.admin("GET", "/api/agents")
    [agent] = [a for a in agents["data"] if a["name"] == "short-lived"]
    status, _ = await gateway.admin("DELETE", f"/api/agents/{agent['id']}")
    assert status == 200
    status, body, _ = await chat(gateway, token)
    assert status == 401
    status, _ = await gateway.admin("DELETE", f"/api/agents/{agent['id']}")
    assert status == 404
    _, run = await gateway.admin("GET", "/api/runs/kept-run")
    assert run["data"]["agent_id"] == agent["id"] and run["data"]["step_count"] == 1
