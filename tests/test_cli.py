"""The `rungate` command line, run as a user would: separate processes on a real database file."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest


def rungate(db: Path, *args: str, env: dict[str, str] | None = None, stdin: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rungate", "--database-url", f"sqlite:///{db}", *args],
                          capture_output=True, text=True, input=stdin, timeout=timeout,
                          env={**os.environ, "RUNGATE_LOG_LEVEL": "warning", **(env or {})})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until_healthy(http: aiohttp.ClientSession, base: str, server: subprocess.Popen[bytes]) -> None:
    """Wait until the `rungate serve` at `base` answers `/health` with 200 (at most 30 s; not if it exits)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            async with http.get(base + "/health") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        assert time.monotonic() < deadline, "server did not start"
        assert server.poll() is None, server.stderr.read() if server.stderr else "server exited"
        await asyncio.sleep(0.05)


def test_agents_create_and_list(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    created = rungate(db, "agents", "create", "billing-bot")
    assert created.returncode == 0, created.stderr
    agent = json.loads(created.stdout)
    assert agent["name"] == "billing-bot" and agent["token"].startswith("rg_agt_")
    assert agent["token"] in created.stderr  # shown once, for the operator
    listed = json.loads(rungate(db, "agents", "list").stdout)
    assert [a["name"] for a in listed] == ["billing-bot"]
    assert "token" not in listed[0]
    duplicate = rungate(db, "agents", "create", "billing-bot")
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr


def test_provider_keys_are_encrypted_at_rest_and_never_shown(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    canary = "sk-canary-" + "Q7" * 20
    added = rungate(db, "keys", "add", "openai", "prod", "--from-env", "CANARY_KEY", env={"CANARY_KEY": canary})
    assert added.returncode == 0, added.stderr
    from_stdin = rungate(db, "keys", "add", "anthropic", "claude", stdin=canary + "-2\n")
    assert from_stdin.returncode == 0, from_stdin.stderr
    listed = rungate(db, "keys", "list")
    keys = json.loads(listed.stdout)
    assert {k["name"] for k in keys} == {"prod", "claude"}
    assert keys[0]["hint"] == "…" + canary[-4:]
    everything = added.stdout + added.stderr + listed.stdout + from_stdin.stdout + from_stdin.stderr
    assert canary not in everything
    for path in tmp_path.iterdir():  # database, WAL and the generated key file
        if path.name.startswith("cli.db") and not path.name.endswith(".key"):
            assert canary.encode() not in path.read_bytes(), path.name


def test_demo_then_runs_replay_verify_and_rebuild(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    demo = rungate(db, "demo")
    assert demo.returncode == 0, demo.stderr
    assert "event log: ok" in demo.stdout
    listing = rungate(db, "runs", "list")
    run_id = listing.stdout.split()[0]
    assert run_id.startswith("demo-") and "completed" in listing.stdout
    shown = json.loads(rungate(db, "runs", "show", run_id).stdout)
    assert shown["step_count"] == 3 and len(shown["steps"]) == 3
    assert any(step["tool_calls"] for step in shown["steps"])
    lines = [json.loads(line) for line in rungate(db, "replay", run_id).stdout.splitlines()]
    assert lines[0]["type"] == "RunStarted" and lines[-1]["type"] == "RunCompleted"
    assert [line["version"] for line in lines] == list(range(1, len(lines) + 1))
    assert set(lines[0]) == {"position", "stream", "version", "type", "at", "data", "hash"}
    later = rungate(db, "replay", run_id, "--after", str(lines[2]["position"])).stdout.splitlines()
    assert len(later) == len(lines) - 3
    verified = rungate(db, "verify")
    assert verified.returncode == 0 and verified.stdout.startswith("ok")
    rebuilt = rungate(db, "rebuild")
    assert rebuilt.returncode == 0 and "rebuilt projections" in rebuilt.stdout
    assert json.loads(rungate(db, "runs", "show", run_id).stdout) == shown
    missing = rungate(db, "runs", "show", "no-such-run")
    assert missing.returncode == 1


@pytest.mark.parametrize(("variable", "value"), [("RUNGATE_PORT", "eighty"), ("RUNGATE_MASTER_KEY", "short"),
                                                   ("RUNGATE_DATABASE_URL", "mysql://db")])
def test_a_bad_setting_stops_start_up_naming_the_variable(tmp_path: Path, variable: str, value: str) -> None:
    result = subprocess.run([sys.executable, "-m", "rungate", "serve"], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "RUNGATE_DATABASE_URL": f"sqlite:///{tmp_path}/x.db", variable: value})
    assert result.returncode == 2
    assert variable in result.stderr


async def test_serve_with_the_mock_provider_end_to_end(tmp_path: Path) -> None:
    """The first-try path of the README: `rungate serve --mock`, an agent from the CLI, one call."""
    db = tmp_path / "serve.db"
    token = json.loads(rungate(db, "agents", "create", "first-try").stdout)["token"]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "rungate", "--database-url", f"sqlite:///{db}", "serve",
                               "--mock", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "RUNGATE_LOG_LEVEL": "warning"})
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            await wait_until_healthy(http, base, server)
            body: dict[str, Any] = {"model": "mock-gpt", "messages": [{"role": "user", "content": "first try"}]}
            async with http.post(base + "/v1/chat/completions", data=orjson.dumps(body),
                                 headers={"authorization": f"Bearer {token}",
                                          "content-type": "application/json"}) as resp:
                assert resp.status == 200
                answer = await resp.json()
                run_id = resp.headers["x-rungate-run-id"]
        assert answer["choices"][0]["message"]["content"] == "Mock reply: first try"
    finally:
        server.terminate()
        server.wait(timeout=15)
    assert server.returncode == 0 or server.returncode == -15
    assert run_id in rungate(db, "runs", "list").stdout  # the CLI sees what the server recorded
    assert rungate(db, "verify").stdout.startswith("ok")


