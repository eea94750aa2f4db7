"""The benchmark runs end to end (a smoke run, no timing asserted) and its README names only options it takes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH / "run.py"), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, check=False)


def test_a_smoke_run_with_large_governed_bodies_serves_every_call_and_verifies_its_log() -> None:
    done = run_bench("--quick", "--concurrency", "2", "--requests", "20", "--body-bytes", "20000", "--governed")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert "request bodies of 20" in out  # 20000 bytes of context plus the request around it
    assert "errors: none (all 120 measured requests were complete 200s)" in out
    assert re.search(r"verify: ok \(\d+ events checked\)", out)
    assert re.search(r"^non-stream\s+2\s+\d\.\d\d", out, re.MULTILINE)  # the ratio table has its rows
    assert re.search(r"^stream\s+2\s+\d\.\d\d", out, re.MULTILINE)


def test_bad_options_are_refused_with_exit_2() -> None:
    for args in (("--body-bytes", "-1"), ("--requests", "0"), ("--concurrency", "x")):
        done = run_bench(*args)
        assert done.returncode == 2, args
        assert "error:" in done.stderr


def test_every_option_the_bench_readme_shows_is_one_the_script_takes() -> None:
    readme = (BENCH / "README.md").read_text()
    # every `--flag` after `python bench/run.py` on its line, up to a comment or the end of inline code
    shown = {flag for args in re.findall(r"python bench/run\.py([^\n`#]*)", readme)
             for flag in re.findall(r"--[a-z-]+", args)}
    usage = run_bench("--help").stdout
    assert shown, "the README shows no invocation"
    for flag in shown:
        assert flag in usage, f"bench/README.md shows {flag}, which bench/run.py does not take"
