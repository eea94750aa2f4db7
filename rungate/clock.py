"""Wall-clock time in one format: ISO 8601 UTC with microseconds and a `Z` (sorts as text)."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta


def utcnow() -> datetime:
    return datetime.now(UTC)


def isoformat(moment: datetime) -> str:
    """`2026-11-27T05:09:06.123456Z`; every stored timestamp uses this exact shape."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_iso() -> str:
    return isoformat(utcnow())


# A write batch stamps every event with one `now` and its decisions derive the same few instants from it
# (an hour ago, the epoch second, the idle limit): cached, these cost a dict look-up instead of a parse.
@functools.lru_cache(maxsize=64)
def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@functools.lru_cache(maxsize=64)
def iso_minus(text: str, seconds: float) -> str:
    return isoformat(parse_iso(text) - timedelta(seconds=seconds))


def iso_plus(text: str, seconds: float) -> str:
    return isoformat(parse_iso(text) + timedelta(seconds=seconds))
