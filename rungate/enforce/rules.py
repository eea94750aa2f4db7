"""The rules: a pure function from (policy, run state, call) to the verdicts that apply (SPEC §4).

No I/O and no clock: the caller (admission, inside the write transaction) hands in the run as the
projections show it at that instant, so two concurrent calls can never both spend the same dollar. Each
verdict names its rule by its path in the policy; a rule in shadow mode is reported, never enforced.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from rungate.enforce.policy import CompiledPolicy
from rungate.prices import format_usd


@dataclass(frozen=True, slots=True)
class RunState:
    """What the run's projection row says before this call (zeros for a run this call starts)."""

    run_id: str
    step_count: int = 0
    spend_pusd: int = 0
    reserved_pusd: int = 0
    tokens_used: int = 0
    reserved_tokens: int = 0
    budget_add_pusd: int = 0
    repeats: int = 0  # earlier steps of the run with this call's exact request body


@dataclass(frozen=True, slots=True)
class CallAsk:
    """What the call would use at worst, and what it names."""

    provider: str
    model: str
    reserved_pusd: int  # worst-case cost; 0 when the model has no price
    reserved_tokens: int  # input estimate plus the most output it may produce
    priced: bool
    tools: tuple[str, ...] = ()  # tools the request offers the model (or the one a logged step ran)
    kind: str = "llm"  # "tool": a logged tool step (no model; its cost is already spent)
    # For `on_exceed: shrink`: the input's share of the worst case, and the price of output tokens.
    input_tokens: int = 0
    input_pusd: int = 0
    output_pusd_per_million: int = 0
    embedding: bool = False  # no output to shrink
    choices: int = 1  # answers asked for (OpenAI chat `n`): each may use the whole output limit
    output_bounded: bool = True  # False: no output limit is known, so the worst case is unbounded


@dataclass(frozen=True, slots=True)
class Verdict:
    """One rule the call breaks: the refusal it means (status, code, message, context) and its mode."""

    rule: str
    code: str
    status: int
    message: str
    shadow: bool
    context: dict[str, Any] = field(default_factory=dict)
    retry_after: int | None = None


def budget_limit_pusd(policy: CompiledPolicy | None, run: RunState) -> int | None:
    """The run's USD cap: the policy's plus every operator top-up; None when no policy sets one."""
    if policy is None or policy.run_limit_pusd is None:
        return None
    return policy.run_limit_pusd + run.budget_add_pusd


@dataclass(frozen=True, slots=True)
class AgentHour:
    """The agent's last hour: settled spend, what its calls in flight hold, and the oldest minute counted."""

    spend_pusd: int = 0
    reserved_pusd: int = 0
    oldest_minute: str | None = None


@dataclass(frozen=True, slots=True)
class RateWindow:
    """What a scope (`agent`, `run`) used in the last 60 seconds: requests, reserved tokens, oldest second."""

    requests: int = 0
    tokens: int = 0
    oldest: int | None = None
    tokens_by_second: str | None = None  # "second:tokens,…" (any order), for the wait of a tokens limit


def _tokens_leave_at(window: RateWindow, need: int) -> int | None:
    """The second at which at least `need` of the window's tokens have left it (each second's leave 60 s after
    it), or None when the window does not say per second."""
    if not window.tokens_by_second:
        return None
    left = 0
    for second, tokens in sorted(tuple(map(int, pair.split(":"))) for pair in window.tokens_by_second.split(",")):
        left += tokens
        if left >= need:
            return second + RATE_WINDOW_S
    return None


RATE_WINDOW_S = 60


def evaluate(policy: CompiledPolicy, run: RunState, ask: CallAsk, windows: dict[str, RateWindow] | None = None,
             now_s: int = 0, hour: AgentHour | None = None) -> list[Verdict]:
    """Every rule of `policy` that `ask` breaks, in the order they are checked (models, tools, runaway, rate
    limits, budget). `windows` holds the agent's and the run's last minute, `now_s` the time in seconds."""
    out: list[Verdict] = []
    if ask.kind == "llm":
        out.extend(_models(policy, ask))
    out.extend(_tools(policy, ask))
    out.extend(_runaway(policy, run, ask))
    if ask.kind == "llm":
        out.extend(_rates(policy, ask, windows or {}, now_s))
        out.extend(_budget(policy, run, ask))
        out.extend(_hourly(policy, ask, hour or AgentHour()))
    return out


