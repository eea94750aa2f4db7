"""`openapi/rungate.yaml` is the single source of truth: it is valid, complete, served, and the server's
answers match it (driven end to end against the built-in mock provider)."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from jsonschema import Draft202012Validator

from rungate.config import Settings, load_settings
from rungate.openapi import load_spec
from rungate.proxy.app import create_app
from rungate.proxy.keys import STORE
from tests.openapi_check import (
    HTTP_METHODS,
    documented_routes,
    resolve_pointer,
    validate_headers,
    validate_response,
    validate_schema,
)

ADMIN_TOKEN = "rg_adm_" + "x" * 32
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT_BODY = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
MONEY_PATTERN = r"^-?[0-9]+(\.[0-9]+)?$"
STRICT = ("Run", "Step", "Agent", "AgentWithToken", "ProviderKey", "EventLine", "Health", "Ledger",
          "LedgerEntry", "StreamTrailer")


# --- the document itself ----------------------------------------------------------------------------

def _walk(node: Any, path: str = "") -> Any:
    """Yield (json pointer, node) for every dict in the document."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}/{i}")


def _operations() -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    return [(method.upper(), path, op, item) for path, item in load_spec()["paths"].items()
            for method, op in item.items() if method in HTTP_METHODS]


def test_document_is_openapi_3_1_with_info_and_security_schemes() -> None:
    spec = load_spec()
    assert spec["openapi"].startswith("3.1.")
    assert spec["jsonSchemaDialect"] == "https://json-schema.org/draft/2020-12/schema"
    assert spec["info"]["version"] == "0.1.0"
    assert spec["info"]["license"]["identifier"] == "Apache-2.0"
    schemes = spec["components"]["securitySchemes"]
    assert schemes["agentToken"] == {**schemes["agentToken"], "type": "http", "scheme": "bearer"}
    assert schemes["agentApiKey"] == {**schemes["agentApiKey"], "type": "apiKey", "in": "header", "name": "x-api-key"}
    assert schemes["adminToken"] == {**schemes["adminToken"], "type": "http", "scheme": "bearer"}
    # The YAML must load to plain JSON values, or /openapi.json would differ from the file.
    assert json.loads(json.dumps(spec)) == spec


def test_every_ref_resolves() -> None:
    refs = [(where, node["$ref"]) for where, node in _walk(load_spec()) if "$ref" in node]
    assert len(refs) > 100
    for where, ref in refs:
        assert isinstance(ref, str) and ref.startswith("#/"), f"{where}: non-local $ref {ref!r}"
        target = resolve_pointer(ref)
        assert isinstance(target, dict), f"{where}: $ref {ref} points at a non-object"


