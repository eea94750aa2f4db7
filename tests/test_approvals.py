"""Approval gates (SPEC §5), end to end: a model answer that calls a gated tool is held and answered 202;
retries of the same request get 202 while pending, the held answer once approved (from the single upstream
call that produced it, with edited arguments when the approver changed them), 403 once rejected or expired.
Driven by the real `openai` and `anthropic` SDKs and raw HTTP against Rungate in front of the mock."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from rungate import queries
from rungate.approvals import ExpireGate
from rungate.clock import now_iso
from rungate.proxy.keys import STORE
from tests.conftest import Gateway
from tests.openapi_check import validate_response
from tests.test_governance import agent_with_policy, put_policy

CHAT = "/v1/chat/completions"
REFUND_TOOL = {"type": "function", "function": {
    "name": "issue_refund", "description": "Refund an order",
    "parameters": {"type": "object", "properties": {"amount_usd": {"type": "number"}, "order": {"type": "string"}}}}}
ANTHROPIC_REFUND_TOOL = {"name": "issue_refund", "description": "Refund an order",
                         "input_schema": {"type": "object", "properties": {"amount_usd": {"type": "number"}}}}
GATED = {"approvals": [{"name": "refund-over-500", "tool": "issue_refund",
                        "when": [{"path": "$.amount_usd", "op": "gt", "value": 500}]}]}


def refund_chat(amount: float, **extra: Any) -> dict[str, Any]:
    return {"model": "mock-gpt", "tools": [REFUND_TOOL], **extra,
            "messages": [{"role": "user", "content": f'refund [tool:issue_refund {{"amount_usd": {amount},'
                                                         f' "order": "A-17"}}]'}]}


async def setup(gateway: Gateway, document: dict[str, Any] | None = None, name: str = "gated") -> str:
    await put_policy(gateway, name, {**GATED, **(document or {})})
    return await agent_with_policy(gateway, f"{name}-agent", name)


async def post(gateway: Gateway, token: str, body: dict[str, Any], path: str = CHAT,
               **headers: str) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as http, http.post(
            gateway.url + path, data=orjson.dumps(body),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json", **headers}) as resp:
        raw = await resp.read()
        parsed = orjson.loads(raw) if resp.content_type == "application/json" else raw
        return resp.status, resp.headers, parsed


def upstream_calls(gateway: Gateway) -> int:
    return sum(1 for r in gateway.upstream_requests if r["path"].endswith(("/chat/completions", "/messages",
                                                                            "/responses")))


async def decide(gateway: Gateway, gate_id: str, verb: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    status, answer = await gateway.admin("POST", f"/api/approval-requests/{gate_id}/{verb}", body or {})
    if status < 300:
        validate_response("POST", f"/api/approval-requests/{{gate_id}}/{verb}", status, answer)
    return status, answer


async def run_events(gateway: Gateway, run_id: str) -> list[dict[str, Any]]:
    status, text = await gateway.admin("GET", f"/api/runs/{run_id}/events")
    assert status == 200
    return [json.loads(line) for line in text.splitlines() if line]


async def test_gated_answer_is_held_then_released_once_approved(gateway: Gateway) -> None:
    token = await setup(gateway)
    body = refund_chat(1240)
    headers = {"x-rungate-run-id": "ticket-1"}

    status, resp_headers, held = await post(gateway, token, body, **headers)
    assert status == 202, held
    validate_response("POST", CHAT, 202, held)
    assert resp_headers["Retry-After"] == "5"
    assert held["status"] == "awaiting_approval" and held["run_id"] == "ticket-1"
    gate_id = held["context"]["gate_id"]
    assert held["approval_requests"] == [{"id": gate_id, "tool": "issue_refund", "rule": "refund-over-500",
                                          "expires_at": held["context"]["expires_at"]}]
    assert held["context"]["proposed_action"] == {"tool": "issue_refund",
                                                  "args": {"amount_usd": 1240, "order": "A-17"}}
    assert upstream_calls(gateway) == 1

    # Pending: the same request gets 202 again, nothing goes upstream, nothing is charged.
    run_before = (await gateway.admin("GET", "/api/runs/ticket-1"))[1]["data"]
    for _ in range(3):
        again = await post(gateway, token, body, **headers)
        assert again[0] == 202 and again[2]["context"]["gate_id"] == gate_id
    run_after = (await gateway.admin("GET", "/api/runs/ticket-1"))[1]["data"]
    assert run_after["spend_usd"] == run_before["spend_usd"] and run_after["step_count"] == run_before["step_count"]
    assert upstream_calls(gateway) == 1

    code, listing = await gateway.admin("GET", "/api/approval-requests?status=pending&run_id=ticket-1")
    assert code == 200 and [g["id"] for g in listing["data"]] == [gate_id]
    validate_response("GET", "/api/approval-requests", 200, listing)

    status, decided = await decide(gateway, gate_id, "approve", {"decided_by": "ops@example.com",
                                                                 "reason": "customer verified"})
    assert status == 200 and decided["data"]["status"] == "approved"
    assert decided["data"]["decided_by"] == "ops@example.com"

    client = openai.AsyncOpenAI(api_key=token, base_url=gateway.url + "/v1", max_retries=0,
                                default_headers=headers)
    answer = await client.chat.completions.create(**body)
    assert answer.choices[0].finish_reason == "tool_calls"
    call = answer.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "issue_refund"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"amount_usd": 1240, "order": "A-17"}  # type: ignore[union-attr]
    assert upstream_calls(gateway) == 1  # the held answer, never a second upstream call

    # Decided once: a second decision is refused, and the log tells who decided what.
    assert (await decide(gateway, gate_id, "reject", {"reason": "too late"}))[0] == 409
    types = [e["type"] for e in await run_events(gateway, "ticket-1")]
    assert types.count("AnswerHeld") == 1 and types.count("ApprovalRequested") == 1
    assert "ApprovalGranted" in types and types.count("HeldAnswerRetried") == 4


async def test_ten_concurrent_retries_after_approval_make_no_upstream_call(gateway: Gateway) -> None:
    token = await setup(gateway)
    body = refund_chat(900)
    status, held_headers, held = await post(gateway, token, body, **{"x-rungate-run-id": "ticket-2"})
    assert status == 202 and held_headers["x-rungate-cost-usd"] != "0"
    assert (await decide(gateway, held["context"]["gate_id"], "approve"))[0] == 200

    answers = await asyncio.gather(*(post(gateway, token, body, **{"x-rungate-run-id": "ticket-2"})
                                     for _ in range(10)))
    assert [a[0] for a in answers] == [200] * 10
    # each retry names the step that produced the answer, and adds no cost of its own
    assert {(a[1]["x-rungate-step-id"], a[1]["x-rungate-cost-usd"], a[1]["x-rungate-tokens-used"])
            for a in answers} == {(held_headers["x-rungate-step-id"], "0", "0")}
    assert len({orjson.dumps(a[2]) for a in answers}) == 1  # the same held answer, ten times
    assert upstream_calls(gateway) == 1


async def test_rejected_gate_refuses_every_retry_with_403(gateway: Gateway) -> None:
    token = await setup(gateway)
    body = refund_chat(5000)
    client = openai.AsyncOpenAI(api_key=token, base_url=gateway.url + "/v1", max_retries=0,
                                default_headers={"x-rungate-run-id": "ticket-3"})
    raw = await client.chat.completions.with_raw_response.create(**body)
    assert raw.status_code == 202  # stock SDKs take a 202 for success: the body says what happened
    gate_id = json.loads(raw.text)["context"]["gate_id"]
    assert (await decide(gateway, gate_id, "reject", {"reason": "amount too high"}))[0] == 200

    for _ in range(2):
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await client.chat.completions.create(**body)
        error = caught.value.body
        assert isinstance(error, dict) and error["code"] == "approval_rejected"
        assert error["context"]["reason"] == "amount too high"
        assert error["context"]["rule"] == "approvals.refund-over-500"
    assert upstream_calls(gateway) == 1


async def test_small_refund_is_not_gated(gateway: Gateway) -> None:
    token = await setup(gateway)
    status, _, answer = await post(gateway, token, refund_chat(100))
    assert status == 200
    assert answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "issue_refund"


async def test_edit_and_approve_releases_the_edited_arguments_streamed_in_anthropic_format(
        gateway: Gateway) -> None:
    token = await setup(gateway)
    body = {"model": "claude-haiku-4-5", "max_tokens": 200, "tools": [ANTHROPIC_REFUND_TOOL], "stream": True,
            "messages": [{"role": "user", "content": 'refund [tool:issue_refund {"amount_usd": 750}]'}]}
    # A stream offering a gated tool is held back whole: the 202 comes before any SSE byte.
    status, headers, held = await post(gateway, token, body, "/v1/messages", **{"x-rungate-run-id": "ticket-4"})
    assert status == 202 and headers["Content-Type"].startswith("application/json")
    validate_response("POST", "/v1/messages", 202, held)
    gate_id = held["context"]["gate_id"]
    status, decided = await decide(gateway, gate_id, "approve", {"edited_args": {"amount_usd": 500}})
    assert status == 200 and decided["data"]["edited_args"] == {"amount_usd": 500}
    assert decided["data"]["args"] == {"amount_usd": 750}  # the log keeps both versions

    client = anthropic.AsyncAnthropic(api_key=token, base_url=gateway.url, max_retries=0,
                                      default_headers={"x-rungate-run-id": "ticket-4"})
    async with client.messages.stream(model=body["model"], max_tokens=200, tools=[ANTHROPIC_REFUND_TOOL],
                                      messages=body["messages"]) as stream:
        final = await stream.get_final_message()
    tool_use = [block for block in final.content if block.type == "tool_use"]
    assert [(b.name, b.input) for b in tool_use] == [("issue_refund", {"amount_usd": 500})]
    assert upstream_calls(gateway) == 1


async def test_expired_gate_refuses_retries_and_late_decisions(gateway: Gateway) -> None:
    document = {"approvals": [{"name": "refund-over-500", "tool": "issue_refund", "expires_in": 1,
                               "when": [{"path": "$.amount_usd", "op": "gt", "value": 500}]}]}
    token = await setup(gateway, document)
    body = refund_chat(800)
    status, _, held = await post(gateway, token, body, **{"x-rungate-run-id": "ticket-5"})
    assert status == 202
    gate_id = held["context"]["gate_id"]
    await asyncio.sleep(1.1)

    status, _, refused = await post(gateway, token, body, **{"x-rungate-run-id": "ticket-5"})
    assert status == 403 and refused["error"]["code"] == "approval_rejected"
    validate_response("POST", CHAT, 403, refused)
    assert refused["error"]["context"]["expired"] is True
    code, shown = await gateway.admin("GET", f"/api/approval-requests/{gate_id}")
    assert code == 200 and shown["data"]["status"] == "expired"
    validate_response("GET", "/api/approval-requests/{gate_id}", 200, shown)

    code, late = await decide(gateway, gate_id, "approve")
    assert code == 409 and late["error"]["code"] == "approval_expired"
    types = [e["type"] for e in await run_events(gateway, "ticket-5")]
    assert "ApprovalExpired" in types  # the late decision recorded the expiry, and changed nothing else
    assert "ApprovalGranted" not in types


async def test_a_changed_body_is_a_new_request_not_a_retry(gateway: Gateway) -> None:
    token = await setup(gateway)
    run = {"x-rungate-run-id": "ticket-6"}
    first = await post(gateway, token, refund_chat(900), **run)
    assert (await decide(gateway, first[2]["context"]["gate_id"], "approve"))[0] == 200
    changed = await post(gateway, token, refund_chat(901), **run)
    assert changed[0] == 202 and changed[2]["context"]["gate_id"] != first[2]["context"]["gate_id"]
    assert upstream_calls(gateway) == 2


async def test_an_agent_token_cannot_decide_a_gate(gateway: Gateway) -> None:
    token = await setup(gateway)
    held = await post(gateway, token, refund_chat(900), **{"x-rungate-run-id": "ticket-7"})
    gate_id = held[2]["context"]["gate_id"]
    async with aiohttp.ClientSession() as http, http.post(
            f"{gateway.url}/api/approval-requests/{gate_id}/approve", json={},
            headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 403
    async with aiohttp.ClientSession() as http, http.post(
            f"{gateway.url}/api/approval-requests/{gate_id}/approve", json={},
            headers={"Authorization": "Bearer rg_adm_forged"}) as resp:
        assert resp.status == 401
    code, shown = await gateway.admin("GET", f"/api/approval-requests/{gate_id}")
    assert shown["data"]["status"] == "pending"
    refused = await gateway.app[STORE].fetch("SELECT data FROM events WHERE type = 'ApprovalDecisionRefused'")
    assert len(refused) == 1 and orjson.loads(refused[0]["data"])["gate_id"] == gate_id


async def test_pending_retries_are_not_rate_limited_or_counted(gateway: Gateway) -> None:
    token = await setup(gateway, {"rate_limits": {"run": {"requests_per_minute": 2}},
                                  "runaway": {"max_repeats": 1}})
    run = {"x-rungate-run-id": "ticket-8"}
    assert (await post(gateway, token, refund_chat(900), **run))[0] == 202
    for _ in range(5):
        assert (await post(gateway, token, refund_chat(900), **run))[0] == 202
    steps = await queries.run_steps(gateway.app[STORE], "ticket-8")
    assert len(steps) == 1 and steps[0]["status"] == "held"


async def test_logged_tool_steps_are_gated_the_same_way(gateway: Gateway) -> None:
    token = await setup(gateway)
    step = {"tool": "issue_refund", "args": {"amount_usd": 2000}, "cost_usd": "0.01"}
    path = "/v1/runs/ticket-9/steps"
    assert (await post(gateway, token, {"tool": "lookup", "args": {}}, path))[0] == 201  # the run starts
    status, headers, held = await post(gateway, token, step, path)
    assert status == 202 and held["context"]["proposed_action"]["tool"] == "issue_refund"
    validate_response("POST", "/v1/runs/{run_id}/steps", 202, held)
    assert (await post(gateway, token, step, path))[0] == 202
    # A logged step is the agent's own call: approved or rejected as it is, never edited behind its back.
    code, refused = await gateway.admin("POST", f"/api/approval-requests/{held['context']['gate_id']}/approve",
                                        {"edited_args": {"amount_usd": 1500}})
    assert code == 409 and refused["error"]["code"] == "edit_not_applicable"
    assert (await decide(gateway, held["context"]["gate_id"], "approve"))[0] == 200
    status, _, logged = await post(gateway, token, step, path)
    assert status == 201 and logged["data"]["tool"] == "issue_refund"
    again = await post(gateway, token, step, path)
    assert again[0] == 201 and again[2]["data"]["id"] == logged["data"]["id"]  # recorded once
    steps = await queries.run_steps(gateway.app[STORE], "ticket-9")
    assert [s["tool"] for s in steps] == ["lookup", "issue_refund"]
    recorded = await gateway.app[STORE].fetch("SELECT data FROM events WHERE type = 'ToolStepLogged'")
    assert orjson.loads(recorded[-1]["data"])["args"] == {"amount_usd": 2000}


# --- hold mode: for stock SDKs, which take any 2xx for success ------------------------------------------

async def pending_gate(gateway: Gateway, run_id: str) -> str:
    """The gate the waiting call opened, once it exists."""
    for _ in range(200):
        code, listing = await gateway.admin("GET", f"/api/approval-requests?status=pending&run_id={run_id}")
        if code == 200 and listing["data"]:
            gate_id: str = listing["data"][0]["id"]
            return gate_id
        await asyncio.sleep(0.05)
    raise AssertionError("no gate opened")


async def test_hold_mode_keeps_a_stock_openai_call_waiting_until_approved(gateway: Gateway) -> None:
    token = await setup(gateway)
    client = openai.AsyncOpenAI(api_key=token, base_url=gateway.url + "/v1", max_retries=0, timeout=30,
                                default_headers={"x-rungate-run-id": "hold-1", "x-rungate-approval-mode": "hold"})
    waiting = asyncio.create_task(client.chat.completions.create(**refund_chat(1500)))
    gate_id = await pending_gate(gateway, "hold-1")
    await asyncio.sleep(1.3)  # past a keep-alive: the SDK keeps reading
    assert not waiting.done()
    assert (await decide(gateway, gate_id, "approve", {"edited_args": {"amount_usd": 499}}))[0] == 200
    answer = await asyncio.wait_for(waiting, 10)
    call = answer.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert json.loads(call.function.arguments) == {"amount_usd": 499}  # type: ignore[union-attr]
    # Delivered once and recorded: the run is free to go idle, and the same request again is answered held.
    types = [e["type"] for e in await run_events(gateway, "hold-1")]
    assert types.count("HeldAnswerRetried") == 1
    again = await client.chat.completions.create(**refund_chat(1500))
    assert json.loads(again.choices[0].message.tool_calls[0].function.arguments) == {  # type: ignore[index,union-attr]
        "amount_usd": 499}
    assert upstream_calls(gateway) == 1


async def test_hold_mode_rejection_is_a_refusal_the_sdks_see(gateway: Gateway) -> None:
    token = await setup(gateway, {"approvals": [{**GATED["approvals"][0], "mode": "hold"}]})  # the rule's mode
    plain = openai.AsyncOpenAI(api_key=token, base_url=gateway.url + "/v1", max_retries=0, timeout=30,
                               default_headers={"x-rungate-run-id": "hold-2"})
    waiting = asyncio.create_task(plain.chat.completions.create(**refund_chat(1500)))
    assert (await decide(gateway, await pending_gate(gateway, "hold-2"), "reject", {"reason": "no"}))[0] == 200
    refused = await asyncio.wait_for(waiting, 10)
    assert refused.choices[0].finish_reason == "content_filter"
    assert "rejected" in (refused.choices[0].message.refusal or "")

    streaming = anthropic.AsyncAnthropic(api_key=token, base_url=gateway.url, max_retries=0, timeout=30,
                                         default_headers={"x-rungate-run-id": "hold-3"})

    async def stream_it() -> None:
        async with streaming.messages.stream(
                model="claude-haiku-4-5", max_tokens=100, tools=[ANTHROPIC_REFUND_TOOL],
                messages=[{"role": "user", "content": 'pay [tool:issue_refund {"amount_usd": 9000}]'}]) as stream:
            await stream.get_final_message()

    waiting_stream = asyncio.create_task(stream_it())
    assert (await decide(gateway, await pending_gate(gateway, "hold-3"), "reject", {"reason": "no"}))[0] == 200
    with pytest.raises(anthropic.APIStatusError) as caught:
        await asyncio.wait_for(waiting_stream, 10)
    assert "rejected" in str(caught.value)


async def test_hold_mode_wait_ends_at_the_gates_own_expiry_with_its_outcome(make_gateway: Any) -> None:
    gateway = await make_gateway(RUNGATE_MAX_HOLD_S="30")
    token = await setup(gateway, {"approvals": [{**GATED["approvals"][0], "on_expiry": "approve",
                                                 "expires_in": 1}]})
    client = openai.AsyncOpenAI(api_key=token, base_url=gateway.url + "/v1", max_retries=0, timeout=30,
                                default_headers={"x-rungate-run-id": "hold-4", "x-rungate-approval-mode": "hold"})
    answer = await asyncio.wait_for(client.chat.completions.create(**refund_chat(700)), 10)
    assert answer.choices[0].message.tool_calls[0].function.name == "issue_refund"  # type: ignore[index,union-attr]
    code, listing = await gateway.admin("GET", "/api/approval-requests?run_id=hold-4")
    assert [g["status"] for g in listing["data"]] == ["expired"]


async def test_the_longest_hold_ends_the_wait_not_the_gate(make_gateway: Any) -> None:
    # An agent's wait must not decide for the operator: the gate stays open past RUNGATE_MAX_HOLD_S.
    gateway = await make_gateway(RUNGATE_MAX_HOLD_S="0.5")
    token = await setup(gateway, {"approvals": [{**GATED["approvals"][0], "on_expiry": "approve"}]})
    client = openai.AsyncOpenAI(api_key=token, base_url=gateway.url + "/v1", max_retries=0, timeout=30,
                                default_headers={"x-rungate-run-id": "hold-6", "x-rungate-approval-mode": "hold"})
    answer = await asyncio.wait_for(client.chat.completions.create(**refund_chat(700)), 10)
    assert answer.choices[0].finish_reason == "content_filter"
    assert answer.model_extra is not None and answer.model_extra["rungate"]["code"] == "tool_approval_required"
    code, listing = await gateway.admin("GET", "/api/approval-requests?run_id=hold-6")
    assert [g["status"] for g in listing["data"]] == ["pending"]
    types = [e["type"] for e in await run_events(gateway, "hold-6")]
    assert "ApprovalExpired" not in types and "HeldAnswerRetried" not in types
    status, _, again = await post(gateway, token, refund_chat(700), **{"x-rungate-run-id": "hold-6"})
    assert status == 202 and again["context"]["gate_id"] == listing["data"][0]["id"]


async def test_a_bad_approval_mode_is_refused(gateway: Gateway) -> None:
    token = await setup(gateway)
    status, _, body = await post(gateway, token, refund_chat(700), **{"x-rungate-approval-mode": "later"})
    assert status == 400 and body["error"]["code"] == "invalid_approval_mode"
    assert upstream_calls(gateway) == 0


async def test_an_auto_run_waiting_for_approval_is_not_closed_as_idle(make_gateway: Any) -> None:
    gateway = await make_gateway(RUNGATE_IDLE_TIMEOUT_S="1")
    token = await setup(gateway)
    status, _, held = await post(gateway, token, refund_chat(900))  # no run id: the agent's auto-run
    assert status == 202
    run_id = held["run_id"]
    await asyncio.sleep(1.2)  # past the idle window
    store = gateway.app[STORE]
    assert run_id not in await queries.idle_auto_runs(store, now_iso(), 1)  # the sweeper leaves it open
    again = await post(gateway, token, refund_chat(900))
    assert again[0] == 202 and again[2]["run_id"] == run_id  # the same run, the same gate
    assert again[2]["context"]["gate_id"] == held["context"]["gate_id"]

    assert (await decide(gateway, held["context"]["gate_id"], "approve"))[0] == 200
    released = await post(gateway, token, refund_chat(900))  # the retry that follows the approval
    assert released[0] == 200 and released[1]["x-rungate-run-id"] == run_id
    await asyncio.sleep(1.2)  # delivered: now it may go idle (the sweeper runs every second here)
    closed = (await gateway.admin("GET", f"/api/runs/{run_id}"))[1]["data"]
    assert closed["status"] == "completed" or run_id in await queries.idle_auto_runs(store, now_iso(), 1)
    fresh = await post(gateway, token, {"model": "mock-gpt", "messages": [{"role": "user", "content": "next"}]})
    assert fresh[0] == 200 and fresh[1]["x-rungate-run-id"] != run_id


async def test_another_agent_cannot_retry_into_a_held_run(gateway: Gateway) -> None:
    token = await setup(gateway)
    other = await agent_with_policy(gateway, "other-agent", "gated")
    held = await post(gateway, token, refund_chat(900), **{"x-rungate-run-id": "ticket-10"})
    assert (await decide(gateway, held[2]["context"]["gate_id"], "approve"))[0] == 200
    status, _, refused = await post(gateway, other, refund_chat(900), **{"x-rungate-run-id": "ticket-10"})
    assert status == 409 and refused["error"]["code"] == "run_unavailable"
    refusals = await gateway.app[STORE].fetch("SELECT data FROM events WHERE type = 'CallRefused'")
    assert [orjson.loads(r["data"])["code"] for r in refusals] == ["run_unavailable"]
    assert upstream_calls(gateway) == 1


async def test_the_kill_switch_ends_a_call_waiting_in_hold_mode(gateway: Gateway) -> None:
    token = await setup(gateway)
    client = openai.AsyncOpenAI(api_key=token, base_url=gateway.url + "/v1", max_retries=0, timeout=30,
                                default_headers={"x-rungate-run-id": "hold-5", "x-rungate-approval-mode": "hold"})
    waiting = asyncio.create_task(client.chat.completions.create(**refund_chat(1500)))
    await pending_gate(gateway, "hold-5")
    code, _ = await gateway.admin("POST", "/api/runs/hold-5/stop", {"reason": "enough"})
    assert code == 200
    answer = await asyncio.wait_for(waiting, 10)
    assert answer.choices[0].finish_reason == "content_filter"
    assert answer.model_extra is not None and answer.model_extra["rungate"]["code"] == "run_force_stopped"


async def test_gates_and_holds_rebuild_identically_from_the_log(gateway: Gateway) -> None:
    token = await setup(gateway, {"approvals": [{**GATED["approvals"][0], "expires_in": 1},
                                                {"name": "any-wire", "tool": "wire_*"}]})
    store = gateway.app[STORE]
    approved = await post(gateway, token, refund_chat(900), **{"x-rungate-run-id": "rb-1"})
    await decide(gateway, approved[2]["context"]["gate_id"], "approve", {"edited_args": {"amount_usd": 1}})
    assert (await post(gateway, token, refund_chat(900), **{"x-rungate-run-id": "rb-1"}))[0] == 200
    rejected = await post(gateway, token, refund_chat(901), **{"x-rungate-run-id": "rb-2"})
    await decide(gateway, rejected[2]["context"]["gate_id"], "reject", {"reason": "no"})
    two = {"model": "mock-gpt", "tools": [REFUND_TOOL], "messages": [{"role": "user", "content":
           'both [tool:issue_refund {"amount_usd": 990}] [tool:wire_money {"to": "x"}]'}]}
    both = await post(gateway, token, two, **{"x-rungate-run-id": "rb-3"})
    assert both[0] == 202 and len(both[2]["approval_requests"]) == 2
    await post(gateway, token, {"tool": "wire_money", "args": {"to": "y"}}, "/v1/runs/rb-3/steps")
    await asyncio.sleep(1.1)
    for gate_id in await queries.expired_gates(store, now_iso()):
        await store.execute(ExpireGate(gate_id))

    async def rows() -> dict[str, list[tuple[Any, ...]]]:
        return {table: [tuple(r.values()) for r in await store.fetch(f"SELECT * FROM {table} ORDER BY id")]
                for table in ("gates", "holds", "runs", "steps")}

    before = await rows()
    assert {row[10] for row in before["gates"]} >= {"approved", "rejected", "expired", "pending"}
    await store.rebuild()
    assert await rows() == before


RESPONSES_REFUND_TOOL = {"type": "function", "name": "issue_refund", "parameters": {
    "type": "object", "properties": {"amount_usd": {"type": "number"}}}}


def _request(fmt: str, stream: bool) -> tuple[str, dict[str, Any]]:
    """The request an SDK sends for this format (`stream` only when true, as the SDKs do)."""
    text = 'refund [tool:issue_refund {"amount_usd": 650}]'
    flag = {"stream": True} if stream else {}
    if fmt == "chat":
        return CHAT, {"model": "mock-gpt", "tools": [REFUND_TOOL], **flag,
                      "messages": [{"role": "user", "content": text}]}
    if fmt == "responses":
        return "/v1/responses", {"model": "mock-gpt", "tools": [RESPONSES_REFUND_TOOL], **flag, "input": text}
    return "/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 100, "tools": [ANTHROPIC_REFUND_TOOL],
                            **flag, "messages": [{"role": "user", "content": text}]}


async def _released_args(gateway: Gateway, token: str, fmt: str, stream: bool, run_id: str) -> Any:
    """The refund call's arguments as the real SDK reads them from the released answer."""
    headers = {"x-rungate-run-id": run_id}
    _, body = _request(fmt, stream)
    body.pop("stream", None)
    if fmt == "messages":
        client = anthropic.AsyncAnthropic(api_key=token, base_url=gateway.url, max_retries=0, default_headers=headers)
        if stream:
            async with client.messages.stream(**body) as events:
                message = await events.get_final_message()
        else:
            message = await client.messages.create(**body)
        return next(b.input for b in message.content if b.type == "tool_use")
    oa = openai.AsyncOpenAI(api_key=token, base_url=gateway.url + "/v1", max_retries=0, default_headers=headers)
    if fmt == "responses":
        if stream:
            async with oa.responses.stream(**body) as events:
                response = await events.get_final_response()
        else:
            response = await oa.responses.create(**body)
        return json.loads(next(i.arguments for i in response.output if i.type == "function_call"))
    if stream:
        async with oa.chat.completions.stream(**body) as events:
            completion = await events.get_final_completion()
    else:
        completion = await oa.chat.completions.create(**body)
    return json.loads(completion.choices[0].message.tool_calls[0].function.arguments)  # type: ignore[index,union-attr]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fmt", ["chat", "responses", "messages"])
