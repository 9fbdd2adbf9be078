"""FUSE capture: a stacking filesystem mounted over the protected directory itself.

``FuseCapture.start`` opens the directory (O_PATH) *before* mounting a FUSE filesystem
on the same path. Applications keep their paths; every request reaches ``CaptureFs``,
which performs it on the real tree through that descriptor (``dir_fd=``/``*at`` calls,
never following a final symlink) and, once it succeeded, hands its events to the sink
under the path lock, before the caller gets its answer (engine/capture.py's contract).

What becomes an event (paths relative to the mount root, only what ``matches`` selects):
write -> Write (absolute offset, split at settings.max_write_buffer); truncate, ftruncate
and open(O_TRUNC) -> Truncate; create, mknod, mkdir -> Create; symlink -> Symlink;
unlink -> Unlink; rmdir -> Rmdir; chmod, chown, utimens -> SetAttr; setxattr,
removexattr -> SetXattr, RemoveXattr; fallocate -> Fallocate; fsync, fsyncdir ->
Barrier. Reads, opens and listings produce nothing. Shared writable mmap works: dirty
pages reach ``write`` on msync, munmap and close and become Writes like any other.
A write, truncate or fallocate first drops what the kernel leaves to this filesystem
(set-id bits of an unprivileged caller, security.capability: capture/fuse_killpriv.py),
as SetAttr(mode) and RemoveXattr events before the data change's own.

Times: a Write carries no mtime and a per-write stat would slow the hot path, so the
file's mtime goes out as a SetAttr once per handle after its writes: on flush (every
close), fsync (before the Barrier) or release (after mmap writeback). Truncate and
Fallocate are followed by the mtime at once. Every name change (create, mkdir, mknod,
symlink, link, unlink, rmdir, rename) is followed by the new mtime of the parent
directories in the set. So when the queue is drained and files are closed, the target's
times equal the source's (atime excepted: reading changes it).

Replication semantics (the reference's "Replication capabilities"):
- rename within the set -> Rename (also over an existing object); into the set from an
  excluded part -> the object is recreated there (capture/fuse_recreate.py); out of the
  set -> Unlink, or Rmdir(recursive) for a directory. RENAME_NOREPLACE is honoured;
  RENAME_EXCHANGE and RENAME_WHITEOUT are refused with EINVAL (the log has no atomic swap).
- link with both names in the set -> Link; a new name in the set for a file outside it
  -> the file is recreated under the new name, without a link on the target.
- chmod/chown through a symlink: the kernel resolves the link, so the event names the
  object it reached (when that object is in the set).
- Ignore Delete Operations (settings.ignore_delete_ops): unlink, rmdir and moves out of
  the set still happen on the source; no event is sent for them.
- The set's root is the mountpoint: it cannot be renamed or removed through the mount
  (the kernel refuses with EBUSY). Doing it from outside means unmounting, which stops
  the capture: a gap, so the next start needs a mirror.

Failures: a sink that raises does not fail the operation, which already happened: the
Emitter reports a gap and the connection becomes Mirror Required. A handler that fails
answers with its errno; an unexpected exception is logged (DT-F010) and answered with
EIO; the mount stays up. If the process dies, ``auto_unmount`` removes the mount so
applications keep working on the real directory, uncaptured, until the next start
(which must mirror).

Ownership: the daemon runs as root. Created objects are given to the calling user (and
to the parent's group under a set-group-ID directory), and permission bits that the
daemon's own umask removed are put back, so objects look as if the caller made them.
The kernel checks permissions (default_permissions) before a request gets here. The
mount takes nosuid, nodev and noexec from the mount the directory is on, so set-user-ID
programs and device nodes in the set work as they did before the capture.

Hard links: libfuse's high-level API is path based, so the kernel has an inode per name
of a linked file (the real files stay linked). After a change through one name, the
kernel's cached attributes and pages of the other names are invalidated before the
caller gets its answer (capture/fuse_links.py), so sizes, modes and mmap stay true
through every name.

Known limits: when a directory moves, rules that select differently
beneath its old and new place are not re-evaluated entry by entry, nor are entries
selected beneath a directory the rules do not select (the next verification finds such
differences); a link into the set is not linked to other names of the inode in the set.

Message ids: DT-F020 started, DT-F021 serving loop failed, DT-F022 busy at stop (connection
aborted), DT-F023 stopped, DT-F024 lazy unmount, DT-F025 dead mount removed, DT-F026/F027
connection could not be aborted, DT-F028 mount flags not inherited; DT-F010/F011/F014 in
fuse_session.py; DT-F012/F013 in fuse_killpriv.py; DT-F001..F003 (gaps) in engine/capture.py.
"""