def _hourly(policy: CompiledPolicy, ask: CallAsk, hour: AgentHour) -> list[Verdict]:
    limit = policy.agent_hourly_pusd
    if limit is None or hour.spend_pusd + hour.reserved_pusd + ask.reserved_pusd <= limit and ask.priced \
            and ask.output_bounded:
        return []
    return [Verdict("budget.agent_hourly_usd", "hourly_cost_exceeded", 402,
                    "The agent's hourly cost limit is reached." if hour.spend_pusd + hour.reserved_pusd >= limit
                    else "This call's worst-case cost does not fit the agent's remaining hourly budget.",
                    policy.budget_mode == "shadow",
                    {"hourly_spend_usd": format_usd(hour.spend_pusd), "reserved_usd": format_usd(hour.reserved_pusd),
                     "limit_usd": format_usd(limit), "requested_usd": format_usd(ask.reserved_pusd),
                     "window_s": 3600, "oldest_minute": hour.oldest_minute,
                     "next": "Lower max_tokens: this call's worst case alone exceeds the hourly cap, or ask an"
                             " operator to raise it." if ask.reserved_pusd > limit else
                             "Wait until older spend leaves the rolling hour, or ask an operator."})]


def _rates(policy: CompiledPolicy, ask: CallAsk, windows: dict[str, RateWindow], now_s: int) -> list[Verdict]:
    shadow = policy.rates_mode == "shadow"
    for scope, rate in (("agent", policy.agent_rate), ("run", policy.run_rate)):
        if rate is None:
            continue
        window = windows.get(scope, RateWindow())
        # The oldest second in the window leaves it at oldest + 60: room for one more request.
        wait = max(1, (window.oldest + RATE_WINDOW_S - now_s) if window.oldest is not None else RATE_WINDOW_S)
        for key, used, asked, limit in (("requests_per_minute", window.requests, 1, rate.requests_per_minute),
                                        ("tokens_per_minute", window.tokens, ask.reserved_tokens,
                                         rate.tokens_per_minute)):
            if limit is not None and used + asked > limit:
                unit = "requests" if key == "requests_per_minute" else "tokens"
                if asked > limit:  # no window will ever hold it: waiting cannot help, so no retry is invited
                    return [Verdict(f"rate_limits.{scope}.{key}", "rate_limited", 429,
                                    f"This call alone asks {asked} {unit}, more than the {scope}'s limit of {limit}"
                                    f" {unit} per minute.", shadow,
                                    {"scope": scope, "limit": limit, "used": used, "requested": asked,
                                     "window_s": RATE_WINDOW_S, "retry_after_s": None,
                                     "next": "Lower max_tokens (or send less input) so the call fits the limit."})]
                if key == "tokens_per_minute":  # room for this call's tokens: when enough seconds have left
                    at = _tokens_leave_at(window, used + asked - limit)
                    wait = max(1, at - now_s) if at is not None else wait
                return [Verdict(f"rate_limits.{scope}.{key}", "rate_limited", 429,
                                f"The {scope}'s limit of {limit} {unit} per minute is reached.", shadow,
                                {"scope": scope, "limit": limit, "used": used, "requested": asked,
                                 "window_s": RATE_WINDOW_S, "retry_after_s": wait,
                                 "next": f"Retry after {wait} seconds."}, retry_after=wait)]
    return []


def model_refused(policy: CompiledPolicy, provider: str, model: str) -> str | None:
    """The rule of `policy` that refuses `provider/model` (`models.blocked` or `models.allowed`), or None."""
    if policy.models_blocked.matches(provider, model):
        return "models.blocked"
    if policy.models_allowed is not None and not policy.models_allowed.matches(provider, model):
        return "models.allowed"
    return None


def model_allowed(policy: CompiledPolicy | None, provider: str, model: str) -> bool:
    """Whether `policy` lets `provider/model` be called: no policy, or model lists in shadow mode, refuse none."""
    return policy is None or policy.models_mode == "shadow" or model_refused(policy, provider, model) is None


def _models(policy: CompiledPolicy, ask: CallAsk) -> list[Verdict]:
    rule = model_refused(policy, ask.provider, ask.model)
    if rule is None:
        return []
    allowed = policy.models_allowed.patterns if policy.models_allowed is not None else None
    context = {"field": "model", "requested": ask.model, "allowed": allowed,
               "blocked": policy.models_blocked.patterns, "next": "Use one of the allowed models."}
    how = "blocked" if rule == "models.blocked" else "not allowed"
    return [Verdict(rule, "model_not_allowed", 403, f"Model {ask.model} is {how} by policy.",
                    policy.models_mode == "shadow", context)]


def _tools(policy: CompiledPolicy, ask: CallAsk) -> list[Verdict]:
    where, advice = (("request", "Remove the tool from the request.") if ask.kind == "llm" else
                     ("logged step", "Do not run this tool."))
    for tool in ask.tools:
        if policy.tools_blocked.blocked(tool):
            return [Verdict("tools.blocked", "tool_blocked", 403, f"Tool {tool} is blocked by policy.",
                            policy.tools_mode == "shadow", {"tool": tool, "where": where, "next": advice})]
    return []


