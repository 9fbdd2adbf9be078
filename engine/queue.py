"""The source queue of a connection: records appended to its partition and not yet applied.

On a single server the source queue and the target queue are one range of the log, the
offsets ``applied+1 .. end-1`` (DESIGN: "source queue = events appended and not yet
acknowledged"). ``SourceQueue`` counts that range (operations from offsets, bytes from the
payload sizes recorded as records are appended), enforces the limits the reference names
and is the only way a daemon appends to the partition:

- ``offer(values)`` is the capture's way. It appends while the queue has room. When a limit
  is hit the queue *overflows*: ``offer`` appends nothing more (the source keeps working; its
  operations simply stop being recorded) until ``reopen()``, which the daemon calls when the
  remirror that repairs the gap starts. ``on_overflow(reason)`` is called once per overflow,
  so the loss is never silent (DESIGN invariant 3).
- ``append(values)`` always appends: control records (Gap, TaskCommand, TaskResult) are
  tiny and must never be lost.
- ``throttled()`` is a ``Log`` view whose ``append`` waits for room, for the mirror: a mirror
  slows down instead of filling the queue the capture needs. It keeps half of the limit free
  for the capture and raises QueueFull when even an empty queue has no room (a full disk).
- ``mirror_feed()`` is the same throttle for a producer that appends under path locks (the
  mirror beside a capture): it waits for room *before* taking its locks (``room(n)``) and
  then appends at once. Waiting with the locks held would block every captured write to
  those paths (an application's write) for as long as the queue stays full, e.g. while the
  target is paused. What the capture appends between the wait and the append may take the
  mirror past its share by one batch.
- ``log()`` is a ``Log`` view that appends like ``append`` (for the applier, which appends
  TaskResult records), so every record of the partition is counted.

Limits (engine/settings.py, names from the reference): the queue may hold
``memory_queue_limit_mb + disk_queue_limit_mb`` (``disk_queue_limit_mb=None``: no limit,
0: no disk queuing), and appending must leave ``minimum_free_space_mb`` free on the
filesystem holding the log. The first ``memory_queue_limit_mb`` of queued bytes are reported
as the memory queue and the rest as the disk queue: every record is in the log, so the split
is an accounting convention that keeps the reference's statistics meaningful.

Sizes are payload bytes (``len(value)``), the unit of ``Log.size``. The settings' minimums
(32 MiB of memory queue) are for production; tests build ``QueueLimits`` directly in bytes
(``dt protect`` has a hidden ``--queue-limit-bytes`` for the same purpose).

Free space is measured (statvfs) at most every FREE_SPACE_CHECK_S while appends leave
room: in between, what was appended since is subtracted from the last measure. A refusal is
always decided on a fresh measure. (A system call per captured write handed the
interpreter lock to other threads each time.)

Thread safety: every method may be called from any thread. One lock covers "check room,
append, record the sizes", so recorded sizes follow offset order.
"""

from __future__ import annotations

import os
import threading
import time
from array import array
from dataclasses import asdict, dataclass
from typing import Callable, Sequence, TypeVar

from . import logs
from .errors import BackendUnavailable, CorruptRecord, QueueFull
from .log import Log
from .offsets import NO_OFFSET
from .settings import MiB, Settings

log = logs.get(__name__)

T = TypeVar("T")

THROTTLE_POLL_S = 0.01  # how often a throttled append looks for room again
FREE_SPACE_CHECK_S = 0.1  # how long a measure of the free space may be trusted (minus what was appended)
MIRROR_SHARE = 0.5      # the part of the limit a throttled (mirror) append may fill
_TRIM_AT = 1 << 16      # forget sizes of applied records once this many accumulated
_FREE_SPACE = "minimum free space"


class Cancelled(Exception):
    """A throttled append stopped waiting because its producer is being paused or stopped
    (control flow between the daemon and its mirror, never shown to a user)."""


@dataclass(frozen=True)
class QueueLimits:
    """Limits in bytes. ``disk_bytes=None``: unlimited disk queue."""

    memory_bytes: int
    disk_bytes: int | None
    min_free_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> QueueLimits:
        disk = settings.disk_queue_limit_mb
        return cls(memory_bytes=settings.memory_queue_limit_mb * MiB,
                   disk_bytes=None if disk is None else disk * MiB,
                   min_free_bytes=settings.minimum_free_space_mb * MiB)

    @property
    def total_bytes(self) -> int | None:
        """What the queue may hold, or None when only free space limits it."""
        return None if self.disk_bytes is None else self.memory_bytes + self.disk_bytes


