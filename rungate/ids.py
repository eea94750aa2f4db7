"""Identifiers: time-ordered ids with a type prefix, and secret tokens.

`new_id("run")` → `run_01JD…`: 48 bits of milliseconds then 80 random bits in Crockford base32, so ids
sort by creation time and never collide in practice. Tokens carry 256 random bits.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# RFC 4648 base32 digits → Crockford digits of the same value (Crockford's are in ASCII order, so ids sort).
_TO_CROCKFORD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET)
# Client-chosen ids (run ids) are opaque but bounded: printable, no separators that break URLs or logs.
CLIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")


def new_id(prefix: str) -> str:
    """A fresh time-ordered id such as `stp_01JD3…` (26 base32 characters after the prefix)."""
    value = (time.time_ns() // 1_000_000 << 80) | int.from_bytes(os.urandom(10), "big")
    # 16 bytes → 26 base32 digits (+ padding, dropped); big-endian, so the text sorts like the number.
    encoded = base64.b32encode(value.to_bytes(16, "big")).decode()[:26]
    return f"{prefix}_{encoded.translate(_TO_CROCKFORD)}"


def new_token(prefix: str) -> str:
    """A secret bearer token such as `rg_agt_…`, shown once and stored only as its SHA-256."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def token_hash(token: str) -> str:
    """The SHA-256 hex digest under which a token is stored and looked up."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def is_valid_client_id(value: str) -> bool:
    """Whether a client-chosen id (run id) is acceptable."""
    return bool(CLIENT_ID_PATTERN.match(value))
