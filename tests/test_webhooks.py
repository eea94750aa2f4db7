"""Webhooks (SPEC §8), end to end: endpoints managed through the admin API, URLs checked against SSRF, SPEC
events signed and delivered at least once to a real aiohttp receiver on loopback — retried with backoff,
dead-lettered, resumed after a restart from the event log — and never slowing the proxy."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from rungate.config import load_settings
from rungate.errors import ConfigError
from rungate.events import Recorded
from rungate.proxy.app import create_app
from rungate.proxy.keys import SETTINGS, STORE
from rungate.webhooks.deliver import Hook, backoff_s
from rungate.webhooks.envelope import EVENT_NAMES, webhook_event
from rungate.webhooks.urls import BlockedAddress, GuardedResolver, blocked_reason
from tests.conftest import ADMIN_TOKEN, Gateway, GatewayFactory
from tests.openapi_check import validate_response, validate_schema
from tests.store_helpers import database_files
from tests.test_approvals import decide, post, refund_chat, setup
from tests.test_governance import agent_with_policy, put_policy

ALLOW = {"RUNGATE_WEBHOOK_ALLOW_PRIVATE": "true"}
HOOKS = "/api/webhooks"
ONE = "/api/webhooks/{webhook_id}"


# --- a real receiver ---------------------------------------------------------------------------------

@dataclass
class Call:
    at: float
    headers: CIMultiDict[str]
    body: bytes
    answered: int = 0

    @property
    def delivery(self) -> str:
        return self.headers["X-Rungate-Delivery"]

    @property
    def payload(self) -> dict[str, Any]:
        parsed: dict[str, Any] = orjson.loads(self.body)
        return parsed


@dataclass
class Receiver:
    """An aiohttp app that records every request; it answers `status`, fails the first `fail_first` attempts
    of each delivery with 500, or waits on `hang` (at most 5 s) before answering."""

    server: TestServer | None = None
    calls: list[Call] = field(default_factory=list)
    status: int = 200
    fail_first: int = 0
    hang: asyncio.Event | None = None
    hanging: int = 0

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/hook"))

    def delivered(self) -> list[Call]:
        """The calls answered 2xx, in arrival order."""
        return [c for c in self.calls if 200 <= c.answered < 300]

    def delivered_events(self) -> list[str]:
        return [c.payload["event"] for c in self.delivered()]

    async def handle(self, request: web.Request) -> web.Response:
        call = Call(time.monotonic(), request.headers.copy(), await request.read())
        self.calls.append(call)
        if self.hang is not None:
            self.hanging += 1
            try:
                await asyncio.wait_for(self.hang.wait(), 5)
            except TimeoutError:
                pass
            finally:
                self.hanging -= 1
        status = self.status
        if status < 300 and sum(1 for c in self.calls if c.delivery == call.delivery) <= self.fail_first:
            status = 500
        call.answered = status
        return web.Response(status=status, text="ok" if status < 300 else "no")


@pytest.fixture
async def receiver(aiohttp_server: Any) -> Receiver:
    rx = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rx.handle)
    app.router.add_post("/hook/v2", rx.handle)
    rx.server = await aiohttp_server(app)
    return rx


# --- helpers -----------------------------------------------------------------------------------------

async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def api(gateway: Gateway, method: str, template: str, status: int, body: Any = None,
              query: str = "", **params: str) -> Any:
    """Call the admin API, check the status and the body against the OpenAPI document."""
    code, answer = await gateway.admin(method, template.format(**params) + query, body)
    assert code == status, (method, template, code, answer)
    validate_response(method, template, code, answer)
    return answer


async def create_hook(gateway: Gateway, url: str, **fields: Any) -> dict[str, Any]:
    created: dict[str, Any] = (await api(gateway, "POST", HOOKS, 201, {"url": url, **fields}))["data"]
    return created


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The receiver's side of SPEC §8, written independently of Rungate's code."""
    return "v1=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def assert_signed(call: Call, *secrets: str) -> None:
    """The call carries exactly one signature per secret, in order, each valid, over a fresh timestamp."""
    timestamp = call.headers["X-Rungate-Timestamp"]
    assert abs(time.time() - int(timestamp)) < 60
    assert call.headers.getall("X-Rungate-Signature") == [sign(s, timestamp, call.body) for s in secrets]
    assert call.headers["Content-Type"] == "application/json"
    assert call.headers["X-Rungate-Event"] == call.payload["event"]
    validate_schema("WebhookPayload", call.payload)


