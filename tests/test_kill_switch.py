"""The kill switch (SPEC §4): `POST /api/runs/{id}/stop` refuses every later call of the run and cuts the
calls in flight — a stream ends with a protocol-correct error event and is charged what it relayed; resume
(with a top-up) lets the run go on. Both are events. A stop recorded by another process (the CLI) cuts a
running server's calls too, those admitted before the stop only."""

from __future__ import annotations

import asyncio
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from rungate import queries
from rungate.admin import CreateAgent
from rungate.config import load_settings
from rungate.proxy.app import create_app
from rungate.proxy.inflight import Inflight, watch_stops
from rungate.runs import AdmitCall, ResumeRun, StopRun, run_stream
from tests.conftest import ADMIN_TOKEN
from tests.openapi_check import validate_response
from tests.store_helpers import facts, opened

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _chunk(i: int) -> bytes:
    return (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"mock-gpt","choices":[{"index":0,'
            b'"delta":{"content":"word%d "},"finish_reason":null}]}\n\n' % i)


def slow_upstream() -> web.Application:
    """Chat completions that take their time: a stream of 100 chunks 50 ms apart, or a 5 s plain answer."""
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            await asyncio.sleep(5)
            return web.json_response({"id": "c", "object": "chat.completion", "created": 1, "model": "mock-gpt",
                                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "late"},
                                                   "finish_reason": "stop"}],
                                      "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(100):
            await response.write(_chunk(i))
            await asyncio.sleep(0.05)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def _setup(aiohttp_server: Any, tmp_path: Path) -> tuple[str, str]:
    up = await aiohttp_server(slow_upstream())
    app = create_app(load_settings(env={
        "RUNGATE_DATABASE_URL": f"sqlite:///{tmp_path}/kill.db", "RUNGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "RUNGATE_OPENAI_BASE_URL": str(up.make_url("/v1")), "OPENAI_API_KEY": "sk-slow-upstream-1",
        "RUNGATE_LOG_LEVEL": "warning"}))
    server = await aiohttp_server(app)
    root = str(server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as http, http.post(root + "/api/agents", json={"name": "stoppable"},
                                                          headers=ADMIN) as resp:
        token: str = (await resp.json())["data"]["token"]
    return root, token


async def _admin(root: str, method: str, path: str, json: Any = None) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as http, http.request(method, root + path, json=json, headers=ADMIN) as r:
        return r.status, await r.json(), r.headers


async def _open_stream(client: openai.AsyncOpenAI, run_id: str, received: list[str]) -> asyncio.Task[None]:
    """Start a stream of the slow upstream's 100 chunks in run `run_id`; returns the task reading it into
    `received` once its first 5 chunks arrived."""
    stream = await client.chat.completions.create(
        model="mock-gpt", messages=[{"role": "user", "content": "go"}], stream=True,
        extra_headers={"x-rungate-run-id": run_id})

    async def read() -> None:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)

    reader = asyncio.create_task(read())
    while len(received) < 5:
        await asyncio.sleep(0.02)
    return reader


async def test_stop_cuts_a_live_stream_and_refuses_the_run_until_resumed(aiohttp_server: Any, tmp_path: Path) -> None:
    root, token = await _setup(aiohttp_server, tmp_path)
    client = openai.AsyncOpenAI(api_key=token, base_url=root + "/v1", max_retries=0)
    async with client:
        # given a stream in progress
        received: list[str] = []
        reader = await _open_stream(client, "long-job", received)
        # when an operator stops the run
        status, body, headers = await _admin(root, "POST", "/api/runs/long-job/stop", {"reason": "runaway"})
        assert status == 200 and body["data"]["status"] == "stopped" and headers["x-rungate-calls-cut"] == "1"
        validate_response("POST", "/api/runs/{run_id}/stop", 200, body)
        # then the stream ends at once with an error the SDK raises, long before its 100 chunks, coded as the stop
        with pytest.raises(openai.APIError, match="stopped") as cut:
            await asyncio.wait_for(reader, 5)
        assert cut.value.code == "run_force_stopped"
        assert 5 <= len(received) < 60
        # and the next call of the run is refused
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "more"}],
                                                 extra_headers={"x-rungate-run-id": "long-job"})
        assert isinstance(refused.value.body, dict) and refused.value.body["code"] == "run_force_stopped"
    # the cut step is charged the tokens it relayed
    status, steps, _ = await _admin(root, "GET", "/api/runs/long-job/steps")
    [step] = steps["data"]
    assert step["status"] == "stopped" and step["estimated"] and step["tokens"]["output"] >= 5
    assert Decimal(step["cost_usd"]) > 0
    # resume, with a top-up: the run takes calls again and the top-up is an event
    status, body, _ = await _admin(root, "POST", "/api/runs/long-job/resume", {"add_usd": "2.50"})
    assert status == 200 and body["data"]["status"] == "active"
    validate_response("POST", "/api/runs/{run_id}/resume", 200, body)
    async with aiohttp.ClientSession() as http, http.post(
            root + "/v1/chat/completions", headers={"Authorization": f"Bearer {token}", "x-rungate-run-id": "long-job"},
            json={"model": "mock-gpt", "messages": [{"role": "user", "content": "again"}], "stream": True}) as resp:
        assert resp.status == 200 and b"data: [DONE]" in await resp.read()
    status, steps, _ = await _admin(root, "GET", "/api/runs/long-job/steps")
    assert [s["status"] for s in steps["data"]] == ["stopped", "ok"]


