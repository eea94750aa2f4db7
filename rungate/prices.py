"""The shipped price table and the cost of a call, in exact decimal USD.

Prices are USD per 1 million tokens, read from the newest `rungate/data/prices-YYYY-MM-DD.json` (decimal
strings, never floats) and optionally overridden per model by the configuration's `prices` section.

Contracts:

- A model without a price is *unknown*: `PriceTable.lookup` and `PriceTable.cost` return `None`, never 0.
  Callers must treat an unknown cost as "charge the reservation", not as free.
- `cost` is exact: `Decimal` arithmetic with no rounding anywhere (a rounding would raise).
- Money inside Rungate is an integer number of pico-USD (1e-12 USD); `to_pico` converts a cost, rounding a
  sub-pico remainder up, and `format_usd` renders pico-USD as the decimal string used on the wire.
- NaN, Infinity and negative prices are refused with `ConfigError`, whether in the data file or overrides.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from decimal import (
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
    Rounded,
    localcontext,
)
from importlib import resources
from types import MappingProxyType
from typing import Any

from rungate.errors import ConfigError
from rungate.usage import Usage

__all__ = ["DEFAULT_IMAGE_INPUT_TOKENS", "LIMIT_KEYS", "OVERRIDE_KEYS", "PRICE_KEYS", "ModelPrice", "Override",
           "PriceTable", "format_usd", "to_pico"]

PRICE_KEYS: tuple[str, ...] = ("input", "output", "cache_read", "cache_write", "cache_write_1h", "reasoning",
                               "web_search_per_1k")
"""The price fields of a model: what the data file and overrides may set (USD per 1M tokens; the fee for the
provider's server-side web search, `web_search_per_1k`, in USD per 1,000 searches)."""
LIMIT_KEYS: tuple[str, ...] = ("max_output_tokens", "image_input_tokens")
"""The token limits of a model that the data file and overrides may set besides its prices (positive integers):
its output limit and the most one image costs, both for worst-case reservations."""
Override = Mapping[str, Decimal | int]
"""One model's overrides: some of `PRICE_KEYS` (amounts) and `LIMIT_KEYS` (positive integers)."""

_REQUIRED_PRICES = ("input", "output")
_ENTRY_KEYS = frozenset(PRICE_KEYS) | frozenset(LIMIT_KEYS) | {"provider", "kind", "note"}
OVERRIDE_KEYS: tuple[str, ...] = (*PRICE_KEYS, *LIMIT_KEYS)
"""What a price override (the config file's `prices`) may set: amounts, then token limits."""
_DATA_PACKAGE = "rungate"
_DATA_DIR = "data"
_DATA_FILE = re.compile(r"^prices-\d{4}-\d{2}-\d{2}\.json$")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_SNAPSHOT = re.compile(
    r"^(?P<base>.+?)-(?:(?:19|20)\d{2}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])"
    r"|(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))$"
)
_PER_TOKENS = Decimal(1_000_000)
_PER_SEARCHES = Decimal(1_000)  # `web_search_per_1k` is per 1,000 searches
DEFAULT_IMAGE_INPUT_TOKENS = 1_600
"""The most input tokens one image is taken to cost on a model whose entry does not say
(`image_input_tokens`): Anthropic's, for an image at its resize limit of about 1.15 megapixels (width x height
/ 750), which also bounds OpenAI's tile-priced models (gpt-4o: 85 + 8 tiles x 170 = 1,445)."""


def snapshot_base(model: str) -> str | None:
    """`gpt-4o-2024-08-06` → `gpt-4o`: the model a dated snapshot name stands for (None if not dated)."""
    match = _SNAPSHOT.match(model)
    return match.group("base") if match is not None else None
_PICO_DIGITS = 12
_PICO_PER_USD = 10**_PICO_DIGITS
_MAX_ADJUSTED = 30  # `to_pico` refuses amounts of 1e30 USD or more instead of building a huge integer
# Cost arithmetic runs in this context: any rounding or overflow raises instead of silently losing money.
_EXACT = Context(prec=200, traps=[InvalidOperation, DivisionByZero, Overflow, Inexact, Rounded])


@dataclass(frozen=True)
class ModelPrice:
    """The prices of one model, USD per 1M tokens; all finite and non-negative.

    `cache_read`, `cache_write` and `cache_write_1h` of `None` mean "billed at the next rate down":
    a cache read or 5-minute write at `input`, a 1-hour write at `cache_write` (else `input`).
    `reasoning` of `None` means reasoning tokens are billed as output (both vendors do so today).
    `web_search_per_1k` is the fee per 1,000 server-side web searches (`None`: searches are not billed).
    `max_output_tokens` is the model's output limit, used for worst-case reservations; `None` if unknown.
    `image_input_tokens` is the most input tokens one image in a request can cost (the provider's resize limits),
    also for reservations; `None`: `DEFAULT_IMAGE_INPUT_TOKENS` (see `image_tokens`).
    `kind` is `"chat"` or `"embedding"`.
    """

    model: str
    provider: str | None
    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None
    cache_write_1h: Decimal | None = None
    reasoning: Decimal | None = None
    web_search_per_1k: Decimal | None = None
    max_output_tokens: int | None = None
    kind: str = "chat"
    image_input_tokens: int | None = None

    def __post_init__(self) -> None:
        for key in PRICE_KEYS:
            value = getattr(self, key)
            if value is None and key not in _REQUIRED_PRICES:
                continue
            if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
                raise ValueError(f"{self.model}: {key} must be a finite Decimal >= 0, got {value!r}")
        for key in ("max_output_tokens", "image_input_tokens"):
            limit = getattr(self, key)
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
                raise ValueError(f"{self.model}: {key} must be an int >= 0, got {limit!r}")

    @property
    def image_tokens(self) -> int:
        """The most input tokens one image in a request can cost on this model (what a reservation counts)."""
        return DEFAULT_IMAGE_INPUT_TOKENS if self.image_input_tokens is None else self.image_input_tokens

    def cost(self, usage: Usage) -> Decimal:
        """The exact USD cost of `usage` at these prices (reference §5.3); no rounding.

        Reasoning tokens are part of `usage.output`; when `reasoning` is priced they are billed at that
        rate instead of `output`. Web searches cost `web_search_per_1k` each thousand. Raises `ValueError`
        if a count is negative.
        """
        counts = usage.as_dict()
        for key, count in counts.items():
            if count < 0:
                raise ValueError(f"usage.{key} must be >= 0, got {count}")
        cache_read = self.cache_read if self.cache_read is not None else self.input
        cache_write = self.cache_write if self.cache_write is not None else self.input
        cache_write_1h = self.cache_write_1h if self.cache_write_1h is not None else cache_write
        with localcontext(_EXACT):
            total = (
                usage.input * self.input
                + usage.cached * cache_read
                + usage.cache_write * cache_write
                + usage.cache_write_1h * cache_write_1h
            )
            if self.reasoning is None:
                total += usage.output * self.output
            else:
                reasoning = min(usage.reasoning, usage.output)
                total += (usage.output - reasoning) * self.output + reasoning * self.reasoning
            return total / _PER_TOKENS + self._search_fees(usage.web_searches)

    def max_cost(self, input_tokens: int, max_output_tokens: int | None = None, *,
                 cache_writes: bool = False, web_searches: int = 0) -> Decimal:
        """The worst-case USD cost of a call, for admission and reservation.

        `input_tokens` at the `input` rate (at the dearest of it and the two cache-write rates when the call
        asks for prompt caching, `cache_writes`: every input token may then be written to the cache) plus
        the output limit (`max_output_tokens`, else the model's own limit, else 0) at the higher of the
        `output` and `reasoning` rates, plus `web_searches` searches at their fee. Raises `ValueError` if a
        count is negative.
        """
        if input_tokens < 0:
            raise ValueError(f"input_tokens must be >= 0, got {input_tokens}")
        if max_output_tokens is not None and max_output_tokens < 0:
            raise ValueError(f"max_output_tokens must be >= 0, got {max_output_tokens}")
        if web_searches < 0:
            raise ValueError(f"web_searches must be >= 0, got {web_searches}")
        limit = max_output_tokens if max_output_tokens is not None else (self.max_output_tokens or 0)
        output_rate = max(self.output, self.reasoning or Decimal(0))
        input_rate = self.input
        if cache_writes:
            input_rate = max(input_rate, self.cache_write or input_rate, self.cache_write_1h or input_rate)
        with localcontext(_EXACT):
            return (input_tokens * input_rate + limit * output_rate) / _PER_TOKENS + self._search_fees(web_searches)

    def _search_fees(self, searches: int) -> Decimal:
        """The exact USD fee of `searches` web searches (0 where the model bills none); call it in `_EXACT`."""
        return searches * (self.web_search_per_1k or Decimal(0)) / _PER_SEARCHES


    @functools.cached_property
    def _pico_rates(self) -> tuple[int, int, int, int, int, int | None] | None:
        """Integer pico-USD per token (input, output, cache read, 5m write, 1h write, reasoning), or None.

        A price per 1M tokens with at most six decimals is a whole number of pico-USD per token, so costs
        can be summed exactly in integers (the hot path); other prices fall back to `Decimal`.
        """
        cache_read = self.cache_read if self.cache_read is not None else self.input
        cache_write = self.cache_write if self.cache_write is not None else self.input
        cache_write_1h = self.cache_write_1h if self.cache_write_1h is not None else cache_write
        prices = (self.input, self.output, cache_read, cache_write, cache_write_1h)
        scaled = [price * _PER_TOKENS for price in prices]
        if any(value != value.to_integral_value() for value in scaled):
            return None
        reasoning = None
        if self.reasoning is not None:
            reasoning_scaled = self.reasoning * _PER_TOKENS
            if reasoning_scaled != reasoning_scaled.to_integral_value():
                return None
            reasoning = int(reasoning_scaled)
        ints = [int(value) for value in scaled]
        return ints[0], ints[1], ints[2], ints[3], ints[4], reasoning

    def cost_pico(self, usage: Usage) -> int:
        """`to_pico(self.cost(usage))`, computed in integers when the prices allow it."""
        rates, search_fee = self._pico_rates, self._pico_search_fee
        if rates is None or search_fee is None or min(usage.input, usage.output, usage.cached, usage.cache_write,
                                                      usage.cache_write_1h, usage.reasoning, usage.web_searches) < 0:
            return to_pico(self.cost(usage))  # also raises for negative counts
        input_rate, output_rate, read_rate, write_rate, write_1h_rate, reasoning_rate = rates
        total = (usage.input * input_rate + usage.cached * read_rate + usage.cache_write * write_rate
                 + usage.cache_write_1h * write_1h_rate + usage.web_searches * search_fee)
        if reasoning_rate is None:
            return total + usage.output * output_rate
        reasoning = min(usage.reasoning, usage.output)
        return total + (usage.output - reasoning) * output_rate + reasoning * reasoning_rate

    @functools.cached_property
    def _pico_search_fee(self) -> int | None:
        """Integer pico-USD per web search (0 when searches are not billed), or None when not whole."""
        scaled = (self.web_search_per_1k or Decimal(0)) * _PICO_PER_USD / _PER_SEARCHES
        return int(scaled) if scaled == scaled.to_integral_value() else None

    def max_cost_pico(self, input_tokens: int, max_output_tokens: int | None = None, *,
                      cache_writes: bool = False, web_searches: int = 0) -> int:
        """`to_pico(self.max_cost(...))`, computed in integers when the prices allow it."""
        rates, search_fee = self._pico_rates, self._pico_search_fee
        if (rates is None or search_fee is None or input_tokens < 0 or web_searches < 0
                or (max_output_tokens is not None and max_output_tokens < 0)):
            return to_pico(self.max_cost(input_tokens, max_output_tokens, cache_writes=cache_writes,
                                         web_searches=web_searches))
        limit = max_output_tokens if max_output_tokens is not None else (self.max_output_tokens or 0)
        output_rate = max(rates[1], rates[5] or 0)
        input_rate = max(rates[0], rates[3], rates[4]) if cache_writes else rates[0]
        return input_tokens * input_rate + limit * output_rate + web_searches * search_fee


class PriceTable:
    """Model prices by name, with lenient name resolution; immutable once built.

    Build it with `PriceTable.load()` (the shipped file plus configured overrides) or `from_data`.
    """

    def __init__(self, models: Mapping[str, ModelPrice], *, as_of: str) -> None:
        self._as_of = as_of
        self._models: dict[str, ModelPrice] = {}
        self._index: dict[str, ModelPrice] = {}
        for name, price in models.items():
            if name.lower() in self._index:
                raise ValueError(f"model {name!r} is listed twice (names are case-insensitive)")
            self._models[name] = price
            self._index[name.lower()] = price

    @classmethod
    def load(cls, overrides: Mapping[str, Override] | None = None) -> PriceTable:
        """Read the newest shipped `data/prices-*.json` and apply `overrides`.

        `overrides` maps a model name (optionally `provider/model`) to some of `PRICE_KEYS` and `LIMIT_KEYS`. A
        known model gets those replaced; an unknown one is added and then needs both `input` and `output`.
        Raises `ConfigError` for a bad data file or override (naming the model and key).
        """
        folder = resources.files(_DATA_PACKAGE).joinpath(_DATA_DIR)
        names = sorted(entry.name for entry in folder.iterdir() if _DATA_FILE.match(entry.name))
        if not names:
            raise ConfigError(f"no {_DATA_DIR}/prices-YYYY-MM-DD.json in package {_DATA_PACKAGE}")
        source = f"{_DATA_DIR}/{names[-1]}"
        try:
            text = folder.joinpath(names[-1]).read_text(encoding="utf-8")
            data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"price table {source} cannot be read: {exc}") from None
        return cls.from_data(data, overrides, source=source)

    @classmethod
    def from_data(cls, data: Any, overrides: Mapping[str, Override] | None = None, *,
                  source: str = "price table") -> PriceTable:
        """Build a table from a parsed price document (the data file's shape) and apply `overrides`.

        Raises `ConfigError`, naming `source` and the offending model and key, on any invalid entry.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: must be a JSON object")
        as_of = data.get("as_of")
        if not isinstance(as_of, str) or not _ISO_DATE.match(as_of):
            raise ConfigError(f"{source}: as_of must be a YYYY-MM-DD string")
        raw_models = data.get("models")
        if not isinstance(raw_models, Mapping) or not raw_models:
            raise ConfigError(f"{source}: models must be a non-empty object")
        models: dict[str, ModelPrice] = {}
        seen: set[str] = set()
        for name, entry in raw_models.items():
            if not isinstance(name, str) or not name or name.lower() in seen:
                raise ConfigError(f"{source}: model name {name!r} is empty or listed twice")
            seen.add(name.lower())
            models[name] = _parse_entry(name, entry, source)
        table = cls(models, as_of=as_of)
        return table._with_overrides(overrides) if overrides else table

    @property
    def as_of(self) -> str:
        """The date (YYYY-MM-DD) the shipped prices were taken."""
        return self._as_of

    @property
    def models(self) -> Mapping[str, ModelPrice]:
        """Every priced model by its table name (read-only)."""
        return MappingProxyType(self._models)

    def __iter__(self) -> Iterator[ModelPrice]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def lookup(self, model: str) -> ModelPrice | None:
        """The prices of `model`, or `None` if it is not priced (never a zero price).

        Resolution, case-insensitive: the exact name; else the name without a trailing date snapshot
        (`-YYYY-MM-DD` or `-YYYYMMDD`: `gpt-4o-2024-08-06` -> `gpt-4o`). A `provider/model` name is then
        resolved the same way without its prefix, but only to a model of that provider (or of none):
        `anthropic/claude-haiku-4-5` resolves, `azure/gpt-4o` does not.
        """
        name = model.lower()
        found = self._resolve(name)
        if found is not None:
            return found
        prefix, slash, rest = name.partition("/")
        if slash and prefix and rest:
            found = self._resolve(rest)
            if found is not None and found.provider in (None, prefix):
                return found
        return None

    def cost(self, model: str, usage: Usage) -> Decimal | None:
        """The exact USD cost of `usage` on `model` (see `ModelPrice.cost`), or `None` if unpriced."""
        price = self.lookup(model)
        return None if price is None else price.cost(usage)

    def max_cost(self, model: str, input_tokens: int, max_output_tokens: int | None, *,
                 cache_writes: bool = False, web_searches: int = 0) -> Decimal | None:
        """The worst-case USD cost on `model` (see `ModelPrice.max_cost`), or `None` if unpriced."""
        price = self.lookup(model)
        return None if price is None else price.max_cost(input_tokens, max_output_tokens, cache_writes=cache_writes,
                                                         web_searches=web_searches)

    def cost_pico(self, model: str, usage: Usage) -> int | None:
        """The cost of `usage` on `model` in whole pico-USD (rounded up), or `None` if unpriced."""
        price = self.lookup(model)
        return None if price is None else price.cost_pico(usage)

    def max_cost_pico(self, model: str, input_tokens: int, max_output_tokens: int | None, *,
                      cache_writes: bool = False, web_searches: int = 0) -> int | None:
        """The worst-case cost on `model` in whole pico-USD (rounded up), or `None` if unpriced."""
        price = self.lookup(model)
        return None if price is None else price.max_cost_pico(input_tokens, max_output_tokens,
                                                              cache_writes=cache_writes, web_searches=web_searches)

    def _resolve(self, name: str) -> ModelPrice | None:
        found = self._index.get(name)
        if found is None:
            match = _SNAPSHOT.match(name)
            if match is not None:
                found = self._index.get(match.group("base"))
        return found

    def _with_overrides(self, overrides: Mapping[str, Override]) -> PriceTable:
        models = dict(self._models)
        canonical = {name.lower(): name for name in models}
        for key, entry in overrides.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"prices: model name {key!r} must be a non-empty string")
            if not isinstance(entry, Mapping) or not entry:
                raise ConfigError(f"prices.{key} must be a non-empty mapping of {list(OVERRIDE_KEYS)}")
            unknown = sorted(str(k) for k in entry if k not in OVERRIDE_KEYS)
            if unknown:
                raise ConfigError(f"prices.{key} has unknown keys {unknown}; allowed: {list(OVERRIDE_KEYS)}")
            values = {k: _override_amount(key, k, v) for k, v in entry.items() if k in PRICE_KEYS}
            limits = {k: override_limit(f"prices.{key}.{k}", v) for k, v in entry.items() if k in LIMIT_KEYS}
            name, provider = key, None
            if key.lower() not in canonical:
                prefix, slash, rest = key.partition("/")
                if slash and prefix and rest:
                    name, provider = rest, prefix.lower()
            existing = canonical.get(name.lower())
            if existing is not None:
                current = models[existing]
                if provider is not None and current.provider not in (None, provider):
                    raise ConfigError(f"prices.{key}: {existing} is a {current.provider} model, "
                                      f"not {provider}")
                models[existing] = _with_limits(_with_prices(current, values), limits)
                continue
            missing = [k for k in _REQUIRED_PRICES if k not in values]
            if missing:
                raise ConfigError(f"prices.{key}: {key} is not in the shipped price table, so it needs "
                                  f"{' and '.join(missing)}")
            models[name] = _with_limits(_with_prices(
                ModelPrice(model=name, provider=provider, input=values["input"], output=values["output"]), values),
                limits)
            canonical[name.lower()] = name
        return PriceTable(models, as_of=self._as_of)


def to_pico(amount: Decimal) -> int:
    """`amount` USD as an integer number of pico-USD (1e-12 USD), rounding any remainder up (ceiling).

    Exact for every amount with at most 12 decimal places. Raises `ValueError` for NaN, Infinity, or a
    magnitude of 1e30 USD or more.
    """
    if not isinstance(amount, Decimal) or not amount.is_finite():
        raise ValueError(f"amount must be a finite Decimal, got {amount!r}")
    if amount.is_zero():
        return 0
    if amount.adjusted() >= _MAX_ADJUSTED:
        raise ValueError(f"amount {amount} USD is out of range")
    sign, digits, exponent = amount.as_tuple()
    assert isinstance(exponent, int)  # finite, checked above
    coefficient = int("".join(map(str, digits)))
    if sign:
        coefficient = -coefficient
    shift = exponent + _PICO_DIGITS
    if shift >= 0:
        return coefficient * int(10**shift)
    if -shift > len(digits):  # |amount| < 1 pico: the ceiling is 1 when positive, 0 when negative
        return 0 if sign else 1
    return -((-coefficient) // int(10**-shift))


MAX_AMOUNT_USD = Decimal(1_000_000)  # one amount a caller sends (a tool's cost, a top-up)
# Money sent as text is plain decimal notation (SPEC: "1.03"): digits, optionally a point and more digits.
# Python's Decimal also reads "1e3", " 2.5 ", "+2" and "1_000"; a caller's amount is taken only as SPEC writes it.
_DECIMAL_TEXT = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def parse_usd(value: Any) -> int:
    """A USD amount sent as a decimal string ("2.50") or a number, in pico-USD; `ValueError` unless it is a
    finite amount from 0 to `MAX_AMOUNT_USD` (a string in plain decimal notation: no sign, exponent, space or
    digit separator)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("must be a decimal string or number")
    if isinstance(value, str) and not _DECIMAL_TEXT.fullmatch(value):
        raise ValueError("must be written as plain decimal digits, such as \"2.50\"")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ValueError("must be a decimal string or number") from None
    if not amount.is_finite() or amount < 0 or amount > MAX_AMOUNT_USD:
        raise ValueError(f"must be a finite amount between 0 and {MAX_AMOUNT_USD}")
    return to_pico(amount)


