"""Operator commands on policies (shared by the admin API and the CLI), and the agent's default policy.

A policy is a name with a history: applying a changed document adds version n+1, applying the same
document again changes nothing, and every version stays readable forever (runs keep the one they
started with). Each command is a store command, so names stay unique under concurrency.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from rungate import queries
from rungate.enforce.policy import parse_document
from rungate.errors import Conflict, NotFound
from rungate.events import NewEvent, canonical_json, stream_name
from rungate.events.catalogue import PolicyDeleted, PolicyVersionCreated
from rungate.ids import new_id
from rungate.store import EventStore, Lookup, Row


def policy_stream(policy_id: str) -> str:
    return stream_name("policy", policy_id)


@dataclass
class ApplyPolicy:
    """Create policy `document["name"]`, or give it a new version when the document changed.

    With `policy_id`, that policy is changed (and may be renamed); otherwise the live policy of that name.
    After `execute`: `policy_id`, `version`, and `outcome` ("created", "updated" or "unchanged").
    """

    document: dict[str, Any]
    policy_id: str | None = None
    create_only: bool = False
    version: int = 0
    outcome: str = ""
    _by_name: Lookup = field(init=False, repr=False)
    _by_id: Lookup | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name = Lookup.of("policies", "id", "version", "document", name=self.document["name"], deleted=0)
        self._by_id = (Lookup.of("policies", "id", "version", "document", id=self.policy_id, deleted=0)
                       if self.policy_id else None)

    def lookups(self) -> Sequence[Lookup]:
        return (self._by_name,) if self._by_id is None else (self._by_name, self._by_id)

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        named = found[self._by_name]
        if self._by_id is not None:
            current = found[self._by_id]
            if current is None:
                raise NotFound(f"Policy {self.policy_id} not found.")
            if named is not None and named["id"] != current["id"]:
                raise Conflict(f"A policy named {self.document['name']!r} already exists.", code="name_taken")
        else:
            current = named
            if current is not None and self.create_only:
                raise Conflict(f"A policy named {self.document['name']!r} already exists; change it with PUT.",
                               code="name_taken")
        if current is None:
            self.policy_id, self.version, self.outcome = new_id("pol"), 1, "created"
        else:
            self.policy_id = current["id"]
            if current["document"] == canonical_json(self.document):
                self.version, self.outcome = current["version"], "unchanged"
                return ()
            self.version, self.outcome = current["version"] + 1, "updated"
        return (NewEvent(policy_stream(self.policy_id), PolicyVersionCreated(
            policy_id=self.policy_id, name=self.document["name"], version=self.version, document=self.document)),)


@dataclass
class DeletePolicy:
    """Retire a policy: no new run binds to it; refused while an agent has it as default."""

    policy_id: str

    def __post_init__(self) -> None:
        self._policy = Lookup.of("policies", "id", id=self.policy_id, deleted=0)
        self._user = Lookup.of("agents", "id", "name", policy_id=self.policy_id)

    def lookups(self) -> Sequence[Lookup]:
        return (self._policy, self._user)

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        if found[self._policy] is None:
            raise NotFound(f"Policy {self.policy_id} not found.")
        user = found[self._user]
        if user is not None:
            raise Conflict(f"Agent {user['name']!r} uses this policy as its default; change that first.",
                           code="policy_in_use")
        return (NewEvent(policy_stream(self.policy_id), PolicyDeleted(policy_id=self.policy_id)),)


async def apply_policy(store: EventStore, raw: Any, *, name: str | None = None, policy_id: str | None = None,
                       create_only: bool = False) -> tuple[Row, str]:
    """Validate and apply a document; returns the policy's row and the outcome."""
    command = ApplyPolicy(parse_document(raw, name=name), policy_id=policy_id, create_only=create_only)
    await store.execute(command)
    assert command.policy_id is not None
    row = await queries.get_policy(store, command.policy_id)
    assert row is not None
    return row, command.outcome


def policy_view(row: Row) -> dict[str, Any]:
    """The stored document back, with `id`, `name` and `version` (SPEC §4.1)."""
    document = orjson.loads(row["document"])
    view: dict[str, Any] = {"id": row.get("id", row.get("policy_id")), **document, "version": row["version"],
                            "created_at": row["created_at"]}
    if "updated_at" in row:
        view["updated_at"] = row["updated_at"]
    return view
