"""Structured logging: structlog with per-request context; never bodies, keys or tokens."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure(log_format: str = "console", level: str = "info") -> None:
    """Configure structlog once at start-up (`json` for machines, `console` for people)."""
    renderer: Any = (structlog.processors.JSONRenderer() if log_format == "json"
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    """A logger for one subsystem (`rungate.proxy`, `rungate.store`, …)."""
    return structlog.get_logger(name)
