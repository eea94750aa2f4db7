"""The shipped price table matches reference §5.2, costs follow §5.3 exactly, and money never rounds down."""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction
from importlib import resources
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rungate.errors import ConfigError
from rungate.prices import DEFAULT_IMAGE_INPUT_TOKENS, ModelPrice, PriceTable, format_usd, to_pico
from rungate.usage import Usage

D = Decimal


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return PriceTable.load()


# (model, input, cache_read, cache_write 5m, cache_write 1h, output, max_output_tokens) from reference §5.2.
REFERENCE_52: list[tuple[str, str, str | None, str | None, str | None, str, int | None]] = [
    ("gpt-4o", "2.50", "1.25", None, None, "10.00", 16384),
    ("gpt-4o-mini", "0.15", "0.075", None, None, "0.60", 16384),
    ("gpt-4.1", "2.00", "0.50", None, None, "8.00", 32768),
    ("gpt-4.1-mini", "0.40", "0.10", None, None, "1.60", 32768),
    ("o3", "2.00", "0.50", None, None, "8.00", 100000),
    ("o4-mini", "1.10", "0.275", None, None, "4.40", 100000),
    ("gpt-5", "1.25", "0.125", None, None, "10.00", 128000),
    ("claude-sonnet-4-20250514", "3.00", "0.30", "3.75", "6.00", "15.00", 64000),
    ("claude-opus-4-20250514", "15.00", "1.50", "18.75", "30.00", "75.00", 32000),
    ("claude-opus-4-1-20250805", "15.00", "1.50", "18.75", "30.00", "75.00", 32000),
    ("claude-sonnet-4-5", "3.00", "0.30", "3.75", "6.00", "15.00", 64000),
    ("claude-sonnet-4-5-20250929", "3.00", "0.30", "3.75", "6.00", "15.00", 64000),
    ("claude-sonnet-4-6", "3.00", "0.30", "3.75", "6.00", "15.00", 128000),
    ("claude-opus-4-5", "5.00", "0.50", "6.25", "10.00", "25.00", 64000),
    ("claude-opus-4-6", "5.00", "0.50", "6.25", "10.00", "25.00", 128000),
    ("claude-opus-4-7", "5.00", "0.50", "6.25", "10.00", "25.00", 128000),
    ("claude-haiku-4-5", "1.00", "0.10", "1.25", "2.00", "5.00", 64000),
    ("claude-haiku-4-5-20251001", "1.00", "0.10", "1.25", "2.00", "5.00", 64000),
    ("claude-3-5-haiku-20241022", "0.80", "0.08", "1.00", "1.60", "4.00", 8192),
    ("claude-3-haiku-20240307", "0.25", "0.03", "0.30", "0.50", "1.25", 4096),
    ("text-embedding-3-small", "0.02", None, None, None, "0", None),
    ("text-embedding-3-large", "0.13", None, None, None, "0", None),
]


def _dec(value: str | None) -> Decimal | None:
    return None if value is None else D(value)


@pytest.mark.parametrize(("model", "inp", "read", "write", "write_1h", "out", "max_out"), REFERENCE_52)
def test_every_reference_model_has_the_reference_prices(
    table: PriceTable, model: str, inp: str, read: str | None, write: str | None, write_1h: str | None,
    out: str, max_out: int | None,
) -> None:
    price = table.lookup(model)
    assert price is not None
    assert price.model == model
    assert (price.input, price.cache_read, price.cache_write, price.cache_write_1h, price.output) == (
        D(inp), _dec(read), _dec(write), _dec(write_1h), D(out))
    assert price.reasoning is None  # both vendors bill reasoning as output
    assert price.max_output_tokens == max_out
    assert price.provider == ("anthropic" if model.startswith("claude") else "openai")
    assert price.kind == ("embedding" if model.startswith("text-embedding") else "chat")


