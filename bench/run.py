"""Rungate overhead benchmark: direct-to-mock vs a bare aiohttp pass-through vs Rungate, in one process.

Three loopback servers share one event loop with the load generator:

* ``direct``       the deterministic mock provider (`rungate.providers.mock.create_mock_app`);
* ``passthrough``  a bare aiohttp proxy in front of the mock (one shared `ClientSession`, streams relayed
                   chunk by chunk): the floor any Python/aiohttp proxy pays;
* ``rungate``      `create_app(load_settings(...))` in front of the mock, SQLite event log, durability FULL.

Every (mode, concurrency) cell runs the three targets back to back, `--rounds` times with the order rotated,
so each ratio compares figures taken seconds apart on the same loop; medians over rounds are reported.
See bench/README.md for how to read the output.

    python bench/run.py [--requests N] [--concurrency 1,16,64] [--rounds R] [--quick] [--durability full|normal]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import orjson
import structlog
from aiohttp import web

from rungate.admin import create_agent
from rungate.config import Settings, load_settings
from rungate.log import configure as configure_logging
from rungate.policy_admin import apply_policy
from rungate.providers.mock import MOCK_REQUESTS, create_mock_app
from rungate.proxy.app import create_app
from rungate.proxy.keys import STORE

HOST = "127.0.0.1"  # loopback only, for every server and every request
CHAT_PATH = "/v1/chat/completions"
MODES = ("non-stream", "stream")
TARGETS = ("direct", "passthrough", "rungate")
WARMUP_REQUESTS = 20
DEFAULT_REQUESTS = 400
QUICK_REQUESTS = 100
DEFAULT_ROUNDS = 5
MAX_ERRORS_SHOWN = 5
REQUEST_TIMEOUT_S = 60.0
DISTINCT_BODIES = 1000
PADDED_BODIES_BYTES = 20 * 1024 * 1024  # with --body-bytes: fewer distinct bodies, at most this much in memory

# `--governed`: every rule kind admission enforces, with limits no benchmark call reaches, so each call pays
# for every check (models, offered tools, steps, repeats, rate windows, run USD and token budgets, the
# agent's hourly cap, the look-up of a held answer an approval rule makes every call of its runs pay) and
# none is refused or held.
GOVERNED_POLICY: dict[str, Any] = {
    "name": "bench-governed",
    "budget": {"hard_limit_usd": "1000000", "hard_limit_tokens": 10**12, "agent_hourly_usd": "1000000"},
    "models": {"allowed": ["mock-*", "openai/gpt-4o-mini"], "blocked": ["gpt-4o"]},
    "tools": {"blocked": ["shell_exec", "delete_*"]},
    "runaway": {"max_steps": 10**9, "max_repeats": 1000},  # each of the 1000 bodies recurs ~40 times per run
    "rate_limits": {"agent": {"requests_per_minute": 10**9, "tokens_per_minute": 10**12},
                    "run": {"requests_per_minute": 10**9, "tokens_per_minute": 10**12}},
    "approvals": [{"name": "bench-gate", "tool": "wire_money",
                   "when": [{"path": "$.amount_usd", "op": "gt", "value": 500}]}],
}

UPSTREAM = web.AppKey("UPSTREAM", str)
UPSTREAM_HTTP = web.AppKey("UPSTREAM_HTTP", aiohttp.ClientSession)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "server",
               "date"}


# --- the bare pass-through proxy ------------------------------------------------------------------------


async def _passthrough(request: web.Request) -> web.StreamResponse:
    """Forward the body to the mock and relay the answer: whole for JSON, chunk by chunk for SSE."""
    body = await request.read()
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json"),
               "Authorization": request.headers.get("Authorization", "")}
    async with request.app[UPSTREAM_HTTP].post(request.app[UPSTREAM] + CHAT_PATH, data=body,
                                               headers=headers) as upstream:
        relayed = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
        if upstream.content_type != "text/event-stream":
            return web.Response(status=upstream.status, body=await upstream.read(), headers=relayed)
        response = web.StreamResponse(status=upstream.status, headers=relayed)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def create_passthrough_app(upstream_root: str) -> web.Application:
    """A minimal aiohttp proxy: the same HTTP work as Rungate minus auth, metering and the event log."""
    app = web.Application()
    app[UPSTREAM] = upstream_root

    async def session(app: web.Application) -> AsyncIterator[None]:
        app[UPSTREAM_HTTP] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[UPSTREAM_HTTP].close()

    app.cleanup_ctx.append(session)
    app.router.add_post(CHAT_PATH, _passthrough)
    return app


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    """Start `app` on an ephemeral loopback port; returns the runner and the root URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, 0).start()
    port = runner.addresses[0][1]
    return runner, f"http://{HOST}:{port}"


