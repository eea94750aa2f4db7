"""Agent-facing routes (agent token): the proxied provider endpoints and run control."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from rungate import queries
from rungate.auth import authenticate_agent
from rungate.enforce.policy import CompiledPolicy, cached_policy, compile_policy
from rungate.enforce.rules import model_allowed
from rungate.errors import BadRequest
from rungate.events import canonical_json
from rungate.events.catalogue import ToolStepLogged
from rungate.ids import is_valid_client_id, new_id
from rungate.prices import parse_usd
from rungate.proxy.bodies import read_json_object
from rungate.proxy.call import warning_header
from rungate.proxy.failover import serves
from rungate.proxy.formats import CHAT, EMBEDDINGS, MESSAGES, RESPONSES
from rungate.proxy.gating import awaiting_response
from rungate.proxy.handler import POLICY_PIN, proxy_call
from rungate.proxy.keys import PRICES, SETTINGS, STORE
from rungate.runs import CompleteRun, LogToolStep, agent_disabled
from rungate.store import Row
from rungate.views import run_view, step_view

routes = web.RouteTableDef()
MAX_TOKENS = 10**12  # far beyond any real call, far below the 64-bit columns that sum them
MAX_LATENCY_MS = 10**10  # about 115 days
MAX_STATUS_CHARS = 100


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await proxy_call(request, CHAT)


@routes.post("/v1/responses")
async def responses(request: web.Request) -> web.StreamResponse:
    return await proxy_call(request, RESPONSES)


@routes.post("/v1/messages")
@routes.post("/v1/v1/messages")
async def messages(request: web.Request) -> web.StreamResponse:
    return await proxy_call(request, MESSAGES)


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.StreamResponse:
    return await proxy_call(request, EMBEDDINGS)


async def _listing_policy(request: web.Request, agent: Row) -> CompiledPolicy | None:
    """The policy a run this agent starts now is bound to: the one `x-rungate-policy` names, else the agent's."""
    store = request.app[STORE]
    pin = request.headers.get("x-rungate-policy")
    if pin is not None:
        match = POLICY_PIN.match(pin.strip())
        if match is None:
            raise BadRequest("The policy must be given as NAME or NAME@VERSION.", code="invalid_policy_name")
        row = await queries.policy_by_name(store, match["name"])
        version = int(match["version"]) if match["version"] else None
        if row is None or (version is not None and version > int(row["version"])):
            raise BadRequest(f"Policy {pin.strip()} not found.", code="unknown_policy")
    else:
        row = await queries.get_policy(store, agent["policy_id"]) if agent.get("policy_id") else None
        version = None
    if row is None:
        return None
    version = version or int(row["version"])
    compiled = cached_policy(row["id"], version)
    if compiled is None:
        stored = await queries.policy_version(store, row["id"], version)
        assert stored is not None  # versions are never deleted
        compiled = compile_policy(row["id"], version, stored["document"])
    return compiled


@routes.get("/v1/models")
async def models(request: web.Request) -> web.Response:
    """The models this agent's policy lets it call (SPEC §3), in the caller's format (Anthropic when
    `anthropic-version` is sent): the models Rungate can price and the names routes give, less those the
    policy's model lists refuse (lists in shadow mode refuse nothing)."""
    agent = await authenticate_agent(request, request.app[STORE], refuse_disabled=False)
    policy = await _listing_policy(request, agent)
    if agent["disabled"]:  # refused naming the policy its calls would run under, like its calls' refusals
        raise agent_disabled(None, policy)
    anthropic = "anthropic-version" in request.headers
    fmt = MESSAGES if anthropic else CHAT  # a route name is listed when a target can serve this format
    provider = fmt.provider
    names = [(p.provider or "rungate", p.model) for p in request.app[PRICES]
             if (not anthropic or p.provider == "anthropic") and model_allowed(policy, p.provider or "", p.model)]
    priced = {model for _, model in names}
    route_tables = (*([policy.routes] if policy is not None else []), request.app[SETTINGS].routes)
    for table in route_tables:
        for name, targets in table.exact.items():
            usable = any(serves(fmt, spec) and model_allowed(policy, spec.provider, spec.model) for spec in targets)
            if usable and name not in priced and model_allowed(policy, provider, name):
                names.append(("rungate", name))
                priced.add(name)
    if anthropic:
        items = [{"type": "model", "id": model, "display_name": model, "created_at": "2026-01-01T00:00:00Z"}
                 for _, model in names]
        return web.json_response({"data": items, "has_more": False,
                                  "first_id": items[0]["id"] if items else None,
                                  "last_id": items[-1]["id"] if items else None})
    return web.json_response({"object": "list", "data": [
        {"id": model, "object": "model", "created": 1767225600, "owned_by": owner} for owner, model in names]})


def _run_id(request: web.Request) -> str:
    run_id = request.match_info["run_id"]
    if not is_valid_client_id(run_id):
        raise BadRequest("Run id must be 1-128 characters of letters, digits and _ . : -", code="invalid_run_id")
    return run_id


