"""Shared fixtures: a real fake upstream (the mock provider app on loopback), Rungate on a real SQLite
file served on loopback, an admin client and a fresh agent token."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from rungate.config import load_settings
from rungate.providers.mock import MOCK_REQUESTS, create_mock_app
from rungate.proxy.app import create_app

ADMIN_TOKEN = "rg_adm_" + "t" * 40
OPENAI_KEY = "sk-upstream-openai-0001"
ANTHROPIC_KEY = "sk-ant-upstream-0002"


async def send_messages(http: aiohttp.ClientSession, root: str, token: str, run_id: str,
                        body: dict[str, Any]) -> tuple[int, Any]:
    """POST an Anthropic Messages body to Rungate at `root` as the agent `token`, in run `run_id`; the status
    and the JSON answer."""
    async with http.post(root + "/v1/messages", data=orjson.dumps(body), headers={
            "x-api-key": token, "anthropic-version": "2023-06-01", "content-type": "application/json",
            "x-rungate-run-id": run_id}) as resp:
        return resp.status, await resp.json()


def pytest_report_header() -> str:
    return f"sqlite {sqlite3.sqlite_version}"


@dataclass
class Gateway:
    """A running Rungate plus the fake upstream behind it."""

    server: TestServer
    upstream: TestServer
    app: web.Application
    db_path: Path

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def upstream_requests(self) -> list[dict[str, Any]]:
        return self.upstream.app[MOCK_REQUESTS]

    async def admin(self, method: str, path: str, json: Any = None) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http, http.request(
                method, self.url + path, json=json, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
            body = await resp.read()
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, body.decode()

    async def new_agent(self, name: str = "agent") -> str:
        status, body = await self.admin("POST", "/api/agents", {"name": name})
        assert status == 201, body
        token: str = body["data"]["token"]
        return token


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(aiohttp_server: Any, tmp_path: Path) -> GatewayFactory:
    """Build a gateway; keyword arguments become extra `RUNGATE_*`-style environment entries."""
    counter = 0

    async def build(**env: str) -> Gateway:
        nonlocal counter
        counter += 1
        upstream = await aiohttp_server(create_mock_app())
        db_path = tmp_path / f"rungate-{counter}.db"
        settings = load_settings(env={
            "RUNGATE_DATABASE_URL": f"sqlite:///{db_path}",
            "RUNGATE_ADMIN_TOKEN": ADMIN_TOKEN,
            "RUNGATE_OPENAI_BASE_URL": str(upstream.make_url("/v1")),
            "RUNGATE_ANTHROPIC_BASE_URL": str(upstream.make_url("")).rstrip("/"),
            "OPENAI_API_KEY": OPENAI_KEY,
            "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
            "RUNGATE_LOG_LEVEL": "warning",
            **env,
        })
        app = create_app(settings)
        server = await aiohttp_server(app)
        return Gateway(server, upstream, app, db_path)

    return build


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway()
