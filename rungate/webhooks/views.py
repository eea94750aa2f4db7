"""Webhook read models for the API: queries over the `webhooks` projection and the public shapes.

Rows carry the encrypted secrets (the deliverer needs them); views never do.
"""

from __future__ import annotations

from typing import Any

import orjson

from rungate.errors import BadRequest
from rungate.store import EventStore, Row

DELIVERY_STATUSES = ("delivered", "dead")


async def get_webhook(store: EventStore, webhook_id: str) -> Row | None:
    return await store.fetchone("SELECT * FROM webhooks WHERE id = ?", (webhook_id,))


async def list_webhooks(store: EventStore) -> list[Row]:
    return await store.fetch("SELECT * FROM webhooks ORDER BY created_at, id")


async def list_deliveries(store: EventStore, webhook_id: str, *, status: str | None = None,
                          limit: int = 100) -> list[Row]:
    """The webhook's final delivery outcomes, newest first."""
    if status is not None and status not in DELIVERY_STATUSES:
        raise BadRequest(f"`status` must be one of {', '.join(DELIVERY_STATUSES)}.", code="invalid_status")
    sql, params = "SELECT * FROM webhook_deliveries WHERE webhook_id = ?", [webhook_id]
    if status is not None:
        sql += " AND status = ?"
        params.append(status)
    return await store.fetch(sql + " ORDER BY position DESC LIMIT ?", (*params, limit))


async def delivered_positions(store: EventStore, webhook_id: str, after: int) -> set[int]:
    """Positions past `after` whose delivery to the webhook already has a final outcome."""
    rows = await store.fetch("SELECT event_position FROM webhook_deliveries WHERE webhook_id = ?"
                             " AND event_position > ?", (webhook_id, after))
    return {int(row["event_position"]) for row in rows}


def webhook_view(row: Row, secret: str | None = None) -> dict[str, Any]:
    """A webhook; `secret` only right after it was made (create, rotate-secret)."""
    view: dict[str, Any] = {
        "id": row["id"],
        "url": row["url"],
        "events": orjson.loads(row["events"]),
        "enabled": bool(row["enabled"]),
        "description": row["description"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "delivered_through": row["cursor_position"],
        "previous_secret_valid_until": row["previous_valid_until"],
    }
    if secret is not None:
        view["secret"] = secret
    return view


def delivery_view(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "webhook_id": row["webhook_id"],
        "event": row["event"],
        "event_id": row["event_id"],
        "event_position": row["event_position"],
        "status": row["status"],
        "attempts": row["attempts"],
        "status_code": row["status_code"],
        "error": row["error"],
        "first_attempt_at": row["first_attempt_at"],
        "last_attempt_at": row["last_attempt_at"],
        "recorded_at": row["recorded_at"],
    }
