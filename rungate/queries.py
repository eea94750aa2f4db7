"""Read-model queries for the audit API and the CLI (handlers hold no SQL)."""

from __future__ import annotations

import base64
from datetime import UTC
from typing import Any

import orjson

from rungate.clock import iso_minus, isoformat, parse_iso
from rungate.enforce.policy import cached_policy, compile_policy
from rungate.errors import BadRequest
from rungate.store import Anchor, EventStore, Row

RUN_STATUSES = ("active", "paused", "completed", "blocked", "stopped")


def _cursor_encode(started_at: str, run_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([started_at, run_id])).decode()


def _cursor_decode(cursor: str) -> tuple[str, str]:
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, TypeError, orjson.JSONDecodeError):
        decoded = None
    # A list of two strings, as `_cursor_encode` writes.
    if not (isinstance(decoded, list) and len(decoded) == 2 and all(isinstance(part, str) for part in decoded)):
        raise BadRequest("`cursor` is not a cursor this API returned.", code="invalid_cursor")
    return decoded[0], decoded[1]


def _instant(value: str | None, name: str) -> str | None:
    """An ISO 8601 filter bound in the stored form (UTC, microseconds, `Z`), or 400."""
    if value is None:
        return None
    try:
        moment = parse_iso(value)
    except ValueError:
        raise BadRequest(f"`{name}` must be an ISO 8601 timestamp.", code="invalid_parameter") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return isoformat(moment)


async def list_runs(store: EventStore, *, agent_id: str | None = None, status: str | None = None,
                    since: str | None = None, until: str | None = None, limit: int = 50,
                    cursor: str | None = None, offset: int = 0) -> tuple[list[Row], str | None]:
    """Runs newest first, filtered; returns the page and the cursor of the next page (or None). Pages follow
    `cursor` (stable while runs start) or skip `offset` runs (what the `rungate` SDK's `offset` asks)."""
    if status is not None and status not in RUN_STATUSES:
        raise BadRequest(f"`status` must be one of {', '.join(RUN_STATUSES)}.", code="invalid_status")
    if limit < 1:
        raise BadRequest("`limit` must be at least 1.", code="invalid_parameter")
    since, until = _instant(since, "since"), _instant(until, "until")
    clauses: list[str] = []
    params: list[Any] = []
    for column, op, value in (("agent_id", "=", agent_id), ("status", "=", status),
                              ("started_at", ">=", since), ("started_at", "<", until)):
        if value is not None:
            clauses.append(f"{column} {op} ?")
            params.append(value)
    if cursor:
        started_at, run_id = _cursor_decode(cursor)
        clauses.append("(started_at < ? OR (started_at = ? AND id < ?))")
        params.extend([started_at, started_at, run_id])
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = await store.fetch(f"SELECT * FROM runs {where} ORDER BY started_at DESC, id DESC LIMIT ? OFFSET ?",
                             (*params, limit + 1, offset))
    page = rows[:limit]
    next_cursor = _cursor_encode(page[-1]["started_at"], page[-1]["id"]) if len(rows) > limit else None
    return page, next_cursor


async def get_run(store: EventStore, run_id: str) -> Row | None:
    return await store.fetchone("SELECT * FROM runs WHERE id = ?", (run_id,))


async def run_steps(store: EventStore, run_id: str, *, limit: int | None = None, offset: int = 0) -> list[Row]:
    """The run's steps in order: all of them, or `limit` after the first `offset`."""
    return await store.fetch("SELECT * FROM steps WHERE run_id = ? ORDER BY seq LIMIT ? OFFSET ?",
                             (run_id, -1 if limit is None else limit, offset))


async def agent_by_token_hash(store: EventStore, digest: str) -> Row | None:
    return await store.fetchone("SELECT id, name, disabled, token_hash, policy_id FROM agents WHERE token_hash = ?",
                                (digest,))


async def newest_provider_key(store: EventStore, provider: str) -> Row | None:
    return await store.fetchone(
        "SELECT id, nonce, ciphertext FROM provider_keys WHERE provider = ? ORDER BY position DESC LIMIT 1",
        (provider,))


async def provider_key_by_name(store: EventStore, name: str) -> Row | None:
    return await store.fetchone("SELECT id, provider, nonce, ciphertext FROM provider_keys WHERE name = ?", (name,))


