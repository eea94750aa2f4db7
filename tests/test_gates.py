"""Approval-gate rules (SPEC §4.1 `approvals`, §5): validated at apply time, evaluated fail-closed.

Every rule here goes through `parse_document` and `CompiledPolicy`, as a stored policy does, so the tests
exercise the normalised form the gates really see.
"""

from __future__ import annotations

import math
import time
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rungate.enforce.gates import MAX_SUBJECT_LENGTH, ApprovalRules, GateMatch
from rungate.enforce.policy import CompiledPolicy, InvalidPolicy, parse_document


def _document(*approvals: dict[str, Any], mode: str = "enforce") -> dict[str, Any]:
    return parse_document({"name": "gates", "mode": mode, "approvals": list(approvals)})


def _rules(*approvals: dict[str, Any], mode: str = "enforce") -> ApprovalRules:
    return CompiledPolicy("pol_g", 1, _document(*approvals, mode=mode)).approvals


def _one(op: str, value: Any = None, path: str = "$.v", *, tool: str = "issue_refund", name: str = "r",
         **rule: Any) -> dict[str, Any]:
    condition: dict[str, Any] = {"path": path, "op": op}
    if value is not None or op in ("eq", "ne"):
        condition["value"] = value
    return {"name": name, "tool": tool, "when": [condition], **rule}


def _gated(condition_rule: dict[str, Any], arguments: Any, tool: str = "issue_refund") -> bool:
    return _rules(condition_rule).gate(tool, arguments) is not None


REFUND = {"name": "refund-over-500", "tool": "issue_refund",
          "when": [{"path": "$.amount_usd", "op": "gt", "value": 500}]}


# --- the documented example ----------------------------------------------------------------------------

def test_a_refund_over_the_threshold_is_gated_with_the_rules_settings() -> None:
    # Given the SPEC's rule, with a non-default expiry and hold mode
    rules = _rules({**REFUND, "expires_in": 60, "on_expiry": "approve", "mode": "hold"})
    # When the model proposes a refund of 1240 (OpenAI sends the arguments as JSON text)
    match = rules.gate("issue_refund", '{"amount_usd": 1240.0, "order": "A-1"}', "call_1")
    # Then the rule gates it and carries everything the gate record needs
    assert match == GateMatch(rule="refund-over-500", tool="issue_refund", tool_call_id="call_1",
                              args={"amount_usd": 1240.0, "order": "A-1"}, args_text=None, channel="webhook",
                              expires_in=60,
                              on_expiry="approve", mode="hold")


def test_a_small_refund_and_another_tool_pass_ungated() -> None:
    rules = _rules(REFUND)
    assert rules.gate("issue_refund", '{"amount_usd": 20}') is None
    assert rules.gate("issue_refund", {"amount_usd": 500}) is None  # gt, not gte
    assert rules.gate("lookup_order", '{"amount_usd": 9999}') is None


def test_decoded_arguments_as_anthropic_sends_them_are_read_the_same() -> None:
    rules = _rules(REFUND)
    match = rules.gate("issue_refund", {"amount_usd": 501}, "toolu_1")
    assert match is not None and match.args == {"amount_usd": 501} and match.tool_call_id == "toolu_1"


def test_no_rules_is_falsy_and_gates_nothing() -> None:
    rules = CompiledPolicy("pol_g", 1, parse_document({"name": "none"})).approvals
    assert not rules and len(rules) == 0
    assert rules.gate("issue_refund", '{"amount_usd": 10000}') is None
    assert not rules.offers_gated_tool(["issue_refund"])


