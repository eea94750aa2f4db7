"""Who is calling: agent tokens (`rg_agt_…`, stored as SHA-256) and admin tokens (`rg_adm_…`).

Lookups go by the token's SHA-256, so the database never compares a secret; the admin token is checked
with a constant-time comparison of digests.
"""

from __future__ import annotations

import hmac

from aiohttp import web

from rungate import queries
from rungate.config import Settings
from rungate.errors import Unauthorized
from rungate.ids import token_hash
from rungate.readcache import ReadCache
from rungate.runs import agent_disabled
from rungate.store import EventStore, Row


def bearer_token(request: web.Request) -> str | None:
    """The token from `Authorization: Bearer …` or `x-api-key` (Anthropic SDKs send either)."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    api_key = request.headers.get("x-api-key", "").strip()
    return api_key or None


async def authenticate_agent(request: web.Request, store: EventStore, *, cache: ReadCache | None = None,
                             refuse_disabled: bool = True) -> Row:
    """The calling agent's row (`id`, `name`, `disabled`, `token_hash`, `policy_id`).

    Raises `Unauthorized` when the token is missing or unknown, and the `agent_disabled` refusal when the
    agent is disabled (unless the caller records that refusal itself, as admission does). With `cache`,
    the row may be up to a second old: only for callers that re-check it atomically (the proxy's admission).
    """
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("Missing agent token: send Authorization: Bearer rg_agt_… or x-api-key.")
    digest = token_hash(token)
    if cache is None:
        row = await queries.agent_by_token_hash(store, digest)
    else:
        row = await cache.get(digest, lambda: queries.agent_by_token_hash(store, digest))
    if row is None:
        raise Unauthorized("Unknown agent token.")
    if refuse_disabled and row["disabled"]:
        raise agent_disabled(None)
    return row


def check_admin(request: web.Request, settings: Settings) -> None:
    """Accept only the configured admin token; `Unauthorized` otherwise (also when none is configured)."""
    token = bearer_token(request)
    expected = settings.admin_token
    if token is None or expected is None:
        raise Unauthorized("Admin token required: send Authorization: Bearer rg_adm_….")
    if not hmac.compare_digest(token_hash(token), token_hash(expected.get_secret_value())):
        raise Unauthorized("Unknown admin token.")