def test_every_schema_is_valid_json_schema_2020_12() -> None:
    spec = load_spec()
    checked = 0
    for name, schema in spec["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)
        checked += 1
        assert "description" in schema or "type" in schema or "oneOf" in schema, name
    for _where, node in _walk(spec["paths"]):
        if isinstance(node.get("schema"), dict):
            Draft202012Validator.check_schema(node["schema"])
            checked += 1
    for section in ("parameters", "headers"):
        for obj in spec["components"][section].values():
            Draft202012Validator.check_schema(obj["schema"])
            checked += 1
    assert checked > 80


def test_operations_are_well_formed() -> None:
    ids = [op["operationId"] for _, _, op, _ in _operations()]
    assert len(ids) == len(set(ids)), "operationIds must be unique"
    for method, path, op, item in _operations():
        label = f"{method} {path}"
        assert op.get("summary"), f"{label}: summary"
        assert op.get("responses"), f"{label}: responses"
        assert any(code.startswith("2") for code in op["responses"]), f"{label}: no success response"
        for code in op["responses"]:
            assert code == "default" or re.fullmatch(r"[1-5][0-9]{2}", code), f"{label}: status key {code!r}"
        # Path parameters: each {name} in the template is declared, required, in: path; nothing else is.
        params = [resolve_pointer(p["$ref"]) if "$ref" in p else p
                  for p in item.get("parameters", []) + op.get("parameters", [])]
        declared = {p["name"] for p in params if p["in"] == "path"}
        assert declared == set(re.findall(r"{(\w+)}", path)), f"{label}: path parameters {declared}"
        assert all(p["required"] is True for p in params if p["in"] == "path"), label
        # Security: admin under /api, agent token on /v1, none elsewhere.
        if path.startswith("/api/"):
            assert op["security"] == [{"adminToken": []}], label
        elif path.startswith("/v1/"):
            assert op["security"] == [{"agentToken": []}, {"agentApiKey": []}], label
        else:
            assert op["security"] == [], label
        # Admin errors use AdminError; proxy errors use the proxy envelopes.
        for code, response in op["responses"].items():
            if code.startswith("2"):
                continue
            text = json.dumps(response)
            if path.startswith("/api/"):
                assert "AdminError" in json.dumps(resolve_pointer(response["$ref"])), f"{label} {code}"
            elif path.startswith("/v1/"):
                target = json.dumps(resolve_pointer(response["$ref"])) if "$ref" in response else text
                assert re.search(r"ProxyError|GovernanceError|ProviderError", target), f"{label} {code}"


def test_proxied_answers_document_the_rungate_headers_and_the_sse_trailer() -> None:
    spec = load_spec()
    expected = {"x-rungate-run-id", "x-rungate-step-id", "x-rungate-provider", "x-rungate-model",
                "x-rungate-tokens-used", "x-rungate-cost-usd", "x-rungate-budget-remaining-usd",
                "x-rungate-budget-remaining-tokens", "x-rungate-failover", "x-rungate-warning"}
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/v1/messages", "/v1/embeddings"):
        ok = spec["paths"][path]["post"]["responses"]["200"]
        assert expected <= set(ok["headers"]), path
        if path != "/v1/embeddings":
            assert "text/event-stream" in ok["content"], path
            assert "event: rungate" in spec["paths"][path]["post"]["description"] + json.dumps(
                resolve_pointer(ok["content"]["text/event-stream"]["schema"]["$ref"])), path
    assert "event: rungate" in spec["components"]["schemas"]["EventStream"]["description"]


def test_schemas_are_strict_and_money_is_a_decimal_string() -> None:
    schemas = load_spec()["components"]["schemas"]
    for name in ("Run", "Step", "Agent", "AgentWithToken", "ProviderKey", "Ledger", "EventLine", "Health",
                 "AdminError", "GovernanceError", "ProviderError", "ProxyError", "RunList", "StepList",
                 "AgentList", "ProviderKeyList", "RunEnvelope", "AgentEnvelope", "StreamTrailer"):
        assert name in schemas, name
    for name in STRICT:
        schema = schemas[name]
        assert schema["additionalProperties"] is False, name
        assert set(schema["required"]) == set(schema["properties"]), f"{name}: every field the view emits"
    assert "token" not in schemas["Agent"]["properties"] and "api_key" not in schemas["Agent"]["properties"]
    assert {"token", "api_key"} <= set(schemas["AgentWithToken"]["required"])
    assert schemas["Money"] == {**schemas["Money"], "type": "string", "pattern": MONEY_PATTERN}
    assert schemas["NullableMoney"] == {**schemas["NullableMoney"], "type": ["string", "null"],
                                        "pattern": MONEY_PATTERN}
    for name in ("RunList", "StepList", "AgentList", "ProviderKeyList"):
        assert schemas[name]["required"] == ["data", "next"], name
        assert schemas[name]["properties"]["data"]["type"] == "array", name
    governance = schemas["GovernanceError"]["properties"]["error"]
    assert set(governance["required"]) == {"type", "code", "message", "run_id", "context", "details"}


# --- the helper refuses drift -----------------------------------------------------------------------

RUN = {"id": "r1", "agent_id": "agt_01M8DQ2ZGMFKEWX18HY781CTP7", "status": "active", "auto": False,
       "policy": None, "started_at": "2026-11-27T05:19:12.411796Z", "ended_at": None, "ended_reason": None,
       "metadata": {}, "step_count": 0, "tokens": {"input": 0, "output": 0}, "spend_usd": "0",
       "reserved_usd": "0", "unpriced_steps": 0, "budget_limit_usd": None, "budget_remaining_usd": None,
       "last_activity_at": "2026-11-27T05:19:12.411796Z"}


def test_validate_response_accepts_a_good_body_and_names_what_drifted() -> None:
    validate_response("GET", "/api/runs/{run_id}", 200, {"data": RUN})
    with pytest.raises(AssertionError, match="spend_usd"):
        validate_response("GET", "/api/runs/{run_id}", 200, {"data": {**RUN, "spend_usd": 0.5}})
    with pytest.raises(AssertionError, match="spend_usd"):
        validate_response("GET", "/api/runs/{run_id}", 200, {"data": {**RUN, "spend_usd": "1e-3"}})
    with pytest.raises(AssertionError, match="surprise"):
        validate_response("GET", "/api/runs/{run_id}", 200, {"data": {**RUN, "surprise": 1}})
    missing = {k: v for k, v in RUN.items() if k != "step_count"}
    with pytest.raises(AssertionError, match="step_count"):
        validate_response("GET", "/api/runs/{run_id}", 200, {"data": missing})
    with pytest.raises(AssertionError, match="not documented"):
        validate_response("GET", "/api/nowhere", 200, {})
    with pytest.raises(AssertionError, match="not documented"):
        validate_response("DELETE", "/api/runs/{run_id}", 200, {})
    with pytest.raises(AssertionError, match="no response for status 201"):
        validate_response("GET", "/health", 201, {})
    validate_response("GET", "/api/runs/{run_id}", 404, {"error": {"code": "not_found", "message": "x"}})
    with pytest.raises(AssertionError):
        validate_response("GET", "/api/runs/{run_id}", 404, {"error": "not found"})
    with pytest.raises(AssertionError, match="required header x-rungate-step-id"):
        validate_headers("POST", "/v1/chat/completions", 200, {"x-rungate-run-id": "r1"})


# --- the app registers exactly the documented routes, and serves the document ----------------------

@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(env={"RUNGATE_DATABASE_URL": f"sqlite:///{tmp_path}/t.db",
                              "RUNGATE_ADMIN_TOKEN": ADMIN_TOKEN, "RUNGATE_MOCK": "true"})


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings) -> TestClient[Any, Any]:
    result: TestClient[Any, Any] = await aiohttp_client(create_app(settings))
    return result


