"""The mirror: compare a source view with its target view and append what differs.

A mirror is a producer of ``Mirror*`` events in a connection's partition, the same log
live capture appends to, so the applier applies mirror and replication in one order.
Verification is a mirror that reports (``dry_run``) or reports and sends; both use
``plan`` and ``compare``, the one definition of "different".

What each mode sends (regular files; every other object is compared by metadata)::

    mode           a file is *flagged* when                    a flagged file sends
    full           always                                      the whole file
    diff           size or mtime differ                        the whole file
    newer          its mtime is newer on the source            the whole file
    checksum       size or mtime differ                        only blocks whose digest differs
    checksum-all   always (also settings.checksum_all)         only blocks whose digest differs

``newer_only`` narrows any mode but full to files newer on the source (the reference's
"only if source is newer"). ``changed_since_ns`` flags, in every mode, each file whose
source ctime is at or after it: a remirror after a gap passes the time the gap may have
begun, because size and mtime cannot tell a change made during the gap from the copy the
target holds when both happened within one tick of the filesystem's coarse clock (a file
rewritten with the same length, or a name replaced by a same-size file, ms apart), nor a
change whose mtime was set back; the ctime of a changed file is never older than the
change, and nobody can set it. Metadata that differs (mode, owner, xattrs; the times of
anything but a regular file) is sent in every mode, as replication sends it (SetAttr,
SetXattr, RemoveXattr); a file's mtime travels with its data. A missing object, or one
of another type, is always sent whole. Block digests are taken at
``settings.checksum_block_size``; at the default (engine/digest.DIGEST_BLOCK) they also
give the file digest, at any other size the file digest costs a second read.

Events of one object, in order: ``MirrorFile`` (metadata; ``whole`` makes the target
start from an empty file), ``MirrorData`` packets of at most ``mirror_packet_size``,
``MirrorFileEnd`` (size, the engine/digest.py file digest, mtime; for a file sent in
blocks also every block digest, up to MAX_LISTED_BLOCKS, so the applier reads back only
the blocks it wrote, apply/applier.py). A small file sent whole (at most
``mirror_packet_size``, no holes, not above LARGE_FILE) is one ``MirrorFile`` carrying
its data and file digest instead: most files of a tree are small, and each event costs
about as much to encode, log, read and apply as a small file's data. A directory's times
are set again by a ``SetAttr`` after its last child, since creating children moves them.
Hard links inside the set: the first path found is sent as a file, later paths as
``MirrorFile(hardlink_of=first)``; when the first path gets new content (a new file on
the target) every later path is linked again, and a target file linked to other names is
never changed in place (its other names would change too).

Sparse files stay sparse: data is read extent by extent (SEEK_DATA/SEEK_HOLE) and holes
are never sent, so a whole-file mirror recreates the holes on the target (the target
truncates to the final size). This is better than the reference product, whose targets
get zero-filled files. A block mirror that must turn data back into a hole sends zeros.

Mirror events are stored uncompressed (codec.encode(compress=False)): the log they go to
is local, and zstd level 1 on the benchmark's data compresses at about 2.2 GB/s and
decompresses at 1.6 GB/s, so a 2 GB mirror would spend some 2 s of CPU to spare writing
1 GB to the page cache. Compressing for a network is a transmission option (off by
default in the reference); the Kafka producer compresses its batches itself.

Ordering against live capture: reading an object on the source and appending its events
happen under ``locks.hold(path)`` (engine/pathlocks.py). Small objects are handled in
groups (one lock acquisition for all their stripes, one append); a large file holds its
lock per chunk of CHUNK bytes and checks before each chunk that the path still names
the file it opened. With ``room`` (engine/queue.MirrorFeed), the mirror first waits for
room in the queue for a group or a chunk and only then takes its locks: waiting for room
with a lock held would block the captured writes to those paths while the queue is full
(a paused target). A file replaced or changed while being mirrored is re-examined at
the end of the pass; if it cannot be mirrored then, or any object cannot be read, the
mirror ends with a ``Gap`` so the target goes Mirror Required: never silently wrong.

Position: the key (engine/tree.walk_key) of the last object whose events are all in the
log is saved every SAVE_EVERY_ITEMS objects or SAVE_EVERY_S seconds, with the mirror id,
options and counters, by a thread beside the mirror (engine/durable.BackgroundFile: its
fsyncs wait behind the write-back of what the mirror wrote, and took 0.6 s of a 2 GB
mirror when the mirror waited for them); a pause or a failure saves it before ``run``
returns. ``pause`` keeps it and a later ``run`` of a mirror with the same options and
the same set rules continues after it (so does a run after a crash); ``stop`` forgets it,
so the next mirror starts over.
"""

from __future__ import annotations

import bisect
import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from . import codec, digest, logs
from .durable import BackgroundFile
from .events import (Event, FileKind, Gap, MirrorData, MirrorEnd, MirrorFile, MirrorFileEnd,
                     MirrorStart, RemoveXattr, SetAttr, SetXattr, Unlink)
from .log import Log
from .pathlocks import PathLocks
from .settings import Settings
from .states import MirrorMode, MirrorStatus
from .tree import DirEnd, Entry, Tree, data_extents

log = logs.get(__name__)

CHUNK = 1 << 20            # bytes read (and locked) at a time; a multiple of DIGEST_BLOCK
LARGE_FILE = 4 << 20       # files above this are mirrored alone, chunk by chunk
GROUP_BYTES = 4 << 20      # small objects are handled in groups up to this many file bytes
GROUP_ITEMS = 256          # ... or this many objects
MAX_LISTED_BLOCKS = 1 << 18  # block digests a MirrorFileEnd lists (4 MiB; files up to 16 GiB)
SAVE_EVERY_ITEMS = 2000
SAVE_EVERY_S = 2.0
PROGRESS_EVERY_S = 0.2

