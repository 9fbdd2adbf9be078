"""The scan capture backend: no live capture, only the walker of a replication set.

Mirror, verification and orphan removal see the source through ``ScanCapture.view()``
(an engine/tree.Tree rooted at the set root and pruned by the set's rules). A scan sees
state, not changes: ``start`` and ``stop`` only mark it running, and nothing is ever
delivered to a sink. Any job built on it alone is therefore a one-shot mirror (what
``dt mirror`` runs); keeping a target current needs a live backend (fuse, kmod) and a
mirror after each start (engine/capture.py's contract about intervals without capture).
"""

from __future__ import annotations

import os
from typing import Callable

from ..engine.tree import Matcher, Problem, Tree


class ScanCapture:
    """The source side of a replication set, as a walkable view."""

    origin = "scan"

    def __init__(self, root: str, matcher: Matcher | None = None,
                 on_problem: Callable[[Problem], None] | None = None):
        self.root = os.path.abspath(root)
        self._matcher = matcher
        self._on_problem = on_problem
        self._running = False

    @classmethod
    def of_set(cls, rset, **kw) -> "ScanCapture":
        """The scan of an engine/replset.ReplicationSet."""
        return cls(rset.root, rset, **kw)

    def start(self) -> None:
        self._running = True

    def stop(self) -> None:
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    def view(self) -> Tree:
        """A fresh view (its ``problems`` list starts empty)."""
        return Tree(self.root, self._matcher, self._on_problem)

    def exists(self, rel: str) -> bool:
        """Is there an object at the set-relative path ``rel`` on the source now?"""
        return os.path.lexists(os.path.join(self.root, rel) if rel else self.root)
