"""Structured logging (structlog) with message ids.

Every log call names a message id (``msgid``) so operators can grep and alert on it;
ids are listed in the README. State transitions go through ``transition``.
"""

from __future__ import annotations

import logging
import sys

import structlog

_configured = False


class _Stderr:
    """``sys.stderr`` as it is when a line is written, not when logging was configured: a
    caller that swaps it (a test capturing the output of ``dt`` run in-process) must not
    leave the loggers of every thread writing to a stream that is closed afterwards."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(json: bool = False, level: str = "info", stream=None) -> None:
    """Key=value lines, or JSON lines, on ``stream`` (default: whatever sys.stderr is when
    each line is written). Later calls replace the configuration."""
    global _configured
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream or _Stderr()),
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
