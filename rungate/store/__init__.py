"""The event log and its backends (they know projections only through the `Projection` protocol)."""

from rungate.store.base import (
    Anchor,
    Append,
    Command,
    EventStore,
    Lookup,
    Projection,
    Refused,
    Row,
    Statement,
    VerifyReport,
)
from rungate.store.sqlite import SQLiteEventStore

__all__ = ["Anchor", "Append", "Command", "EventStore", "Lookup", "Projection", "Refused", "Row",
           "SQLiteEventStore", "Statement", "VerifyReport"]
