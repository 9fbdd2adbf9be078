"""Retention: which records of a partition the log may forget, for any ``Log`` backend.

Policy (``apply_retention``):

1. Only *consumed* records may ever be dropped: those at or below the lowest offset every
   consumer of the partition has committed. Unconsumed records are the queue (engine/log.py)
   and retention never drops one; a partition without consumers has consumed nothing.
2. Consumed records stay while they are inside the history window: a record whose
   timestamp is at least ``now - window_s`` is kept, for replay and history by time.
3. The byte bound overrides the window: while the retained bytes exceed ``max_bytes``, the
   oldest consumed records go, even inside the window. When the unconsumed records alone
   exceed ``max_bytes`` they are all kept and a warning (DT-L101) says so; whoever owns the
   queue limit decides what that means (engine settings: disk queue limit).

Retention only ever moves ``start_offset`` forwards; running it again changes nothing.
Bytes are counted as the backend's ``size`` counts them; the byte bound drops records whose
payload bytes cover the excess.
"""

from __future__ import annotations

import time

from . import logs
from .errors import CorruptRecord
from .log import Log
from .offsets import NO_OFFSET

logger = logs.get(__name__)


def consumed_end(log: Log, partition: str) -> int:
    """The first offset not yet processed by every consumer (``start_offset`` if none)."""
    committed = log.consumers(partition).values()
    if not committed:
        return log.start_offset(partition)
    return max(min(committed), NO_OFFSET) + 1


def apply_retention(log: Log, partition: str, *, window_s: float, max_bytes: int | None,
                    now_ns: int | None = None) -> int:
    """Drop what the policy above allows; return the new ``start_offset``."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    consumed = consumed_end(log, partition)
    inside_window = log.offset_for_time(partition, now_ns - int(window_s * 1e9))
    log.truncate_before(partition, min(consumed, inside_window))
    if max_bytes is not None:
        _enforce_bytes(log, partition, max_bytes, consumed)
    return log.start_offset(partition)


def _enforce_bytes(log: Log, partition: str, max_bytes: int, consumed: int) -> None:
    retained, _ = log.size(partition)
    excess = retained - max_bytes
    if excess <= 0:
        return
    cut, freed = _bytes_cut(log, partition, excess, consumed)
    log.truncate_before(partition, cut)
    if freed < excess:
        logger.warning("unconsumed records exceed the retention byte bound; keeping them",
                    msgid="DT-L101", partition=partition, retained=retained - freed,
                    max_bytes=max_bytes, unconsumed_from=consumed)


def _bytes_cut(log: Log, partition: str, excess: int, consumed: int) -> tuple[int, int]:
    """The lowest offset (at most ``consumed``) dropping whose prefix frees ``excess`` bytes,
    and the bytes it frees. A damaged record ends the scan: what it holds is unknown."""
    offset, freed = log.start_offset(partition), 0
    while offset < consumed and freed < excess:
        try:
            batch = log.read(partition, offset, max_records=consumed - offset)
        except CorruptRecord as exc:
            logger.warning("damaged record stops the retention byte scan", msgid="DT-L102",
                        partition=partition, offset=offset, error=exc.message)
            break
        for record in batch:
            if freed >= excess:
                break
            freed += len(record.value)
            offset = record.offset + 1
    return offset, freed
