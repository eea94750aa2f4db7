"""Every route against every kind of caller: who may call what.

The matrix is explicit: public routes answer anyone, the agent routes (`/v1/…`) only an enabled agent's
token, the admin and audit routes (`/api/…`) only the admin token. A route that forgot its check, or one
added later without one, fails here. Nothing here reaches the upstream: the bodies are empty or refused.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.conftest import ADMIN_TOKEN, Gateway
from tests.store_helpers import route_path

PUBLIC = {("GET", "/health"), ("GET", "/openapi.json")}
REFUSED = {401, 403}
# A disabled agent's call is refused by the admission (so that the refusal is recorded), which a body that
# fails validation never reaches: it is sent a well-formed call, which nothing lets past the admission.
_MESSAGES = [{"role": "user", "content": "hi"}]
WELL_FORMED = {
    "/v1/chat/completions": {"model": "mock-gpt", "messages": _MESSAGES},
    "/v1/responses": {"model": "mock-gpt", "input": "hi"},
    "/v1/messages": {"model": "mock-claude", "max_tokens": 5, "messages": _MESSAGES},
    "/v1/v1/messages": {"model": "mock-claude", "max_tokens": 5, "messages": _MESSAGES},
    "/v1/embeddings": {"model": "mock-embed", "input": "hi"},
}



def _allowed(method: str, template: str, caller: str) -> bool:
    if (method, template) in PUBLIC:
        return True
    if template.startswith("/v1/"):
        return caller == "agent"
    return caller == "admin"


async def test_every_route_admits_exactly_the_callers_the_matrix_names(gateway: Gateway) -> None:
    agent = await gateway.new_agent("matrix")
    disabled = await gateway.new_agent("matrix-disabled")
    status, body = await gateway.admin("GET", "/api/agents")
    assert status == 200, body
    disabled_id = next(a["id"] for a in body["data"] if a["name"] == "matrix-disabled")
    status, body = await gateway.admin("PATCH", f"/api/agents/{disabled_id}", {"disabled": True})
    assert status == 200, body
    callers: dict[str, dict[str, str]] = {
        "anonymous": {},
        "not a bearer": {"Authorization": f"Basic {agent}"},
        "unknown agent token": {"Authorization": "Bearer rg_agt_" + "u" * 43},
        "unknown admin token": {"Authorization": "Bearer rg_adm_" + "u" * 40},
        "disabled agent": {"Authorization": f"Bearer {disabled}"},
        "agent": {"x-api-key": agent},  # the Anthropic SDKs' header; Bearer is used everywhere else here
        "admin": {"Authorization": f"Bearer {ADMIN_TOKEN}"},
    }
    routes = sorted({(route.method, route.resource.canonical) for route in gateway.app.router.routes()
                     if route.method != "HEAD" and route.resource is not None})
    assert len(routes) > 30 and any(t.startswith("/v1/") for _, t in routes) and any(
        t.startswith("/api/") for _, t in routes)

    wrong: list[str] = []
    upstream_before = len(gateway.upstream_requests)
    async with aiohttp.ClientSession() as http:
        for method, template in routes:
            for caller, headers in callers.items():
                kwargs: dict[str, Any] = {"headers": headers}
                if method in ("POST", "PUT", "PATCH"):
                    kwargs["json"] = WELL_FORMED.get(template, {}) if caller == "disabled agent" else {}
                async with http.request(method, gateway.url + route_path(template, "matrix"), **kwargs) as resp:
                    answered = resp.status
                    await resp.read()
                allowed = _allowed(method, template, caller)
                if answered >= 500 or (allowed and answered in REFUSED) or (not allowed and answered not in REFUSED):
                    wrong.append(f"{method} {template} as {caller}: {answered}")
    assert wrong == [], "\n".join(wrong)
    assert len(gateway.upstream_requests) == upstream_before  # no empty body went upstream
