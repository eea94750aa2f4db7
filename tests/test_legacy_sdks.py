"""The widely deployed older majors (openai 1.x, anthropic 0.x) work unchanged (SPEC §9).

They are installed side by side with `pip install --target` and run in a subprocess, so the current
majors in the test environment stay untouched. Anthropic 0.x sends `x-api-key` and
`anthropic-version: 2023-06-01`; openai 1.x defaults embeddings to base64.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import Gateway

LEGACY = ("openai==1.109.1", "anthropic==0.72.0")


@pytest.fixture(scope="session")
def legacy_dir() -> Path:
    target = Path(tempfile.gettempdir()) / "rungate-legacy-sdks-openai1-anthropic0"
    if not (target / "anthropic" / "_version.py").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--target", str(target), *LEGACY], check=True, timeout=600)
    return target


async def test_legacy_sdks_stream_and_not(gateway: Gateway, legacy_dir: Path) -> None:
    token = await gateway.new_agent("legacy")
    script = textwrap.dedent("""
        import json, sys, anthropic, openai
        base, token = sys.argv[1], sys.argv[2]
        assert openai.__version__.startswith("1."), openai.__version__
        assert anthropic.__version__.startswith("0."), anthropic.__version__
        oa = openai.OpenAI(api_key=token, base_url=base + "/v1", max_retries=0,
                           default_headers={"x-rungate-run-id": "legacy-run"})
        reply = oa.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "old sdk"}])
        chunks = list(oa.chat.completions.create(model="mock-gpt", stream=True,
                                                 messages=[{"role": "user", "content": "old stream"}]))
        vectors = oa.embeddings.create(model="mock-embedding", input="base64 by default")
        an = anthropic.Anthropic(api_key=token, base_url=base, max_retries=0,
                                 default_headers={"x-rungate-run-id": "legacy-run"})
        message = an.messages.create(model="mock-claude", max_tokens=50,
                                     messages=[{"role": "user", "content": "old claude"}])
        with an.messages.stream(model="mock-claude", max_tokens=50,
                                messages=[{"role": "user", "content": "old claude stream"}]) as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
        print(json.dumps({
            "reply": reply.choices[0].message.content,
            "stream": "".join(c.choices[0].delta.content or "" for c in chunks),
            "all_chunks_have_choices": all(c.choices for c in chunks),
            "embedding_len": len(vectors.data[0].embedding),
            "message": message.content[0].text, "streamed": streamed,
            "final_output_tokens": final.usage.output_tokens,
        }))
    """)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, gateway.url, token, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(legacy_dir)}, cwd=str(legacy_dir))
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, stderr.decode()
    result: dict[str, Any] = orjson.loads(stdout.splitlines()[-1])
    assert result["reply"] == "Mock reply: old sdk"
    assert result["stream"] == "Mock reply: old stream" and result["all_chunks_have_choices"]
    assert result["embedding_len"] == 16
    assert result["message"] == "Mock reply: old claude"
    assert result["streamed"] == "Mock reply: old claude stream" and result["final_output_tokens"] > 0
    sent = [r for r in gateway.upstream_requests if r["path"] == "/v1/messages"][-1]["headers"]
    assert sent["anthropic-version"] == "2023-06-01"
    _, steps = await gateway.admin("GET", "/api/runs/legacy-run/steps")
    assert [s["endpoint"] for s in steps["data"]] == ["chat", "chat", "embeddings", "messages", "messages"]
    assert all(s["status"] == "ok" and s["cost_usd"] is not None for s in steps["data"])