# --- the load generator ----------------------------------------------------------------------------------


@dataclass
class Result:
    target: str
    mode: str
    concurrency: int
    requests: int
    wall_s: float
    latencies_ms: list[float]
    errors: list[str] = field(default_factory=list)
    cpu_s: float = 0.0  # CPU time of the whole process (every thread: client, servers, SQLite writer)
    jobs_per_commit: float = math.nan  # Rungate only: commands (admissions, settlements) per group commit

    @property
    def cpu_ms_per_request(self) -> float:
        return self.cpu_s * 1000 / self.requests if self.requests else math.nan

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.wall_s if self.wall_s > 0 else 0.0

    def pct(self, q: float) -> float:
        """Nearest-rank percentile of the successful requests' latencies (ms)."""
        if not self.latencies_ms:
            return math.nan
        ordered = sorted(self.latencies_ms)
        return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    headers: dict[str, str]


def payloads(stream: bool, body_bytes: int = 0) -> list[bytes]:
    """Request bodies of equal size that differ in their text (`benchmark 0042`): an agent rarely sends the same
    body twice, and a policy's `max_repeats` counts identical bodies per run. With `body_bytes`, each also
    carries a system message of that many bytes of prose (an agent's instructions and context), and there are
    fewer of them (`PADDED_BODIES_BYTES` in all, at least 50)."""
    count = DISTINCT_BODIES if not body_bytes else max(50, min(DISTINCT_BODIES, PADDED_BODIES_BYTES // body_bytes))
    sentence = "Context: the agent reads this before it answers. "
    context = (sentence * (body_bytes // len(sentence) + 1))[:body_bytes]
    out = []
    for i in range(count):
        messages = [{"role": "user", "content": f"benchmark {i:04d}"}]
        if body_bytes:
            messages.insert(0, {"role": "system", "content": context})
        body: dict[str, Any] = {"model": "mock-gpt", "messages": messages}
        if stream:
            body["stream"] = True
        out.append(orjson.dumps(body))
    return out


async def one_request(client: aiohttp.ClientSession, target: Target, body: bytes, stream: bool) -> str | None:
    """Send one call and read the whole answer; None when it was a complete 200, else what went wrong."""
    async with client.post(target.url, data=body, headers=target.headers) as response:
        if stream:
            data: bytes | bytearray = bytearray()
            async for chunk in response.content.iter_any():
                data += chunk
            # Rungate may add its `event: rungate` trailer around `[DONE]`; what an SDK needs is `[DONE]` itself.
            if response.status == 200 and b"data: [DONE]" not in data:
                return f"stream has no data: [DONE] (last bytes {bytes(data[-60:])!r})"
        else:
            data = await response.read()
        if response.status != 200:
            return f"HTTP {response.status}: {data[:200].decode(errors='replace')}"
    return None


async def run_load(client: aiohttp.ClientSession, target: Target, mode: str, concurrency: int,
                   requests: int, body_bytes: int = 0) -> Result:
    """`requests` calls from `concurrency` workers pulling from one shared counter."""
    stream = mode == "stream"
    bodies = payloads(stream, body_bytes)
    latencies: list[float] = []
    errors: list[str] = []
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            body = bodies[remaining % len(bodies)]
            start = time.perf_counter()
            try:
                problem = await one_request(client, target, body, stream)
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if problem is None:
                latencies.append((time.perf_counter() - start) * 1000)
            else:
                errors.append(problem)

    gc.collect()
    cpu_started, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return Result(target.name, mode, concurrency, requests, wall, latencies, errors, cpu)


# --- orchestration and report -------------------------------------------------------------------------


Cells = dict[tuple[str, str, int], list[Result]]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=None,
                        help=f"requests per (target, mode, concurrency) cell and round (default {DEFAULT_REQUESTS}, "
                             f"--quick {QUICK_REQUESTS})")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated worker counts (default 1,16,64)")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"repeat every cell this often, targets interleaved; medians are reported "
                             f"(default {DEFAULT_ROUNDS}, --quick 1)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_REQUESTS} requests per cell, one round")
    parser.add_argument("--durability", choices=("full", "normal"), default="full",
                        help="Rungate's RUNGATE_DURABILITY (default full: every commit fsynced)")
    parser.add_argument("--body-bytes", type=int, default=0, metavar="N",
                        help="add a system message of N bytes to every request (default 0: bodies of about 100"
                             " bytes), to see what a proxy spends per byte of a prompt")
    parser.add_argument("--governed", action="store_true",
                        help="bind the bench agent to a policy with every enforced rule kind active (limits set"
                             " high enough that no call is refused)")
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = QUICK_REQUESTS if args.quick else DEFAULT_REQUESTS
    if args.rounds is None:
        args.rounds = 1 if args.quick else DEFAULT_ROUNDS
    if args.requests < 1 or args.rounds < 1:
        parser.error("--requests and --rounds must be at least 1")
    if args.body_bytes < 0:
        parser.error("--body-bytes must not be negative")
    try:
        args.levels = [int(part) for part in args.concurrency.split(",") if part.strip()]
    except ValueError:
        parser.error("--concurrency must be comma-separated integers")
    if not args.levels or min(args.levels) < 1:
        parser.error("--concurrency levels must be positive integers")
    return args


def rungate_settings(db_dir: Path, mock_root: str, durability: str) -> Settings:
    return load_settings(env={
        "RUNGATE_DATABASE_URL": f"sqlite:///{db_dir / 'bench.db'}",
        "RUNGATE_OPENAI_BASE_URL": f"{mock_root}/v1",
        "OPENAI_API_KEY": "sk-bench-key-000000",
        "RUNGATE_DURABILITY": durability,
        "RUNGATE_HOST": HOST,
    })


def route_logs(path: Path) -> TextIO:
    """Keep Rungate's per-call info logs (their cost is real) but write them to a file, not the terminal."""
    configure_logging("json", "info")
    handle = path.open("w", encoding="utf-8")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=handle))
    return handle


