"""Admin and audit routes under `/api` (admin token), plus `/health` and `/openapi.json`."""

from __future__ import annotations

import json
from typing import Any

import orjson
from aiohttp import web

from rungate import __version__, queries
from rungate.admin import (
    PROVIDERS,
    DeleteAgent,
    RemoveProviderKey,
    RotateAgentToken,
    UpdateAgent,
    add_provider_key,
    check_name,
    create_agent,
)
from rungate.approvals import DecideApproval, check_decision, refused_decision
from rungate.auth import bearer_token, check_admin
from rungate.clock import now_iso
from rungate.errors import BadRequest, Forbidden, NotFound, StoreError, Unauthorized
from rungate.ids import token_hash
from rungate.openapi import load_spec
from rungate.policy_admin import DeletePolicy, apply_policy, policy_view
from rungate.prices import parse_usd
from rungate.proxy.bodies import read_json_object
from rungate.proxy.gating import checked_edit
from rungate.proxy.keys import BREAKERS, INFLIGHT, KEYRING, SETTINGS, STORE, TARGETS
from rungate.runs import ResumeRun, StopRun, run_stream
from rungate.store import Append, EventStore
from rungate.views import agent_view, approval_view, budgeted_run_view, provider_key_view, step_view
from rungate.webhooks.admin import create_webhook, delete_webhook, rotate_webhook_secret, update_webhook
from rungate.webhooks.deliver import WEBHOOKS
from rungate.webhooks.views import delivery_view, get_webhook, list_deliveries, list_webhooks, webhook_view

routes = web.RouteTableDef()


def _data(value: Any, status: int = 200, **extra: Any) -> web.Response:
    return web.json_response({"data": value, **extra}, status=status, dumps=lambda v: orjson.dumps(v).decode())


async def _body(request: web.Request) -> dict[str, Any]:
    check_admin(request, request.app[SETTINGS])
    raw, body = await read_json_object(request, request.app[SETTINGS].max_body_bytes, allow_empty=True)
    if raw.strip():
        # JSON keeps the last of two equal keys without a word; in an operator's document (a policy's caps, a
        # webhook's events) that silently changes what was meant, so it is refused, as a YAML file's is.
        json.loads(raw, object_pairs_hook=_unique_keys)
    return body


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise BadRequest(f"The key {key!r} appears twice in one object of the request body.",
                             code="duplicate_key")
        seen[key] = value
    return seen


def _admin(request: web.Request) -> None:
    check_admin(request, request.app[SETTINGS])


def _found(row: dict[str, Any] | None, what: str) -> dict[str, Any]:
    """`row`, or 404 naming what was not found."""
    if row is None:
        raise NotFound(f"{what} not found.")
    return row


AGENT_STATUSES = ("active", "disabled")


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"`{name}` must be an integer.", code="invalid_parameter") from None
    if not low <= value <= high:
        raise BadRequest(f"`{name}` must be between {low} and {high}.", code="invalid_parameter")
    return value


# --- health and spec --------------------------------------------------------------------------------

@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    try:
        await request.app[STORE].ping()
    except StoreError:
        return web.json_response({"status": "unavailable", "version": __version__, "database": "unreachable"},
                                 status=503)
    return web.json_response({"status": "ok", "version": __version__, "database": "ok"})


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(load_spec())


@routes.get("/api/providers/health")
async def providers_health(request: web.Request) -> web.Response:
    """Each route target's circuit (SPEC §6): the configured targets, and any other this process called."""
    _admin(request)
    resolver = request.app[TARGETS]
    configured = [resolver.circuit(spec) for spec in request.app[SETTINGS].routes.targets()]
    return _data(request.app[BREAKERS].snapshot(configured), next=None)


# --- agents -----------------------------------------------------------------------------------------

@routes.post("/api/agents")
async def agents_create(request: web.Request) -> web.Response:
    body = await _body(request)
    if body.get("status", "active") not in AGENT_STATUSES:
        raise BadRequest(f"`status` must be one of {', '.join(AGENT_STATUSES)}.", code="invalid_status")
    store = request.app[STORE]
    policy = await _policy_name(store, body)
    row, token = await create_agent(store, body.get("name"), body.get("metadata"), policy)
    if body.get("status") == "disabled":  # created disabled: the same event a PATCH records
        await store.execute(UpdateAgent(row["id"], None, True, None))
        row = await _agent_or_404(request, row["id"])
    return _data(agent_view(row, token), status=201)


