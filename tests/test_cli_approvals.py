"""`rungate approvals list|show|approve|reject`, run as an operator would: separate processes on the database
file of a live gateway, deciding gates that real proxied calls opened (SPEC §5, §7)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import Gateway
from tests.openapi_check import validate_headers, validate_response, validate_schema
from tests.test_governance import agent_with_policy, put_policy

CHAT = "/v1/chat/completions"
REFUND_TOOL = {"type": "function", "function": {
    "name": "issue_refund", "description": "Refund an order",
    "parameters": {"type": "object", "properties": {"amount_usd": {"type": "number"}}}}}
REFUND_OVER_500 = {"approvals": [{"name": "refund-over-500", "tool": "issue_refund",
                                  "when": [{"path": "$.amount_usd", "op": "gt", "value": 500}]}]}
REFUND_900 = {"model": "mock-gpt", "tools": [REFUND_TOOL],
              "messages": [{"role": "user", "content": 'refund [tool:issue_refund {"amount_usd": 900}]'}]}


# --- helpers ---------------------------------------------------------------------------------------

def _run_cli(db: Path, args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rungate", "--database-url", f"sqlite:///{db}", *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "RUNGATE_LOG_LEVEL": "warning"})


async def rungate(gateway: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in its own process on the gateway's database; the gateway keeps serving meanwhile."""
    return await asyncio.to_thread(_run_cli, gateway.db_path, args)


def printed(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def gated_agent(gateway: Gateway) -> str:
    """An agent whose runs are bound to a policy that holds refunds over 500 USD for approval."""
    await put_policy(gateway, "refunds", REFUND_OVER_500)
    return await agent_with_policy(gateway, "refunds-agent", "refunds")


async def chat(gateway: Gateway, token: str, run_id: str) -> tuple[int, Any, Any]:
    """The refund request, sent (or retried: the same body, the same run) through the proxy."""
    async with aiohttp.ClientSession() as http, http.post(
            gateway.url + CHAT, data=orjson.dumps(REFUND_900),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                     "x-rungate-run-id": run_id}) as resp:
        return resp.status, resp.headers, await resp.json()


async def held_gate(gateway: Gateway, token: str, run_id: str) -> str:
    """Send the refund request in `run_id`; the answer is held (202) and its gate id returned."""
    status, headers, body = await chat(gateway, token, run_id)
    assert status == 202, body
    validate_response("POST", CHAT, 202, body)
    validate_headers("POST", CHAT, 202, headers)
    gate_id: str = body["context"]["gate_id"]
    return gate_id


def upstream_calls(gateway: Gateway) -> int:
    return sum(1 for r in gateway.upstream_requests if r["path"].endswith("/chat/completions"))


# --- tests -----------------------------------------------------------------------------------------

def test_approvals_help_lists_the_four_actions(tmp_path: Path) -> None:
    # When an operator asks the CLI what it can do with approvals
    result = _run_cli(tmp_path / "help.db", ("approvals", "--help"))
    # Then the four actions are listed
    assert result.returncode == 0, result.stderr
    assert "{list,show,approve,reject}" in result.stdout
    for action in ("list", "show", "approve", "reject"):
        assert action in result.stdout


async def test_list_and_show_print_a_pending_gate(gateway: Gateway) -> None:
    # Given an answer held behind a gate
    token = await gated_agent(gateway)
    gate_id = await held_gate(gateway, token, "cli-list")

    # When the operator lists pending and approved gates, and shows the pending one
    pending = printed(await rungate(gateway, "approvals", "list", "--status", "pending"))
    approved = printed(await rungate(gateway, "approvals", "list", "--status", "approved"))
    by_run = printed(await rungate(gateway, "approvals", "list", "--run-id", "cli-list"))
    shown = printed(await rungate(gateway, "approvals", "show", gate_id))
    bad_status = await rungate(gateway, "approvals", "list", "--status", "bogus")

    # Then the gate is listed as pending, with the proposed call, in the API's own shape
    assert [gate["id"] for gate in pending] == [gate_id]
    assert approved == []
    assert [gate["id"] for gate in by_run] == [gate_id]
    assert shown == pending[0]
    validate_schema("ApprovalRequest", shown)
    assert (shown["status"], shown["run_id"], shown["tool"], shown["rule"]) == (
        "pending", "cli-list", "issue_refund", "refund-over-500")
    assert shown["args"] == {"amount_usd": 900}
    assert shown["decided_by"] is None and shown["edited_args"] is None
    # and the API shows the same gate the same way
    code, api = await gateway.admin("GET", f"/api/approval-requests/{gate_id}")
    assert code == 200 and api["data"] == shown
    # and an unknown status is refused by the parser, naming the choices
    assert bad_status.returncode == 2 and "pending" in bad_status.stderr


