"""The policy document (SPEC §4.1): its shape, its validation, and the compiled form rules read.

One shape everywhere: YAML for `rungate policies apply FILE`, the same object as JSON over the API. Every
section is optional and a limit no policy sets does not exist. `parse_document` either returns the
normalised document (money as decimal strings) or raises `InvalidPolicy` listing every problem as
`{"path", "reason"}`; nothing is stored then.
"""

from __future__ import annotations

import fnmatch
import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from rungate.enforce.gates import MAX_PATH_LENGTH, ApprovalRules, ToolMatcher, compile_pattern, is_number, parse_path
from rungate.enforce.gates import canonical_tool as canonical_tool  # re-exported: its home is gates.py
from rungate.errors import BadRequest
from rungate.prices import format_usd, snapshot_base, to_pico
from rungate.routing import MAX_TARGETS, RouteTable, RouteTarget

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
Mode = Literal["enforce", "shadow"]
_MAX_USD = Decimal("1000000000")
_MAX_COUNT = 10**12  # counts and token limits: far beyond any real limit, well inside SQLite's integers


class InvalidPolicy(BadRequest):
    """A policy document with problems; `problems` lists each one (path and reason)."""

    def __init__(self, problems: list[dict[str, str]]) -> None:
        first = f"{problems[0]['path']}: {problems[0]['reason']}" if problems else "invalid"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"The policy is invalid: {first}{more}.", code="invalid_policy",
                         extra={"problems": problems})
        self.problems = problems


