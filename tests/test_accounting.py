"""Exact accounting under concurrency (peer-failures I1, I3): every call is in the ledger once, the ledger
equals the provider's own usage priced independently, and no reservation is left open.

Given 160 concurrent calls over 4 runs — chat and messages, streamed and not, some streams cut by the
provider and some abandoned by the client — when they have all ended, then each run's spend is the sum
of its steps, every completed call cost exactly what its usage (as the client saw it) prices to, cut or
abandoned calls that delivered tokens cost more than zero, and nothing is reserved or open.
"""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal
from typing import Any

import aiohttp
import orjson

from rungate.prices import PriceTable
from rungate.usage import Usage
from tests.conftest import Gateway

PRICES = PriceTable.load()
CALLS = 160
CONCURRENCY = 32


def _chat_cost(usage: dict[str, Any]) -> Decimal:
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    cost = PRICES.cost("mock-gpt", Usage(input=usage["prompt_tokens"] - cached, cached=cached,
                                         output=usage["completion_tokens"]))
    assert cost is not None
    return cost


def _messages_cost(usage: dict[str, Any]) -> Decimal:
    cost = PRICES.cost("mock-claude", Usage(input=usage["input_tokens"], cached=usage["cache_read_input_tokens"],
                                            output=usage["output_tokens"]))
    assert cost is not None
    return cost


async def _one_call(http: aiohttp.ClientSession, gateway: Gateway, token: str, index: int,
                    rng: random.Random) -> dict[str, Any]:
    """Make call `index`; returns what the client observed (the independent bill when the call completed)."""
    run_id = f"acct-{index % 4}"
    kind = rng.choice(["chat", "chat_stream", "messages", "messages_stream", "cut", "abandon"])
    words = " ".join(f"w{rng.randint(0, 99)}" for _ in range(rng.randint(1, 12)))
    extra = f" [cached:{rng.randint(0, 5)}]" if rng.random() < 0.3 else ""
    headers = {"authorization": f"Bearer {token}", "x-rungate-run-id": run_id, "content-type": "application/json"}
    if kind.startswith("messages"):
        path = "/v1/messages"
        body: dict[str, Any] = {"model": "mock-claude", "max_tokens": 200,
                                "messages": [{"role": "user", "content": words + extra}]}
    else:
        path = "/v1/chat/completions"
        body = {"model": "mock-gpt", "messages": [{"role": "user", "content": words + extra}]}
    if kind in ("chat_stream", "messages_stream", "cut", "abandon"):
        body["stream"] = True
        if path.endswith("completions"):
            body["stream_options"] = {"include_usage": True}  # so the client holds the provider's own usage
    if kind == "cut":
        body["messages"][0]["content"] += f" [cut:{rng.randint(2, 5)}]"
    async with http.post(gateway.url + path, data=orjson.dumps(body), headers=headers) as resp:
        step_id = resp.headers["x-rungate-step-id"]
        if kind == "abandon":
            await resp.content.readuntil(b"\n\n")
            resp.close()
            return {"step_id": step_id, "kind": kind}
        raw = await resp.read()
    if kind in ("chat", "messages"):
        usage = orjson.loads(raw)["usage"]
        return {"step_id": step_id, "kind": kind,
                "bill": _chat_cost(usage) if kind == "chat" else _messages_cost(usage)}
    if kind == "cut":
        return {"step_id": step_id, "kind": kind}
    bill = Decimal(0)
    for block in raw.decode().split("\n\n"):
        data = next((line[6:] for line in block.splitlines() if line.startswith("data: ")), None)
        if data is None or data == "[DONE]":
            continue
        event = orjson.loads(data)
        if kind == "chat_stream" and event.get("usage"):
            bill = _chat_cost(event["usage"])
        elif kind == "messages_stream" and event.get("type") == "message_start":
            start_usage = event["message"]["usage"]
        elif kind == "messages_stream" and event.get("type") == "message_delta":
            bill = _messages_cost({**start_usage, **event["usage"]})
    return {"step_id": step_id, "kind": kind, "bill": bill}


async def test_the_ledger_equals_the_providers_bill_and_no_hold_is_left(gateway: Gateway) -> None:
    token = await gateway.new_agent("accountant")
    rng = random.Random(20261127)
    semaphore = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession() as http:
        async def bounded(index: int) -> dict[str, Any]:
            async with semaphore:
                return await _one_call(http, gateway, token, index, rng)

        observed = await asyncio.gather(*(bounded(i) for i in range(CALLS)))

    steps: dict[str, dict[str, Any]] = {}
    runs: list[dict[str, Any]] = []
    for _ in range(100):  # abandoned streams settle when the server notices the client is gone
        runs = [(await gateway.admin("GET", f"/api/runs/acct-{r}"))[1]["data"] for r in range(4)]
        if all(run["reserved_usd"] == "0" for run in runs):
            break
        await asyncio.sleep(0.05)
    for r in range(4):
        _, page = await gateway.admin("GET", f"/api/runs/acct-{r}/steps")
        steps.update({step["id"]: step for step in page["data"]})

    # every call is exactly one step, none still open
    assert len(steps) == CALLS and {o["step_id"] for o in observed} == set(steps)
    assert all(step["status"] != "started" for step in steps.values())
    for run in runs:
        assert run["reserved_usd"] == "0"
        mine = [s for s in steps.values() if s["run_id"] == run["id"]]
        assert Decimal(run["spend_usd"]) == sum((Decimal(s["cost_usd"]) for s in mine), Decimal(0))
        assert run["step_count"] == len(mine)
    # completed calls cost exactly what the provider's usage prices to
    for seen in observed:
        step = steps[seen["step_id"]]
        if "bill" in seen:
            assert step["status"] == "ok" and not step["estimated"], step
            assert Decimal(step["cost_usd"]) == seen["bill"], (seen, step)
        elif seen["kind"] == "cut":
            assert step["status"] == "cut" and Decimal(step["cost_usd"]) > 0, step
        else:  # abandoned after the first event: charged for what was seen, never nothing
            assert step["status"] in {"client_closed", "ok"} and Decimal(step["cost_usd"]) > 0, step