# --- each op -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("op", "threshold", "value", "expected"), [
    ("gt", 500, 501, True), ("gt", 500, 500, False), ("gt", 500, 500.0001, True),
    ("gte", 500, 500, True), ("gte", 500, 499.99, False),
    ("lt", 0, -1, True), ("lt", 0, 0, False),
    ("lte", 10.5, 10.5, True), ("lte", 10.5, 10.51, False),
    ("gt", 500, "1240.50", True), ("gt", 500, " 499 ", False), ("lte", 0.1, "0.1", True),
    ("gt", 1000, "1e4", True), ("lt", 100, "-2.5E1", True),
])
def test_numeric_ops_compare_numbers_and_numeric_strings(op: str, threshold: float, value: Any,
                                                         expected: bool) -> None:
    assert _gated(_one(op, threshold), {"v": value}) is expected


@pytest.mark.parametrize("value", [{"usd": 900}, [900], True, False, None, "lots", "1,240.50", "NaN",
                                   "Infinity", "0x1f4", "", "1" * 101])
@pytest.mark.parametrize("op", ["gt", "gte", "lt", "lte"])
def test_a_present_value_that_is_not_numeric_fails_closed(op: str, value: Any) -> None:
    # Given a numeric rule and a value it cannot compare, the gate applies (it cannot tell)
    assert _gated(_one(op, 500), {"v": value})


@pytest.mark.parametrize("op", ["gt", "gte", "lt", "lte", "eq", "ne", "in", "not_in", "matches"])
def test_any_op_but_exists_does_not_hold_on_an_absent_path(op: str) -> None:
    value = {"in": ["x"], "not_in": ["x"], "matches": "."}.get(op, 1)
    assert not _gated(_one(op, value), {"other": 1})
    assert not _gated(_one(op, value, path="$.v.deeper[3]"), {"v": {"deeper": [0]}})


def test_exists_checks_presence_and_absence() -> None:
    present, absent = _one("exists"), _one("exists", False)
    assert _document(present)["approvals"][0]["when"][0]["value"] is True  # the default is stored explicitly
    assert _gated(present, {"v": None}) and not _gated(present, {})
    assert _gated(absent, {}) and not _gated(absent, {"v": 0})


@pytest.mark.parametrize(("expected", "value", "equal"), [
    (500, 500.0, True), (500, "500", True), (500, "500.00", True), (500, 501, False),
    (True, True, True), (True, 1, False), (1, True, False), (0, False, False),
    ("prod", "prod", True), ("prod", "Prod", False), ("500", 500, False),
    (None, None, True), (None, 0, False), (None, "", False),
    ({"a": [1, {"b": None}]}, {"a": [1.0, {"b": None}]}, True), ({"a": 1}, {"a": 1, "b": 2}, False),
    ([1, 2], [2, 1], False), ([True], [1], False),
])
def test_eq_is_json_equality_and_ne_its_negation(expected: Any, value: Any, equal: bool) -> None:
    assert _gated(_one("eq", expected), {"v": value}) is equal
    assert _gated(_one("ne", expected), {"v": value}) is (not equal)


def test_eq_null_survives_the_round_trip_to_the_stored_form() -> None:
    stored = _document(_one("eq", None))
    assert stored["approvals"][0]["when"][0] == {"path": "$.v", "op": "eq", "value": None}
    assert parse_document(orjson.loads(orjson.dumps(stored))) == stored
    assert _gated(_one("eq", None), {"v": None}) and not _gated(_one("eq", None), {"v": "x"})


@pytest.mark.parametrize(("value", "member"), [
    ("eu", True), ("EU", False), (1, True), (1.0, True), ("1", True), (True, False), (None, True), (2, False),
])
def test_in_and_not_in_use_the_same_equality(value: Any, member: bool) -> None:
    members = ["eu", "us", 1, None]
    assert _gated(_one("in", members), {"v": value}) is member
    assert _gated(_one("not_in", members), {"v": value}) is (not member)


