"""The README, deploy/ and .ci/run agree with the code."""

from __future__ import annotations

import re
from pathlib import Path

from rungate.cli import build_parser
from rungate.config import SETTINGS_DOC

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TEST_COMMAND = "python -m pip install -e '.[test]' && python -m pytest"


def test_every_setting_is_in_the_readme_table_with_its_default() -> None:
    for _name, variable, default, _desc in SETTINGS_DOC:
        row = next((line for line in README.splitlines() if line.startswith(f"| `{variable}`")), None)
        assert row is not None, f"{variable} missing from the README settings table"
        assert default in row, f"{variable}: README does not show the default {default!r}"


def test_every_setting_is_in_the_env_example() -> None:
    example = (ROOT / "deploy" / "rungate.env.example").read_text()
    names = set(re.findall(r"^(RUNGATE_[A-Z_]+)=", example, re.MULTILINE))
    assert names == {variable for _, variable, _, _ in SETTINGS_DOC}


def test_readme_gives_the_two_commands_and_ci_runs_the_same_test_command() -> None:
    assert "python -m pip install -e . && rungate serve --mock" in README
    assert TEST_COMMAND in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert TEST_COMMAND in ci


def test_every_cli_command_is_in_the_readme() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[union-attr]
    assert commands is not None
    for command in commands:
        assert f"rungate {command}" in README, command


def test_no_placeholder_is_left_in_the_readme() -> None:
    assert "BENCH_FIGURES" not in README and "TODO" not in README
