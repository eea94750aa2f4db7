"""The event log and its backends."""

from __future__ import annotations

from rungate.config import Settings
from rungate.errors import ConfigError
from rungate.store.base import Append, Command, EventStore, Lookup, Row, VerifyReport
from rungate.store.sqlite import SQLiteEventStore


def open_store(settings: Settings) -> EventStore:
    """The store named by `settings.database_url` (not started yet)."""
    path = settings.sqlite_path
    if path is not None:
        return SQLiteEventStore(path, durability=settings.durability)
    raise ConfigError("RUNGATE_DATABASE_URL: the PostgreSQL backend is not available in this version yet")


__all__ = ["Append", "Command", "EventStore", "Lookup", "Row", "SQLiteEventStore", "VerifyReport", "open_store"]