async def chat(gateway: Gateway, token: str, run_id: str) -> int:
    async with aiohttp.ClientSession() as http, http.post(
            gateway.url + "/v1/chat/completions", json={"model": "mock-gpt", "messages": [
                {"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {token}", "x-rungate-run-id": run_id}) as resp:
        await resp.read()
        return resp.status


async def restart(gateway: Gateway, aiohttp_server: Any) -> Gateway:
    """Stop the gateway's server (its app cleans up: deliverer, then store) and serve a new app on the same file."""
    await gateway.server.close()
    app = create_app(gateway.app[SETTINGS])
    return Gateway(await aiohttp_server(app), gateway.upstream, app, gateway.db_path)


def db_bytes(path: Path) -> bytes:
    return b"".join(database_files(path).values())


# --- management and validation -------------------------------------------------------------------------

async def test_webhooks_are_managed_through_the_api_and_the_secret_is_shown_once(
        make_gateway: GatewayFactory, receiver: Receiver) -> None:
    gateway = await make_gateway(**ALLOW)
    # given a new webhook
    created = await create_hook(gateway, receiver.url, events=["agent.created"], description="ops")
    secret = created["secret"]
    assert secret.startswith("whsec_") and created["id"].startswith("whk_") and len(created["id"]) == 30
    assert (created["url"], created["events"], created["enabled"], created["description"]) == (
        receiver.url, ["agent.created"], True, "ops")
    hook_id = created["id"]

    # then it is listed and read back without its secret
    listed = await api(gateway, "GET", HOOKS, 200)
    assert [h["id"] for h in listed["data"]] == [hook_id] and listed["next"] is None
    got = (await api(gateway, "GET", ONE, 200, webhook_id=hook_id))["data"]
    assert "secret" not in got and "secret" not in listed["data"][0]
    assert got == {k: v for k, v in created.items() if k != "secret"}

    # when it is changed, field by field
    changed = (await api(gateway, "PATCH", ONE, 200, {"enabled": False, "events": ["*"], "description": None,
                                                      "url": receiver.url + "/v2"}, webhook_id=hook_id))["data"]
    assert (changed["enabled"], changed["events"], changed["description"], changed["url"]) == (
        False, ["*"], None, receiver.url + "/v2")
    same = (await api(gateway, "PATCH", ONE, 200, {}, webhook_id=hook_id))["data"]
    assert same == changed
    enabled = (await api(gateway, "PATCH", ONE, 200, {"enabled": True}, webhook_id=hook_id))["data"]
    assert enabled["enabled"] is True and enabled["delivered_through"] > created["delivered_through"]

    # bad input is refused, naming the field
    for body, code, field_name in (
            ({}, "invalid_webhook_url", "url"),
            ({"url": 42}, "invalid_webhook_url", "url"),
            ({"url": receiver.url, "events": []}, "invalid_events", "events"),
            ({"url": receiver.url, "events": ["run.exploded"]}, "invalid_events", "events"),
            ({"url": receiver.url, "events": ["*", "run.started"]}, "invalid_events", "events"),
            ({"url": receiver.url, "events": ["run.started", "run.started"]}, "invalid_events", "events"),
            ({"url": receiver.url, "events": "run.started"}, "invalid_events", "events"),
            ({"url": receiver.url, "enabled": "yes"}, "invalid_enabled", "enabled"),
            ({"url": receiver.url, "description": "x" * 501}, "invalid_description", "description"),
            ({"url": receiver.url, "event": ["run.started"]}, "invalid_field", "event")):
        refused = await api(gateway, "POST", HOOKS, 400, body)
        assert refused["error"]["code"] == code and f"`{field_name}`" in refused["error"]["message"], refused
    refused = await api(gateway, "PATCH", ONE, 400, {"events": ["nope"]}, webhook_id=hook_id)
    assert refused["error"]["code"] == "invalid_events"

    # unknown ids are 404 everywhere; no token is 401
    for method, template in (("GET", ONE), ("PATCH", ONE), ("DELETE", ONE), ("POST", ONE + "/rotate-secret"),
                             ("GET", ONE + "/deliveries"), ("POST", ONE + "/test")):
        await api(gateway, method, template, 404, {} if method != "GET" else None, webhook_id="whk_nope")
    async with aiohttp.ClientSession() as http, http.get(gateway.url + HOOKS) as resp:
        assert resp.status == 401
        validate_response("GET", HOOKS, 401, await resp.json())

    # and the secret is nowhere in the database in clear, nor in any answer since the first
    assert secret.encode() not in db_bytes(gateway.db_path)
    deleted = await api(gateway, "DELETE", ONE, 200, webhook_id=hook_id)
    assert deleted["data"] == {"id": hook_id, "deleted": True}
    await api(gateway, "GET", ONE, 404, webhook_id=hook_id)
    assert (await api(gateway, "GET", HOOKS, 200))["data"] == []


async def test_urls_that_could_reach_private_networks_are_refused_without_the_allow_flag(
        gateway: Gateway) -> None:
    for url, reason in (
            ("ftp://93.184.215.14/x", "http or https"),
            ("http:///no-host", "host"),
            ("http://user:pw@93.184.215.14/", "credentials"),
            ("http://93.184.215.14\\@127.0.0.1/", "backslash"),
            ("http://127.0.0.1:9/hook", "loopback"),
            ("http://localhost:9/hook", "loopback"),
            ("http://10.1.2.3/", "private"),
            ("http://192.168.1.1/", "private"),
            ("http://169.254.169.254/latest/meta-data", "link-local"),
            ("http://[::1]/", "loopback"),
            ("http://[::ffff:127.0.0.1]/", "loopback"),
            ("http://[fe80::1]/", "link-local"),
            ("http://[fd00::1]/", "private"),
            ("http://224.0.0.1/", "multicast"),
            ("http://0.0.0.0/", "unspecified"),
            ("http://240.0.0.1/", "reserved"),
            ("http://100.64.0.1/", "not globally routable"),
            ("http://no-such-host.invalid/", "does not resolve")):
        refused = await api(gateway, "POST", HOOKS, 400, {"url": url})
        assert refused["error"]["code"] == "invalid_webhook_url", url
        assert reason in refused["error"]["message"], (url, refused["error"]["message"])
    # a public address is fine (disabled: this sandbox has no route to it)
    public = await create_hook(gateway, "https://93.184.215.14/hooks", enabled=False)
    refused = await api(gateway, "PATCH", ONE, 400, {"url": "http://127.0.0.1/"}, webhook_id=public["id"])
    assert "loopback" in refused["error"]["message"]


@pytest.mark.parametrize(("address", "blocked"), [
    ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("127.0.0.53", "loopback"), ("10.0.0.1", "private"),
    ("172.16.0.1", "private"), ("169.254.0.1", "link-local"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("::1", "loopback"), ("::ffff:10.0.0.1", "private"), ("::ffff:8.8.8.8", None), ("fe80::1", "link-local"),
    ("ff02::1", "multicast"), ("2002:7f00:1::", "loopback"), ("64:ff9b::a00:1", "private"),
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "private"),  # Teredo carrying 10.0.0.1
    ("198.51.100.7", "private"), ("100.64.0.1", "not globally routable")])
def test_addresses_are_classified_with_embedded_ipv4_judged_as_ipv4(address: str, blocked: str | None) -> None:
    reason = blocked_reason(ipaddress.ip_address(address))
    assert (reason is None) == (blocked is None), (address, reason)
    if blocked is not None:
        assert reason is not None and blocked in reason


async def test_webhook_hosts_are_resolved_on_threads_of_their_own() -> None:
    # Given the loop's default executor taken up entirely (as a receiver with slow DNS could)
    loop = asyncio.get_running_loop()
    gate = threading.Event()
    busy = [loop.run_in_executor(None, gate.wait, 5) for _ in range(64)]
    try:
        # Then a webhook host still resolves, and is still judged
        with pytest.raises(BlockedAddress):
            await asyncio.wait_for(GuardedResolver().resolve("localhost", 80), 3)
    finally:
        gate.set()
        await asyncio.gather(*busy)


async def test_the_delivery_resolver_refuses_a_name_that_resolves_to_loopback() -> None:
    # DNS may change between the check and the connection: the deliverer's own resolver checks again.
    with pytest.raises(BlockedAddress, match="loopback"):
        await GuardedResolver().resolve("localhost", 80)


def test_webhook_settings_are_validated_naming_the_variable() -> None:
    settings = load_settings(env={})
    assert (settings.webhook_allow_private, settings.webhook_rotation_grace_s, settings.webhook_dead_letter_s,
            settings.webhook_retry_base_s) == (False, 86400, 510.0, 1.0)
    for variable, value in (("RUNGATE_WEBHOOK_ALLOW_PRIVATE", "maybe"), ("RUNGATE_WEBHOOK_ROTATION_GRACE_S", "x"),
                            ("RUNGATE_WEBHOOK_DEAD_LETTER_S", "0"), ("RUNGATE_WEBHOOK_RETRY_BASE_S", "-1")):
        with pytest.raises(ConfigError, match=variable):
            load_settings(env={variable: value})


def test_log_events_map_to_spec_names_and_webhook_events_are_never_sent() -> None:
    def recorded(type_: str, data: dict[str, Any]) -> Recorded:
        return Recorded(7, "e" * 32, "s-1", 1, type_, 1, data, {}, "2026-01-01T00:00:00.000000Z", "", "")

    agent = webhook_event(recorded("AgentCreated", {"agent_id": "agt_1", "name": "a", "token_hash": "h"}))
    assert agent is not None and agent[0] == "agent.created" and "token_hash" not in agent[1]
    assert (agent[1]["position"], agent[1]["stream"], agent[1]["recorded_at"]) == (
        7, "s-1", "2026-01-01T00:00:00.000000Z")
    expired = {"gate_id": "gate_1", "hold_id": "hold_1", "run_id": "r"}
    for outcome, name in (("rejected", "approval.rejected"), ("approved", "approval.approved")):
        mapped = webhook_event(recorded("ApprovalExpired", {**expired, "outcome": outcome}))
        assert mapped is not None and mapped[0] == name and mapped[1]["expired"] is True
    granted = webhook_event(recorded("ApprovalGranted", {**expired, "decided_by": "ops"}))
    assert granted is not None and granted[0] == "approval.approved" and "expired" not in granted[1]
    for quiet in ("WebhookDelivered", "WebhookCreated", "StepStarted", "ProviderKeyAdded"):
        assert webhook_event(recorded(quiet, {})) is None
    moved = webhook_event(recorded("StepFailedOver", {"run_id": "r", "step_id": "stp_1", "to_step_id": "stp_2",
                                                      "reason": "status 503", "continuation": False}))
    assert moved is not None and moved[0] == "step.failed_over" and moved[1]["to_step_id"] == "stp_2"
    assert {"run.started", "approval.pending", "budget.alert", "policy.drift", "step.failed_over"} <= set(EVENT_NAMES)


def test_backoff_doubles_with_jitter_up_to_a_minute_and_the_old_secret_signs_only_in_its_grace() -> None:
    for failures, low, high in ((1, 0.75, 1.0), (2, 1.5, 2.0), (3, 3.0, 4.0), (7, 45.0, 60.0), (40, 45.0, 60.0)):
        assert all(low <= backoff_s(failures, 1.0) <= high for _ in range(50)), failures
    hook = Hook("whk_1", "http://x", ["*"], 1, ("c", "p"), "new-secret", "old-secret", "2026-01-01T00:00:10.0Z")
    assert len(hook.signatures("1", b"{}", "2026-01-01T00:00:09.0Z")) == 2
    assert hook.signatures("1", b"{}", "2026-01-01T00:00:11.0Z") == [sign("new-secret", "1", b"{}")]
    assert "new-secret" not in repr(hook) and "old-secret" not in repr(hook)


# --- delivery ------------------------------------------------------------------------------------------

async def test_spec_events_are_signed_and_delivered_to_the_receiver(
        make_gateway: GatewayFactory, receiver: Receiver) -> None:
    gateway = await make_gateway(**ALLOW)
    hook = await create_hook(gateway, receiver.url)
    # given a gated tool call through the proxy, approved by an operator
    token = await setup(gateway)
    status, _, held = await post(gateway, token, refund_chat(900), **{"x-rungate-run-id": "wh-gate"})
    assert status == 202, held
    gate_id = held["context"]["gate_id"]
    await until(lambda: "approval.pending" in receiver.delivered_events(), what="approval.pending")
    assert (await decide(gateway, gate_id, "approve"))[0] == 200
    # and a run that spends past half its budget, then all of it
    await put_policy(gateway, "wh-budget", {"budget": {"hard_limit_usd": "1.00", "alerts": [0.5]}})
    spender = await agent_with_policy(gateway, "wh-spender", "wh-budget")
    assert await chat(gateway, spender, "wh-budget-run") == 200
    async with aiohttp.ClientSession() as http:
        for cost in ("0.30", "0.30", "0.50"):
            async with http.post(gateway.url + "/v1/runs/wh-budget-run/steps", json={"tool": "paid", "cost_usd": cost},
                                 headers={"Authorization": f"Bearer {spender}"}) as resp:
                assert resp.status == 201

    # then the receiver gets each SPEC event, signed with the webhook's secret
    wanted = {"agent.created", "run.started", "approval.pending", "approval.approved", "budget.alert",
              "budget.exceeded", "run.blocked"}
    await until(lambda: wanted <= set(receiver.delivered_events()), what=f"{wanted}")
    calls = receiver.delivered()
    for call in calls:
        assert_signed(call, hook["secret"])
    events = [c.payload for c in calls]
    names = [e["event"] for e in events]
    assert set(names) <= set(EVENT_NAMES) and names.count("agent.created") == 2
    assert names.index("approval.pending") < names.index("approval.approved")
    pending = events[names.index("approval.pending")]["data"]
    approved = events[names.index("approval.approved")]["data"]
    assert pending["gate_id"] == approved["gate_id"] == gate_id and pending["tool"] == "issue_refund"
    assert pending["args"] == {"amount_usd": 900, "order": "A-17"} and approved["position"] > pending["position"]
    alert = events[names.index("budget.alert")]["data"]
    assert alert["threshold"] == 0.5 and alert["run_id"] == "wh-budget-run"
    assert events[names.index("budget.exceeded")]["data"]["run_id"] == "wh-budget-run"
    for agent in (e["data"] for e in events if e["event"] == "agent.created"):
        assert "token_hash" not in agent and agent["agent_id"].startswith("agt_")
    for e in events:
        assert {"position", "stream", "recorded_at"} <= set(e["data"])
    assert len({c.delivery for c in calls}) == len(calls)  # one delivery per event, each its own id

    # and each one is listed as delivered, newest first
    await until(lambda: len(receiver.delivered()) == len(calls))
    deliveries: list[dict[str, Any]] = []
    for _ in range(100):
        deliveries = (await api(gateway, "GET", ONE + "/deliveries", 200, webhook_id=hook["id"]))["data"]
        if len(deliveries) >= len(calls):
            break
        await asyncio.sleep(0.05)
    assert {d["event_id"] for d in deliveries} == {c.delivery for c in calls}
    assert all(d["status"] == "delivered" and d["attempts"] == 1 and d["status_code"] == 200 for d in deliveries)
    assert [d["recorded_at"] for d in deliveries] == sorted((d["recorded_at"] for d in deliveries), reverse=True)
    assert hook["secret"].encode() not in db_bytes(gateway.db_path)


async def test_a_rotated_secret_signs_beside_the_previous_one_during_the_grace_period(
        make_gateway: GatewayFactory, receiver: Receiver) -> None:
    gateway = await make_gateway(**ALLOW)
    hook = await create_hook(gateway, receiver.url, events=["agent.created"])
    rotated = (await api(gateway, "POST", ONE + "/rotate-secret", 200, {}, webhook_id=hook["id"]))["data"]
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != hook["secret"]
    assert rotated["previous_secret_valid_until"] is not None
    got = (await api(gateway, "GET", ONE, 200, webhook_id=hook["id"]))["data"]
    assert "secret" not in got and got["previous_secret_valid_until"] == rotated["previous_secret_valid_until"]

    await gateway.new_agent("after-rotation")
    await until(lambda: len(receiver.delivered()) == 1, what="one delivery")
    call = receiver.delivered()[0]
    # two signature headers: the new secret's, then the previous one's — each verifies with its own secret
    assert_signed(call, rotated["secret"], hook["secret"])
    assert call.payload["data"]["name"] == "after-rotation"


async def test_a_failing_receiver_is_retried_with_growing_backoff_until_it_succeeds(
        make_gateway: GatewayFactory, receiver: Receiver) -> None:
    gateway = await make_gateway(**ALLOW, RUNGATE_WEBHOOK_RETRY_BASE_S="0.2")
    hook = await create_hook(gateway, receiver.url, events=["agent.created"])
    receiver.fail_first = 2
    await gateway.new_agent("retried")
    await until(lambda: len(receiver.delivered()) == 1, what="the third attempt")
    attempts = receiver.calls
    assert [c.answered for c in attempts] == [500, 500, 200]
    assert len({c.delivery for c in attempts}) == 1  # the same delivery id on every attempt
    assert len({orjson.dumps(c.payload["data"]) for c in attempts}) == 1
    first_gap, second_gap = attempts[1].at - attempts[0].at, attempts[2].at - attempts[1].at
    assert 0.14 <= first_gap < second_gap, (first_gap, second_gap)  # 0.15-0.2 s, then 0.3-0.4 s
    for call in attempts:
        assert_signed(call, hook["secret"])

    await until(lambda: bool(receiver.delivered()))
    for _ in range(100):
        deliveries = (await api(gateway, "GET", ONE + "/deliveries", 200, webhook_id=hook["id"]))["data"]
        if deliveries:
            break
        await asyncio.sleep(0.05)
    assert [(d["status"], d["attempts"], d["status_code"], d["error"]) for d in deliveries] == [
        ("delivered", 3, 200, None)]
    assert deliveries[0]["event"] == "agent.created" and deliveries[0]["event_id"] == attempts[0].delivery


async def test_a_delivery_failing_past_the_horizon_is_dead_lettered(
        make_gateway: GatewayFactory, receiver: Receiver) -> None:
    gateway = await make_gateway(**ALLOW, RUNGATE_WEBHOOK_DEAD_LETTER_S="1", RUNGATE_WEBHOOK_RETRY_BASE_S="0.1")
    hook = await create_hook(gateway, receiver.url, events=["agent.created"])
    receiver.status = 503
    started = time.monotonic()
    await gateway.new_agent("unlucky")
    dead: list[dict[str, Any]] = []
    while not dead:
        assert time.monotonic() - started < 10, "never dead-lettered"
        await asyncio.sleep(0.1)
        dead = (await api(gateway, "GET", ONE + "/deliveries", 200, query="?status=dead",
                          webhook_id=hook["id"]))["data"]
    assert time.monotonic() - started >= 1.0
    [entry] = dead
    assert entry["status"] == "dead" and entry["status_code"] == 503 and entry["error"] == "HTTP 503"
    assert entry["attempts"] == len(receiver.calls) >= 4  # at 0, ~0.1, ~0.3, ~0.7 and the horizon
    assert (await api(gateway, "GET", ONE + "/deliveries", 200, query="?status=delivered",
                      webhook_id=hook["id"]))["data"] == []
    await api(gateway, "GET", ONE + "/deliveries", 400, query="?status=lost", webhook_id=hook["id"])
    # the cursor moved past it: a restart does not try it again
    got = (await api(gateway, "GET", ONE, 200, webhook_id=hook["id"]))["data"]
    assert got["delivered_through"] >= entry["event_position"]


async def test_deliveries_survive_a_restart_from_the_event_log(
        make_gateway: GatewayFactory, receiver: Receiver, aiohttp_server: Any) -> None:
    gateway = await make_gateway(**ALLOW, RUNGATE_WEBHOOK_RETRY_BASE_S="0.05")
    hook = await create_hook(gateway, receiver.url)
    created_at = hook["delivered_through"]
    # given events produced while the receiver fails
    receiver.status = 503
    tokens = [await gateway.new_agent(f"restart-{i}") for i in range(3)]
    assert await chat(gateway, tokens[0], "restart-run") == 200
    store = gateway.app[STORE]
    expected = {rec.event_id: rec.position for rec in await store.read_all(created_at, 10_000)
                if webhook_event(rec) is not None}
    assert len(expected) == 4  # three agent.created, one run.started
    await until(lambda: set(expected) <= {c.delivery for c in receiver.calls}, what="attempts of every event")

    # when the server stops with every delivery still being retried
    await gateway.server.close()
    with sqlite3.connect(gateway.db_path) as db:
        assert db.execute("SELECT count(*) FROM webhook_deliveries").fetchone() == (0,)
    # and a new server on the same file finds a receiver that works
    receiver.status = 200
    second = await restart(gateway, aiohttp_server)

    # then every event arrives (receivers dedupe on X-Rungate-Delivery): none missing
    await until(lambda: set(expected) <= {c.delivery for c in receiver.delivered()}, what="every event delivered")
    assert sorted(c.delivery for c in receiver.delivered()) == sorted(expected)
    for call in receiver.delivered():
        assert_signed(call, hook["secret"])  # the secret decrypts in the new process
        assert call.payload["data"]["position"] == expected[call.delivery]
    deliveries: list[dict[str, Any]] = []
    for _ in range(100):
        deliveries = (await api(second, "GET", ONE + "/deliveries", 200, webhook_id=hook["id"]))["data"]
        if len(deliveries) == len(expected):
            break
        await asyncio.sleep(0.05)
    assert {d["event_id"] for d in deliveries} == set(expected)
    assert all(d["status"] == "delivered" for d in deliveries)

    # and once they are recorded, a further restart sends nothing again, only what is new
    third = await restart(second, aiohttp_server)
    sent = len(receiver.calls)
    await asyncio.sleep(0.8)  # three polling rounds of the deliverer
    assert len(receiver.calls) == sent
    await third.new_agent("after-restarts")
    await until(lambda: len(receiver.calls) == sent + 1, what="the new event")
    assert receiver.calls[-1].payload["data"]["name"] == "after-restarts"
    for _ in range(100):  # the outcome (and the cursor it moves) is recorded just after the receiver answers
        got = (await api(third, "GET", ONE, 200, webhook_id=hook["id"]))["data"]
        if got["delivered_through"] >= max(expected.values()):
            break
        await asyncio.sleep(0.05)
    assert got["delivered_through"] >= max(expected.values())

    # and the webhook tables rebuild from the log to the same rows
    for _ in range(100):
        if len((await api(third, "GET", ONE + "/deliveries", 200, webhook_id=hook["id"]))["data"]) == 5:
            break
        await asyncio.sleep(0.05)
    store = third.app[STORE]

    async def rows() -> list[list[dict[str, Any]]]:
        return [await store.fetch("SELECT * FROM webhooks ORDER BY id"),
                await store.fetch("SELECT * FROM webhook_deliveries ORDER BY id")]

    before = await rows()
    await store.rebuild()
    assert await rows() == before and len(before[1]) == 5


async def test_the_test_endpoint_sends_one_signed_envelope_and_reports_the_outcome(
        make_gateway: GatewayFactory, receiver: Receiver) -> None:
    gateway = await make_gateway(**ALLOW)
    hook = await create_hook(gateway, receiver.url, events=["run.started"], enabled=False)
    ok = (await api(gateway, "POST", ONE + "/test", 200, {}, webhook_id=hook["id"]))["data"]
    assert (ok["delivered"], ok["status_code"], ok["error"]) == (True, 200, None)
    [call] = receiver.calls
    assert_signed(call, hook["secret"])
    assert call.payload["event"] == "webhook.test" and call.payload["data"]["webhook_id"] == hook["id"]
    assert call.delivery.startswith("test_")

    receiver.status = 500
    failed = (await api(gateway, "POST", ONE + "/test", 200, {}, webhook_id=hook["id"]))["data"]
    assert (failed["delivered"], failed["status_code"], failed["error"]) == (False, 500, "HTTP 500")
    await api(gateway, "PATCH", ONE, 200, {"url": "http://127.0.0.1:1/hook"}, webhook_id=hook["id"])
    unreachable = (await api(gateway, "POST", ONE + "/test", 200, {}, webhook_id=hook["id"]))["data"]
    assert unreachable["delivered"] is False and unreachable["status_code"] is None
    assert unreachable["error"].startswith("connection failed")
    # tests are not deliveries
    assert (await api(gateway, "GET", ONE + "/deliveries", 200, webhook_id=hook["id"]))["data"] == []


async def test_a_receiver_that_hangs_does_not_slow_proxied_calls(
        make_gateway: GatewayFactory, receiver: Receiver) -> None:
    gateway = await make_gateway(**ALLOW)
    await create_hook(gateway, receiver.url)
    receiver.hang = asyncio.Event()
    try:
        token = await gateway.new_agent("busy")  # agent.created: its delivery hangs
        await until(lambda: receiver.hanging > 0, what="a hanging delivery")
        timings = []
        for i in range(5):
            started = time.monotonic()
            assert await chat(gateway, token, f"hang-run-{i}") == 200  # run.started each: more deliveries
            timings.append(time.monotonic() - started)
        assert receiver.hanging > 0, "the receiver was still hanging during the calls"
        assert max(timings) < 1.0, timings
    finally:
        receiver.hang.set()


async def test_webhook_admin_errors_use_the_admin_error_shape(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            gateway.url + HOOKS, data="{", headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                                                    "Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        body = await resp.json()
    validate_response("POST", HOOKS, 400, body)
    assert body["error"]["code"] == "invalid_json"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _serve(db: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """`rungate serve --mock` on a free port, once it answers /health."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rungate", "--database-url", f"sqlite:///{db}", "serve", "--mock",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **env})
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        for _ in range(400):
            try:
                async with http.get(base + "/health") as resp:
                    if resp.status == 200:
                        return proc, base
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError("rungate serve did not start")


async def test_deliveries_survive_a_sigkill_of_the_server_mid_delivery(tmp_path: Path, receiver: Receiver) -> None:
    # Given a real `rungate serve` whose webhook receiver fails every attempt for now
    env = {**ALLOW, "RUNGATE_ADMIN_TOKEN": ADMIN_TOKEN, "RUNGATE_WEBHOOK_RETRY_BASE_S": "0.2",
           "RUNGATE_LOG_LEVEL": "warning"}
    db = tmp_path / "killed.db"
    receiver.status = 500
    proc, base = await _serve(db, env)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        async with aiohttp.ClientSession(headers=admin) as http:
            async with http.post(base + HOOKS, json={"url": receiver.url, "events": ["agent.created"]}) as resp:
                assert resp.status == 201
                secret = (await resp.json())["data"]["secret"]
            agents = []
            for i in range(5):
                async with http.post(base + "/api/agents", json={"name": f"killed-{i}"}) as resp:
                    agents.append((await resp.json())["data"]["id"])
        # When it is killed (SIGKILL) while those deliveries are being retried
        await until(lambda: len({c.delivery for c in receiver.calls}) >= 3, what="delivery attempts")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Then a new server on the same file, its receiver now well, delivers every one of them
    receiver.status = 200
    proc, base = await _serve(db, env)
    try:
        await until(lambda: {c.payload["data"]["agent_id"] for c in receiver.delivered()} >= set(agents),
                    timeout=20, what="every agent.created after the restart")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    for call in receiver.delivered():
        assert_signed(call, secret)