@pytest.mark.parametrize(
    ("model", "provider", "inp", "read", "write", "write_1h", "out", "kind"),
    [
        ("mock-gpt", "openai", "1.00", "0.50", None, None, "2.00", "chat"),
        ("mock-claude", "anthropic", "1.00", "0.10", "1.25", "2.00", "2.00", "chat"),
        ("mock-embedding", "openai", "0.02", None, None, None, "0", "embedding"),
    ],
)
def test_the_mock_models_are_priced(
    table: PriceTable, model: str, provider: str, inp: str, read: str | None, write: str | None,
    write_1h: str | None, out: str, kind: str,
) -> None:
    price = table.lookup(model)
    assert price is not None
    assert (price.provider, price.input, price.cache_read, price.cache_write, price.cache_write_1h,
            price.output, price.kind) == (
        provider, D(inp), _dec(read), _dec(write), _dec(write_1h), D(out), kind)
    if kind == "chat":
        assert price.max_output_tokens == 4096


def test_the_shipped_file_is_the_newest_and_dated(table: PriceTable) -> None:
    folder = resources.files("rungate").joinpath("data")
    files = sorted(p.name for p in folder.iterdir() if re.match(r"^prices-\d{4}-\d{2}-\d{2}\.json$", p.name))
    assert files[-1] == "prices-2026-12-08.json"
    assert table.as_of == "2026-12-08"
    assert len(table) == len(table.models) >= len(REFERENCE_52) + 3
    for price in table:
        assert price.provider in {"openai", "anthropic"}
        assert price.kind in {"chat", "embedding"}


# Anthropic's published cache prices for Claude 3 Haiku are rounded to the cent, so they are not exact
# multiples of the input price; every other Anthropic model follows the rules of thumb exactly.
ROUNDED_BY_ANTHROPIC = {"claude-3-haiku-20240307"}


def test_anthropic_cache_prices_follow_the_rules_of_thumb(table: PriceTable) -> None:
    anthropic = [p for p in table if p.provider == "anthropic"]
    assert len(anthropic) >= 15
    for price in anthropic:
        assert price.cache_read is not None and price.cache_write is not None
        assert price.cache_write_1h is not None
        assert price.cache_write_1h == 2 * price.input, price.model  # LiteLLM 1.80.0 had 6.00 for Haiku 3.x
        if price.model in ROUNDED_BY_ANTHROPIC:
            assert abs(price.cache_write - D("1.25") * price.input) <= D("0.0125"), price.model
            assert abs(price.cache_read - D("0.1") * price.input) <= D("0.005"), price.model
        else:
            assert price.cache_write == D("1.25") * price.input, price.model
            assert price.cache_read == D("0.1") * price.input, price.model


def test_openai_cache_reads_are_cheaper_than_input(table: PriceTable) -> None:
    for price in table:
        if price.provider == "openai" and price.cache_read is not None:
            assert price.cache_read < price.input, price.model


