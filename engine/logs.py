"""Structured logging (structlog) with message ids.

Every log call names a message id (``msgid``) so operators can grep and alert on it;
ids are listed in the README. State transitions go through ``transition``.
"""

from __future__ import annotations

import logging
import sys

import structlog

_configured = False


def configure(json: bool = False, level: str = "info", stream=None) -> None:
    """Configure once per process: key=value lines on stderr, or JSON lines."""
    global _configured
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get(name: str):
    if not _configured:
        configure(level="warning")
    return structlog.get_logger(name)


def transition(log, what: str, old, new, **kw) -> None:
    """Log a state change (message id DT-S001)."""
    if old != new:
        log.info("state", msgid="DT-S001", what=what, old=getattr(old, "value", old),
                 new=getattr(new, "value", new), **kw)
