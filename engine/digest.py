"""File and block digests (blake3), shared by mirror, verification and the applier.

Definitions (stable: they travel in MirrorFileEnd events):
- A block digest is the first 16 bytes of blake3 over one DIGEST_BLOCK-sized block
  (the last block may be shorter). Holes read as zeros, so a sparse file and a dense
  file with the same bytes have the same digests.
- A file digest is blake3 over the concatenation of its block digests followed by the
  file size as 8 little-endian bytes. Computing it from block digests means a checksum
  comparison that already has them needs no second pass over the data.
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
