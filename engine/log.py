"""The ``Log``: an ordered, durable, partitioned record log, the spine of the product.

One partition per connection. Everything else (source queue, target queue, pause,
replay, restore) is a consumer offset on a partition. Backends: engine/log_embedded.py
(RocksDB, the default) and engine/log_kafka.py (Apache Kafka). Both pass the contract
suite in tests/contract/log_contract.py.

Contract, for every backend:
- Partition names match ``[A-Za-z0-9._-]{1,200}``; anything else raises InvalidName.
- ``append`` assigns consecutive offsets starting at ``end_offset``; the first record of a
  partition gets 0. Records are durable against a crash of the appending process when
  ``append`` returns. Offsets are never reused, even after retention removed records.
  Timestamps never decrease within a partition: an append older than the previous record
  takes its time. ``append`` takes a sequence of values (one bytes object: UsageError).
- Every stored record is sealed with a checksum (engine/frame.py). ``read`` verifies it and
  raises CorruptRecord rather than ever returning a damaged value.
- ``read(start)`` returns records with offsets ``start, start+1, ...`` (no gaps, in order),
  at most ``max_records`` and stopping once ``max_bytes`` is reached (at least one record
  is returned if any exists). ``start == end_offset`` returns ``[]``; a start below
  ``start_offset`` or above ``end_offset`` raises OffsetOutOfRange.
- Consumer offsets name the *last processed* offset (NO_OFFSET = -1 when none). ``commit``
  is durable on return and may move backwards (replay); an offset outside
  ``NO_OFFSET .. end_offset-1`` raises OffsetOutOfRange.
- ``truncate_before(n)`` removes records with offsets < n (retention); ``start_offset``
  becomes n. It never removes a record at or beyond ``end_offset``.
- Missing partitions raise NotFound for every call except ``ensure_partition`` and
  ``partitions``. A partition created again after ``drop_partition`` starts empty, at 0.
- After ``close`` every call raises UsageError; closing again is harmless.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from .errors import InvalidName

PARTITION_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
DEFAULT_READ_RECORDS = 1000
DEFAULT_READ_BYTES = 8 << 20


def check_partition_name(name: str) -> str:
    if not isinstance(name, str) or not PARTITION_NAME.match(name):
        raise InvalidName(name=name, reason="partition names use letters, digits, '.', '_' and '-' (1-200)")
    return name


@dataclass(frozen=True, slots=True)
class LogRecord:
    offset: int
    timestamp_ns: int
    value: bytes  # the verified payload (the seal is already checked and removed)


@runtime_checkable
class Log(Protocol):
    def ensure_partition(self, partition: str) -> None:
        """Create the partition if it does not exist (idempotent)."""

    def drop_partition(self, partition: str) -> None:
        """Remove the partition, its records and its consumer offsets."""

    def partitions(self) -> list[str]:
        """Names of existing partitions, sorted."""

    def append(self, partition: str, values: Sequence[bytes], timestamp_ns: int | None = None) -> int:
        """Append values in order; return the offset of the first. Durable on return."""

    def read(self, partition: str, start: int, max_records: int = DEFAULT_READ_RECORDS,
             max_bytes: int = DEFAULT_READ_BYTES) -> list[LogRecord]:
        """Records from ``start`` on, in offset order, without gaps."""

    def wait(self, partition: str, offset: int, timeout_s: float) -> bool:
        """Block until a record at ``offset`` exists (True) or the timeout passed (False)."""

    def start_offset(self, partition: str) -> int:
        """Lowest retained offset (== end_offset when empty)."""

    def end_offset(self, partition: str) -> int:
        """The offset the next appended record will get."""

    def offset_for_time(self, partition: str, timestamp_ns: int) -> int:
        """First retained offset whose timestamp is >= timestamp_ns, else end_offset."""

    def commit(self, partition: str, consumer: str, offset: int) -> None:
        """Durably record that ``consumer`` processed everything up to ``offset``."""

    def committed(self, partition: str, consumer: str) -> int:
        """Last committed offset of ``consumer``, or NO_OFFSET."""

    def consumers(self, partition: str) -> dict[str, int]:
        """Every consumer of the partition with its committed offset."""

    def truncate_before(self, partition: str, offset: int) -> None:
        """Drop records below ``offset`` (clamped to end_offset)."""

    def size(self, partition: str) -> tuple[int, int]:
        """(bytes, records) currently retained; bytes are the retained values' lengths
        (the unit the source queue counts in, engine/queue.py), not the storage used."""

    def close(self) -> None:
        """Release resources; further calls are errors."""
