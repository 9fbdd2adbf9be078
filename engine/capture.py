"""The capture source: what every capture backend (fuse, kmod, scan) offers the engine.

A capture turns changes made to a source tree into operations and hands them, stamped as
events, to a *sink* in the order the source applied them. Backends: capture/fuse.py (a
stacking FUSE filesystem), capture/kmod.py (the kernel module), capture/scan.py (no live
capture: the tree walker). The process that runs a connection picks one and passes it a
sink that appends to the connection's Log.

Contract, for every backend:
- ``start()`` returns once capture is live: every change that completes after it returns
  is delivered to the sink or reported as a gap. It raises CaptureFailed when it cannot
  start. Changes made while a capture is not running are not seen, so whoever starts a
  capture over a tree that may have changed meanwhile (first start, restart after a stop
  or a crash) must treat that interval as a gap: the connection needs a mirror.
- ``stop()`` is idempotent and returns once the sink will not be called any more.
- The sink receives the events of one operation in one call, in order, after the
  operation succeeded on the source and before its caller learns the result (a very large
  operation, such as an object moved into the set, may take several calls in a row).
  Calls come from several threads at once. Calls for operations on the same path never
  overlap and arrive in the order the source applied them: the backend holds the path
  locks (engine/pathlocks.py) across "change the source, then call the sink", and the
  sink may rely on being called under them.
- A ``Write``'s data may be a view of the backend's own buffer (the fuse backend hands
  over the kernel's request without copying it): it is valid during the sink call only,
  so a sink that keeps events beyond the call keeps copies (the daemon's sink encodes
  them at once, which is the one copy the data needs on its way to the log).
- A sink keeps the events (queues them durably) or raises; it is never retried. When it
  raises, the operation has already happened on the source, so the capture does not fail
  the operation: it reports a gap through ``on_gap(reason)`` and keeps capturing (the
  connection becomes Mirror Required and auto-remirror repairs the target; DESIGN
  invariant 3, nothing is lost silently). ``on_gap`` may be called once per failed
  delivery, from any thread: it must be quick and idempotent.
- Event paths are relative to the capture root (``""`` is the root itself) and only name
  objects that the ``matches(rel_path, is_dir)`` predicate (the replication set's rules)
  selects. The predicate is called on captured operations, so it must be cheap.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Protocol, runtime_checkable

from . import logs
from .events import Event, Operation

log = logs.get(__name__)

Sink = Callable[[list[Event]], None]
GapReport = Callable[[str], None]
Matches = Callable[[str, bool], bool]


def everything(rel_path: str, is_dir: bool) -> bool:
    """The predicate of a capture without rules: every path belongs."""
    return True


def no_gap_report(reason: str) -> None:
    """Default gap callback: the failure is still logged (DT-F001) and counted."""


@runtime_checkable
class Capture(Protocol):
    """One running capture of one source tree (see the module docstring for the contract)."""

    origin: str  # the ``Event.origin`` of what it captures: "fuse", "kmod", "scan"

    def start(self) -> None:
        """Begin capturing; returns once live. CaptureFailed if it cannot."""

    def stop(self) -> None:
        """Stop capturing; idempotent; no sink call happens after it returns."""

    @property
    def running(self) -> bool:
        """True between a successful ``start`` and ``stop``."""


class Emitter:
    """The sink as a backend uses it: stamps operations as events and turns a failing
    sink into a gap report, so no backend can forget either.

    ``gaps`` counts failed deliveries. The first failure after a success is logged as an
    error (DT-F001), later ones of the same episode at debug level, so a full queue does
    not flood the log; ``on_gap`` is called for every failure.
    """

    def __init__(self, sink: Sink, origin: str, on_gap: GapReport = no_gap_report):
        self._sink = sink
        self._on_gap = on_gap
        self.origin = origin
        self.gaps = 0
        self._failing = False
        self._lock = threading.Lock()

    def emit(self, ops: Iterable[Operation]) -> bool:
        """Deliver the operations as events of one call; False when a gap was reported."""
        now = time.time_ns()
        events = [Event(op, now, self.origin) for op in ops]
        if not events:
            return True
        try:
            self._sink(events)
        except Exception as exc:  # any sink failure is a gap, never a failed operation
            self._gap(f"sink refused {len(events)} event(s) ({events[0].kind} "
                      f"{(events[0].paths() or [''])[0]!r}): {exc}")
            return False
        if self._failing:
            self._failing = False
            log.warning("sink accepts events again", msgid="DT-F002", origin=self.origin, gaps=self.gaps)
        return True

    def _gap(self, reason: str) -> None:
        with self._lock:
            self.gaps += 1
            first = not self._failing
            self._failing = True
        if first:
            log.error("capture lost events: connection needs a mirror", msgid="DT-F001",
                      origin=self.origin, reason=reason)
        else:
            log.debug("capture lost events", msgid="DT-F001", origin=self.origin, reason=reason)
        self._report(reason)

    def unseen(self, reason: str) -> None:
        """A change the backend let through but cannot tell as events (the sink is fine):
        a gap all the same, reported without counting as a failed delivery."""
        log.warning("change the capture cannot describe: connection needs a mirror", msgid="DT-F004",
                    origin=self.origin, reason=reason)
        self._report(reason)

    def _report(self, reason: str) -> None:
        try:
            self._on_gap(reason)
        except Exception as exc:
            log.error("gap callback failed", msgid="DT-F003", origin=self.origin, error=repr(exc))
