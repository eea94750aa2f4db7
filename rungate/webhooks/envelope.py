"""What a webhook receives (SPEC §8): which log events become which webhook events, the envelope, the signature.

    POST <url>
    Content-Type: application/json
    X-Rungate-Event: approval.pending
    X-Rungate-Delivery: <the event's id: the same on every retry, so receivers dedupe on it>
    X-Rungate-Timestamp: <unix seconds>
    X-Rungate-Signature: v1=<hex HMAC-SHA256 over "{timestamp}.{raw body}", keyed with the secret's UTF-8>
    X-Rungate-Signature: v1=<the same with the previous secret, while a rotation's grace period lasts>

    {"event": "approval.pending", "delivered_at": "…Z",
     "data": {…the event's data…, "position": 812, "stream": "run-ticket-1", "recorded_at": "…Z"}}

The data is the event as recorded (money in integer pico-USD, like the log), minus what is not for
receivers: `AgentCreated` loses its `token_hash`. Events of the webhooks themselves are never sent.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from rungate.events import Recorded

# Every name a webhook may subscribe to (SPEC §8). `admin_token.created` belongs to a feature not in this
# version: accepted in a filter, never sent yet.
EVENT_NAMES: tuple[str, ...] = (
    "run.started", "run.completed", "run.blocked", "step.failed_over", "approval.pending", "approval.approved",
    "approval.rejected", "budget.alert", "budget.exceeded", "policy.drift", "agent.created", "admin_token.created",
)
ALL_EVENTS = "*"
TEST_EVENT = "webhook.test"
SIGNATURE_VERSION = "v1"


def _named(name: str) -> Callable[[Mapping[str, Any]], tuple[str, dict[str, Any]]]:
    return lambda data: (name, dict(data))


def _agent_created(data: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    return "agent.created", {k: v for k, v in data.items() if k != "token_hash"}


def _approval_expired(data: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    name = "approval.approved" if data.get("outcome") == "approved" else "approval.rejected"
    return name, {**data, "expired": True}


# Log event type → its webhook event name and data.
_MAPPING: dict[str, Callable[[Mapping[str, Any]], tuple[str, dict[str, Any]]]] = {
    "RunStarted": _named("run.started"),
    "RunCompleted": _named("run.completed"),
    "RunBlocked": _named("run.blocked"),
    "ApprovalRequested": _named("approval.pending"),
    "ApprovalGranted": _named("approval.approved"),
    "ApprovalRejected": _named("approval.rejected"),
    "ApprovalExpired": _approval_expired,
    "BudgetAlerted": _named("budget.alert"),
    "BudgetExceeded": _named("budget.exceeded"),
    "PolicyDrifted": _named("policy.drift"),
    "AgentCreated": _agent_created,
    "StepFailedOver": _named("step.failed_over"),
}


def webhook_event(rec: Recorded) -> tuple[str, dict[str, Any]] | None:
    """The webhook event `rec` becomes — its name and data — or None when it is not one."""
    mapper = _MAPPING.get(rec.type)
    if mapper is None:
        return None
    name, data = mapper(rec.data)
    data.update(position=rec.position, stream=rec.stream, recorded_at=rec.recorded_at)
    return name, data


def wants(filters: list[str], name: str) -> bool:
    """Whether a webhook subscribed to `filters` is sent `name`."""
    return ALL_EVENTS in filters or name in filters


def envelope(name: str, delivered_at: str, data: Mapping[str, Any]) -> bytes:
    """The raw body sent (and signed)."""
    return orjson.dumps({"event": name, "delivered_at": delivered_at, "data": data})


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """`v1=<hex>`: HMAC-SHA256 of `"{timestamp}.{body}"` with the secret's UTF-8 bytes as key."""
    mac = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def verify(secret: str, timestamp: str, body: bytes, header: str) -> bool:
    """What a receiver does: compare in constant time (for tests and documentation)."""
    return hmac.compare_digest(signature(secret, timestamp, body), header)
