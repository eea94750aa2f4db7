"""The hash chain: each event's hash covers its predecessor's hash and every stored column.

`hash = sha256(json([prev_hash, position, event_id, stream, version, type, schema_version, data,
metadata, recorded_at, idempotency_key]))`. Because the position is inside the hash and each row names its predecessor's
hash, a changed, deleted, inserted or reordered row breaks the chain at the first affected position.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from rungate.store.base import Anchor, VerifyReport

GENESIS = "0" * 64


def chain_hash(prev_hash: str, position: int, event_id: str, stream: str, version: int, type_: str,
               schema_version: int, data: str, metadata: str, recorded_at: str, idempotency_key: str | None) -> str:
    material = orjson.dumps([prev_hash, position, event_id, stream, version, type_, schema_version, data,
                             metadata, recorded_at, idempotency_key])
    return hashlib.sha256(material).hexdigest()


def verify_rows(rows: Iterable[dict[str, Any]], head: Anchor | None = None,
                anchors: Sequence[Anchor] = ()) -> VerifyReport:
    """Check rows in position order; report the first position where the chain breaks.

    `head` is the recorded (position, hash) of the last event written: a log that ends before it, or whose
    last event differs from it, lost its tail. `anchors` are (position, hash) pairs kept outside the log:
    the event at each position must still have that hash.
    """
    kept = dict(anchors)
    prev_hash = GENESIS
    expected_position = 1
    count = 0
    for row in rows:
        count += 1
        position = int(row["position"])
        if position != expected_position:
            return VerifyReport(False, count, expected_position,
                                f"position {expected_position} is missing (next is {position})")
        if row["prev_hash"] != prev_hash:
            return VerifyReport(False, count, position, "prev_hash does not match the previous event")
        computed = chain_hash(row["prev_hash"], position, row["event_id"], row["stream"], int(row["version"]),
                              row["type"], int(row["schema_version"]), row["data"], row["metadata"],
                              row["recorded_at"], row["idempotency_key"])
        if computed != row["hash"]:
            return VerifyReport(False, count, position, "hash does not match the stored columns")
        if position in kept and kept[position] != row["hash"]:
            return VerifyReport(False, count, position, "the event's hash differs from the anchor kept for it: the"
                                " log was changed at or before this position and its hashes computed again")
        prev_hash = row["hash"]
        expected_position += 1
    last = expected_position - 1
    if head is not None and (last, prev_hash) != head:
        if last < head[0]:
            return VerifyReport(False, count, expected_position,
                                f"events {expected_position}..{head[0]} are missing from the end of the log")
        return VerifyReport(False, count, head[0], "the last event differs from the recorded head of the chain")
    beyond = max((position for position in kept if position > last), default=None)
    if beyond is not None:
        return VerifyReport(False, count, expected_position, f"events {expected_position}..{beyond} are missing from"
                            f" the end of the log: an anchor was kept for position {beyond}")
    return VerifyReport(True, count, head=(last, prev_hash) if count else None)
