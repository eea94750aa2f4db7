"""Opening the configured event store with Rungate's projections (the one place the two meet)."""

from __future__ import annotations

from projections import ALL
from rungate.config import Settings
from rungate.errors import ConfigError
from rungate.store import EventStore, SQLiteEventStore


def open_store(settings: Settings) -> EventStore:
    """The store named by `settings.database_url` (not started yet)."""
    path = settings.sqlite_path
    if path is not None:
        return SQLiteEventStore(path, projections=ALL, durability=settings.durability)
    raise ConfigError("RUNGATE_DATABASE_URL: the PostgreSQL backend is not available in this version yet")
