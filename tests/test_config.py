"""Settings are read once, validated, and a bad value names its variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from rungate.config import load_settings
from rungate.errors import ConfigError


def test_defaults_match_the_spec() -> None:
    settings = load_settings(env={})
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.database_url == "sqlite:///./rungate.db"
    assert settings.openai_base_url == "https://api.openai.com/v1"
    assert settings.anthropic_base_url == "https://api.anthropic.com"
    assert settings.max_body_bytes == 32 * 1024 * 1024
    assert settings.durability == "full"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RUNGATE_PORT", "eighty"),
        ("RUNGATE_PORT", "70000"),
        ("RUNGATE_DATABASE_URL", "mysql://x"),
        ("RUNGATE_MASTER_KEY", "too-short"),
        ("RUNGATE_OPENAI_BASE_URL", "ftp://x"),
        ("RUNGATE_LOG_FORMAT", "xml"),
        ("RUNGATE_DURABILITY", "off"),
        ("RUNGATE_MOCK", "maybe"),
        ("RUNGATE_ADMIN_TOKEN", "short"),
        ("RUNGATE_RETRY_AFTER_MAX_S", "-1"),
        ("RUNGATE_BREAKER_THRESHOLD", "0"),
        ("RUNGATE_BREAKER_COOLDOWN_S", "soon"),
    ],
)
def test_a_bad_value_names_its_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={variable: value})
    assert variable in str(caught.value)


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "rungate.yaml"
    path.write_text("server:\n  port: 9001\n  host: 0.0.0.0\nprices:\n  my-model: {input: 1, output: 2}\n")
    settings = load_settings(env={"RUNGATE_PORT": "9002"}, config_file=str(path))
    assert settings.port == 9002
    assert settings.host == "0.0.0.0"
    assert str(settings.price_overrides["my-model"]["output"]) == "2"


def test_a_bad_file_value_names_the_file_key(tmp_path: Path) -> None:
    path = tmp_path / "rungate.yaml"
    path.write_text("server:\n  port: nope\n")
    with pytest.raises(ConfigError, match="server.port"):
        load_settings(env={}, config_file=str(path))


def test_master_key_accepts_hex_and_base64() -> None:
    hex_key = "ab" * 32
    assert load_settings(env={"RUNGATE_MASTER_KEY": hex_key}).master_key_bytes() == bytes.fromhex(hex_key)
    b64 = "q" * 43 + "="
    assert len(load_settings(env={"RUNGATE_MASTER_KEY": b64}).master_key_bytes()) == 32
