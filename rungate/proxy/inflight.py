"""Calls in flight, by run: what the kill switch cuts (SPEC §4, `POST /api/runs/{id}/stop`).

The stop itself is an event (`RunStopped`), so every later admission refuses the run; this registry
reaches the calls already past admission in this process. Cutting a call closes its upstream connection:
a stream then ends with the format's error event and is charged the tokens already relayed, a plain call
answers 403 `run_force_stopped` and is charged its reservation (the provider may bill what it did).
"""

from __future__ import annotations

from typing import Protocol


class Stoppable(Protocol):
    run_id: str

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

    def stop(self, run_id: str) -> int:
        """Cut every call of `run_id` in flight; returns how many."""
        calls = list(self._runs.get(run_id, ()))
        for call in calls:
            call.stop()
        return len(calls)
