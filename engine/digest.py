"""File and block digests (blake3), shared by mirror, verification and the applier.

Definitions (stable: they travel in MirrorFileEnd events):
- A block digest is the first 16 bytes of blake3 over one DIGEST_BLOCK-sized block
  (the last block may be shorter). Holes read as zeros, so a sparse file and a dense
  file with the same bytes have the same digests.
- A file digest is blake3 over the concatenation of its block digests followed by the
  file size as 8 little-endian bytes. Computing it from block digests means a checksum
  comparison that already has them needs no second pass over the data.

``Stream`` builds a file digest from pieces of data given in offset order, gaps read as
zeros (holes): the mirror as it reads a file, the applier as it writes one.
"""

from __future__ import annotations

import os

import blake3

DIGEST_BLOCK = 1 << 16
BLOCK_DIGEST_LEN = 16
_READ_CHUNK = 1 << 20  # multiple of DIGEST_BLOCK: read 1 MiB, hash it in 64 KiB blocks


def block_digest(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest(BLOCK_DIGEST_LEN)


def block_digests(fd: int, size: int, block_size: int = DIGEST_BLOCK) -> list[bytes]:
    """Digests of the blocks of the first ``size`` bytes of the open file ``fd``."""
    chunk = max(block_size, _READ_CHUNK // block_size * block_size)
    buf = bytearray(chunk)
    view = memoryview(buf)
    out: list[bytes] = []
    pos = 0
    while pos < size:
        want = min(chunk, size - pos)
        got = os.preadv(fd, [view[:want]], pos)
        if got <= 0:
            break  # the file shrank while being read: digest what exists
        for start in range(0, got, block_size):
            out.append(block_digest(view[start:min(start + block_size, got)]))
        pos += got
    return out


_ZERO_DIGEST = blake3.blake3(bytes(DIGEST_BLOCK)).digest(BLOCK_DIGEST_LEN)


class Stream:
    """The file digest of data fed in ascending offsets. A piece that starts before the
    end of the previous one makes the stream unusable (``finish`` gives None): the
    caller must then digest the file itself."""

    def __init__(self) -> None:
        self.digests: list[bytes] = []
        self.position = 0  # bytes digested so far (fed or zero-filled)
        self._block = blake3.blake3()
        self._filled = 0  # bytes of the current, unfinished block
        self.broken = False

    def feed(self, offset: int, data: bytes | memoryview) -> None:
        if offset < self.position:
            self.broken = True
        if self.broken:
            return
        self.zeros(offset - self.position)
        view = memoryview(data)
        if self._filled:
            view = self._fill(view)
        whole = len(view) - len(view) % DIGEST_BLOCK
        for start in range(0, whole, DIGEST_BLOCK):
            self.digests.append(block_digest(view[start:start + DIGEST_BLOCK]))
        if whole < len(view):
            self._fill(view[whole:])
        self.position = offset + len(data)

    def zeros(self, length: int) -> None:
        """``length`` zero bytes (a hole) at the current position."""
        if length <= 0 or self.broken:
            return
        end = self.position + length
        if self._filled:
            self._fill(memoryview(bytes(min(length, DIGEST_BLOCK - self._filled))))
        whole = (end - self.position) // DIGEST_BLOCK
        self.digests.extend([_ZERO_DIGEST] * whole)
        self.position += whole * DIGEST_BLOCK
        if self.position < end:
            self._fill(memoryview(bytes(end - self.position)))
        self.position = end

    def _fill(self, view: memoryview) -> memoryview:
        """Add to the current block; return what did not fit."""
        take = min(DIGEST_BLOCK - self._filled, len(view))
        self._block.update(view[:take])
        self._filled += take
        self.position += take
        if self._filled == DIGEST_BLOCK:
            self.digests.append(self._block.digest(BLOCK_DIGEST_LEN))
            self._block, self._filled = blake3.blake3(), 0
        return view[take:]

    def finish(self, size: int) -> bytes | None:
        """The digest of a file of ``size`` bytes (the rest zeros), None when the stream
        is broken or went past ``size``."""
        if self.broken or self.position > size:
            return None
        self.zeros(size - self.position)
        if self._filled:
            self.digests.append(self._block.digest(BLOCK_DIGEST_LEN))
            self._block, self._filled = blake3.blake3(), 0
        return combine(self.digests, size)


def combine(digests: list[bytes], size: int) -> bytes:
    h = blake3.blake3()
    for d in digests:
        h.update(d)
    h.update(size.to_bytes(8, "little"))
    return h.digest()


def file_digest(fd: int, size: int) -> bytes:
    return combine(block_digests(fd, size), size)


def path_digest(path: str | os.PathLike, size: int | None = None) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        return file_digest(fd, os.fstat(fd).st_size if size is None else size)
    finally:
        os.close(fd)