def drain_mock_log(mock_app: web.Application) -> int:
    """Empty the mock's request log (a test aid that would otherwise grow the heap all run); returns its length."""
    served = len(mock_app[MOCK_REQUESTS])
    mock_app[MOCK_REQUESTS].clear()
    return served


async def writer_synchronous(store: Any) -> str:
    """`PRAGMA synchronous` as seen by the store's writer connection (2 = FULL, 1 = NORMAL)."""
    conn = getattr(store, "_conn", None)
    if conn is None:
        return f"unknown (store durability setting: {getattr(store, 'durability', '?')})"
    value = await asyncio.get_running_loop().run_in_executor(
        None, lambda: conn.execute("PRAGMA synchronous").fetchone()[0])
    return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(int(value), str(value))


def write_stats(store: Any) -> tuple[int, int]:
    """(commits, jobs) the store's writer has committed so far; (0, 0) for a store that does not count."""
    stats = store.write_stats() if hasattr(store, "write_stats") else None
    return (stats.commits, stats.jobs) if stats is not None else (0, 0)


def jobs_per_commit(before: tuple[int, int], after: tuple[int, int]) -> float:
    commits, jobs = after[0] - before[0], after[1] - before[1]
    return jobs / commits if commits else math.nan


def pooled(rounds: list[Result], q: float) -> float:
    """Percentile `q` over the latencies of every round of one cell."""
    merged = Result(rounds[0].target, rounds[0].mode, rounds[0].concurrency, 0, 0.0,
                    [ms for r in rounds for ms in r.latencies_ms])
    return merged.pct(q)


