"""Hard links under a path-based FUSE mount: every name's cached attributes kept true.

Why: libfuse's high-level API gives the kernel one node per *name*, so a file with two
names in the mount is two inodes to the kernel, each with its own attributes cached for
the attribute timeout, and its own page cache. A change made through one name left the
other name's cache stale: after a truncate or an append through A, stat and mmap through
B still saw the old size (a write to the mapping past the real end of the file killed
the writer with SIGBUS), and after a chmod through A, B's permission checks (the mount
uses default_permissions) still used the old mode.

What ``LinkedNames`` does: it remembers the names the kernel was given (getattr answers,
both names of a link) of every regular file with more than one link, by (st_dev, st_ino);
after a change through one name (data, size, mode, owner, times, link count), it has the
kernel's cache of each *other* name invalidated (``fuse_invalidate_path``: attributes and
pages) before the caller gets its answer.

Invariants and limits:
- The name the change came through is never invalidated from its handler: libfuse forbids
  notifying the inode of the request in progress (the kernel holds its page locks).
- Invalidations run on a thread of their own, and a handler waits for them at most
  ``WAIT_S``. Invalidating a name's pages may make the kernel write its dirty mmap pages
  back first, a write request to this filesystem whose handler may in turn wait to
  invalidate the name this handler's request keeps locked; the bounded wait breaks that
  cycle (the invalidation then lands just after the answer).
- Renames carry the remembered names along (the name itself and names below a renamed
  directory); unlink forgets a name; a file seen again with a single link is forgotten.
- At most ``MAX_FILES`` files are remembered (least recently seen dropped first); a
  forgotten file's other names may lag by the attribute timeout, as without this module,
  until the kernel asks for their attributes again.
"""

from __future__ import annotations

import os
import queue
import stat
import threading
from collections import OrderedDict
from typing import Callable

MAX_FILES = 65536
WAIT_S = 0.2

Key = tuple[int, int]
Invalidate = Callable[[bytes], int]  # fuse_invalidate_path: 0 or a negative errno


def key_of(st: os.stat_result) -> Key:
    return st.st_dev, st.st_ino


class LinkedNames:
    def __init__(self, invalidate: Invalidate | None = None, max_files: int = MAX_FILES):
        self._invalidate = invalidate
        self._max = max_files
        self._lock = threading.Lock()
        self._names: OrderedDict[Key, set[bytes]] = OrderedDict()
        self._jobs: queue.SimpleQueue | None = None
        self._worker: threading.Thread | None = None

    def attach(self, invalidate: Invalidate) -> None:
        """The session's invalidation, once it exists (the handlers are built before it)."""
        self._invalidate = invalidate

    @property
    def active(self) -> bool:
        """Is any multiply-linked file remembered? (When not, changes need no lookup.)"""
        return bool(self._names)

    # -- what the kernel was told ------------------------------------------------------------

    def seen(self, path: bytes, st: os.stat_result) -> None:
        """The kernel was given ``st`` for ``path``."""
        if not stat.S_ISREG(st.st_mode):
            return
        key = key_of(st)
        with self._lock:
            if st.st_nlink > 1:
                self._names.setdefault(key, set()).add(path)
                self._names.move_to_end(key)
                while len(self._names) > self._max:
                    self._names.popitem(last=False)
            else:
                self._names.pop(key, None)

    def removed(self, path: bytes, st: os.stat_result) -> None:
        """The name ``path`` of the file ``st`` describes is gone."""
        with self._lock:
            names = self._names.get(key_of(st))
            if names is not None:
                names.discard(path)
                if not names:
                    del self._names[key_of(st)]

    def renamed(self, old: bytes, new: bytes, st: os.stat_result) -> None:
        """``old`` (``st`` describes it) is now ``new``; so is everything below it."""
        below = old.rstrip(b"/") + b"/"
        with self._lock:
            if stat.S_ISDIR(st.st_mode):
                touched = self._names.values()
            else:  # a file: only its own names can change
                touched = [self._names[key_of(st)]] if key_of(st) in self._names else []
            for names in touched:
                moved = {n for n in names if n == old or n.startswith(below)}
                if moved:
                    names -= moved
                    names |= {new + n[len(old):] for n in moved}

    def names(self, st: os.stat_result) -> set[bytes]:
        """The remembered names of the file ``st`` describes (some may be missing: the
        kernel was never given them, or the file was forgotten)."""
        with self._lock:
            return set(self._names.get(key_of(st), ()))

    # -- after a change -------------------------------------------------------------------------

    def changed(self, path: bytes, st: os.stat_result) -> None:
        """The file ``st`` describes was changed through ``path``: invalidate the kernel's
        cache of its other names, waiting at most WAIT_S."""
        if not self._names:
            return
        with self._lock:
            others = [n for n in self._names.get(key_of(st), ()) if n != path]
        if others and self._invalidate is not None:
            done = threading.Event()
            self._queue().put((others, done))
            done.wait(WAIT_S)

    def _queue(self) -> queue.SimpleQueue:
        with self._lock:
            if self._jobs is None:
                self._jobs = queue.SimpleQueue()
                self._worker = threading.Thread(target=self._serve, args=(self._jobs,),
                                                name="fuse-link-invalidation", daemon=True)
                self._worker.start()
            return self._jobs

    def _serve(self, jobs: queue.SimpleQueue) -> None:
        while (job := jobs.get()) is not None:
            paths, done = job
            try:
                for path in paths:
                    # -ENOENT when the kernel forgot that name: nothing is cached to go stale.
                    self._invalidate(path)
            finally:
                done.set()

    def close(self) -> None:
        """Stop the invalidation thread (after the session ended)."""
        with self._lock:
            jobs, worker, self._jobs, self._worker = self._jobs, self._worker, None, None
        if jobs is not None:
            jobs.put(None)
            worker.join(1.0)  # an invalidation stuck in a dead connection must not hold stop()
