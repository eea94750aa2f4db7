"""The proxy recipe: authenticate → parse → admit (durably) → forward → meter → settle → respond.

Streams are relayed one SSE event at a time. Every admitted step is settled by `SettleStep`, which
records its `StepCompleted` only while the step is still open: upstream errors, cut streams, a client
that walks away, a cancelled handler — each path settles once, with the tokens seen so far. A step whose
process died is settled by the app's sweeper (charged its reservation).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

import aiohttp
import orjson
import structlog
from aiohttp import hdrs, web
from multidict import CIMultiDict

from rungate import queries
from rungate.approvals import DeliverHold, Hold, hold_answer, hold_state, shadowed
from rungate.auth import authenticate_agent
from rungate.clock import now_iso
from rungate.enforce.policy import CompiledPolicy
from rungate.enforce.rules import RunState, budget_limit_pusd
from rungate.enforce.tools import offered_tools
from rungate.errors import BadRequest, GovernanceRefusal, ProviderError, RungateError, StoreError
from rungate.events import NewEvent
from rungate.events.catalogue import AnswerHeld, StepCompleted
from rungate.ids import is_valid_client_id
from rungate.log import get_logger
from rungate.prices import PriceTable, format_usd
from rungate.providers.metering import ToolCall, estimate_input_tokens, prepare_chat_stream_request
from rungate.providers.sse import SSEParser, encode_event
from rungate.proxy.bodies import read_json_object
from rungate.proxy.breaker import TargetKey
from rungate.proxy.crossing import CROSSINGS, TRANSLATING, Crossing
from rungate.proxy.failover import Failure, Planner, continuer, failure_of, next_attempt
from rungate.proxy.formats import CHAT, StreamMeter, WireFormat, stream_error_event
from rungate.proxy.gating import (
    APPROVAL_MODE_HEADER,
    APPROVAL_MODES,
    awaiting_response,
    buffers_stream,
    gate_matches,
    refusal_answer,
    released_answer,
)
from rungate.proxy.keys import (
    AGENTS,
    BREAKERS,
    HTTP,
    INFLIGHT,
    PRICES,
    SETTINGS,
    STORE,
    STREAM_STARTED,
    TARGETS,
)
from rungate.proxy.upstream import Target, relayed_headers, upstream_headers
from rungate.routing import RouteTarget
from rungate.runs import (
    AdmitCall,
    CallFacts,
    Failover,
    Plan,
    SettleStep,
    approval_rejected,
    force_stopped,
    policy_fields,
)
from rungate.store import EventStore
from rungate.translate.common import ToolNames, Untranslatable
from rungate.translate.continuation import ChatContinuation, MessagesContinuation
from rungate.translate.requests import with_prefill
from rungate.translate.streams import DONE
from rungate.usage import Usage

log = get_logger("rungate.proxy")
_TRUE = {"1", "true", "yes"}
_MAX_MODEL_CHARS = 256
_POLICY_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]{0,99})(?:@(?P<version>[1-9][0-9]{0,8}))?$")
SETTLE_ATTEMPTS = 3
_ANSWERED = ("ok", "held")  # the provider's answer arrived whole: its usage should have come with it
MAX_HELD_BYTES = 16 * 1024 * 1024  # the most of a streamed answer held back while its tool calls are unknown
HOLD_POLL_S = 0.25  # how often a held (hold-mode) call looks at its gates
HOLD_KEEPALIVE_S = 1.0  # how often it writes a keep-alive (read timeouts reset on any byte)
MAX_PREAMBLE_BYTES = 1024 * 1024  # the most of a routed stream held back while no token has come
DEFAULT_MAX_TOKENS = 4096  # the output limit asked of another vendor's model with no known limit of its own


class ClientGone(Exception):
    """The agent closed its connection while Rungate was writing to it."""


@dataclass
class Budget:
    """The run's caps (None: no cap) and what is left of them, for the `x-rungate-budget-remaining-*` headers."""

    limit_pusd: int | None
    limit_tokens: int | None
    remaining_pusd: int | None
    remaining_tokens: int | None

    @classmethod
    def after_admission(cls, admit: AdmitCall) -> Budget:
        """What is left once this call's worst case is reserved (exact again after settlement)."""
        state = admit.state
        assert state is not None
        limit = budget_limit_pusd(admit.policy, state)
        tokens = admit.policy.run_limit_tokens if admit.policy is not None else None
        return cls(limit, tokens,
                   None if limit is None else limit - state.spend_pusd - state.reserved_pusd - admit.reserved_pusd,
                   None if tokens is None else
                   tokens - state.tokens_used - state.reserved_tokens - admit.reserved_tokens)

    def settled(self, run: RunState) -> None:
        """Exact figures once the call is settled: the cap minus spend and what calls in flight still hold."""
        if self.limit_pusd is not None:
            self.remaining_pusd = self.limit_pusd - run.spend_pusd - run.reserved_pusd
        if self.limit_tokens is not None:
            self.remaining_tokens = self.limit_tokens - run.tokens_used - run.reserved_tokens


