"""A read-through cache for the hot point reads of the proxy (token → agent, provider → key).

Every proxied call needs the caller's agent row and the provider's key. Both change rarely, while under
load the log changes thousands of times a second, and each change makes SQLite re-read pages for a fresh
snapshot. So the rows are kept here and dropped as a whole when the store says their projection changed
(`EventStore.projection_version`), or after `ttl_s` at most: a change made by another process (the CLI
next to a running server) is seen within that time even when this process writes nothing.

The cache is never the last word on admission: `AdmitCall` re-checks the agent, its token and its
`disabled` flag inside the write transaction.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable

from rungate.store import EventStore, Row

DEFAULT_TTL_S = 1.0
MAX_ENTRIES = 10_000  # bounded: a flood of distinct keys empties the cache instead of growing it


class ReadCache:
    """Rows of projection `projection`, keyed by the caller; absent rows are cached when `keep_missing`."""

    def __init__(self, store: EventStore, projection: str, *, keep_missing: bool,
                 ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._projection = projection
        self._keep_missing = keep_missing
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[Hashable, Row | None] = {}
        self._version = -1
        self._expires = 0.0

    async def get(self, key: Hashable, load: Callable[[], Awaitable[Row | None]]) -> Row | None:
        """The row for `key`, from memory while still valid, else from `load()`."""
        version = self._store.projection_version(self._projection)
        now = self._clock()
        if version != self._version or now >= self._expires:
            self._entries.clear()
            self._version, self._expires = version, now + self._ttl_s
        if key in self._entries:
            return self._entries[key]
        row = await load()
        # Kept only if nothing changed while loading (a write may have landed between read and store).
        if (row is not None or self._keep_missing) and self._store.projection_version(self._projection) == version:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[key] = row
        return row
