"""Settings: read once at start-up from `RUNGATE_*` variables and an optional YAML file.

Nothing else in Rungate reads `os.environ`. A variable wins over the same key in the file's `server`
section. A bad value raises `ConfigError` naming the variable; secrets are `SecretStr` and never printed.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr

from rungate import yamldoc
from rungate.errors import ConfigError
from rungate.prices import LIMIT_KEYS, OVERRIDE_KEYS, Override, override_limit
from rungate.routing import EMPTY as EMPTY_ROUTES
from rungate.routing import RouteTable, parse_config_routes

# (setting, variable, default, description) — the README's settings table is checked against this.
SETTINGS_DOC: tuple[tuple[str, str, str, str], ...] = (
    ("host", "RUNGATE_HOST", "127.0.0.1", "Address to listen on."),
    ("port", "RUNGATE_PORT", "8080", "TCP port to listen on."),
    ("database_url", "RUNGATE_DATABASE_URL", "sqlite:///./rungate.db",
     "Event log location: `sqlite:///path` or `postgresql://…`."),
    ("master_key", "RUNGATE_MASTER_KEY", "(key file beside the database)",
     "32 bytes, base64 or hex: encrypts provider keys (AES-256-GCM). Unset: generated once into `<db>.key`."),
    ("admin_token", "RUNGATE_ADMIN_TOKEN", "(unset: admin API refuses all)",
     "Bootstrap admin token `rg_adm_…` for `/api`."),
    ("openai_base_url", "RUNGATE_OPENAI_BASE_URL", "https://api.openai.com/v1",
     "OpenAI upstream, including `/v1`."),
    ("anthropic_base_url", "RUNGATE_ANTHROPIC_BASE_URL", "https://api.anthropic.com",
     "Anthropic upstream, without `/v1`."),
    ("log_format", "RUNGATE_LOG_FORMAT", "console", "`console` or `json`."),
    ("log_level", "RUNGATE_LOG_LEVEL", "info", "`debug`, `info`, `warning` or `error`."),
    ("durability", "RUNGATE_DURABILITY", "full",
     "SQLite `synchronous` mode: `full` (every commit fsynced) or `normal`."),
    ("max_body_bytes", "RUNGATE_MAX_BODY_BYTES", "33554432",
     "Largest request body accepted, after decompression (413 beyond)."),
    ("idle_timeout_s", "RUNGATE_IDLE_TIMEOUT_S", "900", "Seconds of silence after which an auto-run closes."),
    ("mock", "RUNGATE_MOCK", "false", "`true` routes every call to the built-in mock provider."),
    ("upstream_timeout_s", "RUNGATE_UPSTREAM_TIMEOUT_S", "600",
     "Seconds the provider may stay silent (before answering or between stream chunks)."),
    ("max_hold_s", "RUNGATE_MAX_HOLD_S", "540",
     "Longest a hold-mode call waits for its approval (then it is told the approval is still pending)."),
    ("webhook_allow_private", "RUNGATE_WEBHOOK_ALLOW_PRIVATE", "false",
     "`true` lets webhooks target loopback, private, link-local and other non-public addresses."),
    ("webhook_rotation_grace_s", "RUNGATE_WEBHOOK_ROTATION_GRACE_S", "86400",
     "Seconds a webhook's previous secret keeps signing (a second signature) after a rotation."),
    ("webhook_dead_letter_s", "RUNGATE_WEBHOOK_DEAD_LETTER_S", "510",
     "Seconds after its first attempt at which a failing webhook delivery is dead-lettered."),
    ("webhook_retry_base_s", "RUNGATE_WEBHOOK_RETRY_BASE_S", "1",
     "First retry delay of a failing webhook delivery; doubled each time (with jitter), at most 60 s."),
    ("retry_base_s", "RUNGATE_RETRY_BASE_S", "0.5",
     "First delay before retrying a failed upstream attempt on the same target (jittered, doubling)."),
    ("retry_after_max_s", "RUNGATE_RETRY_AFTER_MAX_S", "10",
     "Longest provider `Retry-After` waited for on the same target; a longer one fails over at once."),
    ("breaker_threshold", "RUNGATE_BREAKER_THRESHOLD", "5",
     "Consecutive failures of a route target that open its circuit (the target is then skipped)."),
    ("breaker_cooldown_s", "RUNGATE_BREAKER_COOLDOWN_S", "30",
     "Seconds an open circuit skips its target before one probe call is let through."),
    ("config", "RUNGATE_CONFIG", "(none)", "Path of an optional YAML configuration file."),
)

_SERVER_KEYS = {name for name, *_ in SETTINGS_DOC} - {"config"}
_FILE_SECTIONS = {"server", "prices", "routes"}


@dataclass(frozen=True)
class Settings:
    """Every setting Rungate reads; built once by `load_settings` and passed explicitly."""

    host: str = "127.0.0.1"
    port: int = 8080
    database_url: str = field(default="sqlite:///./rungate.db", repr=False)  # may carry a password
    master_key: SecretStr | None = None
    admin_token: SecretStr | None = None
    openai_base_url: str = "https://api.openai.com/v1"
    anthropic_base_url: str = "https://api.anthropic.com"
    log_format: str = "console"
    log_level: str = "info"
    durability: str = "full"
    max_body_bytes: int = 32 * 1024 * 1024
    idle_timeout_s: int = 900
    mock: bool = False
    upstream_timeout_s: float = 600.0
    # Below the stock SDKs' 600 s read timeout, so a held call is answered before the client gives up.
    max_hold_s: float = 540.0
    webhook_allow_private: bool = False
    webhook_rotation_grace_s: int = 86400
    webhook_dead_letter_s: float = 510.0  # 8.5 minutes (SPEC §8)
    webhook_retry_base_s: float = 1.0
    retry_base_s: float = 0.5
    retry_after_max_s: float = 10.0
    breaker_threshold: int = 5
    breaker_cooldown_s: float = 30.0
    openai_api_key: SecretStr | None = None
    anthropic_api_key: SecretStr | None = None
    price_overrides: Mapping[str, Override] = field(default_factory=dict)
    routes: RouteTable = EMPTY_ROUTES

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file named by `database_url`, or None for PostgreSQL."""
        if self.database_url.startswith("sqlite:///"):
            return Path(self.database_url.removeprefix("sqlite:///"))
        return None

    @property
    def database_display(self) -> str:
        """`database_url` with any password masked, for printing."""
        scheme, sep, rest = self.database_url.partition("://")
        if "@" not in rest:
            return self.database_url
        userinfo, _, host = rest.rpartition("@")
        user = userinfo.split(":", 1)[0]
        return f"{scheme}{sep}{user}:***@{host}"

    def master_key_bytes(self) -> bytes:
        """The 32-byte master key; `ConfigError` when none is configured."""
        if self.master_key is None:
            raise ConfigError("RUNGATE_MASTER_KEY is not set", code="invalid_config")
        return parse_master_key(self.master_key.get_secret_value(), "RUNGATE_MASTER_KEY")


