"""Approval gates: every gate (`gate_…`) with its decision, and every held answer (`hold_…`) with its state.

A hold is `pending` until each of its gates is approved (then `approved`) or one is rejected or expires as
rejected (then `rejected`; the decision rejects its other pending gates too, each with its own event).
`open` is 1 while the hold is pending: it keeps its run from going idle. A hold's `position` is that of
the event that held it and never moves, so "the newest hold of a request" is the newest held. Enforcement
reads these rows inside the write transaction (retries of a held request, operators' decisions), so they
are folded inline like the run state.
"""

from __future__ import annotations

from projections.base import Projection
from rungate.events import Recorded
from rungate.events import canonical_json as _json
from rungate.store.base import Statement


class ApprovalsProjection(Projection):
    name = "approvals"
    tables = ("gates", "holds")
    ddl = (
        """CREATE TABLE IF NOT EXISTS holds (
            id TEXT PRIMARY KEY, run_id TEXT NOT NULL, agent_id TEXT NOT NULL, step_id TEXT NOT NULL,
            origin TEXT NOT NULL, endpoint TEXT NOT NULL, fingerprint TEXT NOT NULL, stream INTEGER NOT NULL,
            http_status INTEGER NOT NULL, headers TEXT NOT NULL, body TEXT NOT NULL, body_encoding TEXT NOT NULL,
            gate_ids TEXT NOT NULL, gates_total INTEGER NOT NULL, gates_approved INTEGER NOT NULL DEFAULT 0,
            status TEXT NOT NULL, open INTEGER NOT NULL DEFAULT 1, expires_at TEXT NOT NULL,
            on_expiry TEXT NOT NULL, mode TEXT NOT NULL, policy TEXT, decided_by TEXT, reason TEXT,
            rule TEXT NOT NULL,
            released INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL, decided_at TEXT,
            position BIGINT NOT NULL)""",
        # A retry finds the newest hold of its run and request fingerprint.
        "CREATE INDEX IF NOT EXISTS holds_request ON holds (run_id, fingerprint, position)",
        # Runs kept from idling, and the sweeper's expired holds.
        "CREATE INDEX IF NOT EXISTS holds_open ON holds (open, run_id)",
        """CREATE TABLE IF NOT EXISTS gates (
            id TEXT PRIMARY KEY, hold_id TEXT NOT NULL, run_id TEXT NOT NULL, agent_id TEXT NOT NULL,
            rule TEXT NOT NULL, tool TEXT NOT NULL, tool_call_id TEXT, args TEXT, args_text TEXT,
            channel TEXT NOT NULL, status TEXT NOT NULL, expires_at TEXT NOT NULL, on_expiry TEXT NOT NULL,
            policy TEXT, decided_by TEXT, decided_at TEXT, reason TEXT, edited_args TEXT,
            created_at TEXT NOT NULL, position BIGINT NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS gates_hold ON gates (hold_id)",
        "CREATE INDEX IF NOT EXISTS gates_status ON gates (status, expires_at)",
        "CREATE INDEX IF NOT EXISTS gates_run ON gates (run_id, created_at)",
        "CREATE INDEX IF NOT EXISTS gates_agent ON gates (agent_id, created_at)",
    )
    indexes = (
        # Pages of approval requests newest first, all of them or in one status (an operator's inbox polls
        # these): else every gate ever created (or in that status) is read and sorted for each page.
        "CREATE INDEX IF NOT EXISTS gates_created ON gates (created_at, id)",
        "CREATE INDEX IF NOT EXISTS gates_status_created ON gates (status, created_at, id)",
    )

    def __init__(self) -> None:
        super().__init__()
        self.handlers.update({
            "AnswerHeld": self._held,
            "ApprovalRequested": self._requested,
            "ApprovalGranted": self._granted,
            "ApprovalRejected": self._rejected,
            "ApprovalExpired": self._expired,
            "HeldAnswerRetried": self._retried,
        })

    def _held(self, rec: Recorded) -> list[Statement]:
        d = rec.data
        return [("INSERT INTO holds (id, run_id, agent_id, step_id, origin, endpoint, fingerprint, stream,"
                 " http_status, headers, body, body_encoding, gate_ids, gates_total, status, expires_at, on_expiry,"
                 " mode, policy, rule, created_at, position)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?)",
                 (d["hold_id"], d["run_id"], d["agent_id"], d["step_id"], d["origin"], d["endpoint"],
                  d["fingerprint"], int(d["stream"]), d["http_status"], _json(d["headers"]), d["body"],
                  d["body_encoding"], _json(d["gate_ids"]), len(d["gate_ids"]), d["expires_at"], d["on_expiry"],
                  d.get("mode", "202"), _json(d["policy"]) if d.get("policy") else None, d["rule"], rec.recorded_at,
                  rec.position))]

    def _requested(self, rec: Recorded) -> list[Statement]:
        d = rec.data
        return [("INSERT INTO gates (id, hold_id, run_id, agent_id, rule, tool, tool_call_id, args, args_text,"
                 " channel, status, expires_at, on_expiry, policy, created_at, position)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?)",
                 (d["gate_id"], d["hold_id"], d["run_id"], d["agent_id"], d["rule"], d["tool"], d.get("tool_call_id"),
                  None if d.get("args") is None else _json(d["args"]), d.get("args_text"), d["channel"],
                  d["expires_at"], d["on_expiry"], _json(d["policy"]) if d.get("policy") else None,
                  rec.recorded_at, rec.position))]

    def _approve(self, rec: Recorded, status: str, edited: str | None, by: str | None,
                 reason: str | None) -> list[Statement]:
        d = rec.data
        return [
            ("UPDATE gates SET status = ?, decided_by = ?, decided_at = ?, reason = ?, edited_args = ?, position = ?"
             " WHERE id = ? AND status = 'pending'",
             (status, by, rec.recorded_at, reason, edited, rec.position, d["gate_id"])),
            # The hold is approved once every gate is.
            ("UPDATE holds SET gates_approved = gates_approved + 1,"
             " status = CASE WHEN gates_approved + 1 >= gates_total THEN 'approved' ELSE status END,"
             " open = CASE WHEN gates_approved + 1 >= gates_total THEN 0 ELSE open END,"
             " decided_at = CASE WHEN gates_approved + 1 >= gates_total THEN ? ELSE decided_at END"
             " WHERE id = ? AND status = 'pending'",
             (rec.recorded_at, d["hold_id"])),
        ]

    def _reject(self, rec: Recorded, status: str, by: str | None, reason: str | None) -> list[Statement]:
        d = rec.data
        return [
            ("UPDATE gates SET status = ?, decided_by = ?, decided_at = ?, reason = ?, position = ?"
             " WHERE id = ? AND status = 'pending'",
             (status, by, rec.recorded_at, reason, rec.position, d["gate_id"])),
            # One rejected gate rejects the whole answer; the first decision names who and why.
            ("UPDATE holds SET status = 'rejected', open = 0, decided_by = ?, reason = ?,"
             " rule = (SELECT rule FROM gates WHERE id = ?), decided_at = ?"
             " WHERE id = ? AND status = 'pending'",
             (by, reason, d["gate_id"], rec.recorded_at, d["hold_id"])),
        ]

    def _granted(self, rec: Recorded) -> list[Statement]:
        d = rec.data
        edited = None if d.get("edited_args") is None else _json(d["edited_args"])
        return self._approve(rec, "approved", edited, d["decided_by"], d.get("reason"))

    def _rejected(self, rec: Recorded) -> list[Statement]:
        d = rec.data
        return self._reject(rec, "rejected", d["decided_by"], d.get("reason"))

    def _expired(self, rec: Recorded) -> list[Statement]:
        if rec.data["outcome"] == "approved":
            return self._approve(rec, "expired", None, None, "expired (on_expiry: approve)")
        return self._reject(rec, "expired", None, "the gate expired before anyone decided")

    def _retried(self, rec: Recorded) -> list[Statement]:
        if rec.data["outcome"] != "released":
            return []
        return [("UPDATE holds SET released = released + 1, open = 0 WHERE id = ?", (rec.data["hold_id"],))]