def _usd(value: Any) -> str:
    """A money amount given as a decimal string or a number, as a normalised decimal string."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("must be a decimal string such as \"5.00\" (or a number)")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError("must be a decimal string such as \"5.00\" (or a number)") from None
    if not amount.is_finite() or amount < 0 or amount > _MAX_USD:
        raise ValueError("must be between 0 and 1000000000 USD")
    return format_usd(to_pico(amount))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_MONEY_DOC = "USD as a decimal string (\"5.00\") or a number; stored and returned as a decimal string."


class Budget(_Section):
    hard_limit_usd: Annotated[str | int | float | None, Field(description=_MONEY_DOC)] = None
    hard_limit_tokens: Annotated[int, Field(ge=0, le=_MAX_COUNT, strict=True)] | None = None
    agent_hourly_usd: Annotated[str | int | float | None, Field(description=_MONEY_DOC)] = None
    alerts: list[Annotated[float, Field(gt=0, le=1)]] = Field(default_factory=lambda: [0.8])
    on_exceed: Literal["refuse", "shrink"] = "refuse"
    mode: Mode | None = None

    @field_validator("hard_limit_usd", "agent_hourly_usd", mode="before")
    @classmethod
    def _money(cls, value: Any) -> str | None:
        return None if value is None else _usd(value)

    @field_validator("alerts")
    @classmethod
    def _sorted_alerts(cls, value: list[float]) -> list[float]:
        return sorted(set(value))


class Models(_Section):
    allowed: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = None
    blocked: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(default_factory=list)
    mode: Mode | None = None


class Tools(_Section):
    blocked: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(default_factory=list)
    mode: Mode | None = None


class Rate(_Section):
    requests_per_minute: Annotated[int, Field(ge=1, le=_MAX_COUNT, strict=True)] | None = None
    tokens_per_minute: Annotated[int, Field(ge=1, le=_MAX_COUNT, strict=True)] | None = None


class RateLimits(_Section):
    agent: Rate | None = None
    run: Rate | None = None
    mode: Mode | None = None


class Runaway(_Section):
    max_steps: Annotated[int, Field(ge=1, le=_MAX_COUNT, strict=True)] | None = None
    max_repeats: Annotated[int, Field(ge=1, le=_MAX_COUNT, strict=True)] | None = None
    mode: Mode | None = None


class Runs(_Section):
    idle_timeout_s: Annotated[int, Field(ge=1, le=7 * 86400, strict=True)] | None = None


_MAX_MEMBERS = 1000
_MAX_VALUE_DEPTH = 32
_VALUE_DOC = ("gt gte lt lte: a number; eq ne: any JSON value (required, null allowed); in not_in: a non-empty "
              "list of at most 1000 strings, numbers, booleans or nulls; matches: a regular expression of at most "
              "200 characters, searched anywhere in the value; exists: true (present, the default) or false (absent).")


def _is_json(value: Any, depth: int = 0) -> bool:
    """Whether `value` is plain JSON that stores and compares exactly: no NaN/infinity, integers within
    64 bits, nested at most 32 deep (YAML can also yield dates, sets and binary: not JSON)."""
    if value is None or isinstance(value, str | bool):
        return True
    if isinstance(value, int | float):
        return is_number(value) and (not isinstance(value, int) or -(2**63) <= value < 2**63)
    if depth >= _MAX_VALUE_DEPTH:
        return False
    if isinstance(value, list):
        return all(_is_json(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v, depth + 1) for k, v in value.items())
    return False


class Condition(_Section):
    """One predicate on the tool call's arguments; `path` is `$`, `$.key` or `$.list[0]` steps from the root."""

    # The pattern is published in the schema; `parse_path` enforces the same grammar with a readable reason.
    path: Annotated[str, Field(max_length=MAX_PATH_LENGTH,
                               json_schema_extra={"pattern": r"^\$(\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*$"})]
    op: Literal["eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "matches", "exists"]
    value: Annotated[Any, Field(description=_VALUE_DOC)] = None

    @model_validator(mode="before")
    @classmethod
    def _exists_defaults_to_true(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("op") == "exists" and data.get("value") is None:
            return {**data, "value": True}
        return data

    @field_validator("path")
    @classmethod
    def _path_steps(cls, value: str) -> str:
        parse_path(value)  # the grammar of the pattern above, and at most 32 segments
        return value

    @field_validator("value")
    @classmethod
    def _value_fits_op(cls, value: Any, info: ValidationInfo) -> Any:
        op = info.data.get("op")  # absent when the op itself is invalid (reported on its own)
        if op in ("gt", "gte", "lt", "lte") and not (is_number(value) and _is_json(value)):
            raise ValueError(f"must be a number for op {op}")
        if op in ("eq", "ne") and not _is_json(value):
            raise ValueError("must be a JSON value (no NaN or infinity, integers within 64 bits, nested at most "
                             f"{_MAX_VALUE_DEPTH} deep)")
        if op in ("in", "not_in") and not (
                isinstance(value, list) and 0 < len(value) <= _MAX_MEMBERS
                and all(not isinstance(v, list | dict) and _is_json(v) for v in value)):
            raise ValueError(f"must be a non-empty list of at most {_MAX_MEMBERS} strings, numbers, booleans or "
                             f"nulls for op {op}")
        if op == "matches":
            if not isinstance(value, str):
                raise ValueError("must be a regular expression (a string) for op matches")
            compile_pattern(value)
        if op == "exists" and not isinstance(value, bool):
            raise ValueError("must be true or false for op exists")
        return value

    @model_validator(mode="after")
    def _value_given(self) -> Condition:
        if "value" not in self.model_fields_set:
            raise ValueError(f"`value` is required for op {self.op}")
        return self

    @model_serializer(mode="wrap")
    def _keep_null(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The stored form drops nulls, but `eq: null` is a real comparison and must survive a round trip.
        out: dict[str, Any] = handler(self)
        if self.op in ("eq", "ne") and self.value is None:
            out["value"] = None
        return out


class Approval(_Section):
    """A rule that holds matching tool calls for a human's approval; every `when` condition must hold."""

    name: Annotated[str, Field(pattern=NAME_PATTERN.pattern)]
    tool: Annotated[str, Field(min_length=1, max_length=200)]
    when: list[Condition] = Field(default_factory=list)
    channel: Literal["webhook"] = "webhook"
    expires_in: Annotated[int, Field(ge=1, le=30 * 86400, strict=True)] = 3600
    on_expiry: Literal["reject", "approve"] = "reject"
    mode: Literal["202", "hold", "shadow"] = "202"


class PolicyDocument(_Section):
    """The whole document; `name` is the policy's unique name."""

    name: Annotated[str, Field(pattern=NAME_PATTERN.pattern)]
    mode: Mode = "enforce"
    description: Annotated[str, Field(max_length=2000)] | None = None
    budget: Budget | None = None
    models: Models | None = None
    tools: Tools | None = None
    rate_limits: RateLimits | None = None
    runaway: Runaway | None = None
    runs: Runs | None = None
    approvals: list[Approval] = Field(default_factory=list)
    # Per model name or glob, the targets that serve it for runs under this policy (SPEC §6.1); a policy
    # names providers and stored keys, never base URLs.
    routes: dict[Annotated[str, Field(min_length=1, max_length=200)],
                 Annotated[list[RouteTarget], Field(min_length=1, max_length=MAX_TARGETS)]] | None = None

    @field_validator("approvals")
    @classmethod
    def _unique_approvals(cls, value: list[Approval]) -> list[Approval]:
        names = [a.name for a in value]
        if len(names) != len(set(names)):
            raise ValueError("approval names must be unique")
        return value


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(document)"


def parse_document(raw: Any, *, name: str | None = None) -> dict[str, Any]:
    """Validate `raw` (a decoded JSON/YAML object) and return the normalised stored form.

    With `name` (a route that names the policy), the document's own `name` may be omitted but must match.
    Raises `InvalidPolicy` with every problem found.
    """
    if not isinstance(raw, dict):
        raise InvalidPolicy([{"path": "(document)", "reason": "a policy must be an object"}])
    if name is not None:
        if "name" in raw and raw["name"] != name:
            raise InvalidPolicy([{"path": "name", "reason": f"does not match the name in the URL ({name!r})"}])
        raw = {**raw, "name": name}
    try:
        document = PolicyDocument.model_validate(raw)
    except ValidationError as exc:
        problems = [{"path": _path(tuple(e["loc"])), "reason": _reason(e)} for e in exc.errors()]
        raise InvalidPolicy(problems) from None
    return document.model_dump(mode="json", exclude_none=True)


def _reason(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "is required"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the document (kept in `openapi/policy.schema.json`, checked by a test)."""
    schema = PolicyDocument.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Rungate policy document"
    return schema


# --- the compiled form -------------------------------------------------------------------------------

_MATCHES_KEPT = 1024


class _Matcher:
    """Glob patterns over `provider/model` and bare model names (case-insensitive)."""

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = list(patterns)
        self._regex = re.compile("|".join(f"(?:{fnmatch.translate(p.strip().lower())})" for p in patterns)) \
            if patterns else None
        # Answers by (provider, model): every call of a run asks the same few, once per list and target.
        self._seen: dict[tuple[str, str], bool] = {}

    def matches(self, provider: str, model: str) -> bool:
        """Whether `model` (or `provider/model`) matches; a dated snapshot (`gpt-4o-2024-08-06`) also matches
        as its base model, as the price table prices it, so a blocked model cannot come back dated."""
        if self._regex is None:
            return False
        seen = self._seen.get((provider, model))
        if seen is not None:
            return seen
        names = [model.strip().lower()]
        base = snapshot_base(names[0])
        if base is not None:
            names.append(base)
        found = any(self._regex.match(name) or self._regex.match(f"{provider.lower()}/{name}") for name in names)
        if len(self._seen) >= _MATCHES_KEPT:  # model names come from requests: keep the memory bounded
            self._seen.clear()
        self._seen[(provider, model)] = found
        return found


class CompiledPolicy:
    """One policy version ready for the rules: limits in pico-USD, matchers built once.

    Immutable, so cached by `(policy_id, version)` for the life of the process.
    """

    def __init__(self, policy_id: str, version: int, document: dict[str, Any]) -> None:
        doc = PolicyDocument.model_validate(document)
        self.id, self.version, self.name = policy_id, version, doc.name
        self.document = document
        self.mode: str = doc.mode
        budget = doc.budget or Budget()
        self.run_limit_pusd = to_pico(Decimal(str(budget.hard_limit_usd))) if budget.hard_limit_usd else None
        self.run_limit_tokens = budget.hard_limit_tokens
        self.agent_hourly_pusd = (to_pico(Decimal(str(budget.agent_hourly_usd))) if budget.agent_hourly_usd
                                  else None)
        self.alerts = tuple(budget.alerts)
        self.shrink = budget.on_exceed == "shrink"
        self.budget_mode = budget.mode or doc.mode
        models = doc.models or Models()
        self.models_allowed = _Matcher(models.allowed) if models.allowed is not None else None
        self.models_blocked = _Matcher(models.blocked)
        self.models_mode = models.mode or doc.mode
        tools = doc.tools or Tools()
        self.tools_blocked = ToolMatcher(tools.blocked)
        self.tools_mode = tools.mode or doc.mode
        runaway = doc.runaway or Runaway()
        self.max_steps, self.max_repeats = runaway.max_steps, runaway.max_repeats
        self.runaway_mode = runaway.mode or doc.mode
        rates = doc.rate_limits or RateLimits()
        self.agent_rate, self.run_rate = rates.agent, rates.run
        self.rates_mode = rates.mode or doc.mode
        self.idle_timeout_s = doc.runs.idle_timeout_s if doc.runs else None
        self.approvals = ApprovalRules([a.model_dump(mode="json") for a in doc.approvals], doc.mode)
        self.routes = RouteTable.build(doc.routes or {})

    @property
    def ref(self) -> dict[str, Any]:
        """How events name this policy version."""
        return {"id": self.id, "name": self.name, "version": self.version}


# Policy versions never change, so each is compiled once per process (bounded: emptied when full).
_COMPILED: dict[tuple[str, int], CompiledPolicy] = {}
_MAX_COMPILED = 1024


def cached_policy(policy_id: str, version: int) -> CompiledPolicy | None:
    """The compiled version if this process has seen it."""
    return _COMPILED.get((policy_id, version))


def compile_policy(policy_id: str, version: int, document: str | dict[str, Any]) -> CompiledPolicy:
    """Compile (and remember) a stored version; `document` as stored (JSON text) or decoded."""
    hit = _COMPILED.get((policy_id, version))
    if hit is not None:
        return hit
    compiled = CompiledPolicy(policy_id, version, orjson.loads(document) if isinstance(document, str) else document)
    if len(_COMPILED) >= _MAX_COMPILED:
        _COMPILED.clear()
    _COMPILED[(policy_id, version)] = compiled
    return compiled


def openapi_components() -> dict[str, Any]:
    """The document's schema as OpenAPI components (`PolicyDocument` and one `Policy…` per section).

    `openapi/rungate.yaml` carries exactly these (a test compares them), so the API contract, the JSON
    Schema file and the validation here cannot drift apart.
    """
    schema = PolicyDocument.model_json_schema(mode="validation", ref_template="#/components/schemas/Policy{model}")
    components = {f"Policy{name}": body for name, body in schema.pop("$defs", {}).items()}
    components["PolicyDocument"] = schema
    stored = {"id": {"type": "string", "pattern": "^pol_[0-9a-f]{26}$"},
              "version": {"type": "integer", "minimum": 1},
              "created_at": {"$ref": "#/components/schemas/Timestamp"}}
    components["PolicyVersion"] = {
        "description": "One stored version of a policy: the document as stored, with its id and version.",
        "type": "object", "additionalProperties": False,
        "required": ["id", "name", "mode", "approvals", "version", "created_at"],
        "properties": {**schema["properties"], **stored}}
    components["Policy"] = {
        "description": "A policy's current version: the document as stored, with its id and version.",
        "type": "object", "additionalProperties": False,
        "required": ["id", "name", "mode", "approvals", "version", "created_at", "updated_at"],
        "properties": {**schema["properties"], **stored, "updated_at": {"$ref": "#/components/schemas/Timestamp"}}}
    return components
