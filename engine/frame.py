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
    return MAGIC + bytes((VERSION,)) + blake3.blake3(payload).digest(DIGEST_LEN) + payload


def unseal(frame: bytes) -> bytes:
    if len(frame) < HEADER_LEN or frame[:2] != MAGIC or frame[2] != VERSION:
        raise CorruptRecord(reason="bad frame header")
    payload = frame[HEADER_LEN:]
    if blake3.blake3(payload).digest(DIGEST_LEN) != frame[3:HEADER_LEN]:
        raise CorruptRecord(reason="checksum mismatch")
    return payload