async def test_every_format_is_held_and_released_with_the_edited_arguments(gateway: Gateway, fmt: str,
                                                                           stream: bool) -> None:
    token = await setup(gateway)
    run_id = f"fmt-{fmt}-{int(stream)}"
    path, body = _request(fmt, stream)
    status, headers, held = await post(gateway, token, body, path, **{"x-rungate-run-id": run_id})
    assert status == 202, held  # before any SSE byte, for streams too
    assert headers["Content-Type"].startswith("application/json")
    assert held["context"]["proposed_action"] == {"tool": "issue_refund", "args": {"amount_usd": 650}}
    assert (await decide(gateway, held["context"]["gate_id"], "approve", {"edited_args": {"amount_usd": 65}}))[0] \
        == 200
    assert await _released_args(gateway, token, fmt, stream, run_id) == {"amount_usd": 65}
    assert upstream_calls(gateway) == 1


async def test_a_gated_call_the_request_did_not_offer_is_never_delivered(gateway: Gateway) -> None:
    token = await setup(gateway)
    unoffered = {"model": "mock-gpt", "messages": [{"role": "user", "content":
                 'go [tool:issue_refund {"amount_usd": 900}]'}]}  # no `tools`: the stream is not held back
    client = openai.AsyncOpenAI(api_key=token, base_url=gateway.url + "/v1", max_retries=0,
                                default_headers={"x-rungate-run-id": "unoffered"})
    stream = await client.chat.completions.create(**unoffered, stream=True)
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            assert not (chunk.choices and chunk.choices[0].delta.tool_calls), "a gated call went out"
    assert "needs approval" in str(caught.value)
    steps = await queries.run_steps(gateway.app[STORE], "unoffered")
    assert [s["status"] for s in steps] == ["blocked"]
    # Not streamed, the answer is held as usual.
    status, _, held = await post(gateway, token, unoffered, **{"x-rungate-run-id": "unoffered"})
    assert status == 202 and held["context"]["proposed_action"]["tool"] == "issue_refund"


