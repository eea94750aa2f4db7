"""A call's attempts along its route (SPEC §6): retry, failover and continuation, each attempt a step
admitted at its own target's price."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace
from typing import Any

from aiohttp import web

from rungate.errors import BadRequest, ProviderError, RungateError, StoreError
from rungate.log import get_logger
from rungate.proxy.breaker import TargetKey
from rungate.proxy.call import (
    Budget,
    Call,
    ClientStream,
    FailedAttempt,
    rungate_headers,
    settle_step,
    shielded,
    trailer,
)
from rungate.proxy.failover import Failure, Planner, continuer, next_attempt
from rungate.proxy.formats import stream_error_event
from rungate.proxy.forward import attempt_body, forward_attempt
from rungate.proxy.keys import BREAKERS, PRICES, SETTINGS, STORE, TARGETS
from rungate.proxy.upstream import Target
from rungate.routing import RouteTarget
from rungate.runs import AdmitCall, Failover, Plan, SettleStep
from rungate.store import EventStore
from rungate.translate.common import Untranslatable
from rungate.translate.continuation import ChatContinuation, MessagesContinuation
from rungate.usage import Usage

log = get_logger("rungate.proxy")
PAUSE_SLICE_S = 0.25  # how often a wait between attempts looks at the kill switch


_STITCHERS: dict[str, type[ChatContinuation] | type[MessagesContinuation]] = {
    "chat": ChatContinuation, "messages": MessagesContinuation}


async def run_attempts(request: web.Request, call: Call, admit: AdmitCall, planner: Planner, plan: Plan,
                       body: dict[str, Any], client_wants_usage: bool) -> web.StreamResponse:
    """Send the call to its route's targets in order until one answers (SPEC §6): each attempt is a step,
    admitted at its own target's price; a failed one is retried on the same target or failed over as
    `next_attempt` decides. Nothing reached the agent before an attempt that fails over; once a stream
    reached it, a failed attempt is continued by a later prefill-capable target (`continuer`), or the stream
    ends with its format's error event."""
    app = request.app
    settings, store, prices, breakers, targets = app[SETTINGS], app[STORE], app[PRICES], app[BREAKERS], app[TARGETS]

    def available(spec: RouteTarget) -> bool:
        return breakers.available(targets.circuit(spec))

    failed: list[dict[str, Any]] = list(plan.skipped)
    index, retries, made, max_output = 0, 0, 0, admit.max_output
    stitcher = _STITCHERS.get(call.fmt.name) if call.stream and plan.routed else None
    if stitcher is None or not any(spec.accepts_prefill for spec in plan.targets[1:]):
        stitcher = None
    while True:
        spec = plan.targets[index]
        key: TargetKey | None = None
        if plan.routed:  # named before its key is resolved: a missing key is recorded against this target
            call.target = Target(spec.provider, spec.model, "", "", "")
        if stitcher is not None and (call.client is None or not call.client.started):
            call.client = ClientStream(stitcher())  # fresh for each attempt until a stream reaches the agent
        client = call.client
        started = client is not None and client.started
        made += 1
        try:
            try:
                call.target = await (targets.for_route(spec) if plan.routed else targets.resolve(spec.provider,
                                                                                                    spec.model))
            except ProviderError as exc:  # no key for this target: nothing was sent
                await settle_step(store, prices, call, status="upstream_error", http_status=None, usage=Usage(),
                                  estimated=False, error="no provider key")
                raise FailedAttempt(Failure(exc.attempts[0]["error"] if exc.attempts else "no_provider_key",
                                            counts=False)) from None
            key = call.target.circuit if plan.routed else None  # a call with no route has no circuit
            if key is not None and not breakers.allow(key):  # opened since the plan was made
                key = None  # no probe slot was taken
                await settle_step(store, prices, call, status="skipped", http_status=None, usage=Usage(),
                                  estimated=False, error="circuit open")
                raise FailedAttempt(Failure("circuit_open", counts=False))
            try:
                forward = attempt_body(call, body, spec, max_output, prices,
                                       client.stitcher.text if client is not None and started else None)
            except Untranslatable as exc:  # this target cannot serve the call: nothing was sent
                await settle_step(store, prices, call, status="skipped", http_status=None, usage=Usage(),
                                  estimated=False, error=f"untranslatable: {exc}")
                raise FailedAttempt(Failure(f"untranslatable: {exc.feature}", counts=False)) from None
            response = await forward_attempt(request, call, forward, client_wants_usage)
        except FailedAttempt as exc:
            failure = exc.failure
            failed.append(failure.entry(call.target.provider, call.target.model))
            if key is not None:
                breakers.failed(key, failure.reason) if failure.counts else breakers.released(key)
            if client is not None and client.started:  # tokens reached the agent: continue the answer elsewhere
                later = continuer(plan.targets, index, made, available)
                if later is None or call.stopped:
                    return await _end_broken(call, client)
                client.stitcher.continue_after_break()
                index, retries = later, 0
                log.info("stream_continued", step_id=call.step_id, provider=call.target.provider,
                         model=call.target.model, reason=failure.reason, to_model=plan.targets[index].model)
                try:
                    max_output = await _readmit(request, call, admit, planner, plan.targets[index], failure, 0.0,
                                                continued=client.stitcher.text)
                except RungateError as refusal:  # e.g. the budget no longer fits the continuation
                    return await _end_broken(call, client, refusal.message)
                continue
            choice = next_attempt(failure, plan.targets, index, retries, made, routed=plan.routed,
                                  available=available, retry_base_s=settings.retry_base_s,
                                  retry_after_max_s=settings.retry_after_max_s)
            if choice is None and all(str(f["error"]).startswith("untranslatable") for f in failed):
                uncarried = BadRequest("No target of this call's route can carry this request ("
                                       + "; ".join(sorted({str(f["error"]) for f in failed})) + ").",
                                       code="untranslatable_request")
                uncarried.headers.update(rungate_headers(call))
                raise uncarried from None
            if choice is None:
                error = ProviderError("Every target of this call failed." if plan.routed
                                      else "The provider could not answer.", failed)
                error.headers.update(rungate_headers(call))
                raise error from None
            index, delay = choice
            retries = retries + 1 if plan.targets[index] is spec else 0
            log.info("attempt_failed", step_id=call.step_id, provider=call.target.provider, model=call.target.model,
                     reason=failure.reason, retry=plan.targets[index] is spec, delay_s=round(delay, 3))
            await _pause(call, delay)
            max_output = await _readmit(request, call, admit, planner, plan.targets[index], failure, delay)
            continue
        except RungateError as error:
            if key is not None:
                breakers.released(key)
            if client is not None and client.started:  # headers are out: the stream carries the refusal
                return await _end_broken(call, client, error.message)
            raise
        except BaseException:
            if key is not None:
                breakers.released(key)
            raise
        if key is not None and not call.answered:  # a stream broken after tokens (not continued) failed all the same
            breakers.failed(key, "stream broke") if call.broken else breakers.succeeded(key)
        return response


