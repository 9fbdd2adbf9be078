"""Striped per-path locks that order the mirror against live capture.

Why: a mirror reads a block and appends it; a capture writes a block and appends it. If a
capture's write landed between the mirror's read and its append, the target would end
with the older bytes. Both sides hold the lock of a path across "touch the source, then
append the event", so the log order matches the order the source saw.

Invariant: ``hold(*paths)`` takes the stripes of all paths in ascending stripe order, so
two holders can never deadlock; a path always maps to the same stripe.
"""

from __future__ import annotations

import threading
import zlib
from contextlib import contextmanager
from typing import Iterator

STRIPES = 256


class PathLocks:
    def __init__(self, stripes: int = STRIPES):
        self._locks = [threading.Lock() for _ in range(stripes)]

    def _stripe(self, path: str) -> int:
        return zlib.crc32(path.encode("utf-8", "surrogateescape")) % len(self._locks)

    @contextmanager
    def hold(self, *paths: str) -> Iterator[None]:
        stripes = sorted({self._stripe(p) for p in paths})
        for s in stripes:
            self._locks[s].acquire()
        try:
            yield
        finally:
            for s in reversed(stripes):
                self._locks[s].release()
