"""A ``Log`` as seen by a consumer that must not change the stream: replay and extra targets.

``LogView(log, last=N, commits=False)`` wraps any backend:

- ``last``: records after offset ``last`` do not exist for the view: ``end_offset``,
  ``read`` and ``wait`` stop there, so an applier driven by the view stops at a chosen
  point (restore at offset N) without knowing it.
- Appends are dropped: only the connection's source and its own target add to a stream
  (the TaskResult an applier appends after a task command belongs to the target the
  connection replicates to, not to a restore or an additional target).
- ``commits=False`` drops consumer commits and answers NO_OFFSET: a restore leaves no
  consumer behind that would hold retention (engine/retention.py) forever. With
  ``commits=True`` (an additional target) commits go to the log under the consumer's own
  name; on a log opened read-only (another process writes it) they are skipped, since the
  consumer offset is advisory (the applier's authority is its progress record).

Every other call goes to the wrapped log unchanged.
"""

from __future__ import annotations

from typing import Sequence

from . import logs
from .errors import OffsetOutOfRange, UsageError
from .log import DEFAULT_READ_BYTES, DEFAULT_READ_RECORDS, Log, LogRecord
from .offsets import NO_OFFSET

log = logs.get(__name__)


class LogView:
    def __init__(self, inner: Log, *, last: int | None = None, commits: bool = True):
        self.inner = inner
        self.last = last
        self.commits = commits
        self._skipped_commit = False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def end_offset(self, partition: str) -> int:
        end = self.inner.end_offset(partition)
        return end if self.last is None else min(end, self.last + 1)

    def read(self, partition: str, start: int, max_records: int = DEFAULT_READ_RECORDS,
             max_bytes: int = DEFAULT_READ_BYTES) -> list[LogRecord]:
        if self.last is not None:
            if start > self.last + 1:
                raise OffsetOutOfRange(offset=start, start=self.inner.start_offset(partition), end=self.last + 1)
            if start == self.last + 1:
                return []
            max_records = min(max_records, self.last + 1 - start)
        return self.inner.read(partition, start, max_records=max_records, max_bytes=max_bytes)

    def wait(self, partition: str, offset: int, timeout_s: float) -> bool:
        if self.last is not None and offset > self.last:
            return False
        return self.inner.wait(partition, offset, timeout_s)

    def append(self, partition: str, values: Sequence[bytes], timestamp_ns: int | None = None) -> int:
        return self.end_offset(partition)

    def commit(self, partition: str, consumer: str, offset: int) -> None:
        if not self.commits:
            return
        try:
            self.inner.commit(partition, consumer, offset)
        except UsageError:
            if not getattr(self.inner, "readonly", False):
                raise
            if not self._skipped_commit:
                self._skipped_commit = True
                log.warning("log open read-only: consumer offset not recorded", msgid="DT-H010",
                            partition=partition, consumer=consumer)

    def committed(self, partition: str, consumer: str) -> int:
        return self.inner.committed(partition, consumer) if self.commits else NO_OFFSET

    def consumers(self, partition: str) -> dict[str, int]:
        return self.inner.consumers(partition) if self.commits else {}

    def close(self) -> None:
        """The view does not own the log: closing it leaves the wrapped log open."""
