"""Events: immutable facts; `EVENT_TYPES` maps each stored type name to its class."""

from rungate.events.base import Event, NewEvent, Recorded, canonical_json, stream_name
from rungate.events.catalogue import ALL_EVENTS

EVENT_TYPES: dict[str, type[Event]] = {cls.type_name(): cls for cls in ALL_EVENTS}

__all__ = ["EVENT_TYPES", "Event", "NewEvent", "Recorded", "canonical_json", "stream_name"]