def parse_master_key(raw: str, name: str) -> bytes:
    """Decode a 32-byte key written as 64 hex characters or base64."""
    raw = raw.strip()
    key: bytes | None = None
    if len(raw) == 64:
        try:
            key = bytes.fromhex(raw)
        except ValueError:
            key = None
    if key is None:
        try:
            key = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            key = None
    if key is None or len(key) != 32:
        raise ConfigError(f"{name} must be 32 bytes written as 64 hex characters or base64")
    return key


def _as_int(name: str, value: Any, low: int, high: int) -> int:
    try:
        number = int(str(value), 10)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {number}")
    return number


def _as_float(name: str, value: Any, low: float, high: float) -> float:
    try:
        number = float(str(value))
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not low < number <= high:
        raise ConfigError(f"{name} must be in ({low}, {high}], got {number}")
    return number


def _as_bool(name: str, value: Any) -> bool:
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _as_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return text


def _as_url(name: str, value: Any) -> str:
    text = str(value).strip().rstrip("/")
    if not (text.startswith("http://") or text.startswith("https://")):
        raise ConfigError(f"{name} must be an http(s) URL, got {value!r}")
    return text


def _as_database_url(name: str, value: Any) -> str:
    text = str(value).strip()
    if text.startswith("sqlite:///") and len(text) > len("sqlite:///"):
        return text
    if text.startswith(("postgresql://", "postgres://")):
        return text
    # The value is not echoed: a PostgreSQL URL may carry a password.
    raise ConfigError(f"{name} must be sqlite:///PATH or postgresql://…")


