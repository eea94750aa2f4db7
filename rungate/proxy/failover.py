"""Retry and failover as one policy (SPEC §6): which targets a call may use, and what to do after a failure.

A call's route (policy first, then the configuration file) lists its targets. Before anything reached the
agent, a failed attempt is followed by another:

- connection errors, resets, 429, 5xx and 529 are retried on the same target up to `RETRIES_PER_TARGET`
  times (honouring `Retry-After` up to `RUNGATE_RETRY_AFTER_MAX_S`, else a jittered exponential backoff
  from `RUNGATE_RETRY_BASE_S`), then the call fails over to the next target;
- a target that timed out (no answer, or no first token, within its limit) is not retried: the call
  fails over at once;
- `context_length_exceeded` is never retried on the same model; the call goes on at the next target with
  another model, if any;
- any other 4xx (a content-filter refusal included) is the agent's answer: relayed, no failover.

Targets whose circuit is open are skipped (listed with `"error": "circuit_open"`). At most
`MAX_ATTEMPTS` attempts per call. Every attempt is a step admitted against the budget at its own target's
price; a failed one is settled with what it used: nothing for an error answer or a refused connection, the
input estimate when the request may have gone out and no answer came back.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import orjson

from rungate.clock import utcnow
from rungate.enforce.policy import CompiledPolicy
from rungate.enforce.rules import model_allowed
from rungate.errors import BadRequest
from rungate.prices import DEFAULT_IMAGE_INPUT_TOKENS, PriceTable, format_usd
from rungate.proxy.breaker import Breakers, TargetKey
from rungate.proxy.crossing import CROSSINGS
from rungate.proxy.formats import WireFormat
from rungate.routing import Provider, RouteTable, RouteTarget
from rungate.runs import Plan
from rungate.translate.errors import is_context_length_error

RETRIES_PER_TARGET = 1
# The most one call may reserve ($100,000): far above any real call's worst case, and low enough that a run's
# reservations, summed in 64-bit pico-USD columns, cannot overflow.
MAX_RESERVATION_PUSD = 100_000 * 10**12
MAX_ATTEMPTS = 8
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


@dataclass(frozen=True)
class Failure:
    """Why an attempt did not produce the agent's answer; `step_status` is how its step was settled."""

    reason: str  # for the 502's attempt list and the `step.failed_over` event
    status: int | None = None
    retry_after_s: float | None = None
    timed_out: bool = False
    context_length: bool = False
    counts: bool = True  # tells about the target's health (its circuit counts it)

    @property
    def retryable(self) -> bool:
        """Worth trying the same target again (a silent timeout is not: fail over at once)."""
        if self.timed_out or self.context_length or not self.counts:
            return False
        return self.status is None or self.status in RETRYABLE_STATUSES

    def entry(self, provider: str, model: str) -> dict[str, Any]:
        return {"provider": provider, "model": model, "status": self.status, "error": self.reason}


def failure_of(status: int, headers: Any, payload: bytes) -> Failure | None:
    """The failure an upstream error answer means for a routed call, or None when it is the agent's answer
    (a 4xx about the request itself, a content-filter refusal included, is relayed as it came)."""
    if status in RETRYABLE_STATUSES:
        return Failure(f"status {status}", status=status, retry_after_s=retry_after_s(headers))
    if status == 400:
        try:
            parsed = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        if is_context_length_error(status, parsed):
            return Failure("context_length_exceeded", status=status, context_length=True, counts=False)
    return None


def next_attempt(failure: Failure, targets: Sequence[RouteTarget], index: int, retries: int, made: int, *,
                 routed: bool, available: Callable[[RouteTarget], bool], retry_base_s: float,
                 retry_after_max_s: float) -> tuple[int, float] | None:
    """Where the call goes after `failure` at `targets[index]` (retried `retries` times so far, `made` attempts
    in all): `(index, delay_s)` — the same target after a delay, or a later one at once — or None: give up.
    A target whose circuit is open (`available` says no) is not tried.

    A call with no route is never retried here: the agent's SDK retries it itself (stacked retries multiply
    the requests on the wire)."""
    if not routed or made >= MAX_ATTEMPTS:
        return None
    if failure.retryable and retries < RETRIES_PER_TARGET and available(targets[index]):
        delay = failure.retry_after_s if failure.retry_after_s is not None else backoff_s(retries + 1, retry_base_s)
        if delay <= retry_after_max_s:  # a longer wait than that is better spent on the next target
            return index, delay
    for later in range(index + 1, len(targets)):
        if failure.context_length and targets[later].model == targets[index].model:
            continue  # the same model has the same context window
        if available(targets[later]):
            return later, 0.0
    return None


def continuer(targets: Sequence[RouteTarget], index: int, made: int,
              available: Callable[[RouteTarget], bool]) -> int | None:
    """The next target after `targets[index]` that can continue a broken stream (it accepts an assistant
    prefill, its circuit is not open), or None (also once `made` attempts reached the bound)."""
    if made >= MAX_ATTEMPTS:
        return None
    return next((later for later in range(index + 1, len(targets))
                 if targets[later].accepts_prefill and available(targets[later])), None)


