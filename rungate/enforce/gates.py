"""Approval gates (SPEC §5): which proposed tool calls wait for a human, decided from a policy's `approvals`.

Pure: no I/O and no state between calls (the only clock read bounds regex matching). A gate is a security
control, so every doubt resolves towards gating: arguments that cannot be read, a value a comparison cannot
judge and a regex that runs out of time all make the rule apply. Tool names are compared canonically here,
for approval rules and `tools.blocked` alike, so a spelling variant escapes neither.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import operator
import re
import time
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

import orjson
import regex

MAX_PATH_LENGTH: Final = 200
MAX_PATH_SEGMENTS: Final = 32
MAX_PATTERN_LENGTH: Final = 200
MAX_SUBJECT_LENGTH: Final = 65536   # longer strings are not matched at all: the condition holds
REGEX_TIMEOUT_S: Final = 0.05       # per search
REGEX_BUDGET_S: Final = 0.25        # per `gate()` call, so many slow patterns cannot add up

# --- tool names -----------------------------------------------------------------------------------------

# Between the words of a tool name: whitespace, `-`, `_`, `.`, and the `/` and `:` that MCP clients put between a
# server's name and its tool's (`mcp__github__create_issue`, `mcp_github_create_issue`, `github/create_issue`).
_SEPARATORS = re.compile(r"[\s\-_./:]+")


@functools.lru_cache(maxsize=4096)
def _tool_words(name: str) -> tuple[str, ...]:
    """The words of a tool name, compatibility-normalized (NFKC: fullwidth and other look-alike forms of ASCII
    letters become those letters), with invisible format characters (zero-width spaces, joiners, direction
    marks) removed, and case-folded."""
    text = unicodedata.normalize("NFKC", name)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return tuple(word for word in _SEPARATORS.split(text.casefold()) if word)


def canonical_tool(name: str) -> str:
    """A tool name reduced so variant spellings compare equal: compatibility forms, invisible characters,
    case, surrounding space and separators (`-`, `_`, `.`, `/`, `:`, spaces) ignored."""
    return "".join(_tool_words(name))


@functools.lru_cache(maxsize=4096)
def _tool_endings(name: str) -> tuple[str, ...]:
    """The canonical forms of `name` and of every ending of it that starts at a word: what a pattern is
    compared with, so that a server prefix of any shape (`mcp__srv__`, `mcp_srv_`, `srv.`, `a/b/`) cannot hide
    a blocked tool. `mcp_srv_shell_exec` → (`exec`, `shellexec`, `srvshellexec`, `mcpsrvshellexec`)."""
    words = _tool_words(name)
    return tuple("".join(words[i:]) for i in range(len(words) - 1, -1, -1))


class ToolMatcher:
    """Tool name patterns (names or globs such as `delete_*`) compared on canonical names.

    A name matches a pattern when the name, or an ending of it that starts at a word, equals the pattern
    canonically: `shell_exec` blocks `Shell-Exec`, `mcp__box__shell_exec` and `box/shell_exec`, not
    `myshell_exec`. (So a one-word pattern such as `exec` blocks every tool whose last word is `exec`.)
    One matcher for `tools.blocked` and approval rules; `blocked` is the name the blocking rule reads.
    """

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = list(patterns)
        self._exact = {canonical_tool(p) for p in patterns if not any(c in p for c in "*?[")}
        globs = [canonical_tool(p.replace("*", "\x00").replace("?", "\x01")).replace("\x00", "*").replace(
            "\x01", "?") for p in patterns if any(c in p for c in "*?[")]
        self._regex = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs)) if globs else None

    def matches(self, tool: str) -> bool:
        """Whether `tool`, as an agent or model spelled it, matches any pattern."""
        endings = _tool_endings(tool)
        if any(ending in self._exact for ending in endings):
            return True
        regex = self._regex
        return regex is not None and any(regex.match(ending) for ending in endings)

    blocked = matches


# --- paths, patterns and values (validation in policy.py uses the same functions) ------------------------

_SEGMENT = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[([0-9]+)\]")  # JSON Schema's \d: ASCII digits only
_NUMERIC_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?")


def parse_path(path: str) -> tuple[str | int, ...]:
    """`$.a.b[0]` as its steps (`("a", "b", 0)`); `$` alone is the whole arguments object.

    Raises `ValueError` for anything else (the policy's pattern admits only these forms)."""
    if len(path) > MAX_PATH_LENGTH:
        raise ValueError(f"must be at most {MAX_PATH_LENGTH} characters")
    if not path.startswith("$"):
        raise ValueError("must be a path such as $.amount_usd or $.items[0].sku")
    steps: list[str | int] = []
    pos = 1
    while pos < len(path):
        step = _SEGMENT.match(path, pos)
        if step is None:
            raise ValueError("must be a path such as $.amount_usd or $.items[0].sku")
        steps.append(step.group(1) if step.group(1) is not None else int(step.group(2)))
        pos = step.end()
    if len(steps) > MAX_PATH_SEGMENTS:
        raise ValueError(f"may have at most {MAX_PATH_SEGMENTS} segments")
    return tuple(steps)


def compile_pattern(pattern: str) -> regex.Pattern[str]:
    """A `matches` pattern compiled with the `regex` package (which can time out); `ValueError` if it is too
    long or does not compile."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(f"must be a regular expression of at most {MAX_PATTERN_LENGTH} characters")
    try:
        return regex.compile(pattern)
    except (regex.error, OverflowError, RecursionError) as exc:
        raise ValueError(f"is not a valid regular expression: {exc}") from None


def is_number(value: Any) -> bool:
    """A JSON number: an int or a finite float, never a bool."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float)
                                                                        and math.isfinite(value))


