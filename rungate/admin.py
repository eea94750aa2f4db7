"""Operator commands shared by the admin API and the CLI: agents and provider keys.

Each is a store command, so names stay unique under concurrency and every change is an event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rungate import queries
from rungate.config import Settings
from rungate.crypto import Keyring, key_hint, load_keyring
from rungate.errors import BadRequest, ConfigError, Conflict, NotFound, StoreError
from rungate.events import NewEvent, stream_name
from rungate.events.catalogue import (
    AgentCreated,
    AgentDeleted,
    AgentPolicySet,
    AgentTokenRotated,
    AgentUpdated,
    ProviderKeyAdded,
    ProviderKeyRemoved,
)
from rungate.ids import new_id, new_token, token_hash
from rungate.store import EventStore, Lookup, Row

PROVIDERS = ("openai", "anthropic")


def check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise BadRequest(f"{what} name must be a non-empty string of at most 200 characters.", code="invalid_name")
    return name.strip()


@dataclass
class CreateAgent:
    """Create an agent (with `policy_name` as the default policy of its runs, when given)."""

    name: str
    metadata: dict[str, Any]
    agent_id: str = field(default_factory=lambda: new_id("agt"))
    token: str = field(default_factory=lambda: new_token("rg_agt"), repr=False)
    policy_name: str | None = None

    def lookups(self) -> Sequence[Lookup]:
        named = Lookup.of("agents", "id", name=self.name)
        if self.policy_name is None:
            return (named,)
        return (named, Lookup.of("policies", "id", name=self.policy_name, deleted=0))

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        lookups = self.lookups()
        if found[lookups[0]] is not None:
            raise Conflict(f"An agent named {self.name!r} already exists.", code="name_taken")
        stream = stream_name("agent", self.agent_id)
        events = [NewEvent(stream, AgentCreated(agent_id=self.agent_id, name=self.name,
                                                token_hash=token_hash(self.token), metadata=self.metadata))]
        if self.policy_name is not None:
            policy = found[lookups[1]]
            if policy is None:
                raise NotFound(f"Policy {self.policy_name!r} not found.", code="unknown_policy")
            events.append(NewEvent(stream, AgentPolicySet(agent_id=self.agent_id, policy_id=policy["id"])))
        return events


@dataclass
class RotateAgentToken:
    agent_id: str
    token: str = field(default_factory=lambda: new_token("rg_agt"), repr=False)

    def lookups(self) -> Sequence[Lookup]:
        return (Lookup.of("agents", id=self.agent_id),)

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        if found[self.lookups()[0]] is None:
            raise NotFound(f"Agent {self.agent_id} not found.")
        return (NewEvent(stream_name("agent", self.agent_id),
                         AgentTokenRotated(agent_id=self.agent_id, token_hash=token_hash(self.token))),)


@dataclass
class UpdateAgent:
    """Change an agent's name, status and metadata (None: unchanged) and, with `set_policy`, the default
    policy of its future runs (`policy_name`, None for none) — in one command: a taken name or an unknown
    policy refuses the whole change, so a half-applied update is never seen."""

    agent_id: str
    name: str | None
    disabled: bool | None
    metadata: dict[str, Any] | None
    set_policy: bool = False
    policy_name: str | None = None

    def __post_init__(self) -> None:
        self._agent = Lookup.of("agents", "id", "policy_id", id=self.agent_id)
        self._named = Lookup.of("agents", "id", name=self.name) if self.name is not None else None
        self._policy = (Lookup.of("policies", "id", name=self.policy_name, deleted=0)
                        if self.set_policy and self.policy_name is not None else None)

    def lookups(self) -> Sequence[Lookup]:
        return tuple(lookup for lookup in (self._agent, self._named, self._policy) if lookup is not None)

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        agent = found[self._agent]
        if agent is None:
            raise NotFound(f"Agent {self.agent_id} not found.")
        if self._named is not None and (other := found[self._named]) is not None and other["id"] != self.agent_id:
            raise Conflict(f"An agent named {self.name!r} already exists.", code="name_taken")
        stream = stream_name("agent", self.agent_id)
        events = []
        if (self.name, self.disabled, self.metadata) != (None, None, None) or not self.set_policy:
            events.append(NewEvent(stream, AgentUpdated(agent_id=self.agent_id, name=self.name,
                                                        disabled=self.disabled, metadata=self.metadata)))
        if self.set_policy:
            policy = found[self._policy] if self._policy is not None else None
            if self._policy is not None and policy is None:
                raise NotFound(f"Policy {self.policy_name!r} not found.", code="unknown_policy")
            policy_id = policy["id"] if policy is not None else None
            if agent["policy_id"] != policy_id:
                events.append(NewEvent(stream, AgentPolicySet(agent_id=self.agent_id, policy_id=policy_id)))
        return events


@dataclass
class DeleteAgent:
    agent_id: str

    def lookups(self) -> Sequence[Lookup]:
        return (Lookup.of("agents", id=self.agent_id),)

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        if found[self.lookups()[0]] is None:
            raise NotFound(f"Agent {self.agent_id} not found.")
        return (NewEvent(stream_name("agent", self.agent_id), AgentDeleted(agent_id=self.agent_id)),)


@dataclass
class AddProviderKey:
    name: str
    provider: str
    nonce: str
    ciphertext: str = field(repr=False)
    hint: str
    key_id: str

    def lookups(self) -> Sequence[Lookup]:
        return (Lookup.of("provider_keys", name=self.name),)

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        if found[self.lookups()[0]] is not None:
            raise Conflict(f"A provider key named {self.name!r} already exists.", code="name_taken")
        return (NewEvent(stream_name("provkey", self.key_id), ProviderKeyAdded(
            key_id=self.key_id, name=self.name, provider=self.provider, nonce=self.nonce,
            ciphertext=self.ciphertext, hint=self.hint)),)


@dataclass
class RemoveProviderKey:
    key_id: str

    def lookups(self) -> Sequence[Lookup]:
        return (Lookup.of("provider_keys", id=self.key_id),)

    def decide(self, found: Mapping[Lookup, Row | None], now: str) -> Sequence[NewEvent]:
        if found[self.lookups()[0]] is None:
            raise NotFound(f"Provider key {self.key_id} not found.")
        return (NewEvent(stream_name("provkey", self.key_id), ProviderKeyRemoved(key_id=self.key_id)),)


async def create_agent(store: EventStore, name: Any, metadata: Any = None, policy: Any = None) -> tuple[Row, str]:
    """Create an agent (optionally with a default policy, by name); returns its row and the token (shown once)."""
    if metadata is not None and not isinstance(metadata, dict):
        raise BadRequest("metadata must be an object.", code="invalid_metadata")
    if policy is not None and not isinstance(policy, str):
        raise BadRequest("policy must be the name of a policy (or null).", code="invalid_policy_name")
    command = CreateAgent(check_name(name, "Agent"), metadata or {}, policy_name=policy)
    await store.execute(command)
    row = await queries.get_agent(store, command.agent_id)
    assert row is not None
    return row, command.token


async def add_provider_key(store: EventStore, keyring: Keyring, provider: Any, name: Any, secret: Any) -> Row:
    """Store a provider key encrypted; returns its row (without the secret)."""
    if provider not in PROVIDERS:
        raise BadRequest(f"provider must be one of {', '.join(PROVIDERS)}.", code="invalid_provider")
    if not isinstance(secret, str) or len(secret.strip()) < 8:
        raise BadRequest("api_key must be a string of at least 8 characters.", code="invalid_api_key")
    key = secret.strip()
    if not key.isprintable() or not key.isascii():
        # It goes out in a header: a line break or control character would fail every call to the provider.
        raise BadRequest("api_key must be printable ASCII (no spaces at its ends, no line breaks or control"
                         " characters).", code="invalid_api_key")
    key_id = new_id("pk")
    nonce, ciphertext = keyring.encrypt(key_id, key)
    await store.execute(AddProviderKey(check_name(name, "Key"), provider, nonce, ciphertext, key_hint(key), key_id))
    row = await queries.get_provider_key(store, key_id)
    assert row is not None
    return row


async def open_keyring(settings: Settings, store: EventStore) -> Keyring:
    """The keyring for `settings`, refusing to make a new key while provider keys are stored under a lost one.

    A freshly made key is written beside the database only after that check.
    """
    keyring = load_keyring(settings)
    if keyring.generated and await queries.provider_key_count(store):
        raise ConfigError(f"RUNGATE_MASTER_KEY: the key file beside the database ({settings.sqlite_path}.key) is"
                          " missing but provider keys are stored under it; restore it or set RUNGATE_MASTER_KEY")
    # A wrong key would start, then fail every call that needs a stored key (and store new keys under a second
    # master key): each stored key is opened once here instead.
    for row in await queries.list_provider_keys(store):
        try:
            keyring.decrypt(row["id"], row["nonce"], row["ciphertext"])
        except StoreError:
            raise ConfigError(f"RUNGATE_MASTER_KEY: the stored provider key {row['name']} ({row['id']}) does not"
                              " decrypt under this master key; set the key the provider keys were stored"
                              " under") from None
    keyring.persist()
    return keyring