async def test_stop_cuts_a_plain_call_waiting_for_its_answer(aiohttp_server: Any, tmp_path: Path) -> None:
    root, token = await _setup(aiohttp_server, tmp_path)

    async def call() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http, http.post(
                root + "/v1/chat/completions", headers={"Authorization": f"Bearer {token}", "x-rungate-run-id": "wait"},
                json={"model": "mock-gpt", "messages": [{"role": "user", "content": "slow"}]}) as resp:
            return resp.status, await resp.json()

    waiting = asyncio.create_task(call())
    for _ in range(100):  # until the call is admitted and waiting upstream
        status, steps, _ = await _admin(root, "GET", "/api/runs/wait/steps")
        if status == 200 and steps["data"]:
            break
        await asyncio.sleep(0.02)
    status, body, headers = await _admin(root, "POST", "/api/runs/wait/stop")
    assert status == 200 and headers["x-rungate-calls-cut"] == "1"
    code, answer = await asyncio.wait_for(waiting, 3)  # long before the upstream's 5 s
    assert code == 403 and answer["error"]["code"] == "run_force_stopped"
    status, steps, _ = await _admin(root, "GET", "/api/runs/wait/steps")
    [step] = steps["data"]
    assert step["status"] == "stopped" and Decimal(step["cost_usd"]) > 0  # charged its reservation
    status, run, _ = await _admin(root, "GET", "/api/runs/wait")
    assert run["data"]["reserved_usd"] == "0"


async def test_stop_and_resume_are_events_and_refuse_what_they_cannot_do(aiohttp_server: Any,
                                                                         tmp_path: Path) -> None:
    root, token = await _setup(aiohttp_server, tmp_path)
    assert (await _admin(root, "POST", "/api/runs/nope/stop"))[0] == 404
    async with aiohttp.ClientSession() as http, http.post(
            root + "/v1/runs/done-run/steps", headers={"Authorization": f"Bearer {token}"},
            json={"tool": "search", "status": "ok"}) as resp:
        assert resp.status in (200, 201)
    assert (await _admin(root, "POST", "/api/runs/done-run/stop"))[0] == 200
    assert (await _admin(root, "POST", "/api/runs/done-run/stop"))[0] == 200  # idempotent
    for amount in ("-1", "1e3", " 2.5", "+2", "1_000", "2.", ".5", 2.5):  # money is a plain decimal string
        status, body, _ = await _admin(root, "POST", "/api/runs/done-run/resume", {"add_usd": amount})
        assert status == 400 and body["error"]["code"] == "invalid_amount", amount
    assert (await _admin(root, "POST", "/api/runs/done-run/resume", {"add_usd": "1.25"}))[0] == 200
    async with aiohttp.ClientSession() as http, http.post(
            root + "/v1/runs/done-run/complete", headers={"Authorization": f"Bearer {token}"}, json={}) as resp:
        assert resp.status == 200
    status, body, _ = await _admin(root, "POST", "/api/runs/done-run/stop")
    assert status == 409
    # the log tells the story
    events = await _run_events(root, "done-run")
    assert [e["type"] for e in events] == ["RunStarted", "ToolStepLogged", "RunStopped", "RunResumed",
                                           "RunCompleted"]
    assert events[3]["data"]["add_pusd"] == 1_250_000_000_000
    assert run_stream("done-run") == events[0]["stream"]