def test_a_lost_key_file_is_refused_rather_than_replaced_silently(tmp_path: Path) -> None:
    db = tmp_path / "keys.db"
    assert rungate(db, "keys", "add", "openai", "first", stdin="sk-first-key-123456\n").returncode == 0
    (tmp_path / "keys.db.key").unlink()  # e.g. a restored backup without its key file
    again = rungate(db, "keys", "add", "openai", "second", stdin="sk-second-key-123456\n")
    assert again.returncode == 2 and "RUNGATE_MASTER_KEY" in again.stderr
    served = subprocess.run([sys.executable, "-m", "rungate", "--database-url", f"sqlite:///{db}", "serve",
                             "--port", str(free_port())], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "RUNGATE_LOG_LEVEL": "warning"})
    assert served.returncode == 2 and "RUNGATE_MASTER_KEY" in served.stderr


async def test_kill_9_under_load_leaves_a_verifiable_log(tmp_path: Path) -> None:
    """SPEC: kill the server at any moment and `rungate verify` passes on restart; projections rebuild equal;
    and every answer an agent received whole was recorded before it was released (its step is settled)."""
    import random
    import signal

    from tests.store_helpers import read_only

    db = tmp_path / "kill.db"
    token = json.loads(rungate(db, "agents", "create", "victim").stdout)["token"]
    rng = random.Random(7)
    delivered: set[str] = set()  # steps whose answer reached the agent whole
    for round_ in range(3):
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "rungate", "--database-url", f"sqlite:///{db}", "serve",
                                   "--mock", "--port", str(port)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, env={**os.environ, "RUNGATE_LOG_LEVEL": "warning"})
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            await wait_until_healthy(http, base, server)

            async def hammer(worker: int, base: str = base, round_: int = round_) -> None:
                for i in range(10_000):
                    body = {"model": "mock-gpt", "stream": (i + worker) % 2 == 0,
                            "messages": [{"role": "user", "content": f"load {worker} {i}"}]}
                    try:
                        async with http.post(base + "/v1/chat/completions", data=orjson.dumps(body),
                                             headers={"authorization": f"Bearer {token}",
                                                      "x-rungate-run-id": f"kill-{round_}-{worker % 3}",
                                                      "content-type": "application/json"}) as resp:
                            answer = await resp.read()
                    except aiohttp.ClientError:
                        return
                    if resp.status == 200 and (not body["stream"] or b"event: rungate" in answer):
                        delivered.add(resp.headers["x-rungate-step-id"])

            workers = [asyncio.create_task(hammer(w)) for w in range(8)]
            await asyncio.sleep(rng.uniform(0.5, 1.5))
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=10)
            await asyncio.gather(*workers)
        verified = rungate(db, "verify")
        assert verified.returncode == 0 and verified.stdout.startswith("ok"), verified.stdout
    before = [json.loads(rungate(db, "runs", "show", f"kill-{r}-{w}").stdout) for r in range(3) for w in range(3)]
    assert sum(run["step_count"] for run in before) > 0
    assert rungate(db, "rebuild").returncode == 0
    after = [json.loads(rungate(db, "runs", "show", f"kill-{r}-{w}").stdout) for r in range(3) for w in range(3)]
    assert after == before
    with read_only(db) as conn:
        settled = {row[0] for row in conn.execute("SELECT id FROM steps WHERE status = 'ok'")}
    assert len(delivered) > 50 and delivered <= settled, sorted(delivered - settled)[:5]


