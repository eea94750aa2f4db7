"""Agent-facing routes (agent token): the proxied provider endpoints and run control."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from rungate import queries
from rungate.auth import authenticate_agent
from rungate.errors import BadRequest
from rungate.events import canonical_json
from rungate.events.catalogue import ToolStepLogged
from rungate.ids import is_valid_client_id, new_id
from rungate.prices import parse_usd
from rungate.proxy.bodies import read_json_object
from rungate.proxy.call import warning_header
from rungate.proxy.formats import CHAT, EMBEDDINGS, MESSAGES, RESPONSES
from rungate.proxy.gating import awaiting_response
from rungate.proxy.handler import proxy_call
from rungate.proxy.keys import PRICES, SETTINGS, STORE
from rungate.runs import CompleteRun, LogToolStep
from rungate.views import run_view, step_view

routes = web.RouteTableDef()
MAX_TOKENS = 10**12  # far beyond any real call, far below the 64-bit columns that sum them


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


@routes.get("/v1/models")
async def models(request: web.Request) -> web.Response:
    """The models Rungate can price, in the caller's format (Anthropic when `anthropic-version` is sent)."""
    await authenticate_agent(request, request.app[STORE])
    table = request.app[PRICES]
    if "anthropic-version" in request.headers:
        items = [{"type": "model", "id": p.model, "display_name": p.model, "created_at": "2026-01-01T00:00:00Z"}
                 for p in table if p.provider == "anthropic"]
        return web.json_response({"data": items, "has_more": False,
                                  "first_id": items[0]["id"] if items else None,
                                  "last_id": items[-1]["id"] if items else None})
    return web.json_response({"object": "list", "data": [
        {"id": p.model, "object": "model", "created": 1767225600, "owned_by": p.provider or "rungate"}
        for p in table]})


def _run_id(request: web.Request) -> str:
    run_id = request.match_info["run_id"]
    if not is_valid_client_id(run_id):
        raise BadRequest("Run id must be 1-128 characters of letters, digits and _ . : -", code="invalid_run_id")
    return run_id


@routes.post("/v1/runs/{run_id}/complete")
async def complete_run(request: web.Request) -> web.Response:
    """Close the run (idempotent: completing a closed run returns it unchanged)."""
    store = request.app[STORE]
    agent = await authenticate_agent(request, store)
    run_id = _run_id(request)
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
    agent = await authenticate_agent(request, store)
    run_id = _run_id(request)
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
    if not isinstance(status, str) or (not isinstance(latency, (int, float)) or isinstance(latency, bool)
                                       or latency < 0):
        raise BadRequest("status must be a string and latency_ms a non-negative number.")
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
