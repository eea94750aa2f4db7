"""Secrets stay in their box, end to end and at DEBUG: a provider key from the environment, a stored provider
key, an agent's token and the admin token appear in no log line, in no byte of the database, its WAL or its
key file, and in no answer — while the keys did reach the upstream, so the paths that carry them ran."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.conftest import ADMIN_TOKEN, GatewayFactory
from tests.store_helpers import database_files

ENV_KEY = "sk-canary-env-" + "Z9" * 16
STORED_KEY = "sk-ant-canary-stored-" + "K4" * 16
USER = [{"role": "user", "content": "hello"}]



async def test_secrets_appear_in_no_log_file_or_answer_even_at_debug(make_gateway: GatewayFactory,
                                                                     capfd: pytest.CaptureFixture[str]) -> None:
    gateway = await make_gateway(OPENAI_API_KEY=ENV_KEY, RUNGATE_LOG_LEVEL="debug", RUNGATE_LOG_FORMAT="json")
    answers: list[str] = []

    async def call(method: str, path: str, headers: dict[str, str], body: Any = None) -> int:
        async with aiohttp.ClientSession() as http, http.request(method, gateway.url + path, json=body,
                                                                 headers=headers) as resp:
            answers.append(f"{resp.status} {dict(resp.headers)} {await resp.text()}")
            return resp.status

    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert await call("POST", "/api/provider-keys", admin,
                      {"provider": "anthropic", "name": "canary", "api_key": STORED_KEY}) == 201
    token = await gateway.new_agent("canary-agent")
    agent = {"Authorization": f"Bearer {token}"}
    # given calls down every path that carries a key: plain and streamed, both vendors, upstream errors
    assert await call("POST", "/v1/chat/completions", agent, {"model": "mock-gpt", "messages": USER}) == 200
    assert await call("POST", "/v1/chat/completions", agent,
                      {"model": "mock-gpt", "messages": USER, "stream": True}) == 200
    assert await call("POST", "/v1/messages", {"x-api-key": token, "anthropic-version": "2023-06-01"},
                      {"model": "mock-claude", "max_tokens": 20, "messages": USER}) == 200
    for status in (401, 500):  # the provider refusing Rungate's key, and a provider failure
        await call("POST", "/v1/chat/completions", agent,
                   {"model": "mock-gpt", "messages": [{"role": "user", "content": f"[status:{status}]"}]})
    await call("POST", "/v1/chat/completions", agent,
               {"model": "mock-gpt", "stream": True, "messages": [{"role": "user", "content": "[cut:2]"}]})
    # and callers presenting secrets where they do not belong
    assert await call("GET", "/api/agents", agent) == 401
    assert await call("POST", "/v1/chat/completions", admin, {"model": "mock-gpt", "messages": USER}) == 401
    for path in ("/api/agents", "/api/provider-keys", "/api/runs"):
        assert await call("GET", path, admin) == 200

    # then the keys went upstream (the paths ran) ...
    sent = [r["headers"] for r in gateway.upstream_requests]
    assert any(h.get("authorization") == f"Bearer {ENV_KEY}" for h in sent)
    assert any(h.get("x-api-key") == STORED_KEY for h in sent)
    # ... and nowhere else: not in the files while the server runs (the WAL holds the recent pages) nor once
    # it closed (the store checkpoints the WAL into the database)
    running = database_files(gateway.db_path)
    assert any(name.endswith("-wal") for name in running)
    await gateway.server.close()
    logs = capfd.readouterr()
    assert '"event": "request_failed"' in logs.err  # the server's log lines were captured (the 502s)
    places = {"stderr": logs.err.encode(), "stdout": logs.out.encode(), "answers": "\n".join(answers).encode(),
              **{f"{name} (running)": data for name, data in running.items()}, **database_files(gateway.db_path)}
    leaks = [(secret[:16], place) for secret in (ENV_KEY, STORED_KEY, token, ADMIN_TOKEN)
             for place, data in places.items() if secret.encode() in data]
    assert leaks == []
