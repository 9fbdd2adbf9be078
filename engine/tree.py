"""A read-only view of a local tree: the one walker of mirror, verification and orphans.

Invariants:
- Nothing is ever followed: every entry comes from ``lstat``; a symlink is an entry of its
  own (kind SYMLINK with its target), never the thing it points to.
- The walk order is deterministic and total: depth first, a directory before its
  children, children sorted by their name *bytes*. ``walk_key`` of an item gives that
  order as a tuple of name components, so a position in a walk is one comparable value
  (``DirEnd`` items sort after every descendant of their directory, before its next
  sibling).
- Paths are ``str`` relative to the tree root ("" is the root itself), non-UTF-8 bytes
  kept as surrogate escapes (``os.fsdecode``), so they can go straight into events.
- A path whose absolute form is longer than MAX_PATH bytes is skipped and reported
  (message id DT-M001); an entry that cannot be read is reported, never a crash. Reports
  go to ``Tree.problems`` and to the ``on_problem`` callback.
- Which paths belong to the view is decided by a ``Matcher`` (a replication set): the
  walk prunes directories the matcher says need not be traversed.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

from . import logs
from .events import FileKind

log = logs.get(__name__)

MAX_PATH = 4094
# Sorts after any real name (NAME_MAX is 255 bytes): the key of "leaving a directory".
_AFTER_ALL_NAMES = b"\xff" * 256

# Reading for a mirror must not touch the source's access times (allowed to root/owners).
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_NOATIME if os.geteuid() == 0 else 0)


class Matcher(Protocol):
    """What a replication set offers the walker (engine/replset.py implements it)."""

    def matches(self, abs_path: str, is_dir: bool) -> bool:
        """True when the object at ``abs_path`` belongs to the set."""

    def must_traverse(self, abs_dir: str) -> bool:
        """True when something at or below ``abs_dir`` may belong to the set."""

    def entry_verdict(self, abs_dir: str) -> Callable[[str, bool], bool]:
        """``matches`` for the entries of one directory: ``(name, is_dir) -> belongs``."""


def _yes(name: str, is_dir: bool) -> bool:
    return True


class Everything:
    """The matcher of a whole tree (target views, tests)."""

    def matches(self, abs_path: str, is_dir: bool) -> bool:
        return True

    def must_traverse(self, abs_dir: str) -> bool:
        return True

    def entry_verdict(self, abs_dir: str) -> Callable[[str, bool], bool]:
        return _yes


@dataclass(slots=True)
class Entry:
    """One object as ``lstat`` saw it. ``mode`` holds permission bits only (S_IMODE)."""

    rel: str
    kind: FileKind
    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int
    nlink: int
    rdev: int = 0
    link_target: str | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)
    included: bool = True  # False: a directory walked only because something below belongs
    allocated: int = 0     # bytes of storage (st_blocks * 512)

    @property
    def key(self) -> tuple[bytes, ...]:
        return walk_key(self.rel)

    @property
    def is_dir(self) -> bool:
        return self.kind is FileKind.DIR

    @property
    def is_file(self) -> bool:
        return self.kind is FileKind.FILE


@dataclass(frozen=True, slots=True)
class DirEnd:
    """Yielded after the last descendant of ``entry`` (with ``walk(dir_ends=True)``)."""

    entry: Entry

    @property
    def rel(self) -> str:
        return self.entry.rel

    @property
    def key(self) -> tuple[bytes, ...]:
        return walk_key(self.entry.rel) + (_AFTER_ALL_NAMES,)


@dataclass(frozen=True, slots=True)
class Problem:
    rel: str
    reason: str


def walk_key(rel: str) -> tuple[bytes, ...]:
    """The position of ``rel`` in walk order (the root, "", comes first)."""
    return tuple(os.fsencode(rel).split(b"/")) if rel else ()


def join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


class Tree:
    """A local directory seen through ``lstat``; ``matcher`` limits what belongs to it."""

    def __init__(self, root: str | os.PathLike, matcher: Matcher | None = None,
                 on_problem: Callable[[Problem], None] | None = None, *, details: bool = True,
                 quiet: bool = False):
        """``details=False``: entries without xattrs and link targets (sizing walks);
        ``quiet``: problems are kept in ``problems`` but not logged (a walk ahead of the
        one that reports them)."""
        self.root = os.path.abspath(os.fspath(root))
        self._details = details
        self._quiet = quiet
        self.matcher = matcher or Everything()
        self.problems: list[Problem] = []
        self._on_problem = on_problem
        self._root_bytes = os.fsencode(self.root)

    def abspath(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def _abs_bytes(self, rel: str) -> bytes:
        return self._root_bytes + b"/" + os.fsencode(rel) if rel else self._root_bytes

    def report(self, rel: str, reason: str) -> None:
        problem = Problem(rel, reason)
        self.problems.append(problem)
        if self._on_problem:
            self._on_problem(problem)

    # -- single entries ------------------------------------------------------------------

    def entry(self, rel: str) -> Entry | None:
        """The object at ``rel`` now, or None when there is none (or it cannot be seen)."""
        path = self._stat_path(rel)
        if len(path) > MAX_PATH:
            return None
        try:
            st = os.lstat(path)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                self.report(rel, f"cannot stat: {exc.strerror}")
            return None
        return self._entry(rel, path, st)

    def _entry(self, rel: str, path: bytes, st: os.stat_result, included: bool = True) -> Entry | None:
        kind = FileKind.of_mode(st.st_mode)
        if kind is None:
            self.report(rel, "unknown file type")
            return None
        link_target = None
        if kind is FileKind.SYMLINK and self._details:
            try:
                link_target = os.fsdecode(os.readlink(path))
            except OSError as exc:
                self.report(rel, f"cannot read link: {exc.strerror}")
                return None
        return Entry(rel=rel, kind=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid,
                     gid=st.st_gid, size=st.st_size if kind is FileKind.FILE else 0,
                     atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
                     ino=st.st_ino, dev=st.st_dev, nlink=st.st_nlink,
                     rdev=st.st_rdev if kind in (FileKind.CHAR, FileKind.BLOCK) else 0,
                     link_target=link_target, xattrs=read_xattrs(path) if self._details else {},
                     included=included, allocated=st.st_blocks * 512)

    def _stat_path(self, rel: str) -> bytes:
        # The root is named through "/." so a root given as a path through a link to a
        # directory (a daemon reads a source beneath its capture mount through
        # /proc/self/fd/N) is seen as that directory; every entry below is never followed.
        return self._abs_bytes(rel) if rel else self._root_bytes + b"/."

    def refresh(self, entry: Entry) -> Entry | None:
        """``entry`` as the object is now: the same object when its lstat (inode, ctime,
        size, mtime) is unchanged, since any change of content, attributes or xattrs
        moves ctime; else a fresh entry (None when gone)."""
        path = self._stat_path(entry.rel)
        try:
            st = os.lstat(path)
        except OSError:
            return self.entry(entry.rel)
        if (st.st_ino, st.st_ctime_ns, st.st_mtime_ns) == (entry.ino, entry.ctime_ns, entry.mtime_ns) \
                and (entry.kind is not FileKind.FILE or st.st_size == entry.size):
            return entry
        return self._entry(entry.rel, path, st, entry.included)

    def open(self, rel: str) -> int:
        """A read-only descriptor of the regular file at ``rel`` (never through a symlink)."""
        return os.open(self._abs_bytes(rel), _READ_FLAGS)

    def still(self, fd: int, rel: str) -> bool:
        """True while ``rel`` still names the file open as ``fd`` (not renamed or replaced)."""
        try:
            a, b = os.fstat(fd), os.lstat(self._abs_bytes(rel))
        except OSError:
            return False
        return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)

    # -- the walk ------------------------------------------------------------------------

    def walk(self, *, dir_ends: bool = False) -> Iterator[Entry | DirEnd]:
        """Every object of the view in walk order, starting with the root itself.

        Directories that do not belong but hold something that may are yielded with
        ``included=False`` so a consumer can create the path to what is below.
        """
        top = self.entry("")
        if top is None or not top.is_dir:
            self.report("", "the root is not a directory")
            return
        yield top
        yield from self._walk_dir(top, dir_ends)

    def _walk_dir(self, parent: Entry, dir_ends: bool) -> Iterator[Entry | DirEnd]:
        dir_path = self._abs_bytes(parent.rel)
        belongs = self.matcher.entry_verdict(os.fsdecode(dir_path))
        try:
            names = sorted(os.listdir(dir_path))
        except (FileNotFoundError, NotADirectoryError):
            names = []  # removed or replaced since it was seen: nothing left to walk
        except OSError as exc:
            self.report(parent.rel, f"cannot list directory: {exc.strerror}")
            names = []
        for name in names:
            rel = join(parent.rel, os.fsdecode(name))
            path = dir_path + b"/" + name
            if len(path) > MAX_PATH:
                if not self._quiet:
                    log.warning("path too long, skipped", msgid="DT-M001", path=rel, length=len(path))
                self.report(rel, f"path longer than {MAX_PATH} bytes, skipped")
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue  # removed since the listing: nothing to report
            except OSError as exc:
                self.report(rel, f"cannot stat: {exc.strerror}")
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            included = belongs(os.fsdecode(name), is_dir)
            if is_dir and not included and not self.matcher.must_traverse(os.fsdecode(path)):
                continue
            if not is_dir and not included:
                continue
            entry = self._entry(rel, path, st, included)
            if entry is None:
                continue
            yield entry
            if is_dir:
                yield from self._walk_dir(entry, dir_ends)
        if dir_ends:
            yield DirEnd(parent)

    def size(self) -> tuple[int, int]:
        """(bytes of regular files, objects) that belong to the view. What cannot be read
        is left for the walk that uses the view to report."""
        total = count = 0
        for item in Tree(self.root, self.matcher, details=False, quiet=True).walk():
            if item.included:
                count += 1
                total += item.size
        return total, count


def read_xattrs(path: bytes | str) -> dict[str, bytes]:
    """Extended attributes of the object itself (never a symlink's target); {} when unsupported."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in sorted(names):
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue  # removed between list and get
    return out


def data_extents(fd: int, size: int, allocated: int | None = None) -> Iterator[tuple[int, int]]:
    """``(start, end)`` ranges of ``fd`` below ``size`` that hold data; holes are left out.

    ``allocated`` (st_blocks * 512), when it covers the size, says there is no hole worth
    looking for. Filesystems without SEEK_DATA report the whole file as one extent, which
    is correct, only not sparse.
    """
    if allocated is not None and allocated >= size:
        if size:
            yield 0, size
        return
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return  # only a hole remains
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, size
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end
