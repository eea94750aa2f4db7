"""Routes (SPEC §6.1): a model name, or a glob of names, mapped to the ordered targets that may serve it.

Routes come from the configuration file's `routes` section and, per run, from its policy's `routes`
(the policy's entry for a model wins over the file's). A target names a provider and the model asked of
it, and optionally a stored key, timeouts and whether it can continue an assistant prefill; a base URL
only in the file (an operator's choice of where provider keys may be sent, never a policy's).

Matching: an exact (case-insensitive) name first, then the globs in the order written. A model no route
matches goes to the provider its request format implies, alone, with no failover.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rungate.errors import ConfigError

__all__ = ["EMPTY", "MAX_TARGETS", "ConfigRouteTarget", "RouteTable", "RouteTarget", "Timeouts", "parse_config_routes",
           "parse_targets"]

Provider = Literal["openai", "anthropic"]
MAX_TARGETS = 8  # per route: each may be tried, so the list bounds the attempts of one call


class Timeouts(BaseModel):
    """How long a target may take: to connect, to its first token (its answer's start), and between chunks.

    Unset values take the defaults: 10 s to connect, `RUNGATE_UPSTREAM_TIMEOUT_S` for the others.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    connect_s: Annotated[float, Field(gt=0, le=600)] | None = None
    first_token_s: Annotated[float, Field(gt=0, le=3600)] | None = None
    idle_s: Annotated[float, Field(gt=0, le=3600)] | None = None


class RouteTarget(BaseModel):
    """One target of a route, as a policy may write it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Provider
    model: Annotated[str, Field(min_length=1, max_length=200)]
    key: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    timeouts: Timeouts = Timeouts()
    prefill: bool | None = None  # can it continue an assistant prefill (None: Anthropic yes, OpenAI no)

    @property
    def accepts_prefill(self) -> bool:
        return self.prefill if self.prefill is not None else self.provider == "anthropic"


class ConfigRouteTarget(RouteTarget):
    """A target in the configuration file, which may also say where the provider is."""

    base_url: Annotated[str, Field(pattern=r"^https?://[^\s/?#]+[^\s?#]*$", max_length=2000)] | None = None


def _compile_glob(pattern: str) -> re.Pattern[str] | None:
    """A compiled glob, or None for a plain name (matched exactly)."""
    if not any(ch in pattern for ch in "*?["):
        return None
    return re.compile(fnmatch.translate(pattern.strip().lower()))


@dataclass(frozen=True)
class RouteTable:
    """Routes in the order written; `match` finds the targets for a model name."""

    exact: Mapping[str, tuple[RouteTarget, ...]]
    globs: tuple[tuple[re.Pattern[str], tuple[RouteTarget, ...]], ...]

    @classmethod
    def build(cls, routes: Mapping[str, Sequence[RouteTarget]]) -> RouteTable:
        exact: dict[str, tuple[RouteTarget, ...]] = {}
        globs: list[tuple[re.Pattern[str], tuple[RouteTarget, ...]]] = []
        for pattern, targets in routes.items():
            compiled = _compile_glob(pattern)
            if compiled is None:
                exact[pattern.strip().lower()] = tuple(targets)
            else:
                globs.append((compiled, tuple(targets)))
        return cls(exact, tuple(globs))

    def match(self, model: str) -> tuple[RouteTarget, ...] | None:
        """The targets for `model`, or None when no route names it."""
        name = model.strip().lower()
        hit = self.exact.get(name)
        if hit is not None:
            return hit
        return next((targets for pattern, targets in self.globs if pattern.match(name)), None)

    def targets(self) -> list[RouteTarget]:
        """Every target of every route, in the order written (a target named twice, once)."""
        seen: dict[tuple[str, str, str | None], RouteTarget] = {}
        for targets in (*self.exact.values(), *(t for _, t in self.globs)):
            for spec in targets:
                seen.setdefault((spec.provider, spec.model, getattr(spec, "base_url", None)), spec)
        return list(seen.values())

    def __bool__(self) -> bool:
        return bool(self.exact or self.globs)


EMPTY = RouteTable({}, ())


def _problems(exc: ValidationError, where: str) -> list[str]:
    return [f"{where}{''.join(f'[{p!r}]' if isinstance(p, int) else f'.{p}' for p in e['loc'])}: {e['msg']}"
            for e in exc.errors()]


def parse_targets(raw: Any, model: type[RouteTarget], where: str) -> tuple[list[RouteTarget], list[str]]:
    """Validate one route's target list; returns the targets and every problem found (path and reason)."""
    if not isinstance(raw, list) or not raw:
        return [], [f"{where}: must be a non-empty list of targets"]
    if len(raw) > MAX_TARGETS:
        return [], [f"{where}: at most {MAX_TARGETS} targets"]
    targets: list[RouteTarget] = []
    problems: list[str] = []
    for index, item in enumerate(raw):
        try:
            targets.append(model.model_validate(item))
        except ValidationError as exc:
            problems.extend(_problems(exc, f"{where}[{index}]"))
    return targets, problems


def parse_config_routes(raw: Any, where: str) -> RouteTable:
    """The configuration file's `routes` section; `ConfigError` listing every problem."""
    if raw is None:
        return EMPTY
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: routes must be a mapping of model name (or glob) to a list of targets")
    routes: dict[str, list[RouteTarget]] = {}
    problems: list[str] = []
    for pattern, targets_raw in raw.items():
        if not isinstance(pattern, str) or not pattern.strip() or len(pattern) > 200:
            problems.append(f"{where}: route names must be model names or globs of 1-200 characters")
            continue
        targets, found = parse_targets(targets_raw, ConfigRouteTarget, f"{where}.routes[{pattern!r}]")
        problems.extend(found)
        routes[pattern] = targets
    if problems:
        raise ConfigError("; ".join(problems))
    return RouteTable.build(routes)
