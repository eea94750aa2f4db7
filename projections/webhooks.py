"""Webhooks: every endpoint with its (encrypted) secrets and cursor, and the final outcome of each delivery.

`cursor_position` is the webhook's low-water mark: every event it wants, up to that position, was delivered
or dead-lettered. It starts at the `WebhookCreated` event itself (a webhook is sent what happens after it
exists, not the history), jumps to the `WebhookUpdated` that re-enables a disabled webhook (nothing is sent
for the time it was disabled), and only ever moves forward. The deliverer resumes from it after a restart,
skipping the events past it that already have a row in `webhook_deliveries`.
"""

from __future__ import annotations

from projections.base import Projection
from rungate.events import Recorded
from rungate.events import canonical_json as _json
from rungate.store.base import Statement

_ADVANCE = ("UPDATE webhooks SET cursor_position = CASE WHEN cursor_position < ? THEN ? ELSE cursor_position END"
            " WHERE id = ?")


class WebhooksProjection(Projection):
    name = "webhooks"
    tables = ("webhook_deliveries", "webhooks")
    ddl = (
        """CREATE TABLE IF NOT EXISTS webhooks (
            id TEXT PRIMARY KEY, url TEXT NOT NULL, events TEXT NOT NULL, description TEXT,
            enabled INTEGER NOT NULL, secret_nonce TEXT NOT NULL, secret_ciphertext TEXT NOT NULL,
            previous_nonce TEXT, previous_ciphertext TEXT, previous_valid_until TEXT,
            cursor_position BIGINT NOT NULL, enabled_at BIGINT NOT NULL,
            created_at TEXT NOT NULL, updated_at TEXT NOT NULL, position BIGINT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS webhook_deliveries (
            id TEXT PRIMARY KEY, webhook_id TEXT NOT NULL, event_id TEXT NOT NULL, event_position BIGINT NOT NULL,
            event TEXT NOT NULL, status TEXT NOT NULL, attempts INTEGER NOT NULL, status_code INTEGER,
            error TEXT, first_attempt_at TEXT NOT NULL, last_attempt_at TEXT NOT NULL,
            recorded_at TEXT NOT NULL, position BIGINT NOT NULL)""",
        # One final outcome per webhook and event; the deliverer skips the events that have one.
        "CREATE UNIQUE INDEX IF NOT EXISTS webhook_deliveries_event ON webhook_deliveries"
        " (webhook_id, event_position)",
        # `GET /api/webhooks/{id}/deliveries`, newest first.
        "CREATE INDEX IF NOT EXISTS webhook_deliveries_recent ON webhook_deliveries (webhook_id, position)",
    )

    def __init__(self) -> None:
        super().__init__()
        self.handlers.update({
            "WebhookCreated": self._created,
            "WebhookUpdated": self._updated,
            "WebhookSecretRotated": self._rotated,
            "WebhookDeleted": self._deleted,
            "WebhookDelivered": self._delivered,
            "WebhookDeadLettered": self._dead_lettered,
            "WebhookCursorAdvanced": self._advanced,
        })

    def _created(self, rec: Recorded) -> list[Statement]:
        d = rec.data
        return [("INSERT INTO webhooks (id, url, events, description, enabled, secret_nonce, secret_ciphertext,"
                 " cursor_position, enabled_at, created_at, updated_at, position)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (d["webhook_id"], d["url"], _json(d["events"]), d.get("description"), int(d["enabled"]),
                  d["nonce"], d["ciphertext"], rec.position, rec.position, rec.recorded_at, rec.recorded_at,
                  rec.position))]

    def _updated(self, rec: Recorded) -> list[Statement]:
        d, webhook_id = rec.data, rec.data["webhook_id"]
        out: list[Statement] = []
        if d.get("url") is not None:
            out.append(("UPDATE webhooks SET url = ? WHERE id = ?", (d["url"], webhook_id)))
        if d.get("events") is not None:
            out.append(("UPDATE webhooks SET events = ? WHERE id = ?", (_json(d["events"]), webhook_id)))
        if d.get("description") is not None:
            out.append(("UPDATE webhooks SET description = ? WHERE id = ?", (d["description"] or None, webhook_id)))
        if d.get("enabled") is True:
            # Re-enabled: start from here (every SET expression reads the row as it was before the UPDATE).
            out.append(("UPDATE webhooks SET"
                        " cursor_position = CASE WHEN enabled = 0 AND cursor_position < ? THEN ? ELSE cursor_position"
                        " END, enabled_at = CASE WHEN enabled = 0 THEN ? ELSE enabled_at END, enabled = 1"
                        " WHERE id = ?", (rec.position, rec.position, rec.position, webhook_id)))
        elif d.get("enabled") is False:
            out.append(("UPDATE webhooks SET enabled = 0 WHERE id = ?", (webhook_id,)))
        out.append(("UPDATE webhooks SET updated_at = ?, position = ? WHERE id = ?",
                    (rec.recorded_at, rec.position, webhook_id)))
        return out

    def _rotated(self, rec: Recorded) -> list[Statement]:
        d = rec.data
        return [("UPDATE webhooks SET previous_nonce = secret_nonce, previous_ciphertext = secret_ciphertext,"
                 " previous_valid_until = ?, secret_nonce = ?, secret_ciphertext = ?, updated_at = ?, position = ?"
                 " WHERE id = ?",
                 (d["previous_valid_until"], d["nonce"], d["ciphertext"], rec.recorded_at, rec.position,
                  d["webhook_id"]))]

    def _deleted(self, rec: Recorded) -> list[Statement]:
        webhook_id = rec.data["webhook_id"]
        return [("DELETE FROM webhook_deliveries WHERE webhook_id = ?", (webhook_id,)),
                ("DELETE FROM webhooks WHERE id = ?", (webhook_id,))]

    def _outcome(self, rec: Recorded, status: str) -> list[Statement]:
        d = rec.data
        return [
            ("INSERT INTO webhook_deliveries (id, webhook_id, event_id, event_position, event, status, attempts,"
             " status_code, error, first_attempt_at, last_attempt_at, recorded_at, position)"
             " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
             " ON CONFLICT (webhook_id, event_position) DO UPDATE SET id = excluded.id, status = excluded.status,"
             " attempts = excluded.attempts, status_code = excluded.status_code, error = excluded.error,"
             " first_attempt_at = excluded.first_attempt_at, last_attempt_at = excluded.last_attempt_at,"
             " recorded_at = excluded.recorded_at, position = excluded.position",
             (d["delivery_id"], d["webhook_id"], d["event_id"], d["event_position"], d["event"], status,
              d["attempts"], d.get("status_code"), d.get("error"), d["first_attempt_at"], d["last_attempt_at"],
              rec.recorded_at, rec.position)),
            (_ADVANCE, (d["cursor"], d["cursor"], d["webhook_id"])),
        ]

    def _delivered(self, rec: Recorded) -> list[Statement]:
        return self._outcome(rec, "delivered")

    def _dead_lettered(self, rec: Recorded) -> list[Statement]:
        return self._outcome(rec, "dead")

    def _advanced(self, rec: Recorded) -> list[Statement]:
        d = rec.data
        return [(_ADVANCE, (d["cursor"], d["cursor"], d["webhook_id"]))]
