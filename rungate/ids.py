"""Identifiers: time-ordered ids with a type prefix, and secret tokens.

`new_id("run")` → `run_01JD…`: 48 bits of milliseconds then 82 random bits in Crockford base32, so ids
sort by creation time and never collide in practice. Tokens carry 256 random bits.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]  # every ten-bit value as two digits, in order
# Client-chosen ids (run ids) are opaque but bounded: printable, no separators that break URLs or logs.
CLIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")


def new_id(prefix: str) -> str:
    """A fresh time-ordered id such as `stp_01JD3…` (26 base32 characters after the prefix)."""
    value = (time.time_ns() // 1_000_000 << 82) | (int.from_bytes(os.urandom(11), "big") >> 6)
    digits = []
    for _ in range(13):  # ten bits (two digits) at a time, most significant last
        digits.append(_PAIRS[value & 1023])
        value >>= 10
    return f"{prefix}_{''.join(reversed(digits))}"


def new_token(prefix: str) -> str:
    """A secret bearer token such as `rg_agt_…`, shown once and stored only as its SHA-256."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def token_hash(token: str) -> str:
    """The SHA-256 hex digest under which a token is stored and looked up."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def is_valid_client_id(value: str) -> bool:
    """Whether a client-chosen id (run id) is acceptable."""
    return bool(CLIENT_ID_PATTERN.match(value))
