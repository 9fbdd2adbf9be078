"""Target snapshots: frozen copies of the target tree, each tagged with its applied offset.

A snapshot holds exactly the effects of the events up to ``offset`` (the applier's applied
offset when it was taken) and nothing later. The caller guarantees it: a running applier is
paused around the copy (``take_while_paused``, for the daemon); a standalone caller
(``dt snapshot take``) holds the target's progress lock, so no applier can start meanwhile.
Scheduling (``due``) and retention (``prune``) are the caller's to run (``TargetSnapshots``
bundles them with ``take_while_paused`` for the daemon).

Kinds, best first (``take_snapshot`` picks the first the filesystem offers):

- ``btrfs``: the target root is a btrfs subvolume: a read-only subvolume snapshot, instant
  and copy-on-write.
- ``reflink``: the filesystem clones file extents (xfs, btrfs, ...): ``cp -a
  --reflink=always``; data blocks are shared until either side writes.
- ``linktree``: anything else: a file that did not change since the previous snapshot is
  hard-linked from that snapshot; any other file is copied. The live target never shares
  an inode with a snapshot, because the applier writes files in place and would change the
  snapshot's content through a shared inode. "Did not change" is decided by the live
  file's identity recorded in the previous snapshot's manifest: device, inode, ctime, size
  and mtime. The ctime cannot be set by anyone but the kernel and moves on every content or
  metadata change, so a rewrite that restores the old size and mtime is still seen.

Layout of a snapshots folder (one per connection)::

    .lock                             serialises take, delete and prune (flock)
    <offset:016x>-<taken_ns>/         one snapshot; names sort by offset, then time
        tree/                         the copy (a subvolume for kind btrfs)
        manifest.json.zst             linktree only: live identity of each regular file
        snapshot.json                 metadata, written last and durably (the commit point)

A folder without ``snapshot.json`` is incomplete (a crash while taking or deleting): it is
never listed and the next take or prune removes it. Deleting removes ``snapshot.json``
first for the same reason.

A snapshots folder belongs to a target root, not to a connection: a connection removed and
made again to the same target starts a stream of its own, whose offsets say nothing of the
old one's snapshots. So each snapshot records the stream it holds (``stream_of``: the
connection's partition and creation time) and every listing for a connection keeps only
its own; a snapshot from before streams were recorded (None) is taken as anyone's.

A snapshot being read (``reading``: restore copies its tree) is never deleted under its
reader: the reader holds a shared flock on the snapshot's folder, deleting takes it
exclusively without waiting. ``delete_snapshot`` then refuses (BackendUnavailable) and
``prune`` keeps the snapshot until its next run (DT-H004), so neither a take waiting for
the folder lock nor the daemon's applier paused for it waits for a long restore.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import subprocess
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import zstandard

from datatether.engine import logs
from datatether.engine.connection import Connection
from datatether.engine.durable import folder_lock, fsync_dir, write_atomic
from datatether.engine.errors import BackendUnavailable, NotFound, OffsetOutOfRange, UsageError
from datatether.engine.history import Anchor
from datatether.engine.log import Log
from datatether.engine.offsets import NO_OFFSET, fmt
from datatether.engine.settings import Settings
from datatether.engine.states import TargetStatus
from datatether.engine.tree import data_extents

from . import fsops

log = logs.get(__name__)

KINDS = ("btrfs", "reflink", "linktree")
REASONS = ("manual", "scheduled", "deferred")
META = "snapshot.json"
MANIFEST = "manifest.json.zst"
TREE = "tree"
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_BTRFS_SUBVOLUME_INO = 256
_NS = 1_000_000_000


@dataclass(frozen=True)
class Snapshot:
    """A complete snapshot (its ``snapshot.json`` exists)."""

    id: str
    offset: int              # every event up to here is in the tree, none after
    time_ns: int | None      # log time of the event at ``offset`` (None: unknown or none)
    taken_ns: int
    kind: str
    reason: str
    copied_files: int | None = None   # linktree: files copied / hard-linked from the previous
    linked_files: int | None = None
    data_state: str = "OK"   # the target data state at ``offset`` (a replay continues from it)
    stream: str | None = None  # the stream it holds (stream_of); None: taken before streams were recorded
    folder: Path | None = None

    @property
    def tree(self) -> Path:
        return self.folder / TREE

    @property
    def anchor(self) -> Anchor:
        """What the snapshot adds to reachable history (engine/history.py)."""
        return Anchor(self.offset, self.time_ns)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["folder"] = str(self.folder)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> Snapshot:
        """The inverse of ``as_dict`` (a snapshot the daemon took, as its API answers it)."""
        return cls(**{**values, "folder": Path(values["folder"])})


def stream_of(conn: Connection) -> str:
    """The stream a connection's snapshots hold: a partition name is used again by a
    connection made again (another state directory), its creation time is not."""
    return f"{conn.partition}@{conn.created_ns}"


def snapshots_dir_for(conn: Connection, settings: Settings) -> Path:
    """Beside the target root (same filesystem, so copy-on-write works) unless configured."""
    if settings.snapshot_dir:
        return Path(settings.snapshot_dir) / f"conn-{conn.id}"
    return Path(conn.target_root.rstrip("/") + ".dt-snapshots")


# -- listing ---------------------------------------------------------------------------

def list_snapshots(snapshots_dir: str | Path, stream: str | None = None) -> list[Snapshot]:
    """Complete snapshots, oldest offset first (of ``stream`` only, when given)."""
    folder = Path(snapshots_dir)
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir()):
        meta = entry / META
        if entry.is_dir() and meta.is_file():
            found.append(_read_meta(entry))
    found = [s for s in found if stream is None or s.stream in (stream, None)]
    return sorted(found, key=lambda s: (s.offset, s.taken_ns))


def get_snapshot(snapshots_dir: str | Path, snapshot_id: str, stream: str | None = None) -> Snapshot:
    for snap in list_snapshots(snapshots_dir, stream):
        if snap.id == snapshot_id:
            return snap
    raise NotFound(what="snapshot", name=snapshot_id)


def nearest(snapshots: list[Snapshot], offset: int) -> Snapshot | None:
    """The newest snapshot at or before ``offset``."""
    before = [s for s in snapshots if s.offset <= offset]
    return before[-1] if before else None


@contextmanager
def reading(snap: Snapshot) -> Iterator[Snapshot]:
    """Keep ``snap`` from being deleted while its tree is read (see the module doc).
    Raises NotFound when it was deleted since it was listed."""
    gone = NotFound(what="snapshot (deleted since it was listed; try again)", name=snap.id)
    try:
        fd = os.open(snap.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise gone from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        if not (snap.folder / META).exists():  # deleted between the open and the lock
            raise gone
        yield snap
    finally:
        os.close(fd)


def _read_meta(folder: Path) -> Snapshot:
    values = json.loads((folder / META).read_text())
    return Snapshot(folder=folder, **values)


# -- taking ----------------------------------------------------------------------------

def take_snapshot(target_root: str | Path, snapshots_dir: str | Path, applied_offset: int,
                  applied_time_ns: int | None, *, reason: str = "manual", kind: str | None = None,
                  data_state: str = "OK", stream: str | None = None, now_ns: int | None = None) -> Snapshot:
    """Snapshot ``target_root`` as the state at ``applied_offset`` of ``stream``.

    The caller guarantees no event is applied meanwhile. ``kind`` None picks the best the
    filesystem offers; naming one forces it (and fails if the filesystem cannot).
    """
    target_root, snapshots_dir = Path(target_root), Path(snapshots_dir)
    if reason not in REASONS:
        raise UsageError(detail=f"snapshot reason must be one of {', '.join(REASONS)}")
    if not target_root.is_dir():
        raise NotFound(what="target root", name=str(target_root))
    if applied_offset < NO_OFFSET:
        raise UsageError(detail=f"bad applied offset {applied_offset}")
    snapshots_dir.mkdir(parents=True, exist_ok=True)
    taken = time.time_ns() if now_ns is None else now_ns
    with folder_lock(snapshots_dir):
        _remove_incomplete(snapshots_dir)
        previous = list_snapshots(snapshots_dir)
        if kind is not None:
            _check_kind(kind, target_root, snapshots_dir)
        chosen = kind or _best_kind(target_root, snapshots_dir)
        folder = snapshots_dir / f"{fmt(applied_offset) if applied_offset >= 0 else 'empty'}-{taken}"
        folder.mkdir()
        counts: tuple[int | None, int | None] = (None, None)
        try:
            if chosen == "btrfs":
                _run(["btrfs", "subvolume", "snapshot", "-r", str(target_root), str(folder / TREE)])
            elif chosen == "reflink":
                _run(["cp", "-a", "--reflink=always", "--no-target-directory", str(target_root), str(folder / TREE)])
            elif chosen == "linktree":
                base = next((s for s in reversed(previous) if s.kind == "linktree"), None)
                counts = _link_tree(target_root, folder, base)
            else:
                raise UsageError(detail=f"unknown snapshot kind {chosen!r} (use one of {', '.join(KINDS)})")
            _syncfs(folder)
            snap = Snapshot(id=folder.name, offset=applied_offset, time_ns=applied_time_ns, taken_ns=taken,
                            kind=chosen, reason=reason, copied_files=counts[0], linked_files=counts[1],
                            data_state=data_state, stream=stream)
            meta = {k: v for k, v in asdict(snap).items() if k != "folder"}
            write_atomic(folder / META, json.dumps(meta, indent=1).encode(), mode=0o644)
        except BaseException:
            _remove(folder)
            raise
    snap = _read_meta(folder)
    log.info("snapshot taken", msgid="DT-H001", snapshot=snap.id, offset=applied_offset, kind=chosen,
             reason=reason, target=str(target_root))
    return snap


def applied_time(log_: Log, partition: str, offset: int) -> int | None:
    """Log time of the event at ``offset``, if the log still holds it (the snapshot's time)."""
    if offset < 0:
        return None
    try:
        return log_.read(partition, offset, max_records=1)[0].timestamp_ns
    except OffsetOutOfRange:
        return None


def take_while_paused(applier, log_: Log, partition: str, target_root: str | Path, snapshots_dir: str | Path,
                      *, reason: str = "manual", kind: str | None = None, resume: bool = True,
                      stream: str | None = None, timeout_s: float = 60.0) -> Snapshot:
    """Snapshot the target of a running applier (apply/applier.py, applying in its own thread).

    The applier is paused; once it reports Paused (the batch in hand is applied and
    committed), the target holds exactly the events up to its applied offset and is
    snapshotted; then it resumes unless ``resume`` is false (it was paused already).
    """
    progress = applier.progress
    applier.pause()
    try:
        deadline = time.monotonic() + timeout_s
        while progress.status is not TargetStatus.PAUSED:
            if time.monotonic() > deadline:
                raise BackendUnavailable(backend="applier", detail=f"did not pause within {timeout_s:.0f} s")
            time.sleep(0.01)
        offset = applier.applied_offset
        return take_snapshot(target_root, snapshots_dir, offset, applied_time(log_, partition, offset),
                             reason=reason, kind=kind, data_state=progress.data_state.value, stream=stream)
    finally:
        if resume:
            applier.resume()


class TargetSnapshots:
    """The snapshots of one connection's target as its daemon takes them (engine/daemon.py):
    of a running applier (``take_while_paused``), each take followed by retention
    (``prune`` with snapshot_max_count and snapshot_max_age_s), on the schedule of
    snapshot_interval_s (``due``)."""

    def __init__(self, log_: Log, conn: Connection, settings: Settings):
        self._log, self._partition, self._target_root = log_, conn.partition, conn.target_root
        self._stream = stream_of(conn)
        self._settings = settings
        self.folder = snapshots_dir_for(conn, settings)

    def take(self, applier, reason: str, *, kind: str | None = None, resume: bool = True) -> Snapshot:
        snap = take_while_paused(applier, self._log, self._partition, self._target_root, self.folder,
                                 reason=reason, kind=kind, resume=resume, stream=self._stream)
        prune(self.folder, self._settings.snapshot_max_count, self._settings.snapshot_max_age_s, stream=self._stream)
        return snap

    def due(self, now_ns: int) -> str | None:
        return due(list_snapshots(self.folder, self._stream), now_ns, self._settings.snapshot_interval_s)


def _best_kind(target_root: Path, snapshots_dir: Path) -> str:
    if _is_btrfs_subvolume(target_root) and shutil.which("btrfs"):
        return "btrfs"
    if _can_reflink(target_root, snapshots_dir):
        return "reflink"
    return "linktree"


def _check_kind(kind: str, target_root: Path, snapshots_dir: Path) -> None:
    """A forced kind the filesystem cannot give is bad input, refused before any copy (a
    failing ``btrfs`` or ``cp`` would be an OSError, an internal error to the daemon's API)."""
    if kind == "btrfs" and not (_is_btrfs_subvolume(target_root) and shutil.which("btrfs")):
        raise UsageError(detail=f"snapshot kind btrfs needs the target root to be a btrfs subvolume "
                                f"(and the btrfs command): {target_root} is not one")
    if kind == "reflink" and _first_file(target_root) is not None and not _can_reflink(target_root, snapshots_dir):
        raise UsageError(detail=f"snapshot kind reflink needs a filesystem that clones extents (xfs, btrfs) "
                                f"holding both {target_root} and {snapshots_dir}")


def _is_btrfs_subvolume(path: Path) -> bool:
    if os.stat(path).st_ino != _BTRFS_SUBVOLUME_INO:
        return False
    probe = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.strip() == "btrfs"


def _can_reflink(target_root: Path, snapshots_dir: Path) -> bool:
    """Clone one file of the target into the snapshots folder (EXDEV, EOPNOTSUPP: no)."""
    sample = _first_file(target_root)
    if sample is None:
        return False  # nothing to clone: a link tree of directories costs as little
    probe = snapshots_dir / f".reflink-probe-{os.getpid()}"
    try:
        with open(sample, "rb") as src, open(probe, "wb") as dst:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
        return True
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


def _first_file(root: Path) -> Path | None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder, name)
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_size > 0:
                return path
    return None