async def test_a_held_back_stream_that_breaks_never_lets_its_gated_call_out(gateway: Gateway) -> None:
    token = await setup(gateway, {"tools": {"blocked": ["shell_exec"]}})
    cut = {"model": "mock-gpt", "tools": [REFUND_TOOL], "stream": True, "messages": [{"role": "user", "content":
           'go [tool:issue_refund {"amount_usd": 1240, "note": "a long note to spread the arguments"}] [cut:40]'}]}
    status, headers, body = await post(gateway, token, cut, **{"x-rungate-run-id": "leak-1"})
    assert status == 502 and headers["Content-Type"].startswith("application/json"), body
    assert b"issue_refund" not in orjson.dumps(body)
    mixed = {"model": "mock-gpt", "tools": [REFUND_TOOL, {"type": "function", "function": {"name": "shell_exec"}}],
             "stream": True, "messages": [{"role": "user", "content":
                                           'go [tool:issue_refund {"amount_usd": 1240}] [tool:shell_exec {}]'}]}
    status, _, body = await post(gateway, token, mixed, **{"x-rungate-run-id": "leak-2"})
    assert status == 403 and body["error"]["code"] == "tool_blocked"
    assert "1240" not in orjson.dumps(body).decode()
    steps = await queries.run_steps(gateway.app[STORE], "leak-1")
    assert [s["status"] for s in steps] == ["cut"]
    # the cut came after the whole call had streamed in: it was there to leak
    assert [(c["name"], json.loads(c["arguments"])["amount_usd"]) for c in orjson.loads(steps[0]["tool_calls"])] \
        == [("issue_refund", 1240)]


