"""The applier: applies one connection's events to the target, in offset order, exactly
once in effect.

Order
-----
Events are read from the Log from ``applied + 1`` on and each must be the next one
(engine/offsets.expect_next). None is skipped except as "Failures" below describes.

Exactly-once effect: the commit rule
------------------------------------
Events fall in two classes.

- *Data events* change the content or attributes of objects already named and never
  which object a name refers to: Write, Truncate, Fallocate, SetAttr, SetXattr,
  RemoveXattr, MirrorData, BlockWrite, BlockDiscard, and the no-ops TaskResult, Marker and
  ReplicationSetDefinition.
- Every other event is a *commit point*: the namespace operations (Create, Symlink, Link,
  Rename, Unlink, Rmdir, MirrorFile), events that observe or publish state (MirrorFileEnd
  checks a digest, TaskCommand runs a program, Barrier and BlockFlush make data durable)
  and data-state changes (MirrorStart, MirrorEnd, Gap).

The applied offset (apply/progress.py: one pwrite, which survives the process being
killed) is committed **before and after every commit point**, and after every run of data
events (at the latest at the end of each batch), except that a mirrored file's commit
points are bound to the data run between them: none after a MirrorFile, none before a
MirrorFileEnd (one commit per mirrored file instead of three). So after a crash, what was
applied past the committed offset is either one single commit point, wholly or partly
applied, or a run of data events, which may open with a MirrorFile and close with a
MirrorFileEnd. The restarted applier applies them again from the committed offset, and
that is exact:

- One event applied again, over its own whole or partial first application, ends in the
  same state. Writes, truncates and fallocates use absolute offsets and sizes; attributes
  and xattrs take absolute values; every namespace operation first checks the state it
  expects: Create of an object of that kind already there only sets its metadata again
  (and empties a file); Rename with the source gone and the destination present is done;
  Unlink or Rmdir of a missing name is done; Link to the same inode is done; MirrorFile
  empties or replaces the file before its data comes.
- A run of data events applied again over a state where some prefix of it is already
  applied ends as if applied once: no data event changes which object a path names, and
  every byte, size and attribute ends with the value the last event of the run that sets
  it gives (a truncate zeroes what it cuts off, so bytes a replayed earlier write puts
  past it are cut again).
- A MirrorFile opening such a run makes the same object at its own path again (a whole
  file is emptied again) before the run writes its data again, and a MirrorFileEnd
  closing one truncates, checks and times the file the run has just written again.
  Neither changes which object any other path names, and a data event of the run about
  a path below a MirrorFile's finds it the same way both times (missing, if the
  MirrorFile replaced a directory there).

Replaying more than that could rewrite history: a Rename followed by a Create at the old
name, replayed from before the Rename, would move the new file over the old one. The
commit before each commit point is what rules that out. Task commands, the one effect
outside the target tree, run at most once (apply/tasks.py).

Durability against the machine going down: once no event has changed the target for
IDLE_CHECKPOINT_S seconds, a checkpoint syncs the target file system and writes a synced
progress record (and ``close`` does, unless told not to). Checkpoints while events keep
coming would buy nothing: the record is marked dirty again before the next effect, and a
machine stop while it is dirty makes the target Mirror Required whatever was synced before
(apply/progress.py).
A Barrier fsyncs its file and its directory and makes the record durable, so what the
source application made durable is durable on the target too.

The record also keeps the log timestamp of the event applied last. Before its first batch
a restarted applier checks that the log still holds that event at that offset: a log that
went back (its tail lost and the offsets given to new records) makes the target Mirror
Required and the applier goes on from the first record newer than the one applied
(DT-A021, ``_rewind_if_log_went_back``), instead of skipping new records as applied.

Failures
--------
- OSError while applying (ENOSPC, EACCES, EIO ...): nothing is committed for that event;
  target status Retrying (DT-A004); the same event is tried again after
  ``settings.retry_delay_s``, holding every later one. Never skipped. The same holds for
  a Log that cannot be read and for any unexpected exception (a bug must not lose data).
  Every cached descriptor is closed first, so the retry walks the target from its root's
  path: space an operator freed by removing a file the applier had open is free, and a
  target root or directory removed and put back is found again.
- An event that can never be applied: a record failing its checksum or not decodable
  (CorruptRecord), a path escaping the target (PathEscapes), an impossible operation
  (InvalidEvent). The target data state becomes Mirror Required (a remirror repairs what
  the event would have done), the event is logged (DT-A002), and only then, in one
  durable record carrying that state, the offset moves past it.
- An event naming an object the target lacks (apply/paths.Missing). In a mirror pass
  (state Mirroring) that is expected for files the mirror has not reached yet: the event is
  dropped, the mirror brings the file as it is then. Otherwise the target has diverged:
  Mirror Required (DT-A003).
- Events lost before the applier saw them (a Gap event; records removed by retention
  before being applied): Mirror Required (DT-A007, DT-A008).

Target data state: Not Ready until an applier first loads the target, then OK;
MirrorStart makes it Mirroring; MirrorEnd makes it OK only if it is still Mirroring
(anything that failed in the pass turned it Mirror Required, which stays until the next
MirrorStart). Restore Required is set by failover, not here.

Semantics
---------
- Paths are resolved under the target root by apply/paths.py (containment).
- Symlinks: with ``settings.remap_link`` an absolute target inside the source set root is
  rewritten to the same place under the target root; other targets are stored verbatim.
  The applier never follows a link, so no link content can make it write outside.
- Objects in the way are replaced: a Create, MirrorFile, Symlink, Link or Rename whose
  destination holds an object of another kind (or, for a new or whole file, a file with
  other hard links on the target) removes it first, a directory with its subtree, so the
  target ends as the source is. A checksum mirror (``whole`` false) of a file with other
  hard links on the target gives it its own copy first, so the other names keep their
  content, and makes the target Mirror Required: the header does not say whether the
  source has those links, so the next pass checks them (it links again what must be).
- Creating operations create missing parent directories (0755); other events on a
  missing object are divergence (above).
- ``settings.ignore_delete_ops``: Unlink and Rmdir are not applied. Files renamed or
  moved out of the set reach the target as Unlink/Rmdir (recursive), so they stay too.
- Rmdir (not recursive) of a directory that still has entries on the target only (they
  are orphans): the directory and its entries are kept (DT-A012).
- Sparse files: a whole mirrored file is emptied, only its data blocks are written and
  MirrorFileEnd truncates it to its size, so holes stay holes. MirrorFileEnd then checks
  the blake3 digest (engine/digest.py; a mismatch is Mirror Required, DT-A006) and sets
  the mtime last, without reading the whole file back when it can: for a file mirrored
  whole the digest is built from the data as it is written, holes as zeros
  (digest.Stream); for a file sent in blocks, the block digests the event lists must
  give the file digest and every block written in this pass is read back and must have
  its listed digest (the other blocks are the ones the mirror just found equal). The
  whole file is read back when that is not known: not every byte went by in order, the
  event lists no blocks, another event about the file or a namespace change came in
  between, or the applier restarted. A MirrorFile that carries a small file's content
  (``complete``) is applied as the header, its data at offset 0 and its MirrorFileEnd
  would be, in one event; one that is no whole regular file of exactly its ``size``
  bytes is refused.
- Directory times in a mirror pass: a directory's header (MirrorFile) sets its times at
  once, right for a directory without children; creating children moves them, so the
  producer sends a SetAttr with the directory's times after its last child
  (engine/mirror.py does), which the applier applies like any SetAttr. No target-side
  state is needed for it.
- Fallocate modes that shift data (collapse, insert range) are refused (InvalidEvent).
- Block events go to the device or image file mapped to the member name (``devices``).

Message ids: DT-A001 loaded, DT-A002 event refused, DT-A003 target diverged, DT-A004
retrying, DT-A005 resumed after retrying, DT-A006 digest mismatch, DT-A007 gap, DT-A008
events removed before being applied, DT-A009..A011 tasks (apply/tasks.py), DT-A012
directory kept, DT-A013/A014 progress (apply/progress.py), DT-A015 applied offset lost,
DT-A016 delete ignored, DT-A017 mirror pass complete, DT-A018 advisory consumer offset
not committed, DT-A019 status snapshot not written (apply/progress.py); state changes
DT-S001.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from typing import Callable, Mapping

from datatether.engine import codec, logs
from datatether.engine import digest as digests
from datatether.engine import events as ev
from datatether.engine.errors import CorruptRecord, InvalidEvent, NotFound, OffsetOutOfRange, PathEscapes
from datatether.engine.log import Log, LogRecord
from datatether.engine.offsets import NO_OFFSET, expect_next
from datatether.engine.settings import Settings
from datatether.engine.states import TargetDataState, TargetStatus

from . import fsops
from .handles import OpenFiles
from .paths import Loc, Missing, TargetTree, remap_link
from .progress import Progress
from .tasks import TaskRunner

log = logs.get(__name__)

IDLE_CHECKPOINT_S = 1.0
CONSUMER_COMMIT_S = 1.0
WAIT_SLICE_S = 0.5

DATA_EVENTS = (ev.Write, ev.Truncate, ev.Fallocate, ev.SetAttr, ev.SetXattr, ev.RemoveXattr,
               ev.MirrorData, ev.BlockWrite, ev.BlockDiscard, ev.TaskResult, ev.Marker,
               ev.ReplicationSetDefinition)
NO_OPS = (ev.TaskResult, ev.Marker, ev.ReplicationSetDefinition)
# Commit points bound to the data run after (MirrorFile) or before (MirrorFileEnd) them.
_NO_COMMIT_AFTER = (ev.MirrorFile,)
_NO_COMMIT_BEFORE = (ev.MirrorFileEnd,)
# Events that change at most the attributes or content of the object their path names.
_PATH_DATA_EVENTS = (ev.Write, ev.Truncate, ev.Fallocate, ev.SetAttr, ev.SetXattr, ev.RemoveXattr, ev.MirrorData)
_REFUSED = (PathEscapes, InvalidEvent, CorruptRecord)
_IN_THE_WAY = (errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY, errno.EEXIST)


class Applier:
    """Applies the events of ``partition`` to ``target_root`` (see the module docstring).

    ``source_root`` is the set root on the source (for RemapLink); ``devices`` maps block
    device member names to the device or image file on the target. Not thread-safe except
    ``pause``, ``resume`` and the ``stop_event`` of ``run``."""

    def __init__(self, log_: Log, partition: str, target_root: str | os.PathLike, source_root: str,
                 progress: Progress, settings: Settings, *, consumer: str = "applier",
                 devices: Mapping[str, str] | None = None):
        self.log = log_
        self.partition = partition
        self.consumer = consumer
        self.source_root = source_root
        self.progress = progress
        self.settings = settings
        self.tree = TargetTree(target_root)
        self.files = OpenFiles(self.tree)
        self.tasks = TaskRunner(log_, partition, self.tree.root, settings.task_commands)
        self._device_paths = dict(devices or {})
        self._device_fds: dict[str, int] = {}
        self._sync_fd = os.open(self.tree.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._pause = threading.Event()
        self._pending = False  # data events applied past the committed offset
        self._mirrored: _Mirrored | None = None  # what was written to the file being mirrored
        self._durable = False  # the commit after the current event must be fsynced
        now = time.monotonic()
        self._last_effect = now
        self._next_consumer_commit = now
        self._consumer_committed = NO_OFFSET
        self._handlers: dict[type, Callable] = {
            ev.Create: self._create, ev.Write: self._write, ev.Truncate: self._truncate,
            ev.Fallocate: self._fallocate, ev.SetAttr: self._setattr, ev.SetXattr: self._setxattr,
            ev.RemoveXattr: self._removexattr, ev.Rename: self._rename, ev.Link: self._link,
            ev.Symlink: self._symlink, ev.Unlink: self._unlink, ev.Rmdir: self._rmdir,
            ev.Barrier: self._barrier, ev.BlockWrite: self._block_write,
            ev.BlockDiscard: self._block_discard, ev.BlockFlush: self._block_flush,
            ev.MirrorStart: self._mirror_start, ev.MirrorFile: self._mirror_file,
            ev.MirrorData: self._mirror_data, ev.MirrorFileEnd: self._mirror_file_end,
            ev.MirrorEnd: self._mirror_end, ev.TaskCommand: self._task, ev.Gap: self._gap,
            ev.TaskResult: self._noop, ev.Marker: self._noop, ev.ReplicationSetDefinition: self._noop,
        }
        self._last = progress.applied_offset
        self._stamp = progress.applied_stamp  # the log timestamp of the record at _last (0: unknown)
        self._load()

    # -- life cycle ----------------------------------------------------------------------

    def _load(self) -> None:
        p = self.progress
        if p.fresh:
            try:
                committed = self.log.committed(self.partition, self.consumer)
            except NotFound:
                committed = NO_OFFSET
            if committed != NO_OFFSET:
                log.error("the target's applied offset was lost; resuming after the log's consumer offset",
                          msgid="DT-A015", partition=self.partition, consumer_offset=committed)
                p.set_data_state(TargetDataState.MIRROR_REQUIRED,
                                 f"applied offset lost; resumed after consumer offset {committed}")
                self._last, self._stamp = committed, 0
        # Checked by the first batch, where a log that cannot be read yet holds the queue.
        self._check_log_kept = not p.fresh
        if p.data_state is TargetDataState.NOT_READY:
            missing = p.fresh and self._lacks_history()
            if missing:
                p.set_data_state(TargetDataState.MIRROR_REQUIRED, missing)
            else:
                p.set_data_state(TargetDataState.OK, "applier loaded")
        p.commit(self._last, stamp=self._stamp, durable=True, synced=p.synced and not p.fresh)
        log.info("applier loaded", msgid="DT-A001", partition=self.partition, target=self.tree.root,
                 applied=self._last, target_data_state=p.data_state.value)
        p.publish(force=True)

    def _rewind_if_log_went_back(self) -> None:
        """Make the target Mirror Required (DT-A021) when the log no longer holds the record
        it applied last, and go on from the first record it has not seen. The log went back
        when it lost records from its tail and gave their offsets to new ones (RocksDB
        dropping a damaged write-ahead log's tail, a machine stop without sync, the log
        directory made anew): the applier would otherwise skip the new records at offsets
        it believes applied, the remirror's among them, and report a replica that is not
        one. Records keep non-decreasing timestamps and the new ones come after the one
        applied, so the first record stamped later than it is the first one not seen. A
        record that cannot be read intact here tells nothing: applying it will say so."""
        start, end = self.log.start_offset(self.partition), self.log.end_offset(self.partition)
        if self._last >= end:
            why = f"the log ends at offset {end - 1}, before the applied offset {self._last}"
        elif not self._stamp or self._last < start:
            return
        else:
            try:
                kept = self.log.read(self.partition, self._last, max_records=1)[0].timestamp_ns == self._stamp
            except CorruptRecord:
                return
            if kept:
                return
            why = f"the log's record {self._last} is not the one the target applied"
        unseen = self.log.offset_for_time(self.partition, self._stamp + 1) if self._stamp else end
        applied, self._last, self._stamp = self._last, max(unseen, start) - 1, 0
        why += ": events the target applied are gone from the log"
        log.error("the log no longer holds what the target applied; the target needs a remirror", msgid="DT-A021",
                  partition=self.partition, applied=applied, resumed_after=self._last, reason=why)
        self.progress.set_data_state(TargetDataState.MIRROR_REQUIRED, why)
        self.progress.commit(self._last, durable=True)

    def _lacks_history(self) -> str:
        """Why a target nothing was applied to yet cannot be a replica by replaying the
        partition ("" when it can): the partition holds nothing yet (no mirror started:
        an interrupted first mirror, a read-only command's new pair), or its first events
        are gone (retention). A mirror in the partition makes it Mirroring, then OK."""
        start, end = self.log.start_offset(self.partition), self.log.end_offset(self.partition)
        if start > 0:
            return f"the partition starts at offset {start}: earlier events are gone"
        return "" if end > 0 else "no mirror has completed yet"

    @property
    def applied_offset(self) -> int:
        """Offset of the last event applied and committed (NO_OFFSET when none)."""
        return self.progress.applied_offset

    def pause(self) -> None:
        """Stop applying after the current batch (the queue grows on the target)."""
        self._pause.set()

    def resume(self) -> None:
        self._pause.clear()

    def close(self, *, sync: bool = True) -> None:
        """Commit and release everything (the Progress stays open). ``sync`` makes the
        target durable first (a checkpoint). Without it the kernel writes the target back
        in its own time and the progress record stays unsynced, so a machine stop before
        that makes the target Mirror Required (apply/progress.py), never silently stale:
        one-shot jobs close that way (like cp and rsync, which do not sync either), a
        daemon's applier syncs."""
        try:
            if sync:
                self.checkpoint()
            else:  # the record also stores a data state set since the last commit
                self.progress.commit(self._last, stamp=self._stamp, durable=self._durable,
                                     synced=self.progress.synced)
                self._pending = self._durable = False
                self._commit_consumer()
        finally:
            self.files.close()
            for fd in self._device_fds.values():
                os.close(fd)
            self._device_fds.clear()
            self.tree.close()
            os.close(self._sync_fd)
            self.progress.publish(force=True)

    def run(self, stop_event: threading.Event, max_events: int = 1000,
            after_batch: Callable[[], None] | None = None) -> None:
        """Apply until ``stop_event`` is set: wait on the log, apply, retry failures;
        ``after_batch()`` after every batch (tools/applier_process.py publishes progress)."""
        while not stop_event.is_set():
            applied = self.run_once(max_events)
            if after_batch is not None:
                after_batch()
            status = self.progress.status
            if status is TargetStatus.RETRYING:
                stop_event.wait(self.settings.retry_delay_s)
            elif status is TargetStatus.PAUSED:
                stop_event.wait(WAIT_SLICE_S)
            elif applied == 0:
                self._wait_for_events()

    def _wait_for_events(self) -> None:
        try:
            self.log.wait(self.partition, self._last + 1, WAIT_SLICE_S)
        except Exception as exc:  # noqa: BLE001 - the Log failing holds the queue, never crashes
            self._hold(exc, self._last + 1)

    # -- one batch -----------------------------------------------------------------------

    def run_once(self, max_events: int = 1000) -> int:
        """Apply what the log has after the applied offset (at most ``max_events``).

        Returns how many events were applied (refused ones count: the offset moved).
        A failure holds the queue: status Retrying, the failed event is tried again by the
        next call (``run`` waits the retry delay first)."""
        if self._pause.is_set():
            self.progress.set_status(TargetStatus.PAUSED)
            return 0
        applied = 0
        offset = self._last + 1
        try:
            if self._check_log_kept:
                self._rewind_if_log_went_back()
                self._check_log_kept = False
                offset = self._last + 1
            for record in self._read(max_events):
                offset = record.offset
                self._apply(record)
                applied += 1
            self._commit_pending()
            self._housekeeping()
        except Exception as exc:  # noqa: BLE001 - transient or unknown: hold the queue, never skip
            self._hold(self._commit_what_is_done(exc), offset)
            return applied
        if self.progress.status is not TargetStatus.OK:
            if self.progress.status is TargetStatus.RETRYING:
                log.info("resumed", msgid="DT-A005", partition=self.partition, applied=self._last)
            self.progress.set_status(TargetStatus.OK)
        return applied

    def _commit_what_is_done(self, exc: Exception) -> Exception:
        """After a failure: commit the events applied before it; returns the error to report."""
        try:
            self._commit_pending()
        except OSError as commit_exc:  # the state directory fails too: that is the news
            return commit_exc
        return exc

    def _read(self, max_events: int) -> list[LogRecord | "_Corrupt"]:
        start = self._last + 1
        try:
            return self.log.read(self.partition, start, max_records=max_events)
        except CorruptRecord:
            try:  # the damaged record may be further in the batch: take what is before it
                return self.log.read(self.partition, start, max_records=1)
            except CorruptRecord as exc:
                return [_Corrupt(start, exc)]
        except OffsetOutOfRange:
            first = self.log.start_offset(self.partition)
            if start >= first:
                raise
            self._lost_before(first)
            return self._read(max_events)

    def _lost_before(self, first: int) -> None:
        log.error("events were removed from the log before being applied", msgid="DT-A008",
                  partition=self.partition, applied=self._last, log_start=first)
        self.progress.set_data_state(TargetDataState.MIRROR_REQUIRED,
                                     f"events {self._last + 1}..{first - 1} were removed before being applied")
        self._last, self._stamp = first - 1, 0
        self.progress.commit(self._last, durable=True)

    def _apply(self, record) -> None:
        expect_next(self._last, record.offset)
        try:
            event = record.event() if isinstance(record, _Corrupt) else codec.decode(record.value, views=True)
            op = event.op
            commit_point = not isinstance(op, DATA_EVENTS)
            if commit_point and not isinstance(op, _NO_COMMIT_BEFORE):
                self._commit_pending()
            if not isinstance(op, NO_OPS):
                self.progress.mark_dirty()
                self._last_effect = time.monotonic()
            if self._mirrored is not None:
                self._keep_mirrored(op)
            try:
                self._handlers[type(op)](record.offset, op)
            except Missing as exc:
                self._missing(op, exc)
        except _REFUSED as exc:
            self._refuse(record, exc)
            return
        finally:
            self.tree.release()
        self._last, self._stamp = record.offset, record.timestamp_ns
        self._pending = True
        if not isinstance(op, NO_OPS):
            self.progress.sample(event.time_ns, _touched(op), event.data_bytes())
        if commit_point and not isinstance(op, _NO_COMMIT_AFTER):
            self._commit_pending()

    def _commit_pending(self) -> None:
        if self._pending or self._durable:
            # Still synced when only no-op events came since the last checkpoint.
            self.progress.commit(self._last, stamp=self._stamp, durable=self._durable, synced=self.progress.synced)
            self._pending = self._durable = False

    def _refuse(self, record, exc: Exception) -> None:
        offset = record.offset
        log.error("event refused; the target needs a remirror", msgid="DT-A002", partition=self.partition,
                  offset=offset, error=getattr(exc, "msgid", type(exc).__name__), reason=str(exc))
        self.progress.set_data_state(TargetDataState.MIRROR_REQUIRED, f"event {offset} refused: {exc}")
        self._last, self._stamp = offset, record.timestamp_ns
        self._pending = False
        self.progress.commit(offset, stamp=self._stamp, durable=True)

    def _missing(self, op, exc: Missing) -> None:
        if self.progress.data_state is TargetDataState.MIRRORING:
            log.debug("object not mirrored yet; event dropped", path=exc.path, kind=type(op).__name__)
            return
        self._diverged(f"{type(op).__name__}: {exc}")

    def _diverged(self, reason: str) -> None:
        if self.progress.data_state is TargetDataState.MIRROR_REQUIRED:
            log.debug("target diverged again", partition=self.partition, reason=reason)
            return  # the first reason is the one worth showing; the remirror covers both
        log.warning("target diverged from the source", msgid="DT-A003", partition=self.partition,
                    reason=reason)
        self.progress.set_data_state(TargetDataState.MIRROR_REQUIRED, reason)

    def _hold(self, exc: Exception, offset: int) -> None:
        """The queue is held; the retry finds the target afresh from its root's path."""
        self.files.close()
        self.tree.reset()
        detail = f"event {offset}: {exc}"
        if self.progress.status is not TargetStatus.RETRYING or self.progress.status_detail != detail:
            log.warning("operation failed; retrying", msgid="DT-A004", partition=self.partition,
                        offset=offset, error=repr(exc), retry_delay_s=self.settings.retry_delay_s,
                        exc_info=not isinstance(exc, OSError))
        self.progress.set_status(TargetStatus.RETRYING, detail)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if not self.progress.synced and now - self._last_effect >= IDLE_CHECKPOINT_S:
            self.checkpoint()
        if now >= self._next_consumer_commit and self._consumer_committed != self.progress.applied_offset:
            self._commit_consumer()
        self.progress.publish()

    def checkpoint(self) -> None:
        """Make every applied effect durable, then record that (a synced progress record)."""
        fsops.syncfs(self._sync_fd)
        for fd in self._device_fds.values():
            os.fsync(fd)
        self.progress.commit(self._last, stamp=self._stamp, synced=True)
        self._pending = self._durable = False
        self._commit_consumer()

    def _commit_consumer(self) -> None:
        """Advisory: tells retention and queue accounting how far the target is."""
        applied = self.progress.applied_offset
        self._next_consumer_commit = time.monotonic() + CONSUMER_COMMIT_S
        if applied == NO_OFFSET:
            return
        try:
            self.log.commit(self.partition, self.consumer, applied)
        except Exception as exc:  # noqa: BLE001 - advisory; the applied offset is the Progress
            log.warning("consumer offset not committed", msgid="DT-A018", partition=self.partition,
                        error=repr(exc))
            return
        self._consumer_committed = applied

    # -- helpers -------------------------------------------------------------------------

    def _existing(self, path: str, *, allow_root: bool = True) -> tuple[Loc, os.stat_result]:
        loc = self.tree.locate(path, allow_root=allow_root)
        st = fsops.lstat(loc)
        if st is None:
            raise Missing(path)
        return loc, st

    def _forget(self, path: str) -> None:
        """The name ``path`` (and what is below it) is about to change."""
        self.files.invalidate(path)
        self.tree.invalidate(path)

    def _remove(self, loc: Loc) -> None:
        self._forget(loc.path)
        fsops.remove(loc)

    def _ensure(self, loc: Loc, kind: ev.FileKind, *, rdev: int = 0, link_target: str | None = None,
                keep_data: bool = False) -> None:
        """Make ``loc`` an object of ``kind`` (an empty file unless ``keep_data``), replacing
        what is in the way; an object that is already right is kept."""
        try:  # the usual case of a mirror or of a capture: nothing there yet
            self._make(loc, kind, rdev, link_target)
            return
        except FileExistsError:
            st = fsops.lstat(loc)
        if st is not None and not self._fits(loc, st, kind, rdev, link_target):
            if kind is ev.FileKind.FILE and keep_data and stat.S_ISREG(st.st_mode):
                self._forget(loc.path)
                fsops.copy_unlinked(loc)
                # Whether the source has this link too is unknown here (a later header may
                # link it again, or a mirror may have judged the other name by the old
                # link): a new pass re-checks every link rather than trusting this one.
                self._diverged(f"{loc.path!r} was hard-linked on the target; given its own copy")
                return
            self._remove(loc)
            st = None
        if st is None:
            self._make(loc, kind, rdev, link_target)
        elif kind is ev.FileKind.FILE and not keep_data and st.st_size:
            os.ftruncate(self.files.get(loc.path), 0)

    def _make(self, loc: Loc, kind: ev.FileKind, rdev: int, link_target: str | None) -> None:
        fd = fsops.make(loc, kind, rdev, link_target)
        if fd is not None:
            self.files.adopt(loc.path, fd)

    @staticmethod
    def _fits(loc: Loc, st: os.stat_result, kind: ev.FileKind, rdev: int, link_target: str | None) -> bool:
        if not fsops.is_kind(st, kind, rdev):
            return False
        if kind is ev.FileKind.FILE:
            return st.st_nlink == 1  # a file hard-linked on the target only is not the source's
        if kind is ev.FileKind.SYMLINK:
            return os.readlink(loc.name, dir_fd=loc.dir_fd) == link_target
        return True

    def _link_text(self, target: str | None, path: str) -> str:
        if not target or "\0" in target:
            raise InvalidEvent(reason=f"symlink {path!r} has an empty or NUL-bearing target")
        if self.settings.remap_link:
            return remap_link(target, self.source_root, self.tree.root)
        return target

    @staticmethod
    def _check_xattr_name(name: str, path: str) -> None:
        if not name or "\0" in name:
            raise InvalidEvent(reason=f"bad extended attribute name {name!r} on {path!r}")

    def _same_inode(self, a: os.stat_result | None, b: os.stat_result | None) -> bool:
        return a is not None and b is not None and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def _hardlink(self, existing: str, path: str) -> None:
        eloc, est = self._existing(existing, allow_root=False)
        if stat.S_ISDIR(est.st_mode):
            raise InvalidEvent(reason=f"hard link {path!r} to the directory {existing!r}")
        loc = self.tree.locate(path, create_parents=True)
        st = fsops.lstat(loc)
        if self._same_inode(st, est):
            return
        if st is not None:
            self._remove(loc)
        os.link(eloc.name, loc.name, src_dir_fd=eloc.dir_fd, dst_dir_fd=loc.dir_fd, follow_symlinks=False)

    # -- replication events --------------------------------------------------------------

    def _noop(self, offset: int, op) -> None:
        pass

    def _create(self, offset: int, op: ev.Create) -> None:
        if op.kind is ev.FileKind.SYMLINK:
            raise InvalidEvent(reason=f"Create of the symlink {op.path!r} (symlinks come as Symlink)")
        loc = self.tree.locate(op.path, create_parents=True)
        self._ensure(loc, op.kind, rdev=op.rdev)
        fsops.set_meta(loc, mode=op.mode, uid=op.uid, gid=op.gid, atime_ns=op.atime_ns, mtime_ns=op.mtime_ns)

    def _write(self, offset: int, op: ev.Write | ev.MirrorData) -> None:
        fsops.pwrite_all(self.files.get(op.path), op.data, op.offset)

    def _truncate(self, offset: int, op: ev.Truncate) -> None:
        os.ftruncate(self.files.get(op.path), op.size)

    def _fallocate(self, offset: int, op: ev.Fallocate) -> None:
        fsops.fallocate(self.files.get(op.path), op.mode, op.offset, op.length, op.path)

    def _setattr(self, offset: int, op: ev.SetAttr) -> None:
        loc, _ = self._existing(op.path)
        fsops.set_meta(loc, mode=op.mode, uid=op.uid, gid=op.gid, atime_ns=op.atime_ns, mtime_ns=op.mtime_ns)

    def _setxattr(self, offset: int, op: ev.SetXattr) -> None:
        self._check_xattr_name(op.name, op.path)
        loc, st = self._existing(op.path)
        if stat.S_ISLNK(st.st_mode) and op.name.startswith("user."):
            # Linux refuses user attributes on symlinks: retrying could never succeed.
            raise InvalidEvent(reason=f"user extended attribute {op.name!r} on the symlink {op.path!r}")
        fsops.set_xattr(loc, op.name, op.value)

    def _removexattr(self, offset: int, op: ev.RemoveXattr) -> None:
        self._check_xattr_name(op.name, op.path)
        loc, _ = self._existing(op.path)
        fsops.remove_xattr(loc, op.name)

    def _rename(self, offset: int, op: ev.Rename) -> None:
        dst = self.tree.locate(op.dst, create_parents=True)
        if op.src == op.dst:
            return
        try:
            src = self.tree.locate(op.src)
            src_st = fsops.lstat(src)
        except Missing:
            src_st = None
        dst_st = fsops.lstat(dst)
        if src_st is None:
            if dst_st is not None:
                return  # already renamed
            raise Missing(op.src)
        if self._same_inode(src_st, dst_st):
            return  # two names of one inode: rename(2) leaves both, as on the source
        if op.dst.startswith(op.src + "/"):
            raise InvalidEvent(reason=f"rename of {op.src!r} into itself ({op.dst!r})")
        self._forget(op.src)
        self._forget(op.dst)
        try:
            os.rename(src.name, dst.name, src_dir_fd=src.dir_fd, dst_dir_fd=dst.dir_fd)
        except OSError as exc:
            if exc.errno not in _IN_THE_WAY:
                raise
            fsops.remove(dst)
            os.rename(src.name, dst.name, src_dir_fd=src.dir_fd, dst_dir_fd=dst.dir_fd)

    def _link(self, offset: int, op: ev.Link) -> None:
        self._hardlink(op.existing, op.path)

    def _symlink(self, offset: int, op: ev.Symlink) -> None:
        target = self._link_text(op.target, op.path)
        loc = self.tree.locate(op.path, create_parents=True)
        self._ensure(loc, ev.FileKind.SYMLINK, link_target=target)
        fsops.set_meta(loc, uid=op.uid, gid=op.gid, mtime_ns=op.mtime_ns)

    def _deletes_ignored(self, op) -> bool:
        if self.settings.ignore_delete_ops:
            log.debug("delete ignored (ignore_delete_ops)", msgid="DT-A016", path=op.path)
            return True
        return False

    def _unlink(self, offset: int, op: ev.Unlink) -> None:
        if self._deletes_ignored(op):
            return
        try:
            loc = self.tree.locate(op.path)
        except Missing:
            return  # its directory is gone: so is it
        self._remove(loc)

    def _rmdir(self, offset: int, op: ev.Rmdir) -> None:
        if self._deletes_ignored(op):
            return
        try:
            loc = self.tree.locate(op.path)
        except Missing:
            return
        st = fsops.lstat(loc)
        if st is None:
            return
        if op.recursive or not stat.S_ISDIR(st.st_mode):
            self._remove(loc)
            return
        self._forget(op.path)
        try:
            os.rmdir(loc.name, dir_fd=loc.dir_fd)
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise
            log.warning("directory removed on the source still has entries on the target; kept",
                        msgid="DT-A012", path=op.path)

    def _barrier(self, offset: int, op: ev.Barrier) -> None:
        loc, st = self._existing(op.path)
        if stat.S_ISREG(st.st_mode):
            os.fsync(self.files.get(op.path))
        fsops.fsync_dir(loc.dir_fd)
        self._durable = True

    def _gap(self, offset: int, op: ev.Gap) -> None:
        # A warning: the producer that wrote the gap logged its cause at its own level (a
        # stop between two runs is expected, a capture losing events is an error there).
        log.warning("a gap in the stream: the target needs a mirror", msgid="DT-A007", partition=self.partition,
                    offset=offset, reason=op.reason)
        self.progress.set_data_state(TargetDataState.MIRROR_REQUIRED, f"gap at event {offset}: {op.reason}")

    def _task(self, offset: int, op: ev.TaskCommand) -> None:
        self.tasks.run(offset, op, self.progress)

    # -- block events --------------------------------------------------------------------

    def _device(self, name: str) -> int:
        fd = self._device_fds.get(name)
        if fd is None:
            path = self._device_paths.get(name)
            if path is None:
                raise InvalidEvent(reason=f"block device {name!r} has no mapping on the target")
            fd = self._device_fds[name] = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        return fd

    def _block_write(self, offset: int, op: ev.BlockWrite) -> None:
        fsops.pwrite_all(self._device(op.device), op.data, op.offset)

    def _block_discard(self, offset: int, op: ev.BlockDiscard) -> None:
        fsops.fallocate(self._device(op.device), fsops.FALLOC_FL_PUNCH_HOLE | fsops.FALLOC_FL_KEEP_SIZE,
                        op.offset, op.length, op.device)

    def _block_flush(self, offset: int, op: ev.BlockFlush) -> None:
        os.fsync(self._device(op.device))
        self._durable = True

    # -- mirror events -------------------------------------------------------------------

    def _mirror_start(self, offset: int, op: ev.MirrorStart) -> None:
        self.progress.set_data_state(TargetDataState.MIRRORING, f"mirror {op.mirror_id} ({op.mode})")

    def _mirror_file(self, offset: int, op: ev.MirrorFile) -> None:
        if op.complete and (op.kind is not ev.FileKind.FILE or not op.whole or op.hardlink_of is not None
                            or len(op.data) != op.size):
            raise InvalidEvent(reason=f"MirrorFile {op.path!r} carries content but is no whole regular file "
                                      f"of {len(op.data)} bytes")
        if op.hardlink_of is not None:
            try:
                self._hardlink(op.hardlink_of, op.path)
            except Missing:
                self._diverged(f"MirrorFile {op.path!r}: its hard link {op.hardlink_of!r} is not on the target")
            return
        loc = self.tree.locate(op.path, create_parents=True, allow_root=True)
        if loc.is_root:
            if op.kind is not ev.FileKind.DIR:
                raise InvalidEvent(reason=f"the set root mirrored as {op.kind.value}")
        else:
            link = self._link_text(op.link_target, op.path) if op.kind is ev.FileKind.SYMLINK else None
            self._ensure(loc, op.kind, rdev=op.rdev, link_target=link, keep_data=not op.whole)
        for name in op.xattrs:
            self._check_xattr_name(name, op.path)
        # A file's data follows: work through its descriptor (a new file's is already open).
        regular = op.kind is ev.FileKind.FILE and not loc.is_root
        obj = self.files.get(op.path) if regular else loc
        fsops.set_meta(obj, uid=op.uid, gid=op.gid, st=os.fstat(obj) if regular else None)
        fsops.replace_xattrs(obj, op.xattrs)
        fsops.set_meta(obj, mode=op.mode, atime_ns=op.atime_ns, mtime_ns=op.mtime_ns)
        if regular:
            self._mirrored = _Mirrored(op.path, op.whole, op.atime_ns)
            if op.complete:  # a small file's content: as its MirrorData and MirrorFileEnd would
                if op.data:
                    fsops.pwrite_all(obj, op.data, 0)
                    self._mirrored.wrote(0, op.data)
                self._mirror_file_end(offset, ev.MirrorFileEnd(op.path, op.size, op.digest, op.mtime_ns))

    def _mirror_data(self, offset: int, op: ev.MirrorData) -> None:
        self._write(offset, op)
        if self._mirrored is not None and self._mirrored.path == op.path:
            self._mirrored.wrote(op.offset, op.data)

    def _mirror_file_end(self, offset: int, op: ev.MirrorFileEnd) -> None:
        fd = self.files.get(op.path)
        seen, self._mirrored = self._mirrored, None
        if seen is None or seen.path != op.path:
            seen = _Mirrored(op.path, whole=False, atime_ns=None)  # nothing known: read it back
        if not seen.sized(op.size):
            os.ftruncate(fd, op.size)
        if not seen.check(fd, op):
            log.error("mirrored file differs from the source after being written", msgid="DT-A006",
                      partition=self.partition, path=op.path, offset=offset)
            self.progress.set_data_state(TargetDataState.MIRROR_REQUIRED, f"digest mismatch: {op.path}")
        fsops.set_times(fd, seen.atime_ns, op.mtime_ns)  # the atime again: one call, not two

    def _keep_mirrored(self, op) -> None:
        """What was written to the file being mirrored stands for its content only as long
        as nothing else can have changed it: it is forgotten at any other event about that
        file and at any event that may change which object a path names."""
        path = self._mirrored.path
        mine = isinstance(op, (ev.MirrorData, ev.MirrorFileEnd)) and op.path == path
        elsewhere = isinstance(op, _PATH_DATA_EVENTS) and op.path != path
        if not (mine or elsewhere or isinstance(op, NO_OPS)):
            self._mirrored = None

    def _mirror_end(self, offset: int, op: ev.MirrorEnd) -> None:
        if self.progress.data_state is TargetDataState.MIRRORING:
            self.progress.set_data_state(TargetDataState.OK, f"mirror {op.mirror_id} complete")
            log.info("mirror pass complete", msgid="DT-A017", partition=self.partition, mirror_id=op.mirror_id,
                     files=op.files, sent_bytes=op.sent_bytes)


class _Mirrored:
    """What this pass wrote to one mirrored file, so that MirrorFileEnd can check the
    file's digest without reading all of it back (module docstring, "Sparse files")."""

    __slots__ = ("path", "stream", "blocks", "atime_ns")

    def __init__(self, path: str, whole: bool, atime_ns: int | None):
        self.path, self.atime_ns = path, atime_ns
        self.stream = digests.Stream() if whole else None  # a whole file: all its data
        self.blocks: set[int] = set()  # a file sent in blocks: the blocks written

    def wrote(self, offset: int, data: bytes) -> None:
        if self.stream is not None:
            self.stream.feed(offset, data)
        elif data:
            self.blocks.update(range(offset // digests.DIGEST_BLOCK,
                                     (offset + len(data) - 1) // digests.DIGEST_BLOCK + 1))

    def sized(self, size: int) -> bool:
        """True when the file has ``size`` bytes already: a whole file (its header
        emptied it) whose data went, in order, up to exactly that size."""
        return self.stream is not None and not self.stream.broken and self.stream.position == size

    def check(self, fd: int, op: ev.MirrorFileEnd) -> bool:
        """True when the file open as ``fd`` has the digest ``op`` carries."""
        if self.stream is not None:
            made = self.stream.finish(op.size)
            if made is not None:
                return made == op.digest
        # A separate O_NOATIME descriptor: reading back must not change the atime mirrored.
        reader = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NOATIME | os.O_CLOEXEC)
        try:
            listed = None if self.stream is not None else self._listed_blocks_match(reader, op)
            return listed if listed is not None else digests.file_digest(reader, op.size) == op.digest
        finally:
            os.close(reader)

    def _listed_blocks_match(self, fd: int, op: ev.MirrorFileEnd) -> bool | None:
        """With the source's block digests listed (and consistent with its file digest),
        the blocks written are read back and compared; the others were found equal by
        the mirror's comparison. None when there is no usable list."""
        size, listed, width = op.size, op.block_digests, digests.BLOCK_DIGEST_LEN
        count = -(-size // digests.DIGEST_BLOCK)
        if len(listed) != count * width:
            return None
        expected = [listed[i * width:(i + 1) * width] for i in range(count)]
        if digests.combine(expected, size) != op.digest:
            return None
        for index in sorted(i for i in self.blocks if i < count):
            start = index * digests.DIGEST_BLOCK
            data = os.pread(fd, min(digests.DIGEST_BLOCK, size - start), start)
            if digests.block_digest(data) != expected[index]:
                return False
        return True


def _touched(op) -> str | None:
    """The file an event touched, for "last file touched" (a device for block events)."""
    if isinstance(op, ev.Rename):
        return op.dst
    return getattr(op, "path", None) or getattr(op, "device", None)


class _Corrupt:
    """A record the log could not return intact; applying it means refusing it."""

    timestamp_ns = 0  # unknown: the record could not be read

    def __init__(self, offset: int, error: CorruptRecord):
        self.offset = offset
        self._error = error

    def event(self):
        raise self._error
