"""The operations that recreate an object on the target as it now is on the source.

Used when an object enters the replication set without a history there: renamed or hard
linked from an excluded part of the tree into the set. As the reference describes, the
target then gets the object's content (a file's data, a directory with everything
beneath it that the rules select) and no link to other names of the same inode.

Everything is read through the root descriptor (never through the FUSE mount, which
would call back into the filesystem that is serving the rename). Sequence per object:
Create (or Symlink), the data extents of a regular file as Writes, Truncate to the size
(keeps trailing holes), extended attributes, then for a directory its selected children,
and last SetAttr with the times (writing content and children changed them).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Iterator

from datatether.engine.capture import Matches
from datatether.engine.events import (Create, FileKind, Operation, SetAttr, SetXattr, Symlink,
                                      Truncate, Write)

# Batches handed to the sink stay around this size, whatever the size of what moved in.
BATCH_BYTES = 8 << 20
# Reading must not change the source's access times (O_NOATIME is allowed to root and owners).
_READ_FLAGS = (os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
               | (os.O_NOATIME if os.geteuid() == 0 else 0))


def sys_path(rel: str) -> bytes:
    """The path to hand to a ``dir_fd=root`` call for an event path ("" is the root)."""
    return os.fsencode(rel) if rel else b"."


def create_op(rel: str, st: os.stat_result) -> Create:
    return Create(rel, FileKind.of_mode(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                  st.st_gid, st.st_atime_ns, st.st_mtime_ns,
                  st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0)


def symlink_op(rel: str, target: bytes, st: os.stat_result) -> Symlink:
    return Symlink(rel, os.fsdecode(target), st.st_uid, st.st_gid, st.st_mtime_ns)


def recreate(root_fd: int, rel: str, matches: Matches, chunk: int) -> Iterator[list[Operation]]:
    """Batches of operations recreating ``rel`` (which must exist) on the target.

    ``chunk`` is the largest Write (settings.max_write_buffer)."""
    batch = _Batch()
    yield from _object(root_fd, rel, os.stat(sys_path(rel), dir_fd=root_fd, follow_symlinks=False),
                       matches, chunk, batch)
    if batch.ops:
        yield batch.take()


class _Batch:
    def __init__(self):
        self.ops: list[Operation] = []
        self.size = 0

    def add(self, op: Operation, size: int = 0) -> bool:
        """Add; True when the batch is full and should be handed over."""
        self.ops.append(op)
        self.size += size
        return self.size >= BATCH_BYTES

    def take(self) -> list[Operation]:
        ops, self.ops, self.size = self.ops, [], 0
        return ops


def _object(root_fd, rel, st, matches, chunk, batch) -> Iterator[list[Operation]]:
    path = sys_path(rel)
    if stat.S_ISLNK(st.st_mode):
        batch.add(symlink_op(rel, os.readlink(path, dir_fd=root_fd), st))
        return
    batch.add(create_op(rel, st))
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return  # FIFO, socket, device node: nothing to read (opening could block or act)
    fd = os.open(path, _READ_FLAGS, dir_fd=root_fd)
    try:
        if stat.S_ISREG(st.st_mode):
            yield from _content(fd, rel, chunk, batch)
        for name in os.listxattr(fd):
            try:
                batch.add(SetXattr(rel, name, os.getxattr(fd, name)))
            except OSError as exc:
                if exc.errno != errno.ENODATA:  # removed meanwhile
                    raise
        if stat.S_ISDIR(st.st_mode):
            for entry in sorted(os.scandir(fd), key=lambda e: os.fsencode(e.name)):
                child = f"{rel}/{entry.name}" if rel else entry.name
                child_st = entry.stat(follow_symlinks=False)
                if matches(child, stat.S_ISDIR(child_st.st_mode)):
                    yield from _object(root_fd, child, child_st, matches, chunk, batch)
    finally:
        os.close(fd)
    if batch.add(SetAttr(rel, atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns)):
        yield batch.take()


def _content(fd, rel, chunk, batch) -> Iterator[list[Operation]]:
    size = os.fstat(fd).st_size
    for start, end in _extents(fd, size):
        for offset in range(start, end, chunk):
            data = os.pread(fd, min(chunk, end - offset), offset)
            if not data:
                break
            if batch.add(Write(rel, offset, data), len(data)):
                yield batch.take()
    batch.add(Truncate(rel, size))


def _extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the data regions of a file; the whole file if holes are unknown."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset
                return
            if exc.errno == errno.EINVAL:  # file system without SEEK_DATA
                yield offset, size
                return
            raise
        yield start, min(end, size)
        offset = end
