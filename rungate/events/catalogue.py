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
    # Served by the other vendor: what its request, answer or stream could not carry and was dropped.
    translation_dropped: list[str] = []
    # Shadow-mode decisions on the answer (a tool a shadow `tools.blocked` would have refused), as StepStarted's.
    warnings: list[dict[str, Any]] = []
    # A Responses API answer's own id: a later call that continues it (`previous_response_id`) carries its input
    # and output as input, which that call's reservation counts.
    response_id: str | None = None


class StepFailedOver(Event):
    """A step's target failed before anything reached the agent, and the call goes on at another attempt
    (`to_step_id`, admitted against the budget at its own target's price in the same transaction).

    `reason` is what failed (`timeout`, `status 503`, `ClientConnectorError`, `circuit_open`, …); `retry` is
    true when the next attempt is the same target again (after `delay_s`).
    """

    run_id: str
    step_id: str
    to_step_id: str
    from_provider: str
    from_model: str
    to_provider: str
    to_model: str
    reason: str
    retry: bool = False
    delay_s: float = 0.0
    # The stream had reached the agent: the next attempt continues the answer (an assistant prefill).
    continuation: bool = False


class CallRefused(Event):
    """A call was refused before anything went upstream (SPEC §4); recorded on its run's stream when it was
    refused inside a run of its agent, else on the agent's stream.

    `rule` names the rule by its path in the policy and `policy` the version that refused (None for
    refusals no policy makes, such as a closed run). `step_id` is the id the refused call's step would have
    had: the `step_that_tripped` a budget refusal names.
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
    step_id: str | None = None


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
    warnings: list[dict[str, Any]] = []  # shadow-mode decisions that would have refused it, as StepStarted's


class AnswerHeld(Event):
    """An answer called a tool that needs a human's approval: it is held, not delivered (SPEC §5).

    `origin` is `answer` (a model answer: `body` is exactly what the client would have received, JSON or
    SSE text, and `step_id` the step that produced it, already settled and charged) or `step` (a tool step
    the agent logged: `body` is the step to record once approved). Retries of the same request — the same
    run and `fingerprint` — are answered from it: 202 while a gate is pending, the held answer once every
    gate is approved, 403 once one is rejected. `expires_at` is the earliest gate's expiry, and `on_expiry`
    what it then becomes (`approve` only when every gate says so).
    """

    hold_id: str
    run_id: str
    agent_id: str
    step_id: str
    origin: str
    endpoint: str
    fingerprint: str
    stream: bool = False
    http_status: int = 200
    headers: dict[str, str] = {}
    body: str
    body_encoding: str = "utf-8"  # or "base64", for an answer that is not valid UTF-8
    gate_ids: list[str]
    rule: str  # the first gate's rule (a refusal names the rejected gate's)
    expires_at: str
    on_expiry: str = "reject"
    mode: str = "202"  # how a pending retry is answered: "202", or "hold" (the connection waits)
    policy: dict[str, Any] | None = None


class ApprovalRequested(Event):
    """A gate (`gate_…`) opened on one tool call of a held answer, by the approval rule `rule`."""

    gate_id: str
    hold_id: str
    run_id: str
    agent_id: str
    rule: str
    tool: str
    tool_call_id: str | None = None
    args: Any = None  # the call's arguments as the model sent them (None when they could not be read)
    args_text: str | None = None  # the raw arguments text, when they could not be read as JSON
    channel: str = "webhook"
    expires_at: str
    on_expiry: str = "reject"
    policy: dict[str, Any] | None = None


class ApprovalGranted(Event):
    """An operator approved the gate, optionally replacing the call's arguments (`edited_args`)."""

    gate_id: str
    hold_id: str
    run_id: str
    decided_by: str
    reason: str | None = None
    edited_args: dict[str, Any] | None = None


class ApprovalRejected(Event):
    """An operator rejected the gate: the held answer is never delivered."""

    gate_id: str
    hold_id: str
    run_id: str
    decided_by: str
    reason: str | None = None


class ApprovalExpired(Event):
    """The gate was not decided in time; `outcome` is what its rule's `on_expiry` made of it."""

    gate_id: str
    hold_id: str
    run_id: str
    outcome: str  # "rejected" | "approved"


class HeldAnswerRetried(Event):
    """The agent sent a held request again: still pending (202), `released` (the held answer, no upstream
    call), or `rejected` (403 `approval_rejected`). Not a step: not charged, not rate-limited."""

    hold_id: str
    run_id: str
    outcome: str


class ApprovalShadowed(Event):
    """A rule in shadow mode would have held this answer; it was delivered (and the agent warned)."""

    run_id: str
    step_id: str
    rule: str
    tool: str


class ApprovalDecisionRefused(Event):
    """Someone not entitled to decide a gate tried to (an agent's token, say); nothing changed."""

    gate_id: str
    agent_id: str | None = None
    reason: str


class WebhookCreated(Event):
    """A webhook endpoint was registered; its signing secret is stored only AES-256-GCM encrypted (the
    webhook's id as associated data). It is sent the events recorded after this one (no backfill)."""

    webhook_id: str
    url: str
    events: list[str]
    description: str | None = None
    enabled: bool = True
    nonce: str
    ciphertext: str


class WebhookUpdated(Event):
    """The webhook's URL, event filter, description or enabled flag changed (None: unchanged). Enabling a
    disabled webhook starts it at this event: what happened while it was disabled is not sent."""

    webhook_id: str
    url: str | None = None
    events: list[str] | None = None
    description: str | None = None
    enabled: bool | None = None


class WebhookSecretRotated(Event):
    """The webhook got a new signing secret (encrypted like the first); the previous one keeps signing too,
    as a second signature, until `previous_valid_until`."""

    webhook_id: str
    nonce: str
    ciphertext: str
    previous_valid_until: str


class WebhookDeleted(Event):
    """The webhook was deleted: nothing more is sent to it."""

    webhook_id: str


class WebhookDelivered(Event):
    """The receiver answered 2xx to the event at `event_position` (after `attempts` tries). `cursor` is the
    webhook's new low-water mark: every event it wants up to that position has reached a final outcome."""

    webhook_id: str
    delivery_id: str
    event_id: str
    event_position: int
    event: str
    attempts: int
    status_code: int | None = None
    first_attempt_at: str
    last_attempt_at: str
    cursor: int


class WebhookDeadLettered(Event):
    """The event at `event_position` was given up on: every attempt failed until the dead-letter horizon.
    `status_code` and `error` describe the last attempt; `cursor` as in `WebhookDelivered`."""

    webhook_id: str
    delivery_id: str
    event_id: str
    event_position: int
    event: str
    attempts: int
    status_code: int | None = None
    error: str | None = None
    first_attempt_at: str
    last_attempt_at: str
    cursor: int


class WebhookCursorAdvanced(Event):
    """The webhook's low-water mark moved past a long stretch of events it does not want, so a restart
    need not read them again."""

    webhook_id: str
    cursor: int


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
    AnswerHeld,
    ApprovalRequested,
    ApprovalGranted,
    ApprovalRejected,
    ApprovalExpired,
    HeldAnswerRetried,
    ApprovalShadowed,
    ApprovalDecisionRefused,
    WebhookCreated,
    WebhookUpdated,
    WebhookSecretRotated,
    WebhookDeleted,
    WebhookDelivered,
    WebhookDeadLettered,
    WebhookCursorAdvanced,
)
