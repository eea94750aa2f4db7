"""The projection contract."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rungate.events import Recorded
from rungate.store.base import Statement

Handler = Callable[[Recorded], list[Statement]]


class Projection:
    """A read model: its tables' DDL and a handler per event type it cares about.

    Subclasses set `name`, `tables` (dropped on rebuild, in order) and `ddl` (portable SQL accepted
    by SQLite and PostgreSQL), and register handlers in `handlers`.
    """

    name: str = ""
    tables: Sequence[str] = ()
    ddl: Sequence[str] = ()

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}

    def handle(self, recorded: Recorded) -> list[Statement]:
        """The statements that fold `recorded` into this projection (empty when it is not interested)."""
        handler = self.handlers.get(recorded.type)
        return handler(recorded) if handler else []

    def handles(self, type_: str) -> bool:
        return type_ in self.handlers