async def provider_key_count(store: EventStore) -> int:
    row = await store.fetchone("SELECT count(*) AS n FROM provider_keys")
    return int(row["n"]) if row else 0


async def get_step(store: EventStore, step_id: str) -> Row | None:
    return await store.fetchone("SELECT * FROM steps WHERE id = ?", (step_id,))


async def idle_auto_runs(store: EventStore, now: str, default_s: int, limit: int = 500) -> list[str]:
    """Active auto-runs with no call in flight and no activity within their idle window: their policy's
    `runs.idle_timeout_s` (fixed when the run started), else `default_s`."""
    # (A run whose held answer waits for approval or delivery is not idle: CloseIdleRun re-checks it too.)
    quiet = ("SELECT id FROM runs WHERE status = 'active' AND auto = 1 AND open_steps = 0 AND last_activity_at < ?"
             " AND NOT EXISTS (SELECT 1 FROM holds WHERE holds.run_id = runs.id AND holds.open = 1)"
             " AND idle_timeout_s {} LIMIT ?")
    found = [row["id"] for row in await store.fetch(quiet.format("IS NULL"), (iso_minus(now, default_s), limit))]
    # Runs with a window of their own: one query per distinct window (policies have few).
    windows = await store.fetch("SELECT DISTINCT idle_timeout_s FROM runs WHERE status = 'active' AND auto = 1"
                                " AND idle_timeout_s IS NOT NULL")
    for row in windows:
        window = int(row["idle_timeout_s"])
        found += [r["id"] for r in await store.fetch(quiet.format("= ?"), (iso_minus(now, window), window, limit))]
    return found


async def open_steps_started_before(store: EventStore, before: str, limit: int = 500) -> list[str]:
    rows = await store.fetch("SELECT id FROM steps WHERE status = 'started' AND started_at < ? LIMIT ?",
                             (before, limit))
    return [row["id"] for row in rows]


async def head_position(store: EventStore) -> int:
    """The position of the log's newest event (0 for an empty log)."""
    row = await store.fetchone("SELECT max(position) AS head FROM events")
    return int(row["head"] or 0) if row is not None else 0


async def log_head(store: EventStore) -> Anchor | None:
    """(position, hash) of the log's newest event; None for an empty log."""
    row = await store.fetchone("SELECT position, hash FROM events ORDER BY position DESC LIMIT 1")
    return (int(row["position"]), row["hash"]) if row is not None else None


async def stops_between(store: EventStore, after: int, upto: int) -> list[tuple[str, int]]:
    """(run id, position) of every `RunStopped` in positions `after` (exclusive) to `upto`, oldest first."""
    rows = await store.fetch("SELECT position, data FROM events WHERE position > ? AND position <= ?"
                             " AND type = 'RunStopped' ORDER BY position", (after, upto))
    return [(orjson.loads(row["data"])["run_id"], int(row["position"])) for row in rows]


# Agents as views show them: with the name of their default policy.
_AGENTS = ("SELECT agents.*, policies.name AS policy_name FROM agents"
           " LEFT JOIN policies ON policies.id = agents.policy_id")


async def get_agent(store: EventStore, agent_id: str) -> Row | None:
    return await store.fetchone(f"{_AGENTS} WHERE agents.id = ?", (agent_id,))


async def agent_by_name(store: EventStore, name: str) -> Row | None:
    return await store.fetchone(f"{_AGENTS} WHERE agents.name = ?", (name,))


async def list_agents(store: EventStore) -> list[Row]:
    return await store.fetch(f"{_AGENTS} ORDER BY agents.created_at, agents.id")


async def list_provider_keys(store: EventStore, provider: str | None = None) -> list[Row]:
    if provider:
        return await store.fetch("SELECT * FROM provider_keys WHERE provider = ? ORDER BY position", (provider,))
    return await store.fetch("SELECT * FROM provider_keys ORDER BY position")


async def get_provider_key(store: EventStore, key_id: str) -> Row | None:
    return await store.fetchone("SELECT * FROM provider_keys WHERE id = ?", (key_id,))


async def get_policy(store: EventStore, policy_id: str) -> Row | None:
    """A live policy's current version (deleted policies are not found)."""
    return await store.fetchone("SELECT * FROM policies WHERE id = ? AND deleted = 0", (policy_id,))


async def policy_by_name(store: EventStore, name: str) -> Row | None:
    return await store.fetchone("SELECT * FROM policies WHERE name = ? AND deleted = 0", (name,))


