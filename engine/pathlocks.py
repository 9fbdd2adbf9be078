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

STRIPES = 256


class PathLocks:
    def __init__(self, stripes: int = STRIPES):
        self._locks = [threading.Lock() for _ in range(stripes)]

    def _stripe(self, path: str) -> int:
        return zlib.crc32(path.encode("utf-8", "surrogateescape")) % len(self._locks)

    def hold(self, *paths: str) -> "_Held":
        """A context manager holding the stripes of ``paths`` while it is entered."""
        return _Held([self._locks[s] for s in sorted({self._stripe(p) for p in paths})])


class _Held:
    """Stripes taken in the (ascending) order given, released in reverse.

    A plain class rather than a generator context manager: every captured write enters
    one, and contextlib's machinery cost it more than the locking itself."""

    __slots__ = ("_locks",)

    def __init__(self, locks: list[threading.Lock]):
        self._locks = locks

    def __enter__(self) -> None:
        for lock in self._locks:
            lock.acquire()

    def __exit__(self, *exc) -> None:
        for lock in reversed(self._locks):
            lock.release()