# Aspects ``compare`` reports; "content" comes from a block comparison.
MISSING, TYPE, SIZE, MTIME, MODE, OWNER, XATTRS, LINK_TARGET, DEVICE, HARD_LINK, CONTENT = (
    "missing", "type", "size", "mtime", "mode", "owner", "xattrs", "link target", "device",
    "hard link", "content")
EXTRA_LINK = "extra hard link"  # linked on the target to a name the source keeps apart
_RECREATE = {MISSING, TYPE, LINK_TARGET, DEVICE}
_FILE_META = {MODE, OWNER, XATTRS}
_CHECKSUM_MODES = (MirrorMode.CHECKSUM, MirrorMode.CHECKSUM_ALL)
CAPABILITY = "security.capability"  # a file's capabilities, which every chown removes


class Changed(Exception):
    """The file was replaced or modified while it was being mirrored."""


# -- comparison (shared with verification) ----------------------------------------------

def compare(src: Entry, dst: Entry | None, link_map: Callable[[str], str] | None = None) -> list[str]:
    """What differs between a source object and its target object, by metadata alone.

    ``link_map`` gives the symlink target the target side should hold for a source
    symlink target (RemapLink); None compares them verbatim."""
    if dst is None:
        return [MISSING]
    if src.kind is not dst.kind:
        return [TYPE]
    out = []
    if src.kind is FileKind.FILE and src.size != dst.size:
        out.append(SIZE)
    if src.mtime_ns != dst.mtime_ns:
        out.append(MTIME)
    if src.mode != dst.mode:
        out.append(MODE)
    if (src.uid, src.gid) != (dst.uid, dst.gid):
        out.append(OWNER)
    if src.xattrs != dst.xattrs:
        out.append(XATTRS)
    want = src.link_target if link_map is None or src.link_target is None else link_map(src.link_target)
    if want != dst.link_target:
        out.append(LINK_TARGET)
    if src.rdev != dst.rdev:
        out.append(DEVICE)
    return out


def describe(aspects: Iterable[str], src: Entry, dst: Entry | None, linked_on_target: str | None = None) -> list[str]:
    """Human words for each aspect, with the source and target values."""
    out = []
    for a in aspects:
        if a == EXTRA_LINK:
            out.append(f"hard linked on target to {linked_on_target!r}, a separate file on source")
        elif dst is None or a in (MISSING, HARD_LINK, CONTENT):
            out.append({MISSING: "missing on target", HARD_LINK: "not hard linked on target",
                        CONTENT: "content differs"}.get(a, a))
        elif a == TYPE:
            out.append(f"type {src.kind.value.lower()} on source, {dst.kind.value.lower()} on target")
        elif a == SIZE:
            out.append(f"size {src.size} != {dst.size}")
        elif a == MTIME:
            out.append(f"mtime {_iso(src.mtime_ns)} != {_iso(dst.mtime_ns)}")
        elif a == MODE:
            out.append(f"mode {src.mode:04o} != {dst.mode:04o}")
        elif a == OWNER:
            out.append(f"owner {src.uid}:{src.gid} != {dst.uid}:{dst.gid}")
        elif a == XATTRS:
            names = sorted(n for n in src.xattrs.keys() | dst.xattrs.keys()
                           if src.xattrs.get(n) != dst.xattrs.get(n))
            out.append("xattrs " + ",".join(names))
        elif a == LINK_TARGET:
            out.append(f"link target {src.link_target!r} != {dst.link_target!r}")
        elif a == DEVICE:
            out.append(f"device {src.rdev} != {dst.rdev}")
    return out


def _iso(ns: int) -> str:
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


@dataclass(frozen=True)
class Options:
    """A mode resolved into the questions ``plan`` asks."""

    full: bool
    checksum: bool
    flag_all: bool
    newer_only: bool
    link_map: Callable[[str], str] | None = None
    changed_since_ns: int | None = None  # flag files whose source ctime is at or after it

    @classmethod
    def of(cls, mode: MirrorMode, newer_only: bool, settings: Settings,
           link_map: Callable[[str], str] | None = None, changed_since_ns: int | None = None) -> Options:
        return cls(full=mode is MirrorMode.FULL,
                   checksum=mode in _CHECKSUM_MODES,
                   flag_all=mode is MirrorMode.CHECKSUM_ALL or (mode is MirrorMode.CHECKSUM and settings.checksum_all),
                   newer_only=(newer_only or mode is MirrorMode.NEWER) and mode is not MirrorMode.FULL,
                   link_map=link_map, changed_since_ns=changed_since_ns)


@dataclass(frozen=True)
class Plan:
    """What to do with one object. action: none, meta, whole, blocks, link."""

    aspects: list[str]
    action: str
    hardlink_of: str | None = None
    linked_on_target: str | None = None  # EXTRA_LINK: the earlier name it shares an inode with