@pytest.mark.parametrize(("pattern", "value", "matched"), [
    ("competitor", "mail to ceo@competitor.com", True),      # search: anywhere in the string
    ("^competitor", "mail to ceo@competitor.com", False),    # anchors work as usual
    ("(?i)^DROP\\s", "drop table users", True),
    ("^5\\d\\d$", 512, True), ("^5\\d\\d$", 5120, False), (r"^1240\.5$", 1240.5, True),
    ("^x$", "y", False),
])
def test_matches_searches_strings_and_the_json_text_of_numbers(pattern: str, value: Any, matched: bool) -> None:
    assert _gated(_one("matches", pattern), {"v": value}) is matched


@pytest.mark.parametrize("value", [True, None, ["ceo@competitor.com"], {"to": "x"}, "a" * (MAX_SUBJECT_LENGTH + 1)])
def test_matches_fails_closed_on_values_it_cannot_search(value: Any) -> None:
    # Given a pattern that would match nothing here, the gate still applies: the value cannot be judged
    assert _gated(_one("matches", "^never$"), {"v": value})


def test_a_catastrophic_pattern_times_out_and_the_gate_applies() -> None:
    # Given a pattern with exponential backtracking (the `regex` package optimises `(a+)+$` itself)
    rules = _rules(_one("matches", "(a|a)+$"))
    start = time.monotonic()
    # When an argument makes it backtrack
    match = rules.gate("issue_refund", {"v": "a" * 60 + "b"})
    # Then the search gives up within its timeout and the gate applies (fail closed)
    assert match is not None and match.rule == "r"
    assert time.monotonic() - start < 0.5


def test_many_slow_patterns_share_one_time_budget_per_call() -> None:
    # Given 20 rules that each time out on a pattern and then fail on a second condition, and a catch-all
    slow = [{"name": f"slow-{i}", "tool": "issue_refund", "when": [
        {"path": "$.v", "op": "matches", "value": "(a|aa)+$"}, {"path": "$.never", "op": "exists"}]}
        for i in range(20)]
    rules = _rules(*slow, {"name": "catch-all", "tool": "issue_refund"})
    start = time.monotonic()
    match = rules.gate("issue_refund", {"v": "a" * 60 + "b"})
    # Then the call ends well before 20 timeouts (1 s) would, and still reaches the catch-all
    assert match is not None and match.rule == "catch-all"
    assert time.monotonic() - start < 0.6


def test_a_path_walks_keys_and_indices_and_dollar_is_the_whole_object() -> None:
    rule = _one("eq", "SKU-9", path="$.items[1].sku")
    assert _gated(rule, {"items": [{"sku": "SKU-1"}, {"sku": "SKU-9"}]})
    assert not _gated(rule, {"items": [{"sku": "SKU-9"}]})           # index out of range: absent
    assert not _gated(rule, {"items": {"1": {"sku": "SKU-9"}}})      # an index is not a key
    assert not _gated(rule, {"items": "SKU-9"})                      # a string is not a list
    assert _gated(_one("eq", {}, path="$"), "{}")


def test_all_conditions_must_hold() -> None:
    rules = _rules({"name": "big-eu", "tool": "issue_refund", "when": [
        {"path": "$.amount_usd", "op": "gte", "value": 100}, {"path": "$.region", "op": "in", "value": ["eu"]}]})
    assert rules.gate("issue_refund", {"amount_usd": 100, "region": "eu"}) is not None
    assert rules.gate("issue_refund", {"amount_usd": 100, "region": "us"}) is None
    assert rules.gate("issue_refund", {"amount_usd": 99, "region": "eu"}) is None


# --- arguments the gate cannot read ----------------------------------------------------------------------

@pytest.mark.parametrize("arguments", ['{"amount_usd": 12', "amount_usd=9000", "NaN", '{"a": 1} trailing',
                                       '"{\\"amount_usd\\": 9000}"', "[9000]", "9000", "null"])
