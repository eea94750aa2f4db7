"""Rungate overhead benchmark: direct-to-mock vs a bare aiohttp pass-through vs Rungate, in one process.

Three loopback servers share one event loop with the load generator:

* ``direct``       the deterministic mock provider (`rungate.providers.mock.create_mock_app`);
* ``passthrough``  a bare aiohttp proxy in front of the mock (one shared `ClientSession`, streams relayed
                   chunk by chunk): the floor any Python/aiohttp proxy pays;
* ``rungate``      `create_app(load_settings(...))` in front of the mock, SQLite event log, durability FULL.

Every (mode, concurrency) cell runs the three targets back to back, so the ratios compare figures taken
seconds apart on the same loop. See bench/README.md for how to read the output.

    python bench/run.py [--requests N] [--concurrency 1,16,64] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web

from rungate.admin import create_agent
from rungate.config import Settings, load_settings
from rungate.log import configure as configure_logging
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
MAX_ERRORS_SHOWN = 5
REQUEST_TIMEOUT_S = 60.0

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


def payload(stream: bool) -> bytes:
    body: dict[str, Any] = {"model": "mock-gpt", "messages": [{"role": "user", "content": "benchmark"}]}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


async def one_request(client: aiohttp.ClientSession, target: Target, body: bytes, stream: bool) -> str | None:
    """Send one call and read the whole answer; None when it was a complete 200, else what went wrong."""
    async with client.post(target.url, data=body, headers=target.headers) as response:
        if stream:
            data = bytearray()
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
                   requests: int) -> Result:
    """`requests` calls from `concurrency` workers pulling from one shared counter."""
    stream = mode == "stream"
    body = payload(stream)
    latencies: list[float] = []
    errors: list[str] = []
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
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
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
    wall = time.perf_counter() - started
    return Result(target.name, mode, concurrency, requests, wall, latencies, errors)


# --- orchestration and report -------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=None,
                        help=f"requests per (target, mode, concurrency) cell (default {DEFAULT_REQUESTS}, "
                             f"--quick {QUICK_REQUESTS})")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated worker counts (default 1,16,64)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_REQUESTS} requests per cell")
    parser.add_argument("--durability", choices=("full", "normal"), default="full",
                        help="Rungate's RUNGATE_DURABILITY (default full: every commit fsynced)")
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = QUICK_REQUESTS if args.quick else DEFAULT_REQUESTS
    if args.requests < 1:
        parser.error("--requests must be at least 1")
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


def route_logs(path: Path) -> Any:
    """Keep Rungate's per-call info logs (their cost is real) but write them to a file, not the terminal."""
    configure_logging("json", "info")
    handle = path.open("w", encoding="utf-8")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=handle))
    return handle


async def writer_synchronous(store: Any) -> str:
    """`PRAGMA synchronous` as seen by the store's writer connection (2 = FULL, 1 = NORMAL)."""
    conn = getattr(store, "_conn", None)
    if conn is None:
        return f"unknown (store durability setting: {getattr(store, 'durability', '?')})"
    value = await asyncio.get_running_loop().run_in_executor(
        None, lambda: conn.execute("PRAGMA synchronous").fetchone()[0])
    return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(int(value), str(value))


def fmt_ms(value: float) -> str:
    return "   n/a" if math.isnan(value) else f"{value:8.2f}"


def print_report(results: list[Result], levels: list[int]) -> None:
    print()
    print(f"{'target':<12} {'mode':<10} {'conc':>4} {'ok':>5} {'err':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    print("-" * 66)
    for r in results:
        print(f"{r.target:<12} {r.mode:<10} {r.concurrency:>4} {len(r.latencies_ms):>5} {len(r.errors):>4} "
              f"{r.rps:>9.1f} {fmt_ms(r.pct(50))} {fmt_ms(r.pct(99))}")
    cell = {(r.target, r.mode, r.concurrency): r for r in results}
    print()
    print("Rungate vs bare pass-through (the ratios that matter):")
    print(f"{'mode':<10} {'conc':>4} {'thr ratio':>10} {'+p50 ms':>9} {'+p99 ms':>9}   "
          f"{'(pass/direct thr)':>17}")
    print("-" * 66)
    for mode in MODES:
        for level in levels:
            dr, pt, rg = (cell[(t, mode, level)] for t in TARGETS)
            ratio = rg.rps / pt.rps if pt.rps else math.nan
            floor = pt.rps / dr.rps if dr.rps else math.nan
            print(f"{mode:<10} {level:>4} {ratio:>10.2f} {rg.pct(50) - pt.pct(50):>+9.2f} "
                  f"{rg.pct(99) - pt.pct(99):>+9.2f}   {floor:>17.2f}")


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
    _, token = await create_agent(store, "bench")

    auth = {"Content-Type": "application/json"}
    targets = [
        Target("direct", mock_root + CHAT_PATH, {**auth, "Authorization": "Bearer sk-bench-key-000000"}),
        Target("passthrough", pass_root + CHAT_PATH, {**auth, "Authorization": "Bearer sk-bench-key-000000"}),
        Target("rungate", rg_root + CHAT_PATH, {**auth, "Authorization": f"Bearer {token}"}),
    ]
    print(f"python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, {os.cpu_count()} CPUs, "
          f"one process / one event loop (client + 3 servers)")
    print(f"requests per cell: {args.requests}; concurrency: {','.join(map(str, args.levels))}; "
          f"warm-up: {WARMUP_REQUESTS} per target")
    print(f"Rungate: {settings.database_url} (durability={settings.durability}, "
          f"writer PRAGMA synchronous={await writer_synchronous(store)})")

    results: list[Result] = []
    total_started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as client:
        for target in targets:  # warm-up: connections, code paths, the agent's auto-run
            warm = [await run_load(client, target, mode, 4, WARMUP_REQUESTS // 2) for mode in MODES]
            if any(w.errors for w in warm):
                print(f"warm-up errors against {target.name}: {[e for w in warm for e in w.errors][:3]}")
        # Targets run back to back inside each cell, so a ratio compares runs seconds apart.
        for mode in MODES:
            for level in args.levels:
                for target in targets:
                    result = await run_load(client, target, mode, level, args.requests)
                    results.append(result)
                    print(f"  {target.name:<12} {mode:<10} c={level:<3} {result.rps:8.1f} req/s"
                          f"  p50 {result.pct(50):7.2f} ms  p99 {result.pct(99):7.2f} ms"
                          f"  errors {len(result.errors)}", flush=True)
    total = time.perf_counter() - total_started

    print_report(results, args.levels)
    errors = [(r, e) for r in results for e in r.errors]
    print()
    if errors:
        print(f"ERRORS: {len(errors)} failed requests")
        for r, e in errors[:MAX_ERRORS_SHOWN]:
            print(f"  {r.target} {r.mode} c={r.concurrency}: {e}")
    else:
        print(f"errors: none (all {sum(len(r.latencies_ms) for r in results)} measured requests were complete 200s)")
    events = await store.fetchone("SELECT count(*) AS n FROM events")
    steps = await store.fetchone("SELECT count(*) AS n FROM steps")
    report = await store.verify()
    print(f"Rungate event log: {events['n'] if events else '?'} events, {steps['n'] if steps else '?'} steps; "
          f"synchronous={await writer_synchronous(store)}; "
          f"verify: {'ok' if report.ok else 'BROKEN'} ({report.events} events checked)")
    if not report.ok:
        print(f"  chain broken: {report}")
    print(f"mock provider served {len(mock_app[MOCK_REQUESTS])} requests; measured phase took {total:.1f} s")
    return 1 if errors or not report.ok else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main(parse_args())))