@dataclass(frozen=True)
class QueueStats:
    ops: int                 # records appended and not applied
    bytes: int               # their payload bytes
    memory_bytes: int        # the part of ``bytes`` within the memory queue limit
    disk_bytes: int          # the rest
    limit_bytes: int | None  # memory + disk limit (None: unlimited)
    free_bytes: int          # free space where the log lives
    overflow: str | None     # why events are being dropped, None while recording

    def as_dict(self) -> dict:
        return asdict(self)


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class SourceQueue:
    """Counts and limits the unapplied records of one partition (see the module docstring).

    ``applied()`` returns the applied offset (NO_OFFSET when nothing is applied yet);
    ``space_path`` is a directory on the filesystem holding the log.
    """

    def __init__(self, log_: Log, partition: str, limits: QueueLimits, applied: Callable[[], int],
                 space_path: str | os.PathLike, on_overflow: Callable[[str], None] | None = None):
        self._log = log_
        self.partition = partition
        self.limits = limits
        self._applied = applied
        self._space_path = space_path
        self._on_overflow = on_overflow
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._overflow: str | None = None
        self._dropped = 0
        self._space_short = False  # an append lacked free space since ``take_space_short``
        # _cum[i] = payload bytes appended up to and including offset _base + i, counted
        # from an arbitrary origin; _floor is the same count just before _base.
        self._free = 0              # free bytes measured at _free_at, minus appends since
        self._free_at = -FREE_SPACE_CHECK_S
        self._base = max(applied(), NO_OFFSET) + 1
        self._cum = array("q")
        self._floor = 0
        self._load_backlog()

    # -- appending ---------------------------------------------------------------------

    def offer(self, values: Sequence[bytes]) -> int | None:
        """Append if the queue has room and is not overflowed; else drop and return None."""
        size = sum(len(v) for v in values)
        with self._lock:
            if self._overflow is None:
                reason = self._no_room(size, share=1.0)
                if reason is None:
                    return self._append_locked(values)
                self._overflow = reason
                notify = True
            else:
                notify = False
            self._dropped += len(values)
        if notify:
            log.warning("source queue overflow: events are dropped until a remirror",
                        msgid="DT-D001", partition=self.partition, reason=reason)
            if self._on_overflow is not None:
                self._on_overflow(reason)
        return None

    def append(self, values: Sequence[bytes]) -> int:
        """Append regardless of the limits (small control records only)."""
        with self._lock:
            return self._append_locked(values)

    def append_when_room(self, values: Sequence[bytes], cancel: threading.Event | None = None) -> int:
        """Append once the queue is below ``MIRROR_SHARE`` of its limit (mirror data).

        A batch larger than that share goes into an empty queue (a producer cannot always
        split its batches; waiting would never end); a lack of free space fails. Setting
        ``cancel`` ends the wait with Cancelled (whoever pauses or stops the producer)."""
        return self._when_room(sum(len(v) for v in values), cancel, lambda: self._append_locked(values))

    def wait_for_room(self, size: int, cancel: threading.Event | None = None) -> None:
        """Wait as ``append_when_room`` would for ``size`` bytes, appending nothing."""
        self._when_room(size, cancel, lambda: None)

    def _when_room(self, size: int, cancel: threading.Event | None, then: Callable[[], T]) -> T:
        while True:
            with self._lock:
                reason = self._no_room(size, share=MIRROR_SHARE)
                empty = self._queued_bytes_locked() == 0
                if reason is None or (empty and not reason.startswith(_FREE_SPACE)):
                    return then()
                if empty:
                    raise self._full_error(reason)
            if self._closed.wait(THROTTLE_POLL_S):
                raise BackendUnavailable(backend=f"source queue of {self.partition}", detail="closed")
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"append to {self.partition} cancelled while waiting for room")

    def reopen(self) -> int:
        """End an overflow (the repairing remirror starts now); return how many were dropped."""
        with self._lock:
            dropped, self._dropped = self._dropped, 0
            was, self._overflow = self._overflow, None
        if was is not None:
            log.info("source queue recording again", msgid="DT-D002", partition=self.partition,
                     dropped_events=dropped)
        return dropped

    def refusal(self) -> QueueFull:
        """The error a producer raises for events ``offer`` dropped (names the limit hit)."""
        return self._full_error(self._overflow or "")

    def close(self) -> None:
        """Wake throttled appends (they raise); offers and appends still work."""
        self._closed.set()

    # -- views ---------------------------------------------------------------------------

    def log(self) -> Log:
        """The partition's log where ``append`` always appends and is counted."""
        return _QueuedLog(self._log, self.partition, self.append)

    def throttled(self, cancel: threading.Event | None = None) -> Log:
        """The partition's log where ``append`` waits for room (for the mirror); ``cancel``
        ends a wait (``append_when_room``)."""
        return _QueuedLog(self._log, self.partition, lambda values: self.append_when_room(values, cancel))

    def mirror_feed(self, cancel: threading.Event | None = None) -> MirrorFeed:
        """The throttle for a producer appending under path locks (module docstring)."""
        return MirrorFeed(self.log(), lambda size: self.wait_for_room(size, cancel))

    # -- accounting ----------------------------------------------------------------------

    @property
    def overflow(self) -> str | None:
        return self._overflow

    def take_space_short(self) -> bool:
        """Whether an offer or a throttled append found too little free space since the
        last call (the daemon's retention then makes room, engine/daemon.py)."""
        with self._lock:
            short, self._space_short = self._space_short, False
        return short

    def end_offset(self) -> int:
        """The partition's end offset as far as this queue knows (every record below it was
        appended or counted here): what a status shows while the log cannot be asked."""
        with self._lock:
            return self._base + len(self._cum)

    def stats(self) -> QueueStats:
        with self._lock:
            applied = self._applied()
            ops = max(0, self._base + len(self._cum) - 1 - applied)
            queued = self._queued_bytes_locked(applied)
            overflow = self._overflow
        memory = min(queued, self.limits.memory_bytes)
        return QueueStats(ops=ops, bytes=queued, memory_bytes=memory, disk_bytes=queued - memory,
                          limit_bytes=self.limits.total_bytes, free_bytes=free_bytes(self._space_path),
                          overflow=overflow)

    # -- internals -----------------------------------------------------------------------

    def _append_locked(self, values: Sequence[bytes]) -> int:
        first = self._log.append(self.partition, values)
        sizes = [len(v) for v in values]
        self._free -= sum(sizes)
        self._record_locked(first, sizes)
        return first

    def _record_locked(self, first: int, sizes: list[int]) -> None:
        # Records appended past this queue (another writer) are counted with size 0.
        self._pad_to(first)
        total = self._cum[-1] if self._cum else self._floor
        for size in sizes:
            total += size
            self._cum.append(total)
        self._trim_locked()

    def _pad_to(self, offset: int) -> None:
        if offset < self._base:  # a replay moved the applier back: start over from here
            self._base, self._cum, self._floor = offset, array("q"), 0
            return
        missing = offset - (self._base + len(self._cum))
        if missing > 0:
            last = self._cum[-1] if self._cum else self._floor
            self._cum.extend([last] * missing)

    def _queued_bytes_locked(self, applied: int | None = None) -> int:
        if not self._cum:
            return 0
        applied = self._applied() if applied is None else applied
        index = applied - self._base
        done = self._floor if index < 0 else self._cum[min(index, len(self._cum) - 1)]
        return self._cum[-1] - done

    def _trim_locked(self) -> None:
        drop = min(self._applied() - self._base + 1, len(self._cum))
        if drop >= _TRIM_AT:
            self._floor = self._cum[drop - 1]
            del self._cum[:drop]
            self._base += drop

    def _no_room(self, size: int, share: float) -> str | None:
        """Why ``size`` more bytes may not be queued now, or None when they may."""
        total = self.limits.total_bytes
        if total is not None and self._queued_bytes_locked() + size > total * share:
            return f"queue limit of {total} bytes (memory {self.limits.memory_bytes} + disk {self.limits.disk_bytes})"
        if self._free_bytes_locked(size) - size < self.limits.min_free_bytes:
            self._space_short = True
            return f"{_FREE_SPACE} of {self.limits.min_free_bytes} bytes on {os.fspath(self._space_path)}"
        return None

    def _free_bytes_locked(self, size: int) -> int:
        """Free bytes where the log lives: measured again when the last measure is old or
        would not leave room for ``size`` more (module docstring)."""
        now = time.monotonic()
        if now - self._free_at >= FREE_SPACE_CHECK_S or self._free - size < self.limits.min_free_bytes:
            self._free, self._free_at = free_bytes(self._space_path), now
        return self._free

    def _full_error(self, reason: str) -> QueueFull:
        if reason.startswith(_FREE_SPACE):
            return QueueFull(queue="source (minimum free space)", limit=self.limits.min_free_bytes)
        return QueueFull(queue="source", limit=self.limits.total_bytes or 0)

    def _load_backlog(self) -> None:
        """Count records left unapplied by an earlier run (a restart resumes with them)."""
        end = self._log.end_offset(self.partition)
        offset = max(self._base, self._log.start_offset(self.partition))
        with self._lock:
            while offset < end:
                sizes = self._backlog_sizes(offset)
                self._record_locked(offset, sizes)
                offset += len(sizes)

    def _backlog_sizes(self, offset: int) -> list[int]:
        """Payload sizes of the records from ``offset`` on. A damaged record counts as 0
        bytes (its size is unknown): the applier refuses it and the target becomes Mirror
        Required, so counting it must not fail and keep the daemon from starting."""
        try:
            return [len(r.value) for r in self._log.read(self.partition, offset)]
        except CorruptRecord:
            try:  # the damaged record may be further on: count those before it
                return [len(r.value) for r in self._log.read(self.partition, offset, max_records=1)]
            except CorruptRecord:
                return [0]


@dataclass(frozen=True)
class MirrorFeed:
    """``room(n)`` waits until ``n`` more bytes of mirror data fit (call it before taking
    path locks); ``log`` appends at once, counted in the queue."""

    log: Log
    room: Callable[[int], None]


class _QueuedLog:
    """A ``Log`` that appends to one partition through a queue method; all else delegates."""

    def __init__(self, inner: Log, partition: str, append: Callable[[Sequence[bytes]], int]):
        self._inner = inner
        self._partition = partition
        self._append = append

    def append(self, partition: str, values: Sequence[bytes], timestamp_ns: int | None = None) -> int:
        if partition != self._partition:
            return self._inner.append(partition, values, timestamp_ns)
        return self._append(values)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)