async def list_policies(store: EventStore) -> list[Row]:
    return await store.fetch("SELECT * FROM policies WHERE deleted = 0 ORDER BY name")


async def policy_versions(store: EventStore, policy_id: str) -> list[Row]:
    return await store.fetch("SELECT * FROM policy_versions WHERE policy_id = ? ORDER BY version", (policy_id,))


async def policy_version(store: EventStore, policy_id: str, version: int) -> Row | None:
    """One version of a policy, deleted or not (runs keep the version they started with)."""
    return await store.fetchone("SELECT * FROM policy_versions WHERE policy_id = ? AND version = ?",
                                (policy_id, version))



async def run_limit_pusd(store: EventStore, run: Row) -> int | None:
    """The run's USD cap: its bound policy version's `budget.hard_limit_usd` plus operator top-ups."""
    if run.get("policy_id") is None:
        return None
    policy = cached_policy(run["policy_id"], int(run["policy_version"]))
    if policy is None:
        row = await policy_version(store, run["policy_id"], int(run["policy_version"]))
        if row is None:
            return None
        policy = compile_policy(row["policy_id"], row["version"], row["document"])
    if policy.run_limit_pusd is None:
        return None
    return policy.run_limit_pusd + int(run["budget_add_pusd"])


APPROVAL_STATUSES = ("pending", "approved", "rejected", "expired")


async def list_approval_requests(store: EventStore, *, agent_id: str | None = None, run_id: str | None = None,
                                 status: str | None = None, now: str, limit: int = 100) -> list[Row]:
    """Gates newest first, filtered. `status` is as shown (a pending gate past its expiry is `expired`)."""
    if status is not None and status not in APPROVAL_STATUSES:
        raise BadRequest(f"`status` must be one of {', '.join(APPROVAL_STATUSES)}.", code="invalid_status")
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (("agent_id", agent_id), ("run_id", run_id)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    # One SELECT per part, joined by UNION ALL; each walks an index newest first where one serves its status.
    parts: list[tuple[str, tuple[Any, ...]]] = [("", ())]
    if status == "pending":
        parts = [("status = 'pending' AND expires_at > ?", (now,))]
    elif status == "expired":
        # Two parts merged, not one OR: the gates recorded as expired come off their index in order, and only
        # the pending ones past their expiry (which the sweeper keeps few) are sorted.
        parts = [("status = 'expired'", ()), ("status = 'pending' AND expires_at <= ?", (now,))]
    elif status is not None:
        parts = [("status = ?", (status,))]
    selects: list[str] = []
    values: list[Any] = []
    for condition, extra in parts:
        where = " AND ".join(clause for clause in (*clauses, condition) if clause)
        selects.append("SELECT * FROM gates" + (f" WHERE {where}" if where else ""))
        values.extend([*params, *extra])
    return await store.fetch(f"{' UNION ALL '.join(selects)} ORDER BY created_at DESC, id DESC LIMIT ?",
                             (*values, limit))


async def get_approval_request(store: EventStore, gate_id: str) -> Row | None:
    return await store.fetchone("SELECT * FROM gates WHERE id = ?", (gate_id,))


async def hold_gates(store: EventStore, hold_id: str) -> list[Row]:
    return await store.fetch("SELECT * FROM gates WHERE hold_id = ? ORDER BY position, id", (hold_id,))


async def get_hold(store: EventStore, hold_id: str) -> Row | None:
    return await store.fetchone("SELECT * FROM holds WHERE id = ?", (hold_id,))


async def hold_progress(store: EventStore, hold_id: str) -> tuple[Row | None, list[Row]]:
    """What a waiting call polls: its hold's state and its gates' (not the held answer itself)."""
    hold = await store.fetchone("SELECT id, run_id, status, rule, decided_by, reason, gate_ids, origin FROM holds"
                                " WHERE id = ?", (hold_id,))
    gates = await store.fetch("SELECT status, expires_at, on_expiry FROM gates WHERE hold_id = ?", (hold_id,))
    return hold, gates


async def expired_gates(store: EventStore, now: str, limit: int = 500) -> list[str]:
    """Pending gates past their expiry (the sweeper records each one's expiry)."""
    rows = await store.fetch("SELECT id FROM gates WHERE status = 'pending' AND expires_at <= ? LIMIT ?", (now, limit))
    return [row["id"] for row in rows]
