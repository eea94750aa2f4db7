"""A circuit breaker per upstream target, so a failing provider is skipped instead of hammered.

States, per target (provider, base URL, model):

- `closed`    calls go through; `threshold` consecutive failures open the circuit.
- `open`      calls skip the target (listed as `circuit_open` in a 502's attempts) for `cooldown_s`.
- `half_open` after the cooldown one call at a time is let through as a probe: success closes the
              circuit (the route's primary serves again), failure opens it for another cooldown.

Failures are what failover reacts to: connection errors, timeouts, 429, 5xx and 529. A 4xx about the
request itself says nothing about the target's health and is not counted. State lives in this process
(several processes each keep their own, which only changes how soon each notices).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from rungate.clock import isoformat, utcnow

__all__ = ["Breakers", "TargetKey"]

TargetKey = tuple[str, str, str]  # (provider, base URL, model)
MAX_TARGETS_TRACKED = 4096


@dataclass
class _Circuit:
    state: str = "closed"
    failures: int = 0  # consecutive
    opened_at: float | None = None
    probing: bool = False  # a half-open probe is in flight
    total_ok: int = 0
    total_failed: int = 0
    last_error: str | None = None
    last_change: str = field(default_factory=lambda: isoformat(utcnow()))


class Breakers:
    """The circuits of every target this process has called."""

    def __init__(self, threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._circuits: dict[TargetKey, _Circuit] = {}

    def _circuit(self, key: TargetKey) -> _Circuit:
        circuit = self._circuits.get(key)
        if circuit is None:
            if len(self._circuits) >= MAX_TARGETS_TRACKED:  # bounded: forget healthy circuits first
                for stale in [k for k, c in self._circuits.items() if c.state == "closed"]:
                    del self._circuits[stale]
            circuit = self._circuits[key] = _Circuit()
        return circuit

    def available(self, key: TargetKey) -> bool:
        """Whether `key` may be planned for (closed, or open past its cooldown; no side effect)."""
        circuit = self._circuits.get(key)
        if circuit is None or circuit.state == "closed":
            return True
        if circuit.state == "open":
            return circuit.opened_at is not None and self._clock() - circuit.opened_at >= self.cooldown_s
        return not circuit.probing

    def allow(self, key: TargetKey) -> bool:
        """Whether a call may go to `key` now (a half-open circuit lets one probe through at a time)."""
        circuit = self._circuits.get(key)
        if circuit is None or circuit.state == "closed":
            return True
        if circuit.state == "open":
            assert circuit.opened_at is not None
            if self._clock() - circuit.opened_at < self.cooldown_s:
                return False
            self._set(circuit, "half_open")
        if circuit.probing:
            return False
        circuit.probing = True
        return True

    def succeeded(self, key: TargetKey) -> None:
        circuit = self._circuit(key)
        circuit.total_ok += 1
        circuit.failures = 0
        circuit.probing = False
        if circuit.state != "closed":
            self._set(circuit, "closed")

    def failed(self, key: TargetKey, error: str) -> None:
        circuit = self._circuit(key)
        circuit.total_failed += 1
        circuit.failures += 1
        circuit.last_error = error
        circuit.probing = False
        if circuit.state == "half_open" or circuit.failures >= self.threshold:
            circuit.opened_at = self._clock()
            if circuit.state != "open":
                self._set(circuit, "open")

    def released(self, key: TargetKey) -> None:
        """A call let through ended without telling anything about the target (e.g. the client left)."""
        circuit = self._circuits.get(key)
        if circuit is not None:
            circuit.probing = False

    @staticmethod
    def _set(circuit: _Circuit, state: str) -> None:
        circuit.state = state
        circuit.last_change = isoformat(utcnow())

    def snapshot(self, known: Iterable[TargetKey] = ()) -> list[dict[str, Any]]:
        """Every tracked target's circuit, and each of `known` not called yet (closed), for
        `GET /api/providers/health`."""
        out = []
        now = self._clock()
        circuits = {key: _Circuit() for key in known}
        circuits.update(self._circuits)
        for (provider, base_url, model), c in sorted(circuits.items()):
            retry_in = None
            if c.state == "open" and c.opened_at is not None:
                retry_in = round(max(0.0, self.cooldown_s - (now - c.opened_at)), 3)
            out.append({"provider": provider, "base_url": base_url, "model": model, "state": c.state,
                        "consecutive_failures": c.failures, "succeeded": c.total_ok, "failed": c.total_failed,
                        "last_error": c.last_error, "changed_at": c.last_change, "retry_in_s": retry_in})
        return out
