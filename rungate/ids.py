"""Identifiers: time-ordered ids with a type prefix, and secret tokens.

`new_id("run")` → `run_1a21…`: milliseconds then 60 random bits in hex, so ids sort by creation time and do
not collide in practice. Ids name things; they are not secrets, so their random part comes from the fast
`random` generator (re-seeded after fork). Tokens, which are secrets, carry 256 bits from `secrets`.
"""

from __future__ import annotations

import hashlib
import random
import re
import secrets
import time

# Client-chosen ids (run ids) are opaque but bounded: printable, no separators that break URLs or logs.
CLIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")


def new_id(prefix: str) -> str:
    """A fresh time-ordered id such as `stp_1a21…` (26 lowercase hex digits after the prefix)."""
    # 44 bits of milliseconds (good until the year 2527) then 60 random bits: fixed width, so text order is time order.
    return f"{prefix}_{time.time_ns() // 1_000_000:011x}{random.getrandbits(60):015x}"


def new_event_id() -> str:
    """A fresh event id: 32 hex digits, milliseconds first.

    Time-ordered on purpose: each new id lands at the right edge of the event-id index, so a write batch
    touches one index page instead of one random page per event (half the WAL bytes per commit).
    """
    return f"{time.time_ns() // 1_000_000:012x}{random.getrandbits(80):020x}"


def new_token(prefix: str) -> str:
    """A secret bearer token such as `rg_agt_…`, shown once and stored only as its SHA-256."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def token_hash(token: str) -> str:
    """The SHA-256 hex digest under which a token is stored and looked up."""
    # A header's bytes that are not UTF-8 reach us as lone surrogates: hashed as they are, such a token simply
    # matches none (401), where a strict encode would fail the request with a 500.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def is_valid_client_id(value: str) -> bool:
    """Whether a client-chosen id (run id) is acceptable."""
    return bool(CLIENT_ID_PATTERN.match(value))