async def _policy_name(store: EventStore, body: dict[str, Any]) -> Any:
    """The default policy a create names: `policy` (a name), or `policy_id` (an id, as the `rungate` SDK sends
    it), resolved to its name; both must then name the same policy."""
    policy_id = body.get("policy_id")
    if policy_id is None:
        return body.get("policy")
    if not isinstance(policy_id, str):
        raise BadRequest("policy_id must be a policy's id (or null).", code="invalid_policy_name")
    row = await queries.get_policy(store, policy_id)
    if row is None:
        raise NotFound(f"Policy {policy_id} not found.")
    if body.get("policy") is not None and body["policy"] != row["name"]:
        raise BadRequest(f"policy ({body['policy']}) and policy_id ({policy_id}, named {row['name']}) name"
                         " different policies.", code="invalid_policy_name")
    return row["name"]


@routes.get("/api/agents")
async def agents_list(request: web.Request) -> web.Response:
    _admin(request)
    status, policy_id = request.query.get("status"), request.query.get("policy_id")
    if status is not None and status not in AGENT_STATUSES:
        raise BadRequest(f"`status` must be one of {', '.join(AGENT_STATUSES)}.", code="invalid_status")
    rows = [r for r in await queries.list_agents(request.app[STORE])
            if (status is None or bool(r["disabled"]) == (status == "disabled"))
            and (policy_id is None or r["policy_id"] == policy_id)]
    return _data([agent_view(r) for r in rows], next=None)


async def _agent_or_404(request: web.Request, agent_id: str) -> dict[str, Any]:
    return _found(await queries.get_agent(request.app[STORE], agent_id), f"Agent {agent_id}")


@routes.get("/api/agents/{agent_id}")
async def agents_get(request: web.Request) -> web.Response:
    _admin(request)
    return _data(agent_view(await _agent_or_404(request, request.match_info["agent_id"])))


def _agent_changes(body: dict[str, Any]) -> tuple[str | None, bool | None, dict[str, Any] | None]:
    name, metadata, disabled = body.get("name"), body.get("metadata"), None
    if name is not None:
        name = check_name(name, "Agent")
    if metadata is not None and not isinstance(metadata, dict):
        raise BadRequest("metadata must be an object.", code="invalid_metadata")
    if "status" in body:
        if body["status"] not in AGENT_STATUSES:
            raise BadRequest("status must be active or disabled.", code="invalid_status")
        disabled = body["status"] == "disabled"
    if "disabled" in body:
        if not isinstance(body["disabled"], bool):
            raise BadRequest("disabled must be a boolean.", code="invalid_disabled")
        disabled = body["disabled"]
    return name, disabled, metadata


@routes.put("/api/agents/{agent_id}")
@routes.patch("/api/agents/{agent_id}")
async def agents_update(request: web.Request) -> web.Response:
    body = await _body(request)
    agent_id = request.match_info["agent_id"]
    name, disabled, metadata = _agent_changes(body)
    await request.app[STORE].execute(UpdateAgent(agent_id, name, disabled, metadata, *_policy_change(body)))
    return _data(agent_view(await _agent_or_404(request, agent_id)))


def _policy_change(body: dict[str, Any]) -> tuple[bool, str | None]:
    """`"policy": NAME` makes that policy the default of the agent's new runs, `null` removes it; absent,
    the default stays. Applied by the same command as the agent's other changes (an unknown name refuses all)."""
    if "policy" not in body:
        return False, None
    policy = body["policy"]
    if policy is not None and not isinstance(policy, str):
        raise BadRequest("policy must be the name of a policy (or null).", code="invalid_policy_name")
    return True, policy


@routes.delete("/api/agents/{agent_id}")
async def agents_delete(request: web.Request) -> web.Response:
    _admin(request)
    await request.app[STORE].execute(DeleteAgent(request.match_info["agent_id"]))
    return _data({"id": request.match_info["agent_id"], "deleted": True})


