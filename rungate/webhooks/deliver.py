"""The deliverer: a background task of the server that sends webhook events, driven from the event log.

Nothing on the request path knows webhooks exist. For each enabled webhook a worker reads the log in
position order from the webhook's cursor (`store.read_all`), turns the events it wants into envelopes and
sends each one as its own task: at least once, retried with exponential backoff and jitter (the base,
doubled per attempt, at most 60 s) on connection errors, timeouts and any non-2xx answer, until it is
delivered or the dead-letter horizon (8.5 minutes after the first attempt) has passed. Each final outcome
is an event (`WebhookDelivered` / `WebhookDeadLettered`) carrying the webhook's new cursor — the low-water
mark below every delivery still in flight — so a restart resumes where the last one stopped: nothing is
lost, and only deliveries in flight at the stop are sent again (receivers dedupe on `X-Rungate-Delivery`).

Deliveries of one webhook start in position order; at most `MAX_IN_FLIGHT` are in flight per webhook, so a
receiver that keeps failing holds back only its own webhook, and only once that many are retrying. The
deliverer has its own HTTP session (short timeouts, bounded connections, no redirects, no proxy from the
environment, an address-checking resolver) and outlives database errors and its own bugs: they are logged
(never a secret, never a URL's path) and retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from rungate import __version__
from rungate.clock import now_iso
from rungate.config import Settings
from rungate.crypto import Keyring
from rungate.errors import BadRequest
from rungate.events import Recorded
from rungate.events.catalogue import WebhookDeadLettered, WebhookDelivered
from rungate.ids import new_id
from rungate.log import get_logger
from rungate.store import EventStore, Row
from rungate.webhooks.admin import AdvanceCursor, RecordDelivery
from rungate.webhooks.envelope import TEST_EVENT, envelope, signature, wants, webhook_event
from rungate.webhooks.urls import GuardedResolver, check_webhook_url
from rungate.webhooks.views import delivered_positions

log = get_logger("rungate.webhooks")

MAX_IN_FLIGHT = 16  # deliveries of one webhook at once; its cursor waits for the oldest
MAX_SENDS = 64  # HTTP requests at once, every webhook together
READ_BATCH = 256
POLL_S = 0.25  # how often the log and the webhooks table are read when there is nothing new
CHECKPOINT_EVERY = 1000  # events a webhook does not want before its cursor is moved past them anyway
MAX_BACKOFF_S = 60.0
CONNECT_TIMEOUT_S = 5.0
TOTAL_TIMEOUT_S = 10.0
MAX_ERROR_CHARS = 300


def backoff_s(failures: int, base_s: float) -> float:
    """The wait after the `failures`-th failed attempt: base·2^(failures-1), at most 60 s, less up to a
    quarter at random (so receivers that fail together are not retried together)."""
    return min(MAX_BACKOFF_S, base_s * 2.0 ** min(failures - 1, 30)) * random.uniform(0.75, 1.0)


@dataclass(frozen=True)
class Attempt:
    """One POST: the receiver's status (None when none came) and, unless it was a 2xx, what went wrong."""

    status_code: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Hook:
    """What a worker needs of its webhook, refreshed from the projection; secrets in clear, kept out of reprs."""

    webhook_id: str
    url: str
    events: list[str]
    enabled_at: int
    ciphertexts: tuple[str | None, str | None]
    secret: str = field(repr=False)
    previous: str | None = field(default=None, repr=False)
    previous_until: str | None = None

    def signatures(self, timestamp: str, body: bytes, now: str) -> list[str]:
        """The current secret's signature, then the previous one's while the rotation's grace lasts."""
        out = [signature(self.secret, timestamp, body)]
        if self.previous is not None and self.previous_until is not None and now < self.previous_until:
            out.append(signature(self.previous, timestamp, body))
        return out