async def test_runs_stop_and_resume_from_the_command_line(tmp_path: Path) -> None:
    from rungate.admin import CreateAgent
    from rungate.policy_admin import apply_policy
    from rungate.runs import AdmitCall
    from tests.store_helpers import facts, opened

    db = tmp_path / "ops.db"
    async with opened(db) as store:  # given an active run under a 1 USD cap
        await apply_policy(store, {"name": "ops", "budget": {"hard_limit_usd": "1"}})
        create = CreateAgent("ops", {}, policy_name="ops")
        await store.execute(create)
        await store.execute(AdmitCall(await facts(store, create.agent_id, run_id="ops-run")))
    # when an operator stops it from the command line (twice), then resumes it with a top-up
    stopped = rungate(db, "runs", "stop", "ops-run", "--reason", "looping on a tool")
    again = rungate(db, "runs", "stop", "ops-run")
    shown = json.loads(rungate(db, "runs", "show", "ops-run").stdout)
    bad = rungate(db, "runs", "resume", "ops-run", "--add-usd", "-1")
    resumed = rungate(db, "runs", "resume", "ops-run", "--add-usd", "2.50")
    after = json.loads(rungate(db, "runs", "show", "ops-run").stdout)
    missing = rungate(db, "runs", "stop", "no-such-run")
    lines = [json.loads(line) for line in rungate(db, "replay", "ops-run").stdout.splitlines()]

    # then the stop is recorded once, with its reason, and says that a running server cuts calls in flight
    assert stopped.returncode == 0 and "ops-run stopped" in stopped.stdout
    assert "cuts the run's calls in flight" in stopped.stdout
    assert again.returncode == 0 and "already stopped" in again.stdout
    assert (shown["status"], shown["ended_reason"]) == ("stopped", "looping on a tool")
    # and a bad top-up changes nothing, a good one makes the run active with the larger budget
    assert bad.returncode == 2 and "--add-usd" in bad.stderr
    assert resumed.returncode == 0 and "ops-run active; budget remaining $3.5" in resumed.stdout
    assert after["status"] == "active" and after["budget_limit_usd"] == "3.5"
    assert missing.returncode == 1 and "not found" in missing.stderr
    assert [line["type"] for line in lines].count("RunStopped") == 1
    assert [line["data"].get("add_pusd") for line in lines if line["type"] == "RunResumed"] == [2_500_000_000_000]


def test_serve_takes_the_config_file_after_the_command_too(tmp_path: Path) -> None:
    from rungate.cli import build_parser
    assert build_parser().parse_args(["serve", "--config", "routes.yaml"]).config == "routes.yaml"
    assert build_parser().parse_args(["--config", "a.yaml", "serve"]).config == "a.yaml"
    assert build_parser().parse_args(["serve"]).config is None