async def _pause(call: Call, delay: float) -> None:
    """Wait `delay` seconds before a retry, ending early when the kill switch stops the call's run (the next
    admission then refuses it)."""
    deadline = time.monotonic() + delay
    while not call.stopped and (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(left, PAUSE_SLICE_S))


async def _end_broken(call: Call, client: ClientStream,
                      message: str = "The stream broke off before the end.") -> web.StreamResponse:
    """End a started stream that no target could continue: its format's error event (the SDKs raise on it),
    then the trailer of the last settled step."""
    assert client.response is not None
    with contextlib.suppress(ConnectionError):  # every step is settled: a client gone now loses nothing
        await client.response.write_eof(stream_error_event(call.fmt, message)
                                        + (trailer(call) if call.settled else b""))
    return client.response


async def _readmit(request: web.Request, call: Call, admit: AdmitCall, planner: Planner, spec: RouteTarget,
                   failure: Failure, delay: float, continued: str | None = None) -> int | None:
    """Admit the call's next attempt (a new step at `spec`'s price, the failover recorded with it); returns the
    output limit a shrinking budget set for it. A refusal (the budget no longer fits, the run was stopped)
    is the agent's answer. `continued`: the answer text the next attempt is asked to continue (its input)."""
    facts = admit.facts
    extra = 0 if continued is None else -(-len(continued.encode()) // 4)  # what the prefill adds to the input
    priced = planner.reserve((spec,), extra_input=extra + admit.carried)
    again = AdmitCall(replace(
        facts, run_id=call.run_id, new_run=False, policy_name=None, policy_version=None, provider=spec.provider,
        model=spec.model, input_tokens=priced.input_tokens, reserved_pusd=priced.reserved_pusd,
        reserved_tokens=priced.reserved_tokens,
        priced=priced.priced, price=priced.price, output_bounded=priced.output_bounded, planner=None,
        failover=Failover(call.step_id, call.target.provider, call.target.model, failure.reason,
                          retry=spec.provider == call.target.provider and spec.model == call.target.model,
                          delay_s=round(delay, 3), continuation=continued is not None)))
    try:
        await record_admission(request.app[STORE], again, call)
    except RungateError as error:
        error.headers.update(rungate_headers(call))
        raise
    call.next_attempt(again.step_id, Target(spec.provider, spec.model, "", "", ""), again.reserved_pusd)
    call.input_estimate = priced.input_tokens  # its images at this target's most per image
    call.warnings.extend(w for w in again.warnings if w not in call.warnings)
    if again.policy is not None:
        call.budget = Budget.after_admission(again)
    return again.max_output


async def record_admission(store: EventStore, admit: AdmitCall, call: Call) -> None:
    """Record the admission. If the caller is cancelled meanwhile, the admission may still commit, so a
    settlement is queued behind it (the writer applies jobs in order): the step closes at no cost."""
    try:
        recorded = await store.execute(admit, metadata={"agent_id": call.agent_id})
    except asyncio.CancelledError:
        with contextlib.suppress(StoreError):  # the admission may have been refused: nothing to close
            await shielded(store.execute(SettleStep(admit.step_id, reason="cancelled before forwarding",
                                                     charge_reservation=False)))
        raise
    call.run_id = admit.run_id
    if recorded:
        call.admitted_at = recorded[0].position