@dataclass
class ClientStream:
    """The agent's side of a streamed call that another target may continue (SPEC §6): the response once
    started, and the stitcher that keeps every upstream's events one answer in the agent's format."""

    stitcher: ChatContinuation | MessagesContinuation
    response: web.StreamResponse | None = None

    @property
    def started(self) -> bool:
        """Whether answer tokens reached the agent (its headers went out)."""
        return self.response is not None and self.response.prepared


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
    meter: StreamMeter | None = None
    usage: Usage = field(default_factory=Usage)
    cost_pusd: int | None = 0
    warnings: list[str] = field(default_factory=list)
    budget: Budget | None = None
    policy: CompiledPolicy | None = None  # the run's policy version (None: no policy)
    fingerprint: str = ""  # of the forwarded body: a retry of a held request is the same run and fingerprint
    offered: tuple[str, ...] = ()  # tools the request offers the model
    approval_mode: str | None = None  # `x-rungate-approval-mode`: "202" or "hold" (None: the rule's)
    # The kill switch (`stop`): the handler's task while it waits for the provider's answer to begin, and
    # the provider's response once it has.
    task: asyncio.Task[Any] | None = None
    awaiting_upstream: bool = False
    upstream: aiohttp.ClientResponse | None = None
    stopped: bool = False
    holding: bool = False  # waiting for an approval with the connection open (hold mode)
    routed: bool = False  # the call's model has a route: a failed attempt is retried or failed over
    failovers: int = 0  # attempts before this one that failed (`x-rungate-failover`)
    model_asked: str = ""  # the model the agent named (a translated answer shows it)
    # This attempt's target is the other vendor: how the call is carried there and back, the tool names the
    # target's format had to change, and what translation dropped (reported, and recorded with the step).
    crossing: Crossing | None = None
    tool_names: ToolNames = field(default_factory=ToolNames)
    dropped: list[str] = field(default_factory=list)
    client: ClientStream | None = None  # set when a later target of the route can continue a broken stream
    broken: bool = False  # the stream broke after tokens reached the agent (its target failed)
    answered: bool = False  # its target's circuit was told it answered (before a long wait for an approval)

    def __hash__(self) -> int:  # registered in a set while in flight
        return id(self)

    def stop(self) -> None:
        """Cut this call: close the provider's connection (or stop waiting for it) so the relay ends now; a
        call waiting for an approval (hold mode) ends its wait."""
        if self.holding or self.settled:  # waiting (for an approval, or between attempts): the wait ends
            self.stopped = True
            return
        if self.stopped:
            return
        self.stopped = True
        if self.upstream is not None:
            self.upstream.close()
        elif self.awaiting_upstream and self.task is not None:
            self.task.cancel()

    @property
    def upstream_fmt(self) -> WireFormat:
        """The format spoken with this attempt's target."""
        return self.fmt if self.crossing is None else self.crossing.upstream

    def translated(self, warnings: Sequence[str]) -> None:
        """Note what translation dropped: in `x-rungate-warning` and in the step's event."""
        for warning in warnings:
            if warning not in self.dropped:
                self.dropped.append(warning)
            if warning not in self.warnings:
                self.warnings.append(warning)

    def next_attempt(self, step_id: str, target: Target, reserved_pusd: int) -> None:
        """Start over for another attempt of the same call (a retry, or another target): a new step."""
        self.step_id, self.target, self.reserved_pusd = step_id, target, reserved_pusd
        self.started, self.settled, self.meter = time.monotonic(), False, None
        self.usage, self.cost_pusd = Usage(), 0
        self.task, self.awaiting_upstream, self.upstream = None, False, None
        self.crossing, self.tool_names, self.dropped = None, ToolNames(), []
        self.failovers += 1

    def seen_usage(self) -> tuple[Usage, bool]:
        """What a stream reported so far, or an estimate from what was relayed (and whether estimated)."""
        if self.meter is not None and self.meter.usage is not None:
            return self.meter.usage, False
        if self.meter is not None:
            return self.meter.estimated_usage(self.input_estimate), True
        return Usage(input=self.input_estimate), True


def _max_output(body: dict[str, Any], fmt: WireFormat) -> int | None:
    for key in fmt.max_tokens_keys:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
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


def _run_options(request: web.Request, body: dict[str, Any]) -> RunOptions:
    """The run options from headers or the body's `rungate` key (removed from the body); headers win."""
    options = body.pop("rungate", None)
    if options is not None and not isinstance(options, dict):
        raise BadRequest("The `rungate` key must be an object.", code="invalid_rungate_options")
    options = options or {}
    run_id = request.headers.get("x-rungate-run-id") or options.get("run_id")
    if run_id is not None and (not isinstance(run_id, str) or not is_valid_client_id(run_id)):
        raise BadRequest("Run id must be 1-128 characters of letters, digits and _ . : -", code="invalid_run_id")
    new_run = request.headers.get("x-rungate-new-run", "").strip().lower() in _TRUE or options.get("new_run") is True
    pin = request.headers.get("x-rungate-policy") or options.get("policy")
    name, version = None, None
    if pin is not None:
        match = _POLICY_PIN.match(pin.strip()) if isinstance(pin, str) else None
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
    input_estimate = estimate_input_tokens(body)
    choices = _choices(body, fmt)
    # The request's fingerprint: its endpoint and its canonical body (keys sorted), so a retry is the same
    # request whatever its key order, and the same body sent to another endpoint is another request.
    canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    fingerprint = hashlib.sha256(fmt.name.encode() + b"\n" + canonical).hexdigest()
    offered = offered_tools(body)
    # The route's targets are picked inside the admission, once the run's policy (whose routes win) is known;
    # the first target's worst case is what the admission reserves.
    planner = Planner(fmt, model, settings.routes, prices, app[BREAKERS], app[TARGETS].circuit, input_estimate,
                      _max_output(body, fmt), choices, TRANSLATING)
    admit = AdmitCall(CallFacts(
        agent_id=agent["id"], token_hash=agent["token_hash"], run_id=options.run_id, new_run=options.new_run,
        endpoint=fmt.name, provider=fmt.provider, model=model, stream=stream, fingerprint=fingerprint,
        reserved_pusd=0, idle_timeout_s=settings.idle_timeout_s, tools=offered, policy_name=options.policy_name,
        policy_version=options.policy_version, input_tokens=input_estimate, embedding=fmt.meter is None,
        choices=choices, planner=planner))
    # Until a target is resolved the call names the model as asked (a retry answered from a hold keeps it).
    call = Call(fmt, agent["id"], "", admit.step_id, Target(fmt.provider, model, "", "", ""), stream,
                input_estimate, 0, fingerprint=fingerprint, offered=offered, approval_mode=approval_mode,
                model_asked=model)
    await _admit(store, admit, call)
    call.policy = admit.policy
    call.warnings.extend(admit.warnings)
    if admit.hold is not None:  # a retry of a held request: answered from the hold, nothing goes upstream
        call.settled = True
        return await _from_hold(request, call, admit)
    plan = admit.plan
    assert plan is not None  # the planner ran: the call was admitted
    call.reserved_pusd, call.routed = admit.reserved_pusd, plan.routed
    if admit.policy is not None:
        call.budget = Budget.after_admission(admit)
    structlog.contextvars.bind_contextvars(run_id=admit.run_id)
    inflight = app[INFLIGHT]
    inflight.add(call)
    try:
        return await _attempts(request, call, admit, planner, plan, body, client_wants_usage)
    finally:
        inflight.discard(call)
        if not call.settled:  # cancelled or crashed before settling: close the books with what was seen
            usage, estimated = call.seen_usage()
            await _shielded(_settle(store, prices, call, status="aborted", http_status=None, usage=usage,
                                    estimated=estimated, error="handler aborted"))