async def test_approve_with_edited_args_releases_the_edited_answer(gateway: Gateway) -> None:
    # Given an answer held behind a gate
    token = await gated_agent(gateway)
    gate_id = await held_gate(gateway, token, "cli-approve")

    # When the operator approves it from the command line with edited arguments
    decided = printed(await rungate(gateway, "approvals", "approve", gate_id, "--args", '{"amount_usd": 100}',
                                    "--by", "alice", "--reason", "ok"))
    # and the agent retries the same request
    status, headers, answer = await chat(gateway, token, "cli-approve")

    # Then the gate is approved, by alice, with both versions of the arguments kept
    validate_schema("ApprovalRequest", decided)
    assert (decided["id"], decided["status"], decided["decided_by"], decided["reason"]) == (
        gate_id, "approved", "alice", "ok")
    assert decided["edited_args"] == {"amount_usd": 100} and decided["args"] == {"amount_usd": 900}
    assert decided["decided_at"] is not None
    # and the retry gets the held answer with the edited arguments, from the one upstream call
    assert status == 200, answer
    validate_response("POST", CHAT, 200, answer)
    assert headers["x-rungate-run-id"] == "cli-approve"
    call = answer["choices"][0]["message"]["tool_calls"][0]["function"]
    assert call["name"] == "issue_refund"
    assert json.loads(call["arguments"]) == {"amount_usd": 100}
    assert upstream_calls(gateway) == 1
    # and nothing is pending any more
    assert printed(await rungate(gateway, "approvals", "list", "--status", "pending")) == []


async def test_reject_refuses_every_retry_of_that_request_with_403(gateway: Gateway) -> None:
    # Given two held answers, in two runs
    token = await gated_agent(gateway)
    kept = await held_gate(gateway, token, "cli-kept")
    rejected = await held_gate(gateway, token, "cli-reject")

    # When the operator rejects the second one, and its agent retries
    decided = printed(await rungate(gateway, "approvals", "reject", rejected, "--by", "bob",
                                    "--reason", "refund too large"))
    retries = [await chat(gateway, token, "cli-reject") for _ in range(2)]

    # Then that gate is rejected, and every retry is refused with the reason and who decided
    validate_schema("ApprovalRequest", decided)
    assert (decided["status"], decided["decided_by"], decided["reason"]) == ("rejected", "bob", "refund too large")
    for status, _, refused in retries:
        assert status == 403, refused
        validate_response("POST", CHAT, 403, refused)
        validate_schema("GovernanceError", refused)
        assert refused["error"]["code"] == "approval_rejected"
        context = refused["error"]["context"]
        assert (context["reason"], context["decided_by"], context["expired"]) == ("refund too large", "bob", False)
        assert context["rule"] == "approvals.refund-over-500"
    assert upstream_calls(gateway) == 2  # one per held request; the retries went nowhere
    # and the other gate is untouched: still pending, its request still answered 202
    assert [g["id"] for g in printed(await rungate(gateway, "approvals", "list", "--status", "pending"))] == [kept]
    assert (await chat(gateway, token, "cli-kept"))[0] == 202


async def test_an_unknown_gate_fails_with_a_readable_message(gateway: Gateway) -> None:
    # When the operator names a gate that does not exist
    unknown = "gate_" + "0" * 26
    approve = await rungate(gateway, "approvals", "approve", unknown, "--by", "alice")
    reject = await rungate(gateway, "approvals", "reject", unknown)
    show = await rungate(gateway, "approvals", "show", unknown)

    # Then each fails with exit code 1 and one line naming the gate, not a traceback
    for result in (approve, reject, show):
        assert result.returncode == 1
        assert unknown in result.stderr and "not found" in result.stderr
        assert "Traceback" not in result.stderr
        assert result.stdout == ""