@routes.put("/api/agents/by-name/{name}")
async def agents_upsert(request: web.Request) -> web.Response:
    body = await _body(request)
    store = request.app[STORE]
    existing = await queries.agent_by_name(store, request.match_info["name"])
    if existing is None:
        row, token = await create_agent(store, request.match_info["name"], body.get("metadata"), body.get("policy"))
        return _data(agent_view(row, token), status=201)
    _, disabled, metadata = _agent_changes(body)
    await store.execute(UpdateAgent(existing["id"], None, disabled, metadata, *_policy_change(body)))
    return _data(agent_view(await _agent_or_404(request, existing["id"])))


@routes.post("/api/agents/{agent_id}/rotate-key")
async def agents_rotate(request: web.Request) -> web.Response:
    await _body(request)
    command = RotateAgentToken(request.match_info["agent_id"])
    await request.app[STORE].execute(command)
    return _data(agent_view(await _agent_or_404(request, command.agent_id), command.token))


# --- provider keys ----------------------------------------------------------------------------------

@routes.post("/api/provider-keys")
async def keys_create(request: web.Request) -> web.Response:
    body = await _body(request)
    row = await add_provider_key(request.app[STORE], request.app[KEYRING], body.get("provider"),
                                 body.get("name"), body.get("api_key"))
    return _data(provider_key_view(row), status=201)


@routes.get("/api/provider-keys")
async def keys_list(request: web.Request) -> web.Response:
    _admin(request)
    provider = request.query.get("provider")
    if provider is not None and provider not in PROVIDERS:
        raise BadRequest(f"`provider` must be one of {', '.join(PROVIDERS)}.", code="invalid_provider")
    rows = await queries.list_provider_keys(request.app[STORE], provider)
    return _data([provider_key_view(r) for r in rows], next=None)


@routes.get("/api/provider-keys/{key_id}")
async def keys_get(request: web.Request) -> web.Response:
    _admin(request)
    key_id = request.match_info["key_id"]
    return _data(provider_key_view(_found(await queries.get_provider_key(request.app[STORE], key_id),
                                          f"Provider key {key_id}")))


@routes.delete("/api/provider-keys/{key_id}")
async def keys_delete(request: web.Request) -> web.Response:
    _admin(request)
    await request.app[STORE].execute(RemoveProviderKey(request.match_info["key_id"]))
    return _data({"id": request.match_info["key_id"], "deleted": True})


# --- policies ---------------------------------------------------------------------------------------

async def _policy_or_404(request: web.Request) -> dict[str, Any]:
    policy_id = request.match_info["policy_id"]
    return _found(await queries.get_policy(request.app[STORE], policy_id), f"Policy {policy_id}")


@routes.post("/api/policies")
async def policies_create(request: web.Request) -> web.Response:
    body = await _body(request)
    row, _ = await apply_policy(request.app[STORE], body, create_only=True)
    return _data(policy_view(row), status=201)


@routes.get("/api/policies")
async def policies_list(request: web.Request) -> web.Response:
    _admin(request)
    return _data([policy_view(r) for r in await queries.list_policies(request.app[STORE])], next=None)


@routes.get("/api/policies/{policy_id}")
async def policies_get(request: web.Request) -> web.Response:
    _admin(request)
    return _data(policy_view(await _policy_or_404(request)))


@routes.put("/api/policies/{policy_id}")
async def policies_update(request: web.Request) -> web.Response:
    """A new version of the policy (the document may rename it); the same document changes nothing."""
    body = await _body(request)
    row, _ = await apply_policy(request.app[STORE], body, policy_id=request.match_info["policy_id"])
    return _data(policy_view(row))


@routes.put("/api/policies/by-name/{name}")
async def policies_upsert(request: web.Request) -> web.Response:
    body = await _body(request)
    row, outcome = await apply_policy(request.app[STORE], body, name=request.match_info["name"])
    return _data(policy_view(row), status=201 if outcome == "created" else 200)


