"""The OpenAPI document in `openapi/rungate.yaml`: the single source of truth for every HTTP route."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import yaml


@cache
def load_spec() -> dict[str, Any]:
    """The parsed OpenAPI document (read once)."""
    text = (resources.files("rungate") / "openapi" / "rungate.yaml").read_text("utf-8")
    spec: dict[str, Any] = yaml.safe_load(text)
    return spec
