"""Answers held for approval (SPEC §5) on the proxy's side: holding an answer that calls a gated tool,
the 202 or the hold-mode wait, and answering a retry from the hold."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from rungate import queries
from rungate.approvals import DeliverHold, Hold, hold_answer, hold_state, shadowed
from rungate.clock import now_iso
from rungate.errors import StoreError
from rungate.events import NewEvent
from rungate.providers.metering import ToolCall
from rungate.proxy.call import Call, rungate_headers, trailer
from rungate.proxy.formats import stream_error_event
from rungate.proxy.gating import awaiting_response, gate_matches, refusal_answer, released_answer
from rungate.proxy.keys import BREAKERS, INFLIGHT, SETTINGS, STORE, STREAM_STARTED
from rungate.runs import AdmitCall, approval_rejected, force_stopped
from rungate.store import EventStore
from rungate.usage import Usage

HOLD_POLL_S = 0.25  # how often a held (hold-mode) call looks at its gates
HOLD_KEEPALIVE_S = 1.0  # how often it writes a keep-alive (read timeouts reset on any byte)


def hold_if_gated(call: Call, tool_calls: Sequence[ToolCall], http_status: int, headers: CIMultiDict[str],
                  body: bytes, *, stream: bool) -> tuple[Hold | None, tuple[NewEvent, ...]]:
    """The hold for an answer that calls a gated tool (None: deliver it), and the events to append with the
    step's settlement: the hold's, and a record of each call a shadow rule would have held."""
    enforced, shadow_matches = gate_matches(call.policy, tool_calls)
    then: list[NewEvent] = []
    for match in shadow_matches:
        event, warning = shadowed(match, call.run_id, call.step_id)
        then.append(event)
        call.warnings.append(warning)
    if not enforced:
        return None, tuple(then)
    assert call.policy is not None
    kept = {k: v for k, v in headers.items() if k.lower() not in ("content-length", "content-encoding")}
    hold = hold_answer(run_id=call.run_id, agent_id=call.agent_id, step_id=call.step_id, origin="answer",
                       endpoint=call.fmt.name, fingerprint=call.fingerprint, stream=stream,
                       http_status=http_status, headers=kept, body=body, matches=enforced, policy=call.policy,
                       now=now_iso())
    return hold, (*then, *hold.events)


def _awaiting_response(call: Call, hold_id: str, gates: Sequence[Any]) -> web.Response:
    return awaiting_response(call.run_id, hold_id, gates, rungate_headers(call))


async def await_approval(request: web.Request, call: Call, hold: Hold) -> web.StreamResponse:
    """The answer to a call whose answer was just held: 202 with its gates, or the hold-mode wait."""
    if (call.approval_mode or hold.mode) == "hold":
        return await wait_for_decision(request, call, hold.hold_id)
    return _awaiting_response(call, hold.hold_id, [gate.model_dump() for gate in hold.gates])


async def wait_for_decision(request: web.Request, call: Call, hold_id: str) -> web.StreamResponse:
    """Hold mode (for stock SDKs, which take any 2xx for success): answer 200 at once, keep the connection
    alive — SSE comments on a stream, whitespace before a JSON body otherwise — until the gates are decided
    (a gate's own expiry decides it as its rule's `on_expiry` says), then send the held answer, or a
    refusal: an in-stream error event the SDK raises, or for a plain call an answer that refuses
    (`refusal_answer`). After `RUNGATE_MAX_HOLD_S` the wait ends with a refusal saying the approval is still
    pending — the gate stays open (a client's timeout must not decide it), and a retry finds it. A client
    that leaves loses nothing either. The kill switch ends the wait with its own refusal."""
    store, settings = request.app[STORE], request.app[SETTINGS]
    if call.routed and not call.answered:  # the target answered: its circuit (a probe's slot) is free now
        request.app[BREAKERS].succeeded(call.target.circuit)
        call.answered = True
    headers = rungate_headers(call)
    headers["Content-Type"] = "text/event-stream" if call.stream else "application/json"
    headers["Cache-Control"] = "no-cache"
    response = web.StreamResponse(status=200, headers=headers)
    request[STREAM_STARTED] = True
    await response.prepare(request)
    keepalive = b": awaiting approval\n\n" if call.stream else b" \n"
    deadline = time.monotonic() + settings.max_hold_s
    written = time.monotonic()
    inflight = request.app[INFLIGHT]
    call.holding = True
    inflight.add(call)  # the kill switch ends the wait too
    try:
        await response.write(keepalive)
        state = "pending"
        while not call.stopped and time.monotonic() < deadline:
            hold, gates = await queries.hold_progress(store, hold_id)
            state = "pending" if hold is None else hold_state(hold, gates, now_iso())
            if state != "pending":
                break
            if time.monotonic() - written >= HOLD_KEEPALIVE_S:
                await response.write(keepalive)
                written = time.monotonic()
            await asyncio.sleep(HOLD_POLL_S)
        if call.stopped or state == "pending":
            code = "run_force_stopped" if call.stopped else "tool_approval_required"
            message = (force_stopped(call.run_id, call.policy).message if call.stopped else
                       f"The tool call still awaits approval after {settings.max_hold_s:g} s; send the same"
                       " request again to go on waiting, or to get the answer once approved.")
            await response.write_eof(stream_error_event(call.fmt, message, code=code) if call.stream
                                     else refusal_answer(call.fmt.name, call.target.model, hold_id, message, code))
            return response
        delivery = DeliverHold(hold_id)
        await store.execute(delivery)
        if delivery.outcome == "released":
            body = released_answer(*await _read_hold(store, hold_id))
            await response.write_eof(body + trailer(call) if call.stream else body)
            return response
        if delivery.hold is None:  # DeliverHold read it, or raised
            raise StoreError("the hold is not readable right now", status=503, code="store_unavailable")
        message = approval_rejected(call.run_id, delivery.hold, now_iso(), call.policy).message
        if call.stream:
            await response.write_eof(stream_error_event(call.fmt, message, code="approval_rejected"))
        else:
            await response.write_eof(refusal_answer(call.fmt.name, call.target.model, hold_id, message))
    except ConnectionError:
        pass  # the agent left: the hold stays, and its retry is answered from it
    finally:
        inflight.discard(call)
    return response


async def _read_hold(store: EventStore, hold_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A held answer's row (its body included) and its gates' rows."""
    hold = await queries.get_hold(store, hold_id)
    if hold is None:  # rows are never deleted; a rebuild in progress is the only way here
        raise StoreError("the held answer is not readable right now", status=503, code="store_unavailable")
    return hold, await queries.hold_gates(store, hold_id)


async def answer_from_hold(request: web.Request, call: Call, admit: AdmitCall) -> web.StreamResponse:
    """Answer a retry of a held request: 202 again while a gate is pending, else the held answer itself —
    from the one upstream call that produced it, with any edited arguments — and the `rungate` trailer."""
    assert admit.hold is not None
    hold, gates = await _read_hold(request.app[STORE], admit.hold["id"])
    # The step is the one whose upstream call produced the answer; this retry itself used nothing and cost
    # nothing (its headers and trailer say so, so a client adding them up counts the call once).
    call.step_id = hold["step_id"]
    call.usage, call.cost_pusd = Usage(), 0
    if admit.hold_outcome == "pending":
        if (call.approval_mode or hold["mode"]) == "hold":
            return await wait_for_decision(request, call, hold["id"])
        return _awaiting_response(call, hold["id"], gates)
    body = released_answer(hold, gates)
    headers: CIMultiDict[str] = CIMultiDict(orjson.loads(hold["headers"]))
    headers.update(rungate_headers(call))
    if not hold["stream"]:
        return web.Response(body=body, status=hold["http_status"], headers=headers)
    response = web.StreamResponse(status=hold["http_status"], headers=headers)
    request[STREAM_STARTED] = True
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):  # nothing to settle: a client gone now loses nothing
        await response.write_eof(body + trailer(call))
    return response