@routes.delete("/api/policies/{policy_id}")
async def policies_delete(request: web.Request) -> web.Response:
    _admin(request)
    await request.app[STORE].execute(DeletePolicy(request.match_info["policy_id"]))
    return _data({"id": request.match_info["policy_id"], "deleted": True})


@routes.get("/api/policies/{policy_id}/versions")
async def policies_versions(request: web.Request) -> web.Response:
    _admin(request)
    rows = await queries.policy_versions(request.app[STORE], request.match_info["policy_id"])
    if not rows:
        raise NotFound(f"Policy {request.match_info['policy_id']} not found.")
    return _data([policy_view(r) for r in rows], next=None)


@routes.get("/api/policies/{policy_id}/versions/{version}")
async def policies_version(request: web.Request) -> web.Response:
    _admin(request)
    raw = request.match_info["version"]
    row = (await queries.policy_version(request.app[STORE], request.match_info["policy_id"], int(raw))
           if raw.isascii() and raw.isdigit() and len(raw) < 10 else None)
    if row is None:
        raise NotFound(f"Version {raw} of policy {request.match_info['policy_id']} not found.")
    return _data(policy_view(row))


# --- runs -------------------------------------------------------------------------------------------

@routes.get("/api/runs")
async def runs_list(request: web.Request) -> web.Response:
    _admin(request)
    q = request.query
    if "offset" in q and "cursor" in q:
        raise BadRequest("Page with `cursor` or with `offset`, not both.", code="invalid_parameter")
    rows, next_cursor = await queries.list_runs(
        request.app[STORE], agent_id=q.get("agent_id"), status=q.get("status"), since=q.get("since"),
        until=q.get("until"), limit=_int_param(request, "limit", 50, 1, 500), cursor=q.get("cursor"),
        offset=_int_param(request, "offset", 0, 0, 2**31))
    store = request.app[STORE]
    return _data([await budgeted_run_view(store, r) for r in rows], next=next_cursor)


async def _run_or_404(request: web.Request) -> dict[str, Any]:
    run_id = request.match_info["run_id"]
    return _found(await queries.get_run(request.app[STORE], run_id), f"Run {run_id}")


@routes.get("/api/runs/{run_id}")
async def runs_get(request: web.Request) -> web.Response:
    _admin(request)
    run = await _run_or_404(request)
    return _data(await budgeted_run_view(request.app[STORE], run))


@routes.post("/api/runs/{run_id}/stop")
async def runs_stop(request: web.Request) -> web.Response:
    """The kill switch: every later call of the run is refused (403 `run_force_stopped`) and the calls in
    flight are cut — streams end with their format's error event, charged the tokens already relayed."""
    body = await _body(request)
    reason = body.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 500):
        raise BadRequest("reason must be a string of at most 500 characters.", code="invalid_reason")
    run_id = request.match_info["run_id"]
    await request.app[STORE].execute(StopRun(run_id, reason))
    cut = request.app[INFLIGHT].stop(run_id)
    run = await _run_or_404(request)
    return web.json_response({"data": await budgeted_run_view(request.app[STORE], run)},
                             headers={"x-rungate-calls-cut": str(cut)},
                             dumps=lambda v: orjson.dumps(v).decode())


@routes.post("/api/runs/{run_id}/resume")
async def runs_resume(request: web.Request) -> web.Response:
    """Let a stopped or blocked run take calls again; `{"add_usd": "…"}` raises its USD budget by that much."""
    body = await _body(request)
    add = body.get("add_usd", "0")
    try:
        if isinstance(add, bool) or not isinstance(add, str | int):  # floats are not money here
            raise ValueError(add)
        add_pusd = parse_usd(add)
    except ValueError:
        raise BadRequest("add_usd must be a decimal string from 0 to 1000000, such as \"2.50\".",
                         code="invalid_amount") from None
    await request.app[STORE].execute(ResumeRun(request.match_info["run_id"], add_pusd))
    run = await _run_or_404(request)
    return _data(await budgeted_run_view(request.app[STORE], run))


