"""Open descriptors of target files, kept between events so a stream of writes to one file
costs one ``pwrite`` each, not a path walk and an ``open``.

Invariant: a descriptor is cached under the set-relative path it was opened by, and that
path still names the same inode: the applier calls ``invalidate`` for every path a rename
or removal changes (the paths and everything below them) before the next lookup.
Descriptors are opened read-write, only on regular files, never through a symlink
(apply/fsops.open_regular).
"""

from __future__ import annotations

import os
from collections import OrderedDict

from . import fsops
from .paths import TargetTree, inside


class OpenFiles:
    def __init__(self, tree: TargetTree, capacity: int = 64):
        self._tree = tree
        self._capacity = capacity
        self._fds: OrderedDict[str, int] = OrderedDict()

    def get(self, path: str) -> int:
        """A read-write descriptor of the regular file at ``path`` (Missing, PathEscapes)."""
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        fd = fsops.open_regular(self._tree.locate(path))
        self._fds[path] = fd
        self._trim()
        return fd

    def _trim(self) -> None:
        while len(self._fds) > self._capacity:
            os.close(self._fds.popitem(last=False)[1])

    def adopt(self, path: str, fd: int) -> None:
        """Keep ``fd``, a read-write descriptor of the regular file just created at ``path``."""
        old = self._fds.pop(path, None)
        if old is not None:
            os.close(old)
        self._fds[path] = fd
        self._trim()

    def invalidate(self, path: str) -> None:
        """Close descriptors opened by ``path`` or any path below it."""
        for key in [k for k in self._fds if inside(k, path)]:
            os.close(self._fds.pop(key))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
