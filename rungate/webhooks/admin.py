"""Operator commands on webhooks, shared by the admin API (and any CLI): create, change, rotate, delete, plus
the deliverer's records of each delivery's final outcome.

Each is a store command, so every change is an event. A signing secret is made here, returned once to the
caller, and stored only as AES-256-GCM ciphertext under the master key (the webhook's id as associated
data): it is in no event, row, log line or answer in clear.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rungate.clock import iso_plus
from rungate.crypto import Keyring
from rungate.errors import BadRequest, NotFound
from rungate.events import NewEvent, stream_name
from rungate.events.catalogue import (
    WebhookCreated,
    WebhookCursorAdvanced,
    WebhookDeadLettered,
    WebhookDeleted,
    WebhookDelivered,
    WebhookSecretRotated,
    WebhookUpdated,
)
from rungate.ids import new_id, new_token
from rungate.store import EventStore, Lookup, Row
from rungate.webhooks.envelope import ALL_EVENTS, EVENT_NAMES
from rungate.webhooks.urls import check_webhook_url
from rungate.webhooks.views import get_webhook

MAX_DESCRIPTION_CHARS = 500
CREATE_FIELDS = frozenset({"url", "events", "description", "enabled"})
SECRET_PREFIX = "whsec"


def webhook_stream(webhook_id: str) -> str:
    return stream_name("webhook", webhook_id)


def _row_lookup(webhook_id: str) -> Lookup:
    return Lookup.of("webhooks", "id", "enabled", "cursor_position", id=webhook_id)


@dataclass
class CreateWebhook:
    """Register a webhook; its cursor starts at this very event, so only what happens next is sent."""

    url: str
    events: list[str]
    description: str | None
    enabled: bool
    nonce: str
    ciphertext: str = field(repr=False)
    webhook_id: str

    def lookups(self) -> Sequence[Lookup]:
        return ()

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        return (NewEvent(webhook_stream(self.webhook_id), WebhookCreated(
            webhook_id=self.webhook_id, url=self.url, events=self.events, description=self.description,
            enabled=self.enabled, nonce=self.nonce, ciphertext=self.ciphertext)),)


@dataclass
class UpdateWebhook:
    """Change what is given (None: unchanged); a change to what already holds records nothing."""

    webhook_id: str
    url: str | None = None
    events: list[str] | None = None
    description: str | None = None
    enabled: bool | None = None

    def lookups(self) -> Sequence[Lookup]:
        return (_row_lookup(self.webhook_id),)

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        row = found[self.lookups()[0]]
        if row is None:
            raise NotFound(f"Webhook {self.webhook_id} not found.")
        enabled = None if self.enabled is None or bool(row["enabled"]) == self.enabled else self.enabled
        if (self.url, self.events, self.description, enabled) == (None, None, None, None):
            return ()
        return (NewEvent(webhook_stream(self.webhook_id), WebhookUpdated(
            webhook_id=self.webhook_id, url=self.url, events=self.events, description=self.description,
            enabled=enabled)),)


@dataclass
class RotateWebhookSecret:
    """A new secret; the current one keeps signing (as a second signature) for `grace_s` more seconds."""

    webhook_id: str
    nonce: str
    ciphertext: str = field(repr=False)
    grace_s: float

    def lookups(self) -> Sequence[Lookup]:
        return (_row_lookup(self.webhook_id),)

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        if found[self.lookups()[0]] is None:
            raise NotFound(f"Webhook {self.webhook_id} not found.")
        return (NewEvent(webhook_stream(self.webhook_id), WebhookSecretRotated(
            webhook_id=self.webhook_id, nonce=self.nonce, ciphertext=self.ciphertext,
            previous_valid_until=iso_plus(now, self.grace_s))),)


@dataclass
class DeleteWebhook:
    webhook_id: str

    def lookups(self) -> Sequence[Lookup]:
        return (_row_lookup(self.webhook_id),)

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        if found[self.lookups()[0]] is None:
            raise NotFound(f"Webhook {self.webhook_id} not found.")
        return (NewEvent(webhook_stream(self.webhook_id), WebhookDeleted(webhook_id=self.webhook_id)),)


@dataclass
class RecordDelivery:
    """The deliverer's record of one delivery's final outcome (and the cursor it allows); nothing for a
    webhook deleted meanwhile."""

    outcome: WebhookDelivered | WebhookDeadLettered

    def lookups(self) -> Sequence[Lookup]:
        return (_row_lookup(self.outcome.webhook_id),)

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        if found[self.lookups()[0]] is None:
            return ()
        return (NewEvent(webhook_stream(self.outcome.webhook_id), self.outcome),)


@dataclass
class AdvanceCursor:
    """Move the cursor past events the webhook does not want (only forward; nothing for a deleted webhook)."""

    webhook_id: str
    cursor: int

    def lookups(self) -> Sequence[Lookup]:
        return (_row_lookup(self.webhook_id),)

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        row = found[self.lookups()[0]]
        if row is None or row["cursor_position"] >= self.cursor:
            return ()
        return (NewEvent(webhook_stream(self.webhook_id),
                         WebhookCursorAdvanced(webhook_id=self.webhook_id, cursor=self.cursor)),)


# --- validation of operators' input ------------------------------------------------------------------

def check_events(raw: Any) -> list[str]:
    """A list of SPEC §8 event names, or `["*"]` for all of them."""
    if (not isinstance(raw, list) or not raw or len(raw) > len(EVENT_NAMES)
            or not all(isinstance(name, str) for name in raw)):
        raise BadRequest(f"`events` must be a non-empty list of event names ({', '.join(EVENT_NAMES)}),"
                         " or [\"*\"] for all.", code="invalid_events")
    if ALL_EVENTS in raw:
        if len(raw) != 1:
            raise BadRequest("`events`: \"*\" (every event) must be alone.", code="invalid_events")
        return [ALL_EVENTS]
    unknown = [name for name in raw if name not in EVENT_NAMES]
    if unknown:
        raise BadRequest(f"`events`: unknown event {unknown[0][:100]!r}; known: {', '.join(EVENT_NAMES)}.",
                         code="invalid_events")
    if len(set(raw)) != len(raw):
        raise BadRequest("`events` lists an event twice.", code="invalid_events")
    return list(raw)


def _check_description(raw: Any) -> str:
    if raw is None:
        return ""
    if not isinstance(raw, str) or len(raw) > MAX_DESCRIPTION_CHARS:
        raise BadRequest(f"`description` must be a string of at most {MAX_DESCRIPTION_CHARS} characters (or null).",
                         code="invalid_description")
    return raw


def _check_enabled(raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise BadRequest("`enabled` must be true or false.", code="invalid_enabled")
    return raw


def _check_fields(body: Mapping[str, Any]) -> None:
    unknown = sorted(set(body) - CREATE_FIELDS)
    if unknown:
        raise BadRequest(f"`{unknown[0][:100]}` is not a webhook field (fields: {', '.join(sorted(CREATE_FIELDS))}).",
                         code="invalid_field")


def _new_secret(keyring: Keyring, webhook_id: str) -> tuple[str, str, str]:
    """A fresh secret and its (nonce, ciphertext) under the master key."""
    secret = new_token(SECRET_PREFIX)
    nonce, ciphertext = keyring.encrypt(webhook_id, secret)
    return secret, nonce, ciphertext


# --- what the API calls ------------------------------------------------------------------------------

async def create_webhook(store: EventStore, keyring: Keyring, body: Mapping[str, Any], *,
                         allow_private: bool) -> tuple[Row, str]:
    """Register a webhook from an API body; returns its row and its secret (shown once)."""
    _check_fields(body)
    if "url" not in body:
        raise BadRequest("`url` is required.", code="invalid_webhook_url")
    url = await check_webhook_url(body["url"], allow_private=allow_private)
    events = check_events(body["events"]) if "events" in body else [ALL_EVENTS]
    description = _check_description(body.get("description")) or None
    enabled = _check_enabled(body["enabled"]) if "enabled" in body else True
    webhook_id = new_id("whk")
    secret, nonce, ciphertext = _new_secret(keyring, webhook_id)
    await store.execute(CreateWebhook(url, events, description, enabled, nonce, ciphertext, webhook_id))
    row = await get_webhook(store, webhook_id)
    assert row is not None
    return row, secret


async def update_webhook(store: EventStore, webhook_id: str, body: Mapping[str, Any], *,
                         allow_private: bool) -> Row:
    """Apply a PATCH body (url, events, description, enabled); returns the row as it now is."""
    _check_fields(body)
    if await get_webhook(store, webhook_id) is None:
        raise NotFound(f"Webhook {webhook_id} not found.")
    command = UpdateWebhook(
        webhook_id,
        url=await check_webhook_url(body["url"], allow_private=allow_private) if "url" in body else None,
        events=check_events(body["events"]) if "events" in body else None,
        description=_check_description(body["description"]) if "description" in body else None,
        enabled=_check_enabled(body["enabled"]) if "enabled" in body else None)
    await store.execute(command)
    row = await get_webhook(store, webhook_id)
    if row is None:
        raise NotFound(f"Webhook {webhook_id} not found.")
    return row


async def rotate_webhook_secret(store: EventStore, keyring: Keyring, webhook_id: str,
                                grace_s: float) -> tuple[Row, str]:
    """A new secret (shown once); the previous one keeps signing for `grace_s` seconds."""
    secret, nonce, ciphertext = _new_secret(keyring, webhook_id)
    await store.execute(RotateWebhookSecret(webhook_id, nonce, ciphertext, grace_s))
    row = await get_webhook(store, webhook_id)
    if row is None:
        raise NotFound(f"Webhook {webhook_id} not found.")
    return row, secret


async def delete_webhook(store: EventStore, webhook_id: str) -> None:
    await store.execute(DeleteWebhook(webhook_id))
