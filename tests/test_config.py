"""Settings are read once, validated, and a bad value names its variable."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest

from rungate.config import load_settings
from rungate.errors import ConfigError
from rungate.prices import LIMIT_KEYS, PRICE_KEYS, PriceTable


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


def test_the_file_overrides_every_price_field_and_token_limit_the_readme_names(tmp_path: Path) -> None:
    # The README lists the keys a price override takes; the config file accepts each (a web-search fee was once
    # refused there as an unknown key), and the table built from it shows them.
    path = tmp_path / "rungate.yaml"
    path.write_text("prices:\n"
                    "  claude-sonnet-4-5: {web_search_per_1k: '5', image_input_tokens: 2000}\n"
                    "  openai/gpt-9: {input: '1.5', output: 6, max_output_tokens: 65536, image_input_tokens: 1800}\n")
    settings = load_settings(env={}, config_file=str(path))
    table = PriceTable.load(settings.price_overrides)
    claude, new = table.lookup("claude-sonnet-4-5"), table.lookup("gpt-9")
    assert claude is not None and new is not None
    assert (claude.web_search_per_1k, claude.image_tokens, claude.max_output_tokens) == (Decimal(5), 2000, 64000)
    assert (new.provider, new.input, new.output, new.max_output_tokens, new.image_tokens) == (
        "openai", Decimal("1.5"), Decimal(6), 65536, 1800)
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("`prices` (per-model overrides"):readme.index("`routes` (see Failover)")]
    for key in (*PRICE_KEYS, *LIMIT_KEYS):
        assert re.search(rf"\b{key}\b", section), key


@pytest.mark.parametrize("value", ["0", "-5", "'4096'", "1.5", "true"])
def test_a_token_limit_override_must_be_a_positive_integer(tmp_path: Path, value: str) -> None:
    path = tmp_path / "rungate.yaml"
    path.write_text(f"prices:\n  gpt-4o: {{max_output_tokens: {value}}}\n")
    with pytest.raises(ConfigError, match="prices.gpt-4o.max_output_tokens must be a positive integer"):
        load_settings(env={}, config_file=str(path))


def test_master_key_accepts_hex_and_base64() -> None:
    hex_key = "ab" * 32
    assert load_settings(env={"RUNGATE_MASTER_KEY": hex_key}).master_key_bytes() == bytes.fromhex(hex_key)
    b64 = "q" * 43 + "="
    assert len(load_settings(env={"RUNGATE_MASTER_KEY": b64}).master_key_bytes()) == 32