def _parse_prices(raw: Any, source: str) -> dict[str, Override]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: prices must be a mapping of model to prices")
    table: dict[str, Override] = {}
    for model, entry in raw.items():
        if not isinstance(entry, dict) or not entry:
            raise ConfigError(f"{source}: prices.{model} must be a mapping of {list(OVERRIDE_KEYS)}")
        unknown = set(entry) - set(OVERRIDE_KEYS)
        if unknown:
            raise ConfigError(f"{source}: prices.{model} has unknown keys {sorted(unknown)}")
        parsed: dict[str, Decimal | int] = {}
        for key, value in entry.items():
            if key in LIMIT_KEYS:
                parsed[key] = override_limit(f"{source}: prices.{model}.{key}", value)
                continue
            try:
                amount = Decimal(str(value))
            except InvalidOperation:
                raise ConfigError(f"{source}: prices.{model}.{key} is not a number") from None
            if not amount.is_finite() or amount < 0:
                raise ConfigError(f"{source}: prices.{model}.{key} must be a finite number >= 0")
            parsed[key] = amount
        table[str(model)] = parsed
    return table


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yamldoc.load(fh) or {}
    except OSError as exc:
        raise ConfigError(f"RUNGATE_CONFIG: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"RUNGATE_CONFIG: {path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"RUNGATE_CONFIG: {path} must hold a mapping")
    unknown = set(doc) - _FILE_SECTIONS
    if unknown:
        raise ConfigError(f"RUNGATE_CONFIG: {path} has unknown sections {sorted(unknown)}")
    server = doc.get("server") or {}
    if not isinstance(server, dict):
        raise ConfigError(f"RUNGATE_CONFIG: {path}: server must be a mapping")
    unknown = set(server) - _SERVER_KEYS
    if unknown:
        raise ConfigError(f"RUNGATE_CONFIG: {path}: unknown server keys {sorted(unknown)}")
    return doc


def load_settings(env: Mapping[str, str] | None = None, config_file: str | None = None,
                  **overrides: Any) -> Settings:
    """Build the `Settings` from the environment, an optional YAML file and explicit overrides.

    Precedence: overrides (command-line flags) > `RUNGATE_*` variables > the file's `server` section >
    defaults. Raises `ConfigError` naming the first bad variable.
    """
    env = os.environ if env is None else env
    path = config_file or env.get("RUNGATE_CONFIG")
    doc = _read_file(path) if path else {}
    raw: dict[str, Any] = dict(doc.get("server") or {})
    names = {name: f"RUNGATE_CONFIG server.{name}" for name in raw}
    for name, variable, *_ in SETTINGS_DOC:
        if variable in env and name != "config":
            raw[name] = env[variable]
            names[name] = variable
    for name, value in overrides.items():
        if value is not None:
            raw[name] = value
            names[name] = f"--{name.replace('_', '-')}"

    def var(name: str) -> str:
        return names.get(name, f"RUNGATE_{name.upper()}")

    values: dict[str, Any] = {}
    if "host" in raw:
        values["host"] = str(raw["host"]).strip() or "127.0.0.1"
    if "port" in raw:
        values["port"] = _as_int(var("port"), raw["port"], 0, 65535)
    if "database_url" in raw:
        values["database_url"] = _as_database_url(var("database_url"), raw["database_url"])
    if raw.get("master_key"):
        parse_master_key(str(raw["master_key"]), var("master_key"))
        values["master_key"] = SecretStr(str(raw["master_key"]).strip())
    if raw.get("admin_token"):
        token = str(raw["admin_token"]).strip()
        if len(token) < 16:
            raise ConfigError(f"{var('admin_token')} must be at least 16 characters")
        values["admin_token"] = SecretStr(token)
    for name in ("openai_base_url", "anthropic_base_url"):
        if name in raw:
            values[name] = _as_url(var(name), raw[name])
    if "log_format" in raw:
        values["log_format"] = _as_choice(var("log_format"), raw["log_format"], ("console", "json"))
    if "log_level" in raw:
        values["log_level"] = _as_choice(var("log_level"), raw["log_level"],
                                         ("debug", "info", "warning", "error"))
    if "durability" in raw:
        values["durability"] = _as_choice(var("durability"), raw["durability"], ("full", "normal"))
    if "max_body_bytes" in raw:
        values["max_body_bytes"] = _as_int(var("max_body_bytes"), raw["max_body_bytes"], 1024, 1 << 31)
    if "idle_timeout_s" in raw:
        values["idle_timeout_s"] = _as_int(var("idle_timeout_s"), raw["idle_timeout_s"], 1, 86400 * 30)
    if "mock" in raw:
        values["mock"] = _as_bool(var("mock"), raw["mock"])
    if "upstream_timeout_s" in raw:
        values["upstream_timeout_s"] = _as_float(var("upstream_timeout_s"), raw["upstream_timeout_s"],
                                                 0, 3600)
    for name, high in (("retry_base_s", 60.0), ("retry_after_max_s", 600.0), ("breaker_cooldown_s", 3600.0)):
        if name in raw:
            values[name] = _as_float(var(name), raw[name], 0, high)
    if "breaker_threshold" in raw:
        values["breaker_threshold"] = _as_int(var("breaker_threshold"), raw["breaker_threshold"], 1, 1000)
    if "max_hold_s" in raw:
        values["max_hold_s"] = _as_float(var("max_hold_s"), raw["max_hold_s"], 0.1, 86400)
    if "webhook_allow_private" in raw:
        values["webhook_allow_private"] = _as_bool(var("webhook_allow_private"), raw["webhook_allow_private"])
    if "webhook_rotation_grace_s" in raw:
        values["webhook_rotation_grace_s"] = _as_int(var("webhook_rotation_grace_s"),
                                                     raw["webhook_rotation_grace_s"], 0, 86400 * 30)
    if "webhook_dead_letter_s" in raw:
        values["webhook_dead_letter_s"] = _as_float(var("webhook_dead_letter_s"), raw["webhook_dead_letter_s"],
                                                    0, 86400 * 7)
    if "webhook_retry_base_s" in raw:
        values["webhook_retry_base_s"] = _as_float(var("webhook_retry_base_s"), raw["webhook_retry_base_s"], 0, 60)
    if env.get("OPENAI_API_KEY"):
        values["openai_api_key"] = SecretStr(env["OPENAI_API_KEY"])
    if env.get("ANTHROPIC_API_KEY"):
        values["anthropic_api_key"] = SecretStr(env["ANTHROPIC_API_KEY"])
    if "prices" in doc:
        values["price_overrides"] = _parse_prices(doc["prices"], f"RUNGATE_CONFIG {path}")
    if "routes" in doc:
        values["routes"] = parse_config_routes(doc["routes"], f"RUNGATE_CONFIG {path}")
    return Settings(**values)
