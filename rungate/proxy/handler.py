"""The proxy recipe: authenticate → parse → admit (durably) → forward → meter → settle → respond.

Streams are relayed one SSE event at a time. Whatever happens (upstream error, cut stream, client gone,
cancellation), the step is settled exactly once in a `finally`, so its reservation never leaks.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web
from multidict import CIMultiDict

from rungate.auth import authenticate_agent
from rungate.errors import BadRequest, ProviderError
from rungate.events import NewEvent
from rungate.events.catalogue import StepCompleted
from rungate.ids import is_valid_client_id
from rungate.log import get_logger
from rungate.prices import PriceTable, format_usd, to_pico
from rungate.providers.metering import estimate_input_tokens, prepare_chat_stream_request
from rungate.providers.sse import SSEParser, encode_event
from rungate.proxy.bodies import read_json_object
from rungate.proxy.formats import CHAT, StreamMeter, WireFormat, stream_error_event
from rungate.proxy.keys import HTTP, PRICES, SETTINGS, STORE, TARGETS
from rungate.proxy.upstream import Target, relayed_headers, upstream_headers
from rungate.runs import AdmitCall, CallFacts, run_stream
from rungate.store import Append, EventStore
from rungate.usage import Usage

log = get_logger("rungate.proxy")
_TRUE = {"1", "true", "yes"}


@dataclass
class Call:
    """Everything known about one proxied call, from admission to settlement."""

    fmt: WireFormat
    agent_id: str
    run_id: str
    step_id: str
    target: Target
    stream: bool
    input_estimate: int
    reserved_pusd: int
    started: float = field(default_factory=time.monotonic)
    settled: bool = False
    usage: Usage = field(default_factory=Usage)
    cost_pusd: int | None = 0
    warnings: list[str] = field(default_factory=list)


def _max_output(body: dict[str, Any], fmt: WireFormat) -> int | None:
    for key in fmt.max_tokens_keys:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _run_options(request: web.Request, body: dict[str, Any]) -> tuple[str | None, bool]:
    """The run id and new-run flag from headers or the body's `rungate` key (removed from the body)."""
    options = body.pop("rungate", None)
    if options is not None and not isinstance(options, dict):
        raise BadRequest("The `rungate` key must be an object.", code="invalid_rungate_options")
    options = options or {}
    run_id = request.headers.get("x-rungate-run-id") or options.get("run_id")
    if run_id is not None and (not isinstance(run_id, str) or not is_valid_client_id(run_id)):
        raise BadRequest("Run id must be 1-128 characters of letters, digits and _ . : -", code="invalid_run_id")
    new_run = request.headers.get("x-rungate-new-run", "").strip().lower() in _TRUE or options.get("new_run") is True
    return run_id, new_run


def _validate(body: dict[str, Any], fmt: WireFormat) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("`model` is required and must be a non-empty string.", code="missing_model")
    for key in fmt.required:
        if key not in body:
            raise BadRequest(f"`{key}` is required.", code=f"missing_{key}")
    if "messages" in fmt.required and not isinstance(body.get("messages"), list):
        raise BadRequest("`messages` must be an array.", code="invalid_messages")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise BadRequest("`stream` must be a boolean.", code="invalid_stream")
    return model


def _price(prices: PriceTable, model: str, usage: Usage) -> int | None:
    cost = prices.cost(model, usage)
    return None if cost is None else to_pico(cost)