from __future__ import annotations

import atexit
import errno
import os
import re
import stat
import subprocess
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable

from datatether.engine import logs
from datatether.engine.capture import Emitter, GapReport, Matches, Sink, everything, no_gap_report
from datatether.engine.errors import CaptureFailed
from datatether.engine.events import (Barrier, Fallocate, Link, Operation, RemoveXattr, Rename,
                                      Rmdir, SetAttr, SetXattr, Truncate, Unlink, Write)
from datatether.engine.pathlocks import PathLocks
from datatether.engine.settings import Settings

from . import fuse_killpriv, fuse_libc, fuse_links
from .fuse_recreate import create_op, recreate, symlink_op, sys_path
from .fuse_session import MAX_WRITE_LIMIT, Session, Tuning, caller

log = logs.get(__name__)

ORIGIN = "fuse"
FSNAME = "datatether"
# The kernel computes O_APPEND offsets and sends them; the real descriptor must write at
# exactly that offset or the event would name another one. O_DIRECT would demand aligned
# buffers of the real filesystem that requests do not have. Creation flags are set by
# create() itself.
_OPEN_DROP = os.O_APPEND | os.O_DIRECT | os.O_CREAT | os.O_EXCL | os.O_NOCTTY
_OPEN_ADD = os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MIN_WRITE = 128 << 10


@dataclass(frozen=True)
class _Through:
    """Where the events of a change go: ``name`` in the set, or nowhere (None); then
    ``unseen`` says why the set's copy may have changed all the same ("": it did not)."""

    name: str | None
    unseen: str = ""


def _rel(path: bytes) -> str:
    """Event path of a libfuse path (b"/a/b" -> "a/b", b"/" -> "")."""
    return os.fsdecode(path[1:])


def _parent(rel: str) -> str:
    """Event path of the directory holding ``rel`` ("" for the root and its entries)."""
    return rel.rpartition("/")[0]


def _same_file(a: os.stat_result, b: os.stat_result | None) -> bool:
    return b is not None and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _readdir_type(entry: os.DirEntry) -> int:
    """File-type bits of a directory entry from its d_type (0 when unknown)."""
    if entry.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if entry.is_symlink():
        return stat.S_IFLNK
    if entry.is_file(follow_symlinks=False):
        return stat.S_IFREG
    return 0


