"""A stream cut at any byte — by the provider (inside an event, between two, after the last) or by the agent
walking away — is accounted.

For each cut the step settles once (`cut`, or `ok` when the stream was whole), is charged when answer tokens
reached the agent (never a silent $0), leaves nothing reserved or open on its run, and the agent's stream
ends the way its SDK understands: the format's error event and the `rungate` trailer after a cut.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import Gateway, GatewayFactory
from tests.faults import WORDS, chat_events, messages_events
from tests.store_helpers import read_only

CUTS_PER_FORMAT = 40  # random byte offsets, plus every event boundary's neighbours

FORMATS = {
    "chat": ("/v1/chat/completions", "mock-gpt", chat_events),
    "messages": ("/v1/messages", "mock-claude", messages_events),
}


def _events(path: str, model: str) -> list[bytes]:
    """The scripted answer's events in the format of the upstream path asked."""
    return (chat_events if path.endswith("completions") else messages_events)(model)


def _upstream(answer: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    app.router.add_post("/v1/messages", answer)
    return app


async def _gateway_behind(upstream: web.Application, name: str, make_gateway: GatewayFactory,
                          aiohttp_server: Any) -> tuple[Gateway, str]:
    """Rungate with both vendors' base URLs on `upstream`, and an agent's token."""
    server = await aiohttp_server(upstream)
    gateway = await make_gateway(RUNGATE_OPENAI_BASE_URL=str(server.make_url("/v1")),
                                 RUNGATE_ANTHROPIC_BASE_URL=str(server.make_url("")).rstrip("/"))
    return gateway, await gateway.new_agent(name)


def _cutting_upstream() -> web.Application:
    """Streams the scripted answer and drops the connection after the number of bytes the prompt names."""

    async def answer(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        text = body["messages"][-1]["content"]
        cut_at = int(re.search(r"cut at (\d+)", text)[1])  # type: ignore[index]
        data = b"".join(_events(request.path, body["model"]))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(data[:cut_at])
        if cut_at < len(data) and request.transport is not None:
            request.transport.close()  # the rest never comes, nor the end of the chunked body
            return response
        await response.write_eof()
        return response

    return _upstream(answer)


def _offsets(events: list[bytes], rng: random.Random) -> list[int]:
    total = sum(map(len, events))
    boundaries, at = [], 0
    for event in events:
        at += len(event)
        boundaries += [at - 1, at, at + 1]
    chosen = {0, 1, total - 1, total, *rng.sample(range(1, total), CUTS_PER_FORMAT), *boundaries}
    return sorted(offset for offset in chosen if 0 <= offset <= total)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
async def test_a_stream_cut_at_any_byte_is_settled_charged_and_ended_properly(
        fmt: str, make_gateway: GatewayFactory, aiohttp_server: Any) -> None:
    path, model, events_of = FORMATS[fmt]
    gateway, token = await _gateway_behind(_cutting_upstream(), f"cuts-{fmt}", make_gateway, aiohttp_server)
    events = events_of(model)
    total = sum(map(len, events))
    wrong: list[str] = []
    async with aiohttp.ClientSession() as http:
        for cut_at in _offsets(events, random.Random(fmt)):
            body: dict[str, Any] = {"model": model, "stream": True, "max_tokens": 50,
                                    "messages": [{"role": "user", "content": f"cut at {cut_at}"}],
                                    "rungate": {"run_id": f"cut-{fmt}-{cut_at}"}}
            async with http.post(gateway.url + path, json=body, headers={"x-api-key": token}) as resp:
                status, received = resp.status, await resp.read()
            got_words = any(f'"{word}"'.encode() in received for word in WORDS)  # as a delta carries it
            ended = b"event: rungate" in received
            error_event = b'"error"' in received
            with read_only(gateway.db_path) as db:
                steps = db.execute("SELECT status, cost_pusd FROM steps WHERE run_id = ?",
                                   (f"cut-{fmt}-{cut_at}",)).fetchall()
                run = db.execute("SELECT reserved_pusd, open_steps FROM runs WHERE id = ?",
                                 (f"cut-{fmt}-{cut_at}",)).fetchone()
            whole = cut_at >= total
            problems = []
            if status != 200 or not ended:
                problems.append(f"status {status}, trailer {ended}")
            if len(steps) != 1:
                problems.append(f"steps {steps}")
            else:
                step_status, cost = steps[0]
                if step_status != ("ok" if whole else "cut"):
                    problems.append(f"step {step_status}")
                if cost is None or (got_words and cost <= 0):
                    problems.append(f"cost {cost} with words {got_words}")
            if run != (0, 0):
                problems.append(f"run holds {run}")
            if not whole and not error_event:
                problems.append("no error event after the cut")
            if problems:
                wrong.append(f"cut at {cut_at}/{total}: {'; '.join(problems)}")
    assert wrong == [], "\n".join(wrong)
    with read_only(gateway.db_path) as db:
        assert db.execute("SELECT count(*) FROM steps WHERE status = 'started'").fetchone() == (0,)


def _paced_upstream(pause_s: float = 0.004) -> web.Application:
    """Streams the scripted answer one event at a time, with a pause between events (a model still writing)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        events = _events(request.path, body["model"])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
            await asyncio.sleep(pause_s)
        await response.write_eof()
        return response

    return _upstream(answer)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
async def test_an_agent_that_leaves_at_any_byte_leaves_a_settled_charged_step(
        fmt: str, make_gateway: GatewayFactory, aiohttp_server: Any) -> None:
    path, model, _ = FORMATS[fmt]
    gateway, token = await _gateway_behind(_paced_upstream(), f"leaves-{fmt}", make_gateway, aiohttp_server)
    rng = random.Random(f"leave-{fmt}")
    wrong: list[str] = []
    for leave_at in sorted(rng.sample(range(1, 2400), 16)):
        run_id = f"leave-{fmt}-{leave_at}"
        body = {"model": model, "stream": True, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}],
                "rungate": {"run_id": run_id}}
        received = b""
        async with aiohttp.ClientSession() as http:
            resp = await http.post(gateway.url + path, json=body, headers={"x-api-key": token})
            while len(received) < leave_at and (chunk := await resp.content.readany()):
                received += chunk
            resp.close()  # the agent walks away here (or the answer was shorter)
        got_words = any(f'"{word}"'.encode() in received for word in WORDS)
        for _ in range(200):  # the server notices the agent is gone at its next write
            with read_only(gateway.db_path) as db:
                steps = db.execute("SELECT status, cost_pusd FROM steps WHERE run_id = ?", (run_id,)).fetchall()
                run = db.execute("SELECT reserved_pusd, open_steps FROM runs WHERE id = ?", (run_id,)).fetchone()
            if steps and steps[0][0] != "started":
                break
            await asyncio.sleep(0.025)
        # `client_closed` when the relay's next write finds the agent gone (`rungate serve`); `aborted` when the
        # server cancels the handler of a departed client first (aiohttp's test server does); `ok` when the
        # answer was whole before the agent left. Each settles with the tokens seen.
        if len(steps) != 1 or steps[0][0] not in ("client_closed", "aborted", "ok") or run != (0, 0):
            wrong.append(f"left at {leave_at}: steps {steps}, run {run}")
        elif got_words and not steps[0][1]:
            wrong.append(f"left at {leave_at}: tokens reached the agent but the step cost {steps[0][1]}")
    assert wrong == [], "\n".join(wrong)


async def test_an_anthropic_stream_cut_before_its_final_usage_is_charged_the_output_relayed(
        make_gateway: GatewayFactory, aiohttp_server: Any) -> None:
    # Anthropic reports the input side (and an output of 1) in message_start and the output only in
    # message_delta: cut between the two, the step once took that 1 as the provider's final count.
    gateway, token = await _gateway_behind(_cutting_upstream(), "cut-before-delta", make_gateway, aiohttp_server)
    events = messages_events("mock-claude")
    before_delta = sum(map(len, events[:-2]))  # every text delta and content_block_stop, not message_delta
    body = {"model": "mock-claude", "stream": True, "max_tokens": 50,
            "messages": [{"role": "user", "content": f"cut at {before_delta}"}], "rungate": {"run_id": "cut-late"}}
    async with aiohttp.ClientSession() as http, http.post(gateway.url + "/v1/messages", json=body,
                                                          headers={"x-api-key": token}) as resp:
        received = await resp.read()
    assert all(f'"{word}"'.encode() in received for word in WORDS)  # the whole text reached the agent
    with read_only(gateway.db_path) as db:
        step = db.execute("SELECT status, tokens_input, tokens_output, estimated FROM steps WHERE run_id = ?",
                          ("cut-late",)).fetchone()
    relayed_estimate = -(-len("".join(WORDS).encode()) // 4)  # UTF-8 bytes / 4, rounded up
    assert step == ("cut", 10, relayed_estimate, 1)  # the reported input, the relayed output, marked estimated
