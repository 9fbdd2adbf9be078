"""A connection's partition read as a history: decoded events with their offset and time.

Times
-----
The time of an event is the log's timestamp of its record (``LogRecord.timestamp_ns``),
not the capture time inside the event: it is what ``Log.offset_for_time`` searches, so a
time printed by ``dt tail`` or ``dt history`` and given back to ``--since``/``--at``
finds the same event on every backend. Times are shown as ISO 8601 in UTC with
nanoseconds (``2026-01-02T03:04:05.123456789Z``). Parsed times accept a ``Z`` or
``+HH:MM`` offset and any number of fraction digits of the seconds (kept to the
nanosecond; a fraction anywhere else is refused, not dropped); a time without an offset
is taken as UTC, because the log itself only knows UTC.

Points
------
A *point* is an offset (a decimal number) or a time. "The state at point P" is the
effect of every event up to and including offset ``at(P)``: for an offset it is the
offset itself, for a time T it is the last offset whose time is <= T (NO_OFFSET, the
empty state, when nothing is that old).

Retention
---------
Retention drops records from the start of the log. A point is *reachable* when the log
still holds every record it needs, or a snapshot (an *anchor*: offset and time of the
last event it contains) stands in for the dropped ones. ``Reach`` says what is
reachable and is quoted in every OutsideHistory error, so users learn how far back they
can go instead of getting an empty answer.

Paths and globs
---------------
``--path GLOB`` selects an event when any path it names (a rename has two) matches the
glob (``fnmatch.fnmatchcase``, ``*`` also crosses ``/``) or lies beneath a directory that
matches it: ``--path docs`` selects everything under ``docs``. Block events name their
device, so a glob can select a device as well.

Task results
------------
``find_task_result`` looks for the TaskResult of a task command after the command's
offset (the target appends it once the task ran): the daemon answers a waiting caller
with it, and a restarted applier learns from it that the task already ran.
"""

from __future__ import annotations

import fnmatch
import os
import re
import threading
import time
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Iterable, Iterator, Sequence

from . import codec, logs
from .errors import BackendUnavailable, CorruptRecord, OffsetOutOfRange, OutsideHistory, UsageError
from .events import Event, FileKind, TaskResult
from .log import Log, LogRecord
from .offsets import NO_OFFSET

log = logs.get(__name__)

READ_BATCH = 1000
_NS = 1_000_000_000
_FRACTION = re.compile(r"(?<=\d\d:\d\d:\d\d)[.,](\d+)")  # of the seconds only
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


# -- times and points ------------------------------------------------------------------

def format_time(time_ns: int) -> str:
    """ISO 8601, UTC, nanoseconds, ``Z`` suffix (parse_time reads it back exactly)."""
    seconds, ns = divmod(time_ns, _NS)
    stamp = datetime.fromtimestamp(seconds, timezone.utc).replace(tzinfo=None).isoformat()  # strftime %Y writes year 1 as "1"
    return f"{stamp}.{ns:09d}Z"


def parse_time(text: str) -> int:
    """Nanoseconds since the epoch of an ISO 8601 time; naive times are UTC. The time in UTC
    must fall in the years 1 to 9999, as ``format_time`` writes them."""
    match = _FRACTION.search(text)
    fraction_ns = 0
    plain = text
    if match:  # datetime keeps microseconds only; the log's timestamps are nanoseconds
        digits = match.group(1)
        fraction_ns = int(digits[:9].ljust(9, "0"))
        plain = text[:match.start()] + text[match.end():]
    try:
        if "." in plain or "," in plain:  # a second fraction, or one not after the seconds
            raise ValueError(text)
        moment = datetime.fromisoformat(plain)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        moment = moment.astimezone(timezone.utc)  # OverflowError past the years 1-9999
    except (ValueError, OverflowError):
        raise UsageError(detail=f"not a time: {text!r} (use ISO 8601, e.g. 2026-01-02T03:04:05.5Z)") from None
    whole = moment - _EPOCH
    return (whole.days * 86400 + whole.seconds) * _NS + fraction_ns


@dataclass(frozen=True, slots=True)
class Point:
    """An offset or a time given by a user (exactly one of the two is set)."""

    offset: int | None = None
    time_ns: int | None = None

    def __str__(self) -> str:
        return f"offset {self.offset}" if self.offset is not None else f"time {format_time(self.time_ns)}"


def is_offset(text: str) -> bool:
    """Decimal digits 0-9 only (``str.isdigit`` also takes "²" and other scripts' digits)."""
    return text.isascii() and text.isdigit()


def parse_point(text: str) -> Point:
    """``"42"`` is offset 42; anything else must be an ISO 8601 time."""
    text = text.strip()
    if is_offset(text):
        return Point(offset=int(text))
    return Point(time_ns=parse_time(text))


