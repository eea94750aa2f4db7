"""The `rungate` SDK from PyPI (0.1.0) drives Rungate, in its own environment.

The SDK shares our import name, so it is installed with `pip install --target DIR` and run in a
subprocess with DIR first on PYTHONPATH (SPEC §9). Installing needs the package index; a failure to
install fails the test, it never skips.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import ADMIN_TOKEN, Gateway

SDK_VERSION = "0.1.0"


@pytest.fixture(scope="session")
def sdk_dir() -> Path:
    target = Path(tempfile.gettempdir()) / f"rungate-sdk-{SDK_VERSION}"
    if not (target / "rungate" / "_client.py").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--target", str(target), f"rungate=={SDK_VERSION}"], check=True, timeout=300)
    return target


async def run_sdk(sdk_dir: Path, script: str, **env: str) -> dict[str, Any]:
    """Run `script` with the PyPI SDK importable as `rungate`; it prints one JSON object."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", textwrap.dedent(script), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(sdk_dir), **env}, cwd=str(sdk_dir))
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()
    result: dict[str, Any] = orjson.loads(stdout.splitlines()[-1])
    return result


async def test_sdk_run_with_calls_stream_tool_step_and_completion(gateway: Gateway, sdk_dir: Path) -> None:
    token = await gateway.new_agent("sdk-agent")
    result = await run_sdk(sdk_dir, """
        import json, rungate
        assert rungate.__file__.startswith(__import__("os").getcwd()), rungate.__file__
        client = rungate.Rungate()
        with client.run(metadata={"ticket": "T-1"}) as run:
            reply = run.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "hi sdk"}])
            with run.chat.completions.stream(model="mock-gpt",
                                             messages=[{"role": "user", "content": "stream sdk"}]) as stream:
                text = "".join(stream.text_stream)
                final = stream.get_final_completion()
            meta = stream.rungate
            step = run.log_tool_call(name="lookup_order", cost_usd=0.25, latency_ms=12, request={"id": 4})
        print(json.dumps({
            "run_id": run.id, "content": reply.choices[0]["message"]["content"],
            "reply_meta": reply.rungate.model_dump(), "text": text, "stream_meta": meta.model_dump(),
            "final_id": final.id, "step": step, "total_cost": run.budget.total_cost,
        }))
    """, RUNGATE_API_KEY=token, RUNGATE_BASE_URL=gateway.url)

    run_id = result["run_id"]
    assert result["content"] == "Mock reply: hi sdk"
    assert result["reply_meta"]["run_id"] == run_id
    assert result["reply_meta"]["provider"] == "openai" and result["reply_meta"]["model"] == "mock-gpt"
    assert result["reply_meta"]["tokens_used"] > 0 and result["reply_meta"]["cost_usd"] > 0
    assert result["text"] == "Mock reply: stream sdk"
    assert result["stream_meta"]["run_id"] == run_id and result["stream_meta"]["cost_usd"] > 0
    assert result["stream_meta"]["tokens_used"] > 0
    assert result["step"]["tool"] == "lookup_order" and result["step"]["cost_usd"] == "0.25"

    status, body = await gateway.admin("GET", f"/api/runs/{run_id}")
    assert status == 200
    run = body["data"]
    assert run["status"] == "completed" and run["ended_reason"] == "agent_signaled"
    assert run["metadata"] == {"ticket": "T-1"}
    assert run["step_count"] == 3
    expected = (Decimal(str(result["reply_meta"]["cost_usd"])) + Decimal(str(result["stream_meta"]["cost_usd"]))
                + Decimal("0.25"))
    assert Decimal(run["spend_usd"]) == expected


async def test_sdk_sees_a_closed_run_as_an_error(gateway: Gateway, sdk_dir: Path) -> None:
    token = await gateway.new_agent("sdk-closed")
    result = await run_sdk(sdk_dir, """
        import json, rungate
        client = rungate.Rungate()
        run = client.run()
        run.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "one"}])
        run.complete(reason="done")
        try:
            client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "two"}],
                                           run_id=run.id)
            outcome = {"raised": None}
        except rungate.APIError as exc:
            outcome = {"raised": type(exc).__name__, "status": exc.status_code, "body": exc.body}
        print(json.dumps(outcome))
    """, RUNGATE_API_KEY=token, RUNGATE_BASE_URL=gateway.url)
    assert result["status"] == 409
    assert result["body"]["error"]["code"] == "run_closed"


async def test_sdk_raises_its_governance_exceptions_with_the_refusal_fields(gateway: Gateway, sdk_dir: Path) -> None:
    status, body = await gateway.admin("PUT", "/api/policies/by-name/sdk-tight", {
        "budget": {"hard_limit_usd": "0.000001"}, "models": {"allowed": ["mock-*"]}})
    assert status == 201, body
    status, body = await gateway.admin("POST", "/api/agents", {"name": "sdk-governed", "policy": "sdk-tight"})
    token = body["data"]["token"]
    result = await run_sdk(sdk_dir, """
        import json, rungate
        client = rungate.Rungate()
        out = {}
        for model, key in (("gpt-4o", "model"), ("mock-gpt", "budget")):
            try:
                client.chat.completions.create(model=model, max_tokens=1000,
                                               messages=[{"role": "user", "content": "x"}])
            except rungate.GovernanceError as exc:
                out[key] = {"class": type(exc).__name__, "code": exc.governance_code, "status": exc.status_code,
                            "run_id": exc.run_id, "details": exc.details}
        print(json.dumps(out))
    """, RUNGATE_API_KEY=token, RUNGATE_BASE_URL=gateway.url)
    model, budget = result["model"], result["budget"]
    assert model["class"] == "ModelNotAllowedError" and model["status"] == 403
    assert model["details"]["requested"] == "gpt-4o" and model["details"]["policy_name"] == "sdk-tight"
    assert budget["class"] == "BudgetExceededError" and budget["status"] == 402 and budget["run_id"]
    assert budget["details"]["limit_usd"] == "0.000001" and budget["details"]["rule"] == "stop_on_budget"


