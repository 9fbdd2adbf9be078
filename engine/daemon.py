"""The daemon of one connection: live capture, source queue, applier and mirrors, supervised.

The concrete parts come from outside (tools/commands/protect.py assembles them), so the
core never imports a capture backend or the applier (DESIGN, who may import whom):

    capture  --sink-->  SourceQueue.offer  -->  Log partition  -->  applier thread --> target
    mirror   --throttled append (same PathLocks as the capture)--^

Life of a daemon (``start``, ``supervise``, ``shutdown``):

1. ``start``: the applier thread starts (it first applies what an earlier run left in the
   log). A connection that ran before had no capture while it was stopped: that interval
   is a gap (engine/capture.py), so a ``Gap`` event is appended. Then the capture starts
   (live: every later change reaches the log), and only then a mirror is requested: the
   initial mirror of a new connection, or the configured remirror (``auto_remirror_mode``)
   of a restarted one. Mirror and capture share one PathLocks and one partition, so changes
   made during the mirror end up on the target in source order.
2. A mirror runs only once the applier has applied everything up to the event that made it
   necessary (the Gap): comparing against a target still behind its own queue could take a
   stale target file for an up-to-date one. Until then the status says "waiting for the
   queue to drain".
3. A gap while running (the queue overflowed, a sink failure, the capture died and was
   restarted) appends a ``Gap`` (the target becomes Mirror Required when it is applied),
   stops a running mirror (its result would be incomplete) and, with ``auto_remirror``,
   requests the configured remirror. The mirror that repairs a gap flags every file whose
   ctime is at or after the time the gap may have begun (engine/mirror.py,
   ``changed_since_ns``), less GAP_CLOCK_MARGIN_NS: the oldest stamp of a lost event or
   of the newest event that did reach the log, whichever is older (for a restart, the
   last record's time; after a mirror that failed or was overtaken, that mirror's start).
   An overflowed queue keeps dropping capture events until that remirror starts
   (``SourceQueue.reopen``); nothing is lost silently (DESIGN invariant 3). Without
   auto-remirror the connection stays Mirror Required (replication status Pending) until
   an operator starts a mirror through the API.
4. ``shutdown``: the mirror stops (its position is forgotten: the next start mirrors
   anyway; a Gap says the target holds part of a pass, so it is Mirror Required, not
   Mirroring, until then), the capture unmounts, the applier applies everything captured (unless the target
   is paused, or ``abort`` is set by a second signal: the events then stay in the log and the
   next start applies them), then the applier, the progress record and the queue close.

Target snapshots (``Parts.snapshots``, apply/snapshot.py): one at a time, each holding
exactly the events up to the applier's applied offset (the applier is paused for the copy,
and stays paused afterwards when an operator paused the target meanwhile or before). The
supervisor takes a scheduled one when ``snapshot_interval_s`` says it is due and the
target is worth keeping (data state OK, no mirror running, requested or required); one
that waited longer than an interval for that is labelled deferred. A failed scheduled
snapshot is logged and tried again an interval later. Shutdown waits for a snapshot being
taken and starts none.

The control API (engine/api.py) operations are in ``operations()``: ``status`` (monitor
role); ``pause``/``resume`` of the target (the applier stops advancing, the queue grows),
``task`` (a TaskCommand appended to the stream), ``snapshot_take`` (a target snapshot now,
answered with its metadata), ``stop``, ``mirror_start``, ``mirror_pause``,
``mirror_resume``, ``mirror_stop`` (administrator role).

One daemon per source: ``DaemonLock`` (flock on ``<state>/run/<key>.lock``, key derived from
the source path) is held for the daemon's life; the kernel releases it when the process
dies, so a killed daemon never blocks the next start. Its socket is ``<key>.sock`` beside it.

Message ids DT-D0xx (engine/queue.py DT-D001..D002, engine/api.py DT-D010..D016, here
DT-D020 and up); DT-X001 the log is unreachable (at each status tick).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from . import codec, logs
from .api import ApiClient, Operation, Role
from .capture import Capture, GapReport, Sink
from .connection import Connection
from .errors import AlreadyRunning, BackendUnavailable, DtError, NotFound, UsageError
from .events import Event, Gap, Link, Rename, TaskCommand
from .history import find_task_result
from .log import Log
from .queue import MirrorFeed, QueueLimits, SourceQueue
from .retention import apply_retention
from .settings import Settings
from .states import MirrorMode, MirrorStatus, ReplicationStatus, TargetDataState, TargetStatus, TransmitMode

log = logs.get(__name__)

SUPERVISE_S = 0.1            # how often the supervisor looks at the parts
SET_CHECK_S = 1.0            # how often it asks whether the replication set changed
CAPTURE_RESTART_S = 5.0      # wait before starting a capture that died again
REMIRROR_BACKOFF_S = (5.0, 600.0)  # first and longest wait between remirrors that did not help
RETENTION_CHECK_S = 60.0     # how often the history window is enforced on the log
SNAPSHOT_CHECK_S = 1.0       # how often the supervisor asks whether a scheduled snapshot is due
TASK_WAIT_POLL_S = 0.05
DEFAULT_TASK_TIMEOUT_S = 600
MAX_TASK_TIMEOUT_S = 7 * 86400  # a week; a task that may run longer takes 0 (no limit)
GAP_CLOCK_MARGIN_NS = 2 * 10**9  # ctimes come from a coarse clock; events are stamped after their operation
RESTART_GAP = "the capture was not running: changes made meanwhile were not captured"
SHUTDOWN_MIRROR_GAP = "the daemon stopped before its mirror finished"
MOVED_GAP = ("objects were renamed or linked while a mirror ran: some may have moved into the part "
             "of the tree it had already passed")


class ApplierLike(Protocol):
    """What the daemon needs of apply/applier.Applier."""

    @property
    def applied_offset(self) -> int: ...
    def run(self, stop_event: threading.Event) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def close(self) -> None: ...


class ProgressLike(Protocol):
    """What the daemon needs of apply/progress.Progress."""

    status: TargetStatus

    @property
    def applied_offset(self) -> int: ...
    @property
    def data_state(self) -> TargetDataState: ...
    def snapshot(self) -> dict: ...  # safe from any thread
    def close(self) -> None: ...


class MirrorLike(Protocol):
    """What the daemon needs of engine/mirror.Mirror (``stats`` has ``as_dict``)."""

    stats: Any

    def run(self) -> Any: ...
    def pause(self) -> None: ...
    def stop(self) -> None: ...


class SnapshotsLike(Protocol):
    """What the daemon needs of apply/snapshot.TargetSnapshots (``take`` answers a snapshot
    with ``as_dict``; it leaves the applier paused unless ``resume``)."""

    def take(self, applier: ApplierLike, reason: str, *, kind: str | None = None, resume: bool = True) -> Any: ...
    def due(self, now_ns: int) -> str | None: ...


@dataclass
class Parts:
    """The concrete parts of one connection's daemon.

    ``make_applier(log)`` builds the applier on the given log view (its TaskResult appends
    are counted in the queue); ``make_capture(sink, on_gap)`` builds the capture backend;
    ``make_mirror(feed, mode, changed_since_ns)`` builds a fresh mirror pass appending
    through ``feed`` (engine/queue.MirrorFeed: its log and room) that also flags files
    changed since that time (engine/mirror.py; None: only what
    the mode flags); capture and mirror must share one PathLocks, which the assembler
    closes over. ``remove_orphans(log, stop)``, when given, runs after every complete
    mirror pass and appends removals of the target's orphans to ``log`` (returns how
    many); None leaves orphans alone.
    ``snapshots``, when given, takes the target snapshots (module docstring); None: none.
    ``reload_set()``, when given, is asked every SET_CHECK_S whether the replication set
    changed (a new generation saved while the daemon runs): it switches the capture and
    the mirror to the new rules and says why ("" when nothing changed); the daemon then
    mirrors by differences, so data the new rules take in reaches the target.
    """

    conn: Connection
    log: Log
    settings: Settings
    limits: QueueLimits
    space_path: Path
    progress: ProgressLike
    make_applier: Callable[[Log], ApplierLike]
    make_capture: Callable[[Sink, GapReport], Capture]
    make_mirror: Callable[[MirrorFeed, MirrorMode, int | None], MirrorLike]
    remove_orphans: Callable[[Log, threading.Event], int] | None = None
    snapshots: SnapshotsLike | None = None
    reload_set: Callable[[], str] | None = None


@dataclass
class _MirrorRequest:
    mode: MirrorMode
    reason: str
    after: int | None        # start once the applier applied this offset (None: the log's
                             # end once it answers; a gap it could not take, _on_gap)
    not_before: float = 0.0  # and not before this time (time.monotonic) after failures


# -- one daemon per source -------------------------------------------------------------------

def run_key(source_root: str) -> str:
    """Stable file name stem for the daemon of ``source_root``."""
    return hashlib.blake2b(os.fsencode(os.path.abspath(source_root)), digest_size=8).hexdigest()


def run_dir(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / "run"


def socket_path(state_dir: str | os.PathLike, source_root: str) -> Path:
    return run_dir(state_dir) / f"{run_key(source_root)}.sock"


class DaemonLock:
    """Held by the daemon of one source for its whole life (see the module docstring).

    The lock file holds JSON describing the holder (pid, source, connection, socket)."""

    def __init__(self, state_dir: str | os.PathLike, source_root: str):
        self.path = run_dir(state_dir) / f"{run_key(source_root)}.lock"
        self.source_root = source_root
        self._fd: int | None = None

    def acquire(self, **info) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.holder() or {}
            raise AlreadyRunning(what=f"the daemon of {self.source_root}", pid=holder.get("pid", "?"),
                                 hint="stop it first (dt unprotect, or its control API)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "source": self.source_root, **info}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (harmless, reused)
            self._fd = None

    def holder(self) -> dict | None:
        """What the running daemon wrote, or None when no daemon holds the lock."""
        return lock_holder(self.path)


def lock_holder(path: Path) -> dict | None:
    """The JSON a live daemon wrote into its lock file; None when nobody holds the lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.pread(fd, 1 << 16, 0)
            try:
                return json.loads(raw) if raw else {"pid": "?"}
            except ValueError:
                return {"pid": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def running_daemons(state_dir: str | os.PathLike) -> list[dict]:
    """Holders of every daemon lock in the state directory (live daemons only)."""
    holders = (lock_holder(path) for path in sorted(run_dir(state_dir).glob("*.lock")))
    return [h for h in holders if h is not None]


def refuse_other_daemons(state_dir: str | os.PathLike, source_root: str | None, doing: str) -> None:
    """AlreadyRunning when a daemon of another source holds the state directory's log
    (the embedded log has one writer)."""
    for holder in running_daemons(state_dir):
        if holder.get("source") != source_root and holder.get("pid") != os.getpid():
            raise AlreadyRunning(what=f"the daemon of {holder.get('source')}", pid=holder.get("pid", "?"),
                                 hint=f"it holds the log of {state_dir}, so {doing} cannot open it; "
                                      "stop that daemon, or give each daemon its own --state")


def connect(state_dir: str | os.PathLike, source_root: str, timeout_s: float | None = 30.0) -> ApiClient | None:
    """A client of the daemon of ``source_root``, or None when none runs."""
    holder = DaemonLock(state_dir, source_root).holder()
    if holder is None:
        return None
    return ApiClient(holder.get("socket") or socket_path(state_dir, source_root), timeout_s)


def wait_stopped(state_dir: str | os.PathLike, source_root: str, timeout_s: float | None = None) -> bool:
    """Wait until no daemon of ``source_root`` runs; False on timeout."""
    lock = DaemonLock(state_dir, source_root)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while lock.holder() is not None:
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(SUPERVISE_S)
    return True


def task_timeout_s(value: Any) -> int:
    """A task's timeout as the TaskCommand event stores it (an Avro int): whole seconds from
    1 to MAX_TASK_TIMEOUT_S, or 0 for no limit; UsageError otherwise. Checked by dt task
    and again by the daemon's task operation, which other clients may call."""
    if type(value) is not int or not 0 <= value <= MAX_TASK_TIMEOUT_S:
        raise UsageError(detail=f"a task timeout is a whole number of seconds from 1 to {MAX_TASK_TIMEOUT_S}, "
                                f"or 0 for no limit (not {value!r})")
    return value


def _is_utf8(text: str) -> bool:
    """False for text holding surrogates: what the command line makes of bytes that are
    not UTF-8 (surrogateescape), and what JSON's \\ud800 escapes decode to."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def current_latency_ms(log_: Log, partition: str, applied: int) -> float:
    """Age of the oldest record not applied yet (0 with an empty queue): the data at risk
    if the source failed now, which keeps growing while the target is paused or stopped."""
    try:
        oldest = log_.read(partition, applied + 1, max_records=1)
    except DtError:
        return 0.0
    return round(max(0, time.time_ns() - oldest[0].timestamp_ns) / 1e6, 3) if oldest else 0.0


# -- the daemon ------------------------------------------------------------------------------

class Daemon:
    """One connection's live replication (see the module docstring)."""

    def __init__(self, parts: Parts):
        self.parts = parts
        self.conn = parts.conn
        self.settings = parts.settings
        self._log = parts.log
        self._progress = parts.progress
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self.stop_requested = threading.Event()
        self.queue = SourceQueue(parts.log, self.conn.partition, parts.limits,
                                 lambda: parts.progress.applied_offset, parts.space_path)
        self.applier = parts.make_applier(self.queue.log())
        self._applier_stop = threading.Event()
        self._applier_thread = threading.Thread(target=self.applier.run, args=(self._applier_stop,),
                                                name=f"applier-{self.conn.partition}", daemon=True)
        self.capture: Capture = parts.make_capture(self._sink, self._on_gap)
        self._capture_restart_at = 0.0
        self._paused = False
        self._episode: str | None = None      # the gap being handled; later lost deliveries add nothing
        self._required: str | None = None     # why the target needs a mirror none has started for yet
        self._request: _MirrorRequest | None = None
        self._mirror: MirrorLike | None = None
        self._mirror_thread: threading.Thread | None = None
        self._mirror_cancel = threading.Event()  # ends the current mirror's wait for queue room
        self._halt: str | None = None          # "pause" or "stop" when the daemon halted the mirror
        self._mirror_reason = ""
        self._mirror_paused = False
        self._mirror_end: int | None = None   # last offset of the latest finished mirror
        self._mirror_last: dict | None = None
        self._mirror_error: str | None = None
        self._moved = False                   # a Rename or Link was captured while a mirror ran
        self._logged_ns = 0                   # stamp of the newest captured event in the log (start)
        self._gap_since_ns: int | None = None  # changes from then on may be missing (a gap pending)
        self._mirror_started_ns = 0           # wall time the current (or last) mirror started
        self._orphans = False                 # the orphan pass after a mirror is running
        self._retry_at = 0.0                  # no remirror for the target's own Mirror Required before
        self._backoff = 0.0
        self._ending: str | None = None       # "stopping", then "draining", once shutdown began
        self._snapshot_lock = threading.Lock()  # one snapshot at a time
        self._snapshotting = False            # a snapshot holds the applier paused (under _lock)
        self._snapshot_thread: threading.Thread | None = None
        self._snapshot_check_at = 0.0         # no look at the schedule before (time.monotonic)
        self._set_check_at = 0.0              # no look at the replication set before
        self._retain_at = time.monotonic() + RETENTION_CHECK_S  # next enforcement of the history window

    # -- life cycle ----------------------------------------------------------------------

    def start(self, *, restarted: bool, mirror: MirrorMode | None) -> None:
        """Start applier and capture, then request ``mirror`` (module docstring, 1.).

        ``restarted``: the connection ran before, so the time it was down is a gap.
        ``mirror`` None (a restart with auto-remirror off) leaves it Mirror Required."""
        self._applier_thread.start()
        self._logged_ns = self._last_record_ns() if restarted else time.time_ns()
        if restarted:
            self._on_gap(RESTART_GAP, remirror=False)
        self.capture.start()
        log.info("daemon started", msgid="DT-D020", connection=self.conn.name, source=self.conn.source_root,
                 target=self.conn.target_root, restarted=restarted, pid=os.getpid())
        if mirror is not None:
            self._request_mirror(mirror, "remirror after a restart" if restarted else "initial mirror")
        else:
            log.warning("auto-remirror is off: the target stays Mirror Required until a mirror runs",
                        msgid="DT-D021", connection=self.conn.name)

    def supervise(self, tick: Callable[[dict], None] | None = None, tick_s: float = 1.0) -> None:
        """Run until ``stop_requested``: start and reap mirrors, restart a dead capture,
        call ``tick(status)`` every ``tick_s`` seconds."""
        next_tick = 0.0
        while not self.stop_requested.is_set():
            self._reap_mirror()
            self._watch_capture()
            self._watch_target()
            self._maybe_reload_set()
            self._maybe_start_mirror()
            self._maybe_snapshot()
            self._maybe_retain()
            now = time.monotonic()
            if tick is not None and now >= next_tick:
                next_tick = now + tick_s
                self._tick(tick)
            self._wake.wait(SUPERVISE_S)
            self._wake.clear()

    def _tick(self, tick: Callable[[dict], None]) -> None:
        """While the log is unreachable (a Kafka cluster away longer than its timeout) the
        status says so and each tick warns; the daemon goes on."""
        status = self.status()
        if status["log_unreachable"]:
            log.warning("the log is unreachable", msgid="DT-X001", connection=self.conn.name,
                        error=status["log_unreachable"])
        tick(status)

    def shutdown(self, abort: threading.Event | None = None,
                 tick: Callable[[dict], None] | None = None, tick_s: float = 1.0) -> dict:
        """Stop everything in order (module docstring, 4.); return the final status."""
        abort = abort or threading.Event()
        self.stop_requested.set()
        self._ending = "stopping"
        with self._lock:
            thread = self._mirror_thread
            unfinished = (thread is not None and not self._orphans) or self._mirror_paused
            self._halt_mirror("stop")
        self.queue.close()
        if thread is not None:
            thread.join()
        self._reap_mirror()
        if unfinished:  # the target holds part of a pass: Mirror Required, not Mirroring
            self._on_gap(SHUTDOWN_MIRROR_GAP, remirror=False)
        self.capture.stop()
        with self._snapshot_lock:
            pass  # a snapshot being taken ends first; none starts once _ending is set
        if self._snapshot_thread is not None:
            self._snapshot_thread.join()
        self._drain(abort, tick, tick_s)
        self._applier_stop.set()
        self._applier_thread.join()
        final = self.status()
        final.update(replication_status=ReplicationStatus.STOPPED.value, transmit_mode=TransmitMode.STOPPED.value,
                     mirror_status=MirrorStatus.IDLE.value, state="stopped")
        self.applier.close()
        self._progress.close()
        log.info("daemon stopped", msgid="DT-D022", connection=self.conn.name,
                 applied_offset=final["applied_offset"], end_offset=final["end_offset"])
        return final

    def _drain(self, abort: threading.Event, tick, tick_s: float) -> None:
        self._ending = "draining"
        next_tick = 0.0
        while not abort.is_set():
            if self._caught_up():
                return
            if self._paused:
                log.warning("target paused: queued events stay in the log for the next start",
                            msgid="DT-D023", connection=self.conn.name, queued=self.queue.stats().ops)
                return
            now = time.monotonic()
            if tick is not None and now >= next_tick:
                next_tick = now + tick_s
                tick(self.status())
            abort.wait(SUPERVISE_S)
        log.warning("drain interrupted: queued events stay in the log for the next start",
                    msgid="DT-D024", connection=self.conn.name, queued=self.queue.stats().ops)

    def _caught_up(self) -> bool:
        """Everything in the partition is applied. A partition removed behind the daemon's
        back (a topic deleted) holds nothing to wait for: the next start finds the log
        went back and remirrors (apply/applier.py)."""
        try:
            end = self._log.end_offset(self.conn.partition)
        except NotFound:
            log.error("the connection's partition is gone from the log; the next start remirrors",
                      msgid="DT-D068", connection=self.conn.name, partition=self.conn.partition)
            return True
        return self._progress.applied_offset >= end - 1

    # -- capture side --------------------------------------------------------------------

    def _sink(self, events: list[Event]) -> None:
        """The capture's sink: the queue has room, or the operation is lost (a gap).

        A rename or link while a mirror runs may bring an object the target lacks (the
        applier drops a move of what the mirror has not sent yet) to a place the mirror has
        already passed: noted, and the mirror is followed by another one (``_reap_mirror``).

        Events are stored uncompressed, as the mirror's are (engine/mirror.py): compressing
        each captured write took a third of the daemon's CPU per 4 KiB write (95 -> 63 us,
        the capture 35 -> 54 MB/s in the same conditions), for a log that is local (Kafka's
        producer compresses its batches itself).
        """
        try:
            if self.queue.offer([codec.encode(e, compress=False) for e in events]) is None:
                raise self.queue.refusal()
        except Exception:
            self._widen_gap(min(e.time_ns for e in events))
            raise
        # Not under a lock: a lost update leaves an older stamp, which only widens a gap.
        self._logged_ns = max(self._logged_ns, events[-1].time_ns)
        if self._mirror_thread is not None and any(isinstance(e.op, (Rename, Link)) for e in events):
            self._moved = True

    def _widen_gap(self, since_ns: int) -> None:
        """Changes from ``since_ns`` on may be missing from the log."""
        with self._lock:
            self._gap_since_ns = since_ns if self._gap_since_ns is None else min(self._gap_since_ns, since_ns)

    def _last_record_ns(self) -> int:
        """Time of the partition's last record; 0 (everything is suspect) when none is left
        or the log cannot say."""
        try:
            end = self._log.end_offset(self.conn.partition)
            if end > self._log.start_offset(self.conn.partition):
                return self._log.read(self.conn.partition, end - 1, max_records=1)[0].timestamp_ns
        except DtError as exc:
            log.warning("cannot read the time of the last record: the remirror compares every file",
                        msgid="DT-D066", connection=self.conn.name, error=exc.message)
        return 0

    def _on_gap(self, reason: str, remirror: bool | None = None, delay_s: float = 0.0,
                since_ns: int | None = None) -> None:
        """Events were lost: Gap in the log, Mirror Required, remirror (module docstring, 3.).

        Called by the capture for every lost delivery: only the first of an episode acts.
        ``remirror`` defaults to the auto-remirror setting; it starts ``delay_s`` from now
        at the earliest. ``since_ns``: when the loss may have begun (default: the stamp of
        the newest captured event that reached the log)."""
        remirror = self.settings.auto_remirror if remirror is None else remirror
        self._widen_gap(self._logged_ns if since_ns is None else since_ns)
        with self._lock:
            if self._episode is not None:
                return
            self._episode = self._required = reason
        try:
            offset = self.queue.append([codec.encode(Event(Gap(reason=reason), time.time_ns(), "daemon"))])
        except Exception as exc:  # noqa: BLE001 - the log itself failing: the state still says it
            log.error("could not record the gap in the log", msgid="DT-D025", connection=self.conn.name,
                      error=repr(exc))
            offset = None  # asking the log now would fail too and lose the remirror request
        log.warning("connection needs a mirror", msgid="DT-D026", connection=self.conn.name, reason=reason,
                    gap_offset=offset, remirror=remirror)
        with self._lock:
            self._halt_mirror("stop")  # its pass missed what was lost
            if remirror:
                self._request = _MirrorRequest(MirrorMode(self.settings.auto_remirror_mode),
                                               f"remirror after a gap: {reason}", offset,
                                               time.monotonic() + delay_s)
        self._wake.set()

    def _watch_capture(self) -> None:
        """A capture that died is a gap; start it again (not more often than every few s)."""
        if self.capture.running or self.stop_requested.is_set():
            return
        now = time.monotonic()
        if now < self._capture_restart_at:
            return
        self._capture_restart_at = now + CAPTURE_RESTART_S
        log.error("capture stopped unexpectedly; restarting it", msgid="DT-D027", connection=self.conn.name)
        self._on_gap("the capture stopped unexpectedly and was restarted")
        try:
            self.capture.stop()
            self.capture.start()
        except DtError as exc:
            log.error("capture restart failed", msgid="DT-D028", connection=self.conn.name, error=exc.message)

    # -- mirrors -------------------------------------------------------------------------

    def _maybe_reload_set(self) -> None:
        """A replication set saved while running: new rules now, then a difference mirror
        for what they take in (with auto-remirror off: Mirror Required until one runs)."""
        now = time.monotonic()
        if self.parts.reload_set is None or now < self._set_check_at:
            return
        self._set_check_at = now + SET_CHECK_S
        reason = self.parts.reload_set()
        if not reason:
            return
        log.info("replication set changed: new rules in force", msgid="DT-D067", connection=self.conn.name,
                 reason=reason, remirror=self.settings.auto_remirror)
        if self.settings.auto_remirror:
            self._request_mirror(MirrorMode.DIFF, reason)
        else:
            self._on_gap(reason, remirror=False)

    def _request_mirror(self, mode: MirrorMode, reason: str) -> None:
        with self._lock:
            self._request = _MirrorRequest(mode, reason, self._log.end_offset(self.conn.partition) - 1)
        self._wake.set()

    def _resolve_gap_offset(self) -> None:
        """A remirror for a gap the log could not record waits for everything appended
        before the gap: up to the log's end, asked once the log answers again."""
        request = self._request
        if request is None or request.after is not None:
            return
        try:
            after = self._log.end_offset(self.conn.partition) - 1
        except DtError:
            return  # still unreachable: asked again on the next round
        with self._lock:
            if self._request is request:
                request.after = after

    def _maybe_start_mirror(self) -> None:
        self._resolve_gap_offset()
        with self._lock:
            request = self._request
            if request is None or self._mirror_thread is not None or request.after is None:
                return
            if self._progress.applied_offset < request.after or time.monotonic() < request.not_before:
                return  # module docstring, 2.; or waiting after a failure
            self._request = None
            self._episode = self._required = None
            self._moved = False
            since, self._gap_since_ns = self._gap_since_ns, None
            if since is not None:
                since = max(0, since - GAP_CLOCK_MARGIN_NS)
            dropped = self.queue.reopen()
            self._mirror_cancel = threading.Event()
            self._mirror_started_ns = time.time_ns()
            self._mirror = self.parts.make_mirror(self.queue.mirror_feed(self._mirror_cancel), request.mode, since)
            self._mirror_reason = request.reason
            self._mirror_paused = False
            self._launch_mirror()
        log.info("mirror started", msgid="DT-D029", connection=self.conn.name, mode=request.mode.value,
                 reason=request.reason, dropped_events=dropped, changed_since_ns=since)

    def _launch_mirror(self) -> None:
        """Run ``_mirror`` (new, or paused before) in its thread (under ``_lock``)."""
        self._halt, self._mirror_error = None, None
        self._mirror_cancel.clear()
        self._mirror_thread = threading.Thread(target=self._run_mirror, args=(self._mirror,),
                                               name=f"mirror-{self.conn.partition}", daemon=True)
        self._mirror_thread.start()

    def _halt_mirror(self, how: str) -> None:
        """Pause or stop the mirror (under ``_lock``); a wait for queue room ends at once."""
        if self._mirror is None or self._halt == "stop":
            return
        self._halt = how
        (self._mirror.pause if how == "pause" else self._mirror.stop)()
        self._mirror_cancel.set()

    def _run_mirror(self, mirror: MirrorLike) -> None:
        try:
            mirror.run()
            if self._halt is None and self.parts.remove_orphans is not None:
                self._orphans = True
                removed = self.parts.remove_orphans(self.queue.throttled(self._mirror_cancel), self.stop_requested)
                log.info("orphans removed after the mirror", msgid="DT-D035", connection=self.conn.name,
                         removed=removed)
        except Exception as exc:  # noqa: BLE001 - reported in the status; the daemon goes on
            if self._halt is None:  # not the end of a wait the daemon itself cancelled
                self._mirror_error = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
                log.error("mirror failed", msgid="DT-D030", connection=self.conn.name, error=self._mirror_error)
        finally:
            self._orphans = False
            self._wake.set()

    def _reap_mirror(self) -> None:
        """Collect a mirror that ended; a failed or overtaken one is followed by a gap (under
        ``_lock`` throughout, so no status sees the end without its consequence)."""
        with self._lock:
            thread = self._mirror_thread
            if thread is None or thread.is_alive():
                return
            self._mirror_thread = None
            self._mirror_last = self._mirror.stats.as_dict()
            if self._halt == "pause" and self._mirror_last.get("status") == MirrorStatus.PAUSED.value:
                self._mirror_paused = True  # kept for mirror_resume
                return
            self._mirror_end = self._log.end_offset(self.conn.partition) - 1
            # Whoever stopped a mirror (a gap, an operator, the shutdown) already said why.
            stopped = self._halt == "stop"
            failed = None if stopped else self._mirror_error
            moved, self._moved = self._moved and not stopped, False
            self._mirror = None
            if self.stop_requested.is_set():
                return
            if failed:
                self._on_gap(f"the mirror failed: {failed}", delay_s=self._next_backoff(),
                             since_ns=self._mirror_started_ns)
            elif moved:
                self._on_gap(MOVED_GAP, delay_s=self._next_backoff(), since_ns=self._mirror_started_ns)
            elif not stopped:
                self._backoff = 0.0

    def _next_backoff(self) -> float:
        """How long to wait before the next remirror after one that did not help: 0 the
        first time, then doubling from REMIRROR_BACKOFF_S[0] up to REMIRROR_BACKOFF_S[1]
        (reset by a mirror that completes)."""
        delay = self._backoff
        self._backoff = min(max(self._backoff * 2, REMIRROR_BACKOFF_S[0]), REMIRROR_BACKOFF_S[1])
        return delay

    def _watch_target(self) -> None:
        """The applier found the target diverged (or refused an event): Mirror Required in
        its own right. With auto-remirror, remirror, waiting longer each time it did not help."""
        if not self.settings.auto_remirror or self._progress.data_state is not TargetDataState.MIRROR_REQUIRED:
            return
        with self._lock:
            busy = (self._mirror_thread is not None or self._mirror_paused or self._request is not None
                    or self._required is not None)
            behind = self._mirror_end is not None and self._progress.applied_offset < self._mirror_end
        now = time.monotonic()
        if busy or behind or now < self._retry_at:
            return
        self._retry_at = now + self._next_backoff()
        reason = self._progress.snapshot().get("target_data_state_reason") or "the target needs a mirror"
        log.warning("the target needs a mirror", msgid="DT-D034", connection=self.conn.name, reason=reason)
        with self._lock:
            self._required = reason
        self._request_mirror(MirrorMode(self.settings.auto_remirror_mode), f"remirror: {reason}")

    # -- snapshots -----------------------------------------------------------------------

    def _take_snapshot(self, reason: str, kind: str | None = None) -> Any:
        """A target snapshot now (module docstring); the applier resumes afterwards unless
        the target is paused by then."""
        if self.parts.snapshots is None:
            raise UsageError(detail=f"the daemon of connection {self.conn.name} takes no snapshots")
        with self._snapshot_lock:
            with self._lock:
                if self._ending is not None:
                    raise BackendUnavailable(backend="daemon", detail="it is stopping; take the snapshot "
                                                                      "with dt snapshot take once it stopped")
                self._snapshotting = True
            try:
                return self.parts.snapshots.take(self.applier, reason, kind=kind, resume=False)
            finally:
                with self._lock:
                    self._snapshotting = False
                    if not self._paused:
                        self.applier.resume()

    def _maybe_snapshot(self) -> None:
        """Start a scheduled snapshot in its own thread when one is due (module docstring)."""
        now = time.monotonic()
        if (self.parts.snapshots is None or self.settings.snapshot_interval_s <= 0 or now < self._snapshot_check_at
                or self.stop_requested.is_set()):
            return
        self._snapshot_check_at = now + SNAPSHOT_CHECK_S
        with self._lock:
            settled = self._phase() == "replicating" and not self._snapshotting
        if not settled or self._progress.data_state is not TargetDataState.OK:
            return
        reason = self.parts.snapshots.due(time.time_ns())
        if reason is None:
            return
        self._snapshot_thread = threading.Thread(target=self._scheduled_snapshot, args=(reason,),
                                                 name=f"snapshot-{self.conn.partition}", daemon=True)
        self._snapshot_thread.start()

    def _maybe_retain(self) -> None:
        """Enforce the history window (engine/retention.py) every RETENTION_CHECK_S: applied
        events older than ``history_window_s`` go, the byte bound ``history_max_mb`` may cut
        into the window, and nothing a consumer has not processed is ever dropped.

        History gives way to the queue: when the queue found too little free space since
        the last check, retention runs at once and drops every processed event, inside the
        window too (window 0, and no byte bound, whose scan would read what it drops).
        Otherwise history the applier no longer needs would hold the disk the queue needs,
        and the remirror repairing the overflow would fail for lack of space as often as it
        is tried. (A mirror waiting for room finds the queue short at every poll: only a run
        that dropped something is logged.)"""
        now = time.monotonic()
        short = self.queue.take_space_short()
        if now < self._retain_at and not short:
            return
        self._retain_at = now + RETENTION_CHECK_S
        window_s, max_bytes = (0, None) if short else (self.settings.history_window_s,
                                                       self.settings.history_max_mb << 20)
        try:
            before = self._log.start_offset(self.conn.partition)
            start = apply_retention(self._log, self.conn.partition, window_s=window_s, max_bytes=max_bytes)
        except (DtError, OSError) as exc:  # the log is away or busy: the next check tries again
            log.warning("history retention skipped", msgid="DT-D051", connection=self.conn.name,
                        error=getattr(exc, "message", str(exc)))
            return
        if short and start > before:
            log.warning("history dropped to make room for the queue", msgid="DT-D052", connection=self.conn.name,
                        start_offset=start, dropped_events=start - before)
        else:
            log.debug("history retention applied", msgid="DT-D050", connection=self.conn.name, start_offset=start)

    def _scheduled_snapshot(self, reason: str) -> None:
        try:
            self._take_snapshot(reason)
        except Exception as exc:  # noqa: BLE001 - replication goes on; the next try is an interval later
            if self._ending is not None:
                return  # the daemon began stopping before this snapshot could start
            self._snapshot_check_at = time.monotonic() + self.settings.snapshot_interval_s
            log.error("scheduled snapshot failed", msgid="DT-D036", connection=self.conn.name, reason=reason,
                      error=f"{type(exc).__name__}: {getattr(exc, 'message', exc)}")

    # -- status --------------------------------------------------------------------------

    def _phase(self) -> str:
        """What the daemon is doing, in a few words (under ``_lock``)."""
        if self._ending is not None:
            return self._ending
        if self._mirror_thread is not None:
            return "remirroring" if self._mirror_reason.startswith("remirror") else "mirroring"
        if self._request is not None:
            return "waiting for the queue to drain before mirroring"
        if self._required is not None:
            return "mirror required"
        if self._mirror_paused:
            return "mirror paused"
        return "replicating"

    def _mirror_status(self, applied: int) -> MirrorStatus:
        if self._mirror_thread is not None:
            return MirrorStatus.REMOVING_ORPHANS if self._orphans else MirrorStatus.MIRRORING
        if self._mirror_paused:
            return MirrorStatus.PAUSED
        if self._mirror_end is not None and applied < self._mirror_end:
            return MirrorStatus.WAITING
        return MirrorStatus.IDLE

    def status(self) -> dict:
        """Every statistic ``dt status`` shows, for this connection, now."""
        snap = self._progress.snapshot()
        stats = self.queue.stats()
        applied = snap["applied_offset"]
        try:
            end, unreachable = self._log.end_offset(self.conn.partition), None
        except (BackendUnavailable, NotFound) as exc:
            # A cluster away (Kafka restarting), or the partition removed behind the daemon's
            # back (a topic deleted): the operator asks precisely now, and the daemon still
            # knows its queue and its target.
            end, unreachable = self.queue.end_offset(), exc.message
        with self._lock:
            required, request, mirror, phase = self._required, self._request, self._mirror, self._phase()
            mirror_status = self._mirror_status(applied)
            mirror_stats = mirror.stats.as_dict() if mirror is not None else self._mirror_last
            mirror_reason, mirror_error = self._mirror_reason, self._mirror_error
        data_state = snap["target_data_state"]
        if required is not None and data_state != TargetDataState.MIRRORING.value:
            data_state = TargetDataState.MIRROR_REQUIRED.value  # before the applier reaches the Gap
        if required is not None or request is not None:
            replication = ReplicationStatus.PENDING
        elif stats.ops > 0:
            replication = ReplicationStatus.REPLICATING
        else:
            replication = ReplicationStatus.READY
        latency = dict(snap.get("recovery_point_latency_ms") or {})
        # Unknown without the log (reading it would wait for the cluster once more).
        latency["current"] = None if unreachable else current_latency_ms(self._log, self.conn.partition, applied)
        return {
            "connection": self.conn.name, "id": self.conn.id, "source": self.conn.source_root,
            "target": self.conn.target_root, "replication_set": self.conn.set_name,
            "partition": self.conn.partition, "pid": os.getpid(), "daemon": "running",
            "state": phase,
            "mirror_status": mirror_status.value,
            "mirror": mirror_stats, "mirror_reason": mirror_reason or None, "mirror_error": mirror_error,
            "replication_status": replication.value,
            "transmit_mode": (TransmitMode.PAUSED if self._paused else TransmitMode.STARTED).value,
            "target_data_state": data_state,
            "target_data_state_reason": required or snap.get("target_data_state_reason"),
            "target_status": snap.get("target_status"),
            "target_status_detail": snap.get("target_status_detail") or None,
            "queued_bytes": stats.bytes, "queued_ops": stats.ops,
            "memory_queue_bytes": stats.memory_bytes, "disk_queue_bytes": stats.disk_bytes,
            "queue_limit_bytes": stats.limit_bytes, "free_bytes": stats.free_bytes,
            "queue_overflow": stats.overflow,
            "sent_bytes": snap.get("applied_bytes", 0),
            "applied_offset": applied, "end_offset": end, "log_unreachable": unreachable,
            "recovery_point_latency_ms": latency,
            "last_file": snap.get("last_file"),
            "capture": "running" if self.capture.running else "stopped",
        }

    # -- control API -----------------------------------------------------------------------

    def operations(self) -> dict[str, Operation]:
        return {
            "status": Operation(Role.MONITOR, lambda args: self.status()),
            "pause": Operation(Role.ADMIN, self._op_pause),
            "resume": Operation(Role.ADMIN, self._op_resume),
            "stop": Operation(Role.ADMIN, self._op_stop),
            "task": Operation(Role.ADMIN, self._op_task),
            "snapshot_take": Operation(Role.ADMIN, self._op_snapshot_take),
            "mirror_start": Operation(Role.ADMIN, self._op_mirror_start),
            "mirror_pause": Operation(Role.ADMIN, self._op_mirror_pause),
            "mirror_resume": Operation(Role.ADMIN, self._op_mirror_resume),
            "mirror_stop": Operation(Role.ADMIN, self._op_mirror_stop),
        }

    def _op_pause(self, args: dict) -> dict:
        with self._lock:
            self._paused = True
            self.applier.pause()
        log.info("target paused", msgid="DT-D031", connection=self.conn.name)
        return {"transmit_mode": TransmitMode.PAUSED.value}

    def _op_resume(self, args: dict) -> dict:
        with self._lock:
            self._paused = False
            if not self._snapshotting:  # else the snapshot resumes the applier when it is done
                self.applier.resume()
        log.info("target resumed", msgid="DT-D032", connection=self.conn.name)
        return {"transmit_mode": TransmitMode.STARTED.value}

    def _op_stop(self, args: dict) -> dict:
        self.stop_requested.set()
        self._wake.set()
        return {"stopping": True, "pid": os.getpid()}

    def _op_task(self, args: dict) -> dict:
        name, argv = args.get("name"), args.get("argv")
        if not isinstance(name, str) or not name:
            raise UsageError(detail="a task needs a name")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise UsageError(detail="a task needs a command: a non-empty list of strings")
        if not all(_is_utf8(text) for text in (name, *argv)):  # the stream's strings are UTF-8 (Avro)
            raise UsageError(detail="a task's name and command must be UTF-8 text (an argument that is "
                                    "no UTF-8, such as a file name, can be given through a script)")
        timeout_s = task_timeout_s(args.get("timeout_s", DEFAULT_TASK_TIMEOUT_S))
        cmd = TaskCommand(task_id=uuid.uuid4().hex[:16], name=name, argv=argv, timeout_s=timeout_s)
        offset = self.queue.append([codec.encode(Event(cmd, time.time_ns(), "api"))])
        log.info("task inserted", msgid="DT-D033", connection=self.conn.name, task_id=cmd.task_id,
                 name=name, offset=offset)
        answer: dict = {"task_id": cmd.task_id, "offset": offset}
        if args.get("wait"):
            answer["result"] = self._wait_task(cmd.task_id, offset)
        return answer

    def _wait_task(self, task_id: str, offset: int) -> dict | None:
        """The TaskResult of the task at ``offset`` once the target ran it. A stop does not
        end the wait, since the drain usually applies the task; None only once the applier
        thread ended without it (a paused target, a second signal: it runs at the next start)."""
        while True:
            ended = not self._applier_thread.is_alive()  # before the offset: then that one is final
            if self._progress.applied_offset >= offset:
                break
            if ended:
                return None
            self._applier_thread.join(TASK_WAIT_POLL_S)
        result = find_task_result(self._log, self.conn.partition, task_id, offset)
        return None if result is None else {"task_id": result.task_id, "exit_status": result.exit_status,
                                            "output": result.output, "offset": result.applied_offset}

    def _op_snapshot_take(self, args: dict) -> dict:
        kind = args.get("kind")
        if kind is not None and not isinstance(kind, str):
            raise UsageError(detail="a snapshot kind is a name (btrfs, reflink or linktree)")
        return self._take_snapshot("manual", kind).as_dict()

    def _op_mirror_start(self, args: dict) -> dict:
        value = args.get("mode") or self.settings.auto_remirror_mode
        try:
            mode = MirrorMode(value)
        except ValueError:
            raise UsageError(detail=f"unknown mirror mode {value!r} "
                                    f"(use one of {', '.join(m.value for m in MirrorMode)})") from None
        with self._lock:
            if self._mirror_thread is not None or self._mirror_paused:
                raise UsageError(detail="a mirror is already running or paused: stop it first")
        self._request_mirror(mode, "started by an operator")
        return {"requested": mode.value}

    def _op_mirror_pause(self, args: dict) -> dict:
        with self._lock:
            if self._mirror_thread is None:
                raise UsageError(detail="no mirror is running")
            self._halt_mirror("pause")
        return {"mirror_status": MirrorStatus.PAUSED.value}

    def _op_mirror_resume(self, args: dict) -> dict:
        with self._lock:
            if not self._mirror_paused or self._mirror_thread is not None:
                raise UsageError(detail="no mirror is paused")
            self._mirror_paused = False
            self._launch_mirror()
        return {"mirror_status": MirrorStatus.MIRRORING.value}

    def _op_mirror_stop(self, args: dict) -> dict:
        """Stop and forget the mirror. The target is left incomplete: a Gap says so in the
        stream, but an operator's stop is no reason to remirror on our own."""
        reason = "the mirror was stopped by an operator before it finished"
        with self._lock:
            mirror, thread = self._mirror, self._mirror_thread
            if mirror is None:
                raise UsageError(detail="no mirror is running or paused")
            self._halt_mirror("stop")
            if thread is None:  # paused: nothing runs, forget it now
                self._mirror, self._mirror_paused = None, False
                self._mirror_last = mirror.stats.as_dict()
        if thread is not None:
            thread.join()
            self._reap_mirror()
        self.queue.append([codec.encode(Event(Gap(reason=reason), time.time_ns(), "api"))])
        with self._lock:
            self._required = self._required or reason
        return {"mirror_status": MirrorStatus.IDLE.value}