def format_usd(pico: int) -> str:
    """`pico` pico-USD as a plain decimal USD string: no exponent, no trailing zeros ("1.03", "0", "-0.5").

    `to_pico(Decimal(format_usd(p))) == p` for every integer `p`.
    """
    if isinstance(pico, bool) or not isinstance(pico, int):
        raise TypeError(f"pico must be an int, got {type(pico).__name__}")
    whole, fraction = divmod(abs(pico), _PICO_PER_USD)
    text = str(whole)
    if fraction:
        text += "." + str(fraction).rjust(_PICO_DIGITS, "0").rstrip("0")
    return "-" + text if pico < 0 else text


def _parse_entry(name: str, entry: Any, source: str) -> ModelPrice:
    where = f"{source}: models.{name}"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be an object")
    unknown = sorted(str(k) for k in entry if k not in _ENTRY_KEYS)
    if unknown:
        raise ConfigError(f"{where} has unknown keys {unknown}")
    prices: dict[str, Decimal | None] = {}
    for key in PRICE_KEYS:
        raw = entry.get(key)
        if raw is None:
            if key in _REQUIRED_PRICES:
                raise ConfigError(f"{where}.{key} is required")
            prices[key] = None
            continue
        if not isinstance(raw, str):
            raise ConfigError(f"{where}.{key} must be a decimal string, got {raw!r}")
        prices[key] = _amount(raw, f"{where}.{key}")
    provider = entry.get("provider")
    if provider is not None and (not isinstance(provider, str) or not provider):
        raise ConfigError(f"{where}.provider must be a non-empty string or null")
    limit = entry.get("max_output_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ConfigError(f"{where}.max_output_tokens must be a positive integer or null")
    image = entry.get("image_input_tokens")
    if image is not None and (isinstance(image, bool) or not isinstance(image, int) or image <= 0):
        raise ConfigError(f"{where}.image_input_tokens must be a positive integer or null")
    kind = entry.get("kind", "chat")
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"{where}.kind must be a non-empty string")
    note = entry.get("note")
    if note is not None and not isinstance(note, str):
        raise ConfigError(f"{where}.note must be a string")
    input_price, output_price = prices.pop("input"), prices.pop("output")
    assert input_price is not None and output_price is not None
    return ModelPrice(model=name, provider=provider.lower() if provider else None, input=input_price,
                      output=output_price, max_output_tokens=limit, image_input_tokens=image, kind=kind, **prices)


