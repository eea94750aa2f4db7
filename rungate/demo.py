"""`rungate demo`: a short scripted agent run through the built-in mock provider, end to end.

It starts Rungate with the mock provider on loopback, creates an agent, makes OpenAI and Anthropic calls
(streaming and not, one with a tool call) inside one run, completes the run and prints what an operator
sees: the run, its steps and costs, and the verified event log.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from rungate import queries
from rungate.admin import create_agent
from rungate.config import Settings
from rungate.proxy.app import create_app
from rungate.proxy.keys import STORE
from rungate.views import run_view, step_view


async def run_demo(settings: Settings, port: int = 0) -> int:
    """Run the scripted agent; returns 0 when every call succeeded and the log verifies."""
    settings = dataclasses.replace(settings, mock=True, host="127.0.0.1", port=port)
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    store = app[STORE]
    try:
        _, token = await create_agent(store, f"demo-agent-{secrets.token_hex(3)}")
        run_id = f"demo-{secrets.token_hex(4)}"
        headers = {"Authorization": f"Bearer {token}", "x-rungate-run-id": run_id}
        async with aiohttp.ClientSession(base) as http:
            calls: list[tuple[str, dict[str, Any]]] = [
                ("/v1/chat/completions", {"model": "mock-gpt", "messages": [
                    {"role": "user", "content": "Plan a refund for order 42."}]}),
                ("/v1/chat/completions", {"model": "mock-gpt", "stream": True, "messages": [
                    {"role": "user", "content": 'Look it up [tool:lookup_order {"order_id": 42}]'}],
                    "tools": [{"type": "function", "function": {"name": "lookup_order", "parameters": {}}}]}),
                ("/v1/messages", {"model": "mock-claude", "max_tokens": 256, "stream": True, "messages": [
                    {"role": "user", "content": "Summarise the refund decision."}]}),
            ]
            for path, body in calls:
                async with http.post(path, data=orjson.dumps(body), headers={
                        **headers, "content-type": "application/json", "anthropic-version": "2023-06-01"}) as resp:
                    await resp.read()
                    print(f"{path:<22} stream={str(body.get('stream', False)):<5} -> {resp.status}"
                          f"  step={resp.headers.get('x-rungate-step-id')}")
                    if resp.status != 200:
                        return 1
            async with http.post(f"/v1/runs/{run_id}/complete", json={"ended_reason": "demo_done"},
                                 headers=headers) as resp:
                await resp.read()
        row = await queries.get_run(store, run_id)
        assert row is not None
        run = run_view(row)
        print(f"\nrun {run['id']}: {run['status']} ({run['ended_reason']}), {run['step_count']} steps, "
              f"{run['tokens']['input']} input + {run['tokens']['output']} output tokens, ${run['spend_usd']}")
        for step in [step_view(s) for s in await queries.run_steps(store, run_id)]:
            calls_made = ", ".join(t["name"] for t in step["tool_calls"]) or "-"
            print(f"  {step['id']}  {step['model']:<11} {step['status']:<6} cost=${step['cost_usd']:<12}"
                  f" tool calls: {calls_made}")
        report = await store.verify()
        print(f"\nevent log: {'ok' if report.ok else 'BROKEN'} ({report.events} events)."
              f" Replay this run with: rungate replay {run_id}")
        return 0 if report.ok else 1
    finally:
        await runner.cleanup()