def retry_after_s(headers: Any) -> float | None:
    """`retry-after-ms` or `retry-after` (seconds or an HTTP date) of a response, when given and sane."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            value = float(raw_ms) / 1000
        except ValueError:
            value = -1.0
        if 0 <= value < 86400:
            return value
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            value = (parsedate_to_datetime(raw) - utcnow()).total_seconds()
        except (TypeError, ValueError):
            return None
    return max(0.0, value) if value < 86400 else None


def backoff_s(retry: int, base_s: float) -> float:
    """Jittered exponential backoff for the `retry`-th retry (1-based): between half and all of base·2^(n-1)."""
    ceiling: float = base_s * 2.0 ** (retry - 1)
    return ceiling * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not security


def target_allowed(policy: CompiledPolicy | None, spec: RouteTarget) -> bool:
    """Whether the run's policy lets `spec`'s model serve (the model lists apply to every target)."""
    return model_allowed(policy, spec.provider, spec.model)


def serves(fmt: WireFormat, spec: RouteTarget) -> bool:
    """Whether a `spec` target can answer a call in `fmt`: its own provider's formats always, the other
    vendor's only where a translation exists (`CROSSINGS`)."""
    return spec.provider == fmt.provider or (fmt.name, spec.provider) in CROSSINGS


@dataclass
class Planner:
    """Builds a call's `Plan` once its run's policy is known (called inside the admission)."""

    fmt: WireFormat
    model: str
    routes: RouteTable
    prices: PriceTable
    breakers: Breakers
    circuit: Callable[[RouteTarget], TargetKey]
    input_tokens: int
    max_output: int | None
    choices: int
    cache_writes: bool = False  # the call asks for prompt caching: its input may be billed at a write rate
    web_searches: int = 0  # the most server-side web searches the call allows (their fees are reserved)
    images: int = 0  # image parts in the input, each reserved at the target model's most per image

    def __call__(self, policy: CompiledPolicy | None, carried: int = 0) -> Plan | None:
        """The targets `policy` allows, and the first one's worst case; `carried`: input tokens the request
        brings beyond its own body (the answer it continues)."""
        routed = policy.routes.match(self.model) if policy is not None and policy.routes else None
        if routed is None:
            routed = self.routes.match(self.model) if self.routes else None
        if routed is None:  # no route: the format's own provider, the model as asked, no failover
            return self.reserve((_default_target(self.fmt.provider, self.model),), extra_input=carried)
        usable: list[RouteTarget] = []
        skipped: list[dict[str, Any]] = []
        for spec in routed:
            reason = None
            if not serves(self.fmt, spec):
                reason = "format_not_translatable"
            elif not target_allowed(policy, spec):
                reason = "model_not_allowed"
            if reason is None:
                usable.append(spec)
            else:
                skipped.append({"provider": spec.provider, "model": spec.model, "status": None, "error": reason})
        if not usable:
            return None
        healthy = []
        for spec in usable:
            if self.breakers.available(self.circuit(spec)):
                healthy.append(spec)
            else:
                skipped.append({"provider": spec.provider, "model": spec.model, "status": None,
                                "error": "circuit_open"})
        if not healthy:  # every allowed target's circuit is open: refused with 502, nothing goes upstream
            return Plan(targets=(), provider=usable[0].provider, model=usable[0].model, reserved_pusd=0,
                        reserved_tokens=0, priced=True, price=None, output_bounded=True, skipped=tuple(skipped),
                        routed=True)
        return self.reserve(tuple(healthy), tuple(skipped), routed=True, extra_input=carried)

    def reserve(self, targets: Sequence[RouteTarget], skipped: tuple[dict[str, Any], ...] = (), *,
                routed: bool = False, extra_input: int = 0) -> Plan:
        """The plan with the first target's worst case (input estimate, each image at the model's most per image,
        plus the output limit, at its price, the input at a cache-write rate where the call asks for caching and
        that rate is dearer, and the fees of the web searches it allows);
        `extra_input` tokens more of input (a continuation carries the answer so far; a Responses call, the answer
        it continues)."""
        first = targets[0]
        price = self.prices.lookup(first.model)
        out_limit = self.max_output if self.max_output is not None else (
            price.max_output_tokens if price is not None else None)
        per_image = price.image_tokens if price is not None else DEFAULT_IMAGE_INPUT_TOKENS
        input_tokens = self.input_tokens + extra_input + self.images * per_image
        worst = self.prices.max_cost_pico(first.model, input_tokens, (out_limit or 0) * self.choices,
                                          cache_writes=self.cache_writes, web_searches=self.web_searches)
        if worst is not None and worst > MAX_RESERVATION_PUSD:
            raise BadRequest(f"The call's worst case ({format_usd(worst)} USD at {first.model}'s price) is more than"
                             f" one call may reserve ({format_usd(MAX_RESERVATION_PUSD)} USD); ask for fewer"
                             " output tokens or fewer choices.", code="reservation_too_large")
        return Plan(targets=tuple(targets), provider=first.provider, model=first.model, reserved_pusd=worst or 0,
                    reserved_tokens=input_tokens + (out_limit or 0) * self.choices, priced=worst is not None,
                    price=price, output_bounded=out_limit is not None or self.fmt.meter is None, skipped=skipped,
                    routed=routed, input_tokens=input_tokens)


@functools.lru_cache(maxsize=1024)
def _default_target(provider: Provider, model: str) -> RouteTarget:
    """The one target of a model no route names (built once per model: it is on every such call's path)."""
    return RouteTarget(provider=provider, model=model)