# -- what is reachable -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Anchor:
    """A state known without the log: a snapshot containing every event up to ``offset``,
    the last of which has time ``time_ns`` (None when unknown)."""

    offset: int
    time_ns: int | None


@dataclass(frozen=True)
class Reach:
    """What history can show or rebuild: the retained records ``start..end-1`` plus anchors.

    Offsets from ``first_offset`` to ``end - 1`` are reachable: from the empty state when
    nothing was ever dropped, else from the oldest anchor that the retained records
    continue. Each older anchor is reachable on its own, at exactly its offset.
    """

    start: int
    end: int
    start_time_ns: int | None  # time of the record at ``start`` (None when the log is empty)
    anchors: tuple[Anchor, ...] = ()

    @property
    def last(self) -> int:
        return self.end - 1

    @property
    def base(self) -> Anchor | None:
        """The oldest anchor the retained records continue from (None: start from empty)."""
        if self.start == 0:
            return None
        for anchor in self.anchors:
            if anchor.offset >= self.start - 1:
                return anchor
        return None

    @property
    def first_offset(self) -> int | None:
        """Oldest offset from which every later offset is reachable (None: only anchors)."""
        if self.start == 0:
            return NO_OFFSET
        base = self.base
        return base.offset if base is not None and base.offset <= self.last else None

    def reachable(self, offset: int) -> bool:
        if offset > self.last or offset < NO_OFFSET:
            return False
        first = self.first_offset
        return (first is not None and offset >= first) or any(a.offset == offset for a in self.anchors)

    def describe(self) -> str:
        """One phrase for error messages: how far back and up to where."""
        if self.end == 0:
            return "the history is empty"
        parts = []
        first = self.first_offset
        if first is not None:
            since = "the beginning" if first == NO_OFFSET else f"offset {first}"
            parts.append(f"offsets from {since} to {self.last}")
        older = [a for a in self.anchors if first is None or a.offset < first]
        if older:
            parts.append("snapshots at offsets " + ", ".join(str(a.offset) for a in older))
        if self.start_time_ns is not None:
            parts.append(f"oldest retained event: offset {self.start} at {format_time(self.start_time_ns)}")
        return "; ".join(parts) or "nothing"


def reach(log_: Log, partition: str, anchors: Iterable[Anchor] = ()) -> Reach:
    start, end = log_.start_offset(partition), log_.end_offset(partition)
    start_time = log_.read(partition, start, max_records=1)[0].timestamp_ns if start < end else None
    return Reach(start, end, start_time, tuple(sorted(anchors, key=lambda a: a.offset)))


def offset_at(log_: Log, partition: str, point: Point, anchors: Iterable[Anchor] = ()) -> tuple[int, Reach]:
    """The offset whose state is the state at ``point``, checked against what is reachable.

    Raises OutsideHistory for an offset past the end, and for a point whose state cannot be
    rebuilt (dropped by retention and not covered by a snapshot).
    """
    r = reach(log_, partition, anchors)
    if point.offset is not None:
        offset = point.offset
    else:
        offset = _offset_at_time(log_, partition, point.time_ns, r)
    if offset > r.last:
        raise OutsideHistory(point=str(point), reason=f"the last offset is {r.last}", reachable=r.describe())
    if not r.reachable(offset):
        raise OutsideHistory(point=str(point), reason="it is older than the retained history and no snapshot holds it",
                             reachable=r.describe())
    return offset, r


def _offset_at_time(log_: Log, partition: str, time_ns: int, r: Reach) -> int:
    """Last offset whose time is <= ``time_ns``; anchors answer for dropped records."""
    first_later = log_.offset_for_time(partition, time_ns + 1)
    if first_later > r.start or r.start == 0:
        return first_later - 1
    # Every retained record is later than the time: the answer lies among dropped records.
    # An anchor right before the retained ones pins it; others leave it unknown.
    for anchor in r.anchors:
        if anchor.offset == r.start - 1 and anchor.time_ns is not None and anchor.time_ns <= time_ns:
            return anchor.offset
    raise OutsideHistory(point=f"time {format_time(time_ns)}",
                         reason="it is older than the retained history and no snapshot pins it",
                         reachable=r.describe())


