"""Helpers shared by the history, tail, snapshot, restore and export tests: a log holding
known events at known times, written directly with the codec (no capture needed)."""

from __future__ import annotations

from datatether.engine import codec
from datatether.engine import events as ev
from datatether.engine.history import parse_time

T0 = parse_time("2026-03-01T10:00:00Z")
SECOND = 1_000_000_000
FILE_MODE = 0o100644
DIR_MODE = 0o040755


def append(log, partition: str, op, time_ns: int) -> int:
    """Append one event recorded at ``time_ns``; return its offset."""
    return log.append(partition, [codec.encode(ev.Event(op, time_ns, "test"))], timestamp_ns=time_ns)


def create(path: str, kind=ev.FileKind.FILE, time_ns: int = T0) -> ev.Create:
    mode = DIR_MODE if kind == ev.FileKind.DIR else FILE_MODE
    return ev.Create(path, kind, mode, 0, 0, time_ns, time_ns)


def corrupt_embedded(log, partition: str, offset: int) -> None:
    """Flip one stored byte of a record of an EmbeddedLog so that its checksum fails."""
    records = log._cf["records"]
    key = log._part(partition).key(offset)
    damaged = bytearray(records[key])
    damaged[-1] ^= 0x01
    records[key] = bytes(damaged)