async def _run_events(root: str, run_id: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(root + f"/api/runs/{run_id}/events", headers=ADMIN) as r:
        return [orjson.loads(line) for line in (await r.read()).splitlines() if line]


async def test_a_stop_from_the_command_line_cuts_a_running_servers_stream(aiohttp_server: Any,
                                                                          tmp_path: Path) -> None:
    root, token = await _setup(aiohttp_server, tmp_path)
    client = openai.AsyncOpenAI(api_key=token, base_url=root + "/v1", max_retries=0)
    async with client:
        # given a stream in progress in the server
        received: list[str] = []
        reader = await _open_stream(client, "cli-stopped", received)
        # when an operator stops the run with the CLI, another process writing the same database
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rungate", "--database-url", f"sqlite:///{tmp_path}/kill.db",
            "runs", "stop", "cli-stopped", "--reason", "from a terminal",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(cli.communicate(), 60)
        assert cli.returncode == 0, err.decode()
        assert b"cuts the run's calls in flight" in out
        stopped_at = time.monotonic()
        # then the server cuts the stream within its watch interval, long before its 100 chunks
        with pytest.raises(openai.APIError, match="stopped"):
            await asyncio.wait_for(reader, 5)
        assert time.monotonic() - stopped_at < 2 and len(received) < 90
    status, steps, _ = await _admin(root, "GET", "/api/runs/cli-stopped/steps")
    [step] = steps["data"]
    assert step["status"] == "stopped" and step["tokens"]["output"] >= 5 and Decimal(step["cost_usd"]) > 0
    status, run, _ = await _admin(root, "GET", "/api/runs/cli-stopped")
    assert run["data"]["status"] == "stopped" and run["data"]["reserved_usd"] == "0"


async def test_a_stop_recorded_elsewhere_and_undone_at_once_still_cuts_its_calls(aiohttp_server: Any,
                                                                                  tmp_path: Path) -> None:
    root, token = await _setup(aiohttp_server, tmp_path)
    client = openai.AsyncOpenAI(api_key=token, base_url=root + "/v1", max_retries=0)
    async with client:
        # given a stream in progress
        first: list[str] = []
        cut = await _open_stream(client, "stop-and-go", first)
        # when another writer of the database stops the run and resumes it at once (within one watch interval)
        async with opened(tmp_path / "kill.db") as other:
            await other.execute(StopRun("stop-and-go", "second thoughts"))
            await other.execute(ResumeRun("stop-and-go"))
        # then the stream admitted before the stop is cut all the same
        with pytest.raises(openai.APIError, match="stopped"):
            await asyncio.wait_for(cut, 5)
        # and a stream admitted after the resume runs to its end: the old stop is not its stop
        second: list[str] = []
        kept = await _open_stream(client, "stop-and-go", second)
        await asyncio.wait_for(kept, 15)
        assert len(second) == 100
    status, steps, _ = await _admin(root, "GET", "/api/runs/stop-and-go/steps")
    assert [s["status"] for s in steps["data"]] == ["stopped", "ok"]


class _InFlight:
    """A call in flight as the registry sees it: its run, where it was admitted, whether it was cut."""

    def __init__(self, run_id: str, admitted_at: int) -> None:
        self.run_id, self.admitted_at, self.cuts = run_id, admitted_at, 0

    def stop(self) -> None:
        self.cuts += 1


async def test_the_stop_watch_cuts_a_runs_calls_admitted_before_the_stop_once(tmp_path: Path) -> None:
    async with opened(tmp_path / "watch.db") as store:
        create = CreateAgent("watched", {})
        await store.execute(create)
        for run_id in ("stopped-run", "other-run"):
            await store.execute(AdmitCall(await facts(store, create.agent_id, run_id=run_id)))
        inflight = Inflight()
        watch = asyncio.create_task(watch_stops(store, inflight, poll_s=0.3))
        await asyncio.sleep(0.01)  # the watch has read the head: what follows is new to it
        # given calls admitted before the stop, in its run and in another
        before = _InFlight("stopped-run", await queries.head_position(store))
        elsewhere = _InFlight("other-run", before.admitted_at)
        # when the run is stopped and resumed within one interval, then a call is admitted after the resume
        await store.execute(StopRun("stopped-run", "test"))
        await store.execute(ResumeRun("stopped-run"))
        after = _InFlight("stopped-run", await queries.head_position(store) + 1)
        for call in (before, elsewhere, after):
            inflight.add(call)
        await asyncio.sleep(0.8)  # two intervals
        watch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watch
    # then only the call admitted before the stop, in its run, was cut, and once
    assert (before.cuts, elsewhere.cuts, after.cuts) == (1, 0, 0)