@pytest.mark.parametrize(
    ("name", "resolved"),
    [
        ("gpt-4o", "gpt-4o"),
        ("GPT-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-11-20", "gpt-4o"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # the first snapshot has its own (higher) prices
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("o3-2025-04-16", "o3"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("openai/gpt-4o", "gpt-4o"),
        ("OpenAI/gpt-4o-2024-08-06", "gpt-4o"),
        ("anthropic/claude-haiku-4-5", "claude-haiku-4-5"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5-20251001"),
        ("anthropic/claude-haiku-4-5-20251001", "claude-haiku-4-5-20251001"),
        ("claude-haiku-4-5-20991231", "claude-haiku-4-5"),
        ("claude-opus-4-5-20251101", "claude-opus-4-5"),
        ("Claude-Sonnet-4-5", "claude-sonnet-4-5"),
        ("claude-sonnet-4-0", "claude-sonnet-4-0"),
        ("mock-gpt", "mock-gpt"),
    ],
)
def test_lookup_resolves_prefixes_snapshots_and_case(table: PriceTable, name: str, resolved: str) -> None:
    price = table.lookup(name)
    assert price is not None
    assert price.model == resolved


@pytest.mark.parametrize(
    "name",
    [
        "",
        "gpt-9",
        "claude-sonnet-4",  # only the dated snapshot and the -0 alias are priced
        "azure/gpt-4o",  # another provider's deployment may be priced differently
        "anthropic/gpt-4o",
        "openai/claude-haiku-4-5",
        "/gpt-4o",
        "gpt-4o/",
        "gpt-4o-20241399",  # not a date
        "gpt-4o-preview",
        "openai/openai/gpt-4o",
    ],
)
def test_an_unknown_model_has_no_price_not_a_zero_price(table: PriceTable, name: str) -> None:
    assert table.lookup(name) is None
    assert table.cost(name, Usage(input=1000, output=1000)) is None
    assert table.max_cost(name, 1000, 1000) is None


def test_openai_cost_with_a_cached_subset(table: PriceTable) -> None:
    # prompt_tokens=1000 of which cached_tokens=400, completion_tokens=250 (reasoning inside) on gpt-4o:
    # 600 × 2.50 + 400 × 1.25 + 250 × 10.00 = 1500 + 500 + 2500 = 4500 per 1M tokens = $0.0045
    usage = Usage(input=600, cached=400, output=250, reasoning=100)
    cost = table.cost("gpt-4o", usage)
    assert cost == D("0.0045")
    assert to_pico(D("0.0045")) == 4_500_000_000
    assert format_usd(to_pico(D("0.0045"))) == "0.0045"


def test_anthropic_cost_with_cache_read_and_both_cache_writes(table: PriceTable) -> None:
    # claude-sonnet-4-5: 100 × 3.00 + 20 000 × 0.30 + 3 000 × 3.75 + 1 000 × 6.00 + 500 × 15.00
    #                  = 300 + 6 000 + 11 250 + 6 000 + 7 500 = 31 050 per 1M tokens = $0.03105
    usage = Usage(input=100, cached=20_000, cache_write=3_000, cache_write_1h=1_000, output=500)
    assert table.cost("claude-sonnet-4-5", usage) == D("0.03105")
    assert table.cost("anthropic/claude-sonnet-4-5-20250929", usage) == D("0.03105")


def test_costs_are_exact_not_rounded(table: PriceTable) -> None:
    # gpt-4o-mini, one token of each kind: 0.15 + 0.075 + 0.60 = 0.825 per 1M = $0.000000825 exactly
    cost = table.cost("gpt-4o-mini", Usage(input=1, cached=1, output=1))
    assert cost == D("0.000000825")
    assert cost is not None and to_pico(cost) == 825_000
    # a prompt of 1 token on text-embedding-3-small: 0.02 / 1M = 2e-8 USD = 20 000 pico-USD
    assert table.cost("text-embedding-3-small", Usage(input=1)) == D("2E-8")


def test_a_zero_usage_costs_zero(table: PriceTable) -> None:
    assert table.cost("gpt-4o", Usage()) == 0


def test_missing_cache_prices_fall_back_to_the_next_rate() -> None:
    price = ModelPrice(model="m", provider=None, input=D("2"), output=D("8"), cache_write=D("3"))
    # cached at input (2), 5m write at cache_write (3), 1h write at cache_write (3): 2 + 3 + 3 = 8
    assert price.cost(Usage(cached=1_000_000, cache_write=1_000_000, cache_write_1h=1_000_000)) == 8
    bare = ModelPrice(model="m", provider=None, input=D("2"), output=D("8"))
    assert bare.cost(Usage(cached=1_000_000, cache_write=1_000_000, cache_write_1h=1_000_000)) == 6


def test_reasoning_tokens_are_billed_at_a_reasoning_price_when_set() -> None:
    table = PriceTable.load({"o3": {"reasoning": D("12.00")}})
    # 1000 × 2.00 + (3000 − 2000) × 8.00 + 2000 × 12.00 = 2000 + 8000 + 24000 = 34 000 per 1M = $0.034
    assert table.cost("o3", Usage(input=1000, output=3000, reasoning=2000)) == D("0.034")
    # without a reasoning price the same usage is all output: 2000 + 24 000 = $0.026
    assert PriceTable.load().cost("o3", Usage(input=1000, output=3000, reasoning=2000)) == D("0.026")


def test_web_searches_cost_their_fee_per_thousand(table: PriceTable) -> None:
    # claude-sonnet-4-5: 1000 input at 3.00 per 1M = $0.003, plus 3 searches at $10 per 1,000 = $0.03
    usage = Usage(input=1000, web_searches=3)
    assert table.cost("claude-sonnet-4-5", usage) == D("0.033")
    assert table.cost_pico("claude-sonnet-4-5", usage) == to_pico(D("0.033"))
    # OpenAI's built-in web search costs the same $10 per 1,000 calls on the models that offer it
    for model in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "o3", "o4-mini", "gpt-5"):
        assert table.cost(model, Usage(web_searches=3)) == D("0.03")
    # a model with no search fee bills none; a fee finer than a pico per search takes the Decimal path
    assert table.cost("gpt-4o-2024-05-13", Usage(web_searches=3)) == 0
    assert table.cost("text-embedding-3-small", Usage(web_searches=3)) == 0
    fine = ModelPrice(model="f", provider=None, input=D("1"), output=D("1"), web_search_per_1k=D("0.0000000001"))
    assert fine.cost_pico(Usage(web_searches=3)) == to_pico(fine.cost(Usage(web_searches=3))) == 1
    # overridable like any price
    cheaper = PriceTable.load({"claude-sonnet-4-5": {"web_search_per_1k": "5"}})
    assert cheaper.cost("claude-sonnet-4-5", Usage(web_searches=2)) == D("0.01")


def test_the_worst_case_counts_the_fees_of_the_searches_a_call_allows(table: PriceTable) -> None:
    # claude-sonnet-4-5: 1000 input at 3.00 + 100 output at 15.00 per 1M = $0.0045, plus 5 searches at $0.01
    assert table.max_cost("claude-sonnet-4-5", 1000, 100, web_searches=5) == D("0.0545")
    assert table.max_cost_pico("claude-sonnet-4-5", 1000, 100, web_searches=5) == to_pico(D("0.0545"))
    bill = table.cost("claude-sonnet-4-5", Usage(input=1000, output=100, web_searches=5))
    assert bill == table.max_cost("claude-sonnet-4-5", 1000, 100, web_searches=5)
    with pytest.raises(ValueError, match="web_searches"):
        table.max_cost_pico("claude-sonnet-4-5", 1000, 100, web_searches=-1)


def test_an_image_costs_at_most_the_models_own_limit(table: PriceTable) -> None:
    # tile-priced models: base + 8 tiles (the 2048 x 768 worst case); patch-priced: 1536 patches x multiplier
    expected = {"gpt-4o": 85 + 8 * 170, "gpt-4o-mini": 2833 + 8 * 5667, "o3": 75 + 8 * 150,
                "gpt-4.1-mini": 2489, "o4-mini": 2642, "gpt-4.1": 1536, "gpt-5": 1536}
    for model, tokens in expected.items():
        price = table.lookup(model)
        assert price is not None and price.image_tokens == price.image_input_tokens == tokens
    # a model whose entry does not say (every Claude model: about 1.15 megapixels / 750) takes the default
    claude = table.lookup("claude-sonnet-4-5")
    assert claude is not None and claude.image_input_tokens is None
    assert claude.image_tokens == DEFAULT_IMAGE_INPUT_TOKENS == 1600
    with pytest.raises(ValueError, match="image_input_tokens"):
        ModelPrice(model="m", provider=None, input=D("1"), output=D("1"), image_input_tokens=-1)


def test_a_negative_token_count_is_a_bug() -> None:
    with pytest.raises(ValueError, match="usage.output"):
        PriceTable.load().cost("gpt-4o", Usage(output=-1))
    with pytest.raises(ValueError, match="input_tokens"):
        PriceTable.load().max_cost("gpt-4o", -1, None)


def test_max_cost_uses_max_tokens_else_the_model_limit(table: PriceTable) -> None:
    # claude-haiku-4-5: 1000 × 1.00 + 64 000 × 5.00 = 321 000 per 1M = $0.321
    assert table.max_cost("claude-haiku-4-5", 1000, None) == D("0.321")
    # with max_tokens=100: 1000 + 100 × 5.00 = 1500 per 1M = $0.0015
    assert table.max_cost("claude-haiku-4-5", 1000, 100) == D("0.0015")
    # no output limit known and none given: input only
    assert table.max_cost("text-embedding-3-small", 1_000_000, None) == D("0.02")
    # worst case bounds the real cost whenever output stays within the limit
    real = table.cost("claude-haiku-4-5", Usage(input=1000, output=100))
    worst = table.max_cost("claude-haiku-4-5", 1000, 100)
    assert real is not None and worst is not None and real <= worst


def test_max_cost_takes_the_higher_of_output_and_reasoning_rates() -> None:
    table = PriceTable.load({"o3": {"reasoning": D("12.00")}})
    # 0 × 2.00 + 100 000 × 12.00 = 1 200 000 per 1M = $1.2
    assert table.max_cost("o3", 0, None) == D("1.2")


def test_an_override_changes_only_the_given_prices() -> None:
    table = PriceTable.load({
        "gpt-4o": {"input": D("3.00")},
        "anthropic/claude-haiku-4-5": {"output": D("6")},
    })
    gpt = table.lookup("gpt-4o")
    assert gpt is not None
    assert (gpt.input, gpt.cache_read, gpt.output, gpt.max_output_tokens) == (
        D("3.00"), D("1.25"), D("10.00"), 16384)
    haiku = table.lookup("claude-haiku-4-5")
    assert haiku is not None and (haiku.input, haiku.output) == (D("1.00"), D(6))
    # the snapshot is its own entry and keeps the shipped price
    snapshot = table.lookup("claude-haiku-4-5-20251001")
    assert snapshot is not None and snapshot.output == D("5.00")
    # loading again starts from the shipped prices
    shipped = PriceTable.load().lookup("gpt-4o")
    assert shipped is not None and shipped.input == D("2.50")


def test_an_override_may_add_a_model() -> None:
    table = PriceTable.load({
        "my-finetune": {"input": D("0.5"), "output": D("1.5")},
        "openai/ft:gpt-4o:acme": {"input": D("3.75"), "output": D("15"), "cache_read": D("1.875")},
    })
    mine = table.lookup("My-Finetune")
    assert mine is not None
    assert (mine.provider, mine.input, mine.output, mine.cache_read, mine.max_output_tokens, mine.kind) == (
        None, D("0.5"), D("1.5"), None, None, "chat")
    assert table.lookup("anthropic/my-finetune") is mine  # no provider recorded, so any prefix resolves
    ft = table.lookup("ft:gpt-4o:acme")
    assert ft is not None and ft.provider == "openai" and ft.cache_read == D("1.875")
    assert table.lookup("anthropic/ft:gpt-4o:acme") is None
    # a cached read on a model without cache prices is billed as input: (1 + 1) × 0.5 = $0.000001
    assert table.cost("my-finetune", Usage(input=1, cached=1)) == D("0.000001")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"brand-new": {"input": D("1")}}, "brand-new"),  # a new model needs input and output
        ({"brand-new": {"output": D("1")}}, "brand-new"),
        ({"gpt-4o": {"input": D("NaN")}}, "gpt-4o"),
        ({"gpt-4o": {"input": D("sNaN")}}, "gpt-4o"),
        ({"gpt-4o": {"output": D("Infinity")}}, "gpt-4o"),
        ({"gpt-4o": {"output": D("-0.01")}}, "gpt-4o"),
        ({"gpt-4o": {"output": 0.5}}, "gpt-4o"),  # floats are refused
        ({"gpt-4o": {"output": True}}, "gpt-4o"),
        ({"gpt-4o": {"output": "ten"}}, "gpt-4o"),
        ({"gpt-4o": {"inptu": D("1")}}, "inptu"),
        ({"gpt-4o": {"max_output_tokens": D("1")}}, "max_output_tokens"),  # a limit is an integer
        ({"gpt-4o": {"max_output_tokens": True}}, "max_output_tokens"),
        ({"gpt-4o": {"image_input_tokens": 0}}, "image_input_tokens"),
        ({"gpt-4o": {}}, "gpt-4o"),
        ({"anthropic/gpt-4o": {"input": D("1")}}, "anthropic/gpt-4o"),  # gpt-4o is an openai model
    ],
)
def test_a_bad_override_raises_config_error_naming_it(overrides: Any, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PriceTable.load(overrides)
    assert needle in str(caught.value)


def test_overrides_set_the_token_limits_of_known_and_new_models() -> None:
    table = PriceTable.load({"gpt-4o": {"max_output_tokens": 8192, "image_input_tokens": 2000},
                             "openai/gpt-9": {"input": D("1"), "output": D("4"), "max_output_tokens": 65536}})
    known, new = table.lookup("gpt-4o"), table.lookup("gpt-9")
    assert known is not None and (known.input, known.max_output_tokens, known.image_tokens) == (D("2.50"), 8192, 2000)
    assert new is not None and (new.max_output_tokens, new.image_tokens) == (65536, DEFAULT_IMAGE_INPUT_TOKENS)
    # the output limit is what a call without max_tokens reserves
    assert table.max_cost("gpt-9", 0, None) == D(4) * 65536 / 1_000_000


def test_overrides_accept_decimal_strings_and_ints() -> None:
    table = PriceTable.load({"gpt-4o": {"input": "3.10", "output": 12}})  # type: ignore[dict-item]
    price = table.lookup("gpt-4o")
    assert price is not None and (price.input, price.output) == (D("3.10"), D(12))


def _doc(**entry: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"provider": "openai", "input": "1.00", "output": "2.00"}
    base.update(entry)
    return {"as_of": "2026-11-24", "source": "test", "models": {"m": base}}


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        (_doc(input="NaN"), "models.m.input"),
        (_doc(input="Infinity"), "models.m.input"),
        (_doc(output="-Infinity"), "models.m.output"),
        (_doc(cache_read="-0.5"), "models.m.cache_read"),
        (_doc(cache_write="lots"), "models.m.cache_write"),
        (_doc(input=2.5), "models.m.input"),  # a JSON number would be a float: prices are strings
        (_doc(input=None), "models.m.input"),
        (_doc(max_output_tokens=0), "max_output_tokens"),
        (_doc(max_output_tokens="4096"), "max_output_tokens"),
        (_doc(max_output_tokens=True), "max_output_tokens"),
        (_doc(image_input_tokens=0), "image_input_tokens"),
        (_doc(image_input_tokens=1.5), "image_input_tokens"),
        (_doc(image_input_tokens=False), "image_input_tokens"),
        (_doc(cache_wirte="1"), "cache_wirte"),
        (_doc(provider=""), "provider"),
        ({"as_of": "Nov 2026", "models": {"m": {"input": "1", "output": "1"}}}, "as_of"),
        ({"as_of": "2026-11-24", "models": {}}, "models"),
        ({"as_of": "2026-11-24", "models": {"m": {"input": "1", "output": "1"},
                                            "M": {"input": "1", "output": "1"}}}, "'M'"),
        ([], "object"),
    ],
)
def test_a_bad_data_file_raises_config_error(doc: Any, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PriceTable.from_data(doc)
    assert needle in str(caught.value)


def test_a_negative_zero_price_reads_as_zero() -> None:
    price = PriceTable.from_data(_doc(output="-0")).lookup("m")
    assert price is not None and price.output == 0 and not price.output.is_signed()


def test_model_price_refuses_bad_values_when_built_directly() -> None:
    with pytest.raises(ValueError, match="input"):
        ModelPrice(model="m", provider=None, input=D("NaN"), output=D(1))
    with pytest.raises(ValueError, match="max_output_tokens"):
        ModelPrice(model="m", provider=None, input=D(1), output=D(1), max_output_tokens=-1)


@pytest.mark.parametrize(
    ("pico", "text"),
    [
        (0, "0"),
        (1, "0.000000000001"),
        (1_500_000, "0.0000015"),
        (1_030_000_000_000, "1.03"),
        (1_000_000_000_000, "1"),
        (12_345_000_000_000_000, "12345"),
        (-500_000_000_000, "-0.5"),
    ],
)
def test_format_usd(pico: int, text: str) -> None:
    assert format_usd(pico) == text
    assert to_pico(D(text)) == pico


@pytest.mark.parametrize(
    ("amount", "pico"),
    [
        ("0", 0),
        ("0E-30", 0),
        ("0.0045", 4_500_000_000),
        ("1E-12", 1),
        ("1E-13", 1),  # a sub-pico remainder rounds up
        ("1.0000000000001", 1_000_000_000_001),
        ("1E-999999", 1),
        ("-1E-13", 0),  # ceiling: towards +infinity
        ("-1.0000000000001", -1_000_000_000_000),
        ("2.5E+3", 2_500_000_000_000_000),
    ],
)
def test_to_pico_rounds_up(amount: str, pico: int) -> None:
    assert to_pico(D(amount)) == pico


@pytest.mark.parametrize("amount", ["NaN", "sNaN", "Infinity", "-Infinity", "1E+30", "1E+999999"])
def test_to_pico_refuses_non_finite_and_absurd_amounts(amount: str) -> None:
    with pytest.raises(ValueError):
        to_pico(D(amount))


def test_format_usd_refuses_non_ints() -> None:
    with pytest.raises(TypeError):
        format_usd(True)
    with pytest.raises(TypeError):
        format_usd(1.5)  # type: ignore[arg-type]


@given(st.integers(min_value=0))
def test_format_usd_round_trips_through_to_pico(pico: int) -> None:
    text = format_usd(pico)
    assert to_pico(D(text)) == pico
    assert "e" not in text.lower()
    assert "." not in text or not text.endswith(("0", "."))


@given(st.integers())
def test_format_usd_round_trips_negative_amounts_too(pico: int) -> None:
    assert to_pico(D(format_usd(pico))) == pico


@given(st.decimals(min_value=D("-1E+20"), max_value=D("1E+20"), allow_nan=False, allow_infinity=False))
def test_to_pico_is_the_ceiling_in_pico_usd(amount: Decimal) -> None:
    pico = to_pico(amount)
    exact = Fraction(amount) * 10**12
    assert pico - 1 < exact <= pico


USAGES = st.builds(
    Usage,
    input=st.integers(0, 10**9), output=st.integers(0, 10**9), cached=st.integers(0, 10**9),
    cache_write=st.integers(0, 10**9), cache_write_1h=st.integers(0, 10**9), reasoning=st.integers(0, 10**9),
)


SHIPPED = PriceTable.load()


@given(USAGES, st.sampled_from([m for m, *_ in REFERENCE_52] + ["mock-gpt", "mock-claude"]))
def test_cost_equals_the_formula_computed_with_fractions(usage: Usage, model: str) -> None:
    table = SHIPPED
    price = table.lookup(model)
    assert price is not None
    read = price.cache_read if price.cache_read is not None else price.input
    write = price.cache_write if price.cache_write is not None else price.input
    write_1h = price.cache_write_1h if price.cache_write_1h is not None else write
    expected = (usage.input * Fraction(price.input) + usage.cached * Fraction(read)
                + usage.cache_write * Fraction(write) + usage.cache_write_1h * Fraction(write_1h)
                + usage.output * Fraction(price.output)) / 1_000_000
    cost = table.cost(model, usage)
    assert cost is not None and Fraction(cost) == expected


TOKENS = st.integers(min_value=0, max_value=10**9)


@given(st.sampled_from(sorted(PriceTable.load().models)), TOKENS, TOKENS, TOKENS, TOKENS, TOKENS, TOKENS,
       st.one_of(st.none(), TOKENS))
def test_integer_costs_equal_the_decimal_costs_rounded_up(model: str, inp: int, out: int, cached: int, write: int,
                                                          write_1h: int, reasoning: int,
                                                          max_out: int | None) -> None:
    table = PriceTable.load()
    usage = Usage(input=inp, output=out, cached=cached, cache_write=write, cache_write_1h=write_1h,
                  reasoning=reasoning)
    exact = table.cost(model, usage)
    worst = table.max_cost(model, inp, max_out)
    assert exact is not None and worst is not None
    assert table.cost_pico(model, usage) == to_pico(exact)
    assert table.max_cost_pico(model, inp, max_out) == to_pico(worst)
    cached_worst = table.max_cost(model, inp, max_out, cache_writes=True)
    assert cached_worst is not None and cached_worst >= worst
    assert table.max_cost_pico(model, inp, max_out, cache_writes=True) == to_pico(cached_worst)


@given(st.sampled_from(sorted(SHIPPED.models)), TOKENS, TOKENS, TOKENS, TOKENS, st.integers(0, 10**6))
def test_the_worst_case_of_a_caching_call_bounds_any_split_of_its_input(model: str, uncached: int, read: int,
                                                                         written: int, written_1h: int,
                                                                         limit: int) -> None:
    """However the provider splits a caching call's input among uncached, read and written tokens, and with
    any output up to the limit, the bill stays within the worst case reserved for it."""
    price = SHIPPED.lookup(model)
    assert price is not None
    total = uncached + read + written + written_1h
    bill = price.cost(Usage(input=uncached, cached=read, cache_write=written, cache_write_1h=written_1h,
                            output=limit, reasoning=limit))
    assert bill <= price.max_cost(total, limit, cache_writes=True)
    assert to_pico(bill) <= price.max_cost_pico(total, limit, cache_writes=True)


def test_a_caching_calls_input_is_reserved_at_the_dearest_write_rate() -> None:
    price = ModelPrice(model="m", provider=None, input=D("2"), output=D("8"), cache_write=D("2.5"),
                       cache_write_1h=D("4"))
    # 1M input at 4 (the 1-hour write rate) + 1M output at 8 = $12; without caching, input at 2: $10
    assert price.max_cost(1_000_000, 1_000_000, cache_writes=True) == 12
    assert price.max_cost(1_000_000, 1_000_000) == 10
    # finer than a pico per token: the Decimal path agrees with the integer one
    fine = ModelPrice(model="f", provider=None, input=D("0.0000001"), output=D("8"), cache_write_1h=D("0.0000003"))
    assert fine.max_cost_pico(10**7, 0, cache_writes=True) == to_pico(fine.max_cost(10**7, 0, cache_writes=True))
    assert fine.max_cost_pico(10**7, 0, cache_writes=True) == 3_000_000  # 10M tokens at $0.0000003 per 1M


def test_integer_costs_fall_back_for_prices_finer_than_a_pico_per_token() -> None:
    table = PriceTable.load({"odd-model": {"input": Decimal("0.0000001"), "output": Decimal("1")}})
    usage = Usage(input=3, output=2)
    assert table.cost_pico("odd-model", usage) == to_pico(table.cost("odd-model", usage) or Decimal(0))
    assert table.cost_pico("no-such-model", usage) is None
