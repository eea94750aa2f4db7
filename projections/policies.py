"""Policies: the current version of each named policy, and every version ever written."""

from __future__ import annotations

from projections.base import Projection
from rungate.events import Recorded
from rungate.events import canonical_json as _json
from rungate.store.base import Statement


class PoliciesProjection(Projection):
    name = "policies"
    tables = ("policy_versions", "policies")
    ddl = (
        """CREATE TABLE IF NOT EXISTS policies (
            id TEXT PRIMARY KEY, name TEXT NOT NULL, version INTEGER NOT NULL, document TEXT NOT NULL,
            deleted INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
            position BIGINT NOT NULL)""",
        # A name belongs to one live policy; a deleted policy's name may be used again.
        "CREATE UNIQUE INDEX IF NOT EXISTS policies_live_name ON policies (name) WHERE deleted = 0",
        """CREATE TABLE IF NOT EXISTS policy_versions (
            policy_id TEXT NOT NULL, version INTEGER NOT NULL, name TEXT NOT NULL, document TEXT NOT NULL,
            created_at TEXT NOT NULL, position BIGINT NOT NULL, PRIMARY KEY (policy_id, version))""",
    )

    def __init__(self) -> None:
        super().__init__()
        self.handlers.update({
            "PolicyVersionCreated": self._version_created,
            "PolicyDeleted": self._deleted,
        })

    def _version_created(self, rec: Recorded) -> list[Statement]:
        d = rec.data
        document = _json(d["document"])
        out: list[Statement] = [
            ("INSERT INTO policy_versions (policy_id, version, name, document, created_at, position)"
             " VALUES (?, ?, ?, ?, ?, ?)",
             (d["policy_id"], d["version"], d["name"], document, rec.recorded_at, rec.position)),
        ]
        if d["version"] == 1:
            out.append(("INSERT INTO policies (id, name, version, document, created_at, updated_at, position)"
                        " VALUES (?, ?, 1, ?, ?, ?, ?)",
                        (d["policy_id"], d["name"], document, rec.recorded_at, rec.recorded_at, rec.position)))
        else:
            out.append(("UPDATE policies SET name = ?, version = ?, document = ?, updated_at = ?, position = ?"
                        " WHERE id = ?",
                        (d["name"], d["version"], document, rec.recorded_at, rec.position, d["policy_id"])))
        return out

    def _deleted(self, rec: Recorded) -> list[Statement]:
        return [("UPDATE policies SET deleted = 1, updated_at = ?, position = ? WHERE id = ?",
                 (rec.recorded_at, rec.position, rec.data["policy_id"]))]
