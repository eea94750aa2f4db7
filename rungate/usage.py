"""Token usage of one model call, in provider-neutral terms.

Counts are kept as the provider bills them so the cost can be computed at the serving target's prices:

- `input`        uncached input tokens (OpenAI: prompt_tokens - cached_tokens; Anthropic: input_tokens)
- `cached`       input tokens read from the prompt cache (billed at `cache_read`)
- `cache_write`  input tokens written to the cache, 5-minute TTL (Anthropic; billed at `cache_write`)
- `cache_write_1h` input tokens written with a 1-hour TTL (Anthropic; billed at `cache_write_1h`)
- `output`       output tokens, reasoning included (both vendors bill reasoning at the output rate)
- `reasoning`    the part of `output` spent on reasoning (informational unless priced separately)
- `web_searches` server-side web searches the provider ran for the call (Anthropic's web search tool, OpenAI's
                 built-in `web_search` in the Responses API; billed per search)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one call; all non-negative integers."""

    input: int = 0
    output: int = 0
    cached: int = 0
    cache_write: int = 0
    cache_write_1h: int = 0
    reasoning: int = 0
    web_searches: int = 0

    @classmethod
    def from_dict(cls, stored: Mapping[str, int]) -> Usage:
        """The usage an event stored (`as_dict`'s keys; a missing one is 0, others are ignored)."""
        return cls(stored.get("input", 0), stored.get("output", 0), stored.get("cached", 0),
                   stored.get("cache_write", 0), stored.get("cache_write_1h", 0), stored.get("reasoning", 0),
                   stored.get("web_searches", 0))

    @property
    def total_input(self) -> int:
        """Every input token, cached or not (what OpenAI calls prompt_tokens)."""
        return self.input + self.cached + self.cache_write + self.cache_write_1h

    @property
    def total(self) -> int:
        """Input plus output tokens: what token budgets count."""
        return self.total_input + self.output

    def as_dict(self) -> dict[str, int]:
        """The counts as an event stores them (`web_searches` only when there were any)."""
        counts = {
            "input": self.input,
            "output": self.output,
            "cached": self.cached,
            "cache_write": self.cache_write,
            "cache_write_1h": self.cache_write_1h,
            "reasoning": self.reasoning,
        }
        if self.web_searches:
            counts["web_searches"] = self.web_searches
        return counts
