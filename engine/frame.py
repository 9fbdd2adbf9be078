"""Checksummed frames: how every Log backend stores a record and how it travels on the wire.

Layout (all integers big-endian)::

    0   2  magic b"DF"
    2   1  frame version: 2 is written; 1 is still read
    3  16  checksum of the payload: version 2 its XXH3-128 digest, version 1 the first
           16 bytes of its blake3 digest
   19   n  payload (an encoded event, engine/codec.py)

Invariant: ``unseal`` returns a payload only if its checksum matches; anything else raises
CorruptRecord, so a damaged record can never be mistaken for a valid one.

Why XXH3-128 and not blake3: the checksum is there to catch accidental damage (a torn or
flipped write, a bad disk or link). It cannot stop anyone who can write the log, since they
could recompute any unkeyed digest, so a cryptographic hash buys nothing here, and every
byte of every record is hashed twice (sealed, checked). XXH3-128 hashes some 60 GiB/s per
core on this kind of machine, blake3 about 8, and at 128 bits a damaged record passing
its check is as unlikely as before. File and block digests (engine/digest.py) stay blake3:
they compare data across hosts and time, where a stronger hash is worth its cost.
"""

from __future__ import annotations

import blake3
import xxhash

from .errors import CorruptRecord

MAGIC = b"DF"
VERSION = 2
DIGEST_LEN = 16
HEADER_LEN = len(MAGIC) + 1 + DIGEST_LEN


_HASHERS = {2: xxhash.xxh3_128, 1: blake3.blake3}  # frame version -> hasher of its checksum


def _checksum(version: int, parts) -> bytes:
    """The first DIGEST_LEN bytes of the version's digest of the concatenated ``parts``."""
    digest = _HASHERS[version]()
    for part in parts:
        digest.update(part)
    return digest.digest()[:DIGEST_LEN]


def seal(payload: bytes) -> bytes:
    return header(payload) + payload


def header(*parts: bytes) -> bytes:
    """The header sealing the concatenation of ``parts`` (a writer that keeps a large
    payload apart, to write it with ``pwritev``, never has to copy it)."""
    return MAGIC + bytes((VERSION,)) + _checksum(VERSION, parts)


def unseal(frame: bytes) -> bytes:
    return frame[check(frame):]


def check(buf: bytes, start: int = 0) -> int:
    """Verify the frame that starts at ``buf[start]`` and runs to the end of ``buf``,
    without copying it; return where its payload starts."""
    view = memoryview(buf)[start:]
    check_parts(view[:HEADER_LEN], view[HEADER_LEN:])
    return start + HEADER_LEN


def check_parts(head: bytes | memoryview, *parts: bytes | memoryview) -> None:
    """Verify a frame read in pieces: its header, then its payload as ``parts``."""
    if len(head) != HEADER_LEN or head[:2] != MAGIC or head[2] not in _HASHERS:
        raise CorruptRecord(reason="bad frame header")
    if _checksum(head[2], parts) != head[3:HEADER_LEN]:
        raise CorruptRecord(reason="checksum mismatch")