def print_report(cells: Cells, levels: list[int], n_rounds: int) -> None:
    print()
    print(f"Per target (req/s: median of {n_rounds} round(s), min-max in brackets; p50/p99 over all rounds' requests)")
    print(f"{'target':<12} {'mode':<10} {'conc':>4} {'ok':>6} {'err':>4} {'req/s':>8} {'(min-max)':>14} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'CPU ms/req':>10} {'jobs/commit':>11}")
    print("-" * 105)
    for mode in MODES:
        for level in levels:
            for name in TARGETS:
                rounds = cells[(name, mode, level)]
                rps = [r.rps for r in rounds]
                ok = sum(len(r.latencies_ms) for r in rounds)
                err = sum(len(r.errors) for r in rounds)
                spread = f"({min(rps):.0f}-{max(rps):.0f})"
                print(f"{name:<12} {mode:<10} {level:>4} {ok:>6} {err:>4} {statistics.median(rps):>8.1f} "
                      f"{spread:>14} {fmt_ms(pooled(rounds, 50))} {fmt_ms(pooled(rounds, 99))} "
                      f"{statistics.median(r.cpu_ms_per_request for r in rounds):>10.2f}"
                      f"{fmt_jobs(statistics.median(r.jobs_per_commit for r in rounds)):>12}")
    print()
    print("Rungate vs bare pass-through -- the ratios that matter")
    print("(thr ratio: median over rounds of Rungate req/s / pass-through req/s, each round's pair taken seconds")
    print(" apart; +p50/+p99: Rungate latency minus pass-through latency; CPU ratio: process CPU per request,")
    print(" Rungate / pass-through; last column: pass-through / direct throughput, the cost of any aiohttp hop)")
    print(f"{'mode':<10} {'conc':>4} {'thr ratio':>10} {'(min-max)':>13} {'+p50 ms':>9} {'+p99 ms':>9} "
          f"{'CPU ratio':>10} {'pass/direct':>12}")
    print("-" * 84)
    for mode in MODES:
        for level in levels:
            dr, pt, rg = (cells[(name, mode, level)] for name in TARGETS)
            ratios = [g.rps / p.rps if p.rps else math.nan for g, p in zip(rg, pt, strict=True)]
            floors = [p.rps / d.rps if d.rps else math.nan for p, d in zip(pt, dr, strict=True)]
            cpu = [g.cpu_ms_per_request / p.cpu_ms_per_request if p.cpu_s else math.nan
                   for g, p in zip(rg, pt, strict=True)]
            spread = f"({min(ratios):.2f}-{max(ratios):.2f})"
            print(f"{mode:<10} {level:>4} {statistics.median(ratios):>10.2f} {spread:>13} "
                  f"{pooled(rg, 50) - pooled(pt, 50):>+9.2f} {pooled(rg, 99) - pooled(pt, 99):>+9.2f} "
                  f"{statistics.median(cpu):>10.2f} {statistics.median(floors):>12.2f}")


def fmt_jobs(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.1f}"


def fmt_ms(value: float) -> str:
    return "     n/a" if math.isnan(value) else f"{value:8.2f}"


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="rungate-bench-") as tmp:
        tmpdir = Path(tmp)
        log_handle = route_logs(tmpdir / "rungate.log")
        runners: list[web.AppRunner] = []
        try:
            return await _bench(args, tmpdir, runners)
        finally:
            for runner in reversed(runners):
                await runner.cleanup()
            log_handle.close()


