"""The public shapes of runs, steps, agents and keys (SPEC §7): read-model rows → JSON objects."""

from __future__ import annotations

from typing import Any

import orjson

from rungate import queries
from rungate.prices import format_usd
from rungate.store import EventStore, Row


def run_view(row: Row, limit_pusd: int | None = None) -> dict[str, Any]:
    """A run; `limit_pusd` is its USD cap (its policy's plus top-ups), None when none applies."""
    return {
        "id": row["id"],
        "agent_id": row["agent_id"],
        "status": row["status"],
        "auto": bool(row["auto"]),
        "policy": orjson.loads(row["policy"]) if row["policy"] else None,
        "started_at": row["started_at"],
        "ended_at": row["ended_at"],
        "ended_reason": row["ended_reason"],
        "metadata": orjson.loads(row["metadata"]),
        "step_count": row["step_count"],
        "tokens": {"input": row["tokens_input"], "output": row["tokens_output"]},
        "spend_usd": format_usd(row["spend_pusd"]),
        "reserved_usd": format_usd(row["reserved_pusd"]),
        "unpriced_steps": row["unpriced_steps"],
        "budget_limit_usd": None if limit_pusd is None else format_usd(limit_pusd),
        "budget_remaining_usd": None if limit_pusd is None else format_usd(
            max(0, limit_pusd - row["spend_pusd"] - row["reserved_pusd"])),
        "last_activity_at": row["last_activity_at"],
    }


async def budgeted_run_view(store: EventStore, row: Row) -> dict[str, Any]:
    """`run_view` with the run's USD cap read from the policy version it is bound to (the operator's view)."""
    return run_view(row, await queries.run_limit_pusd(store, row))


def step_view(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "run_id": row["run_id"],
        "seq": row["seq"],
        "kind": row["kind"],
        "endpoint": row["endpoint"],
        "provider": row["provider"],
        "model": row["model"],
        "tool": row["tool"],
        "stream": bool(row["stream"]),
        "status": row["status"],
        "http_status": row["http_status"],
        "tokens": {"input": row["tokens_input"], "output": row["tokens_output"], "cached": row["tokens_cached"],
                   "cache_write": row["tokens_cache_write"], "reasoning": row["tokens_reasoning"]},
        "cost_usd": None if row["cost_pusd"] is None else format_usd(row["cost_pusd"]),
        "unpriced": bool(row["unpriced"]),
        "estimated": bool(row["estimated"]),
        "reserved_usd": format_usd(row["reserved_pusd"]),
        "latency_ms": row["latency_ms"],
        "error": row["error"],
        "tool_calls": orjson.loads(row["tool_calls"]),
        "started_at": row["started_at"],
        "ended_at": row["ended_at"],
    }


def agent_view(row: Row, token: str | None = None) -> dict[str, Any]:
    """An agent; `policy` names its default policy (`{"id", "name"}`) or is null."""
    view: dict[str, Any] = {
        "id": row["id"],
        "name": row["name"],
        "status": "disabled" if row["disabled"] else "active",
        "policy": {"id": row["policy_id"], "name": row.get("policy_name")} if row.get("policy_id") else None,
        "metadata": orjson.loads(row["metadata"]),
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }
    if token is not None:
        view["token"] = token
        view["api_key"] = token  # the name the `rungate` SDK's docs use
    return view


def provider_key_view(row: Row) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "provider": row["provider"], "hint": row["hint"],
            "created_at": row["created_at"]}


def approval_view(row: Row, now: str) -> dict[str, Any]:
    """An approval request (SPEC §7): a gate on one proposed tool call. A pending gate past its expiry shows
    as `expired` (the sweeper records the expiry moments later)."""
    status = row["status"]
    if status == "pending" and row["expires_at"] <= now:
        status = "expired"
    return {
        "id": row["id"],
        "run_id": row["run_id"],
        "agent_id": row["agent_id"],
        "hold_id": row["hold_id"],
        "tool": row["tool"],
        "tool_call_id": row["tool_call_id"],
        "args": None if row["args"] is None else orjson.loads(row["args"]),
        "args_text": row["args_text"],
        "rule": row["rule"],
        "policy": orjson.loads(row["policy"]) if row["policy"] else None,
        "channel": row["channel"],
        "status": status,
        "created_at": row["created_at"],
        "expires_at": row["expires_at"],
        "on_expiry": row["on_expiry"],
        "decided_by": row["decided_by"],
        "decided_at": row["decided_at"],
        "reason": row["reason"],
        "edited_args": None if row["edited_args"] is None else orjson.loads(row["edited_args"]),
    }
