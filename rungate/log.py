"""Structured logging: structlog with per-request context; never bodies, keys or tokens."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure(log_format: str = "console", level: str = "info") -> None:
    """Configure structlog once at start-up (`json` for machines, `console` for people).

    Tracebacks are rendered plainly (never with local variables, which could hold bodies or keys).
    """
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if log_format == "json":
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=False,
                                                        exception_formatter=structlog.dev.plain_traceback))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,  # tests configure more than once per process
    )


def get_logger(name: str) -> Any:
    """A logger for one subsystem (`rungate.proxy`, `rungate.store`, …); its lines carry `subsystem=name`."""
    # Lazy: resolved at each call, so `configure` applies even to loggers made at import time.
    return structlog.get_logger(subsystem=name)