class FailedAttempt(Exception):
    """An attempt failed before anything reached the agent (its step is settled): retry or fail over."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.reason)
        self.failure = failure


def _attempt_body(call: Call, body: dict[str, Any], spec: RouteTarget, max_output: int | None,
                  prices: PriceTable, prefill: str | None = None) -> bytes:
    """What goes upstream for one attempt: the agent's body, asking the target's model (and the output limit
    a shrinking budget set), translated when the target is the other vendor (`Untranslatable` when it cannot
    be carried). Exactly what Rungate decided on: no duplicate keys, no `rungate` key.

    With `prefill` (the answer text the agent already got from a stream that broke), the target is asked to
    continue that answer: an Anthropic target as an assistant prefill, an OpenAI one (declared `prefill:
    true`) as a final assistant message."""
    fmt = call.fmt
    if spec.model != body["model"] or max_output is not None:
        body = dict(body)
        body["model"] = spec.model
        if max_output is not None:
            body[next((k for k in fmt.max_tokens_keys if k in body), fmt.max_tokens_keys[0])] = max_output
    if spec.provider == fmt.provider:
        call.crossing = None
    else:
        crossing = call.crossing = CROSSINGS[(fmt.name, spec.provider)]
        # With no output limit asked, the target's own (what the admission reserved for), else a modest one.
        price = prices.lookup(spec.model)
        default = price.max_output_tokens if price is not None and price.max_output_tokens else DEFAULT_MAX_TOKENS
        translated = crossing.request(body, spec.model, default)
        call.tool_names = translated.tool_names
        call.translated(translated.warnings)
        body = translated.body
    if prefill is not None:
        if spec.provider == "anthropic":
            body = with_prefill(body, prefill)
        else:
            body = {**body, "messages": [*body["messages"], {"role": "assistant", "content": prefill}]}
    return orjson.dumps(body)


async def _attempts(request: web.Request, call: Call, admit: AdmitCall, planner: Planner, plan: Plan,
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
                await _settle(store, prices, call, status="upstream_error", http_status=None, usage=Usage(),
                              estimated=False, error="no provider key")
                raise FailedAttempt(Failure(exc.attempts[0]["error"] if exc.attempts else "no_provider_key",
                                            counts=False)) from None
            key = call.target.circuit if plan.routed else None  # a call with no route has no circuit
            if key is not None and not breakers.allow(key):  # opened since the plan was made
                key = None  # no probe slot was taken
                await _settle(store, prices, call, status="skipped", http_status=None, usage=Usage(),
                              estimated=False, error="circuit open")
                raise FailedAttempt(Failure("circuit_open", counts=False))
            try:
                forward = _attempt_body(call, body, spec, max_output, prices,
                                        client.stitcher.text if client is not None and started else None)
            except Untranslatable as exc:  # this target cannot serve the call: nothing was sent
                await _settle(store, prices, call, status="skipped", http_status=None, usage=Usage(),
                              estimated=False, error=f"untranslatable: {exc}")
                raise FailedAttempt(Failure(f"untranslatable: {exc.feature}", counts=False)) from None
            response = await _forward(request, call, forward, client_wants_usage)
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
        await asyncio.sleep(min(left, HOLD_POLL_S))


_STITCHERS: dict[str, type[ChatContinuation] | type[MessagesContinuation]] = {
    "chat": ChatContinuation, "messages": MessagesContinuation}


async def _end_broken(call: Call, client: ClientStream,
                      message: str = "The stream broke off before the end.") -> web.StreamResponse:
    """End a started stream that no target could continue: its format's error event (the SDKs raise on it),
    then the trailer of the last settled step."""
    assert client.response is not None
    with contextlib.suppress(ConnectionError):  # every step is settled: a client gone now loses nothing
        await client.response.write_eof(stream_error_event(call.fmt, message)
                                        + (_trailer(call) if call.settled else b""))
    return client.response


async def _readmit(request: web.Request, call: Call, admit: AdmitCall, planner: Planner, spec: RouteTarget,
                   failure: Failure, delay: float, continued: str | None = None) -> int | None:
    """Admit the call's next attempt (a new step at `spec`'s price, the failover recorded with it); returns the
    output limit a shrinking budget set for it. A refusal (the budget no longer fits, the run was stopped)
    is the agent's answer. `continued`: the answer text the next attempt is asked to continue (its input)."""
    facts = admit.facts
    extra = 0 if continued is None else -(-len(continued.encode()) // 4)  # what the prefill adds to the input
    priced = planner.reserve((spec,), extra_input=extra)
    again = AdmitCall(replace(
        facts, run_id=call.run_id, new_run=False, policy_name=None, policy_version=None, provider=spec.provider,
        input_tokens=facts.input_tokens + extra,
        model=spec.model, reserved_pusd=priced.reserved_pusd, reserved_tokens=priced.reserved_tokens,
        priced=priced.priced, price=priced.price, output_bounded=priced.output_bounded, planner=None,
        failover=Failover(call.step_id, call.target.provider, call.target.model, failure.reason,
                          retry=spec.provider == call.target.provider and spec.model == call.target.model,
                          delay_s=round(delay, 3), continuation=continued is not None)))
    try:
        await _admit(request.app[STORE], again, call)
    except RungateError as error:
        error.headers.update(rungate_headers(call))
        raise
    call.next_attempt(again.step_id, Target(spec.provider, spec.model, "", "", ""), again.reserved_pusd)
    call.warnings.extend(w for w in again.warnings if w not in call.warnings)
    if again.policy is not None:
        call.budget = Budget.after_admission(again)
    return again.max_output


async def _admit(store: EventStore, admit: AdmitCall, call: Call) -> None:
    """Record the admission. If the caller is cancelled meanwhile, the admission may still commit, so a
    settlement is queued behind it (the writer applies jobs in order): the step closes at no cost."""
    try:
        await store.execute(admit, metadata={"agent_id": call.agent_id})
    except asyncio.CancelledError:
        with contextlib.suppress(StoreError):  # the admission may have been refused: nothing to close
            await _shielded(store.execute(SettleStep(admit.step_id, reason="cancelled before forwarding",
                                                     charge_reservation=False)))
        raise
    call.run_id = admit.run_id


async def _shielded(work: Awaitable[Any]) -> None:
    """Finish `work` even if the surrounding task is being cancelled."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


async def _forward(request: web.Request, call: Call, forward: bytes,
                   client_wants_usage: bool) -> web.StreamResponse:
    app = request.app
    store, prices = app[STORE], app[PRICES]
    url = call.target.base_url + call.upstream_fmt.upstream_path
    if call.stopped:  # the kill switch came between this attempt's admission and now: nothing is sent
        await _settle(store, prices, call, status="stopped", http_status=None, usage=Usage(), estimated=False,
                      error="the run was stopped by an operator")
        refusal = force_stopped(call.run_id, call.policy)
        refusal.headers.update(rungate_headers(call))
        raise refusal
    call.task, call.awaiting_upstream = asyncio.current_task(), True
    target = call.target
    try:
        timeout = target.client_timeout(app[SETTINGS].upstream_timeout_s)
        post = (app[HTTP].post(url, data=forward, headers=upstream_headers(request.headers, target),
                               allow_redirects=False) if timeout is None else
                app[HTTP].post(url, data=forward, headers=upstream_headers(request.headers, target),
                               allow_redirects=False, timeout=timeout))
        if target.first_token_s is None or not call.stream:
            upstream = await post
        else:  # a stream must begin in time (its headers here; its first token is watched by the relay)
            async with asyncio.timeout(target.first_token_s):
                upstream = await post
    except asyncio.CancelledError:
        if not call.stopped:
            raise
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()  # the kill switch cancelled the wait, not the handler
        await _stopped(store, prices, call, None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        call.awaiting_upstream = False  # from here a stop must not cancel the settlement
        if call.stopped:
            await _stopped(store, prices, call, None)
        timed_out = isinstance(exc, TimeoutError)
        reason = "timeout" if timed_out else type(exc).__name__
        if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):  # nothing was sent
            await _settle(store, prices, call, status="upstream_error", http_status=None, usage=Usage(),
                          estimated=False, error=reason)
        else:  # the request may have gone out: the provider may bill its prompt (never a silent $0)
            await _settle(store, prices, call, status="upstream_error", http_status=None,
                          usage=Usage(input=call.input_estimate), estimated=True, error=reason)
        raise FailedAttempt(Failure(reason, timed_out=timed_out)) from None
    finally:
        call.awaiting_upstream = False
    call.upstream = upstream
    if call.stopped:
        upstream.close()
    async with upstream:
        if upstream.status in (401, 403):
            # The provider refused Rungate's key: the agent's own token is fine, so this is not a 401 for it,
            # and the provider's body (which may hint at the key) is not relayed.
            await _settle(store, prices, call, status="error", http_status=upstream.status, usage=Usage(),
                          estimated=False, error=f"provider refused the key (status {upstream.status})")
            raise FailedAttempt(Failure("provider_auth_failed", status=upstream.status))
        if call.stream and upstream.status < 300 and upstream.content_type == "text/event-stream":
            return await _relay_stream(request, call, upstream, client_wants_usage)
        if call.client is not None and call.client.started:  # a continuation answered with no stream to stitch
            await _settle(store, prices, call, status="error", http_status=upstream.status, usage=Usage(),
                          estimated=False, error=f"continuation answered status {upstream.status}, not a stream")
            # A refusal of the continuation (a 4xx: e.g. no prefill on this model) says nothing of its health.
            raise FailedAttempt(Failure(f"status {upstream.status}", status=upstream.status,
                                        counts=upstream.status >= 500 or upstream.status == 429))
        try:
            payload = await upstream.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            if call.stopped:
                await _stopped(store, prices, call, upstream.status)
            await _settle(store, prices, call, status="upstream_error", http_status=upstream.status,
                          usage=Usage(input=call.input_estimate), estimated=True, error=type(exc).__name__)
            raise FailedAttempt(Failure(type(exc).__name__, status=upstream.status,
                                        timed_out=isinstance(exc, TimeoutError))) from None
        headers = relayed_headers(upstream.headers)
        if upstream.status >= 400:
            await _settle(store, prices, call, status="error", http_status=upstream.status, usage=Usage(),
                          estimated=False, error=f"upstream status {upstream.status}")
            # A routed call tries again (or elsewhere) where the provider's answer says it may help.
            failure = failure_of(upstream.status, upstream.headers, payload) if call.routed else None
            if failure is not None:
                raise FailedAttempt(failure)
            if call.crossing is not None:  # the provider's error, in the agent's format
                shown, error = call.crossing.error(upstream.status, _json_or_none(payload))
                headers.update(rungate_headers(call))
                headers[hdrs.CONTENT_TYPE] = "application/json"
                return web.Response(body=orjson.dumps(error), status=shown, headers=headers)
        else:
            parsed: Any = _json_or_none(payload)
            usage = call.upstream_fmt.usage(parsed)
            if call.crossing is not None:  # the answer, in the agent's format
                try:
                    answer = call.crossing.answer(parsed, call.model_asked, call.tool_names)
                except Untranslatable:
                    await _settle(store, prices, call, status="error", http_status=upstream.status,
                                  usage=usage or Usage(input=call.input_estimate), estimated=usage is None,
                                  error="the answer could not be translated")
                    raise FailedAttempt(Failure("untranslatable answer", status=upstream.status,
                                                counts=False)) from None
                call.translated(answer.warnings)
                parsed, payload = answer.body, orjson.dumps(answer.body)
            tool_calls = call.fmt.tool_calls(parsed)
            blocked = _blocked_tool(call, tool_calls)
            gated, then = _gates(call, tool_calls, upstream.status, headers, payload, stream=False) \
                if blocked is None else (None, ())
            status = "blocked" if blocked is not None else "held" if gated is not None else "ok"
            await _settle(store, prices, call, status=status, http_status=upstream.status,
                          usage=usage if usage is not None else Usage(input=call.input_estimate),
                          estimated=usage is None, error=None if usage else "usage missing from the answer",
                          tool_calls=tool_calls, then=then)
            if blocked is not None:  # the answer calls a blocked tool: it is paid for, but not delivered
                raise _tool_refusal(call, blocked)
            if gated is not None:  # the answer calls a gated tool: paid for, held until approved
                return await _awaiting(request, call, gated)
        headers.update(rungate_headers(call))
        return web.Response(body=payload, status=upstream.status, headers=headers)


def _json_or_none(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


def _gates(call: Call, tool_calls: Sequence[ToolCall], http_status: int, headers: CIMultiDict[str],
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


async def _awaiting(request: web.Request, call: Call, hold: Hold) -> web.StreamResponse:
    if (call.approval_mode or hold.mode) == "hold":
        return await _wait_for_decision(request, call, hold.hold_id)
    return _awaiting_response(call, hold.hold_id, [gate.model_dump() for gate in hold.gates])


async def _wait_for_decision(request: web.Request, call: Call, hold_id: str) -> web.StreamResponse:
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
            await response.write_eof(body + _trailer(call) if call.stream else body)
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


async def _from_hold(request: web.Request, call: Call, admit: AdmitCall) -> web.StreamResponse:
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
            return await _wait_for_decision(request, call, hold["id"])
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
        await response.write_eof(body + _trailer(call))
    return response


class _ToolBlocked(Exception):
    """A streamed answer named `tool`, which the run's policy blocks — or, `gated`, which needs approval
    although the request did not offer it (so its stream was not held back): it is cut, never relayed."""

    def __init__(self, tool: str, gated: bool = False) -> None:
        super().__init__(tool)
        self.tool = tool
        self.gated = gated


def _withheld_refusal(call: Call, status: str, withheld: _ToolBlocked | None, http_status: int,
                      error: str | None) -> RungateError:
    """The error for a held-back stream that did not end cleanly: what a plain call would have got."""
    if status == "stopped":
        refusal = force_stopped(call.run_id, call.policy)
        refusal.headers.update(rungate_headers(call))
        return refusal
    if status == "blocked" and withheld is not None and not withheld.gated:
        return _tool_refusal(call, withheld.tool)
    return _provider_error(call, "The provider's answer broke off before it was complete.", http_status,
                           error or status)


def _unoffered_gated_name(call: Call, names: Sequence[str]) -> str | None:
    """The first tool an answer calls that an approval rule (enforced) may gate, when the stream was not held
    back for it (the request did not offer it)."""
    if call.policy is None:
        return None
    return next((name for name in names if name and call.policy.approvals.enforces(name)), None)


def _blocked_name(call: Call, names: Sequence[str]) -> str | None:
    """The first of these tool names the run's policy blocks (enforced), if any."""
    policy = call.policy
    if policy is None or not _blocks_tools(policy):
        return None
    return next((name for name in names if name and policy.tools_blocked.blocked(name)), None)


def _blocks_tools(policy: CompiledPolicy | None) -> bool:
    """Whether `policy` refuses (not just reports) some tool."""
    return policy is not None and policy.tools_mode != "shadow" and bool(policy.tools_blocked.patterns)


def _blocked_tool(call: Call, tool_calls: Sequence[ToolCall]) -> str | None:
    """The first tool the answer calls that the run's policy blocks (enforced), if any."""
    return _blocked_name(call, [t.name for t in tool_calls])


def _tool_refusal(call: Call, tool: str) -> GovernanceRefusal:
    assert call.policy is not None
    error = GovernanceRefusal(f"The answer called tool {tool}, which this run's policy blocks; it was not delivered.",
                              code="tool_blocked", status=403, run_id=call.run_id, context={
                                  "rule": "tools.blocked", "tool": tool, "where": "answer",
                                  **policy_fields(call.policy),
                                  "next": "Ask again without that tool, or ask an operator."},
                              headers={"x-should-retry": "false"})
    error.headers.update(rungate_headers(call))
    return error


async def _stopped(store: EventStore, prices: PriceTable, call: Call, http_status: int | None) -> NoReturn:
    """Settle a plain call the kill switch cut (charged its reservation: the provider may bill what it did)
    and refuse it with 403 `run_force_stopped`."""
    await _settle(store, prices, call, status="stopped", http_status=http_status,
                  usage=Usage(input=call.input_estimate), estimated=True, error="the run was stopped by an operator",
                  charge=call.reserved_pusd)
    error = force_stopped(call.run_id, call.policy)
    error.headers.update(rungate_headers(call))
    raise error


def _provider_error(call: Call, message: str, status: int | None, reason: str) -> ProviderError:
    error = ProviderError(message, [{"provider": call.target.provider, "model": call.target.model,
                                     "status": status, "error": reason}])
    error.headers.update(rungate_headers(call))
    return error


async def _send(response: web.StreamResponse, data: bytes) -> None:
    try:
        await response.write(data)
    except ConnectionError as exc:  # aiohttp's ClientConnectionResetError is one
        raise ClientGone() from exc


async def _relay_stream(request: web.Request, call: Call, upstream: aiohttp.ClientResponse,
                        client_wants_usage: bool) -> web.StreamResponse:
    """Relay SSE events as they arrive; once headers are out, every ending is written into the stream."""
    store, prices = request.app[STORE], request.app[PRICES]
    upstream_fmt, crossing = call.upstream_fmt, call.crossing
    assert upstream_fmt.meter is not None
    meter = call.meter = upstream_fmt.meter(client_wants_usage or crossing is not None)
    # A call another target may continue goes through its stitcher, so that every upstream's events make one
    # answer in the agent's stream; once that stream started, this attempt continues it.
    client = call.client
    stitcher = None if client is None else client.stitcher
    continuing = client is not None and client.started
    # Served by the other vendor: each upstream event becomes the agent's events in its own format.
    translator = None if crossing is None else crossing.stream(call.model_asked, call.tool_names,
                                                               call.input_estimate, client_wants_usage, stitcher)
    answer_headers = relayed_headers(upstream.headers)
    if client is not None and client.response is not None:
        response = client.response
    else:
        response = web.StreamResponse(status=upstream.status, headers=answer_headers)
        response.headers.update(rungate_headers(call, final=False))
        if client is not None:
            client.response = response
    # A stream that may call a gated tool is held back whole: its 202 must come before any SSE byte. A routed
    # one is held back until its first token, so that a stream failing before then can still fail over.
    buffered: list[bytes] | None = [] if not continuing and buffers_stream(call.policy, call.offered) else None
    pending: list[bytes] | None = [] if buffered is None and call.routed else None
    if buffered is None and pending is None and not continuing:  # relayed as it comes: the headers go now
        await _start(request, response)
    timed_out = False
    parser = SSEParser()
    held_done: bytes | None = None
    status, error = "ok", None
    # Only a call under a policy that blocks tools (enforced) pays for watching the tool calls of a stream;
    # one under approval rules whose stream was relayed as it came (it offered no gated tool) watches for a
    # gated tool all the same: a model that calls one anyway is cut before the call goes out. Names are
    # looked at only when a new one appears.
    watch_tools = _blocks_tools(call.policy)
    watch_gates = buffered is None and call.policy is not None and bool(call.policy.approvals)
    seen_names: tuple[str, ...] = ()
    held_bytes = 0
    withheld: _ToolBlocked | None = None

    async def relay(events: Sequence[Any]) -> None:
        """Forward the complete events of one upstream read in one write (nothing waits for more)."""
        nonlocal held_done, seen_names
        out: list[bytes] = []
        for event in events:
            if not meter.feed(event):
                continue
            if meter.malformed:  # not relayed: the stream is broken from here
                if out:
                    await emit(b"".join(out))
                raise ValueError("the provider sent an event that is not JSON")
            if pending is not None and meter.error is not None:  # not relayed: the next target may serve
                raise ValueError("the provider sent an error before its first token")
            if watch_tools or watch_gates:
                names = meter.tool_names
                if names != seen_names:
                    seen_names = names
                    if crossing is not None:  # the agent's names for them
                        names = tuple(call.tool_names.original(name) for name in names)
                    blocked = _blocked_name(call, names) if watch_tools else None
                    gated = _unoffered_gated_name(call, names) if watch_gates and blocked is None else None
                    if blocked is not None or gated is not None:
                        if out:
                            await emit(b"".join(out))
                        # this event names a blocked (or unoffered gated) tool: it is not relayed
                        raise _ToolBlocked(blocked or gated or "", gated=gated is not None)
            if translator is not None or stitcher is not None:
                # ValueError on an event it cannot read: a break
                for item in (translator or stitcher).feed(event):  # type: ignore[union-attr]
                    if item == DONE:
                        held_done = item  # written after settlement, with the trailer
                    else:
                        out.append(item)
                continue
            if call.fmt is CHAT and event.data.strip() == "[DONE]":
                held_done = event.raw  # written after settlement, with the trailer
                continue
            out.append(event.raw)
        if out:
            await emit(b"".join(out))

    async def emit(data: bytes) -> None:
        nonlocal held_bytes, pending
        if pending is not None:
            pending.append(data)
            held_bytes += len(data)
            # The first token: from here on the answer is the agent's (as is a preamble past all reason).
            if meter.output_text_bytes or held_bytes > MAX_PREAMBLE_BYTES:
                if not response.prepared:
                    await _start(request, response)
                data, pending = b"".join(pending), None
            else:
                return
        if buffered is None:
            await _send(response, data)
            return
        held_bytes += len(data)
        if held_bytes > MAX_HELD_BYTES:
            raise ValueError(f"the answer is over {MAX_HELD_BYTES} bytes, more than can be held for approval")
        buffered.append(data)

    try:
        try:
            first_token_s = call.target.first_token_s
            if first_token_s is not None and pending is not None:  # the first token must come in time
                async with asyncio.timeout_at(asyncio.get_running_loop().time() + first_token_s
                                              - (time.monotonic() - call.started)):
                    while pending is not None and (chunk := await upstream.content.readany()):
                        await relay(parser.feed(chunk))
            async for chunk in upstream.content.iter_any():
                await relay(parser.feed(chunk))
            await relay(parser.flush())
        except (aiohttp.ClientError, TimeoutError) as exc:
            timed_out = isinstance(exc, TimeoutError)
            status, error = "cut", f"upstream stream broke: {type(exc).__name__}"
            if call.stopped:
                status, error = "stopped", "the run was stopped by an operator"
        except ValueError as exc:  # an SSE event beyond the parser's size bound
            status, error = "cut", f"upstream stream unreadable: {exc}"
        except _ToolBlocked as exc:
            withheld = exc
            status, error = "blocked", (f"the answer called {exc.tool}, which needs approval, without the request"
                                        " offering it" if exc.gated else f"the answer called a blocked tool"
                                                                          f" ({exc.tool})")
            upstream.close()
        if status == "ok" and call.stopped:
            status, error = "stopped", "the run was stopped by an operator"
        if status == "ok" and not meter.done:
            status, error = "cut", "upstream stream ended without its final event"
        if translator is not None:
            call.translated(translator.warnings)
        if meter.error is not None and status == "ok":
            status, error = "error", "the provider sent an error event"
        usage, estimated = call.seen_usage()
        gated: Hold | None = None
        then: tuple[NewEvent, ...] = ()
        tool_calls = _agent_calls(call, meter.tool_calls)
        if buffered is not None and status == "ok":
            gated, then = _gates(call, tool_calls, upstream.status, answer_headers,
                                 b"".join(buffered) + (held_done or b""), stream=True)
            if gated is not None:
                status, error = "held", None
        try:
            await _settle(store, prices, call, status=status, http_status=upstream.status, usage=usage,
                          estimated=estimated, error=error, tool_calls=tool_calls, then=then)
        except StoreError:
            if gated is not None:  # not recorded, so not held: the gated call must not go out either
                raise
            status, error = "cut", "the step could not be recorded"
        if gated is not None:
            return await _awaiting(request, call, gated)
        if call.routed and status in ("cut", "error") and (pending is not None or buffered is not None):
            # Nothing reached the agent: the call is tried again, or elsewhere.
            raise FailedAttempt(Failure(error or status, timed_out=timed_out))
        if status == "cut" and stitcher is not None and stitcher.resumable and response.prepared:
            # Tokens reached the agent: another target may continue the answer in this same stream.
            raise FailedAttempt(Failure(error or status, timed_out=timed_out))
        if buffered is not None and status != "ok":
            # Held back in case it called a gated tool, and it did not end cleanly: none of it goes out (its
            # tool calls were never judged whole); nothing was sent yet, so the agent gets a plain error.
            raise _withheld_refusal(call, status, withheld, upstream.status, error)
        # The ending goes out in one write with the end of the body (one send, not three).
        tail: list[bytes] = []
        if status == "cut":
            call.broken = True
            tail.append(stream_error_event(call.fmt, "The stream broke off before the end."))
        elif status == "stopped":
            tail.append(stream_error_event(call.fmt, "An operator stopped this run; the stream ends here."))
        elif withheld is not None and withheld.gated:
            tail.append(stream_error_event(call.fmt, "The answer called a tool that needs approval, which the"
                                                     " request did not offer; the stream ends here.",
                                           code="tool_approval_required"))
        elif status == "blocked":
            tail.append(stream_error_event(call.fmt, "The answer called a tool this run's policy blocks"
                                                     " (tool_blocked); the stream ends here."))
        # Chat streams: the trailer follows [DONE]. Stock OpenAI SDKs stop reading at [DONE], so they never see
        # it (placed before, openai 3.x yields it as a chunk whose `choices` is None and naive loops crash);
        # the `rungate` SDK reads on to the end of the body and picks it up. Other formats end with it.
        if held_done is not None and status not in ("cut", "stopped", "blocked"):
            tail.append(held_done)
        if call.settled:
            tail.append(_trailer(call))
        with contextlib.suppress(ConnectionError):  # the step is settled: a client gone now loses nothing
            if buffered is not None:  # held back in case it called a gated tool; it did not: it goes out now
                response.headers.update(rungate_headers(call, final=False))
                request[STREAM_STARTED] = True
                await response.prepare(request)
                tail[:0] = buffered
            elif pending is not None:  # it ended before a first token (an empty answer, or an error relayed)
                await _start(request, response)
                tail[:0] = pending
            await response.write_eof(b"".join(tail))
    except ClientGone:
        usage, estimated = call.seen_usage()
        await _shielded(_settle(store, prices, call, status="client_closed", http_status=upstream.status,
                                usage=usage, estimated=estimated, error="client disconnected",
                                tool_calls=_agent_calls(call, meter.tool_calls)))
    return response


def _agent_calls(call: Call, calls: list[ToolCall]) -> list[ToolCall]:
    """A stream's tool calls under the agent's own names (a target of the other vendor may have had to
    shorten them): what gates judge and the step records."""
    if call.crossing is None or not call.tool_names.restore:
        return calls
    return [ToolCall(c.id, call.tool_names.original(c.name), c.arguments) for c in calls]


async def _start(request: web.Request, response: web.StreamResponse) -> None:
    """Send a relayed stream's headers (from here on, errors end the stream instead of a new response)."""
    request[STREAM_STARTED] = True
    try:
        await response.prepare(request)
    except ConnectionError as exc:
        raise ClientGone() from exc


def _trailer(call: Call) -> bytes:
    return encode_event(orjson.dumps({
        "type": "rungate", "run_id": call.run_id, "step_id": call.step_id, "provider": call.target.provider,
        "model": call.target.model, "cost_usd": None if call.cost_pusd is None else format_usd(call.cost_pusd),
        "tokens": {"input": call.usage.total_input, "output": call.usage.output},
    }), "rungate")


def rungate_headers(call: Call, final: bool = True) -> CIMultiDict[str]:
    """The `x-rungate-*` headers of a proxied answer (`final`: the step is settled, figures are known)."""
    headers: CIMultiDict[str] = CIMultiDict({
        "x-rungate-run-id": call.run_id,
        "x-rungate-step-id": call.step_id,
        "x-rungate-provider": call.target.provider,
        "x-rungate-model": call.target.model,
        "x-rungate-failover": str(call.failovers),
        "x-rungate-budget-remaining-usd": "unlimited",
        "x-rungate-budget-remaining-tokens": "unlimited",
    })
    budget = call.budget
    if budget is not None and budget.remaining_pusd is not None:
        headers["x-rungate-budget-remaining-usd"] = format_usd(max(0, budget.remaining_pusd))
    if budget is not None and budget.remaining_tokens is not None:
        headers["x-rungate-budget-remaining-tokens"] = str(max(0, budget.remaining_tokens))
    if final and call.settled:
        headers["x-rungate-tokens-used"] = str(call.usage.total)
        headers["x-rungate-cost-usd"] = "unpriced" if call.cost_pusd is None else format_usd(call.cost_pusd)
    if call.warnings:
        headers["x-rungate-warning"] = warning_header(call.warnings)
    return headers


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def warning_header(warnings: Sequence[str]) -> str:
    """Warnings joined for `x-rungate-warning`; control characters (a tool name may carry CR/LF) become spaces."""
    return _CONTROL.sub(" ", "; ".join(warnings))


async def _settle(store: EventStore, prices: PriceTable, call: Call, *, status: str, http_status: int | None,
                  usage: Usage, estimated: bool, error: str | None, tool_calls: Sequence[ToolCall] = (),
                  charge: int | None = None, then: Sequence[NewEvent] = ()) -> None:
    """Record the step's `StepCompleted` once (retrying a store hiccup); a no-op when already settled.

    The cost is the real one, or for an estimate the larger of estimate and reservation (never a silent $0),
    and at least `charge` when given (a plain call the kill switch cut is charged its reservation).
    Raises `StoreError` when the store stays unavailable; the sweeper then closes the step later.
    """
    if call.settled:
        return
    cost = prices.cost_pico(call.target.model, usage)
    unpriced = cost is None
    if estimated and status in _ANSWERED and call.reserved_pusd:
        # Usage missing from a complete answer (delivered, held or withheld): charge the reservation.
        cost = max(cost or 0, call.reserved_pusd)
    if charge is not None:
        cost = max(cost or 0, charge)
    event = StepCompleted(
        step_id=call.step_id, run_id=call.run_id, status=status, http_status=http_status,
        provider=call.target.provider, model=call.target.model, usage=usage.as_dict(), cost_pusd=cost,
        unpriced=unpriced, estimated=estimated, latency_ms=int((time.monotonic() - call.started) * 1000),
        error=error, tool_calls=[{"id": t.id, "name": t.name, "arguments": t.arguments} for t in tool_calls],
        translation_dropped=list(call.dropped))
    holding = any(isinstance(new.event, AnswerHeld) for new in then)
    settled_now = False
    for attempt in range(SETTLE_ATTEMPTS):
        try:
            # Under a policy the run is read with the settlement: exact budget headers, the caps' alerts.
            settle = SettleStep(call.step_id, event, run_id=call.run_id if call.policy is not None else None,
                                then=tuple(then))
            await store.execute(settle, metadata={"agent_id": call.agent_id})
            settled_now = settle.settled_now
            if settle.run_after is not None and call.budget is not None:
                call.budget.settled(settle.run_after)
            break
        except StoreError:
            if attempt == SETTLE_ATTEMPTS - 1:
                raise
            await asyncio.sleep(0.05 * 4**attempt)
    if holding and not settled_now:
        # Someone else closed the step first (the sweeper, after a very long call): the hold that was to be
        # recorded with it was not, so the answer can be neither held nor delivered.
        raise StoreError("the step was closed before its answer could be held", status=503,
                         code="store_unavailable")
    call.settled = True
    call.usage, call.cost_pusd = usage, cost
    if unpriced:
        call.warnings.append(f"model {call.target.model} has no price; cost recorded as null")
    if estimated and status == "ok":
        call.warnings.append("the provider reported no usage; tokens are estimated")
    log.debug("step_settled", step_id=call.step_id, status=status, tokens=usage.total,
              cost_usd=None if cost is None else format_usd(cost), estimated=estimated)