async def proxy_call(request: web.Request, fmt: WireFormat) -> web.StreamResponse:
    """Handle one agent call in `fmt`; see the module docstring for the recipe."""
    app = request.app
    settings, store, prices = app[SETTINGS], app[STORE], app[PRICES]
    agent = await authenticate_agent(request, store)
    structlog.contextvars.bind_contextvars(agent_id=agent["id"])
    raw, body = await read_json_object(request, settings.max_body_bytes)
    model = _validate(body, fmt)
    changed = "rungate" in body  # the key is removed before forwarding, so the body must be re-encoded
    run_id, new_run = _run_options(request, body)
    stream = body.get("stream") is True and fmt.meter is not None
    client_wants_usage = False
    if fmt is CHAT and stream:
        wanted = (body.get("stream_options") or {}).get("include_usage") is True
        body, client_wants_usage = prepare_chat_stream_request(body)
        changed = changed or not wanted
    forward = orjson.dumps(body) if changed else raw

    target = await app[TARGETS].resolve(fmt.provider, model)
    input_estimate = estimate_input_tokens(body)
    worst = prices.max_cost(model, input_estimate, _max_output(body, fmt))
    reserved = to_pico(worst) if worst is not None else 0
    admit = AdmitCall(CallFacts(
        agent_id=agent["id"], run_id=run_id, new_run=new_run, endpoint=fmt.name, provider=target.provider,
        model=model, stream=stream, fingerprint=hashlib.sha256(forward).hexdigest(), reserved_pusd=reserved,
        idle_timeout_s=settings.idle_timeout_s))
    await store.execute(admit, metadata={"agent_id": agent["id"]})
    structlog.contextvars.bind_contextvars(run_id=admit.run_id)
    call = Call(fmt, agent["id"], admit.run_id, admit.step_id, target, stream, input_estimate, reserved)

    try:
        return await _forward(request, call, forward, client_wants_usage)
    finally:
        if not call.settled:  # cancelled or crashed before settling: close the books anyway
            await asyncio.shield(_settle(store, prices, call, status="aborted", http_status=None,
                                         usage=Usage(input=input_estimate), estimated=True,
                                         error="handler aborted"))


async def _forward(request: web.Request, call: Call, forward: bytes,
                   client_wants_usage: bool) -> web.StreamResponse:
    app = request.app
    store, prices = app[STORE], app[PRICES]
    url = call.target.base_url + call.fmt.upstream_path
    try:
        # The session carries the timeouts (`RUNGATE_UPSTREAM_TIMEOUT_S`); building them per call is costly.
        upstream = await app[HTTP].post(url, data=forward, headers=upstream_headers(request.headers, call.target),
                                        allow_redirects=False)
    except (aiohttp.ClientError, TimeoutError) as exc:
        reason = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
        await _settle(store, prices, call, status="upstream_error", http_status=None, usage=Usage(),
                      estimated=False, error=reason)
        raise ProviderError("The provider could not be reached.", [
            {"provider": call.target.provider, "model": call.target.model, "status": None, "error": reason}]) from None
    async with upstream:
        is_sse = upstream.content_type == "text/event-stream"
        if call.stream and upstream.status < 300 and is_sse:
            return await _relay_stream(request, call, upstream, client_wants_usage)
        try:
            payload = await upstream.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            await _settle(store, prices, call, status="upstream_error", http_status=upstream.status,
                          usage=Usage(input=call.input_estimate), estimated=True, error=type(exc).__name__)
            raise ProviderError("The provider's answer broke off.", [
                {"provider": call.target.provider, "model": call.target.model, "status": upstream.status,
                 "error": type(exc).__name__}]) from None
        headers = relayed_headers(upstream.headers)
        if upstream.status >= 400:
            await _settle(store, prices, call, status="error", http_status=upstream.status, usage=Usage(),
                          estimated=False, error=f"upstream status {upstream.status}")
        else:
            try:
                parsed: Any = orjson.loads(payload)
            except orjson.JSONDecodeError:
                parsed = None
            usage = call.fmt.usage(parsed)
            await _settle(store, prices, call, status="ok", http_status=upstream.status,
                          usage=usage if usage is not None else Usage(input=call.input_estimate),
                          estimated=usage is None, error=None if usage else "usage missing from the answer",
                          tool_calls=call.fmt.tool_calls(parsed))
        headers.update(_rungate_headers(call))
        return web.Response(body=payload, status=upstream.status, headers=headers)