def _describe(exc: BaseException) -> str:
    """A failed attempt in a few words: no URL (its path or query may be a secret of the receiver's)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection failed: {exc.os_error}"[:MAX_ERROR_CHARS]
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the receiver closed the connection"
    return type(exc).__name__


class Deliverer:
    """Owns the webhook workers and their HTTP session; `start` with the app, `stop` before the store closes."""

    def __init__(self, settings: Settings, store: EventStore, keyring: Keyring, *, poll_s: float = POLL_S) -> None:
        self.store = store
        self.keyring = keyring
        self.allow_private = settings.webhook_allow_private
        self.dead_letter_s = settings.webhook_dead_letter_s
        self.retry_base_s = settings.webhook_retry_base_s
        self.poll_s = poll_s
        self._workers: dict[str, _Worker] = {}
        self._unreadable: set[str] = set()
        self._http: aiohttp.ClientSession | None = None
        self._sends = asyncio.Semaphore(MAX_SENDS)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        resolver = None if self.allow_private else GuardedResolver()
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=MAX_SENDS, resolver=resolver),
            timeout=aiohttp.ClientTimeout(total=TOTAL_TIMEOUT_S, connect=CONNECT_TIMEOUT_S,
                                          sock_connect=CONNECT_TIMEOUT_S),
            trust_env=False, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())  # deliveries are stateless
        self._task = asyncio.create_task(self._supervise(), name="rungate-webhooks")

    async def stop(self) -> None:
        """Cancel everything in flight (it is sent again after the next start) and close the session."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        workers, self._workers = list(self._workers.values()), {}
        await asyncio.gather(*(worker.stop() for worker in workers))
        if self._http is not None:
            await self._http.close()
            self._http = None

    # --- which webhooks run ---------------------------------------------------------------------------

    async def _supervise(self) -> None:
        while True:
            try:
                await self._sync(await self.store.fetch("SELECT * FROM webhooks"))
            except Exception as exc:  # the deliverer must outlive a transient database error (or a bug)
                log.warning("webhook_supervisor_failed", error=str(exc)[:MAX_ERROR_CHARS])
            await asyncio.sleep(self.poll_s)

    async def _sync(self, rows: list[Row]) -> None:
        """Start a worker per enabled webhook, refresh the running ones, stop the others.

        A webhook re-enabled since its worker started gets a new worker, from the cursor the projection
        moved to the re-enabling event.
        """
        enabled = {row["id"]: row for row in rows if row["enabled"]}
        for webhook_id, worker in list(self._workers.items()):
            row = enabled.get(webhook_id)
            if row is None or row["enabled_at"] != worker.hook.enabled_at or worker.task.done():
                del self._workers[webhook_id]
                await worker.stop()
        for webhook_id, row in enabled.items():
            running = self._workers.get(webhook_id)
            hook = self.hook(row, running.hook if running is not None else None)
            if hook is None:
                continue
            if running is not None:
                running.hook = hook
                continue
            done = await delivered_positions(self.store, webhook_id, row["cursor_position"])
            self._workers[webhook_id] = _Worker(self, hook, row["cursor_position"], done)

    def hook(self, row: Row, current: Hook | None = None) -> Hook | None:
        """The webhook's `Hook` (secrets decrypted only when they changed); None when they do not decrypt."""
        ciphertexts = (row["secret_ciphertext"], row["previous_ciphertext"])
        if current is not None and current.ciphertexts == ciphertexts:
            secret, previous = current.secret, current.previous
        else:
            try:
                secret = self.keyring.decrypt(row["id"], row["secret_nonce"], row["secret_ciphertext"])
                previous = (None if row["previous_ciphertext"] is None else
                            self.keyring.decrypt(row["id"], row["previous_nonce"], row["previous_ciphertext"]))
            except Exception:
                if row["id"] not in self._unreadable:  # fail closed: nothing is sent unsigned
                    self._unreadable.add(row["id"])
                    log.error("webhook_secret_unreadable", webhook_id=row["id"],
                              reason="the secret does not decrypt under the configured master key")
                return None
        return Hook(row["id"], row["url"], _events(row["events"]), row["enabled_at"], ciphertexts, secret,
                    previous, row["previous_valid_until"])

    # --- sending --------------------------------------------------------------------------------------

    async def attempt(self, hook: Hook, name: str, delivery_id: str, data: dict[str, Any]) -> Attempt:
        """POST one envelope, signed; the URL is checked again first (DNS may have changed)."""
        http = self._http
        if http is None:
            return Attempt(None, "the deliverer is not running")
        delivered_at = now_iso()
        body = envelope(name, delivered_at, data)
        timestamp = str(int(time.time()))
        headers: CIMultiDict[str] = CIMultiDict({
            "Content-Type": "application/json", "User-Agent": f"Rungate-Webhooks/{__version__}",
            "X-Rungate-Event": name, "X-Rungate-Delivery": delivery_id, "X-Rungate-Timestamp": timestamp})
        for value in hook.signatures(timestamp, body, delivered_at):
            headers.add("X-Rungate-Signature", value)
        try:
            url = await check_webhook_url(hook.url, allow_private=self.allow_private)
        except BadRequest as exc:
            return Attempt(None, f"refused: {exc.message}"[:MAX_ERROR_CHARS])
        async with self._sends:
            try:
                async with http.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                return Attempt(None, _describe(exc))
        return Attempt(status, None if 200 <= status < 300 else f"HTTP {status}")

    async def send_test(self, row: Row) -> dict[str, Any]:
        """Send one `webhook.test` envelope now (no retry) and say how it went."""
        hook = self.hook(row)
        started = time.monotonic()
        if hook is None:
            result = Attempt(None, "the webhook's secret does not decrypt under the configured master key")
        else:
            result = await self.attempt(hook, TEST_EVENT, f"test_{secrets.token_hex(16)}", {
                "webhook_id": hook.webhook_id, "message": "A test delivery from Rungate."})
        return {"delivered": result.ok, "status_code": result.status_code, "error": result.error,
                "duration_ms": int((time.monotonic() - started) * 1000)}