@pytest.mark.parametrize(("edited", "code", "message"), [
    ("not json", 2, "--args is not JSON"),
    ('{"amount_usd": ', 2, "--args is not JSON"),
    ("[100]", 2, "--args must be a JSON object"),
    ('"100"', 2, "--args must be a JSON object"),
    ("100", 2, "--args must be a JSON object"),
])
async def test_args_that_are_not_a_json_object_are_refused(gateway: Gateway, edited: str, code: int,
                                                           message: str) -> None:
    # Given an answer held behind a gate
    token = await gated_agent(gateway)
    gate_id = await held_gate(gateway, token, "cli-bad-args")

    # When the operator approves it with arguments that are not a JSON object
    result = await rungate(gateway, "approvals", "approve", gate_id, "--args", edited)

    # Then the CLI exits non-zero with a message saying what is wrong
    assert result.returncode == code, (result.stdout, result.stderr)
    assert message in result.stderr and "Traceback" not in result.stderr
    # and nothing was decided: the gate is still pending, the agent still gets 202
    shown = printed(await rungate(gateway, "approvals", "show", gate_id))
    assert (shown["status"], shown["decided_by"], shown["edited_args"]) == ("pending", None, None)
    assert (await chat(gateway, token, "cli-bad-args"))[0] == 202


async def test_deciding_a_gate_twice_fails_with_exit_1(gateway: Gateway) -> None:
    # Given a gate the operator approved
    token = await gated_agent(gateway)
    gate_id = await held_gate(gateway, token, "cli-twice")
    first = printed(await rungate(gateway, "approvals", "approve", gate_id, "--by", "alice"))

    # When it is decided again, either way
    again = await rungate(gateway, "approvals", "approve", gate_id, "--by", "carol")
    flipped = await rungate(gateway, "approvals", "reject", gate_id, "--by", "carol", "--reason", "changed my mind")

    # Then both fail with exit code 1, saying it is already decided
    for result in (again, flipped):
        assert result.returncode == 1, result.stdout
        assert "already approved" in result.stderr and "Traceback" not in result.stderr
    # and the first decision stands
    shown = printed(await rungate(gateway, "approvals", "show", gate_id))
    assert (first["status"], first["decided_by"]) == ("approved", "alice")
    assert (shown["status"], shown["decided_by"], shown["decided_at"]) == ("approved", "alice", first["decided_at"])
    status, _, answer = await chat(gateway, token, "cli-twice")
    assert status == 200 and json.loads(
        answer["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == {"amount_usd": 900}


async def test_a_decision_after_expiry_is_refused_and_the_expiry_recorded(gateway: Gateway) -> None:
    # Given a gate that expires after one second, and has expired
    await put_policy(gateway, "refunds-fast", {"approvals": [{**REFUND_OVER_500["approvals"][0], "expires_in": 1}]})
    token = await agent_with_policy(gateway, "refunds-fast-agent", "refunds-fast")
    gate_id = await held_gate(gateway, token, "cli-late")
    await asyncio.sleep(1.1)

    # When the operator approves it from the command line
    late = await rungate(gateway, "approvals", "approve", gate_id, "--by", "alice")

    # Then the approval is refused with exit code 1, and the gate shows as expired, undecided
    assert late.returncode == 1 and "expired" in late.stderr, (late.stdout, late.stderr)
    shown = printed(await rungate(gateway, "approvals", "show", gate_id))
    assert (shown["status"], shown["decided_by"]) == ("expired", None)
    assert printed(await rungate(gateway, "approvals", "list", "--status", "pending")) == []
    # and the agent's retry is refused as expired
    status, _, refused = await chat(gateway, token, "cli-late")
    assert status == 403 and refused["error"]["code"] == "approval_rejected"
    assert refused["error"]["context"]["expired"] is True