async def test_sdk_raises_approval_required_then_gets_the_answer_once_approved(gateway: Gateway,
                                                                              sdk_dir: Path) -> None:
    status, body = await gateway.admin("PUT", "/api/policies/by-name/sdk-gated", {"approvals": [
        {"name": "refund-over-500", "tool": "issue_refund",
         "when": [{"path": "$.amount_usd", "op": "gt", "value": 500}]}]})
    assert status == 201, body
    status, body = await gateway.admin("POST", "/api/agents", {"name": "sdk-gated", "policy": "sdk-gated"})
    token = body["data"]["token"]
    result = await run_sdk(sdk_dir, """
        import json, os, rungate
        client = rungate.Rungate()
        admin = rungate.Admin(token=os.environ["ADMIN"], base_url=os.environ["RUNGATE_BASE_URL"])
        ask = dict(model="mock-gpt", run_id="sdk-gate-1",
                   tools=[{"type": "function", "function": {"name": "issue_refund", "parameters": {"type": "object"}}}],
                   messages=[{"role": "user", "content": 'refund [tool:issue_refund {"amount_usd": 800}]'}])
        out = {}
        try:
            client.chat.completions.create(**ask)
        except rungate.ApprovalRequiredError as exc:
            out["required"] = {"status": exc.status_code, "run_id": exc.run_id, "requests": exc.approval_requests}
        try:
            client.chat.completions.create(**ask)
        except rungate.ApprovalRequiredError as exc:
            out["still"] = exc.approval_requests[0]["id"]
        out["approved"] = admin.approvals.approve(out["required"]["requests"][0]["id"])["data"]["status"]
        reply = client.chat.completions.create(**ask)
        out["tool"] = reply.choices[0]["message"]["tool_calls"][0]["function"]
        print(json.dumps(out))
    """, RUNGATE_API_KEY=token, RUNGATE_BASE_URL=gateway.url, ADMIN=ADMIN_TOKEN)
    required = result["required"]
    assert required["status"] == 202 and required["run_id"] == "sdk-gate-1"
    assert [r["tool"] for r in required["requests"]] == ["issue_refund"]
    assert result["still"] == required["requests"][0]["id"] and result["approved"] == "approved"
    assert result["tool"]["name"] == "issue_refund"
    assert json.loads(result["tool"]["arguments"]) == {"amount_usd": 800}
    assert sum(1 for r in gateway.upstream_requests if r["path"].endswith("/chat/completions")) == 1


async def test_sdk_admin_client_creates_lists_and_pages_as_it_asks(gateway: Gateway, sdk_dir: Path) -> None:
    # The SDK's Admin client names a policy by `policy_id` and pages with `offset` and `limit`: once ignored
    # (an agent created with no policy, every page the first, every step at once).
    status, body = await gateway.admin("PUT", "/api/policies/by-name/sdk-pol", {"models": {"blocked": ["gpt-4o"]}})
    assert status in (200, 201)
    policy_id = body["data"]["id"]
    result = await run_sdk(sdk_dir, f"""
        import json, rungate
        admin = rungate.Admin(token="{ADMIN_TOKEN}", base_url="{gateway.url}")
        made = admin.agents.create(name="sdk-admin-agent", policy_id="{policy_id}")["data"]
        token = made["token"]
        client = rungate.Rungate(api_key=token, base_url="{gateway.url}")
        for n in range(3):
            with client.run() as run:
                for i in range(n + 1):
                    run.chat.completions.create(model="mock-gpt", messages=[{{"role": "user", "content": f"c{{i}}"}}])
        admin.agents.patch(admin.agents.create(name="sdk-off", policy_id=None)["data"]["id"], status="disabled")
        runs = [admin.runs.list(agent_id=made["id"], limit=2, offset=o)["data"] for o in (0, 2)]
        last = runs[0][0]["id"]  # the newest run: three steps
        print(json.dumps({{
            "policy": made["policy"], "pages": [[r["id"] for r in page] for page in runs],
            "disabled": [a["name"] for a in admin.agents.list(status="disabled")["data"]],
            "with_policy": [a["name"] for a in admin.agents.list(policy_id="{policy_id}")["data"]],
            "steps": [len(admin.runs.steps(last, limit=n, offset=o)["data"])
                      for n, o in ((2, 0), (2, 2), (None, None))],
        }}))
    """)
    assert result["policy"] == {"id": policy_id, "name": "sdk-pol"}
    first, second = result["pages"]
    assert len(first) == 2 and len(second) == 1 and not set(first) & set(second)
    assert result["disabled"] == ["sdk-off"] and result["with_policy"] == ["sdk-admin-agent"]
    assert result["steps"] == [2, 1, 3]
