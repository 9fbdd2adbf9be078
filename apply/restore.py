"""Restore: materialise a connection's replicated tree as it was at an offset or a time.

The state at offset N (engine/history.py: every event up to and including N) is rebuilt
as: the newest snapshot at or before N (apply/snapshot.py), copied; then the events after
the snapshot's offset up to N, applied by the real Applier (apply/applier.py: one apply
path, no second implementation). Without a usable snapshot the events are replayed from
the empty tree, which needs the log to still hold offset 0. ``engine.history.offset_at``
decides what is reachable and says how far back one can go when a point is not.

Contract:
- The destination must be empty (or absent). Nothing is written to it unless the restore
  succeeds: the tree is built in a staging folder inside it and moved into place at the
  end; any failure removes the staging folder. A restore holds its staging folder (flock)
  until it ends, so one that nobody holds was left by a restore killed mid-way (kill -9, a
  crash): the next restore into that destination removes it (DT-H022).
- Exact: the Applier replays through a ``LogView`` that ends at N, drops the applier's
  appends and consumer commits (a restore leaves no trace in the log), and runs no task
  command. An event the Applier cannot apply (it would retry it) makes the restore fail
  at once. An event it refuses (a corrupt record) and a gap make the target Mirror
  Required, as they made the real one: a restore at a point where no mirror has repaired
  that since fails (RestoreFailed naming the reason); from the remirror on, the replay
  holds what the target held again (``_check``).
- The snapshot it starts from is held while it is copied (apply/snapshot.reading): dt
  snapshot delete refuses it meanwhile and prune keeps it, so a restore never copies a
  tree that is being removed.
- ``glob`` (engine/history.path_matches) keeps only matching paths and what is beneath
  them, with the directories leading to them. The whole tree is materialised first and
  filtered after, which stays right across renames into and out of the selection.
  Directories keep their restored times.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from datatether.engine import logs
from datatether.engine.errors import NotFound, RestoreFailed, UsageError
from datatether.engine.history import Point, offset_at, path_matches
from datatether.engine.log import Log
from datatether.engine.log_view import LogView
from datatether.engine.offsets import NO_OFFSET
from datatether.engine.settings import Settings
from datatether.engine.states import TargetDataState, TargetStatus

from .applier import Applier
from .paths import remap_link
from .progress import Progress
from .snapshot import Snapshot, copy_tree, list_snapshots, nearest, reading

log = logs.get(__name__)

CONSUMER = "restore"
STAGING_PREFIX = ".dt-restore-"
_STAGING = re.compile(re.escape(STAGING_PREFIX) + r"\d+")


@dataclass(frozen=True)
class Restored:
    offset: int                  # the state restored is the one after this event
    time_ns: int | None          # its log time (None for the empty state)
    snapshot: str | None         # the snapshot it started from (None: from the empty tree)
    replayed: int                # events applied on top of it
    data_state: str              # the target data state at that point (Mirroring: mid-mirror)
    into: str


def restore(log_: Log, partition: str, point: Point, into: str | os.PathLike, *, snapshots_dir: str | os.PathLike,
            source_root: str, target_root: str, settings: Settings, glob: str | None = None,
            stream: str | None = None) -> Restored:
    """Materialise the state at ``point`` into the empty folder ``into`` (see the module doc).

    ``source_root`` and ``target_root`` are the connection's: symlinks come out as the
    target had them (RemapLink points them into ``target_root``, as in snapshots). Only
    snapshots of ``stream`` (apply/snapshot.stream_of) serve, when it is given."""
    into = Path(into)
    _clear_unfinished(into)
    _check_destination(into)
    snaps = list_snapshots(snapshots_dir, stream)
    offset, reach = offset_at(log_, partition, point, [s.anchor for s in snaps])
    base = _base(snaps, offset, reach.start)
    first = base.offset + 1 if base else 0
    log.info("restore started", msgid="DT-H020", partition=partition, point=str(point), offset=offset,
             snapshot=base.id if base else None, replay=max(0, offset - first + 1), into=str(into))
    into.mkdir(parents=True, exist_ok=True)
    staging = into / f"{STAGING_PREFIX}{os.getpid()}"
    staging.mkdir(mode=0o777 if base is not None else 0o755)  # a snapshot's copy brings the root's mode
    held = _hold(staging)
    try:
        if base is not None:
            with reading(base):
                copy_tree(base.tree, staging, keep_open=(held,))
        state = _replay(log_, partition, point, staging, base, offset, source_root, settings)
        if settings.remap_link and offset > (base.offset if base else NO_OFFSET):
            _relink(staging, target_root)
        if glob is not None and not _keep_only(staging, glob):
            raise NotFound(what=f"path matching {glob!r} at {point}", name="nothing matched")
        _move_contents(staging, into)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(held)
    time_ns = _time_of(log_, partition, offset, base)
    log.info("restore done", msgid="DT-H021", partition=partition, offset=offset, into=str(into))
    return Restored(offset, time_ns, base.id if base else None, max(0, offset - first + 1), state, str(into))


def _hold(staging: Path) -> int:
    """Lock ``staging`` for the life of this restore; returns the descriptor to close."""
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _clear_unfinished(into: Path) -> None:
    """Remove the staging folders nobody holds when ``into`` holds nothing else (see the
    module doc); anything else in it is the user's and is left to _check_destination."""
    if into.is_symlink() or not into.is_dir():
        return
    entries = list(into.iterdir())
    if not all(_STAGING.fullmatch(e.name) and e.is_dir() and not e.is_symlink() for e in entries):
        return
    for entry in entries:
        fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a restore into the same folder is running
            log.warning("unfinished restore removed", msgid="DT-H022", folder=str(entry))
            shutil.rmtree(entry)
        finally:
            os.close(fd)


