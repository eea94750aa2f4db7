"""Every event type Rungate records: agents, provider keys, policies, runs, steps and decisions.

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


class AgentPolicySet(Event):
    """The agent's default policy changed (`policy_id` None: no default); runs already started keep theirs."""

    agent_id: str
    policy_id: str | None


class PolicyVersionCreated(Event):
    """A policy was created (version 1) or changed (version n+1); every version is kept forever."""

    policy_id: str
    name: str
    version: int
    document: dict[str, Any]


class PolicyDeleted(Event):
    """The policy no longer applies to new runs; runs bound to one of its versions keep it."""

    policy_id: str


class RunStarted(Event):
    """A run began: explicitly named by the client, or an auto-run grouping an agent's calls."""

    run_id: str
    agent_id: str
    auto: bool
    policy: dict[str, Any] | None = None
    # The policy's `runs.idle_timeout_s`, fixed when the run starts (None: the server's idle window).
    idle_timeout_s: int | None = None


class RunCompleted(Event):
    """A run was closed: by the agent, by idle timeout, or superseded by a new auto-run."""

    run_id: str
    status: str
    ended_reason: str
    metadata: dict[str, Any] = {}


class StepStarted(Event):
    """A call was admitted and is about to go upstream (written before any byte leaves).

    `reserved_pusd` and `reserved_tokens` are its worst case, held against the run's budget until it settles;
    `warnings` lists shadow-mode decisions that would have refused it and anything changed (a shrunk
    `max_tokens`).
    """

    step_id: str
    run_id: str
    kind: str
    endpoint: str
    provider: str
    model: str
    stream: bool
    fingerprint: str
    reserved_pusd: int = 0
    reserved_tokens: int = 0
    warnings: list[dict[str, Any]] = []
    rate_scopes: list[str] = []  # rate windows this call counts in (`agent:ID`, `run:ID`), per its policy
    policy: dict[str, Any] | None = None  # the policy version that admitted it (`id`, `name`, `version`)


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
    """A call was refused before anything went upstream; recorded on the agent's stream (SPEC §4).

    `rule` names the rule by its path in the policy and `policy` the version that refused (None for
    refusals no policy makes, such as a closed run).
    """

    agent_id: str
    run_id: str | None
    endpoint: str
    model: str | None
    status: int
    code: str
    reason: str
    rule: str | None = None
    policy: dict[str, Any] | None = None


class BudgetAlerted(Event):
    """What the run used reached `threshold` (a fraction) of one of its caps; once per threshold, cap and run.

    `cap` is `run_usd` (the run's USD cap plus top-ups; `spend_pusd`, `limit_pusd`), `run_tokens` (its
    token cap; `tokens_used`, `limit_tokens`) or `agent_hourly_usd` (the agent's settled spend over the
    last hour, all its runs, as this run's settlement saw it; `spend_pusd`, `limit_pusd`).
    """

    run_id: str
    threshold: float
    cap: str = "run_usd"
    spend_pusd: int | None = None
    limit_pusd: int | None = None
    tokens_used: int | None = None
    limit_tokens: int | None = None


class BudgetExceeded(Event):
    """One of the run's caps (`run_usd` or `run_tokens`, as in `BudgetAlerted`) was reached, or a call was
    refused for it; once per cap and run."""

    run_id: str
    cap: str = "run_usd"
    spend_pusd: int | None = None
    limit_pusd: int | None = None
    tokens_used: int | None = None
    limit_tokens: int | None = None
    step_id: str | None = None


class PolicyDrifted(Event):
    """An agent asked for a model its policy does not allow (the `policy.drift` signal), refused or, in
    shadow mode, let through."""

    agent_id: str
    run_id: str | None
    model: str
    provider: str
    rule: str
    policy: dict[str, Any]
    enforced: bool


class RunStopped(Event):
    """An operator stopped the run (kill switch): every later call is refused, calls in flight are cut."""

    run_id: str
    reason: str | None = None


class RunBlocked(Event):
    """What the run used reached one of its enforced caps (`cap`: `run_usd` or `run_tokens`; `rule` names it in
    the policy): its calls are refused (402) until an operator resumes it, usually with a top-up."""

    run_id: str
    cap: str
    rule: str


class RunResumed(Event):
    """An operator let a stopped or blocked run continue, optionally with more budget (`add_pusd`)."""

    run_id: str
    add_pusd: int = 0


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
    policy: dict[str, Any] | None = None  # the policy version that admitted it (`id`, `name`, `version`)


ALL_EVENTS: tuple[type[Event], ...] = (
    AgentCreated,
    AgentTokenRotated,
    AgentUpdated,
    AgentDeleted,
    AgentPolicySet,
    PolicyVersionCreated,
    PolicyDeleted,
    ProviderKeyAdded,
    ProviderKeyRemoved,
    RunStarted,
    RunCompleted,
    StepStarted,
    StepCompleted,
    CallRefused,
    BudgetAlerted,
    BudgetExceeded,
    PolicyDrifted,
    RunStopped,
    RunBlocked,
    RunResumed,
    ToolStepLogged,
)