def test_unreadable_arguments_gate_every_rule_for_the_tool(arguments: str) -> None:
    # Given a threshold rule, and arguments that are broken or not a JSON object (a double-encoded string too)
    match = _rules(REFUND).gate("issue_refund", arguments)
    # Then the rule applies anyway: a gate it cannot evaluate is a gate that holds
    assert match is not None and match.rule == "refund-over-500"
    assert match.args == (None if arguments in ('{"amount_usd": 12', "amount_usd=9000", "NaN", '{"a": 1} trailing')
                          else orjson.loads(arguments))
    assert _rules(REFUND).gate("lookup_order", arguments) is None  # only for the rule's tool


@pytest.mark.parametrize("arguments", ["", "  \n", None])
def test_empty_arguments_are_an_empty_object(arguments: str | None) -> None:
    assert _rules(REFUND).gate("issue_refund", arguments) is None
    match = _rules({"name": "always", "tool": "issue_refund"}).gate("issue_refund", arguments)
    assert match is not None and match.args == {}


def test_a_rule_without_conditions_gates_every_call_of_its_tool() -> None:
    rules = _rules({"name": "any-delete", "tool": "delete_*"})
    assert rules.gate("delete_user", '{"id": 1}') is not None
    assert rules.gate("delete_user", "{broken") is not None
    assert rules.gate("create_user", "{}") is None


# --- tool names, order and mode --------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["issue_refund", "Issue_Refund", "ISSUE-REFUND", "issue.refund", "issueRefund",
                                      " issue refund ", "mcp__billing__issue_refund", "billing/issue_refund",
                                      "billing:Issue-Refund"])
def test_tool_spelling_variants_are_gated(spelling: str) -> None:
    rules = _rules(REFUND)
    assert rules.gate(spelling, {"amount_usd": 900}) is not None
    assert rules.offers_gated_tool(["search", spelling])


def test_globs_and_offered_tools() -> None:
    rules = _rules({"name": "deletes", "tool": "delete_*"}, {**REFUND, "tool": "issue-refund"})
    assert rules.offers_gated_tool(["Delete-Records"]) and rules.offers_gated_tool(["mcp__crm__delete_all"])
    assert rules.offers_gated_tool(["IssueRefund"])
    assert not rules.offers_gated_tool(["search", "undelete", "refund"]) and not rules.offers_gated_tool([])
    match = rules.gate("DELETE_records", "{}")
    assert match is not None and match.rule == "deletes"


def test_the_first_matching_rule_in_document_order_wins() -> None:
    huge = {"path": "$.amount_usd", "op": "gt", "value": 10000}
    rules = _rules({"name": "huge", "tool": "issue_refund", "when": [huge], "expires_in": 600},
                   {**REFUND, "expires_in": 60}, {"name": "any-refund", "tool": "issue_*"})
    assert (rules.gate("issue_refund", {"amount_usd": 20000}) or _fail()).rule == "huge"
    assert (rules.gate("issue_refund", {"amount_usd": 600}) or _fail()).expires_in == 60
    assert (rules.gate("issue_refund", {"amount_usd": 6}) or _fail()).rule == "any-refund"


def _fail() -> GateMatch:
    raise AssertionError("expected a gate")


def test_shadow_mode_comes_from_the_rule_or_the_whole_policy() -> None:
    assert (_rules({**REFUND, "mode": "shadow"}).gate("issue_refund", {"amount_usd": 900}) or _fail()).mode == "shadow"
    assert (_rules({**REFUND, "mode": "hold"}, mode="shadow").gate("issue_refund", {"amount_usd": 900})
            or _fail()).mode == "shadow"
    assert (_rules(REFUND).gate("issue_refund", {"amount_usd": 900}) or _fail()).mode == "202"