def _check_destination(into: Path) -> None:
    if into.is_symlink() or (into.exists() and not into.is_dir()):
        raise UsageError(detail=f"{into} exists and is not a directory")
    if into.is_dir() and any(into.iterdir()):
        raise UsageError(detail=f"{into} is not empty: restore only into an empty or new directory")


def _base(snaps: list[Snapshot], offset: int, log_start: int) -> Snapshot | None:
    """The newest snapshot at or before ``offset`` that the retained records continue
    (offset_at has checked that one exists when the log lacks its beginning)."""
    snap = nearest(snaps, offset)
    if snap is not None and (snap.offset == offset or snap.offset + 1 >= log_start):
        return snap
    return None


def _replay(log_: Log, partition: str, point: Point, root: Path, base: Snapshot | None, offset: int,
            source_root: str, settings: Settings) -> str:
    """Apply events ``base+1 .. offset`` onto ``root``; return the final target data state."""
    start = base.offset if base else NO_OFFSET
    work = Path(tempfile.mkdtemp(prefix="dt-restore-progress-"))
    progress = Progress(work)
    try:
        progress.commit(start)
        initial = TargetDataState(base.data_state) if base else TargetDataState.OK
        progress.set_data_state(initial, f"restored from snapshot {base.id}" if base else "restore")
        view = LogView(log_, last=offset, commits=False)
        applier = Applier(view, partition, root, source_root, progress,
                          settings.replace(task_commands=False), consumer=CONSUMER)
        known = (progress.data_state, progress.data_state_reason)
        try:
            while applier.applied_offset < offset:
                before = applier.applied_offset
                applier.run_once()
                if progress.status is TargetStatus.RETRYING:
                    raise RestoreFailed(point=str(point), reason=progress.status_detail)
                if applier.applied_offset == before:
                    raise RestoreFailed(point=str(point), reason=f"no progress after offset {before}")
        finally:
            applier.close()
        _check(progress, point, known)
        return progress.data_state.value
    finally:
        progress.close()
        shutil.rmtree(work, ignore_errors=True)


def _check(progress: Progress, point: Point, known: tuple) -> None:
    """Fail when the target was Mirror Required at the point itself: after a gap or a
    refused event that no mirror repaired before it, the tree is not what the target held.
    Only the state at the point counts (not where the applier's batches happened to end):
    a remirror after a gap was computed against the target as the events before the gap
    left it, which is the tree replayed, so from the remirror on the replay holds what the
    target held again. A snapshot taken while the target was already Mirror Required is
    replayed on as the target did; a new reason is a new failure."""
    now = (progress.data_state, progress.data_state_reason)
    if progress.data_state is TargetDataState.MIRROR_REQUIRED and now != known:
        raise RestoreFailed(point=str(point), reason=f"{progress.data_state_reason} "
                            "(nothing was written to the destination)")


def _time_of(log_: Log, partition: str, offset: int, base: Snapshot | None) -> int | None:
    if base is not None and base.offset == offset:
        return base.time_ns
    if offset == NO_OFFSET:
        return None
    return log_.read(partition, offset, max_records=1)[0].timestamp_ns


# -- filtering and moving ------------------------------------------------------------

def _relink(root: Path, target_root: str) -> None:
    """The applier remapped links into the staging root; the target has them in its own."""
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(folder, name)
            if not path.is_symlink():
                continue
            text = os.readlink(path)
            wanted = remap_link(text, str(root), target_root)
            if wanted == text:
                continue
            st, parent = path.lstat(), Path(folder).lstat()
            path.unlink()
            os.symlink(wanted, path)
            os.lchown(path, st.st_uid, st.st_gid)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
            os.utime(folder, ns=(parent.st_atime_ns, parent.st_mtime_ns))


def _keep_only(root: Path, glob: str) -> bool:
    """Remove what neither matches ``glob`` nor leads to a match; True if anything is kept."""
    times = {}

    def prune(folder: Path, rel: str) -> bool:
        kept = False
        with os.scandir(folder) as entries:
            children = list(entries)
        for entry in children:
            child = f"{rel}/{entry.name}" if rel else entry.name
            if path_matches(child, glob):
                kept = True
            elif entry.is_dir(follow_symlinks=False) and prune(Path(entry.path), child):
                kept = True
            else:
                if not times.get(folder):
                    times[folder] = folder.lstat()
                _remove(Path(entry.path))
        return kept

    kept = prune(root, "")
    for folder, st in times.items():  # removing entries moved the times of their folders
        if folder.exists():  # (unless the folder went too)
            os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    return kept


def _remove(path: Path) -> None:
    if stat.S_ISDIR(path.lstat().st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def _move_contents(staging: Path, into: Path) -> None:
    """Move everything from ``staging`` into its parent ``into``, which then takes the
    staging root's owner, mode, times and extended attributes (the restored set root)."""
    st = staging.lstat()
    for entry in os.listdir(staging):
        os.rename(staging / entry, into / entry)
    os.chown(into, st.st_uid, st.st_gid)
    shutil.copystat(staging, into, follow_symlinks=False)
    staging.rmdir()
    os.utime(into, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
