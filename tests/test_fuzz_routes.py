"""Hostile bodies on every route that takes one: any JSON (or not JSON at all) gets a clear 4xx in the route's
own error shape, never a 5xx, and the event log stays whole.

One Rungate (with the mock provider behind it) runs in a thread for the module; hypothesis sends it one body
per example, half of them well-formed bodies with one field replaced, dropped or added, so the checks past
"not an object" are reached too.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from rungate.config import load_settings
from rungate.providers.mock import create_mock_app
from rungate.proxy.app import create_app
from rungate.proxy.keys import STORE
from tests.conftest import ADMIN_TOKEN
from tests.store_helpers import route_path

_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=40)
# Keys a route reads are drawn more often than any text: the values then reach the checks past "missing".
_KEYS = st.sampled_from([
    "model", "messages", "input", "stream", "max_tokens", "name", "tool", "args", "result", "tokens", "cost_usd",
    "status", "metadata", "rungate", "run_id", "policy", "budget", "models", "tools", "url", "events", "disabled",
    "api_key", "provider", "add_usd", "reason", "ended_reason", "content", "role", "latency_ms", "note", "edits",
]) | st.text(max_size=12)
JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=6),
                    max_leaves=12)
RAW = st.binary(max_size=64) | st.sampled_from([b"{", b"[]", b"null", b'{"model": NaN}', b"\xff\xfe", b""])
_USER = [{"role": "user", "content": "hi"}]
# Well-formed bodies, one field of which is replaced, dropped or added.
TEMPLATES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "mock-gpt", "messages": _USER, "max_tokens": 5, "stream": False,
                             "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    "/v1/responses": {"model": "mock-gpt", "input": "hi", "max_output_tokens": 5},
    "/v1/messages": {"model": "mock-claude", "max_tokens": 5, "messages": _USER},
    "/v1/v1/messages": {"model": "mock-claude", "max_tokens": 5, "messages": _USER},
    "/v1/embeddings": {"model": "mock-embedding", "input": "hi"},
    "/v1/runs/{run_id}/steps": {"tool": "search", "args": {"q": 1}, "result": {}, "status": "success",
                                "latency_ms": 3, "tokens": {"input": 1, "output": 2}, "cost_usd": "0.01"},
    "/v1/runs/{run_id}/complete": {"ended_reason": "done", "metadata": {}},
    "/api/agents": {"name": "fuzzed", "metadata": {}},
    "/api/provider-keys": {"provider": "openai", "name": "fuzz-key", "api_key": "sk-fuzz-1234567890"},
    "/api/policies": {"name": "fuzzed", "budget": {"hard_limit_usd": "5"}, "models": {"allowed": ["mock-*"]},
                      "tools": {"blocked": ["shell"]}, "rate_limits": {"agent": {"requests_per_minute": 10}}},
    "/api/webhooks": {"url": "https://hooks.example.com/x", "events": ["run.completed"]},
    "/api/runs/{run_id}/resume": {"add_usd": "1.50"},
}


@st.composite
def _mutated(draw: st.DrawFn, template: dict[str, Any]) -> bytes:
    body = dict(template)
    key = draw(st.sampled_from(sorted(body)) | _KEYS)
    if draw(st.booleans()) and key in body:
        del body[key]
    else:
        body[key] = draw(JSON)
    return json.dumps(body).encode()



def _send(url: str, method: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={**headers, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 (loopback only)
            return resp.status, resp.headers.get_content_type(), resp.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get_content_type(), error.read()


@pytest.fixture(scope="module")
def rungate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Rungate and the mock provider on their own loop in a thread, for the whole module."""
    directory: Path = tmp_path_factory.mktemp("fuzz")
    loop = asyncio.new_event_loop()
    box: dict[str, Any] = {}
    started = threading.Event()

    async def start() -> None:
        upstream = TestServer(create_mock_app(), host="127.0.0.1")
        await upstream.start_server()
        app = create_app(load_settings(env={
            "RUNGATE_DATABASE_URL": f"sqlite:///{directory}/fuzz.db", "RUNGATE_ADMIN_TOKEN": ADMIN_TOKEN,
            "RUNGATE_OPENAI_BASE_URL": str(upstream.make_url("/v1")), "OPENAI_API_KEY": "sk-fuzz-0000000000",
            "RUNGATE_ANTHROPIC_BASE_URL": str(upstream.make_url("")).rstrip("/"),
            "ANTHROPIC_API_KEY": "sk-ant-fuzz-0000", "RUNGATE_LOG_LEVEL": "error"}))
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        box.update(app=app, server=server, upstream=upstream, url=str(server.make_url("")).rstrip("/"))

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        started.set()
        loop.run_forever()

    box["loop"] = loop
    thread = threading.Thread(target=run, name="fuzzed-rungate", daemon=True)
    thread.start()
    assert started.wait(30)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    status, _, body = _send(box["url"] + "/api/agents", "POST", b'{"name": "fuzzer"}', admin)
    assert status == 201, body
    box["agent"] = {"Authorization": f"Bearer {orjson.loads(body)['data']['token']}"}
    box["admin"] = admin
    box["routes"] = sorted({(r.method, r.resource.canonical) for r in box["app"].router.routes()
                            if r.method in ("POST", "PUT", "PATCH") and r.resource is not None})
    yield box

    async def stop() -> None:
        await box["server"].close()
        await box["upstream"].close()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)


@settings(max_examples=600, deadline=None)
@given(data=st.data())
def test_any_body_on_any_route_gets_a_clear_client_error_never_a_server_error(rungate: dict[str, Any],
                                                                              data: st.DataObject) -> None:
    method, template = data.draw(st.sampled_from(rungate["routes"]))
    anything = JSON.map(lambda value: json.dumps(value).encode()) | RAW
    body = data.draw(_mutated(TEMPLATES[template]) | anything if template in TEMPLATES else anything)
    headers = rungate["agent"] if template.startswith("/v1/") else rungate["admin"]
    status, content_type, answer = _send(rungate["url"] + route_path(template, "fuzz"), method, body, headers)
    assert status < 500, (method, template, body, status, answer[:300])
    if status >= 400:  # a clear error, in the route's own shape
        assert content_type == "application/json" and "error" in orjson.loads(answer), answer[:300]


def test_after_the_fuzzing_every_route_was_tried_and_the_log_verifies(rungate: dict[str, Any]) -> None:
    assert {"/v1/chat/completions", "/v1/messages", "/v1/runs/{run_id}/steps", "/api/agents",
            "/api/policies"} <= {template for _, template in rungate["routes"]}
    report = asyncio.run_coroutine_threadsafe(rungate["app"][STORE].verify(), rungate["loop"]).result(30)
    assert report.ok and report.events > 1
