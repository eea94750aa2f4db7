"""The projection contract."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rungate.events import Recorded
from rungate.store.base import Image, Statement

Handler = Callable[[Recorded], list[Statement]]


class Projection:
    """A read model: its tables' DDL and a handler per event type it cares about.

    Subclasses set `name`, `tables` (dropped on rebuild, in order) and `ddl` (portable SQL accepted
    by SQLite and PostgreSQL), and register handlers in `handlers`. An index added to a projection that
    already exists goes in `indexes`: a change to `ddl` rebuilds the projection from the log at the next
    start, an index only needs creating.
    """

    name: str = ""
    tables: Sequence[str] = ()
    ddl: Sequence[str] = ()
    indexes: Sequence[str] = ()
    image_tables: Sequence[str] = ()  # see `images`

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}

    def handle(self, recorded: Recorded) -> list[Statement]:
        """The statements that fold `recorded` into this projection (empty when it is not interested)."""
        handler = self.handlers.get(recorded.type)
        return handler(recorded) if handler else []

    def handles(self, type_: str) -> bool:
        return type_ in self.handlers

    def images(self, recorded: Recorded) -> Sequence[Image]:
        """What folding `recorded` did to rows of `image_tables`: for each row it wrote, the values of the
        columns it knows exactly, or None (the row changed otherwise; the writer forgets it). A projection that
        names a table in `image_tables` must report every row of it that any of its statements writes."""
        return ()
