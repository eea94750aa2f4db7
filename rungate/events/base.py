"""The event base class and the recorded-event envelope.

An event is an immutable fact named in the past tense. Its stored `type` is the class name and never
changes; a changed event gets a new `schema_version` and an upcaster, never new meaning for old rows.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import orjson
from pydantic import BaseModel, ConfigDict


class Event(BaseModel):
    """Base of every event; subclasses are frozen and refuse unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_version: ClassVar[int] = 1

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__

    def payload(self) -> dict[str, Any]:
        """The JSON-ready data stored in the log."""
        return self.model_dump(mode="json")


class NewEvent(NamedTuple):
    """An event about to be appended to `stream` (`category-id`, e.g. `run-run_1a21…`)."""

    stream: str
    event: Event


class Recorded(NamedTuple):
    """An event as stored: its global position, per-stream version and hash-chain link.

    (Named tuples, like `NewEvent`: immutable, and several are made per call on the hot path.)
    """

    position: int
    event_id: str
    stream: str
    version: int
    type: str
    schema_version: int
    data: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: str
    prev_hash: str
    hash: str

    def as_line(self) -> dict[str, Any]:
        """The NDJSON line of `/api/runs/{id}/events` and `rungate replay` (SPEC §7)."""
        return {
            "position": self.position,
            "stream": self.stream,
            "version": self.version,
            "type": self.type,
            "at": self.recorded_at,
            "data": self.data,
            "hash": self.hash,
        }


def canonical_json(value: Any) -> str:
    """The one JSON text form stored and hashed: orjson with sorted keys."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def stream_name(category: str, ident: str) -> str:
    """`stream_name("run", "run_1a21…")` → `run-run_1a21…`."""
    return f"{category}-{ident}"