# Every command of the README's list, with the arguments it needs.
COMMANDS = [["serve"], ["demo"], ["agents", "create", "a"], ["agents", "list"], ["keys", "add", "openai", "k"],
            ["keys", "list"], ["policies", "apply", "p.yaml"], ["policies", "list"], ["policies", "show", "p"],
            ["runs", "list"], ["runs", "show", "r"], ["runs", "stop", "r"], ["runs", "resume", "r"],
            ["approvals", "list"], ["approvals", "show", "g"], ["approvals", "approve", "g"],
            ["approvals", "reject", "g"], ["replay", "r"], ["verify"], ["rebuild"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_takes_config_and_database_url_before_or_after_its_name(command: list[str]) -> None:
    # The README says every command takes both; an operator writes them after the command as often as before.
    from rungate.cli import build_parser
    parse = build_parser().parse_args
    after = parse([*command, "--config", "c.yaml", "--database-url", "sqlite:///after.db"])
    assert (after.config, after.database_url) == ("c.yaml", "sqlite:///after.db")
    before = parse(["--config", "c.yaml", "--database-url", "sqlite:///before.db", *command])
    assert (before.config, before.database_url) == ("c.yaml", "sqlite:///before.db")
    both = parse(["--database-url", "sqlite:///before.db", *command, "--database-url", "sqlite:///after.db"])
    assert both.database_url == "sqlite:///after.db"  # the one nearer the command wins
    assert parse(command).database_url is None and parse(command).config is None


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of `parser`'s commands, all levels down."""
    found: set[str] = set()
    for action in parser._actions:  # argparse offers no public walk of its sub-commands
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found |= _options(child)
        else:
            found.update(option for option in action.option_strings if option.startswith("--"))
    return found


def test_the_readme_command_list_names_every_option_and_no_other() -> None:
    from rungate.cli import build_parser
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("## Command line", 1)[1].split("```", 2)[1]
    everywhere = {"--config", "--database-url"}  # said once, below the list
    written = set(re.findall(r"--[a-z][a-z-]*", block)) - everywhere
    assert written == _options(build_parser()) - everywhere - {"--help", "--version"}
    assert "Every command takes `--config FILE` and `--database-url URL`" in readme


def test_the_database_url_after_the_command_is_the_one_used(tmp_path: Path) -> None:
    db, other = tmp_path / "after.db", tmp_path / "before.db"
    created = rungate(other, "agents", "create", "ops-bot", "--database-url", f"sqlite:///{db}")
    assert created.returncode == 0, created.stderr
    assert db.exists() and not other.exists()
    listed = rungate(other, "agents", "list", "--database-url", f"sqlite:///{db}")
    assert [a["name"] for a in json.loads(listed.stdout)] == ["ops-bot"]
    verified = rungate(other, "verify", "--database-url", f"sqlite:///{db}")
    assert verified.returncode == 0 and verified.stdout.startswith("ok"), verified.stderr


async def test_sigterm_lets_calls_in_flight_finish_and_leaves_no_open_step(tmp_path: Path, aiohttp_server: Any) -> None:
    """A deploy's restart (SIGTERM): streams in flight are answered whole and settled, then the server exits 0."""
    import signal

    from aiohttp import web

    from tests.faults import chat_events
    from tests.store_helpers import read_only

    async def paced(request: web.Request) -> web.StreamResponse:  # a model still writing: 8 events, 0.6 s
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in chat_events(body["model"]):
            await response.write(event)
            await asyncio.sleep(0.075)
        await response.write_eof()
        return response

    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/chat/completions", paced)
    upstream = await aiohttp_server(upstream_app)
    db = tmp_path / "term.db"
    token = json.loads(rungate(db, "agents", "create", "deployed").stdout)["token"]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "rungate", "--database-url", f"sqlite:///{db}", "serve",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "RUNGATE_LOG_LEVEL": "warning", "OPENAI_API_KEY": "sk-term-00000000",
                                   "RUNGATE_OPENAI_BASE_URL": str(upstream.make_url("/v1"))})
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            await wait_until_healthy(http, base, server)

            async def stream(i: int) -> bytes:
                body = {"model": "mock-gpt", "stream": True,
                        "messages": [{"role": "user", "content": f"in flight {i}"}]}
                async with http.post(base + "/v1/chat/completions", data=orjson.dumps(body),
                                     headers={"authorization": f"Bearer {token}",
                                              "content-type": "application/json"}) as resp:
                    assert resp.status == 200
                    return await resp.read()

            # given eight streams well under way
            calls = [asyncio.create_task(stream(i)) for i in range(8)]
            await asyncio.sleep(0.3)
            # when the server is told to stop
            server.send_signal(signal.SIGTERM)
            answers = await asyncio.gather(*calls)
        code = await asyncio.get_running_loop().run_in_executor(None, lambda: server.wait(timeout=30))
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    stderr = server.stderr.read().decode() if server.stderr else ""
    # then every stream was answered whole, the server exited cleanly, and every step is settled
    assert all(b"data: [DONE]" in a and b"event: rungate" in a for a in answers), answers
    assert code == 0, stderr
    with read_only(db) as conn:
        statuses = [row[0] for row in conn.execute("SELECT status FROM steps")]
    assert sorted(statuses) == ["ok"] * 8
    assert rungate(db, "verify").stdout.startswith("ok")


def test_operator_commands_refuse_a_database_that_is_not_there(tmp_path: Path) -> None:
    # A mistyped path once created an empty database and reported it verified.
    missing = tmp_path / "typo" / "rungate.db"
    for command in (["verify"], ["runs", "list"], ["replay", "run_x"], ["rebuild"], ["agents", "list"]):
        result = rungate(missing, *command)
        assert result.returncode == 2 and f"no database at {missing}" in result.stderr, command
    assert not missing.parent.exists()
    after = rungate(tmp_path / "x.db", "replay", "run_x", "--after", "99999999999999999999")
    assert after.returncode == 2 and "log position" in after.stderr  # argparse's refusal, not a traceback