def process_umask() -> int:
    """This process's umask, read without changing it (os.umask would, for all threads)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


class CaptureFs:
    """The handlers: each operation on the real tree under ``root_fd``, then its events.

    Mutating handlers hold the path locks of every path they change (and of the parent
    directories whose times they report) from before the change until the sink returned,
    so a mirror reading the same paths cannot interleave.
    """

    def __init__(self, root_fd: int, emitter: Emitter, settings: Settings, matches: Matches,
                 locks: PathLocks, umask: int):
        self._root = root_fd
        self._emitter = emitter
        self._matches = matches
        self._locks = locks
        self._chunk = settings.max_write_buffer
        self._keep_deleted = settings.ignore_delete_ops
        self._umask = umask
        self._written: set[int] = set()  # handles whose writes are not followed by their mtime yet
        self._drops = fuse_killpriv.Drops(caller)
        self.links = fuse_links.LinkedNames()  # names of multiply-linked files (fuse_links.py)

    # -- helpers ---------------------------------------------------------------------------

    def _emit(self, ops: Iterable[Operation]) -> None:
        self._emitter.emit(ops)

    def _lstat(self, rel: str) -> os.stat_result:
        return os.stat(sys_path(rel), dir_fd=self._root, follow_symlinks=False)

    def _proc(self, path: bytes) -> bytes:
        """A path reaching the object itself for calls without dir_fd (the xattr calls, used
        with follow_symlinks=False): /proc/self/fd/<root>/<rel>. The magic link lands on
        the real directory under the mount; nothing in it crosses into the mount."""
        return b"/proc/self/fd/%d%s" % (self._root, path if path != b"/" else b"/.")

    def _held(self, *rels: str | None):
        """The path locks of ``rels``; none for an unlinked file (no event, no mirror)."""
        held = [r for r in rels if r is not None]
        return self._locks.hold(*held) if held else nullcontext()

    def _dir_times(self, *rels: str) -> list[Operation]:
        """The mtime of each parent directory of ``rels`` that is in the set: adding or
        removing a name changed it, and the target would otherwise keep its own clock's."""
        ops: list[Operation] = []
        for parent in dict.fromkeys(_parent(r) for r in rels):
            if self._matches(parent, True):
                ops.append(SetAttr(parent, mtime_ns=self._lstat(parent).st_mtime_ns))
        return ops

    def _file_time(self, rel: str, fh: int) -> list[Operation]:
        """The file's mtime once its data changed (writes carry none)."""
        return [SetAttr(rel, mtime_ns=os.fstat(fh).st_mtime_ns)]

    def _settle(self, rel: str, mode: int, fd: int | None = None) -> os.stat_result:
        """Give a new object to the caller and restore the bits the daemon's umask took;
        return its final attributes."""
        path = sys_path(rel)
        st = os.fstat(fd) if fd is not None else self._lstat(rel)
        changed = False
        lost = mode & self._umask & 0o777 & ~st.st_mode
        if lost and not stat.S_ISLNK(st.st_mode):
            new_mode = stat.S_IMODE(st.st_mode) | lost
            os.fchmod(fd, new_mode) if fd is not None else os.chmod(path, new_mode, dir_fd=self._root)
            changed = True
        uid, gid, _ = caller()
        if self._lstat(_parent(rel)).st_mode & stat.S_ISGID:
            gid = st.st_gid  # the object took the directory's group, as it must
        if (uid, gid) != (st.st_uid, st.st_gid):
            os.chown(path, uid, gid, dir_fd=self._root, follow_symlinks=False)
            changed = True
        if not changed:
            return st
        return os.fstat(fd) if fd is not None else self._lstat(rel)

    @staticmethod
    def _removal(rel: str, is_dir: bool) -> Operation:
        return Rmdir(rel, recursive=True) if is_dir else Unlink(rel)

    # -- attributes and listings (no events) ------------------------------------------------

    def getattr(self, path, fh):
        if fh is not None:
            st = os.fstat(fh)
        elif path is None:
            raise OSError(errno.ENOENT, "unlinked")
        else:
            st = self._lstat(_rel(path))
        if path is not None and (st.st_nlink > 1 or self.links.active):
            self.links.seen(path, st)
        return st

    def readlink(self, path):
        return os.readlink(sys_path(_rel(path)), dir_fd=self._root)

    def access(self, path, mask):
        if not os.access(sys_path(_rel(path)), mask, dir_fd=self._root, follow_symlinks=False):
            raise OSError(errno.EACCES, "access")

    def statfs(self, path):
        return os.statvfs(self._root)

    def getxattr(self, path, name):
        return os.getxattr(self._proc(path), name, follow_symlinks=False)

    def listxattr(self, path):
        return [os.fsencode(n) for n in os.listxattr(self._proc(path), follow_symlinks=False)]

    def opendir(self, path):
        return os.open(sys_path(_rel(path)), _DIR_FLAGS, dir_fd=self._root)

    def readdir(self, path, fh):
        yield b".", os.fstat(fh).st_ino, stat.S_IFDIR
        yield b"..", self._parent_ino(path, fh), stat.S_IFDIR
        with os.scandir(fh) as entries:
            for entry in entries:
                yield os.fsencode(entry.name), entry.inode(), _readdir_type(entry)

    def _parent_ino(self, path, fh: int) -> int:
        """The inode of a listed directory's parent, found by walking down from the real
        root. Never ``..`` from the directory: ``..`` of a top-level directory lands on the
        set's root, which this mount covers, so the lookup would come back to this
        filesystem as a request of its own, from inside a handler: with every worker busy
        that way, or with the daemon being killed, it is never answered."""
        if path is None:
            return os.fstat(fh).st_ino  # removed while listed: no parent to name
        rel = _rel(path)
        if rel == "":
            return os.stat(b"..", dir_fd=self._root).st_ino  # outside the set
        return self._lstat(_parent(rel)).st_ino

    def releasedir(self, path, fh):
        os.close(fh)

    # -- file data ---------------------------------------------------------------------------

    def open(self, path, flags):
        if flags & os.O_TRUNC:
            # Atomic O_TRUNC: the kernel sends no truncate of its own, so this is the one,
            # with everything a truncate owes (a name of the set for a name outside it,
            # privilege drops, the other names' caches). The real open then leaves O_TRUNC
            # out: it could cut what a writer wrote in between, without an event.
            self.truncate(path, 0, None)
        return os.open(sys_path(_rel(path)), (flags & ~(_OPEN_DROP | os.O_TRUNC)) | _OPEN_ADD, dir_fd=self._root)

    def create(self, path, mode, flags):
        rel = _rel(path)
        with self._locks.hold(rel, _parent(rel)):
            fd = os.open(sys_path(rel), (flags & ~_OPEN_DROP) | _OPEN_ADD | os.O_CREAT | os.O_EXCL,
                         mode, dir_fd=self._root)
            try:
                st = self._settle(rel, mode, fd)
            except OSError:
                os.close(fd)
                raise
            self._emit(([create_op(rel, st)] if self._matches(rel, False) else []) + self._dir_times(rel))
        return fd

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def lseek(self, path, offset, whence, fh):
        """SEEK_DATA and SEEK_HOLE (the kernel answers the other whences itself): from the
        real file, so programs reading through the mount (cp, tar, the mirror of another
        tool) see its holes. Moving the handle's position is harmless: the capture only
        uses pread and pwrite on it."""
        if fh is not None:
            return os.lseek(fh, offset, whence)
        fd = os.open(sys_path(_rel(path)), os.O_RDONLY | _OPEN_ADD, dir_fd=self._root)
        try:
            return os.lseek(fd, offset, whence)
        finally:
            os.close(fd)

    def write(self, path, data, offset, fh):
        rel = None if path is None else _rel(path)
        if rel is None or not self._matches(rel, False):  # unlinked meanwhile, or not in the set
            through = self._set_name(rel, os.fstat(fh))
            with self._held(through.name):
                self._drops.before_change(None, fh)
                n = os.pwrite(fh, data, offset)
                self._linked_change(path, fh)
                if through.name is not None:
                    self._emit(self._writes(through.name, offset, data, n)
                               + [SetAttr(through.name, mtime_ns=os.fstat(fh).st_mtime_ns)])
            self._unseen(through)
            return n
        with self._locks.hold(rel):
            ops = self._drops.before_change(rel, fh)
            n = os.pwrite(fh, data, offset)
            self._emit(ops + self._writes(rel, offset, data, n))
            self._written.add(fh)
            self._linked_change(path, fh)
        return n

    def _writes(self, rel: str, offset: int, data, n: int) -> list[Operation]:
        """The Write events of ``n`` bytes of ``data`` written at ``offset`` (split at the
        maximum write buffer)."""
        chunk = self._chunk
        if n <= chunk:
            return [Write(rel, offset, data if n == len(data) else data[:n])]
        view = memoryview(data)
        return [Write(rel, offset + i, view[i:min(i + chunk, n)]) for i in range(0, n, chunk)]

    def _set_name(self, rel: str | None, st: os.stat_result) -> _Through:
        """For a change through ``rel`` (not in the set; None: unlinked) to the file ``st``
        describes: which name of the file in the set its events go to. Another name may
        be in the set only for a regular file with links besides ``rel``; one name of the
        set is enough (the target keeps the set's names linked). When none is known but
        some names of the file were never seen through this mount, its copy in the set
        may have changed unseen (reported to ``_unseen``, so the connection remirrors)."""
        links = st.st_nlink - (rel is not None)  # names other than the one the change came through
        if not stat.S_ISREG(st.st_mode) or links < 1:
            return _Through(None)  # the common case, at the cost of the fstat alone
        own = None if rel is None else b"/" + os.fsencode(rel)
        others = self.links.names(st) - {own}
        for other in sorted(_rel(name) for name in others):
            if self._matches(other, False):
                return _Through(other)
        if len(others) >= links:
            return _Through(None)  # every other name is known, and none is in the set
        return _Through(None, f"{rel or 'an unlinked name'}, outside the set, changed a file whose other "
                              "names are not known")

    def _unseen(self, through: _Through) -> None:
        if through.unseen:
            self._emitter.unseen(through.unseen)

    def _linked_change(self, path, fd: int) -> None:
        """After the data of ``fd`` changed: the kernel's cache of its other names."""
        if self.links.active:
            self.links.changed(path, os.fstat(fd))

    def _pending_time(self, rel: str | None, fh: int) -> list[Operation]:
        """After writes through ``fh``: the file's mtime, once (call under the path lock)."""
        if fh not in self._written:
            return []
        self._written.discard(fh)
        return [] if rel is None else self._file_time(rel, fh)

    def _report_time(self, path, fh) -> None:
        if fh in self._written:
            rel = None if path is None else _rel(path)
            with self._held(rel):
                self._emit(self._pending_time(rel, fh))

    def flush(self, path, fh):
        self._report_time(path, fh)

    def release(self, path, fh):
        try:
            self._report_time(path, fh)
        finally:
            self._drops.forget(fh)
            os.close(fh)

    def fsync(self, path, datasync, fh):
        self._sync(path, fh, datasync, False)

    def fsyncdir(self, path, datasync, fh):
        self._sync(path, fh, datasync, True)

    def _sync(self, path, fh, datasync, is_dir):
        """fsync, then the file's pending mtime and a Barrier."""
        (os.fdatasync if datasync else os.fsync)(fh)
        rel = None if path is None else _rel(path)
        with self._held(rel):
            ops = self._pending_time(rel, fh)
            if rel is not None and self._matches(rel, is_dir):
                ops.append(Barrier(rel))
            self._emit(ops)

    def _data_change(self, path, fh, change, op) -> None:
        """Drop privileges, run ``change(fd)`` under the lock, then emit the drops,
        ``op(rel)`` and the new mtime (for a name outside the set: ``op`` of the file's
        name in the set, if any, see ``_set_name``)."""
        rel = None if path is None else _rel(path)
        matched = rel is not None and self._matches(rel, False)
        fd = fh if fh is not None else os.open(sys_path(rel), os.O_WRONLY | _OPEN_ADD | os.O_NONBLOCK,
                                               dir_fd=self._root)
        try:
            through = _Through(rel) if matched else self._set_name(rel, os.fstat(fd))
            with self._held(rel, through.name):
                ops = self._drops.before_change(rel if matched else None, fd, handle=fh is not None)
                change(fd)
                self._linked_change(path, fd)
                if through.name is not None:
                    ops += [op(through.name), SetAttr(through.name, mtime_ns=os.fstat(fd).st_mtime_ns)]
                self._emit(ops)
            self._unseen(through)
        finally:
            if fh is None:
                os.close(fd)

    def truncate(self, path, size, fh):
        self._data_change(path, fh, lambda fd: os.ftruncate(fd, size), lambda rel: Truncate(rel, size))

    def fallocate(self, path, mode, offset, length, fh):
        self._data_change(path, fh, lambda fd: fuse_libc.fallocate(fd, mode, offset, length),
                          lambda rel: Fallocate(rel, mode, offset, length))

    # -- attributes ----------------------------------------------------------------------------

    def _set_attr(self, path, fh, change, event) -> None:
        """Run ``change()`` under the lock, then emit ``event(rel, st)`` built from the
        attributes after the change (so UTIME_NOW becomes the time actually set)."""
        rel = None if path is None else _rel(path)
        through = _Through(rel)
        if rel is not None:
            before = os.fstat(fh) if fh is not None else self._lstat(rel)
            if not self._matches(rel, stat.S_ISDIR(before.st_mode)):
                through = self._set_name(rel, before)  # links do not change with attributes
        with self._held(rel, through.name):
            change()
            if rel is None:
                return
            st = os.fstat(fh) if fh is not None else self._lstat(rel)
            self.links.changed(path, st)
            if through.name is not None:
                self._emit([event(through.name, st)])
        self._unseen(through)

    def chmod(self, path, mode, fh):
        def change():
            self._drops.changed()  # may set a set-id bit
            if fh is not None:
                os.fchmod(fh, mode)
                return
            try:
                os.chmod(sys_path(_rel(path)), mode, dir_fd=self._root, follow_symlinks=False)
            except (NotImplementedError, ValueError):  # a symlink: Linux has no lchmod
                raise OSError(errno.EOPNOTSUPP, "symlinks have no mode") from None
        self._set_attr(path, fh, change, lambda rel, st: SetAttr(rel, mode=stat.S_IMODE(st.st_mode)))

    def chown(self, path, uid, gid, fh):
        def change():
            if fh is not None:
                os.fchown(fh, uid, gid)
            else:
                os.chown(sys_path(_rel(path)), uid, gid, dir_fd=self._root, follow_symlinks=False)
        # The mode goes too: a chown may clear set-id bits (even one changing nothing),
        # and the target's chown, skipped or not, must end with the source's mode.
        self._set_attr(path, fh, change, lambda rel, st: SetAttr(
            rel, mode=stat.S_IMODE(st.st_mode), uid=None if uid == -1 else st.st_uid, gid=None if gid == -1 else st.st_gid))

    def utimens(self, path, times, fh):
        def change():
            if fh is not None:
                fuse_libc.futimens(fh, times)
            else:
                fuse_libc.utimensat(self._root, sys_path(_rel(path)), times)
        omit_a = times is not None and times[0][1] == fuse_libc.UTIME_OMIT
        omit_m = times is not None and times[1][1] == fuse_libc.UTIME_OMIT
        self._set_attr(path, fh, change, lambda rel, st: SetAttr(
            rel, atime_ns=None if omit_a else st.st_atime_ns, mtime_ns=None if omit_m else st.st_mtime_ns))

    def _xattr_change(self, path, change, op) -> None:
        rel = _rel(path)
        before = self._lstat(rel)
        through = (_Through(rel) if self._matches(rel, stat.S_ISDIR(before.st_mode))
                   else self._set_name(rel, before))
        with self._held(rel, through.name):
            self._drops.changed()  # may set security.capability
            change()
            if through.name is not None:
                self._emit([op(through.name)])
        self._unseen(through)

    def setxattr(self, path, name, value, flags):
        self._xattr_change(path, lambda: os.setxattr(self._proc(path), name, value, flags, follow_symlinks=False),
                           lambda rel: SetXattr(rel, os.fsdecode(name), value))

    def removexattr(self, path, name):
        self._xattr_change(path, lambda: os.removexattr(self._proc(path), name, follow_symlinks=False),
                           lambda rel: RemoveXattr(rel, os.fsdecode(name)))

    # -- names -----------------------------------------------------------------------------------

    def _new_name(self, path, is_dir, make, settle_mode, op) -> None:
        """Create an object with ``make(sys_path)``, give it to the caller, emit ``op(rel, st)``
        and the parent's new mtime."""
        rel = _rel(path)
        with self._locks.hold(rel, _parent(rel)):
            make(sys_path(rel))
            st = self._settle(rel, settle_mode)
            self._emit(([op(rel, st)] if self._matches(rel, is_dir) else []) + self._dir_times(rel))

    def mknod(self, path, mode, rdev):
        self._new_name(path, False, lambda p: os.mknod(p, mode, rdev, dir_fd=self._root), mode, create_op)

    def mkdir(self, path, mode):
        self._new_name(path, True, lambda p: os.mkdir(p, mode, dir_fd=self._root), mode, create_op)

    def symlink(self, target, path):
        self._new_name(path, False, lambda p: os.symlink(target, p, dir_fd=self._root), 0,
                       lambda rel, st: symlink_op(rel, target, st))

    def _remove(self, path, is_dir, remove) -> None:
        rel = _rel(path)
        with self._locks.hold(rel, _parent(rel)):
            linked = self._lstat(rel) if self.links.active and not is_dir else None
            remove(sys_path(rel), dir_fd=self._root)
            if linked is not None:
                self.links.removed(path, linked)
                self.links.changed(path, linked)  # the other names' link count
            keep = self._keep_deleted or not self._matches(rel, is_dir)
            self._emit(([] if keep else [Rmdir(rel) if is_dir else Unlink(rel)]) + self._dir_times(rel))

    def unlink(self, path):
        self._remove(path, False, os.unlink)

    def rmdir(self, path):
        self._remove(path, True, os.rmdir)

    def rename(self, old, new, flags):
        if flags & ~fuse_libc.RENAME_NOREPLACE:
            raise OSError(errno.EINVAL, "RENAME_EXCHANGE and RENAME_WHITEOUT are not supported")
        src, dst = _rel(old), _rel(new)
        with self._locks.hold(src, dst, _parent(src), _parent(dst)):
            src_st = self._lstat(src)
            is_dir = stat.S_ISDIR(src_st.st_mode)
            was_in, now_in = self._matches(src, is_dir), self._matches(dst, is_dir)
            replaced = self._kind_at(dst) if now_in and not was_in else None
            replacing = self._lstat_or_none(dst) if self.links.active else None
            if flags:
                fuse_libc.renameat2(self._root, sys_path(src), self._root, sys_path(dst), flags)
            else:
                os.rename(sys_path(src), sys_path(dst), src_dir_fd=self._root, dst_dir_fd=self._root)
            if self.links.active and not _same_file(src_st, replacing):  # else rename changes nothing
                if replacing is not None:
                    self.links.removed(new, replacing)
                self.links.renamed(old, new, src_st)
            ops: list[Operation] = []
            if was_in and now_in:
                ops.append(Rename(src, dst))
            elif now_in:
                if replaced is not None and self._matches(dst, replaced):
                    self._emit([self._removal(dst, replaced)])
                self._recreate(dst)
            elif was_in and not self._keep_deleted:
                ops.append(self._removal(src, is_dir))
            self._emit(ops + self._dir_times(src, dst))

    def _lstat_or_none(self, rel: str) -> os.stat_result | None:
        try:
            return self._lstat(rel)
        except FileNotFoundError:
            return None

    def _kind_at(self, rel: str) -> bool | None:
        """Is there a directory (True), another object (False) or nothing (None) at rel?"""
        st = self._lstat_or_none(rel)
        return None if st is None else stat.S_ISDIR(st.st_mode)

    def link(self, existing, new):
        src, dst = _rel(existing), _rel(new)
        with self._locks.hold(src, dst, _parent(dst)):
            os.link(sys_path(src), sys_path(dst), src_dir_fd=self._root, dst_dir_fd=self._root,
                    follow_symlinks=False)
            st = self._lstat(dst)
            self.links.seen(existing, st)  # the kernel knows the old name from before the link
            self.links.seen(new, st)
            self.links.changed(new, st)  # the other names' link count
            ops: list[Operation] = []
            if self._matches(dst, False):
                if self._matches(src, False):
                    ops.append(Link(src, dst))
                else:
                    self._recreate(dst)
            self._emit(ops + self._dir_times(dst))

    def _recreate(self, rel: str) -> None:
        for batch in recreate(self._root, rel, self._matches, self._chunk):
            self._emit(batch)


