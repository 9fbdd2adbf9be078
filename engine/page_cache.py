"""How the log keeps its footprint in the page cache small: write-once, read-once data.

A log segment is written once and, normally, read once soon after (by the applier). Left
to the kernel, every byte of it stays cached until memory pressure evicts it, so a 2 GB
mirror grows the page cache by 2 GB of log besides the 2 GB of the target: it pushes the
protected server's own data out of memory, and every page of it is a new allocation. On
this project's development VM a newly allocated page costs about 3 us (the host backs
guest memory on first touch, and takes back what the guest leaves free): writing 2 GB
took 5.9-6.2 s that way and 1.0-1.3 s when the writer recycled a bounded window of pages.

``Window`` is that bound, for one file written sequentially: behind the writer it starts
write-back early (``sync_file_range`` without waiting), and drops pages from the cache
once they are far enough behind to be written back. ``drop_read`` lets a reader drop what
it has consumed. Dropping is only advice (``POSIX_FADV_DONTNEED``): the kernel keeps any
page still dirty or under write-back, and a later read of a dropped page reads it back
from the disk. Nothing here changes what a file holds or when it is durable.
"""

from __future__ import annotations

import ctypes
import os

PAGE = os.sysconf("SC_PAGE_SIZE")
FLUSH_BYTES = 8 << 20    # write-back is started for every this many bytes written
# The newest bytes of a file kept cached for its reader. A mirror's producer may run
# hundreds of MiB ahead of its applier, which should not have to read back from the disk
# what it is about to apply; the reader's own drops recycle most pages long before this.
KEEP_BYTES = 512 << 20
READ_LAG_BYTES = 2 * FLUSH_BYTES  # how far behind its reader a file's pages are dropped

_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start write-back of dirty pages, do not wait
_sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_sync_file_range.restype = ctypes.c_int


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing back [offset, offset+length); returns at once
    (it may wait for room in the device's queue). Errors are ignored: write-back is then
    the kernel's usual, later one, and durability is fsync's business anyway."""
    _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def drop(fd: int, offset: int, length: int) -> None:
    """Advise the kernel to drop the clean cached pages of [offset, offset+length)."""
    if length > 0:
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # advice only: a file system that refuses it keeps its pages


def drop_read(fd: int, dropped: int, consumed: int) -> int:
    """A reader has consumed the file up to ``consumed`` and dropped up to ``dropped``:
    drop the whole pages between ``dropped`` and READ_LAG_BYTES before ``consumed``, once
    there are FLUSH_BYTES of them (one call per that much data). Returns the new
    ``dropped``. The lag lets write-back, which the writer starts every FLUSH_BYTES,
    finish first: a page still dirty when its drop is advised stays cached."""
    return _drop_upto(fd, dropped, consumed - READ_LAG_BYTES)


def _drop_upto(fd: int, dropped: int, end: int) -> int:
    """Drop the whole pages of [dropped, end) once they are FLUSH_BYTES or more; return
    how far the file is dropped now."""
    end = end // PAGE * PAGE
    if end - dropped < FLUSH_BYTES:
        return dropped
    drop(fd, dropped, end - dropped)
    return end


class Window:
    """The cache window behind the writer of one sequentially written file.

    Invariant: write-back has been started for [0, flushed); drop advice has been given
    for [0, dropped), and dropped <= flushed - KEEP_BYTES (the newest KEEP_BYTES stay
    cached for a reader that follows the writer closely)."""

    __slots__ = ("flushed", "dropped")

    def __init__(self) -> None:
        self.flushed = 0
        self.dropped = 0

    def written(self, fd: int, size: int) -> None:
        """The file now holds ``size`` bytes."""
        if size - self.flushed < FLUSH_BYTES:
            return
        start_writeback(fd, self.flushed, size - self.flushed)
        self.flushed = size
        self.dropped = _drop_upto(fd, self.dropped, size - KEEP_BYTES)

    def closing(self, fd: int, size: int) -> None:
        """The writer is done with the file: start write-back of the rest, so that its
        reader's drops find clean pages."""
        if size > self.flushed:
            start_writeback(fd, self.flushed, size - self.flushed)
            self.flushed = size