def as_number(value: Any) -> Decimal | None:
    """A number or numeric string (`"1240.50"`) as a Decimal; None for anything else (NaN/inf included).

    Floats convert through their shortest repr, so `0.1` from JSON and `"0.1"` are the same number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value)) if math.isfinite(value) else None
    if isinstance(value, str) and len(value) <= 100 and _NUMERIC_TEXT.fullmatch(value.strip()):
        return Decimal(value.strip())
    return None


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality: numbers compare numerically (`500 == 500.0`), booleans are not numbers
    (`true != 1`), objects and arrays compare member by member."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if is_number(a) and is_number(b):
        return bool(a == b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    return a is None and b is None


# --- the rules ------------------------------------------------------------------------------------------

_ABSENT: Final = object()
_OPS: Final = frozenset({"eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "matches", "exists"})
_COMPARE: Final = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}


@dataclass(frozen=True, slots=True)
class GateMatch:
    """A tool call one approval rule gates."""

    rule: str                  # the approval rule's name
    tool: str                  # the tool name as the model/agent called it
    tool_call_id: str | None
    args: Any                  # the parsed arguments (usually a dict); None when they could not be parsed
    args_text: str | None      # the arguments as sent, when they could not be parsed (for the approver to see)
    channel: str
    expires_in: int
    on_expiry: str             # "reject" | "approve"
    mode: str                  # "202" | "hold" | "shadow" (shadow when the rule or the whole policy is)


class _Deadline:
    """What is left of one `gate()` call's regex budget."""

    __slots__ = ("_end",)

    def __init__(self) -> None:
        self._end = time.monotonic() + REGEX_BUDGET_S

    def timeout(self) -> float:
        return min(REGEX_TIMEOUT_S, self._end - time.monotonic())


class _Condition:
    """One compiled `when` entry.

    Contract of `holds`, for a security control:
    - `exists` holds when the path is present (`value: true`) or absent (`value: false`);
    - any other op on an absent path does not hold: a refund without an amount is not "amount > 500";
    - `gt gte lt lte` compare numbers and numeric strings; a present value that is neither (object, array,
      bool, null, other text) holds, because the gate cannot tell;
    - `eq ne in not_in` use `json_equal`; a numeric string equals the number it spells when the rule's
      value is a number; `ne`/`not_in` are the negations of `eq`/`in` on a present value;
    - `matches` searches anywhere in a string (`regex.search`; anchor with `^...$`), numbers as their
      JSON text; any other value, a string over 65536 characters or a search that times out holds.
    """

    __slots__ = ("op", "steps", "value", "number", "pattern")

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.op: str = raw["op"]
        if self.op not in _OPS:
            raise ValueError(f"unknown op {self.op!r}")
        self.steps = parse_path(raw["path"])
        value: Any = raw.get("value")
        self.value: Any = (True if value is None else bool(value)) if self.op == "exists" else value
        self.number = as_number(value) if self.op in _COMPARE else None
        if self.op in _COMPARE and self.number is None:
            raise ValueError(f"{self.op} needs a number, not {value!r}")
        self.pattern = compile_pattern(value) if self.op == "matches" else None

    def _resolve(self, args: Any) -> Any:
        node = args
        for step in self.steps:
            if isinstance(step, str):
                if not isinstance(node, Mapping) or step not in node:
                    return _ABSENT
                node = node[step]
            elif isinstance(node, list | tuple) and step < len(node):
                node = node[step]
            else:
                return _ABSENT
        return node

    def holds(self, args: Any, deadline: _Deadline) -> bool:
        subject = self._resolve(args)
        if self.op == "exists":
            return (subject is not _ABSENT) is self.value
        if subject is _ABSENT:
            return False
        if self.number is not None:
            number = as_number(subject)
            if number is None:
                return True
            return bool(_COMPARE[self.op](number, self.number))
        if self.op in ("eq", "ne"):
            return _same(subject, self.value) is (self.op == "eq")
        if self.op in ("in", "not_in"):
            return any(_same(subject, v) for v in self.value) is (self.op == "in")
        return self._matches(subject, deadline)

    def _matches(self, subject: Any, deadline: _Deadline) -> bool:
        if self.pattern is None or not (isinstance(subject, str) or is_number(subject)):
            return True  # null, booleans, objects and arrays: nothing to search, so the gate applies
        text = subject if isinstance(subject, str) else (str(subject) if isinstance(subject, int)
                                                         else orjson.dumps(subject).decode())
        timeout = deadline.timeout()
        if len(text) > MAX_SUBJECT_LENGTH or timeout <= 0:
            return True
        try:
            return self.pattern.search(text, timeout=timeout) is not None
        except TimeoutError:
            return True


