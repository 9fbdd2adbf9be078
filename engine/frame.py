"""Checksummed frames: how every Log backend stores a record and how it travels on the wire.

Layout (all integers big-endian)::

    0   2  magic b"DF"
    2   1  frame version (1)
    3  16  blake3 digest (first 16 bytes) of the payload
   19   n  payload (an encoded event, engine/codec.py)

Invariant: ``unseal`` returns a payload only if its digest matches; anything else raises
CorruptRecord, so a damaged record can never be mistaken for a valid one.
"""

from __future__ import annotations

import blake3

from .errors import CorruptRecord

MAGIC = b"DF"
VERSION = 1
DIGEST_LEN = 16
HEADER_LEN = len(MAGIC) + 1 + DIGEST_LEN


def seal(payload: bytes) -> bytes:
    return header(payload) + payload


def header(*parts: bytes) -> bytes:
    """The header sealing the concatenation of ``parts`` (a writer that keeps a large
    payload apart, to write it with ``pwritev``, never has to copy it)."""
    digest = blake3.blake3()
    for part in parts:
        digest.update(part)
    return MAGIC + bytes((VERSION,)) + digest.digest(DIGEST_LEN)


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
    if len(head) != HEADER_LEN or head[:2] != MAGIC or head[2] != VERSION:
        raise CorruptRecord(reason="bad frame header")
    digest = blake3.blake3()
    for part in parts:
        digest.update(part)
    if digest.digest(DIGEST_LEN) != head[3:HEADER_LEN]:
        raise CorruptRecord(reason="checksum mismatch")