def plan(src: Entry, dst: Entry | None, opts: Options, *, hardlink_of: str | None = None,
         linked: bool = False) -> Plan:
    """The decision for one object. ``hardlink_of``: an earlier path of the same inode;
    ``linked``: the target path already is that earlier path's inode."""
    aspects = compare(src, dst, opts.link_map)
    if hardlink_of is not None:
        if linked:
            return Plan([], "none")
        return Plan(aspects if MISSING in aspects else aspects + [HARD_LINK], "link", hardlink_of)
    if _RECREATE.intersection(aspects):
        return Plan(aspects, "whole")
    if src.kind is not FileKind.FILE:
        return Plan(aspects, "meta" if aspects else "none")
    flagged = (opts.full or opts.flag_all or SIZE in aspects or MTIME in aspects
               or (opts.changed_since_ns is not None and src.ctime_ns >= opts.changed_since_ns))
    if opts.newer_only and src.mtime_ns <= dst.mtime_ns:
        flagged = False
    if flagged:
        return Plan(aspects, "blocks" if opts.checksum and not opts.full else "whole")
    # Not flagged: size and time stay as they are (newer on the target), the rest is fixed.
    return Plan(aspects, "meta" if _FILE_META.intersection(aspects) else "none")


def differing_blocks(src: list[bytes], dst: list[bytes]) -> list[int]:
    return [i for i, d in enumerate(src) if i >= len(dst) or dst[i] != d]


# -- results -------------------------------------------------------------------------

@dataclass(frozen=True)
class Difference:
    """One object that differs, as verification reports it (before anything is sent)."""

    path: str
    kind: str
    aspects: list[str]
    details: list[str]                # ``describe`` of the aspects
    blocks: list[int] | None = None   # indexes of differing blocks (block comparisons)
    block_size: int = 0
    size: int = 0
    action: str = "none"


@dataclass
class MirrorStats:
    mirror_id: str = ""
    mode: str = ""
    status: str = MirrorStatus.IDLE.value
    total_bytes: int | None = None
    processed_bytes: int = 0   # file bytes examined so far (sent or not)
    sent_bytes: int = 0        # file data carried by MirrorData events
    skipped_bytes: int = 0     # file data found identical or in holes (not sent)
    objects: int = 0           # objects examined
    sent_objects: int = 0      # objects something was sent for
    differences: int = 0
    problems: list[str] = field(default_factory=list)
    resumed: bool = False
    started_ns: int = 0
    elapsed_s: float = 0.0

    @property
    def remaining_bytes(self) -> int | None:
        return None if self.total_bytes is None else max(0, self.total_bytes - self.processed_bytes)

    @property
    def percent(self) -> float | None:
        if self.total_bytes is None:
            return None
        return 100.0 if self.total_bytes == 0 else min(100.0, 100.0 * self.processed_bytes / self.total_bytes)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(remaining_bytes=self.remaining_bytes, percent=self.percent)
        return out


# -- position --------------------------------------------------------------------------

@dataclass
class Position:
    """Where a paused or interrupted mirror continues (stored as JSON)."""

    mirror_id: str
    mode: str
    newer_only: bool
    after: list[str] | None          # walk key of the last finished object, hex; None: none yet
    recheck: list[str]
    stats: dict
    rules: list | None = None        # the source set's rules (_rules_of); others start over

    def key(self) -> tuple[bytes, ...] | None:
        return None if self.after is None else tuple(bytes.fromhex(c) for c in self.after)


def _rules_of(source: Tree) -> list[list] | None:
    """The rules of the source view's replication set, as a position keeps them (None for
    a view without rules): a pass resumed under other rules would skip, before its
    position, what it left out and the new rules include."""
    rules = getattr(source.matcher, "rules", None)
    return None if rules is None else [[r.path, r.include, r.recursive] for r in rules]