def test_a_valid_document_round_trips_unchanged() -> None:
    raw = {"name": "rt", "approvals": [
        {**REFUND, "when": [{"path": "$.amount_usd", "op": "gt", "value": 500.5},
                            {"path": "$.note", "op": "matches", "value": "(?i)urgent"},
                            {"path": "$.ids[0]", "op": "not_in", "value": [1, "two", None, False]},
                            {"path": "$.meta", "op": "ne", "value": {"k": [1, None]}},
                            {"path": "$.x", "op": "exists", "value": False}]}]}
    stored = parse_document(raw)
    again = parse_document(orjson.loads(orjson.dumps(stored)))
    assert again == stored and stored["approvals"][0]["when"] == raw["approvals"][0]["when"]
    compiled = CompiledPolicy("pol_rt", 1, orjson.loads(orjson.dumps(stored)))
    args = {"amount_usd": 501, "note": "URGENT!", "ids": [3], "meta": {}}
    assert (compiled.approvals.gate("issue_refund", args) or _fail()).rule == "refund-over-500"
    assert compiled.approvals.gate("issue_refund", {**args, "x": 1}) is None


# --- validation ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("condition", "where", "reason"), [
    ({"path": "$.a", "op": "gt", "value": "500"}, ".value", "must be a number for op gt"),
    ({"path": "$.a", "op": "lte", "value": True}, ".value", "must be a number for op lte"),
    ({"path": "$.a", "op": "gte"}, "", "`value` is required for op gte"),
    ({"path": "$.a", "op": "lt", "value": math.inf}, ".value", "must be a number for op lt"),
    ({"path": "$.a", "op": "eq"}, "", "`value` is required for op eq"),
    ({"path": "$.a", "op": "eq", "value": math.nan}, ".value", "must be a JSON value"),
    ({"path": "$.a", "op": "ne", "value": 2**64}, ".value", "must be a JSON value"),
    ({"path": "$.a", "op": "in", "value": []}, ".value", "non-empty list"),
    ({"path": "$.a", "op": "in", "value": "eu"}, ".value", "non-empty list"),
    ({"path": "$.a", "op": "not_in", "value": [["nested"]]}, ".value", "strings, numbers, booleans or nulls"),
    ({"path": "$.a", "op": "in", "value": list(range(1001))}, ".value", "at most 1000"),
    ({"path": "$.a", "op": "matches", "value": "("}, ".value", "is not a valid regular expression"),
    ({"path": "$.a", "op": "matches", "value": 5}, ".value", "a string"),
    ({"path": "$.a", "op": "matches", "value": "a" * 201}, ".value", "at most 200 characters"),
    ({"path": "$.a", "op": "matches", "value": "a{99999999999}"}, ".value", "is not a valid regular expression"),
    ({"path": "$.a", "op": "exists", "value": "yes"}, ".value", "must be true or false"),
    ({"path": "amount", "op": "exists"}, ".path", "must be a path such as $.amount_usd"),
    ({"path": "$.a[x]", "op": "exists"}, ".path", "must be a path such as $.amount_usd"),
    ({"path": "$[١]", "op": "exists"}, ".path", "must be a path such as $.amount_usd"),
    ({"path": "$" + ".a" * 33, "op": "exists"}, ".path", "at most 32 segments"),
    ({"path": "$." + "a" * 200, "op": "exists"}, ".path", "at most 200 characters"),
    ({"path": "$.a", "op": "contains", "value": 1}, ".op", "Input should be"),
    ({"path": "$.a", "op": "eq", "value": 1, "extra": 1}, ".extra", "unknown key"),
])
def test_a_bad_condition_is_refused_with_its_path_and_reason(condition: dict[str, Any], where: str,
                                                             reason: str) -> None:
    # Given a rule whose second condition is bad (the first is fine)
    raw = {"name": "bad", "approvals": [{"name": "r", "tool": "t",
                                         "when": [{"path": "$.ok", "op": "exists"}, condition]}]}
    # When it is applied, Then it is refused naming exactly that condition
    with pytest.raises(InvalidPolicy) as refused:
        parse_document(raw)
    assert [p["path"] for p in refused.value.problems] == [f"approvals[0].when[1]{where}"]
    assert reason in refused.value.problems[0]["reason"]