def _same(subject: Any, expected: Any) -> bool:
    if is_number(expected) and isinstance(subject, str):
        number = as_number(subject)
        return number is not None and number == as_number(expected)
    return json_equal(subject, expected)


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    tools: ToolMatcher
    when: tuple[_Condition, ...]
    channel: str
    expires_in: int
    on_expiry: str
    mode: str


def _decode(arguments: Any) -> tuple[Any, bool]:
    """(the arguments, whether conditions can read them): readable means a JSON object."""
    if arguments is None:
        return {}, True
    if isinstance(arguments, str | bytes | bytearray):
        if not arguments.strip():
            return {}, True
        try:
            arguments = orjson.loads(arguments)
        except ValueError:
            return None, False
    return arguments, isinstance(arguments, Mapping)


class ApprovalRules:
    """The approval rules of one policy version, compiled once.

    `approvals` is the policy's `approvals` list in its normalised form (as `parse_document` stores it);
    malformed entries raise `KeyError`/`ValueError` here, at compile time, never while gating.
    """

    def __init__(self, approvals: Sequence[Mapping[str, Any]], policy_mode: str = "enforce") -> None:
        self._rules = tuple(_Rule(
            name=a["name"], tools=ToolMatcher([a["tool"]]),
            when=tuple(_Condition(c) for c in a.get("when", ())),
            channel=a.get("channel", "webhook"), expires_in=int(a.get("expires_in", 3600)),
            on_expiry=a.get("on_expiry", "reject"),
            mode="shadow" if policy_mode == "shadow" else a.get("mode", "202")) for a in approvals)
        self._any_tool = ToolMatcher([a["tool"] for a in approvals])

    def __bool__(self) -> bool:
        """Whether there are any rules at all."""
        return bool(self._rules)

    def __len__(self) -> int:
        return len(self._rules)

    def offers_gated_tool(self, tools: Sequence[str]) -> bool:
        """Whether any rule's tool pattern matches one of these offered tool names (so the answer must be
        held until its tool calls are known)."""
        return any(self._any_tool.matches(tool) for tool in tools)

    def enforces(self, tool: str) -> bool:
        """Whether a rule that is not in shadow mode may gate calls of this tool (whatever their arguments)."""
        return any(rule.mode != "shadow" and rule.tools.matches(tool) for rule in self._rules)

    def gate(self, tool: str, arguments: str | Mapping[str, Any] | None,
             tool_call_id: str | None = None) -> GateMatch | None:
        """The first rule, in document order, that gates this tool call — the first enforced one, else the
        first shadow one (a shadow rule never hides an enforced rule after it); None when no rule does.

        `arguments` as the model sent them: JSON text (OpenAI `function.arguments`; empty or blank text is
        `{}`) or a decoded object (Anthropic `input`); None is `{}`. A rule gates when its tool pattern
        matches and every `when` condition holds (see `_Condition`), or when the arguments are unreadable:
        broken JSON (`args` None) or not a JSON object. Never raises for any arguments.
        """
        rules = [rule for rule in self._rules if rule.tools.matches(tool)]
        if not rules:
            return None
        args, readable = _decode(arguments)
        text = None if readable else (arguments.decode(errors="replace") if isinstance(arguments, bytes | bytearray)
                                      else arguments if isinstance(arguments, str) else None)
        deadline = _Deadline()
        shadowed: _Rule | None = None
        for rule in rules:
            if shadowed is not None and rule.mode == "shadow":
                continue
            if readable and not all(condition.holds(args, deadline) for condition in rule.when):
                continue
            if rule.mode != "shadow":  # an enforced rule wins over any shadow rule before it
                return self._match(rule, tool, tool_call_id, args, text)
            shadowed = rule
        return None if shadowed is None else self._match(shadowed, tool, tool_call_id, args, text)

    @staticmethod
    def _match(rule: _Rule, tool: str, tool_call_id: str | None, args: Any, text: str | None) -> GateMatch:
        return GateMatch(rule=rule.name, tool=tool, tool_call_id=tool_call_id, args=args, args_text=text,
                         channel=rule.channel, expires_in=rule.expires_in, on_expiry=rule.on_expiry, mode=rule.mode)