class FuseCapture:
    """A live FUSE capture of ``root`` (the replication set's root directory).

    ``FuseCapture(root, sink, settings, matches=..., locks=..., on_gap=...)``:
    - ``sink(events)``: see engine/capture.py (called under ``locks``; may raise).
    - ``matches(rel_path, is_dir)``: the set's rules on event paths ("" is the root).
    - ``locks``: the PathLocks shared with the mirror of the same connection.
    - ``on_gap(reason)``: called when the sink failed (the connection needs a mirror).
    - ``tuning``: kernel caching and threads (fuse_session.Tuning); max_write defaults
      to settings.max_write_buffer, at least 128 KiB and at most 1 MiB.

    ``start()`` mounts and returns once requests are served; ``stop()`` unmounts (lazily
    when busy), waits up to ``stop_grace_s`` for open files to be closed, then aborts the
    connection (remaining open descriptors fail with ENOTCONN) so it never hangs.

    The handlers run in this process and need its GIL, so this process must leave the
    mounted tree to others: the sink and ``on_gap`` must not touch it (nor call stop()),
    and code here must not touch pages of a file of the mount mapped into memory (a page
    fault would wait for a handler that waits for the GIL). Plain reads and writes from
    this process work (they release the GIL), which is what the tests use.
    """

    origin = ORIGIN

    def __init__(self, root: str | os.PathLike, sink: Sink, settings: Settings | None = None, *,
                 matches: Matches = everything, locks: PathLocks | None = None,
                 on_gap: GapReport = no_gap_report, tuning: Tuning | None = None,
                 start_timeout_s: float = 10.0, stop_grace_s: float = 5.0):
        self.root = os.path.realpath(os.fspath(root))  # as /proc/self/mountinfo shows it
        self.settings = settings or Settings()
        self.emitter = Emitter(sink, ORIGIN, on_gap)
        self.matches = matches
        self.locks = locks or PathLocks()
        max_write = min(max(self.settings.max_write_buffer, _MIN_WRITE), MAX_WRITE_LIMIT)
        self.tuning = tuning or Tuning(max_write=max_write)
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self._root_fd: int | None = None
        self._session: Session | None = None
        self._fs: CaptureFs | None = None
        self._thread: threading.Thread | None = None
        self._dev: int | None = None
        self._lifecycle = threading.RLock()  # start and stop may come from different threads

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def gaps(self) -> int:
        return self.emitter.gaps

    def __enter__(self) -> "FuseCapture":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _fail(self, detail: str) -> CaptureFailed:
        return CaptureFailed(backend=ORIGIN, root=self.root, detail=detail)

    def start(self) -> None:
        with self._lifecycle:
            if self.running:
                raise self._fail("already running")
            self._clear_stale_mount()
            self._mount()
            atexit.register(self.stop)  # a forgotten stop() must not leave the mount to a dying process
        log.info("capture started", msgid="DT-F020", root=self.root, max_write=self.tuning.max_write)

    def _mount(self) -> None:
        try:
            root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise self._fail(f"cannot open the directory: {exc.strerror}") from None
        fs = CaptureFs(root_fd, self.emitter, self.settings, self.matches, self.locks, process_umask())
        options = ["allow_other", "default_permissions", f"fsname={FSNAME}", f"subtype={FSNAME}",
                   "auto_unmount"]
        session = Session(fs, self.root, options, self.tuning)
        try:
            session.mount()
        except OSError as exc:
            os.close(root_fd)
            raise self._fail(f"{exc.strerror} (libfuse's reason is on stderr)") from None
        fs.links.attach(session.invalidate)
        self._root_fd, self._session, self._fs = root_fd, session, fs
        self._thread = threading.Thread(target=self._serve, name=f"fuse-capture {self.root}", daemon=True)
        self._thread.start()
        if not session.ready.wait(self.start_timeout_s) or not self._await_mounted():
            self.stop()
            raise self._fail(f"mount did not come up within {self.start_timeout_s} s")
        self._inherit_mount_flags()

    def _inherit_mount_flags(self) -> None:
        """Give the capture mount the set-id, device and exec rules of the mount the
        directory is on. fusermount3 mounts nosuid,nodev and exec whatever that mount
        says: set-user-ID programs and device nodes in the set would stop working for as
        long as it is captured, and a noexec directory would become executable."""
        under = os.statvfs(self._root_fd).f_flag
        flags = fuse_libc.MS_RELATIME
        for st_flag, ms_flag in ((os.ST_NOSUID, fuse_libc.MS_NOSUID), (os.ST_NODEV, fuse_libc.MS_NODEV),
                                 (os.ST_NOEXEC, fuse_libc.MS_NOEXEC)):
            if under & st_flag:
                flags |= ms_flag
        try:
            fuse_libc.remount_bind(self.root, flags)
        except OSError as exc:
            log.warning("capture mount keeps fusermount3's nosuid,nodev", msgid="DT-F028", root=self.root,
                        error=exc.strerror)

    def _serve(self) -> None:
        try:
            self._session.serve()
        except BaseException as exc:  # the thread must end cleanly for stop() to join it
            log.error("fuse loop failed", msgid="DT-F021", root=self.root, error=repr(exc))

    def _await_mounted(self) -> bool:
        """Wait until the path shows the mount (the kernel answered INIT before that)."""
        deadline = time.monotonic() + self.start_timeout_s
        under = os.fstat(self._root_fd).st_dev
        while time.monotonic() < deadline:
            dev = os.stat(self.root).st_dev
            if dev != under:
                self._dev = dev
                return True
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        with self._lifecycle:
            if self._session is None:
                return
            if self.running:
                self._unmount()
                self._thread.join(self.stop_grace_s)
                if self._thread.is_alive():
                    self._abort()
            self._fs.links.close()
            os.close(self._root_fd)
            self._root_fd = self._session = self._thread = self._fs = None
            atexit.unregister(self.stop)
        log.info("capture stopped", msgid="DT-F023", root=self.root, gaps=self.gaps)

    def _unmount(self) -> None:
        done = subprocess.run(["fusermount3", "-u", "-q", self.root], capture_output=True, text=True)
        if done.returncode != 0 and self._is_our_mount():
            log.info("capture busy, unmounting lazily", msgid="DT-F024", root=self.root,
                     reason=done.stderr.strip())
            subprocess.run(["fusermount3", "-u", "-z", "-q", self.root], capture_output=True)

    def _abort(self) -> None:
        """End the kernel connection (fusectl), failing whatever still uses the unmounted
        capture, so stop() never waits for another process to close its files."""
        log.warning("open files keep the unmounted capture busy: aborting the connection",
                    msgid="DT-F022", root=self.root, grace_s=self.stop_grace_s)
        connections = "/sys/fs/fuse/connections"
        try:
            if not os.listdir(connections):
                subprocess.run(["mount", "-t", "fusectl", "fusectl", connections], capture_output=True)
            dev = self._dev
            with open(f"{connections}/{(os.major(dev) << 20) | os.minor(dev)}/abort", "w") as f:
                f.write("1")
        except OSError as exc:
            log.error("cannot abort the capture's connection", msgid="DT-F026", root=self.root,
                      error=str(exc))
        self._thread.join(self.stop_grace_s)
        if self._thread.is_alive():  # still serving open files: their events may still come
            log.error("capture connection still busy; leaving it", msgid="DT-F027", root=self.root)

    def _mounts(self) -> list[tuple[str, str]]:
        """(mount point, file system type) of every mount this process sees."""
        result = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split(" - ")
                point = _unescape(fields[0].split()[4])
                result.append((point, fields[1].split()[0]))
        return result

    def _is_our_mount(self) -> bool:
        return (self.root, f"fuse.{FSNAME}") in self._mounts()

    def _clear_stale_mount(self) -> None:
        """A capture that died without unmounting leaves a dead mount on the directory
        (ENOTCONN, or ECONNABORTED once aborted): remove it. A live one belongs to
        another capture and is refused."""
        if not self._is_our_mount():
            return
        try:
            os.statvfs(self.root)  # always asks the server (a stat may come from the cache)
        except OSError as exc:
            if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                log.warning("removing a dead capture mount", msgid="DT-F025", root=self.root)
                subprocess.run(["fusermount3", "-u", "-z", "-q", self.root], capture_output=True)
                return
        else:
            # The dead capture's auto_unmount helper may have removed the mount in between:
            # statvfs then answered for the directory itself.
            if not self._is_our_mount():
                return
        raise self._fail("another capture is already mounted there")


def _unescape(field: str) -> str:
    """Mount points in mountinfo escape space, tab, newline and backslash as \\ooo."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]),
                              field.encode("utf-8", "surrogateescape")))
