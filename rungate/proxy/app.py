"""`create_app(settings)`: the whole HTTP service, resources owned by `cleanup_ctx`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from rungate import queries
from rungate.admin import open_keyring
from rungate.api.routes import routes as api_routes
from rungate.approvals import ExpireGate
from rungate.clock import iso_minus, now_iso
from rungate.config import Settings
from rungate.errors import ConfigError
from rungate.log import configure, get_logger
from rungate.prices import PriceTable
from rungate.providers.mock import create_mock_app
from rungate.proxy.breaker import Breakers
from rungate.proxy.inflight import Inflight, watch_stops
from rungate.proxy.keys import AGENTS, BREAKERS, HTTP, INFLIGHT, KEYRING, PRICES, SETTINGS, STORE, TARGETS
from rungate.proxy.middleware import add_request_id, error_middleware
from rungate.proxy.routes import routes as proxy_routes
from rungate.proxy.upstream import TargetResolver
from rungate.readcache import ReadCache
from rungate.runs import CloseIdleRun, SettleStep
from rungate.storage import open_store
from rungate.store import EventStore
from rungate.webhooks.deliver import WEBHOOKS, Deliverer

log = get_logger("rungate.app")
SWEEP_INTERVAL_S = 30.0
ORPHAN_GRACE_S = 60  # beyond the upstream silence timeout, before an open step counts as orphaned


def create_app(settings: Settings, store: EventStore | None = None) -> web.Application:
    """The Rungate application; the store is opened from `settings` unless one is given (tests)."""
    configure(settings.log_format, settings.log_level)
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[STORE] = store if store is not None else open_store(settings)
    app[PRICES] = PriceTable.load(settings.price_overrides)
    app.add_routes(proxy_routes)
    app.add_routes(api_routes)
    app.on_response_prepare.append(add_request_id)
    app.cleanup_ctx.append(_resources)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings, store = app[SETTINGS], app[STORE]
    await store.start()
    try:
        app[KEYRING] = await open_keyring(settings, store)
    except ConfigError:
        await store.close()
        raise
    mock_runner: web.AppRunner | None = None
    mock_url: str | None = None
    if settings.mock:
        mock_runner = web.AppRunner(create_mock_app(), access_log=None)
        await mock_runner.setup()
        site = web.TCPSite(mock_runner, "127.0.0.1", 0)
        await site.start()
        port = mock_runner.addresses[0][1]
        mock_url = f"http://127.0.0.1:{port}"
        log.info("mock_provider_started", url=mock_url)
    # No retries and no redirects inside the client: every upstream attempt is a decision of ours.
    # No total limit: a healthy stream may run for many minutes. Silence is what times out: no byte from the
    # provider for RUNGATE_UPSTREAM_TIMEOUT_S (before the answer or between chunks). No cookie jar: this one
    # session carries every agent's calls, so a cookie a provider set for one call must not ride on the next.
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), auto_decompress=True, cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=settings.upstream_timeout_s))
    app[HTTP] = session
    app[TARGETS] = TargetResolver(settings, store, app[KEYRING], mock_base_url=mock_url)
    app[AGENTS] = ReadCache(store, "agents", keep_missing=False)  # unknown tokens are not remembered
    app[INFLIGHT] = Inflight()
    app[BREAKERS] = Breakers(settings.breaker_threshold, settings.breaker_cooldown_s)
    sweeper = asyncio.create_task(_sweep_idle_runs(app), name="rungate-idle-sweeper")
    # The kill switch across processes: stops recorded elsewhere (the CLI, another server) cut calls here.
    stop_watch = asyncio.create_task(watch_stops(store, app[INFLIGHT]), name="rungate-stop-watch")
    # Webhooks are sent from the event log by their own task and HTTP session, never on the request path.
    app[WEBHOOKS] = Deliverer(settings, store, app[KEYRING])
    await app[WEBHOOKS].start()
    try:
        yield
    finally:
        await app[WEBHOOKS].stop()  # before the store closes: deliveries cut here are sent again next start
        for task in (sweeper, stop_watch):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await session.close()
        if mock_runner is not None:
            await mock_runner.cleanup()
        await store.close()


async def _sweep_idle_runs(app: web.Application) -> None:
    """Close auto-runs idle past the window, settle steps no process will settle any more, and record the
    expiry of approval gates nobody decided in time.

    A step still open long after the upstream could have answered belonged to a process that stopped (or
    a caller that vanished): it is settled as abandoned and charged its reservation.
    """
    settings, store = app[SETTINGS], app[STORE]
    while True:
        try:
            now = now_iso()
            for run_id in await queries.idle_auto_runs(store, now, settings.idle_timeout_s):
                await store.execute(CloseIdleRun(run_id, settings.idle_timeout_s))
            stale = iso_minus(now, settings.upstream_timeout_s + ORPHAN_GRACE_S)
            for step_id in await queries.open_steps_started_before(store, stale):
                await store.execute(SettleStep(step_id, budget_from_run=True))
            for gate_id in await queries.expired_gates(store, now):  # undecided in time: on_expiry applies
                await store.execute(ExpireGate(gate_id))
        except Exception as exc:  # the sweeper must outlive a transient database error
            log.warning("sweep_failed", error=str(exc))
        await asyncio.sleep(min(SWEEP_INTERVAL_S, settings.idle_timeout_s))
