"""The proxy recipe: authenticate → parse → admit (durably) → forward, along the route → meter → settle →
respond. This module reads the agent's request and admits it; `attempts` sends it to its route's targets,
`forward` makes each attempt, `relay` streams the answer, `holding` holds an answer for approval, and
`call` holds what every path shares (the call's state, its settlement, its headers).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aiohttp import web

from rungate.auth import authenticate_agent
from rungate.enforce.tools import offered_tools
from rungate.errors import BadRequest
from rungate.ids import is_valid_client_id
from rungate.providers.metering import estimate_input, prepare_chat_stream_request, web_search_limit
from rungate.proxy.attempts import record_admission, run_attempts
from rungate.proxy.bodies import read_json_object
from rungate.proxy.call import Budget, Call, settle_step, shielded
from rungate.proxy.failover import Planner
from rungate.proxy.formats import CHAT, RESPONSES, WireFormat
from rungate.proxy.gating import APPROVAL_MODE_HEADER, APPROVAL_MODES
from rungate.proxy.holding import answer_from_hold
from rungate.proxy.keys import AGENTS, BREAKERS, INFLIGHT, PRICES, SETTINGS, STORE, TARGETS
from rungate.proxy.upstream import Target
from rungate.runs import AdmitCall, CallFacts

_TRUE = {"1", "true", "yes"}
_FALSE = {"", "0", "false", "no"}
_MAX_MODEL_CHARS = 256
MAX_OUTPUT_TOKENS = 10**8  # an output limit asked above this is refused (400)
# `x-rungate-policy` (or the body's `rungate.policy`): `NAME` or `NAME@VERSION`.
POLICY_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]{0,99})(?:@(?P<version>[1-9][0-9]{0,8}))?$")


def _max_output(body: dict[str, Any], fmt: WireFormat) -> int | None:
    """The output limit the call asks for (a value of another type is the provider's to refuse)."""
    for key in fmt.max_tokens_keys:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            if value > MAX_OUTPUT_TOKENS:  # no model writes this much; its worst case would not fit the ledger
                raise BadRequest(f"`{key}` must be at most {MAX_OUTPUT_TOKENS}.", code="invalid_max_tokens")
            return value
    return None


@dataclass(frozen=True)
class RunOptions:
    """How a call asks to be grouped: its run id, a fresh run, and the policy a run it starts binds to."""

    run_id: str | None
    new_run: bool
    policy_name: str | None
    policy_version: int | None


def _choices(body: dict[str, Any], fmt: WireFormat) -> int:
    """How many answers the call asks for (OpenAI chat `n`; 1 elsewhere)."""
    n = body.get("n") if fmt is CHAT else None
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 < n <= 128 else 1


def _continues(body: dict[str, Any], fmt: WireFormat) -> str | None:
    """The Responses API answer the call continues (`previous_response_id`): the provider adds that answer's
    input and output to the call's input, which the request's own bytes do not show."""
    previous = body.get("previous_response_id") if fmt is RESPONSES else None
    return previous if isinstance(previous, str) and 0 < len(previous) <= 256 else None


def _run_options(request: web.Request, body: dict[str, Any]) -> RunOptions:
    """The run options from headers or the body's `rungate` key (removed from the body); headers win."""
    options = body.pop("rungate", None)
    if options is not None and not isinstance(options, dict):
        raise BadRequest("The `rungate` key must be an object.", code="invalid_rungate_options")
    options = options or {}
    run_id = request.headers.get("x-rungate-run-id") or options.get("run_id")
    if run_id is not None and (not isinstance(run_id, str) or not is_valid_client_id(run_id)):
        raise BadRequest("Run id must be 1-128 characters of letters, digits and _ . : -", code="invalid_run_id")
    header = request.headers.get("x-rungate-new-run", "").strip().lower()
    if header not in _TRUE and header not in _FALSE:
        raise BadRequest("x-rungate-new-run must be true or false.", code="invalid_rungate_options")
    new_run = options.get("new_run", False)
    if not isinstance(new_run, bool):
        raise BadRequest("`rungate.new_run` must be a boolean.", code="invalid_rungate_options")
    new_run = new_run or header in _TRUE
    pin = request.headers.get("x-rungate-policy") or options.get("policy")
    name, version = None, None
    if pin is not None:
        match = POLICY_PIN.match(pin.strip()) if isinstance(pin, str) else None
        if match is None:
            raise BadRequest("The policy must be given as NAME or NAME@VERSION.", code="invalid_policy_name")
        name, version = match["name"], int(match["version"]) if match["version"] else None
    return RunOptions(run_id, new_run, name, version)


def _approval_mode(request: web.Request) -> str | None:
    """`x-rungate-approval-mode: 202 | hold`, how a held answer is waited for (absent: as its rule says)."""
    raw = request.headers.get(APPROVAL_MODE_HEADER)
    if raw is None:
        return None
    mode = raw.strip().lower()
    if mode not in APPROVAL_MODES:
        raise BadRequest(f"{APPROVAL_MODE_HEADER} must be one of {', '.join(APPROVAL_MODES)}.",
                         code="invalid_approval_mode")
    return mode


def _validate(body: dict[str, Any], fmt: WireFormat) -> str:
    model = body.get("model")
    if (not isinstance(model, str) or not model.strip() or len(model) > _MAX_MODEL_CHARS
            or not model.isprintable()):
        raise BadRequest(f"`model` is required: a printable string of at most {_MAX_MODEL_CHARS} characters.",
                         code="missing_model")
    for key in fmt.required:
        if key not in body:
            raise BadRequest(f"`{key}` is required.", code=f"missing_{key}")
    if "messages" in fmt.required and not isinstance(body.get("messages"), list):
        raise BadRequest("`messages` must be an array.", code="invalid_messages")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise BadRequest("`stream` must be a boolean.", code="invalid_stream")
    return model


async def proxy_call(request: web.Request, fmt: WireFormat) -> web.StreamResponse:
    """Handle one agent call in `fmt`; see the module docstring for the recipe."""
    app = request.app
    settings, store, prices = app[SETTINGS], app[STORE], app[PRICES]
    # A disabled agent is refused by the admission itself, so that the refusal is recorded.
    agent = await authenticate_agent(request, store, cache=app[AGENTS], refuse_disabled=False)
    structlog.contextvars.bind_contextvars(agent_id=agent["id"])
    _, body = await read_json_object(request, settings.max_body_bytes)
    model = _validate(body, fmt)
    options = _run_options(request, body)
    approval_mode = _approval_mode(request)
    stream = body.get("stream") is True and fmt.meter is not None
    client_wants_usage = False
    if fmt is CHAT and stream:
        body, client_wants_usage = prepare_chat_stream_request(body)
    estimate = estimate_input(body)
    input_estimate = estimate.tokens
    choices = _choices(body, fmt)
    # The request's fingerprint: its endpoint and its canonical body (keys sorted), so a retry is the same
    # request whatever its key order, and the same body sent to another endpoint is another request.
    canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    fingerprint = hashlib.sha256(fmt.name.encode() + b"\n" + canonical).hexdigest()
    # Prompt caching asked for anywhere (Anthropic's `cache_control`, on the request or a block): the input may
    # be billed at a cache-write rate, dearer than the input rate, so the worst case counts it so. (As a key it
    # is `"cache_control":`; the same words inside a string are escaped and do not match.) Bodies in OpenAI's
    # formats are searched too: a target with an OpenAI-compatible API may serve Anthropic models and honour
    # the key.
    cache_writes = b'"cache_control":' in canonical
    searches = web_search_limit(body)  # their fees are part of the worst case
    offered = offered_tools(body)
    # The route's targets are picked inside the admission, once the run's policy (whose routes win) is known;
    # the first target's worst case is what the admission reserves.
    planner = Planner(fmt, model, settings.routes, prices, app[BREAKERS], app[TARGETS].circuit, input_estimate,
                      _max_output(body, fmt), choices, cache_writes, searches, estimate.images)
    admit = AdmitCall(CallFacts(
        agent_id=agent["id"], token_hash=agent["token_hash"], run_id=options.run_id, new_run=options.new_run,
        endpoint=fmt.name, provider=fmt.provider, model=model, stream=stream, fingerprint=fingerprint,
        reserved_pusd=0, idle_timeout_s=settings.idle_timeout_s, tools=offered, policy_name=options.policy_name,
        policy_version=options.policy_version, input_tokens=input_estimate, embedding=fmt.meter is None,
        choices=choices, planner=planner, cache_writes=cache_writes, web_searches=searches,
        previous_response_id=_continues(body, fmt)))
    # Until a target is resolved the call names the model as asked (a retry answered from a hold keeps it).
    call = Call(fmt, agent["id"], "", admit.step_id, Target(fmt.provider, model, "", "", ""), stream,
                input_estimate, 0, fingerprint=fingerprint, offered=offered, approval_mode=approval_mode,
                model_asked=model)
    await record_admission(store, admit, call)
    call.policy = admit.policy
    call.warnings.extend(admit.warnings)
    if admit.hold is not None:  # a retry of a held request: answered from the hold, nothing goes upstream
        call.settled = True
        return await answer_from_hold(request, call, admit)
    plan = admit.plan
    assert plan is not None  # the planner ran: the call was admitted
    call.reserved_pusd, call.routed, call.input_estimate = admit.reserved_pusd, plan.routed, plan.input_tokens
    if admit.policy is not None:
        call.budget = Budget.after_admission(admit)
    structlog.contextvars.bind_contextvars(run_id=admit.run_id)
    inflight = app[INFLIGHT]
    inflight.add(call)
    try:
        return await run_attempts(request, call, admit, planner, plan, body, client_wants_usage)
    finally:
        inflight.discard(call)
        if not call.settled:  # cancelled or crashed before settling: close the books with what was seen
            usage, estimated = call.seen_usage()
            await shielded(settle_step(store, prices, call, status="aborted", http_status=None, usage=usage,
                                    estimated=estimated, error="handler aborted"))