@routes.get("/api/runs/{run_id}/steps")
async def runs_steps(request: web.Request) -> web.Response:
    _admin(request)
    run = await _run_or_404(request)
    limit = _int_param(request, "limit", 1, 1, 10**6) if "limit" in request.query else None  # absent: all
    offset = _int_param(request, "offset", 0, 0, 2**31)
    steps = await queries.run_steps(request.app[STORE], run["id"], limit=limit, offset=offset)
    return _data([step_view(r) for r in steps], next=None)


@routes.get("/api/runs/{run_id}/ledger")
async def runs_ledger(request: web.Request) -> web.Response:
    _admin(request)
    run = await _run_or_404(request)
    steps = [step_view(r) for r in await queries.run_steps(request.app[STORE], run["id"])]
    view = await budgeted_run_view(request.app[STORE], run)
    return _data({"run_id": run["id"], "spend_usd": view["spend_usd"], "reserved_usd": view["reserved_usd"],
                  "entries": [{"step_id": s["id"], "kind": s["kind"], "model": s["model"], "tool": s["tool"],
                               "status": s["status"], "cost_usd": s["cost_usd"], "unpriced": s["unpriced"],
                               "estimated": s["estimated"], "at": s["ended_at"] or s["started_at"]}
                              for s in steps]})


@routes.get("/api/runs/{run_id}/events")
async def runs_events(request: web.Request) -> web.StreamResponse:
    """The run's event stream as NDJSON, exactly as stored, after `?after=POSITION`."""
    _admin(request)
    run = await _run_or_404(request)
    after = _int_param(request, "after", 0, 0, 2**62)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    store = request.app[STORE]
    while True:
        batch = await store.read_stream(run_stream(run["id"]), after_position=after, limit=1000)
        for rec in batch:
            await response.write(orjson.dumps(rec.as_line()) + b"\n")
        if len(batch) < 1000:
            break
        after = batch[-1].position
    await response.write_eof()
    return response


@routes.get("/api/log/head")
async def log_head(request: web.Request) -> web.Response:
    """The position and hash of the newest event: an anchor to keep outside this machine, which
    `rungate verify --anchor POSITION:HASH` checks later (the chain itself can be recomputed by whoever can
    write the database)."""
    _admin(request)
    head = await queries.log_head(request.app[STORE])
    if head is None:
        return _data({"position": 0, "hash": None, "anchor": None})
    return _data({"position": head[0], "hash": head[1], "anchor": f"{head[0]}:{head[1]}"})


# --- approval requests ------------------------------------------------------------------------------

@routes.get("/api/approval-requests")
async def approvals_list(request: web.Request) -> web.Response:
    _admin(request)
    q, now = request.query, now_iso()
    rows = await queries.list_approval_requests(
        request.app[STORE], agent_id=q.get("agent_id"), run_id=q.get("run_id"), status=q.get("status"), now=now,
        limit=_int_param(request, "limit", 100, 1, 500))
    return _data([approval_view(r, now) for r in rows], next=None)


async def _approval_or_404(request: web.Request, gate_id: str) -> dict[str, Any]:
    return _found(await queries.get_approval_request(request.app[STORE], gate_id), f"Approval request {gate_id}")


@routes.get("/api/approval-requests/{gate_id}")
async def approvals_get(request: web.Request) -> web.Response:
    _admin(request)
    return _data(approval_view(await _approval_or_404(request, request.match_info["gate_id"]), now_iso()))


async def _decide(request: web.Request, approve: bool) -> web.Response:
    """Approve or reject a pending gate, once; an agent's token trying to is refused and recorded."""
    gate_id = request.match_info["gate_id"]
    await _refuse_agents(request, gate_id)
    body = await _body(request)
    decided_by, reason = check_decision(body.get("decided_by"), body.get("reason"),
                                        body.get("edited_args") if approve else None)
    if not approve and "edited_args" in body:
        raise BadRequest("edited_args only applies to an approval.", code="invalid_edited_args")
    edited = body.get("edited_args") if approve else None
    await checked_edit(request.app[STORE], gate_id, edited)
    await request.app[STORE].execute(DecideApproval(gate_id, approve, decided_by, reason, edited))
    return _data(approval_view(await _approval_or_404(request, gate_id), now_iso()))


