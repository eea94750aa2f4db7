"""Upstream targets and header hygiene.

The agent's token never goes upstream: the provider key stored in Rungate (or the provider's key from
the environment) replaces it. Hop-by-hop headers, Rungate's own headers and encodings do not pass;
vendor headers (`anthropic-version`, `anthropic-beta`, `openai-organization`, …) do.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import aiohttp
from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy

from rungate import queries
from rungate.config import Settings
from rungate.crypto import Keyring
from rungate.errors import ProviderError
from rungate.proxy.breaker import TargetKey
from rungate.readcache import ReadCache
from rungate.routing import ConfigRouteTarget, RouteTarget
from rungate.store import EventStore
from rungate.store.base import Row

HOP_BY_HOP = frozenset(h.lower() for h in (
    hdrs.CONNECTION, hdrs.KEEP_ALIVE, hdrs.PROXY_AUTHENTICATE, hdrs.PROXY_AUTHORIZATION, hdrs.TE,
    hdrs.TRAILER, hdrs.TRANSFER_ENCODING, hdrs.UPGRADE, "proxy-connection",
))
# Never forwarded upstream: credentials, framing the client session sets itself, and our own headers.
_REQUEST_DROP = HOP_BY_HOP | {
    "host", "authorization", "x-api-key", "content-length", "content-encoding", "accept-encoding", "cookie",
    "expect", "forwarded",
}
# Never relayed back: framing that aiohttp recomputes (bodies arrive decompressed) and cookies.
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "content-encoding", "set-cookie", "date", "server"}

_DROP_PREFIXES_TO_OPENAI = ("x-rungate-", "x-forwarded-", "anthropic-")
_DROP_PREFIXES_TO_ANTHROPIC = ("x-rungate-", "x-forwarded-", "openai-")

ANTHROPIC_DEFAULT_VERSION = "2023-06-01"
MOCK_KEY = "mock-provider-key"
DEFAULT_CONNECT_S = 10.0  # the session's own connect limit (app.py)


@dataclass(frozen=True)
class Target:
    """Where one attempt goes: provider, model, base URL and the plaintext key (never logged), and how long
    the target may take (None: the session's defaults)."""

    provider: str
    model: str
    base_url: str
    api_key: str
    key_id: str  # which stored key served the call ("env" or "mock" otherwise)
    connect_s: float | None = None
    first_token_s: float | None = None
    idle_s: float | None = None
    prefill: bool = False  # can it continue an assistant prefill

    def __repr__(self) -> str:  # keep the key out of any traceback or log line
        return f"Target(provider={self.provider!r}, model={self.model!r}, base_url={self.base_url!r})"

    @property
    def circuit(self) -> TargetKey:
        return (self.provider, self.base_url, self.model)

    def client_timeout(self, default_read_s: float) -> aiohttp.ClientTimeout | None:
        """This target's own socket limits (None: it has none, the session's apply): `connect_s` to connect,
        `idle_s` of silence (before a plain answer, which comes whole, and between a stream's chunks)."""
        if self.connect_s is None and self.idle_s is None:
            return None
        return aiohttp.ClientTimeout(total=None, sock_connect=self.connect_s or DEFAULT_CONNECT_S,
                                     sock_read=self.idle_s or default_read_s)


def upstream_headers(incoming: CIMultiDictProxy[str], target: Target) -> CIMultiDict[str]:
    """Headers for the upstream request: the client's vendor headers plus the provider's credentials."""
    # Headers the client names in `Connection:` are hop-by-hop too (RFC 9110 §7.6.1).
    connection = incoming.getall("Connection", ())
    named = {token.strip().lower() for value in connection for token in value.split(",")} if connection else ()
    out: CIMultiDict[str] = CIMultiDict()
    # Prefixes never forwarded: Rungate's own, proxies', and the other vendor's (after a failover across).
    dropped = _DROP_PREFIXES_TO_ANTHROPIC if target.provider == "anthropic" else _DROP_PREFIXES_TO_OPENAI
    for name, value in incoming.items():
        lower = name.lower()
        if lower in _REQUEST_DROP or lower in named or lower.startswith(dropped):
            continue
        out.add(name, value)
    out[hdrs.CONTENT_TYPE] = "application/json"
    if target.provider == "anthropic":
        out["x-api-key"] = target.api_key
        out.setdefault("anthropic-version", ANTHROPIC_DEFAULT_VERSION)
    else:
        out[hdrs.AUTHORIZATION] = f"Bearer {target.api_key}"
    return out


def relayed_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Headers of the provider's answer that the agent sees."""
    # The provider cannot speak for Rungate: its own `x-rungate-*` headers are dropped.
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if lower not in _RESPONSE_DROP and not lower.startswith("x-rungate-"):
            out.add(name, value)
    return out


class TargetResolver:
    """Chooses the provider key and base URL of each target a call may go to."""

    def __init__(self, settings: Settings, store: EventStore, keyring: Keyring,
                 mock_base_url: str | None = None) -> None:
        self._settings = settings
        self._store = store
        self._keyring = keyring
        self._mock_base_url = mock_base_url
        self._plain: dict[str, str] = {}
        # The newest key per provider ("none stored" included), re-read when a key is added or removed.
        self._newest = ReadCache(store, "agents", keep_missing=True)

    def base_url(self, provider: str, spec: RouteTarget | None = None) -> str:
        """Where `provider` is: the mock under `--mock`, else a route target's own base URL (configuration
        file only), else the provider's `RUNGATE_*_BASE_URL`."""
        if self._mock_base_url is not None:
            return self._mock_base_url + ("/v1" if provider == "openai" else "")
        if isinstance(spec, ConfigRouteTarget) and spec.base_url is not None:
            return spec.base_url.rstrip("/")
        return self._settings.openai_base_url if provider == "openai" else self._settings.anthropic_base_url

    def circuit(self, spec: RouteTarget) -> TargetKey:
        """The circuit-breaker key of a route target (known without reading its key)."""
        return (spec.provider, self.base_url(spec.provider, spec), spec.model)

    async def for_route(self, spec: RouteTarget) -> Target:
        """The target a route names: its stored key by name (else the provider's default key), base URL and
        timeouts. `ProviderError` when the key is missing or belongs to another provider."""
        if spec.key is None or self._mock_base_url is not None:
            target = await self.resolve(spec.provider, spec.model)
        else:
            row = await queries.provider_key_by_name(self._store, spec.key)
            if row is None or row["provider"] != spec.provider:
                raise ProviderError(f"The route's key {spec.key} is not a stored {spec.provider} key.",
                                    [{"provider": spec.provider, "model": spec.model, "status": None,
                                      "error": "no_provider_key"}])
            target = Target(spec.provider, spec.model, "", self._decrypt(row), row["id"])
        return replace(target, base_url=self.base_url(spec.provider, spec), connect_s=spec.timeouts.connect_s,
                       first_token_s=spec.timeouts.first_token_s, idle_s=spec.timeouts.idle_s,
                       prefill=spec.accepts_prefill)

    def _decrypt(self, row: Row) -> str:
        secret = self._plain.get(row["id"])
        if secret is None:  # key ids are never reused, so a decrypted key stays valid while its row exists
            secret = self._keyring.decrypt(row["id"], row["nonce"], row["ciphertext"])
            self._plain[row["id"]] = secret
        return secret

    async def resolve(self, provider: str, model: str) -> Target:
        """The target for `provider`; `ProviderError` when no key is configured for it."""
        base = self.base_url(provider)
        if self._mock_base_url is not None:
            return Target(provider, model, base, MOCK_KEY, "mock")
        row = await self._newest.get(provider, lambda: queries.newest_provider_key(self._store, provider))
        if row is not None:
            return Target(provider, model, base, self._decrypt(row), row["id"])
        env_key = self._settings.openai_api_key if provider == "openai" else self._settings.anthropic_api_key
        if env_key is not None:
            return Target(provider, model, base, env_key.get_secret_value(), "env")
        raise ProviderError(f"No {provider} key is configured in Rungate.",
                            [{"provider": provider, "model": model, "status": None, "error": "no_provider_key"}])
