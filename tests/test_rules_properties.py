"""Property tests for the rule engine: the budget arithmetic never lets a call past a cap, shrinking
always fits, and the tool and model matchers cannot be dodged by spelling."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from rungate.enforce.policy import CompiledPolicy, canonical_tool, parse_document
from rungate.enforce.rules import (
    RATE_WINDOW_S,
    SHRINK_MIN_OUTPUT_TOKENS,
    CallAsk,
    RateWindow,
    RunState,
    budget_limit_pusd,
    evaluate,
    shrink,
)
from rungate.prices import format_usd
from tests.test_gates import other_letter

PICO = st.integers(min_value=0, max_value=10**15)
TOKENS = st.integers(min_value=0, max_value=10**7)


def _policy(limit_pusd: int, tokens: int | None = None, on_exceed: str = "refuse") -> CompiledPolicy:
    budget: dict[str, object] = {"hard_limit_usd": format_usd(limit_pusd), "on_exceed": on_exceed}
    if tokens is not None:
        budget["hard_limit_tokens"] = tokens
    return CompiledPolicy("pol_x", 1, parse_document({"name": "p", "budget": budget}))


@settings(max_examples=300, deadline=None)
@given(limit=PICO, spend=PICO, reserved=PICO, asked=PICO, added=PICO)
def test_a_call_is_admitted_only_if_its_worst_case_fits_the_cap(limit: int, spend: int, reserved: int, asked: int,
                                                                 added: int) -> None:
    policy = _policy(limit)
    run = RunState("r", spend_pusd=spend, reserved_pusd=reserved, budget_add_pusd=added)
    verdicts = evaluate(policy, run, CallAsk("openai", "m", asked, 0, True))
    cap = budget_limit_pusd(policy, run)
    assert cap == policy.run_limit_pusd + added  # type: ignore[operator]
    assert (not verdicts) == (spend + reserved + asked <= cap)
    for verdict in verdicts:  # money in the refusal is exact decimal text
        assert verdict.context["limit_usd"] == format_usd(cap)


@settings(max_examples=300, deadline=None)
@given(limit=PICO, spend=PICO, reserved=PICO, input_tokens=TOKENS, out=st.integers(1, 10**6),
       input_pusd=PICO, per_million=st.integers(1, 10**15), choices=st.integers(1, 8),
       token_cap=st.none() | TOKENS, used=TOKENS)
def test_shrinking_always_fits_and_never_asks_for_a_useless_answer(
        limit: int, spend: int, reserved: int, input_tokens: int, out: int, input_pusd: int, per_million: int,
        choices: int, token_cap: int | None, used: int) -> None:
    policy = _policy(limit, token_cap, "shrink")
    run = RunState("r", spend_pusd=spend, reserved_pusd=reserved, tokens_used=used)
    cost = input_pusd + -(-out * choices * per_million // 1_000_000)
    ask = CallAsk("openai", "m", cost, input_tokens + out * choices, True, input_tokens=input_tokens,
                  input_pusd=input_pusd, output_pusd_per_million=per_million, choices=choices)
    shrunk = shrink(policy, run, ask)
    if shrunk is None:
        return
    per_choice = (shrunk.reserved_tokens - input_tokens) // choices
    assert SHRINK_MIN_OUTPUT_TOKENS <= per_choice <= out
    assert shrunk.reserved_tokens - input_tokens == per_choice * choices
    assert spend + reserved + shrunk.reserved_pusd <= limit  # the shrunk worst case fits the cap
    if token_cap is not None:
        assert used + shrunk.reserved_tokens <= token_cap
    assert not [v for v in evaluate(policy, run, shrunk) if v.code == "budget_exceeded"]


SEPARATORS = st.sampled_from(["-", "_", ".", " ", "--", "_."])
WORDS = st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6), min_size=1,
                 max_size=4)


@settings(max_examples=300, deadline=None)
@given(words=WORDS, separators=st.lists(SEPARATORS, min_size=4, max_size=4), upper=st.lists(st.booleans(), max_size=30),
       prefix=st.sampled_from(["", "mcp__srv__", "mcp_srv_", "srv__", "mcp.srv.", "server/", "a/b/", "box:"]),
       pad=st.sampled_from(["", " ", "  "]), invisible=st.sampled_from(["", "\u200b", "\u2060", "\ufeff"]),
       wide=st.booleans())
@example(words=["x", "x"], separators=["-"] * 4, upper=[], prefix="", pad="", invisible="", wide=False)
@example(words=["x"], separators=["-"] * 4, upper=[], prefix="", pad=" ", invisible="", wide=False)
def test_a_blocked_tool_cannot_slip_past_by_spelling(words: list[str], separators: list[str], upper: list[bool],
                                                     prefix: str, pad: str, invisible: str, wide: bool) -> None:
    canonical = "_".join(words)
    variant = "".join(w + (separators[i] if i < len(words) - 1 else "") for i, w in enumerate(words))
    variant = "".join(c.upper() if i < len(upper) and upper[i] else c for i, c in enumerate(variant))
    variant = variant[:1] + invisible + variant[1:]  # a zero-width character inside the first word
    if wide:  # fullwidth forms (ａ for a, ０ for 0), which NFKC folds back
        variant = "".join(chr(ord(c) + 0xFEE0) if c.isascii() and c.isalnum() else c for c in variant)
    assert canonical_tool(pad + variant + pad) == canonical_tool(canonical)
    spelled = pad + prefix + variant + pad
    policy = CompiledPolicy("pol_t", 1, parse_document({"name": "t", "tools": {"blocked": [canonical]}}))
    assert policy.tools_blocked.blocked(spelled)
    assert not policy.tools_blocked.blocked(spelled + other_letter(canonical))  # a different tool is not caught


@settings(max_examples=200, deadline=None)
@given(model=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=20),
       year=st.integers(2020, 2029), month=st.integers(1, 12), day=st.integers(1, 28), dashed=st.booleans())
def test_a_blocked_model_is_blocked_under_any_dated_snapshot_and_provider_prefix(
        model: str, year: int, month: int, day: int, dashed: bool) -> None:
    policy = CompiledPolicy("pol_m", 1, parse_document({"name": "m", "models": {"blocked": [model]}}))
    date = f"{year}-{month:02d}-{day:02d}" if dashed else f"{year}{month:02d}{day:02d}"
    assert policy.models_blocked.matches("openai", model)
    assert policy.models_blocked.matches("openai", f"{model}-{date}")
    assert policy.models_blocked.matches("openai", model.upper())
    scoped = parse_document({"name": "p", "models": {"allowed": [f"openai/{model}"]}})
    provider_scoped = CompiledPolicy("pol_p", 1, scoped)
    assert provider_scoped.models_allowed is not None
    assert provider_scoped.models_allowed.matches("openai", model)
    assert not provider_scoped.models_allowed.matches("anthropic", model)


@settings(max_examples=300, deadline=None)
@given(buckets=st.dictionaries(st.integers(941, 1000), st.integers(1, 500), min_size=1, max_size=30),
       limit=st.integers(1, 3000), asked=st.integers(1, 3000))
def test_a_tokens_per_minute_refusal_names_the_second_the_call_fits(buckets: dict[int, int], limit: int,
                                                                    asked: int) -> None:
    """Retry-After of a tokens limit: at now + wait the call fits the window, and one second earlier it does not."""
    now = 1000
    document = {"name": "r", "rate_limits": {"run": {"tokens_per_minute": limit}}}
    policy = CompiledPolicy("pol_r", 1, parse_document(document))

    def window_at(t: int) -> RateWindow:
        kept = {s: n for s, n in buckets.items() if s > t - RATE_WINDOW_S}
        return RateWindow(0, sum(kept.values()), min(kept, default=None),
                          ",".join(f"{s}:{n}" for s, n in kept.items()) or None)

    ask = CallAsk("openai", "gpt-4o", 0, asked, True, ())
    [verdict] = evaluate(policy, RunState("r"), ask, {"run": window_at(now)}, now) or [None]
    used = sum(buckets.values())
    if used + asked <= limit:
        assert verdict is None
        return
    assert verdict is not None and verdict.code == "rate_limited"
    if asked > limit:  # never fits: no wait is promised
        assert verdict.retry_after is None
        return
    wait = verdict.retry_after
    assert wait is not None and wait >= 1
    assert window_at(now + wait).tokens + asked <= limit
    if wait > 1:
        assert window_at(now + wait - 1).tokens + asked > limit
