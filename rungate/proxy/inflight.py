"""Calls in flight, by run: what the kill switch cuts (SPEC §4, `POST /api/runs/{id}/stop`).

The stop itself is an event (`RunStopped`), so every later admission refuses the run; this registry
reaches the calls already past admission in this process. Cutting a call closes its upstream connection:
a stream then ends with the format's error event and is charged the tokens already relayed, a plain call
answers 403 `run_force_stopped` and is charged its reservation (the provider may bill what it did).

A stop made through this process's API cuts its calls at once. One recorded by another process (the CLI's
`rungate runs stop` beside a running server, another server on the same database) reaches them through
`watch_stops`, which reads the log's new stops every `STOP_POLL_S`.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from rungate import queries
from rungate.log import get_logger
from rungate.store import EventStore

STOP_POLL_S = 0.25  # how often the log is read for stops recorded by other processes
log = get_logger("rungate.proxy")


class Stoppable(Protocol):
    run_id: str
    admitted_at: int  # the log position of the call's admission (0 until it is known)

    def stop(self) -> None: ...


class Inflight:
    """The calls of each run currently between admission and settlement."""

    def __init__(self) -> None:
        self._runs: dict[str, set[Stoppable]] = {}

    def add(self, call: Stoppable) -> None:
        self._runs.setdefault(call.run_id, set()).add(call)

    def discard(self, call: Stoppable) -> None:
        calls = self._runs.get(call.run_id)
        if calls is not None:
            calls.discard(call)
            if not calls:
                del self._runs[call.run_id]

    def stop(self, run_id: str, *, before: int | None = None) -> int:
        """Cut every call of `run_id` in flight, or (with `before`) those admitted before that log position:
        a stop reaches the calls admitted before it, not those a later resume let in. Returns how many."""
        calls = [call for call in self._runs.get(run_id, ()) if before is None or call.admitted_at < before]
        for call in calls:
            call.stop()
        return len(calls)


async def watch_stops(store: EventStore, inflight: Inflight, poll_s: float = STOP_POLL_S) -> None:
    """Cut the calls in flight here of runs stopped by any process, reading the log's new `RunStopped`
    events every `poll_s` (until cancelled). A stop this process already acted on changes nothing: a call
    is cut once."""
    seen = await queries.head_position(store)
    while True:
        await asyncio.sleep(poll_s)
        try:
            head = await queries.head_position(store)
            if head > seen:
                for run_id, position in await queries.stops_between(store, seen, head):
                    cut = inflight.stop(run_id, before=position)
                    if cut:
                        log.info("calls_cut", run_id=run_id, calls=cut, stop_position=position)
                seen = head
        except Exception as exc:  # the watch must outlive a transient database error (it reads again next time)
            log.warning("stop_watch_failed", error=str(exc))