async def _relay_stream(request: web.Request, call: Call, upstream: aiohttp.ClientResponse,
                        client_wants_usage: bool) -> web.StreamResponse:
    store, prices = request.app[STORE], request.app[PRICES]
    assert call.fmt.meter is not None
    meter: StreamMeter = call.fmt.meter(client_wants_usage)
    response = web.StreamResponse(status=upstream.status, headers=relayed_headers(upstream.headers))
    response.headers.update(_rungate_headers(call, final=False))
    await response.prepare(request)
    parser = SSEParser()
    held_done: bytes | None = None
    status, error = "ok", None
    try:
        try:
            async for chunk in upstream.content.iter_any():
                for event in parser.feed(chunk):
                    if not meter.feed(event):
                        continue
                    if call.fmt is CHAT and event.data.strip() == "[DONE]":
                        held_done = event.raw  # written after settlement, with the trailer
                        continue
                    await response.write(event.raw)
            for event in parser.flush():
                if meter.feed(event) and event.data.strip() != "[DONE]":
                    await response.write(event.raw)
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, error = "cut", f"upstream stream broke: {type(exc).__name__}"
        if status == "ok" and not meter.done:
            status, error = "cut", "upstream stream ended without its final event"
        if meter.error is not None and status == "ok":
            status, error = "error", "the provider sent an error event"
        usage = meter.usage
        await _settle(store, prices, call, status=status, http_status=upstream.status,
                      usage=usage if usage is not None else meter.estimated_usage(call.input_estimate),
                      estimated=usage is None, error=error,
                      tool_calls=meter.tool_calls)
        if status == "cut":
            await response.write(stream_error_event(call.fmt, "The provider's stream broke off before the end."))
        # Chat streams: the trailer follows [DONE]. Stock OpenAI SDKs stop reading at [DONE], so they never see
        # it (placed before, openai 3.x yields it as a chunk whose `choices` is None and naive loops crash);
        # the `rungate` SDK reads on to the end of the body and picks it up. Other formats end with it.
        if held_done is not None:
            await response.write(held_done)
        await response.write(_trailer(call))
        await response.write_eof()
    except ConnectionError:
        # The client went away: stop reading upstream and record what was seen.
        if not call.settled:
            usage = meter.usage
            await asyncio.shield(_settle(
                store, prices, call, status="client_closed", http_status=upstream.status,
                usage=usage if usage is not None else meter.estimated_usage(call.input_estimate),
                estimated=usage is None, error="client disconnected", tool_calls=meter.tool_calls))
    return response


def _trailer(call: Call) -> bytes:
    return encode_event(orjson.dumps({
        "type": "rungate", "run_id": call.run_id, "step_id": call.step_id, "provider": call.target.provider,
        "model": call.target.model, "cost_usd": None if call.cost_pusd is None else format_usd(call.cost_pusd),
        "tokens": {"input": call.usage.total_input, "output": call.usage.output},
    }), "rungate")


def _rungate_headers(call: Call, final: bool = True) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict({
        "x-rungate-run-id": call.run_id,
        "x-rungate-step-id": call.step_id,
        "x-rungate-provider": call.target.provider,
        "x-rungate-model": call.target.model,
        "x-rungate-failover": "0",
        "x-rungate-budget-remaining-usd": "unlimited",
        "x-rungate-budget-remaining-tokens": "unlimited",
    })
    if final:
        headers["x-rungate-tokens-used"] = str(call.usage.total)
        headers["x-rungate-cost-usd"] = "unpriced" if call.cost_pusd is None else format_usd(call.cost_pusd)
    if call.warnings:
        headers["x-rungate-warning"] = "; ".join(call.warnings)
    return headers


async def _settle(store: EventStore, prices: PriceTable, call: Call, *, status: str, http_status: int | None,
                  usage: Usage, estimated: bool, error: str | None, tool_calls: Any = ()) -> None:
    """Record `StepCompleted` once: the real cost, or for an estimate the larger of estimate and reservation."""
    if call.settled:
        return
    call.settled = True
    cost = _price(prices, call.target.model, usage)
    unpriced = cost is None
    if estimated and status == "ok" and call.reserved_pusd:
        # Usage missing from a successful answer: never a silent $0, charge the reservation.
        cost = max(cost or 0, call.reserved_pusd)
    if unpriced:
        call.warnings.append(f"model {call.target.model} has no price; cost recorded as null")
    if estimated and status == "ok":
        call.warnings.append("the provider reported no usage; tokens are estimated")
    call.usage, call.cost_pusd = usage, cost
    event = StepCompleted(
        step_id=call.step_id, run_id=call.run_id, status=status, http_status=http_status,
        provider=call.target.provider, model=call.target.model, usage=usage.as_dict(), cost_pusd=cost,
        unpriced=unpriced, estimated=estimated, latency_ms=int((time.monotonic() - call.started) * 1000),
        error=error, tool_calls=[{"id": t.id, "name": t.name, "arguments": t.arguments} for t in tool_calls])
    await store.execute(Append((NewEvent(run_stream(call.run_id), event),)), metadata={"agent_id": call.agent_id})
    log.debug("step_settled", step_id=call.step_id, status=status, tokens=usage.total,
             cost_usd=None if cost is None else format_usd(cost), estimated=estimated)