def test_a_yaml_date_is_not_a_json_value() -> None:
    import datetime

    with pytest.raises(InvalidPolicy) as refused:
        parse_document({"name": "bad", "approvals": [_one("eq", datetime.date(2024, 1, 1))]})
    assert refused.value.problems == [{"path": "approvals[0].when[0].value",
                                       "reason": refused.value.problems[0]["reason"]}]
    assert "JSON value" in refused.value.problems[0]["reason"]


# --- properties ------------------------------------------------------------------------------------------

JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text())
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(), inner, max_size=4), max_leaves=20)
NUMBERS = st.integers(-(10**12), 10**12) | st.floats(-1e12, 1e12, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(value=NUMBERS, threshold=NUMBERS, as_text=st.booleans(), other=st.dictionaries(st.text(), JSON, max_size=3))
def test_gt_and_lte_partition_present_numbers(value: float, threshold: float, as_text: bool,
                                              other: dict[str, Any]) -> None:
    # Given random arguments with a number (or its text) at $.amount, and a random threshold
    args = {**other, "amount": repr(value) if as_text else value}
    greater = _rules(_one("gt", threshold, path="$.amount")).gate("issue_refund", orjson.dumps(args).decode())
    at_most = _rules(_one("lte", threshold, path="$.amount")).gate("issue_refund", args)
    # Then exactly one of gt / lte holds, and gt holds exactly when the number is greater
    assert (greater is None) != (at_most is None)
    assert (greater is not None) == (value > threshold)


@settings(max_examples=300, deadline=None)
@given(words=st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6), min_size=1,
                      max_size=4),
       separators=st.lists(st.sampled_from(["-", "_", ".", " ", "_-"]), min_size=3, max_size=3),
       upper=st.lists(st.booleans(), max_size=30), prefix=st.sampled_from(["", "mcp__srv__", "srv/", "srv:"]),
       arguments=JSON)
@example(words=["x", "x"], separators=["-", "-", "-"], upper=[], prefix="", arguments=None)  # found by CI
def test_a_spelling_variant_never_escapes_a_gate(words: list[str], separators: list[str], upper: list[bool],
                                                 prefix: str, arguments: Any) -> None:
    canonical = "_".join(words)
    variant = "".join(w + (separators[i] if i < len(words) - 1 else "") for i, w in enumerate(words))
    variant = prefix + "".join(c.upper() if i < len(upper) and upper[i] else c for i, c in enumerate(variant))
    rules = _rules({"name": "g", "tool": canonical})
    assert rules.offers_gated_tool([variant])
    assert (rules.gate(variant, orjson.dumps(arguments).decode()) or _fail()).rule == "g"
    assert rules.gate(variant + other_letter(canonical), "{}") is None  # a longer last word: another tool


def other_letter(canonical: str) -> str:
    """A letter that, appended to a spelling of `canonical`, makes another tool: "x", unless the name is only
    x's (`x_x` is also `xx`, which is the last word of `x-x` + "x": that name is `xx` behind an `x` prefix)."""
    return "y" if set(canonical.replace("_", "")) == {"x"} else "x"


ALL_OPS = _rules({"name": "every-op", "tool": "t", "when": [
    {"path": "$.a", "op": "eq", "value": 1}, {"path": "$.b[0]", "op": "ne", "value": None},
    {"path": "$.c", "op": "gt", "value": 0}, {"path": "$.c", "op": "lte", "value": 10.5},
    {"path": "$.d", "op": "in", "value": ["x", 1]}, {"path": "$.e", "op": "not_in", "value": [True]},
    {"path": "$.f.g", "op": "matches", "value": "^[a-z]+$"}, {"path": "$.h", "op": "exists", "value": False}]},
    {"name": "fallback", "tool": "t", "when": [{"path": "$", "op": "exists"}]})


@settings(max_examples=500, deadline=None)
@given(arguments=st.text() | JSON.map(lambda v: orjson.dumps(v).decode()) | JSON
       | st.dictionaries(st.sampled_from("abcdefgh"), JSON, max_size=8))
