"""Every event type Rungate records (issue 2 scope: agents, provider keys, runs, steps).

Money is integer pico-USD (1e-12 USD) in events; JSON on the wire carries decimal strings.
"""

from __future__ import annotations

from typing import Any

from rungate.events.base import Event


class AgentCreated(Event):
    """An agent identity was created; only the SHA-256 of its token is kept."""

    agent_id: str
    name: str
    token_hash: str
    metadata: dict[str, Any] = {}


class AgentTokenRotated(Event):
    """The agent's token was replaced; the old one stops working at once."""

    agent_id: str
    token_hash: str


class AgentUpdated(Event):
    """The agent's name, metadata or enabled flag changed."""

    agent_id: str
    name: str | None = None
    disabled: bool | None = None
    metadata: dict[str, Any] | None = None


class AgentDeleted(Event):
    """The agent was deleted: its token stops working at once; its runs stay in the audit trail."""

    agent_id: str


class ProviderKeyAdded(Event):
    """A provider key was stored, AES-256-GCM encrypted under the master key."""

    key_id: str
    name: str
    provider: str
    nonce: str
    ciphertext: str
    hint: str


class ProviderKeyRemoved(Event):
    """A provider key was deleted; it is no longer used for any call."""

    key_id: str


class RunStarted(Event):
    """A run began: explicitly named by the client, or an auto-run grouping an agent's calls."""

    run_id: str
    agent_id: str
    auto: bool
    policy: dict[str, Any] | None = None


class RunCompleted(Event):
    """A run was closed: by the agent, by idle timeout, or superseded by a new auto-run."""

    run_id: str
    status: str
    ended_reason: str
    metadata: dict[str, Any] = {}


class StepStarted(Event):
    """A call was admitted and is about to go upstream (written before any byte leaves)."""

    step_id: str
    run_id: str
    kind: str
    endpoint: str
    provider: str
    model: str
    stream: bool
    fingerprint: str
    reserved_pusd: int = 0


class StepCompleted(Event):
    """A call ended; `usage` is what the provider reported, or an estimate when `estimated`."""

    step_id: str
    run_id: str
    status: str
    http_status: int | None = None
    provider: str
    model: str
    usage: dict[str, int]
    cost_pusd: int | None
    unpriced: bool = False
    estimated: bool = False
    latency_ms: int
    error: str | None = None
    tool_calls: list[dict[str, Any]] = []


class CallRefused(Event):
    """A call was refused before anything went upstream; recorded on the agent's stream (SPEC §4)."""

    agent_id: str
    run_id: str | None
    endpoint: str
    model: str | None
    status: int
    code: str
    reason: str


class ToolStepLogged(Event):
    """The agent logged a tool step the proxy could not see (`POST /v1/runs/{id}/steps`)."""

    step_id: str
    run_id: str
    tool: str
    status: str
    provider: str | None = None
    args: dict[str, Any] = {}
    result: dict[str, Any] = {}
    usage: dict[str, int] = {}
    cost_pusd: int | None = None
    latency_ms: int = 0
    error: str | None = None


ALL_EVENTS: tuple[type[Event], ...] = (
    AgentCreated,
    AgentTokenRotated,
    AgentUpdated,
    AgentDeleted,
    ProviderKeyAdded,
    ProviderKeyRemoved,
    RunStarted,
    RunCompleted,
    StepStarted,
    StepCompleted,
    CallRefused,
    ToolStepLogged,
)