async def test_replay_prints_every_event_of_a_long_run(tmp_path: Path) -> None:
    from projections import ALL
    from rungate.admin import create_agent
    from rungate.events.catalogue import ToolStepLogged
    from rungate.runs import LogToolStep
    from rungate.store import SQLiteEventStore

    db = tmp_path / "long.db"
    store = SQLiteEventStore(db, projections=ALL)
    await store.start()
    try:
        agent, _ = await create_agent(store, "long")
        for n in range(1205):  # more than a page of the replay's reads
            await store.execute(LogToolStep(agent["id"], "long-run", ToolStepLogged(
                step_id=f"stp_{n}", run_id="long-run", tool="t", status="ok")))
    finally:
        await store.close()
    lines = rungate(db, "replay", "long-run").stdout.splitlines()
    assert len(lines) == 1206 and json.loads(lines[-1])["data"]["step_id"] == "stp_1204"
    head = subprocess.run(f"{sys.executable} -m rungate --database-url sqlite:///{db} replay long-run | head -3",
                          shell=True, capture_output=True, text=True, timeout=60)
    assert len(head.stdout.splitlines()) == 3 and "Traceback" not in head.stderr


def test_rebuild_refuses_a_log_that_does_not_verify(tmp_path: Path) -> None:
    import shutil
    import sqlite3

    db = tmp_path / "demo.db"
    assert rungate(db, "demo").returncode == 0
    copy = tmp_path / "tampered.db"
    shutil.copy(db, copy)
    with sqlite3.connect(copy) as conn:  # a forged cost, made possible by dropping the guard first
        conn.execute("DROP TRIGGER events_no_update")
        conn.execute("UPDATE events SET data = replace(data, '\"output\"', '\"outpvt\"') WHERE type = 'StepCompleted'")
    # verify names the break and leaves the evidence as it found it (it once put the dropped guard back)
    before = copy.read_bytes()
    verified = rungate(copy, "verify")
    assert verified.returncode == 1 and verified.stdout.startswith("broken at position")
    assert copy.read_bytes() == before
    with sqlite3.connect(copy) as conn:
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'events_no_update'").fetchone() == (0,)
    refused = rungate(copy, "rebuild")
    assert refused.returncode == 1 and "broken at position" in refused.stderr
    assert "nothing was rebuilt" in refused.stderr
    assert rungate(db, "rebuild").returncode == 0  # the untouched log rebuilds


async def test_serve_says_why_it_cannot_start(tmp_path: Path) -> None:
    db = tmp_path / "srv.db"
    first = "11" * 32
    assert rungate(db, "keys", "add", "openai", "main", stdin="sk-first-key-123456\n",
                   env={"RUNGATE_MASTER_KEY": first}).returncode == 0
    # another master key: refused at start-up, not by every later call that needs the stored key
    wrong = subprocess.run([sys.executable, "-m", "rungate", "--database-url", f"sqlite:///{db}", "serve", "--port",
                            str(free_port())], capture_output=True, text=True, timeout=30,
                           env={**os.environ, "RUNGATE_LOG_LEVEL": "warning", "RUNGATE_MASTER_KEY": "22" * 32})
    assert wrong.returncode == 2 and "RUNGATE_MASTER_KEY" in wrong.stderr and "main" in wrong.stderr
    assert "listening" not in wrong.stdout
    # a port already taken: a message naming the setting, and no claim of listening
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = subprocess.run([sys.executable, "-m", "rungate", "--database-url", f"sqlite:///{db}", "serve",
                               "--port", str(taken.getsockname()[1])], capture_output=True, text=True, timeout=30,
                              env={**os.environ, "RUNGATE_LOG_LEVEL": "warning", "RUNGATE_MASTER_KEY": first})
    assert busy.returncode == 2 and "RUNGATE_PORT" in busy.stderr and "Traceback" not in busy.stderr
    assert "listening" not in busy.stdout


def test_a_policy_file_with_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    # YAML keeps the last of two equal keys without a word: here the cap would have become $9, not $1.
    policy = tmp_path / "dup.yaml"
    policy.write_text('name: dup\nbudget:\n  hard_limit_usd: "1.00"\n  hard_limit_usd: "9"\n', encoding="utf-8")
    db = tmp_path / "dup.db"
    result = rungate(db, "policies", "apply", str(policy))
    assert result.returncode == 1 and "'hard_limit_usd' appears twice" in result.stderr and "line 4" in result.stderr
    assert json.loads(rungate(db, "policies", "list").stdout) == []
    config = tmp_path / "rungate.yaml"
    config.write_text("server:\n  port: 9000\n  port: 9001\n", encoding="utf-8")
    served = rungate(db, "--config", str(config), "verify")
    assert served.returncode == 2 and "RUNGATE_CONFIG" in served.stderr and "appears twice" in served.stderr