async def test_each_gate_expires_by_its_own_rule(gateway: Gateway) -> None:
    token = await setup(gateway, {"approvals": [
        {"name": "quick", "tool": "issue_refund", "expires_in": 1, "on_expiry": "approve"},
        {"name": "slow", "tool": "wire_money", "expires_in": 3600, "on_expiry": "approve"}]})
    two = {"model": "mock-gpt", "tools": [REFUND_TOOL], "messages": [{"role": "user", "content":
           'both [tool:issue_refund {"amount_usd": 1}] [tool:wire_money {"to": "x"}]'}]}
    held = await post(gateway, token, two, **{"x-rungate-run-id": "own-expiry"})
    assert held[0] == 202 and len(held[2]["approval_requests"]) == 2
    await asyncio.sleep(1.1)  # the quick gate expired (approve); the slow one is still someone's to decide
    again = await post(gateway, token, two, **{"x-rungate-run-id": "own-expiry"})
    assert again[0] == 202
    slow = next(r["id"] for r in held[2]["approval_requests"] if r["rule"] == "slow")
    assert (await decide(gateway, slow, "reject", {"reason": "no wire"}))[0] == 200
    refused = await post(gateway, token, two, **{"x-rungate-run-id": "own-expiry"})
    assert refused[0] == 403 and refused[2]["error"]["context"]["reason"] == "no wire"
    assert upstream_calls(gateway) == 1


