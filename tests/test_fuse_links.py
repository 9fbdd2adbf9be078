"""LinkedNames (capture/fuse_links.py) on its own: which names are remembered and which
are invalidated. The invalidation here is a recording function standing in for
fuse_invalidate_path; tests/test_capture_fuse.py checks the real one on a mount."""

from __future__ import annotations

import os
import threading
import time

from datatether.capture import fuse_links
from datatether.capture.fuse_links import LinkedNames


def st(ino: int, nlink: int, mode: int = 0o100644) -> os.stat_result:
    # mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime
    return os.stat_result((mode, ino, 1, nlink, 0, 0, 0, 0, 0, 0))


class Recorded:
    def __init__(self):
        self.paths: list[bytes] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, path: bytes) -> int:
        self.release.wait()
        self.paths.append(path)
        return 0


def test_only_the_other_names_of_a_changed_file_are_invalidated():
    inval = Recorded()
    links = LinkedNames(inval)
    links.seen(b"/a", st(7, 3))
    links.seen(b"/b", st(7, 3))
    links.seen(b"/c", st(7, 3))
    links.seen(b"/other", st(8, 2))
    links.changed(b"/b", st(7, 3))
    assert sorted(inval.paths) == [b"/a", b"/c"]
    links.close()


def test_single_links_and_directories_are_not_remembered():
    inval = Recorded()
    links = LinkedNames(inval)
    links.seen(b"/dir", st(5, 4, mode=0o040755))
    links.seen(b"/one", st(6, 1))
    assert not links.active
    links.seen(b"/a", st(7, 2))
    links.seen(b"/b", st(7, 1))  # seen again with one link: forgotten
    assert not links.active
    links.changed(b"/b", st(7, 1))
    assert inval.paths == []


def test_renames_carry_names_and_names_below_a_directory():
    inval = Recorded()
    links = LinkedNames(inval)
    for path in (b"/d/x", b"/d/sub/y", b"/dx", b"/top"):
        links.seen(path, st(7, 4))
    links.renamed(b"/d", b"/e", st(3, 2, mode=0o040755))
    links.removed(b"/top", st(7, 3))
    links.changed(b"/e/x", st(7, 3))
    assert sorted(inval.paths) == [b"/dx", b"/e/sub/y"]  # /dx is not below /d
    links.close()


def test_the_number_of_files_remembered_is_bounded():
    inval = Recorded()
    links = LinkedNames(inval, max_files=2)
    for ino in (1, 2, 3):
        links.seen(b"/a%d" % ino, st(ino, 2))
        links.seen(b"/b%d" % ino, st(ino, 2))
    links.changed(b"/a1", st(1, 2))  # the least recently seen file went first
    links.changed(b"/a3", st(3, 2))
    assert inval.paths == [b"/b3"]
    links.close()


def test_a_blocked_invalidation_holds_the_handler_only_for_the_bounded_wait():
    inval = Recorded()
    inval.release.clear()  # as when the kernel must first write back the other name's pages
    links = LinkedNames(inval)
    links.seen(b"/a", st(7, 2))
    links.seen(b"/b", st(7, 2))
    start = time.monotonic()
    links.changed(b"/a", st(7, 2))
    waited = time.monotonic() - start
    assert fuse_links.WAIT_S <= waited < fuse_links.WAIT_S + 1.0
    assert inval.paths == []
    inval.release.set()
    deadline = time.monotonic() + 5
    while not inval.paths and time.monotonic() < deadline:
        time.sleep(0.01)
    assert inval.paths == [b"/b"]  # it lands once the kernel lets it
    links.close()