def start_for(log_: Log, partition: str, point: Point | None) -> int:
    """First offset to show for ``--from OFFSET`` / ``--since TIME`` (None: the end).

    Stricter than ``offset_at``: listing events needs the records themselves, so a point
    older than the oldest retained record is refused rather than silently shortened.
    """
    if point is None:
        return log_.end_offset(partition)
    r = reach(log_, partition)
    if point.offset is not None:
        first = point.offset
    else:
        first = log_.offset_for_time(partition, point.time_ns)
        # With nothing retained, only a time still to come is surely after every dropped event.
        dropped_after = point.time_ns < time.time_ns() if r.start_time_ns is None else point.time_ns < r.start_time_ns
        if first == r.start and r.start > 0 and dropped_after:
            raise OutsideHistory(point=str(point), reason="events that old were dropped by retention",
                                 reachable=r.describe())
    if first > r.end:
        raise OutsideHistory(point=str(point), reason=f"the last offset is {r.last}", reachable=r.describe())
    if first < r.start:
        raise OutsideHistory(point=str(point), reason="events that old were dropped by retention",
                             reachable=r.describe())
    return first


def range_for(log_: Log, partition: str, between: Sequence[Point] | None) -> tuple[int, int]:
    """``[first, stop)`` of ``--between A B`` (both ends included; times as in ``offset_at``)."""
    if not between:
        return log_.start_offset(partition), log_.end_offset(partition)
    low, high = between
    first = start_for(log_, partition, low)
    if high.offset is not None:
        last = high.offset
    else:
        last = log_.offset_for_time(partition, high.time_ns + 1) - 1
    if last < first - 1:
        raise UsageError(detail=f"--between: {high} is before {low}")
    return first, min(last + 1, log_.end_offset(partition))


# -- events ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HistoryEvent:
    """One event of a partition, with where (offset) and when (log time) it was recorded."""

    offset: int
    time_ns: int
    event: Event
    record_bytes: int

    @property
    def op(self) -> str:
        return self.event.kind

    def paths(self) -> list[str]:
        """Set-relative paths the event names; a block event names its device."""
        device = getattr(self.event.op, "device", None)
        return self.event.paths() or ([device] if device is not None else [])

    @property
    def bytes(self) -> int:
        return self.event.data_bytes()


def decode_record(offset: int, timestamp_ns: int, value: bytes) -> HistoryEvent:
    try:
        event = codec.decode(value)
    except CorruptRecord as exc:
        raise CorruptRecord(reason=f"offset {offset}: {exc.params['reason']}") from exc
    return HistoryEvent(offset, timestamp_ns, event, len(value))


def path_matches(path: str, glob: str) -> bool:
    """The path or one of its parent directories matches the glob."""
    glob = glob.strip("/") or "*"
    candidate = path
    while candidate:
        if fnmatch.fnmatchcase(candidate, glob):
            return True
        candidate = os.path.dirname(candidate)
    return False


def selected(hev: HistoryEvent, glob: str | None) -> bool:
    return glob is None or any(path_matches(p, glob) for p in hev.paths())


def read(log_: Log, partition: str, first: int, stop: int | None = None, *,
         glob: str | None = None) -> Iterator[HistoryEvent]:
    """Events at offsets ``first .. stop-1`` (``stop`` None: the end when called), in order."""
    for record in _records(log_, partition, first, stop):
        hev = decode_record(record.offset, record.timestamp_ns, record.value)
        if selected(hev, glob):
            yield hev


def _records(log_: Log, partition: str, first: int, stop: int | None = None) -> Iterator[LogRecord]:
    """Records at offsets ``first .. stop-1`` (``stop`` None: the end when called), in batches."""
    stop = log_.end_offset(partition) if stop is None else stop
    offset = first
    while offset < stop:
        batch = log_.read(partition, offset, max_records=min(READ_BATCH, stop - offset))
        if not batch:
            return
        yield from batch
        offset = batch[-1].offset + 1


def find_task_result(log_: Log, partition: str, task_id: str, after: int) -> TaskResult | None:
    """The TaskResult of ``task_id`` appended after offset ``after``, if there is one yet.

    An undecodable record is passed over: whoever applies the partition meets it in turn
    and reports it; here it is only not the result sought."""
    for record in _records(log_, partition, after + 1):
        try:
            op = codec.decode(record.value).op
        except CorruptRecord:
            continue
        if isinstance(op, TaskResult) and op.task_id == task_id:
            return op
    return None


def follow(log_: Log, partition: str, first: int, *, glob: str | None = None,
           poll_s: float = 1.0, stop: threading.Event | None = None) -> Iterator[HistoryEvent]:
    """Events from ``first`` on, until ``stop`` is set (forever without one): waits
    (``Log.wait``, ``poll_s`` at a time) for each new record.

    A follower keeps following: records that retention drops before they are read (a
    slow reader, the byte bound) are passed over with a warning naming them (DT-H030); a
    log that does not answer (a Kafka cluster away) is waited for, with one warning per
    outage (DT-H031)."""
    offset = first
    away = False
    while stop is None or not stop.is_set():
        try:
            if log_.wait(partition, offset, poll_s):
                for hev in read(log_, partition, offset, glob=None):
                    offset = hev.offset + 1
                    if selected(hev, glob):
                        yield hev
            away = False
        except BackendUnavailable as exc:
            if not away:
                log.warning("log unreachable; following resumes when it answers", msgid="DT-H031",
                            partition=partition, error=exc.message)
            away = True
            if stop is None:
                time.sleep(poll_s)
            else:
                stop.wait(poll_s)
        except OffsetOutOfRange:
            start = log_.start_offset(partition)
            if start <= offset:
                raise
            log.warning("events dropped by retention before being shown", msgid="DT-H030", partition=partition,
                        first=offset, last=start - 1)
            offset = start