@routes.post("/v1/runs/{run_id}/complete")
async def complete_run(request: web.Request) -> web.Response:
    """Close the run (idempotent: completing a closed run returns it unchanged)."""
    store = request.app[STORE]
    agent = await authenticate_agent(request, store, refuse_disabled=False)
    run_id = _run_id(request)
    if agent["disabled"]:  # refused by the command, before the body is read: recorded, naming the run's policy
        await store.execute(CompleteRun(agent["id"], run_id, "", {}, refusing_disabled=True))
    _, body = await read_json_object(request, request.app[SETTINGS].max_body_bytes, allow_empty=True)
    reason = body.get("ended_reason", "agent_signaled")
    metadata = body.get("metadata")
    metadata = {} if metadata is None else metadata
    if not isinstance(reason, str) or not reason or len(reason) > 500:
        raise BadRequest("ended_reason must be a non-empty string of at most 500 characters.")
    if not isinstance(metadata, dict):
        raise BadRequest("metadata must be an object.")
    await store.execute(CompleteRun(agent["id"], run_id, reason, metadata))
    row = await queries.get_run(store, run_id)
    assert row is not None
    return web.json_response({"data": run_view(row)})


def _money(value: Any, field: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_usd(value)
    except ValueError as exc:
        raise BadRequest(f"{field} {exc}.") from None


def _tokens(value: Any) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest("tokens must be an object of non-negative integers.")
    out: dict[str, int] = {}
    for key in ("input", "output"):
        number = value.get(key, 0)
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= MAX_TOKENS:
            raise BadRequest(f"tokens.{key} must be an integer between 0 and {MAX_TOKENS}.")
        out[key] = number
    return out


@routes.post("/v1/runs/{run_id}/steps")
async def log_step(request: web.Request) -> web.Response:
    """Record a tool step the proxy cannot see (body of the `rungate` SDK's `log_tool_call`)."""
    store = request.app[STORE]
    # A disabled agent is refused by the command itself, before its body is read, so that the refusal is
    # recorded and names the run's policy.
    agent = await authenticate_agent(request, store, refuse_disabled=False)
    run_id = _run_id(request)
    if agent["disabled"]:
        await store.execute(LogToolStep(agent["id"], run_id, ToolStepLogged(
            step_id=new_id("stp"), run_id=run_id, tool="", status=""), refusing_disabled=True))
    _, body = await read_json_object(request, request.app[SETTINGS].max_body_bytes)
    tool = body.get("tool", body.get("name"))
    if not isinstance(tool, str) or not tool.strip() or len(tool) > 200 or not tool.isprintable():
        raise BadRequest("`tool` (or `name`) is required: the tool's name, printable, at most 200 characters.",
                         code="missing_tool")
    args = body.get("args", body.get("arguments", body.get("request", {})))
    result = body.get("result", body.get("response", {}))
    if not isinstance(args, dict) or not isinstance(result, dict):
        raise BadRequest("args and result must be objects.")
    status = body.get("status", "success")
    latency = body.get("latency_ms", 0)
    if (not isinstance(status, str) or not status.strip() or len(status) > MAX_STATUS_CHARS
            or not status.isprintable()):
        raise BadRequest(f"status must be a printable string of 1 to {MAX_STATUS_CHARS} characters.")
    if not isinstance(latency, (int, float)) or isinstance(latency, bool) or not 0 <= latency <= MAX_LATENCY_MS:
        raise BadRequest(f"latency_ms must be a number between 0 and {MAX_LATENCY_MS}.")
    error = body.get("error_message")
    step = ToolStepLogged(step_id=new_id("stp"), run_id=run_id, tool=tool.strip(), status=status,
                          provider=body.get("provider") if isinstance(body.get("provider"), str) else None,
                          args=args, result=result, usage=_tokens(body.get("tokens")),
                          cost_pusd=_money(body.get("cost_usd"), "cost_usd"), latency_ms=int(latency),
                          error=error if isinstance(error, str) else None)
    # The same step sent again is a retry of it (approval gates): the run and this fingerprint find its hold.
    fingerprint = "step:" + hashlib.sha256(canonical_json(body).encode()).hexdigest()
    command = LogToolStep(agent["id"], run_id, step, fingerprint=fingerprint)
    await store.execute(command)
    headers = {"x-rungate-warning": warning_header(command.warnings)} if command.warnings else {}
    if command.held is not None:  # an approval rule gates this tool call: 202 until a human decides
        gates = [gate.model_dump() for gate in command.held.gates]
        return _awaiting(run_id, command.held.hold_id, gates, headers)
    if command.hold is not None and command.hold_outcome == "pending":
        return _awaiting(run_id, command.hold["id"], await queries.hold_gates(store, command.hold["id"]), headers)
    step_id = command.hold["step_id"] if command.hold is not None else step.step_id
    row = await queries.get_step(store, step_id)
    assert row is not None
    return web.json_response({"data": step_view(row)}, status=201, headers=headers or None)


def _awaiting(run_id: str, hold_id: str, gates: Sequence[Any], headers: dict[str, str]) -> web.Response:
    return awaiting_response(run_id, hold_id, gates, {**headers, "x-rungate-run-id": run_id})
