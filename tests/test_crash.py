"""kill -9 in the middle of group commits loses nothing acknowledged and leaves a log that verifies."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from rungate.admin import CreateAgent
from rungate.runs import AdmitCall
from tests.store_helpers import REPO_ROOT, all_events, facts, opened, snapshot

CHILD = textwrap.dedent("""
    import asyncio
    import random
    import sys
    from pathlib import Path

    from rungate.admin import CreateAgent
    from rungate.events.catalogue import StepCompleted, ToolStepLogged
    from rungate.events import NewEvent
    from rungate.ids import new_id, token_hash
    from rungate.runs import AdmitCall, CallFacts, CompleteRun, LogToolStep, run_stream
    from projections import ALL
    from rungate.store import Append, SQLiteEventStore


    def ack(results):
        # one line per acknowledged event, written only after execute returned (the commit is durable)
        out = []
        for recorded in results:
            if isinstance(recorded, list):
                out.extend(f"{r.position}\\n" for r in recorded)
        sys.stdout.write("".join(out))
        sys.stdout.flush()


    async def main() -> None:
        rng = random.Random(int(sys.argv[2]))
        store = SQLiteEventStore(Path(sys.argv[1]), projections=ALL, durability="full")
        await store.start()
        creates = [CreateAgent(f"crash-agent-{sys.argv[2]}-{i}", {}) for i in range(5)]
        ack(await asyncio.gather(*(store.execute(c) for c in creates)))
        agents = [c.agent_id for c in creates]
        hashes = {c.agent_id: token_hash(c.token) for c in creates}
        pending = []
        while True:  # rounds of 50 concurrent commands until killed
            commands = []
            for _ in range(50):
                agent = rng.choice(agents)
                roll = rng.random()
                if roll < 0.45 or not pending:
                    commands.append(AdmitCall(CallFacts(
                        agent_id=agent, token_hash=hashes[agent],
                        run_id=None if roll < 0.3 else f"job-{agent}-{rng.randint(0, 3)}",
                        new_run=rng.random() < 0.05, endpoint="chat", provider="openai", model="m", stream=False,
                        fingerprint="f", reserved_pusd=rng.randint(0, 10**6), idle_timeout_s=900)))
                elif roll < 0.9:
                    run_id, step_id = pending.pop(rng.randrange(len(pending)))
                    commands.append(Append((NewEvent(run_stream(run_id), StepCompleted(
                        step_id=step_id, run_id=run_id, status="ok", provider="openai", model="m",
                        usage={"input": rng.randint(0, 999), "output": rng.randint(0, 99)},
                        cost_pusd=rng.randint(0, 10**6), latency_ms=3)),)))
                elif roll < 0.95:
                    run_id = f"job-{agent}-{rng.randint(0, 3)}"
                    commands.append(LogToolStep(agent, run_id, ToolStepLogged(
                        step_id=new_id("stp"), run_id=run_id, tool="t", status="ok", cost_pusd=7)))
                else:
                    commands.append(CompleteRun(agent, f"job-{agent}-{rng.randint(0, 3)}", "done", {}))
            results = await asyncio.gather(*(store.execute(c) for c in commands), return_exceptions=True)
            for command, result in zip(commands, results):
                if isinstance(command, AdmitCall) and isinstance(result, list):
                    pending.append((command.run_id, command.step_id))
            ack(results)


    asyncio.run(main())
""")


class Lines:
    """Collects the child's complete stdout lines on a thread (so the parent can kill at any moment)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:  # a partial last line (no newline) was never acknowledged as a whole
            if raw.endswith(b"\n"):
                self.lines.append(raw.decode().strip())
                self.first.set()


@pytest.mark.parametrize("attempt", range(5))
async def test_sigkill_during_group_commits_loses_no_acknowledged_event(tmp_path: Path, attempt: int) -> None:
    rng = random.Random(1000 + attempt)
    script = tmp_path / "writer.py"
    script.write_text(CHILD)
    path = tmp_path / "crash.db"
    errors = tmp_path / "writer.err"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    # given a writer process appending 50 concurrent commands per round and printing each acknowledged position
    with errors.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(attempt)], stdout=subprocess.PIPE,
                                stderr=stderr, env=env)
    lines = Lines(proc)
    try:
        assert lines.first.wait(30), errors.read_text()
        # when it is killed with SIGKILL after a random short time
        time.sleep(rng.uniform(0.2, 1.0))
        assert proc.poll() is None, "the writer stopped by itself"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        lines.thread.join(10)
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, errors.read_text()
    acknowledged = {int(line) for line in lines.lines}

    # then the log verifies, holds every acknowledged event, and rebuilding gives the live projections
    async with opened(path, durability="full") as store:
        report = await store.verify()
        log = await all_events(store)
        live = await snapshot(store)
        replayed = await store.rebuild()
        rebuilt = await snapshot(store)
        # and the recovered log accepts new appends that continue the chain
        create = CreateAgent(f"after-crash-{attempt}", {})
        more = await store.execute(create)
        await store.execute(AdmitCall(await facts(store, create.agent_id)))
        after = await store.verify()

    assert report.ok, report
    assert len(acknowledged) > 50
    stored = {e.position for e in log}
    assert stored == set(range(1, len(log) + 1))
    assert acknowledged <= stored, sorted(acknowledged - stored)[:10]
    assert replayed == len(log)
    assert rebuilt == live
    assert more[0].position == len(log) + 1 and more[0].prev_hash == log[-1].hash
    assert after.ok and after.events == len(log) + 3