def test_registered_routes_equal_documented_routes(settings: Settings) -> None:
    app = create_app(settings)
    registered = {(route.method, route.resource.canonical) for route in app.router.routes()
                  if route.method != "HEAD" and route.resource is not None}
    assert registered - documented_routes() == set(), "routes the app serves but the document omits"
    assert documented_routes() - registered == set(), "routes the document describes but the app lacks"
    assert {("POST", "/v1/chat/completions"), ("GET", "/api/runs/{run_id}/events")} <= registered


async def test_openapi_json_is_the_yaml_document(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body == load_spec()
    validate_response("GET", "/openapi.json", 200, body)


# --- end to end against the mock provider ------------------------------------------------------------

async def _call(client: TestClient[Any, Any], method: str, template: str, status: int, *,
                params: dict[str, str] | None = None, headers: dict[str, str] | None = None,
                json_body: Any = None, data: str | None = None, query: dict[str, str] | None = None) -> Any:
    """Make the request, check the status, then the body and headers against the document."""
    path = template.format(**(params or {}))
    kwargs: dict[str, Any] = {"headers": headers or {}}
    if json_body is not None:
        kwargs["json"] = json_body
    if data is not None:
        kwargs["data"] = data
        kwargs["headers"] = {"Content-Type": "application/json", **kwargs["headers"]}
    if query is not None:
        kwargs["params"] = query
    resp = await client.request(method, path, **kwargs)
    text = await resp.text()
    assert resp.status == status, f"{method} {path}: {resp.status} {text[:500]}"
    body = json.loads(text)
    validate_response(method, template, status, body)
    validate_headers(method, template, status, resp.headers)
    return body


async def test_end_to_end_answers_match_the_document(client: TestClient[Any, Any]) -> None:
    # Given an agent and a provider key
    created = await _call(client, "POST", "/api/agents", 201, headers=ADMIN,
                          json_body={"name": "support-bot", "metadata": {"team": "cx"}})
    agent = created["data"]
    assert agent["token"] == agent["api_key"] and agent["token"].startswith("rg_agt_")
    token = agent["token"]
    key = (await _call(client, "POST", "/api/provider-keys", 201, headers=ADMIN,
                       json_body={"provider": "openai", "name": "k1", "api_key": "sk-test-123456789"}))["data"]
    assert key["hint"] == "…6789" and "api_key" not in key

    # When the agent makes a chat completion, logs a tool step and completes the run
    auth = {"Authorization": f"Bearer {token}"}
    resp = await client.post("/v1/chat/completions", json=CHAT_BODY, headers={**auth, "x-rungate-run-id": "r1"})
    assert resp.status == 200, await resp.text()
    completion = await resp.json()
    validate_response("POST", "/v1/chat/completions", 200, completion)
    validate_headers("POST", "/v1/chat/completions", 200, resp.headers)
    assert resp.headers["x-rungate-run-id"] == "r1"
    assert resp.headers["x-rungate-provider"] == "openai" and resp.headers["x-rungate-model"] == "mock-gpt"
    chat_cost = Decimal(resp.headers["x-rungate-cost-usd"])
    chat_step = resp.headers["x-rungate-step-id"]
    assert chat_cost > 0

    step = (await _call(client, "POST", "/v1/runs/{run_id}/steps", 201, params={"run_id": "r1"}, headers=auth,
                        json_body={"name": "lookup", "cost_usd": "0.01"}))["data"]
    assert (step["kind"], step["tool"], step["cost_usd"], step["run_id"]) == ("tool", "lookup", "0.01", "r1")

    run = (await _call(client, "POST", "/v1/runs/{run_id}/complete", 200, params={"run_id": "r1"},
                       headers=auth))["data"]
    assert run["status"] == "completed" and run["ended_reason"] == "agent_signaled"
    again = await _call(client, "POST", "/v1/runs/{run_id}/complete", 200, params={"run_id": "r1"}, headers=auth,
                        json_body={"ended_reason": "done twice"})
    assert again["data"] == run, "completing a closed run changes nothing"

    # A second, still active run, for the filters and pagination
    resp = await client.post("/v1/chat/completions", json=CHAT_BODY, headers={**auth, "x-rungate-run-id": "r2"})
    assert resp.status == 200

    # Then every admin answer matches the document: agents
    listed = await _call(client, "GET", "/api/agents", 200, headers=ADMIN)
    assert [a["id"] for a in listed["data"]] == [agent["id"]] and listed["next"] is None
    got = (await _call(client, "GET", "/api/agents/{agent_id}", 200, params={"agent_id": agent["id"]},
                       headers=ADMIN))["data"]
    assert got["metadata"] == {"team": "cx"} and "token" not in got
    patched = (await _call(client, "PATCH", "/api/agents/{agent_id}", 200, params={"agent_id": agent["id"]},
                           headers=ADMIN, json_body={"metadata": {"team": "ops"}}))["data"]
    assert patched["metadata"] == {"team": "ops"}
    renamed = (await _call(client, "PUT", "/api/agents/{agent_id}", 200, params={"agent_id": agent["id"]},
                           headers=ADMIN, json_body={"name": "support-bot-2"}))["data"]
    assert renamed["name"] == "support-bot-2"
    upserted = await _call(client, "PUT", "/api/agents/by-name/{name}", 201, params={"name": "batch-bot"},
                           headers=ADMIN, json_body={"metadata": {"tier": 1}})
    assert upserted["data"]["token"].startswith("rg_agt_")
    updated = await _call(client, "PUT", "/api/agents/by-name/{name}", 200, params={"name": "batch-bot"},
                          headers=ADMIN, json_body={"status": "disabled"})
    assert updated["data"]["status"] == "disabled" and "token" not in updated["data"]
    rotated = (await _call(client, "POST", "/api/agents/{agent_id}/rotate-key", 200,
                           params={"agent_id": agent["id"]}, headers=ADMIN))["data"]
    assert rotated["token"] != token
    # the old token stops working at once (a proxy 401, OpenAI envelope)
    stale = await _call(client, "POST", "/v1/chat/completions", 401, headers=auth, json_body=CHAT_BODY)
    assert stale["error"]["type"] == "authentication_error"
    auth = {"Authorization": f"Bearer {rotated['token']}"}

    # provider keys
    keys = await _call(client, "GET", "/api/provider-keys", 200, headers=ADMIN)
    assert [k["id"] for k in keys["data"]] == [key["id"]] and keys["next"] is None
    only_anthropic = await _call(client, "GET", "/api/provider-keys", 200, headers=ADMIN,
                                 query={"provider": "anthropic"})
    assert only_anthropic["data"] == []
    await _call(client, "GET", "/api/provider-keys/{key_id}", 200, params={"key_id": key["id"]}, headers=ADMIN)
    deleted = await _call(client, "DELETE", "/api/provider-keys/{key_id}", 200, params={"key_id": key["id"]},
                          headers=ADMIN)
    assert deleted["data"] == {"id": key["id"], "deleted": True}
    await _call(client, "GET", "/api/provider-keys/{key_id}", 404, params={"key_id": key["id"]}, headers=ADMIN)
    await _call(client, "DELETE", "/api/provider-keys/{key_id}", 404, params={"key_id": key["id"]}, headers=ADMIN)

    # runs: list, filters, pagination
    runs = await _call(client, "GET", "/api/runs", 200, headers=ADMIN)
    assert {r["id"] for r in runs["data"]} == {"r1", "r2"} and runs["next"] is None
    by_agent = await _call(client, "GET", "/api/runs", 200, headers=ADMIN, query={"agent_id": agent["id"]})
    assert len(by_agent["data"]) == 2
    completed = await _call(client, "GET", "/api/runs", 200, headers=ADMIN, query={"status": "completed"})
    assert [r["id"] for r in completed["data"]] == ["r1"]
    window = await _call(client, "GET", "/api/runs", 200, headers=ADMIN,
                         query={"since": run["started_at"], "until": "2999-01-01T00:00:00Z"})
    assert len(window["data"]) == 2
    first = await _call(client, "GET", "/api/runs", 200, headers=ADMIN, query={"limit": "1"})
    assert len(first["data"]) == 1 and isinstance(first["next"], str)
    second = await _call(client, "GET", "/api/runs", 200, headers=ADMIN,
                         query={"limit": "1", "cursor": first["next"]})
    assert len(second["data"]) == 1 and second["next"] is None
    assert {first["data"][0]["id"], second["data"][0]["id"]} == {"r1", "r2"}

    # one run, its steps, ledger and events
    r1 = (await _call(client, "GET", "/api/runs/{run_id}", 200, params={"run_id": "r1"}, headers=ADMIN))["data"]
    assert r1["step_count"] == 2 and r1["agent_id"] == agent["id"]
    assert Decimal(r1["spend_usd"]) == chat_cost + Decimal("0.01")
    steps = await _call(client, "GET", "/api/runs/{run_id}/steps", 200, params={"run_id": "r1"}, headers=ADMIN)
    assert [(s["kind"], s["seq"]) for s in steps["data"]] == [("llm", 1), ("tool", 2)]
    assert steps["data"][0]["id"] == chat_step and steps["data"][0]["status"] == "ok"
    ledger = (await _call(client, "GET", "/api/runs/{run_id}/ledger", 200, params={"run_id": "r1"},
                          headers=ADMIN))["data"]
    assert sum(Decimal(e["cost_usd"]) for e in ledger["entries"]) == Decimal(ledger["spend_usd"])

    resp = await client.get("/api/runs/r1/events", headers=ADMIN)
    assert resp.status == 200 and resp.content_type == "application/x-ndjson"
    lines = [json.loads(line) for line in (await resp.text()).splitlines()]
    for line in lines:
        validate_response("GET", "/api/runs/{run_id}/events", 200, line, content_type="application/x-ndjson")
        validate_schema("EventLine", line)
    assert [e["type"] for e in lines] == ["RunStarted", "StepStarted", "StepCompleted", "ToolStepLogged",
                                          "RunCompleted"]
    assert [e["version"] for e in lines] == [1, 2, 3, 4, 5]
    assert all(e["stream"] == "run-r1" for e in lines)
    resp = await client.get("/api/runs/r1/events", headers=ADMIN, params={"after": str(lines[2]["position"])})
    assert [json.loads(line) for line in (await resp.text()).splitlines()] == lines[3:]

    # the log's head, to keep as an anchor: the newest event's position and hash
    head = (await _call(client, "GET", "/api/log/head", 200, headers=ADMIN))["data"]
    newest = await client.app[STORE].read_all(head["position"] - 1, 2)
    assert [(e.position, e.hash) for e in newest] == [(head["position"], head["hash"])]
    assert head["anchor"] == f"{head['position']}:{head['hash']}"

    health = await _call(client, "GET", "/health", 200)
    assert health["status"] == "ok" and health["database"] == "ok"

    # admin errors: 401, 404, 400, 409
    await _call(client, "GET", "/api/runs", 401)
    await _call(client, "GET", "/api/log/head", 401)
    await _call(client, "GET", "/api/agents", 401, headers={"Authorization": "Bearer rg_adm_wrong"})
    await _call(client, "GET", "/api/agents", 401, headers=auth)  # an agent token is not an admin token
    not_found = await _call(client, "GET", "/api/runs/{run_id}", 404, params={"run_id": "nope"}, headers=ADMIN)
    assert not_found["error"]["code"] == "not_found"
    for template in ("/api/runs/{run_id}/steps", "/api/runs/{run_id}/ledger", "/api/runs/{run_id}/events"):
        await _call(client, "GET", template, 404, params={"run_id": "nope"}, headers=ADMIN)
    await _call(client, "GET", "/api/agents/{agent_id}", 404, params={"agent_id": "agt_nope"}, headers=ADMIN)
    await _call(client, "POST", "/api/agents/{agent_id}/rotate-key", 404, params={"agent_id": "agt_nope"},
                headers=ADMIN)
    bad_json = await _call(client, "POST", "/api/agents", 400, headers=ADMIN, data="{")
    assert bad_json["error"]["code"] == "invalid_json"
    no_name = await _call(client, "POST", "/api/agents", 400, headers=ADMIN, json_body={"metadata": {}})
    assert no_name["error"]["code"] == "invalid_name"
    await _call(client, "POST", "/api/provider-keys", 400, headers=ADMIN,
                json_body={"provider": "mistral", "name": "k2", "api_key": "sk-test-123456789"})
    await _call(client, "PATCH", "/api/agents/{agent_id}", 400, params={"agent_id": agent["id"]}, headers=ADMIN,
                json_body={"status": "sleeping"})
    await _call(client, "GET", "/api/runs", 400, headers=ADMIN, query={"limit": "0"})
    await _call(client, "GET", "/api/runs", 400, headers=ADMIN, query={"status": "bogus"})
    await _call(client, "GET", "/api/runs", 400, headers=ADMIN, query={"cursor": "%%%"})
    await _call(client, "GET", "/api/runs/{run_id}/events", 400, params={"run_id": "r1"}, headers=ADMIN,
                query={"after": "x"})
    taken = await _call(client, "POST", "/api/agents", 409, headers=ADMIN, json_body={"name": "batch-bot"})
    assert taken["error"]["code"] == "name_taken"
    await _call(client, "PUT", "/api/agents/{agent_id}", 409, params={"agent_id": agent["id"]}, headers=ADMIN,
                json_body={"name": "batch-bot"})

    # proxy errors: 400, 404, 409, and a governance refusal
    await _call(client, "POST", "/v1/chat/completions", 400, headers=auth, json_body={"messages": []})
    await _call(client, "POST", "/v1/runs/{run_id}/steps", 400, params={"run_id": "r2"}, headers=auth,
                json_body={"args": {}})
    await _call(client, "POST", "/v1/runs/{run_id}/complete", 404, params={"run_id": "unknown-run"}, headers=auth)
    closed = await _call(client, "POST", "/v1/chat/completions", 409, headers={**auth, "x-rungate-run-id": "r1"},
                         json_body=CHAT_BODY)
    assert closed["error"]["code"] == "run_closed"
    await _call(client, "POST", "/v1/runs/{run_id}/steps", 409, params={"run_id": "r1"}, headers=auth,
                json_body={"tool": "lookup"})
    await _call(client, "PATCH", "/api/agents/{agent_id}", 200, params={"agent_id": agent["id"]}, headers=ADMIN,
                json_body={"disabled": True})
    refused = await _call(client, "POST", "/v1/chat/completions", 403, headers={**auth, "x-rungate-run-id": "r2"},
                          json_body=CHAT_BODY)
    validate_schema("GovernanceError", refused)
    assert refused["error"]["type"] == "governance_block" and refused["error"]["code"] == "agent_disabled"
    assert refused["error"]["details"] == refused["error"]["context"]


async def test_other_proxy_formats_match_the_document(client: TestClient[Any, Any]) -> None:
    token = (await _call(client, "POST", "/api/agents", 201, headers=ADMIN, json_body={"name": "a"}))["data"]["token"]
    bearer, api_key = {"Authorization": f"Bearer {token}"}, {"x-api-key": token, "anthropic-version": "2023-06-01"}
    for template, headers, body in (
            ("/v1/responses", bearer, {"model": "mock-gpt", "input": "hi"}),
            ("/v1/messages", api_key, {"model": "mock-claude", "max_tokens": 16, "messages": CHAT_BODY["messages"]}),
            ("/v1/v1/messages", api_key, {"model": "mock-claude", "max_tokens": 16,
                                          "messages": CHAT_BODY["messages"]}),
            ("/v1/embeddings", bearer, {"model": "mock-embedding", "input": "hi"})):
        await _call(client, "POST", template, 200, headers={**headers, "x-rungate-run-id": "formats"},
                    json_body=body)
    openai_models = await _call(client, "GET", "/v1/models", 200, headers=bearer)
    assert openai_models["object"] == "list"
    anthropic_models = await _call(client, "GET", "/v1/models", 200, headers=api_key)
    assert "has_more" in anthropic_models
    await _call(client, "GET", "/v1/models", 401)
    # Anthropic routes answer errors in the Anthropic envelope
    missing = await _call(client, "POST", "/v1/messages", 401, json_body={"model": "mock-claude", "messages": []})
    assert missing["type"] == "error" and missing["error"]["type"] == "authentication_error"
    bad = await _call(client, "POST", "/v1/messages", 400, headers=api_key, json_body={"model": "mock-claude"})
    assert bad["type"] == "error"
    validate_schema("AnthropicError", bad)


async def test_streamed_answer_ends_with_the_documented_rungate_trailer(client: TestClient[Any, Any]) -> None:
    token = (await _call(client, "POST", "/api/agents", 201, headers=ADMIN, json_body={"name": "s"}))["data"]["token"]
    for template, headers, body in (
            ("/v1/chat/completions", {"Authorization": f"Bearer {token}"}, {**CHAT_BODY, "stream": True}),
            ("/v1/responses", {"Authorization": f"Bearer {token}"},
             {"model": "mock-gpt", "input": "hi", "stream": True}),
            ("/v1/messages", {"x-api-key": token},
             {"model": "mock-claude", "max_tokens": 16, "messages": CHAT_BODY["messages"], "stream": True})):
        resp = await client.post(template, json=body, headers={**headers, "x-rungate-run-id": "streams"})
        assert resp.status == 200 and resp.content_type == "text/event-stream", template
        validate_headers("POST", template, 200, resp.headers)
        events = [block for block in (await resp.text()).replace("\r\n", "\n").split("\n\n") if block.strip()]
        trailers = [e for e in events if e.startswith("event: rungate\n")]
        assert len(trailers) == 1, template
        data = json.loads(trailers[0].split("data: ", 1)[1])
        validate_schema("StreamTrailer", data)
        assert data["run_id"] == "streams" and data["step_id"] == resp.headers["x-rungate-step-id"]
        assert data["type"] == "rungate" and data["tokens"]["output"] > 0
        assert events[-1] == trailers[0], "the trailer ends the stream"
        if template == "/v1/chat/completions":
            assert events[-2] == "data: [DONE]"
        assert "x-rungate-cost-usd" not in resp.headers, "streams carry the cost in the trailer"
