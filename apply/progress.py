"""What the target has applied, and in what state its data is: stored with the target.

The applied offset lives beside the target, not in the Log, so it moves together with
the effects it covers whatever backend the Log is (the Log's consumer offset of the
applier is only advisory: retention and queue accounting).

Layout of ``<state_dir>/applied.bin``: two 512-byte slots, written alternately (slot =
seq % 2) by one ``pwrite`` each. A slot (little-endian)::

    0    4  magic b"DTAP"
    4    2  layout version (2; version 1 lacks the stamp at 480 and is read as stamp 0)
    6    2  flags: bit 0 = synced (everything up to ``applied`` is on disk, nothing after)
    8    8  seq, +1 per record written
   16    8  applied offset (signed; -1 = nothing applied)
   24    8  offset of a task command being run, -1 if none
   32    1  target data state (_STATE_CODES)
   33   16  boot id of the machine that wrote the record
   49    2  length n of the state reason
   51    n  state reason, UTF-8 (at most 400 bytes)
  480    8  stamp: the log timestamp (ns) of the record at the applied offset, 0 if unknown
  496   16  blake3 (first 16 bytes) of bytes 0..495

The stamp tells whether the log still holds the record the target applied last: a log
that went back (records lost from its tail and their offsets given to new ones, or made
anew) is found by the applier on loading (apply/applier.py, DT-A021).

A reader takes the valid slot with the highest seq, so a write torn by a crash (or
read half-written by another process) falls back to the previous record.

Durability: ``commit`` is one pwrite: it survives the process being killed, which is
what the applier's replay rule needs (apply/applier.py). Surviving the machine going down
is the job of ``checkpoint`` records (the caller syncs the target file system first, the
record says so with the synced flag and is fsynced) and of ``mark_dirty``: before the
first effect after a synced record, a record without the flag is fsynced. So on start,
a record that is not synced and was written under another boot id means the machine went
down while effects were still in its page cache: the target data state becomes Mirror
Required (DT-A013), since replaying from an older offset over a partly persisted state
would not be exact.

``status.json`` beside it is a snapshot for readers in other processes (``dt status``):
rewritten by rename, at most once a second and on every state change; advisory (a
failure to write it is logged, DT-A019, never raised).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import struct
import threading
import time
import uuid
from collections import deque
from pathlib import Path

import blake3

from datatether.engine import logs
from datatether.engine.durable import fsync_dir
from datatether.engine.errors import BackendUnavailable
from datatether.engine.offsets import NO_OFFSET
from datatether.engine.states import TargetDataState, TargetStatus

log = logs.get(__name__)

RECORD_FILE = "applied.bin"
STATUS_FILE = "status.json"
SLOT = 512
MAGIC = b"DTAP"
VERSION = 2
_READABLE_VERSIONS = (1, 2)
FLAG_SYNCED = 1
MAX_REASON = 400
LATENCY_WINDOW_S = 60.0
PUBLISH_EVERY_S = 1.0
LATENCY_PRECISION = 0.01  # relative width of a latency histogram bucket
_LOG_STEP = math.log1p(LATENCY_PRECISION)
_HEAD = struct.Struct("<4sHHQqqB16sH")
_STAMP = struct.Struct("<q")
_STAMP_AT = 480
_DIGEST = 16
_STATE_CODES = {
    TargetDataState.OK: 0, TargetDataState.MIRRORING: 1, TargetDataState.MIRROR_REQUIRED: 2,
    TargetDataState.RESTORE_REQUIRED: 3, TargetDataState.NOT_READY: 4,
}
_CODE_STATES = {code: state for state, code in _STATE_CODES.items()}


def boot_id() -> bytes:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return uuid.UUID(f.read().strip()).bytes


class _Record:
    __slots__ = ("seq", "applied", "task_offset", "state", "reason", "synced", "boot", "stamp")

    def __init__(self, seq=0, applied=NO_OFFSET, task_offset=NO_OFFSET, state=TargetDataState.NOT_READY,
                 reason="", synced=True, boot=b"\0" * 16, stamp=0):
        self.seq, self.applied, self.task_offset = seq, applied, task_offset
        self.state, self.reason, self.synced, self.boot = state, reason, synced, boot
        self.stamp = stamp

    def pack(self) -> bytes:
        reason = self.reason.encode("utf-8", "replace")[:MAX_REASON]
        head = _HEAD.pack(MAGIC, VERSION, FLAG_SYNCED if self.synced else 0, self.seq, self.applied,
                          self.task_offset, _STATE_CODES[self.state], self.boot, len(reason))
        body = (head + reason).ljust(_STAMP_AT, b"\0") + _STAMP.pack(self.stamp)
        body = body.ljust(SLOT - _DIGEST, b"\0")
        return body + blake3.blake3(body).digest(_DIGEST)

    @classmethod
    def unpack(cls, slot: bytes) -> "_Record | None":
        if len(slot) != SLOT or blake3.blake3(slot[:-_DIGEST]).digest(_DIGEST) != slot[-_DIGEST:]:
            return None
        magic, version, flags, seq, applied, task, code, boot, n = _HEAD.unpack_from(slot)
        if magic != MAGIC or version not in _READABLE_VERSIONS or code not in _CODE_STATES:
            return None
        reason = slot[_HEAD.size:_HEAD.size + n].decode("utf-8", "replace")
        stamp = _STAMP.unpack_from(slot, _STAMP_AT)[0] if version >= 2 else 0
        return cls(seq, applied, task, _CODE_STATES[code], reason, bool(flags & FLAG_SYNCED), boot, stamp)


def _read_record(data: bytes) -> _Record | None:
    slots = [_Record.unpack(data[i * SLOT:(i + 1) * SLOT]) for i in range(2)]
    valid = [r for r in slots if r is not None]
    return max(valid, key=lambda r: r.seq) if valid else None


def _as_loaded(rec: _Record | None, data: bytes, boot: bytes) -> tuple[_Record, bool]:
    """The record as an applier loads it from the file's ``data`` (``rec``, its valid
    record, if any) on the machine booted as ``boot``, and whether the target is then
    distrusted (module docstring): Mirror Required when the file holds something but no
    valid record, or a record left unsynced under another boot id. Readers in other
    processes judge by it too, so ``dt status`` says what the applier will find."""
    why = ""
    if rec is None:
        rec = _Record(boot=boot)
        if data.strip(b"\0"):
            why = "the applied-offset record was unreadable"
    elif not rec.synced and rec.boot != boot:
        why = "the machine stopped while events were being applied"
    if why:
        rec.state, rec.reason = TargetDataState.MIRROR_REQUIRED, why
    return rec, bool(why)


class Progress:
    """The applied offset, target data state and target status of one connection's target.

    One process at a time (an exclusive lock on the record file)."""

    def __init__(self, state_dir: str | os.PathLike):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / RECORD_FILE
        created = not path.exists()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise BackendUnavailable(backend=f"target state {self.state_dir}",
                                     detail="another applier is using it") from None
        if created:
            fsync_dir(self.state_dir)
        self._boot = boot_id()
        self.status = TargetStatus.OK
        self.status_detail = ""
        self._latency = LatencyWindow()
        self._latency_lock = threading.Lock()  # the applier adds while status readers summarise
        self._last_applied_ns: int | None = None
        self._last_file: str | None = None
        self._events = 0
        self._bytes = 0
        self._published = 0.0
        self._rec = self._load(os.pread(self._fd, 2 * SLOT, 0))

    def _load(self, data: bytes) -> _Record:
        found = _read_record(data)
        self.fresh = found is None
        rec, distrusted = _as_loaded(found, data, self._boot)
        if distrusted and found is None:
            log.error("progress record unreadable", msgid="DT-A014", path=str(self.state_dir))
        elif distrusted:
            log.error("the machine stopped while events were being applied", msgid="DT-A013",
                      applied=rec.applied, state_dir=str(self.state_dir))
        return rec

    # -- the durable record --------------------------------------------------------------

    @property
    def applied_offset(self) -> int:
        return self._rec.applied

    @property
    def data_state(self) -> TargetDataState:
        return self._rec.state

    @property
    def data_state_reason(self) -> str:
        return self._rec.reason

    @property
    def task_offset(self) -> int:
        """Offset of a task command that was started and whose offset is not committed."""
        return self._rec.task_offset

    @property
    def synced(self) -> bool:
        return self._rec.synced

    @property
    def applied_stamp(self) -> int:
        """The log timestamp of the record at the applied offset (0: unknown)."""
        return self._rec.stamp

    def commit(self, offset: int, *, stamp: int = 0, durable: bool = False, synced: bool = False) -> None:
        """Record ``offset`` as applied (with the current data state); ``stamp`` is the log
        timestamp of the record at ``offset`` (0 when unknown). ``durable`` fsyncs the
        record; ``synced`` says the caller synced the target's file system just before."""
        self._rec.applied, self._rec.stamp = offset, stamp
        if offset >= self._rec.task_offset:
            self._rec.task_offset = NO_OFFSET  # the task's own offset is committed: it is over
        self._write(synced=synced, durable=durable or synced)

    def mark_dirty(self) -> None:
        """Call before changing the target after a synced record (see the module docstring)."""
        if self._rec.synced:
            self._write(synced=False, durable=True)

    def begin_task(self, offset: int) -> None:
        """Durably note that the task command at ``offset`` is about to run."""
        self._rec.task_offset = offset
        self._write(synced=False, durable=True)

    def set_data_state(self, state: TargetDataState, reason: str = "") -> None:
        """Change the target data state; it is stored by the next ``commit``."""
        logs.transition(log, "target_data_state", self._rec.state, state, reason=reason,
                        state_dir=str(self.state_dir))
        changed = state != self._rec.state
        self._rec.state = state
        self._rec.reason = reason
        if changed:
            self.publish(force=True)

    def _write(self, *, synced: bool, durable: bool) -> None:
        self._rec.seq += 1
        self._rec.synced = synced
        self._rec.boot = self._boot
        os.pwrite(self._fd, self._rec.pack(), (self._rec.seq % 2) * SLOT)
        if durable:
            os.fdatasync(self._fd)

    # -- what readers see ----------------------------------------------------------------

    def set_status(self, status: TargetStatus, detail: str = "") -> None:
        logs.transition(log, "target_status", self.status, status, detail=detail,
                        state_dir=str(self.state_dir))
        changed = (status, detail) != (self.status, self.status_detail)
        self.status, self.status_detail = status, detail
        if changed:
            self.publish(force=True)

    def sample(self, capture_ns: int, path: str | None, nbytes: int, applied_ns: int | None = None) -> None:
        """Record one applied event: recovery point latency (capture -> applied), last file."""
        now = time.time_ns() if applied_ns is None else applied_ns
        with self._latency_lock:
            self._latency.add(now, max(0, now - capture_ns))
        self._last_applied_ns = now
        if path is not None:
            self._last_file = path
        self._events += 1
        self._bytes += nbytes

    def snapshot(self) -> dict:
        """What readers see; any thread may ask while the applier's thread samples."""
        now = time.time_ns()
        with self._latency_lock:
            latency = self._latency.summary(now)
        return {
            "applied_offset": self._rec.applied,
            "target_data_state": self._rec.state.value,
            "target_data_state_reason": self._rec.reason,
            "target_status": self.status.value,
            "target_status_detail": self.status_detail,
            "last_applied_ns": self._last_applied_ns,
            "last_file": self._last_file,
            "recovery_point_latency_ms": latency,
            "applied_events": self._events,
            "applied_bytes": self._bytes,
            "pid": os.getpid(),
            "updated_ns": now,
        }

    def publish(self, force: bool = False) -> None:
        """Rewrite status.json (at most once a second unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._published < PUBLISH_EVERY_S:
            return
        self._published = now
        path = self.state_dir / STATUS_FILE
        tmp = path.with_name(f".{STATUS_FILE}.{os.getpid()}.tmp")
        try:
            # ASCII: a file name that is not UTF-8 (last_file) travels as \udcNN escapes
            tmp.write_text(json.dumps(self.snapshot(), default=str))
            os.replace(tmp, path)
        except OSError as exc:  # advisory: a full state disk must not stop the applier
            log.warning("status snapshot not written", msgid="DT-A019", path=str(path), error=str(exc))

    @staticmethod
    def read_snapshot(state_dir: str | os.PathLike) -> dict:
        """The latest snapshot, for another process. The applied offset and data state come
        from the durable record, as an applier would load it (``_as_loaded``); a snapshot
        whose writer is gone says "Not Loaded"."""
        state_dir = Path(state_dir)
        snap = _read_status(state_dir / STATUS_FILE)
        try:
            data = (state_dir / RECORD_FILE).read_bytes()[:2 * SLOT]
        except FileNotFoundError:
            data = b""
        rec, _ = _as_loaded(_read_record(data), data, boot_id())
        snap.update(applied_offset=rec.applied, target_data_state=rec.state.value,
                    target_data_state_reason=rec.reason)
        if not _alive(snap.get("pid")):
            snap["target_status"] = TargetStatus.NOT_LOADED.value
        return snap

    def close(self) -> None:
        self.status, self.status_detail = TargetStatus.NOT_LOADED, "applier stopped"
        self.publish(force=True)
        os.close(self._fd)


class LatencyWindow:
    """Recovery point latencies of the last ``window_s`` seconds, in bounded memory and time.

    One histogram per second, buckets ``LATENCY_PRECISION`` wide on a log scale, each
    keeping its count and its largest latency. A percentile is the largest latency in the
    bucket holding its nearest rank: never below the exact value, at most 1 % above it, and
    exact when that bucket holds one distinct value. Adding is O(1) and a summary costs the
    buckets in use, whatever the event rate (sorting every sample of the window instead
    held the interpreter lock for about 10 ms a second at 5,000 events a second, a pause
    every captured write had to wait out)."""

    def __init__(self, window_s: float = LATENCY_WINDOW_S):
        self.window_s = window_s
        self._seconds: deque[tuple[int, dict[int, list[int]]]] = deque()
        self._last: int | None = None

    def add(self, at_ns: int, latency_ns: int) -> None:
        second = at_ns // 1_000_000_000
        if not self._seconds or second > self._seconds[-1][0]:
            self._seconds.append((second, {}))
            while self._seconds[0][0] <= second - self.window_s:
                self._seconds.popleft()
        buckets = self._seconds[-1][1]  # a clock stepping back counts in the latest second
        bucket = int(math.log(latency_ns) / _LOG_STEP) if latency_ns > 0 else -1
        slot = buckets.get(bucket)
        if slot is None:
            buckets[bucket] = [1, latency_ns]
        else:
            slot[0] += 1
            slot[1] = max(slot[1], latency_ns)
        self._last = latency_ns

    def summary(self, now_ns: int | None = None) -> dict:
        """current (the latest sample), p50 and p99 in milliseconds, None when empty."""
        horizon = (time.time_ns() if now_ns is None else now_ns) // 1_000_000_000 - self.window_s
        merged: dict[int, list[int]] = {}
        for second, buckets in self._seconds:
            if second <= horizon:
                continue
            for bucket, (count, top) in buckets.items():
                slot = merged.setdefault(bucket, [0, top])
                slot[0] += count
                slot[1] = max(slot[1], top)
        total = sum(count for count, _ in merged.values())
        if not total:
            return {"current": None, "p50": None, "p99": None, "samples": 0, "window_s": self.window_s}
        ordered = sorted(merged.items())

        def rank(p: float) -> float:
            wanted, seen = max(1, math.ceil(p * total)), 0
            for _, (count, top) in ordered:
                seen += count
                if seen >= wanted:
                    return top / 1e6
            return ordered[-1][1][1] / 1e6

        return {"current": self._last / 1e6, "p50": rank(0.50), "p99": rank(0.99), "samples": total,
                "window_s": self.window_s}


def latency_summary(latencies_ns: list[int]) -> dict:
    """``LatencyWindow.summary`` of these latencies, all taken now (the last is current)."""
    window = LatencyWindow()
    now = time.time_ns()
    for latency in latencies_ns:
        window.add(now, latency)
    return window.summary(now)


_OPTIONAL_INT, _OPTIONAL_STR, _NUMBER = (int, type(None)), (str, type(None)), (int, float, type(None))
_STATUS_FIELDS = {  # what ``snapshot`` writes, by type
    "target_status": str, "target_status_detail": str, "last_applied_ns": _OPTIONAL_INT,
    "last_file": _OPTIONAL_STR, "recovery_point_latency_ms": dict, "applied_events": int, "applied_bytes": int,
    "pid": int, "updated_ns": int,
}


def _read_status(path: Path) -> dict:
    """status.json as ``snapshot`` wrote it. It is advisory: a file that is missing, not
    JSON or damaged (a field of the wrong type, a state that does not exist) reads as
    the fields that are right, so dt status shows what it can instead of failing."""
    snap = {"target_status": TargetStatus.NOT_LOADED.value, "recovery_point_latency_ms": latency_summary([])}
    try:
        found = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return snap
    if not isinstance(found, dict):
        return snap
    snap.update({k: v for k, v in found.items() if k in _STATUS_FIELDS and isinstance(v, _STATUS_FIELDS[k])
                 and not isinstance(v, bool)})
    if snap["target_status"] not in {s.value for s in TargetStatus}:
        snap["target_status"] = TargetStatus.NOT_LOADED.value
    latency = snap["recovery_point_latency_ms"]
    if set(latency) != set(latency_summary([])) or not all(isinstance(v, _NUMBER) for v in latency.values()):
        snap["recovery_point_latency_ms"] = latency_summary([])
    return snap


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