def _runaway(policy: CompiledPolicy, run: RunState, ask: CallAsk) -> list[Verdict]:
    shadow = policy.runaway_mode == "shadow"
    out: list[Verdict] = []
    if policy.max_steps is not None and run.step_count >= policy.max_steps:
        out.append(Verdict("runaway.max_steps", "runaway_prevention", 403,
                           f"The run reached its limit of {policy.max_steps} steps.", shadow,
                           {"limit": policy.max_steps, "steps": run.step_count,
                            "next": "Complete this run and start a new one, or ask an operator."}))
    if policy.max_repeats is not None and ask.kind == "llm" and run.repeats >= policy.max_repeats:
        out.append(Verdict("runaway.max_repeats", "runaway_prevention", 403,
                           f"The same request was sent {run.repeats} times in this run (limit"
                           f" {policy.max_repeats}).", shadow,
                           {"limit": policy.max_repeats, "repeats": run.repeats,
                            "next": "Change the request; repeating it will not help."}))
    return out


def _budget(policy: CompiledPolicy, run: RunState, ask: CallAsk) -> list[Verdict]:
    shadow = policy.budget_mode == "shadow"
    out: list[Verdict] = []
    limit = budget_limit_pusd(policy, run)
    if limit is not None:
        committed = run.spend_pusd + run.reserved_pusd
        message = None
        if not ask.priced:
            message = f"Model {ask.model} has no price, so the run's USD budget cannot be kept."
        elif not ask.output_bounded:
            message = ("The call sets no output limit and the model's is unknown, so its cost has no bound; set"
                       " max_tokens.")
        elif committed + ask.reserved_pusd > limit:
            message = ("Run budget ceiling reached." if committed >= limit else
                       "This call's worst-case cost does not fit the run's remaining budget.")
        if message is not None:  # the context is built only for a refusal: every admission passes here
            out.append(Verdict("budget.hard_limit_usd", "budget_exceeded", 402, message, shadow, {
                "run_id": run.run_id, "cumulative_spend_usd": format_usd(run.spend_pusd),
                "reserved_usd": format_usd(run.reserved_pusd), "limit_usd": format_usd(limit),
                "requested_usd": format_usd(ask.reserved_pusd), "step_that_tripped": None,
                "next": "Ask an operator to resume the run with more budget, or start a new run.",
                "rule": "stop_on_budget"}))
    if policy.run_limit_tokens is not None:
        used = run.tokens_used + run.reserved_tokens
        if used + ask.reserved_tokens > policy.run_limit_tokens or not ask.output_bounded:
            out.append(Verdict("budget.hard_limit_tokens", "budget_exceeded", 402,
                               "This call's worst-case tokens do not fit the run's token budget.", shadow,
                               {"run_id": run.run_id, "cumulative_tokens": run.tokens_used,
                                "reserved_tokens": run.reserved_tokens, "limit_tokens": policy.run_limit_tokens,
                                "requested_tokens": ask.reserved_tokens,
                                "next": "Ask an operator to resume the run with more budget, or start a new run."}))
    return out


SHRINK_MIN_OUTPUT_TOKENS = 32  # below this, a shrunk answer is too short to be useful: refuse instead


def shrink(policy: CompiledPolicy, run: RunState, ask: CallAsk, hour: AgentHour | None = None) -> CallAsk | None:
    """`on_exceed: shrink`: the same call with the most output that fits what is left of the run's USD and
    token budgets and of the agent's hourly cap (`hour`, when it has one), or None when less than
    `SHRINK_MIN_OUTPUT_TOKENS` would fit (or nothing can shrink)."""
    if not policy.shrink or ask.embedding or not ask.priced or ask.kind != "llm" or not ask.output_bounded:
        return None
    most = ask.reserved_tokens - ask.input_tokens  # the output the call asked for at most (all choices)
    lefts = []
    limit = budget_limit_pusd(policy, run)
    if limit is not None:
        lefts.append(limit - run.spend_pusd - run.reserved_pusd - ask.input_pusd)
    if policy.agent_hourly_pusd is not None and hour is not None:
        lefts.append(policy.agent_hourly_pusd - hour.spend_pusd - hour.reserved_pusd - ask.input_pusd)
    if ask.output_pusd_per_million > 0:
        for left in lefts:
            most = min(most, max(0, left) * 1_000_000 // ask.output_pusd_per_million)
    if policy.run_limit_tokens is not None:
        most = min(most, policy.run_limit_tokens - run.tokens_used - run.reserved_tokens - ask.input_tokens)
    per_choice = most // max(1, ask.choices)
    if per_choice < SHRINK_MIN_OUTPUT_TOKENS:
        return None
    most = per_choice * max(1, ask.choices)
    cost = -(-most * ask.output_pusd_per_million // 1_000_000)  # rounded up, like every reservation
    return replace(ask, reserved_pusd=ask.input_pusd + cost, reserved_tokens=ask.input_tokens + most)