# -- presentation shared by tail and history --------------------------------------------

def display_path(path: str) -> str:
    """A path as text that always prints on one line: the set root ``""`` is ``.``,
    undecodable bytes become ``\\xNN``, and a name holding control characters (a newline)
    is shown escaped."""
    if path == "":
        return "."
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    if any(ch < " " or ch == "\x7f" for ch in text):
        text = text.encode("unicode_escape").decode("ascii")
    return text


def as_dict(hev: HistoryEvent) -> dict:
    """The JSON form of one event (``dt tail --json``, ``dt history --json``).

    Paths keep non-UTF-8 bytes as surrogate escapes; print with ``json.dumps(...,
    ensure_ascii=True)`` so they travel as ``\\udcNN`` and ``os.fsencode`` restores the
    exact bytes. Payload bytes are counted (``bytes``), never included.
    """
    return {
        "offset": hev.offset,
        "time": format_time(hev.time_ns),
        "time_ns": hev.time_ns,
        "op": hev.op,
        "paths": hev.paths(),
        "bytes": hev.bytes,
        "record_bytes": hev.record_bytes,
        "origin": hev.event.origin,
        "event_time_ns": hev.event.time_ns,
        "fields": _plain_fields(hev.event.op),
    }


def _plain_fields(op) -> dict:
    out = {}
    for f in fields(op):
        value = getattr(op, f.name)
        if isinstance(value, (bytes, bytearray)):
            continue
        if isinstance(value, FileKind):
            value = value.value
        elif isinstance(value, dict):
            value = sorted(value)
        elif isinstance(value, list) and value and hasattr(value[0], "__dataclass_fields__"):
            value = [{g.name: getattr(v, g.name) for g in fields(v)} for v in value]
        out[f.name] = value
    return out


def describe(hev: HistoryEvent) -> str:
    """The path column of human output: ``a -> b`` for renames, else the paths."""
    paths = [display_path(p) for p in hev.paths()]
    op = hev.event.op
    if hev.op == "Rename":
        return f"{paths[0]} -> {paths[1]}"
    if hev.op == "Link":
        return f"{display_path(op.path)} (link to {display_path(op.existing)})"
    if hev.op == "Symlink":
        return f"{paths[0]} -> {display_path(op.target)}"
    if hev.op == "Truncate":
        return f"{paths[0]} (size {op.size})"
    if hev.op in ("Write", "MirrorData", "BlockWrite"):
        return f"{paths[0]} @{op.offset}"
    if hev.op == "TaskCommand":
        return f"{op.name} (task {op.task_id})"
    if hev.op == "TaskResult":  # which task, and how it ended (its output: --json)
        return f"task {op.task_id} exit {op.exit_status}"
    if hev.op in ("Marker", "MirrorStart", "MirrorEnd", "Gap"):
        return ", ".join(paths) or getattr(op, "name", None) or getattr(op, "reason", None) or getattr(op, "mirror_id", "")
    return ", ".join(paths)


# -- aggregation -----------------------------------------------------------------------

@dataclass
class PathSummary:
    """What happened to one path over a range of events."""

    path: str
    events: int = 0
    bytes: int = 0
    first_offset: int = NO_OFFSET
    last_offset: int = NO_OFFSET
    last_time_ns: int = 0
    last_op: str = ""


def summarize(events: Iterable[HistoryEvent], glob: str | None = None) -> list[PathSummary]:
    """One summary per path (each path a rename names counts once), sorted by path.

    With a glob, only matching paths are summarised (an event naming several paths may
    match through one of them only).
    """
    by_path: dict[str, PathSummary] = {}
    for hev in events:
        for path in dict.fromkeys(hev.paths()):
            if glob is not None and not path_matches(path, glob):
                continue
            s = by_path.get(path)
            if s is None:
                s = by_path[path] = PathSummary(path, first_offset=hev.offset)
            s.events += 1
            s.bytes += hev.bytes
            s.last_offset, s.last_time_ns, s.last_op = hev.offset, hev.time_ns, hev.op
    return [by_path[p] for p in sorted(by_path)]

