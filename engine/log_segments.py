"""Segment files of the embedded log: where its large records live, beside RocksDB.

RocksDB writes every value at least twice (its write-ahead log, then a table file at
flush, and again at each compaction) and checksums each pass with a crc32c that the
rocksdict wheels compute in software (about 1.5 GB/s here). For a mirror, whose records
are file data, that was most of the cost of the log. So a record whose sealed frame
is at least ``MIN_BYTES`` is written once, with one ``pwritev``, to the end of an
append-only segment file of its partition, and RocksDB stores a small *pointer* to it in
the same atomic WriteBatch that would have held the frame (engine/log_embedded.py).

Layout::

    <log>/segments/<partition>.p/<first offset, 20 digits>.seg

A segment is named after the offset of the first record written to it; appends go to the
newest segment of the partition opened by this process (a new one after ``ROLL_BYTES``
or after the log is opened again, so a crashed writer's torn tail is never appended
to). Entry: the record's offset (8 bytes, big-endian) then its sealed frame
(engine/frame.py). Pointer stored in RocksDB (27 bytes)::

    b"DS" version(1) segment(8) position(8) length(8)

Invariants:
- An entry is written before the WriteBatch that points to it. A crash between the two
  leaves bytes no pointer names (the tail of a segment no later append uses, or a segment
  the next append at the same offset truncates: its name is the offset the log had not
  yet assigned).
- ``read`` returns a frame only when the entry at the pointer lies within its segment and
  carries the record's own offset and the pointed length; the caller then checks the seal. A pointer naming the
  wrong place can therefore never pass another record off as this one.
- Retention deletes a segment once every record in it is below the partition's start,
  i.e. when the next segment's name is at or below the start; the newest segment when the
  offset after its last entry (known to the process writing it; otherwise the partition's
  end) is. A reader in another process that still has it open keeps reading it (unlinked
  files stay readable) until it learns that the start moved, and then closes it
  (``release_removed``: an open file keeps its disk space); one that opens it too late
  gets FileNotFoundError, which the log reports as OffsetOutOfRange when the record is
  now below the start.
- Durability is the log's: entries are in the operating system's hands once written
  (a killed process loses nothing); with ``sync`` they are fdatasynced (and a new
  segment's directory entry fsynced) before the pointer is written.
"""

from __future__ import annotations

import os
import shutil
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

from . import page_cache
from .durable import fsync_dir

MIN_BYTES = 16 << 10     # sealed frames at least this large go to a segment
ROLL_BYTES = 256 << 20   # a segment this large is closed, the next append starts another
MAGIC = b"DS"
VERSION = 1
POINTER = struct.Struct(">2sBqqq")
_OFFSET = struct.Struct(">q")
_IOV_MAX = 1000          # iovecs per pwritev (the kernel allows 1024)
_OPEN_READERS = 32       # segment descriptors kept open for reading


def is_pointer(stored: bytes) -> bool:
    """Whether a stored value is a pointer rather than a sealed frame. A damaged pointer of
    another length is taken for a frame, whose check then refuses it."""
    return len(stored) == POINTER.size and stored[:2] == MAGIC


def frame_length(pointer: bytes) -> int:
    """Length of the sealed frame a pointer names."""
    return POINTER.unpack(pointer)[4] - _OFFSET.size


class _Tail:
    """The segment a partition appends to in this process."""

    __slots__ = ("segment", "fd", "size", "next", "cache")

    def __init__(self, segment: int, fd: int):
        self.segment, self.fd, self.size = segment, fd, 0
        self.next = segment  # the offset after the last entry written to it
        self.cache = page_cache.Window()


class _Reader:
    """An open segment, and how far its reader has dropped what it read from the cache."""

    __slots__ = ("fd", "dropped")

    def __init__(self, fd: int):
        self.fd, self.dropped = fd, 0


