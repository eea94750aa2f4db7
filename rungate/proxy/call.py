"""One proxied call's state from admission to settlement, and what every path of it shares: settling its step
once (`settle_step`), its `x-rungate-*` headers and SSE trailer, and writing to the agent.

Every admitted step is settled by `SettleStep`, which records its `StepCompleted` only while the step is
still open: upstream errors, cut streams, a client that walks away, a cancelled handler — each path settles
once, with the tokens seen so far. A step whose process died is settled by the app's sweeper.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from rungate.enforce.policy import CompiledPolicy
from rungate.enforce.rules import RunState, budget_limit_pusd
from rungate.errors import StoreError
from rungate.events import NewEvent
from rungate.events.catalogue import AnswerHeld, StepCompleted
from rungate.prices import PriceTable, format_usd
from rungate.providers.metering import ToolCall
from rungate.providers.sse import encode_event
from rungate.proxy.crossing import Crossing
from rungate.proxy.failover import Failure
from rungate.proxy.formats import RESPONSES, StreamMeter, WireFormat
from rungate.proxy.keys import STREAM_STARTED
from rungate.proxy.upstream import Target
from rungate.runs import AdmitCall, SettleStep, force_stopped
from rungate.store import EventStore
from rungate.translate.common import ToolNames
from rungate.translate.continuation import ChatContinuation, MessagesContinuation
from rungate.usage import Usage

SETTLE_ATTEMPTS = 3
_ANSWERED = ("ok", "held")  # the provider's answer arrived whole: its usage should have come with it
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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
    admitted_at: int = 0  # the log position of the current attempt's admission (what a stop is compared with)
    settled: bool = False
    meter: StreamMeter | None = None
    usage: Usage = field(default_factory=Usage)
    cost_pusd: int | None = 0
    warnings: list[str] = field(default_factory=list)
    # Shadow-mode decisions on the answer, recorded with the step's StepCompleted (`warnings`).
    decisions: list[dict[str, Any]] = field(default_factory=list)
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
    response_id: str | None = None  # a plain Responses API answer's id (a stream's is its meter's)

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
        self.response_id = None
        self.failovers += 1

    def seen_usage(self) -> tuple[Usage, bool]:
        """What a stream reported for the whole answer, or else an estimate from what it reported so far and
        what was relayed (and whether estimated). An Anthropic stream cut before its `message_delta` has
        reported only its input side (and an output of 1): the output relayed is estimated, never taken as 1."""
        if self.meter is not None and self.meter.usage_final:
            assert self.meter.usage is not None
            return self.meter.usage, False
        if self.meter is not None:
            return self.meter.estimated_usage(self.input_estimate), True
        return Usage(input=self.input_estimate), True


class FailedAttempt(Exception):
    """An attempt failed before anything reached the agent (its step is settled): retry or fail over."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.reason)
        self.failure = failure


async def shielded(work: Awaitable[Any]) -> None:
    """Finish `work` even if the surrounding task is being cancelled."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


async def send_to_agent(response: web.StreamResponse, data: bytes) -> None:
    """Write to a started stream; `ClientGone` when the agent has left."""
    try:
        await response.write(data)
    except ConnectionError as exc:  # aiohttp's ClientConnectionResetError is one
        raise ClientGone() from exc


async def start_stream(request: web.Request, response: web.StreamResponse) -> None:
    """Send a relayed stream's headers (from here on, errors end the stream instead of a new response)."""
    request[STREAM_STARTED] = True
    try:
        await response.prepare(request)
    except ConnectionError as exc:
        raise ClientGone() from exc


def agent_calls(call: Call, calls: list[ToolCall]) -> list[ToolCall]:
    """A stream's tool calls under the agent's own names (a target of the other vendor may have had to
    shorten them): what gates judge and the step records."""
    if call.crossing is None or not call.tool_names.restore:
        return calls
    return [ToolCall(c.id, call.tool_names.original(c.name), c.arguments) for c in calls]


async def refuse_stopped(store: EventStore, prices: PriceTable, call: Call, http_status: int | None) -> NoReturn:
    """Settle a plain call the kill switch cut (charged its reservation: the provider may bill what it did)
    and refuse it with 403 `run_force_stopped`."""
    await settle_step(store, prices, call, status="stopped", http_status=http_status,
                      usage=Usage(input=call.input_estimate), estimated=True,
                      error="the run was stopped by an operator", charge=call.reserved_pusd)
    error = force_stopped(call.run_id, call.policy)
    error.headers.update(rungate_headers(call))
    raise error


def trailer(call: Call) -> bytes:
    """The `event: rungate` SSE event that ends a stream: the run, the step, what served it and its cost."""
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


def warning_header(warnings: Sequence[str]) -> str:
    """Warnings joined for `x-rungate-warning`; control characters (a tool name may carry CR/LF) become spaces."""
    return _CONTROL.sub(" ", "; ".join(warnings))


def _response_id(call: Call) -> str | None:
    """The id of the Responses API answer this attempt got from its provider (None for other formats and for an
    answer translated from another vendor's, whose id no provider knows)."""
    if call.fmt is not RESPONSES or call.crossing is not None:
        return None
    if call.response_id is not None:
        return call.response_id
    return call.meter.response_id if call.meter is not None else None


async def settle_step(store: EventStore, prices: PriceTable, call: Call, *, status: str, http_status: int | None,
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
        translation_dropped=list(call.dropped), warnings=list(call.decisions), response_id=_response_id(call))
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
    # No log line here: the step's `StepCompleted` is the record (a filtered debug call still cost each call
    # a logger bind and a price formatted).