async def _bench(args: argparse.Namespace, tmpdir: Path, runners: list[web.AppRunner]) -> int:
    mock_app = create_mock_app()
    mock_runner, mock_root = await serve(mock_app)
    runners.append(mock_runner)
    pass_runner, pass_root = await serve(create_passthrough_app(mock_root))
    runners.append(pass_runner)
    settings = rungate_settings(tmpdir, mock_root, args.durability)
    rungate_app = create_app(settings)
    rg_runner, rg_root = await serve(rungate_app)  # setup() runs cleanup_ctx: the store is started here
    runners.append(rg_runner)
    store = rungate_app[STORE]
    if args.governed:
        await apply_policy(store, GOVERNED_POLICY)
    _, token = await create_agent(store, "bench", policy=GOVERNED_POLICY["name"] if args.governed else None)

    json_type = {"Content-Type": "application/json"}
    targets = [
        Target("direct", mock_root + CHAT_PATH, {**json_type, "Authorization": "Bearer sk-bench-key-000000"}),
        Target("passthrough", pass_root + CHAT_PATH, {**json_type, "Authorization": "Bearer sk-bench-key-000000"}),
        Target("rungate", rg_root + CHAT_PATH, {**json_type, "Authorization": f"Bearer {token}"}),
    ]
    print(f"python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, {os.cpu_count()} CPUs; "
          f"one process, one event loop for the client and all 3 servers; loopback only")
    print(f"{args.requests} requests per cell and round, {args.rounds} round(s), concurrency "
          f"{','.join(map(str, args.levels))}, modes {'/'.join(MODES)}; warm-up {WARMUP_REQUESTS} per target; "
          f"request bodies of {len(payloads(False, args.body_bytes)[0])} bytes")
    print(f"Rungate: {settings.database_url} (RUNGATE_DURABILITY={settings.durability}, "
          f"writer connection PRAGMA synchronous={await writer_synchronous(store)})"
          + (f"; governed by policy {GOVERNED_POLICY['name']}: {GOVERNED_POLICY}" if args.governed else ""))

    cells: Cells = {}
    served = 0
    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as client:
        for target in targets:  # warm-up: connections, code paths, the agent's auto-run
            warm = [await run_load(client, target, mode, 4, WARMUP_REQUESTS // 2, args.body_bytes)
                    for mode in MODES]
            served += drain_mock_log(mock_app)
            if any(w.errors for w in warm):
                print(f"warm-up errors against {target.name}: {[e for w in warm for e in w.errors][:3]}")
        for mode in MODES:
            for level in args.levels:
                for round_no in range(args.rounds):
                    # All targets back to back, the order rotated each round, so no target always goes first.
                    shift = round_no % len(targets)
                    for target in targets[shift:] + targets[:shift]:
                        before = write_stats(store)
                        result = await run_load(client, target, mode, level, args.requests, args.body_bytes)
                        if target.name == "rungate":
                            result.jobs_per_commit = jobs_per_commit(before, write_stats(store))
                        served += drain_mock_log(mock_app)
                        cells.setdefault((target.name, mode, level), []).append(result)
                line = "  ".join(f"{name} {statistics.median(r.rps for r in cells[(name, mode, level)]):7.1f}"
                                 for name in TARGETS)
                print(f"  {mode:<10} c={level:<3} req/s: {line}", flush=True)
    elapsed = time.perf_counter() - started

    print_report(cells, args.levels, args.rounds)
    failed = [(r, e) for rounds in cells.values() for r in rounds for e in r.errors]
    measured = sum(r.requests for rounds in cells.values() for r in rounds)
    print()
    if failed:
        print(f"ERRORS: {len(failed)} of {measured} measured requests failed; first {MAX_ERRORS_SHOWN}:")
        for r, e in failed[:MAX_ERRORS_SHOWN]:
            print(f"  {r.target} {r.mode} c={r.concurrency}: {e}")
    else:
        print(f"errors: none (all {measured} measured requests were complete 200s)")
    events = await store.fetchone("SELECT count(*) AS n FROM events")
    steps = await store.fetchone("SELECT count(*) AS n FROM steps")
    report = await store.verify()
    print(f"Rungate event log after the run: {events['n'] if events else '?'} events "
          f"({steps['n'] if steps else '?'} steps); writer synchronous={await writer_synchronous(store)}; "
          f"verify: {'ok' if report.ok else 'BROKEN'} ({report.events} events checked)")
    if not report.ok:
        print(f"  hash chain broken at position {report.broken_at}: {report.reason}")
    print(f"mock provider served {served + drain_mock_log(mock_app)} requests; measured phase {elapsed:.1f} s")
    return 1 if failed or not report.ok else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main(parse_args())))