class Segments:
    """The segment files of one log directory. Writers call ``write`` under the
    partition's lock (one writer per partition); ``read`` may be called by any thread."""

    def __init__(self, root: Path, *, sync: bool = False):
        self.root = root
        self.sync = sync
        self._tails: dict[str, _Tail] = {}
        self._readers: OrderedDict[tuple[str, int], _Reader] = OrderedDict()
        self._readers_lock = threading.Lock()

    def folder(self, partition: str) -> Path:
        # A suffix, since "." and ".." are valid partition names but not folder names.
        return self.root / f"{partition}.p"

    def path(self, partition: str, segment: int) -> Path:
        return self.folder(partition) / f"{segment:020d}.seg"

    # -- writing -------------------------------------------------------------------------

    def write(self, partition: str, entries: Sequence[tuple[int, Sequence[bytes]]]) -> list[bytes]:
        """Write ``(offset, frame parts)`` entries in order; return their pointers.

        The parts of one entry, concatenated, are its sealed frame (the caller seals
        without copying the value, engine/frame.header)."""
        pointers: list[bytes] = []
        iov: list[bytes] = []
        tail = self._tails.get(partition)
        start = 0 if tail is None else tail.size
        for offset, parts in entries:
            length = _OFFSET.size + sum(len(p) for p in parts)
            if tail is None or (tail.size and tail.size + length > ROLL_BYTES):
                self._pwritev(tail, iov, start)
                iov = []
                tail = self._roll(partition, offset)
                start = 0
            pointers.append(POINTER.pack(MAGIC, VERSION, tail.segment, tail.size, length))
            iov.append(_OFFSET.pack(offset))
            iov.extend(parts)
            tail.size += length
            tail.next = offset + 1
            if len(iov) >= _IOV_MAX:
                self._pwritev(tail, iov, start)
                iov, start = [], tail.size
        self._pwritev(tail, iov, start)
        if tail is not None and self.sync:
            os.fdatasync(tail.fd)
        return pointers

    def _roll(self, partition: str, offset: int) -> _Tail:
        """Close the partition's segment (if any) and start one named ``offset``."""
        old = self._tails.pop(partition, None)
        if old is not None:
            if self.sync:
                os.fdatasync(old.fd)
            old.cache.closing(old.fd, old.size)
            os.close(old.fd)
        folder = self.folder(partition)
        folder.mkdir(parents=True, exist_ok=True)
        # O_TRUNC: a segment of this name can only hold a crashed writer's unreferenced
        # bytes, since its name is an offset the log had not assigned yet.
        fd = os.open(self.path(partition, offset), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        if self.sync:
            fsync_dir(folder)
        tail = self._tails[partition] = _Tail(offset, fd)
        return tail

    @staticmethod
    def _pwritev(tail: _Tail | None, iov: list[bytes], position: int) -> None:
        views = [memoryview(b) for b in iov]
        while views:
            written = os.pwritev(tail.fd, views, position)
            position += written
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if written:
                views[0] = views[0][written:]
        if tail is not None:
            tail.cache.written(tail.fd, position)

    # -- reading -------------------------------------------------------------------------

    def read(self, partition: str, offset: int, pointer: bytes, head: int) -> tuple[bytes, bytes]:
        """The sealed frame of the record at ``offset`` (not yet checked) in two reads: its
        first ``head`` bytes, then the rest, which a large payload is, so that it comes
        from the kernel as the bytes object it is returned as (no copy). Raises
        FileNotFoundError when its segment is gone, ValueError when the pointer or the
        entry does not belong to this record."""
        magic, version, segment, position, length = POINTER.unpack(pointer)
        if version != VERSION or length < _OFFSET.size + head or position < 0:
            raise ValueError("bad segment pointer")
        reader = self._reader(partition, segment)
        # Before reading: a damaged length would have pread allocate that much first.
        if position + length > os.fstat(reader.fd).st_size:
            raise ValueError(f"segment {segment} ends before the entry the pointer names at {position}")
        first = os.pread(reader.fd, _OFFSET.size + head, position)
        rest = os.pread(reader.fd, length - len(first), position + len(first))
        if len(first) + len(rest) != length or first[:_OFFSET.size] != _OFFSET.pack(offset):
            raise ValueError(f"segment {segment} holds no entry of this record at {position}")
        reader.dropped = page_cache.drop_read(reader.fd, reader.dropped, position + length)
        return first[_OFFSET.size:], rest

    def _reader(self, partition: str, segment: int) -> _Reader:
        key = (partition, segment)
        with self._readers_lock:
            reader = self._readers.get(key)
            if reader is not None:
                self._readers.move_to_end(key)
                return reader
            fd = os.open(self.path(partition, segment), os.O_RDONLY | os.O_CLOEXEC)
            reader = self._readers[key] = _Reader(fd)
            while len(self._readers) > _OPEN_READERS:
                os.close(self._readers.popitem(last=False)[1].fd)
            return reader

    # -- removal -------------------------------------------------------------------------

    def trim(self, partition: str, start: int, end: int) -> None:
        """Delete the segments holding only records below ``start``, the partition's start
        (``end`` is its end): each one whose successor is named at or below ``start``, and
        the newest once its last record is below ``start`` too."""
        names = self.segments(partition)
        tail = self._tails.get(partition)
        newest = min(end, tail.next) if tail is not None and names[-1:] == [tail.segment] else end
        for segment, following in zip(names, names[1:] + [newest]):
            if following > start:
                break
            if tail is not None and tail.segment == segment:  # the next append starts another
                os.close(self._tails.pop(partition).fd)
            self._forget(partition, segment)
            self.path(partition, segment).unlink(missing_ok=True)

    def drop(self, partition: str) -> None:
        """Delete every segment of the partition."""
        tail = self._tails.pop(partition, None)
        if tail is not None:
            os.close(tail.fd)
        for segment in self.segments(partition):
            self._forget(partition, segment)
        shutil.rmtree(self.folder(partition), ignore_errors=True)

    def segments(self, partition: str) -> list[int]:
        """Names of the partition's segments, in offset order."""
        try:
            names = os.listdir(self.folder(partition))
        except FileNotFoundError:
            return []
        return sorted(int(n[:-4]) for n in names if n.endswith(".seg") and n[:-4].isdigit())

    def partitions(self) -> list[str]:
        """Partitions that have a segment folder."""
        try:
            return [n[:-2] for n in os.listdir(self.root) if n.endswith(".p")]
        except FileNotFoundError:
            return []

    def release_removed(self, partition: str) -> None:
        """Close the descriptors of the partition's segments that were deleted (by the
        writer's retention, in another process): an open descriptor keeps a deleted file's
        disk space taken."""
        with self._readers_lock:
            removed = [key for key, reader in self._readers.items()
                       if key[0] == partition and os.fstat(reader.fd).st_nlink == 0]
        for key in removed:
            self._forget(*key)

    def _forget(self, partition: str, segment: int) -> None:
        with self._readers_lock:
            reader = self._readers.pop((partition, segment), None)
        if reader is not None:
            os.close(reader.fd)

    def close(self) -> None:
        for tail in self._tails.values():
            os.close(tail.fd)
        self._tails.clear()
        with self._readers_lock:
            for reader in self._readers.values():
                os.close(reader.fd)
            self._readers.clear()