def _events(text: str) -> list[str]:
    value = orjson.loads(text)
    return [str(name) for name in value] if isinstance(value, list) else []


class _Worker:
    """One webhook: reads the log from its cursor and sends what it wants, `MAX_IN_FLIGHT` at most at once."""

    def __init__(self, deliverer: Deliverer, hook: Hook, cursor: int, done: set[int]) -> None:
        self.deliverer = deliverer
        self.hook = hook
        self.scanned = cursor  # every event up to here is delivered, in `pending`, done, or not wanted
        self.persisted = cursor  # the cursor known to be recorded
        self.done = done  # positions past the cursor whose outcome is already recorded (after a restart)
        self.pending: dict[int, asyncio.Task[None]] = {}
        self.window = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.task = asyncio.create_task(self._run(), name=f"rungate-webhook-{hook.webhook_id}")

    async def stop(self) -> None:
        tasks = [self.task, *self.pending.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                more = await self._scan()
            except Exception as exc:  # a database error (or a bug of ours): log, wait, read again
                log.warning("webhook_read_failed", webhook_id=self.hook.webhook_id, error=str(exc)[:MAX_ERROR_CHARS])
                more = False
            if not more:
                await asyncio.sleep(self.deliverer.poll_s)

    async def _scan(self) -> bool:
        """Start the deliveries of the next batch of the log; True when there may be more right away."""
        batch = await self.deliverer.store.read_all(self.scanned, READ_BATCH)
        for rec in batch:
            try:
                mapped = webhook_event(rec)
            except Exception:  # an event we cannot read is skipped, not retried forever
                log.exception("webhook_event_unreadable", webhook_id=self.hook.webhook_id, position=rec.position)
                mapped = None
            if mapped is not None and wants(self.hook.events, mapped[0]) and rec.position not in self.done:
                await self.window.acquire()
                self.pending[rec.position] = asyncio.create_task(self._deliver(rec, *mapped))
            self.scanned = rec.position
        if self.done:
            self.done = {position for position in self.done if position > self.scanned}
        await self._checkpoint()
        return len(batch) == READ_BATCH

    async def _checkpoint(self) -> None:
        """Move the recorded cursor past a long run of unwanted events, so a restart need not reread them."""
        if self.pending or self.scanned - self.persisted < CHECKPOINT_EVERY:
            return
        try:
            await self.deliverer.store.execute(AdvanceCursor(self.hook.webhook_id, self.scanned))
            self.persisted = self.scanned
        except Exception as exc:
            log.warning("webhook_checkpoint_failed", webhook_id=self.hook.webhook_id, error=str(exc)[:MAX_ERROR_CHARS])

    async def _deliver(self, rec: Recorded, name: str, data: dict[str, Any]) -> None:
        d = self.deliverer
        started, first_at, attempts = time.monotonic(), now_iso(), 0
        while True:
            attempts += 1
            last_at = now_iso()
            try:
                result = await d.attempt(self.hook, name, rec.event_id, data)
            except Exception as exc:  # a bug of ours: counted as a failed attempt, so the slot is never lost
                log.exception("webhook_attempt_crashed", webhook_id=self.hook.webhook_id, position=rec.position)
                result = Attempt(None, f"internal error ({type(exc).__name__})")
            if result.ok:
                break
            elapsed = time.monotonic() - started
            if elapsed >= d.dead_letter_s:
                log.warning("webhook_dead_lettered", webhook_id=self.hook.webhook_id, webhook_event=name,
                            position=rec.position, attempts=attempts, status_code=result.status_code,
                            error=result.error)
                break
            log.info("webhook_attempt_failed", webhook_id=self.hook.webhook_id, webhook_event=name,
                     position=rec.position, attempt=attempts, status_code=result.status_code, error=result.error)
            await asyncio.sleep(min(backoff_s(attempts, d.retry_base_s), d.dead_letter_s - elapsed))
        await self._record(rec, name, attempts, result, first_at, last_at)

    async def _record(self, rec: Recorded, name: str, attempts: int, result: Attempt, first_at: str,
                      last_at: str) -> None:
        """Record the outcome with the cursor it allows (retried until it is durable), then free the slot."""
        delay = 0.5
        fields: dict[str, Any] = {
            "webhook_id": self.hook.webhook_id, "delivery_id": new_id("whd"), "event_id": rec.event_id,
            "event_position": rec.position, "event": name, "attempts": attempts, "status_code": result.status_code,
            "first_attempt_at": first_at, "last_attempt_at": last_at}
        while True:
            others = [position for position in self.pending if position != rec.position]
            cursor = min(others) - 1 if others else self.scanned
            outcome = (WebhookDelivered(**fields, cursor=cursor) if result.ok
                       else WebhookDeadLettered(**fields, error=result.error, cursor=cursor))
            try:
                await self.deliverer.store.execute(
                    RecordDelivery(outcome), idempotency_key=f"webhook-delivery:{self.hook.webhook_id}:{rec.event_id}")
                break
            except Exception as exc:
                log.warning("webhook_record_failed", webhook_id=self.hook.webhook_id, position=rec.position,
                            error=str(exc)[:MAX_ERROR_CHARS])
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        self.persisted = max(self.persisted, cursor)
        del self.pending[rec.position]
        self.window.release()
        if not self.pending and self.persisted < self.scanned:
            # The last of deliveries that ended together: each recorded a cursor below the others, so the
            # recorded one lags what is done; move it up now rather than with the next event.
            try:
                await self.deliverer.store.execute(AdvanceCursor(self.hook.webhook_id, self.scanned))
                self.persisted = max(self.persisted, self.scanned)
            except Exception as exc:
                log.warning("webhook_checkpoint_failed", webhook_id=self.hook.webhook_id,
                            error=str(exc)[:MAX_ERROR_CHARS])


WEBHOOKS = web.AppKey("WEBHOOKS", Deliverer)