async def test_the_same_body_on_another_endpoint_is_another_request(gateway: Gateway) -> None:
    token = await setup(gateway)
    body = {"model": "claude-haiku-4-5", "max_tokens": 100, "tools": [ANTHROPIC_REFUND_TOOL], "messages": [
        {"role": "user", "content": 'refund [tool:issue_refund {"amount_usd": 900}]'}]}
    held = await post(gateway, token, body, **{"x-rungate-run-id": "endpoints"})
    assert held[0] == 202
    assert (await decide(gateway, held[2]["context"]["gate_id"], "approve", {"edited_args": {"amount_usd": 9}}))[0] \
        == 200
    other = await post(gateway, token, body, "/v1/messages", **{"x-rungate-run-id": "endpoints"})
    assert other[0] == 202 and other[2]["context"]["gate_id"] != held[2]["context"]["gate_id"]
    assert upstream_calls(gateway) == 2


async def test_rejecting_one_call_rejects_the_answers_other_gates_each_with_its_event(gateway: Gateway) -> None:
    token = await setup(gateway, {"approvals": [GATED["approvals"][0], {"name": "any-wire", "tool": "wire_*"}]})
    two = {"model": "mock-gpt", "tools": [REFUND_TOOL], "messages": [{"role": "user", "content":
           'both [tool:issue_refund {"amount_usd": 990}] [tool:wire_money {"to": "x"}]'}]}
    held = await post(gateway, token, two, **{"x-rungate-run-id": "siblings"})
    refund, wire = (r["id"] for r in held[2]["approval_requests"])
    assert (await decide(gateway, wire, "reject", {"reason": "no wires", "decided_by": "bob"}))[0] == 200
    code, shown = await gateway.admin("GET", f"/api/approval-requests/{refund}")
    assert shown["data"]["status"] == "rejected" and shown["data"]["decided_by"] == "bob"
    assert wire in shown["data"]["reason"]
    assert (await decide(gateway, refund, "approve"))[0] == 409  # nothing left to decide
    rejected = [e["data"]["gate_id"] for e in await run_events(gateway, "siblings") if e["type"] == "ApprovalRejected"]
    assert sorted(rejected) == sorted([refund, wire])
