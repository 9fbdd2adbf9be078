"""Structured logging (structlog) with message ids.

Every log call names a message id (``msgid``) so operators can grep and alert on it;
ids are listed in the README. State transitions go through ``transition``.

Loggers are light handles that import and configure structlog on the first line that
passes the level: importing structlog costs ~0.06 s, paid by every ``dt`` command
otherwise, and a command that logs nothing at its level (most of them, at the default
``warning``) never pays it. Lines below the level are dropped by the handle.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LogConfig:
    json: bool = False
    level: str = "warning"
    stream: Any = None  # None: whatever sys.stderr is when each line is written


_config = LogConfig()
_applied: LogConfig | None = None  # the configuration structlog has, once imported


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
    global _config
    _config = LogConfig(json=json, level=level, stream=stream)
    _apply_if_imported()


def current() -> LogConfig:
    """The configuration in force (what a child process is given to log alike)."""
    return _config


def _apply_if_imported() -> None:
    # Once something imported structlog (a test capturing lines with structlog.testing),
    # it is configured at once, so that capture is never replaced by a late configure.
    if "structlog" in sys.modules and _applied is not _config:
        _apply()


def _apply():
    """structlog, configured as ``_config`` says; imported the first time."""
    global _applied
    import structlog

    if _applied is not _config:
        renderer = (structlog.processors.JSONRenderer() if _config.json
                    else structlog.dev.ConsoleRenderer(colors=False))
        structlog.configure(
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                renderer,
            ],
            wrapper_class=structlog.make_filtering_bound_logger(_level_number(_config.level)),
            logger_factory=structlog.PrintLoggerFactory(_config.stream or _Stderr()),
            cache_logger_on_first_use=False,
        )
        _applied = _config
    return structlog


def _level_number(level: str) -> int:
    return getattr(logging, level.upper())


class Logger:
    """A named logger: ``debug``, ``info``, ``warning``, ``error`` and ``exception`` take
    an event and key-value pairs, as structlog's do."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def _emit(self, level: int, method: str, event: str, kw: dict) -> None:
        if level < _level_number(_config.level):
            return
        getattr(_apply().get_logger(self.name), method)(event, **kw)

    def debug(self, event: str, **kw) -> None:
        self._emit(logging.DEBUG, "debug", event, kw)

    def info(self, event: str, **kw) -> None:
        self._emit(logging.INFO, "info", event, kw)

    def warning(self, event: str, **kw) -> None:
        self._emit(logging.WARNING, "warning", event, kw)

    def error(self, event: str, **kw) -> None:
        self._emit(logging.ERROR, "error", event, kw)

    def exception(self, event: str, **kw) -> None:
        self._emit(logging.ERROR, "exception", event, kw)


def get(name: str) -> Logger:
    _apply_if_imported()
    return Logger(name)


def transition(log, what: str, old, new, **kw) -> None:
    """Log a state change (message id DT-S001)."""
    if old != new:
        log.info("state", msgid="DT-S001", what=what, old=getattr(old, "value", old),
                 new=getattr(new, "value", new), **kw)