def _run(argv: list[str], pass_fds: tuple[int, ...] = ()) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, pass_fds=pass_fds)
    if done.returncode != 0:
        raise OSError(errno.EIO, f"{' '.join(argv[:3])} failed: {done.stderr.strip() or done.returncode}")


def _syncfs(path: Path) -> None:
    """Flush the filesystem holding the snapshot before its metadata says it is complete."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsops.syncfs(fd)
    except OSError:
        os.sync()
    finally:
        os.close(fd)


# -- the link tree ---------------------------------------------------------------------

def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size, st.st_mtime_ns]


def _link_tree(target_root: Path, folder: Path, base: Snapshot | None) -> tuple[int, int]:
    """Copy ``target_root`` to ``folder/tree``, hard-linking files unchanged since ``base``."""
    known = _read_manifest(base.folder) if base else {}
    manifest: dict[str, list[int]] = {}
    copied = linked = 0
    seen_inodes: dict[tuple[int, int], Path] = {}  # hard links inside the live tree stay links
    dirs: list[tuple[Path, Path]] = []
    tree = folder / TREE
    for src, rel, st in _walk(target_root):
        dst = tree / rel if rel else tree
        if stat.S_ISDIR(st.st_mode):
            dst.mkdir()
            dirs.append((src, dst))
            continue
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in seen_inodes:
            os.link(seen_inodes[key], dst)
        elif stat.S_ISREG(st.st_mode):
            identity = _identity(st)
            manifest[rel] = identity
            if known.get(rel) == identity and _hard_link(base.tree / rel, dst):
                linked += 1
            else:
                _copy_file(src, dst, st)
                copied += 1
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dst)
            os.lchown(dst, st.st_uid, st.st_gid)
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        else:  # fifo, device, socket
            os.mknod(dst, st.st_mode, st.st_rdev)
            os.chown(dst, st.st_uid, st.st_gid)
            shutil.copystat(src, dst, follow_symlinks=False)
        if st.st_nlink > 1:
            seen_inodes.setdefault(key, dst)
    for src, dst in reversed(dirs):  # children first: their creation changed the parent's times
        st = src.lstat()
        os.chown(dst, st.st_uid, st.st_gid)
        shutil.copystat(src, dst, follow_symlinks=False)
    _write_manifest(folder, manifest)
    return copied, linked


def _walk(root: Path) -> Iterator[tuple[Path, str, os.stat_result]]:
    """(path, path relative to root ('' for root), lstat), parents before children."""
    stack = [(root, "")]
    while stack:
        folder, rel = stack.pop()
        st = folder.lstat()
        yield folder, rel, st
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name, reverse=True):
                child_rel = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append((Path(entry.path), child_rel))
                else:
                    yield Path(entry.path), child_rel, entry.stat(follow_symlinks=False)


def _hard_link(existing: Path, new: Path) -> bool:
    try:
        os.link(existing, new)
        return True
    except OSError as exc:
        if exc.errno in (errno.EMLINK, errno.ENOENT):  # link count limit, or base damaged
            return False
        raise


def _copy_file(src: Path, dst: Path, st: os.stat_result) -> None:
    """Copy a regular file with its attributes; holes stay holes (a sparse disk image
    costs the snapshot its data, not its size)."""
    fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fout, st.st_size)
            for start, end in data_extents(fin, st.st_size, st.st_blocks * 512):
                fsops.copy_range(fin, fout, start, end)
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    os.chown(dst, st.st_uid, st.st_gid)  # before the mode: chown clears set-id bits
    shutil.copystat(src, dst, follow_symlinks=False)  # mode, times, extended attributes


def _read_manifest(folder: Path) -> dict[str, list[int]]:
    try:
        data = (folder / MANIFEST).read_bytes()
    except FileNotFoundError:
        return {}
    return json.loads(zstandard.ZstdDecompressor().decompress(data))


def _write_manifest(folder: Path, manifest: dict[str, list[int]]) -> None:
    data = zstandard.ZstdCompressor(level=3).compress(json.dumps(manifest).encode())
    write_atomic(folder / MANIFEST, data, mode=0o644)


# -- deleting, retention, schedule ---------------------------------------------------

def delete_snapshot(snapshots_dir: str | Path, snapshot_id: str, stream: str | None = None) -> Snapshot:
    with folder_lock(Path(snapshots_dir)):
        snap = get_snapshot(snapshots_dir, snapshot_id, stream)
        _delete(snap)
    return snap


def _delete(snap: Snapshot) -> None:
    """Delete ``snap``; BackendUnavailable if a reader holds it (``reading``)."""
    fd = os.open(snap.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackendUnavailable(backend=f"snapshot {snap.id}",
                                     detail="a restore is reading it; try again when it is done") from None
        (snap.folder / META).unlink()
        fsync_dir(snap.folder)
        _remove(snap.folder)
    finally:
        os.close(fd)
    log.info("snapshot deleted", msgid="DT-H002", snapshot=snap.id, offset=snap.offset)


def prune(snapshots_dir: str | Path, max_count: int, max_age_s: int | None,
          now_ns: int | None = None, stream: str | None = None) -> list[Snapshot]:
    """Delete the oldest snapshots (of ``stream``, when given) beyond ``max_count`` and those
    older than ``max_age_s``.

    The newest snapshot is always kept: it may be the only way back past the log's own
    retention; so is one a restore is reading, until the next prune. Returns what was
    deleted.
    """
    now = time.time_ns() if now_ns is None else now_ns
    snapshots_dir = Path(snapshots_dir)
    if not snapshots_dir.is_dir():
        return []
    with folder_lock(snapshots_dir):
        _remove_incomplete(snapshots_dir)
        snaps = list_snapshots(snapshots_dir, stream)
        keep = snaps[-max(1, max_count):]
        if max_age_s is not None:
            keep = [s for s in keep if now - s.taken_ns <= max_age_s * _NS] or snaps[-1:]
        gone = []
        for snap in (s for s in snaps if s not in keep):
            try:
                _delete(snap)
            except BackendUnavailable:
                log.warning("snapshot in use, not pruned", msgid="DT-H004", snapshot=snap.id, offset=snap.offset)
                continue
            gone.append(snap)
    return gone


def due(snapshots: list[Snapshot], now_ns: int, interval_s: int) -> str | None:
    """Whether a scheduled snapshot is due: None, ``"scheduled"``, or ``"deferred"``.

    The schedule counts from the newest snapshot of any reason. ``"deferred"`` means at
    least one whole interval was missed (the connection could not be snapshotted in time),
    as operators of this kind of software expect snapshots to be labelled.
    """
    if interval_s <= 0:
        return None
    if not snapshots:
        return "scheduled"
    due_at = max(s.taken_ns for s in snapshots) + interval_s * _NS
    if now_ns < due_at:
        return None
    return "scheduled" if now_ns - due_at < interval_s * _NS else "deferred"


# -- helpers -------------------------------------------------------------------------


def _remove_incomplete(snapshots_dir: Path) -> None:
    for entry in snapshots_dir.iterdir():
        if entry.is_dir() and not (entry / META).exists():
            log.warning("incomplete snapshot removed", msgid="DT-H003", folder=str(entry))
            _remove(entry)


def _remove(folder: Path) -> None:
    tree = folder / TREE
    if tree.is_dir() and os.stat(tree).st_ino == _BTRFS_SUBVOLUME_INO and shutil.which("btrfs"):
        subprocess.run(["btrfs", "subvolume", "delete", str(tree)], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def copy_tree(src: str | Path, into: str | Path, keep_open: tuple[int, ...] = ()) -> None:
    """Copy the contents of ``src`` into the existing folder ``into``, preserving links,
    owners, modes, times and extended attributes; clones extents where the filesystem can
    (used by restore: the copy never shares an inode with the snapshot). ``cp`` inherits
    the descriptors ``keep_open`` (restore's lock on ``into``: a cp that outlives a killed
    restore still holds it while it writes)."""
    _run(["cp", "-a", "--reflink=auto", f"{src}/.", f"{into}/"], pass_fds=keep_open)