async def _refuse_agents(request: web.Request, gate_id: str) -> None:
    """A valid agent token is not an operator's: the attempt is recorded on the agent's stream, then 403.
    (Unknown tokens get the plain 401 and leave no event: anyone could make those.)"""
    try:
        check_admin(request, request.app[SETTINGS])
        return
    except Unauthorized:
        token = bearer_token(request)
        agent = None if token is None else await queries.agent_by_token_hash(request.app[STORE], token_hash(token))
        if agent is None:
            raise
    await request.app[STORE].execute(Append(refused_decision(gate_id, agent["id"],
                                                             "an agent token cannot decide approvals")))
    raise Forbidden("Only an operator (admin token) can decide an approval request.", code="forbidden")


@routes.post("/api/approval-requests/{gate_id}/approve")
async def approvals_approve(request: web.Request) -> web.Response:
    """Approve the gate; `edited_args` (an object) replaces the tool call's arguments in the released answer."""
    return await _decide(request, approve=True)


@routes.post("/api/approval-requests/{gate_id}/reject")
async def approvals_reject(request: web.Request) -> web.Response:
    """Reject the gate (`{"reason": …}`): every retry of the held request is refused with 403."""
    return await _decide(request, approve=False)


# --- webhooks ---------------------------------------------------------------------------------------

async def _webhook_or_404(request: web.Request) -> dict[str, Any]:
    webhook_id = request.match_info["webhook_id"]
    return _found(await get_webhook(request.app[STORE], webhook_id), f"Webhook {webhook_id}")


@routes.post("/api/webhooks")
async def webhooks_create(request: web.Request) -> web.Response:
    """Register a webhook; its signing secret is in this answer and never again."""
    body = await _body(request)
    row, secret = await create_webhook(request.app[STORE], request.app[KEYRING], body,
                                       allow_private=request.app[SETTINGS].webhook_allow_private)
    return _data(webhook_view(row, secret), status=201)


@routes.get("/api/webhooks")
async def webhooks_list(request: web.Request) -> web.Response:
    _admin(request)
    return _data([webhook_view(r) for r in await list_webhooks(request.app[STORE])], next=None)


@routes.get("/api/webhooks/{webhook_id}")
async def webhooks_get(request: web.Request) -> web.Response:
    _admin(request)
    return _data(webhook_view(await _webhook_or_404(request)))


@routes.patch("/api/webhooks/{webhook_id}")
async def webhooks_update(request: web.Request) -> web.Response:
    body = await _body(request)
    row = await update_webhook(request.app[STORE], request.match_info["webhook_id"], body,
                               allow_private=request.app[SETTINGS].webhook_allow_private)
    return _data(webhook_view(row))


@routes.delete("/api/webhooks/{webhook_id}")
async def webhooks_delete(request: web.Request) -> web.Response:
    _admin(request)
    await delete_webhook(request.app[STORE], request.match_info["webhook_id"])
    return _data({"id": request.match_info["webhook_id"], "deleted": True})


@routes.post("/api/webhooks/{webhook_id}/rotate-secret")
async def webhooks_rotate(request: web.Request) -> web.Response:
    """A new secret, shown once; the previous one keeps signing (a second signature) for the grace period."""
    await _body(request)
    row, secret = await rotate_webhook_secret(request.app[STORE], request.app[KEYRING],
                                              request.match_info["webhook_id"],
                                              request.app[SETTINGS].webhook_rotation_grace_s)
    return _data(webhook_view(row, secret))


@routes.get("/api/webhooks/{webhook_id}/deliveries")
async def webhooks_deliveries(request: web.Request) -> web.Response:
    _admin(request)
    row = await _webhook_or_404(request)
    rows = await list_deliveries(request.app[STORE], row["id"], status=request.query.get("status"),
                                 limit=_int_param(request, "limit", 100, 1, 500))
    return _data([delivery_view(r) for r in rows], next=None)


@routes.post("/api/webhooks/{webhook_id}/test")
async def webhooks_test(request: web.Request) -> web.Response:
    """Send one `webhook.test` envelope now (no retries) and answer how the receiver took it."""
    await _body(request)
    row = await _webhook_or_404(request)
    return _data(await request.app[WEBHOOKS].send_test(row))