def _with_prices(base: ModelPrice, values: Mapping[str, Decimal]) -> ModelPrice:
    return replace(
        base,
        input=values.get("input", base.input),
        output=values.get("output", base.output),
        cache_read=values.get("cache_read", base.cache_read),
        cache_write=values.get("cache_write", base.cache_write),
        cache_write_1h=values.get("cache_write_1h", base.cache_write_1h),
        reasoning=values.get("reasoning", base.reasoning),
        web_search_per_1k=values.get("web_search_per_1k", base.web_search_per_1k),
    )


def _with_limits(base: ModelPrice, limits: Mapping[str, int]) -> ModelPrice:
    return replace(base, max_output_tokens=limits.get("max_output_tokens", base.max_output_tokens),
                   image_input_tokens=limits.get("image_input_tokens", base.image_input_tokens))


def override_limit(where: str, value: object) -> int:
    """A token limit of an override (`LIMIT_KEYS`): a positive integer, else `ConfigError` naming `where`."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where} must be a positive integer, got {value!r}")
    return value


def _override_amount(model: str, key: str, value: object) -> Decimal:
    where = f"prices.{model}.{key}"
    if isinstance(value, Decimal):
        return _amount(value, where)
    if isinstance(value, int | str) and not isinstance(value, bool):
        return _amount(str(value), where)
    raise ConfigError(f"{where} must be a Decimal or decimal string, got {value!r}")


def _amount(raw: str | Decimal, where: str) -> Decimal:
    try:
        amount = Decimal(raw)
    except InvalidOperation:
        raise ConfigError(f"{where} is not a decimal number: {raw!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ConfigError(f"{where} must be a finite number >= 0, got {raw!r}")
    return amount.copy_abs()  # folds -0 into 0


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")