def load_position(path: Path | None) -> Position | None:
    if path is None:
        return None
    try:
        return Position(**json.loads(Path(path).read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        log.warning("unreadable mirror position, starting over", msgid="DT-M002", path=str(path), error=str(exc))
        return None


def forget_position(path: Path | None) -> None:
    if path is not None:
        Path(path).unlink(missing_ok=True)


# -- the mirror ------------------------------------------------------------------------

@dataclass
class _Dir:
    entry: Entry
    touched: bool = False
    on_target: bool = True  # the target has a directory here (not a symlink to one)


@dataclass
class _Links:
    """The names of one multiply linked inode in the set: the first one met is sent as a
    file, the others as links to it."""

    first: str
    replaced: bool = False  # this pass sent the first name's content: re-link every other name


class Mirror:
    """One mirror (or verification) pass of ``source`` onto ``target``.

    ``observer(Difference)`` hears about every object that differs; ``progress(stats)``
    is called every PROGRESS_EVERY_S. With ``dry_run`` nothing is appended and no
    position is kept (verify only). ``run`` may be called again after ``pause``.
    ``link_map`` is the applier's RemapLink for this connection (symlink targets are
    compared as the target should hold them). ``changed_since_ns``: see the module docstring.
    """

    def __init__(self, source: Tree, target: Tree, log: Log | None, partition: str, settings: Settings,
                 locks: PathLocks | None = None, *, mode: MirrorMode = MirrorMode.DIFF,
                 newer_only: bool = False, position_path: Path | None = None,
                 progress: Callable[[MirrorStats], None] | None = None,
                 observer: Callable[[Difference], None] | None = None,
                 dry_run: bool = False, origin: str = "mirror",
                 link_map: Callable[[str], str] | None = None, changed_since_ns: int | None = None,
                 room: Callable[[int], None] | None = None):
        self.source, self.target = source, target
        self._log, self.partition, self.settings = log, partition, settings
        self._room = room or _no_wait
        self._locks = locks or PathLocks()
        self.mode = MirrorMode(mode)
        self.opts = Options.of(self.mode, newer_only, settings, link_map, changed_since_ns)
        self.newer_only = newer_only
        self.dry_run = dry_run
        self._position_path = None if dry_run else position_path
        self._progress, self._observer, self._origin = progress, observer, origin
        self._pause, self._stop = threading.Event(), threading.Event()
        self._running = False
        self.stats = MirrorStats(mode=self.mode.value)
        self._batch: list[bytes] = []
        self._dirs: list[_Dir] = []
        self._links: dict[tuple[int, int], _Links] = {}
        self._target_links: dict[tuple[int, int], str] = {}  # target inode -> first name met
        self._recheck: list[str] = []
        self._last_key: tuple[bytes, ...] | None = None
        self._unsaved = 0
        self._saved_at = self._progress_at = 0.0
        self._memo: Position | None = None  # the position when there is no position file
        self._saver: BackgroundFile | None = None  # writes the position file during a run
        self._view = memoryview(bytearray(CHUNK))  # the one read buffer (events copy out of it)
        self._packet = settings.mirror_packet_size
        self._block = settings.checksum_block_size

    # -- control ---------------------------------------------------------------------

    def pause(self) -> None:
        """Stop producing after the current object; the position is kept."""
        self._pause.set()

    def stop(self) -> None:
        """Stop producing after the current object and forget the position (at once when
        the mirror is paused, i.e. not running)."""
        self._stop.set()
        if not self._running:
            self._forget()

    def _forget(self) -> None:
        self._memo = None
        if self._saver is not None:
            self._saver.discard()  # no write in flight may bring the file back
        forget_position(self._position_path)

    @property
    def halted(self) -> bool:
        return self._pause.is_set() or self._stop.is_set()

    def run(self) -> MirrorStats:
        """Mirror until done, paused or stopped; return the statistics."""
        self._pause.clear()
        self._stop.clear()
        self._running = True
        if self._position_path is not None:
            self._saver = BackgroundFile(self._position_path)
        try:
            return self._run()
        finally:
            self._running = False
            saver, self._saver = self._saver, None
            if saver is not None:
                try:
                    saver.close()
                except OSError as exc:
                    log.error("mirror position not saved", msgid="DT-M008", partition=self.partition,
                              error=str(exc))

    def _run(self) -> MirrorStats:
        resume_key = self._begin()
        try:
            self._pass(resume_key)
            if not self.halted:
                self._rechecks()
        except BaseException:
            # Keep the position of the last object whose events are all in the log; the
            # unappended rest of the batch is redone by the next run.
            self._batch = []
            try:
                self._save(force=True)
            except OSError as exc:
                log.error("mirror position not saved", msgid="DT-M008", partition=self.partition, error=str(exc))
            self._set_status(MirrorStatus.PAUSED)
            raise
        if self._stop.is_set():
            self._forget()
            self._set_status(MirrorStatus.IDLE)
        elif self._pause.is_set():
            self._save(force=True)
            self._set_status(MirrorStatus.PAUSED)
        else:
            self._finish()
        self._report_progress(force=True)
        return self.stats

    # -- the pass ----------------------------------------------------------------------

    def _begin(self) -> tuple[bytes, ...] | None:
        self._batch, self._dirs, self._links, self._target_links = [], [], {}, {}
        pos = load_position(self._position_path) if self._position_path else self._memo
        self.stats.started_ns = time.time_ns()
        self._t0 = time.monotonic()
        if (pos is not None and pos.mode == self.mode.value and pos.newer_only == self.newer_only
                and pos.rules == _rules_of(self.source)):
            self.stats = MirrorStats(**{**pos.stats, "problems": list(pos.stats.get("problems", []))})
            self.stats.resumed, self.stats.started_ns = True, time.time_ns()
            self._recheck = list(pos.recheck)
            self._last_key = pos.key()
            log.info("mirror resumes", msgid="DT-M003", partition=self.partition,
                     mirror_id=self.stats.mirror_id, after=self._describe(self._last_key))
        else:
            if pos is not None:
                log.info("mirror options changed: starting over", msgid="DT-M004", partition=self.partition)
            self.stats.mirror_id = uuid.uuid4().hex[:16]
            if self.settings.calculate_size_first:
                self.stats.total_bytes = self.source.size()[0]
            self._last_key = None
        self._set_status(MirrorStatus.VERIFYING if self.dry_run else MirrorStatus.MIRRORING)
        self._emit(MirrorStart(mirror_id=self.stats.mirror_id, mode=self.mode.value,
                               total_bytes=self.stats.total_bytes))
        self._flush()
        self._saved_at = time.monotonic()
        return self._last_key

    def _pass(self, resume_key: tuple[bytes, ...] | None) -> None:
        group: list[Entry | DirEnd] = []
        group_bytes = 0
        for item in self.source.walk(dir_ends=True):
            if resume_key is not None and item.key <= resume_key:
                self._skip_done(item)
                continue
            if self.halted:
                break
            size = 0 if isinstance(item, DirEnd) else item.size
            if size > LARGE_FILE:
                self._run_group(group)
                group, group_bytes = [], 0
                self._one_large(item)
                continue
            group.append(item)
            group_bytes += size
            if len(group) >= GROUP_ITEMS or group_bytes >= GROUP_BYTES:
                self._run_group(group)
                group, group_bytes = [], 0
        if not self.halted:
            self._run_group(group)

    def _skip_done(self, item: Entry | DirEnd) -> None:
        """An object a previous run finished: keep only what later objects depend on."""
        if isinstance(item, DirEnd):
            self._dirs.pop()
        elif item.is_dir:
            # Its times are set after its last child; a resumed pass may add children.
            self._dirs.append(_Dir(item, touched=True))
        elif item.is_file and item.nlink > 1:
            self._links.setdefault((item.dev, item.ino), _Links(item.rel))

    def _run_group(self, group: list[Entry | DirEnd]) -> None:
        if not group:
            return
        self._room(sum(i.size for i in group if isinstance(i, Entry)))
        with self._hold(*[i.rel for i in group]):
            for item in group:
                self._item(item, large=False)
            self._flush()
        self._done(group[-1].key, len(group))

    def _one_large(self, entry: Entry) -> None:
        self._item(entry, large=True)
        self._flush()
        self._done(entry.key, 1)

    def _hold(self, *paths: str):
        return nullcontext() if self.dry_run else self._locks.hold(*paths)

    def _item(self, item: Entry | DirEnd, *, large: bool) -> None:
        if isinstance(item, DirEnd):
            self._leave_dir(self._dirs.pop())
            return
        try:
            self._object(item, large=large)
        except Changed:
            log.info("file changed while mirrored, re-examined at the end", msgid="DT-M005",
                     partition=self.partition, path=item.rel)
            self._recheck.append(item.rel)

    def _object(self, item: Entry, *, large: bool) -> None:
        src = self.source.refresh(item) if not large else item  # large: rechecked per chunk
        if item.is_dir:
            self._dirs.append(_Dir(src or item))
        if src is None:
            return  # gone since the walk saw it
        src.included = item.included
        self.stats.objects += 1
        dst = self._target_entry(src, item.is_dir)
        group = self._link_group(src)
        first = group.first if group is not None and group.first != src.rel else None
        linked = first is not None and not group.replaced and self._same_target_inode(dst, first)
        p = plan(src, dst, self.opts, hardlink_of=first, linked=linked)
        extra = self._extra_link(src, dst, first)
        if extra is not None:  # a new file, as changing it in place would change the other name
            p = Plan(p.aspects + [EXTRA_LINK], "whole", linked_on_target=extra)
        if group is not None and first is None and p.action == "whole":
            group.replaced = not self.dry_run  # a new file: link every other name to it again
        if src.rel == "" and p.action != "none":
            p = Plan(p.aspects, "meta")  # the target root is the replica: only attributes change
        if src.is_file and p.action in ("whole", "blocks"):
            self._file(src, dst, p, large)
            return
        self._count(src.size, sent=0)
        if src.is_dir and MTIME in p.aspects:
            self._dirs[-1].touched = True
        if p.aspects:
            self._differs(src, dst, p)  # also when not acted on: verification reports it
        if p.action == "none" or self.dry_run:
            return
        if p.action == "meta":
            self._meta(src, dst, p)
        else:
            self._emit(self._header(src, whole=True, hardlink_of=p.hardlink_of))
            self._sent_object(src)

    def _target_entry(self, src: Entry, pushed: bool) -> Entry | None:
        """The target's object at ``src.rel`` (``pushed``: ``src`` is the innermost _Dir).
        None beneath a directory the target has not got as a directory: lstat of the whole
        path would look through a symlink there, and what it finds is not in the target
        (the mirror makes the directory anew, empty)."""
        parent = len(self._dirs) - (2 if pushed else 1)
        if src.rel and parent >= 0 and not self._dirs[parent].on_target:
            dst = None
        else:
            dst = self.target.entry(src.rel)
        if pushed:
            self._dirs[-1].on_target = dst is not None and dst.is_dir
        return dst

    def _file(self, src: Entry, dst: Entry | None, p: Plan, large: bool) -> None:
        try:
            fd = self.source.open(src.rel)
        except OSError as exc:
            self._problem(src.rel, f"cannot read: {exc.strerror}")
            return
        try:
            if not _same_inode(os.fstat(fd), src):
                raise Changed(src.rel)
            if p.action == "blocks":
                self._send_blocks(src, dst, fd, p, large)
            else:
                self._differs(src, dst, p)
                if self.dry_run:
                    self._count(src.size, sent=0)
                    return
                self._send_whole(src, fd, large)
        except OSError as exc:
            self._problem(src.rel, f"read failed: {exc.strerror}")
        finally:
            os.close(fd)

    # -- sending ----------------------------------------------------------------------

    def _send_whole(self, src: Entry, fd: int, large: bool) -> None:
        """Every data extent of the file; holes are only counted (see module docstring)."""
        extents = list(data_extents(fd, src.size, src.allocated))
        if not large and src.size <= self._packet and extents == ([(0, src.size)] if src.size else []):
            self._send_small(src, fd)
            return
        with self._chunk_lock(src, fd, large):
            self._emit(self._header(src, whole=True))
        stream = digest.Stream()  # chunks in a hole are not read: the stream counts zeros
        view = self._view
        e = 0
        for start in range(0, src.size, CHUNK):
            end = min(start + CHUNK, src.size)
            while e < len(extents) and extents[e][1] <= start:
                e += 1
            pieces = [(max(a, start), min(b, end)) for a, b in extents[e:] if a < end]
            if not pieces:
                self._count(end - start, sent=0)
                continue
            if large:
                self._room(end - start)
            with self._chunk_lock(src, fd, large):
                got = _read_exact(fd, view, start, end - start)
                stream.feed(start, view[:got])
                sent = 0
                for a, b in pieces:
                    sent += self._data(src.rel, view, start, a, min(b, start + got))
                self._count(end - start, sent=sent)
                if large:
                    self._flush()
        self._end_file(src, fd, stream.finish(src.size), large)

    def _send_small(self, src: Entry, fd: int) -> None:
        """A small file without holes as one MirrorFile carrying its content and digest
        (under its group's lock): one event instead of three."""
        got = _read_exact(fd, self._view, 0, src.size)
        stream = digest.Stream()
        stream.feed(0, self._view[:got])
        _unchanged_since_walk(src, fd)
        self._emit(self._header(src, whole=True, data=self._view[:got], file_digest=stream.finish(src.size)))
        self._capability_again(src)
        self._count(src.size, sent=src.size)
        self._sent_object(src)

    def _send_blocks(self, src: Entry, dst: Entry, fd: int, p: Plan, large: bool) -> None:
        """Only the blocks whose digests differ from the target's."""
        src_d, dst_d = self._digests(src, dst, fd, large)
        blocks = differing_blocks(src_d, dst_d)
        aspects = p.aspects + ([CONTENT] if blocks else [])
        if not blocks and not p.aspects:
            self._count(src.size, sent=0)
            return
        self._differs(src, dst, Plan(aspects, p.action), blocks=blocks)
        if self.dry_run:
            self._count(src.size, sent=0)
            return
        group = self._link_group(src)
        if group is not None and group.first == src.rel and dst.nlink > 1:
            # Changing it in place would change (or, as the applier keeps target-only links
            # apart, split) the other names the target has: it gets a new file instead and
            # every other name of the group is linked to it again.
            group.replaced = True
            self._send_whole(src, fd, large)
            return
        with self._chunk_lock(src, fd, large):
            self._emit(self._header(src, whole=False))
        bs = self._block
        if dst.size < src.size:
            blocks = _written_blocks(blocks, bs, dst.size, src.size, data_extents(fd, src.size, src.allocated))
        view = self._view
        sent = 0
        for start, end in _ranges(blocks, bs, src.size, CHUNK):
            if large:
                self._room(end - start)
            with self._chunk_lock(src, fd, large):
                got = _read_exact(fd, view, start, end - start)
                sent += self._data(src.rel, view, start, start, start + got)
                if large:
                    self._flush()
        self._count(src.size, sent=sent)
        blocks = src_d if bs == digest.DIGEST_BLOCK else digest.block_digests(fd, src.size)
        listed = b"".join(blocks) if len(blocks) <= MAX_LISTED_BLOCKS else b""
        self._end_file(src, fd, digest.combine(blocks, src.size), large, listed)

    def _digests(self, src: Entry, dst: Entry, fd: int, large: bool) -> tuple[list[bytes], list[bytes]]:
        """Block digests of source and target; in parallel for large files (blake3 and
        reads release the GIL)."""
        try:
            tfd = self.target.open(src.rel)
        except OSError:
            return digest.block_digests(fd, src.size, self._block), []
        try:
            tsize = min(dst.size, src.size)
            if not large:
                return (digest.block_digests(fd, src.size, self._block),
                        digest.block_digests(tfd, tsize, self._block))
            with ThreadPoolExecutor(1) as pool:
                theirs = pool.submit(digest.block_digests, tfd, tsize, self._block)
                ours = digest.block_digests(fd, src.size, self._block)
                return ours, theirs.result()
        finally:
            os.close(tfd)

    def _end_file(self, src: Entry, fd: int, file_digest: bytes, large: bool, block_digests: bytes = b"") -> None:
        with self._chunk_lock(src, fd, large):
            _unchanged_since_walk(src, fd)
            self._emit(MirrorFileEnd(path=src.rel, size=src.size, digest=file_digest, mtime_ns=src.mtime_ns,
                                     block_digests=block_digests))
            self._capability_again(src)
            self._sent_object(src)

    def _capability_again(self, src: Entry) -> None:
        """The kernel drops a file's capability when its data is written or truncated, so
        the one its header set is gone once the data is in: it is set again after it."""
        capability = src.xattrs.get(CAPABILITY)
        if capability is not None:
            self._emit(SetXattr(path=src.rel, name=CAPABILITY, value=capability))

    def _chunk_lock(self, src: Entry, fd: int, large: bool):
        """A large file takes its path lock per chunk and checks the path still names it;
        a small one is already under its group's lock."""
        if not large or self.dry_run:
            return nullcontext()
        return _Checked(self._locks.hold(src.rel), self.source, fd, src.rel)

    def _data(self, rel: str, view: memoryview, base: int, start: int, end: int) -> int:
        """MirrorData packets for bytes [start, end) of the file; view[0] is offset base.
        The data is a view of the read buffer: ``_emit`` encodes it at once (one copy)."""
        for off in range(start, end, self._packet):
            stop = min(off + self._packet, end)
            self._emit(MirrorData(path=rel, offset=off, data=view[off - base:stop - base]))
        return max(0, end - start)

    def _header(self, src: Entry, *, whole: bool, hardlink_of: str | None = None, data: bytes | memoryview = b"",
                file_digest: bytes | None = None) -> MirrorFile:
        return MirrorFile(path=src.rel, kind=src.kind, mode=src.mode, uid=src.uid, gid=src.gid,
                          atime_ns=src.atime_ns, mtime_ns=src.mtime_ns, size=src.size, rdev=src.rdev,
                          link_target=src.link_target, hardlink_of=hardlink_of,
                          xattrs=dict(src.xattrs), whole=whole, data=data, digest=file_digest)

    def _meta(self, src: Entry, dst: Entry | None, p: Plan) -> None:
        """Attributes only, as replication sends them. Times: a directory's are set after
        its children; a file's only travel with its data (see ``plan``)."""
        aspects = set(p.aspects)
        times = MTIME in aspects and not src.is_dir and not src.is_file
        if aspects & {MODE, OWNER} or times:
            # The mode travels with an owner change too: the target's chown clears its
            # set-id bits (and its file capability, re-sent below), whatever it had.
            self._emit(SetAttr(path=src.rel,
                               mode=src.mode if aspects & {MODE, OWNER} else None,
                               uid=src.uid if OWNER in aspects else None,
                               gid=src.gid if OWNER in aspects else None,
                               atime_ns=src.atime_ns if times else None,
                               mtime_ns=src.mtime_ns if times else None))
        old = dst.xattrs if dst is not None else {}
        if OWNER in aspects:
            old = {k: v for k, v in old.items() if k != CAPABILITY}
        for name, value in src.xattrs.items():
            if old.get(name) != value:
                self._emit(SetXattr(path=src.rel, name=name, value=value))
        for name in sorted(old.keys() - src.xattrs.keys()):
            self._emit(RemoveXattr(path=src.rel, name=name))
        self.stats.sent_objects += 1

    def _leave_dir(self, d: _Dir) -> None:
        if not d.touched or self.dry_run:
            return
        now = self.source.entry(d.entry.rel)
        if now is not None and now.is_dir:
            self._emit(SetAttr(path=now.rel, atime_ns=now.atime_ns, mtime_ns=now.mtime_ns))

    def _sent_object(self, src: Entry) -> None:
        self.stats.sent_objects += 1
        if src.rel and len(self._dirs) > (1 if src.is_dir else 0):
            self._dirs[-2 if src.is_dir else -1].touched = True
        if src.is_dir:
            self._dirs[-1].touched = True

    # -- hard links --------------------------------------------------------------------

    def _link_group(self, src: Entry) -> _Links | None:
        """The link group of a multiply linked file (created with ``src`` first)."""
        if not src.is_file or src.nlink < 2:
            return None
        return self._links.setdefault((src.dev, src.ino), _Links(src.rel))

    def _extra_link(self, src: Entry, dst: Entry | None, first: str | None) -> str | None:
        """The earlier name the target's file is hard linked to where the source's file is
        not linked to it (None when the links agree). Only names of the set count: a
        target-only link is kept apart by the applier. A resumed pass does not see the
        names a previous run finished."""
        if first is not None or dst is None or not (src.is_file and dst.is_file) or dst.nlink < 2:
            return None
        earlier = self._target_links.setdefault((dst.dev, dst.ino), src.rel)
        return None if earlier == src.rel else earlier

    def _same_target_inode(self, dst: Entry | None, first: str) -> bool:
        other = self.target.entry(first)
        return dst is not None and other is not None and (dst.dev, dst.ino) == (other.dev, other.ino)

    # -- end of pass ---------------------------------------------------------------------

    def _rechecks(self) -> None:
        """Objects that changed under the pass, tried once more; a Gap if still moving."""
        todo, self._recheck = self._recheck, []
        for rel in todo:
            entry = self.source.entry(rel)
            if entry is None:
                if not self.dry_run:
                    with self._hold(rel):
                        self._emit(Unlink(path=rel))  # it was half sent and is gone now
                        self._flush()
                continue
            entry.included = True
            parent = self.source.entry(os.path.dirname(rel))
            self._room(entry.size)
            try:
                with self._hold(rel, parent.rel if parent else ""):
                    self._object(entry, large=False)
                    if parent is not None:
                        self._leave_dir(_Dir(parent, touched=True))
                    self._flush()
            except Changed:
                self._problem(rel, "kept changing while being mirrored")

    def _finish(self) -> None:
        self._collect_problems()
        s = self.stats
        s.elapsed_s = time.monotonic() - self._t0
        if not self.dry_run:
            self._emit(MirrorEnd(mirror_id=s.mirror_id, sent_bytes=s.sent_bytes,
                                 skipped_bytes=s.skipped_bytes, files=s.sent_objects))
            if s.problems:
                shown = "; ".join(s.problems[:5]) + (" ..." if len(s.problems) > 5 else "")
                self._emit(Gap(reason=f"mirror {s.mirror_id} incomplete, {len(s.problems)} "
                                      f"object(s) not mirrored: {shown}"))
            self._flush()
        self._forget()
        self._set_status(MirrorStatus.IDLE)
        log.info("mirror finished", msgid="DT-M006", partition=self.partition, mirror_id=s.mirror_id,
                 sent_bytes=s.sent_bytes, skipped_bytes=s.skipped_bytes, objects=s.objects,
                 sent_objects=s.sent_objects, problems=len(s.problems))

    # -- bookkeeping -------------------------------------------------------------------

    def _emit(self, op) -> None:
        if not self.dry_run:
            event = Event(op=op, time_ns=time.time_ns(), origin=self._origin)
            self._batch.append(codec.encode(event, compress=False))

    def _flush(self) -> None:
        if self._batch:
            batch, self._batch = self._batch, []
            self._log.append(self.partition, batch)

    def _count(self, size: int, *, sent: int) -> None:
        self.stats.processed_bytes += size
        self.stats.sent_bytes += sent
        self.stats.skipped_bytes += size - sent

    def _differs(self, src: Entry, dst: Entry | None, p: Plan, blocks: list[int] | None = None) -> None:
        self.stats.differences += 1
        if self._observer is not None:
            details = describe(p.aspects, src, dst, p.linked_on_target)
            if blocks:
                details[-1] = f"content differs in {len(blocks)} block(s) of {self._block} bytes: {_spans(blocks)}"
            self._observer(Difference(path=src.rel, kind=src.kind.value, aspects=list(p.aspects), details=details,
                                      blocks=blocks, block_size=self._block if blocks is not None else 0,
                                      size=src.size, action=p.action))

    def _problem(self, rel: str, reason: str) -> None:
        log.warning("object not mirrored", msgid="DT-M007", partition=self.partition, path=rel, reason=reason)
        self.stats.problems.append(f"{rel}: {reason}")

    def _done(self, key: tuple[bytes, ...], items: int) -> None:
        self._last_key = key
        self._unsaved += items
        self._save()
        self._report_progress()

    def _save(self, force: bool = False) -> None:
        if self.dry_run:
            return
        now = time.monotonic()
        if not force and self._unsaved < SAVE_EVERY_ITEMS and now - self._saved_at < SAVE_EVERY_S:
            return
        self.stats.elapsed_s = now - self._t0
        self._collect_problems()
        self._memo = Position(mirror_id=self.stats.mirror_id, mode=self.mode.value,
                              newer_only=self.newer_only,
                              after=None if self._last_key is None else [c.hex() for c in self._last_key],
                              recheck=list(self._recheck), stats=asdict(self.stats),
                              rules=_rules_of(self.source))
        if self._saver is not None:
            data = json.dumps(asdict(self._memo)).encode()
            if force:
                self._saver.write_now(data)
            else:
                self._saver.submit(data)
        self._unsaved, self._saved_at = 0, now

    def _collect_problems(self) -> None:
        """Move what the walk could not read into the statistics."""
        self.stats.problems.extend(f"{p.rel}: {p.reason}" for p in self.source.problems)
        self.source.problems.clear()

    def _report_progress(self, force: bool = False) -> None:
        if self._progress is None:
            return
        now = time.monotonic()
        if force or now - self._progress_at >= PROGRESS_EVERY_S:
            self._progress_at = now
            self.stats.elapsed_s = now - self._t0
            self._progress(self.stats)

    def _set_status(self, status: MirrorStatus) -> None:
        logs.transition(log, "mirror", self.stats.status, status.value, partition=self.partition,
                        mirror_id=self.stats.mirror_id)
        self.stats.status = status.value

    @staticmethod
    def _describe(key: tuple[bytes, ...] | None) -> str:
        return "-" if key is None else os.fsdecode(b"/".join(key))


class _Checked:
    """Hold a path lock and insist the path still names the open file (else Changed)."""

    def __init__(self, hold, source: Tree, fd: int, rel: str):
        self._hold, self._source, self._fd, self._rel = hold, source, fd, rel

    def __enter__(self):
        self._hold.__enter__()
        if not self._source.still(self._fd, self._rel):
            self._hold.__exit__(None, None, None)
            raise Changed(self._rel)
        return self

    def __exit__(self, *exc):
        return self._hold.__exit__(*exc)


def _no_wait(size: int) -> None:
    """Room for a log that needs no reservation (its appends wait themselves, or never)."""


def _spans(blocks: list[int], shown: int = 20) -> str:
    """``3-5,9`` style list of block indexes (the first ``shown`` runs)."""
    runs: list[list[int]] = []
    for b in blocks:
        if runs and runs[-1][1] == b - 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    text = ",".join(f"{a}" if a == z else f"{a}-{z}" for a, z in runs[:shown])
    return text + (",..." if len(runs) > shown else "")


def _same_inode(st: os.stat_result, entry: Entry) -> bool:
    return (st.st_ino, st.st_dev) == (entry.ino, entry.dev)


def _unchanged_since_walk(src: Entry, fd: int) -> None:
    """Raise Changed when the open file's ctime or size is no longer what the walk saw:
    what was read of it may mix old and new content."""
    now = os.fstat(fd)
    if (now.st_ctime_ns, now.st_size) != (src.ctime_ns, src.size):
        raise Changed(src.rel)


def _read_exact(fd: int, view: memoryview, offset: int, length: int) -> int:
    """Read ``length`` bytes at ``offset`` into ``view``; fewer only at end of file."""
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:length]], offset + got)
        if n <= 0:
            raise Changed("the file shrank while being read")
        got += n
    return got