def test_gate_never_raises_and_always_answers_for_the_tool(arguments: Any) -> None:
    # Given every op at once and a fallback rule on `$`, any arguments at all get an answer, never an exception
    match = ALL_OPS.gate("t", arguments)
    assert match is not None and match.rule in ("every-op", "fallback")
    assert ALL_OPS.gate("other", arguments) is None


def test_a_shadow_rule_never_hides_an_enforced_rule_after_it() -> None:
    rules = ApprovalRules([{"name": "watch", "tool": "issue_refund", "mode": "shadow"},
                           {"name": "refund-over-500", "tool": "issue_refund",
                            "when": [{"path": "$.amount_usd", "op": "gt", "value": 500}]}])
    big = rules.gate("issue_refund", '{"amount_usd": 100000}')
    assert big is not None and (big.rule, big.mode) == ("refund-over-500", "202")
    small = rules.gate("issue_refund", '{"amount_usd": 5}')
    assert small is not None and (small.rule, small.mode) == ("watch", "shadow")


def test_unreadable_arguments_are_kept_as_text_for_the_approver() -> None:
    rules = ApprovalRules([{"name": "refund-over-500", "tool": "issue_refund",
                            "when": [{"path": "$.amount_usd", "op": "gt", "value": 500}]}])
    match = rules.gate("issue_refund", '{"amount_usd": 9000,')
    assert match is not None and match.args is None and match.args_text == '{"amount_usd": 9000,'


def test_custom_tool_calls_are_read_and_gated_fail_closed() -> None:
    from rungate.enforce.tools import offered_tools
    from rungate.providers.metering import (
        ChatStreamMeter,
        ResponsesStreamMeter,
        tool_calls_from_chat,
        tool_calls_from_responses,
    )
    from rungate.providers.sse import SSEParser

    rules = ApprovalRules([{"name": "refund-over-500", "tool": "issue_refund",
                            "when": [{"path": "$.amount_usd", "op": "gt", "value": 500}]}])
    # Given custom tools (free-form input, not JSON arguments), offered and called in chat and Responses
    assert offered_tools({"tools": [{"type": "custom", "custom": {"name": "issue_refund"}}]}) == ("issue_refund",)
    chat = {"choices": [{"message": {"tool_calls": [
        {"id": "call_c", "type": "custom", "custom": {"name": "issue_refund", "input": "refund 9000 USD"}}]}}]}
    responses = {"output": [{"type": "custom_tool_call", "call_id": "call_r", "name": "issue_refund",
                             "input": "refund 9000 USD"}]}
    stream = (b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_s","type":"custom",'
              b'"custom":{"name":"issue_refund","input":"refund "}}]}}]}\n\n'
              b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"custom":{"input":"9000"}}]}}]}\n\n'
              b"data: [DONE]\n\n")
    meter = ChatStreamMeter(False)
    for event in SSEParser().feed(stream):
        meter.feed(event)
    responses_meter = ResponsesStreamMeter()
    for event in SSEParser().feed(b'event: response.output_item.done\ndata: {"type":"response.output_item.done",'
                                  b'"output_index":0,"item":{"type":"custom_tool_call","id":"ctc_1",'
                                  b'"call_id":"call_t","name":"issue_refund","input":"refund 9000"}}\n\n'):
        responses_meter.feed(event)
    calls = [*tool_calls_from_chat(chat), *tool_calls_from_responses(responses), *meter.tool_calls,
             *responses_meter.tool_calls]
    # Then each is read, and gated: its input cannot be judged by the rule's conditions, so the rule applies
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        ("call_c", "issue_refund", "refund 9000 USD"), ("call_r", "issue_refund", "refund 9000 USD"),
        ("call_s", "issue_refund", "refund 9000"), ("call_t", "issue_refund", "refund 9000")]
    assert all(rules.gate(c.name, c.arguments, c.id) is not None for c in calls)
    assert meter.tool_names == ("issue_refund",)
