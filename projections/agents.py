"""Agents and provider keys: what authentication and upstream key selection read."""

from __future__ import annotations

from projections.base import Projection
from rungate.events import Recorded
from rungate.events import canonical_json as _json
from rungate.store.base import Statement


class AgentsProjection(Projection):
    name = "agents"
    tables = ("agents", "provider_keys")
    ddl = (
        """CREATE TABLE IF NOT EXISTS agents (
            id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_hash TEXT NOT NULL UNIQUE,
            disabled INTEGER NOT NULL DEFAULT 0, metadata TEXT NOT NULL DEFAULT '{}', policy_id TEXT,
            created_at TEXT NOT NULL, updated_at TEXT NOT NULL, position BIGINT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS provider_keys (
            id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, provider TEXT NOT NULL,
            nonce TEXT NOT NULL, ciphertext TEXT NOT NULL, hint TEXT NOT NULL,
            created_at TEXT NOT NULL, position BIGINT NOT NULL)""",
    )

    def __init__(self) -> None:
        super().__init__()
        self.handlers.update({
            "AgentCreated": self._created,
            "AgentTokenRotated": self._rotated,
            "AgentUpdated": self._updated,
            "AgentDeleted": self._deleted,
            "AgentPolicySet": self._policy_set,
            "ProviderKeyAdded": self._key_added,
            "ProviderKeyRemoved": self._key_removed,
        })

    def _created(self, rec: Recorded) -> list[Statement]:
        d = rec.data
        return [("INSERT INTO agents (id, name, token_hash, disabled, metadata, created_at, updated_at, position)"
                 " VALUES (?, ?, ?, 0, ?, ?, ?, ?)",
                 (d["agent_id"], d["name"], d["token_hash"], _json(d.get("metadata") or {}),
                  rec.recorded_at, rec.recorded_at, rec.position))]

    def _rotated(self, rec: Recorded) -> list[Statement]:
        return [("UPDATE agents SET token_hash = ?, updated_at = ?, position = ? WHERE id = ?",
                 (rec.data["token_hash"], rec.recorded_at, rec.position, rec.data["agent_id"]))]

    def _updated(self, rec: Recorded) -> list[Statement]:
        d = rec.data
        out: list[Statement] = []
        if d.get("name") is not None:
            out.append(("UPDATE agents SET name = ? WHERE id = ?", (d["name"], d["agent_id"])))
        if d.get("disabled") is not None:
            out.append(("UPDATE agents SET disabled = ? WHERE id = ?", (int(d["disabled"]), d["agent_id"])))
        if d.get("metadata") is not None:
            out.append(("UPDATE agents SET metadata = ? WHERE id = ?", (_json(d["metadata"]), d["agent_id"])))
        out.append(("UPDATE agents SET updated_at = ?, position = ? WHERE id = ?",
                    (rec.recorded_at, rec.position, d["agent_id"])))
        return out

    def _policy_set(self, rec: Recorded) -> list[Statement]:
        return [("UPDATE agents SET policy_id = ?, updated_at = ?, position = ? WHERE id = ?",
                 (rec.data["policy_id"], rec.recorded_at, rec.position, rec.data["agent_id"]))]

    def _deleted(self, rec: Recorded) -> list[Statement]:
        return [("DELETE FROM agents WHERE id = ?", (rec.data["agent_id"],))]

    def _key_added(self, rec: Recorded) -> list[Statement]:
        d = rec.data
        return [("INSERT INTO provider_keys (id, name, provider, nonce, ciphertext, hint, created_at, position)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (d["key_id"], d["name"], d["provider"], d["nonce"], d["ciphertext"], d["hint"],
                  rec.recorded_at, rec.position))]

    def _key_removed(self, rec: Recorded) -> list[Statement]:
        return [("DELETE FROM provider_keys WHERE id = ?", (rec.data["key_id"],))]