def _written_blocks(blocks: list[int], block_size: int, old_size: int, size: int,
                    extents: Iterable[tuple[int, int]]) -> list[int]:
    """The differing ``blocks`` a block mirror writes to a target file of ``old_size``
    bytes growing to ``size``: a block wholly past ``old_size`` and wholly in a hole of
    the source is left out, as the final truncate makes it a hole there too (sparse stays
    sparse). ``extents``: the source's data extents, in order."""
    extents = list(extents)
    ends = [end for _, end in extents]
    out = []
    for i in blocks:
        start = i * block_size
        k = bisect.bisect_right(ends, start)  # the first extent that ends after start
        if start < old_size or (k < len(extents) and extents[k][0] < min(start + block_size, size)):
            out.append(i)
    return out


def _ranges(blocks: Iterable[int], block_size: int, size: int, chunk: int) -> Iterable[tuple[int, int]]:
    """Byte ranges covering ``blocks`` (sorted indexes), merged, cut into pieces <= chunk."""
    start = end = None
    for i in blocks:
        a, b = i * block_size, min((i + 1) * block_size, size)
        if start is not None and a == end and b - start <= chunk:
            end = b
            continue
        if start is not None:
            yield start, end
        start, end = a, b
        while end - start > chunk:
            yield start, start + chunk
            start += chunk
    if start is not None:
        yield start, end
