"""Containment: resolving set-relative paths under the target root without ever leaving it.

Invariant: every object the applier creates, changes or removes is reached from a file
descriptor of the target root, one component at a time, each parent opened with
``O_PATH | O_DIRECTORY | O_NOFOLLOW`` relative to the previous one, and the final
operation is done relative to the parent's descriptor without following the last
component (``dir_fd=`` and ``follow_symlinks=False``, or ``/proc/self/fd/N/<name>`` for
calls that have no ``dir_fd``). So neither the text of a path (absolute, ``..``, empty or
``.`` components, NUL) nor a symlink already present in the target tree can make the
applier touch anything outside the root: such paths raise PathEscapes.

A path is canonical or refused: components separated by single ``/``, none empty, ``.``
or ``..``, each at most 255 bytes, the whole at most MAX_PATH bytes (surrogate-escaped
non-UTF-8 bytes count as the bytes they stand for). ``""`` names the set root itself,
which only attribute operations may address.

Parent descriptors are cached (the tree is walked once per directory, not per event).
The cache assumes the applier is the only writer of the target tree: every rename and
removal the applier makes calls ``invalidate`` for the paths it changed. Descriptors
handed out by ``locate`` stay open until ``release`` (called once per event), even when
the cache evicts or invalidates them meanwhile, so an operation holding two parents
(rename, link) can never see one of them closed under it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass

from datatether.engine import logs
from datatether.engine.errors import PathEscapes

log = logs.get(__name__)

MAX_PATH = 4094
MAX_NAME = 255
ROOT_NAME = "."
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Missing(LookupError):
    """The object (or one of its parents) an event expects is not on the target.

    Not a transient failure: only the applier writes the target tree, so waiting cannot
    make it appear. The applier decides what it means (divergence, or a mirror still on
    its way)."""

    def __init__(self, path: str, what: str = "does not exist on the target"):
        super().__init__(f"{path!r} {what}")
        self.path = path


@dataclass(frozen=True, slots=True)
class Loc:
    """Where an object lives: the descriptor of its parent directory and its name there.

    For the set root, ``dir_fd`` is the root itself and ``name`` is ``"."``."""

    path: str
    dir_fd: int
    name: str

    @property
    def is_root(self) -> bool:
        return self.name == ROOT_NAME

    @property
    def proc_path(self) -> str:
        """A path reaching the object through the parent descriptor (for calls without
        ``dir_fd``); the last component is still subject to ``follow_symlinks``."""
        return f"/proc/self/fd/{self.dir_fd}/{self.name}"


def split(path: str) -> tuple[str, ...]:
    """Components of a canonical set-relative path; ``()`` for the root. Else PathEscapes."""
    if not isinstance(path, str):
        raise PathEscapes(path=path, reason="not a text path")
    if path == "":
        return ()
    if "\0" in path:
        raise PathEscapes(path=path, reason="contains a NUL byte")
    if path.startswith("/"):
        raise PathEscapes(path=path, reason="absolute paths are not relative to the replication set")
    if len(os.fsencode(path)) > MAX_PATH:
        raise PathEscapes(path=path, reason=f"longer than {MAX_PATH} bytes")
    parts = tuple(path.split("/"))
    for part in parts:
        if part in ("", ".", ".."):
            raise PathEscapes(path=path, reason=f"component {part!r} is not allowed")
        if len(os.fsencode(part)) > MAX_NAME:
            raise PathEscapes(path=path, reason=f"a component is longer than {MAX_NAME} bytes")
    return parts


def inside(path: str, prefix: str) -> bool:
    """True when ``path`` is ``prefix`` or below it (set-relative, canonical)."""
    return prefix == "" or path == prefix or path.startswith(prefix + "/")


LINK_MAX = 4095  # bytes of a symlink's target (PATH_MAX less its terminating NUL)


def remap_link(link: str, source_root: str, target_root: str) -> str:
    """RemapLink: an absolute link into the source set root points at the same place below
    the target root; any other link (relative, or outside the set) is kept verbatim. So is
    one whose remapped target would be longer than a link can hold (a longer target root):
    no filesystem could store it, and an event that can never be applied would hold the
    queue for good (logged, DT-A020; a comparison expects the same verbatim link).

    Containment does not depend on this: the applier never follows a link it stores."""
    if not link.startswith("/"):
        return link
    norm = os.path.normpath(link)
    root = os.path.normpath(source_root)
    if norm == root:
        remapped = os.path.normpath(target_root)
    elif norm.startswith(root.rstrip("/") + "/"):
        remapped = os.path.join(os.path.normpath(target_root), norm[len(root.rstrip("/")) + 1:])
    else:
        return link
    if len(os.fsencode(remapped)) > LINK_MAX:
        log.warning("symlink kept as it is: remapped it would be too long", msgid="DT-A020",
                    link=link, length=len(os.fsencode(remapped)))
        return link
    return remapped


class TargetTree:
    """The target root and a cache of descriptors of directories below it."""

    def __init__(self, root: str | os.PathLike, cache_size: int = 256):
        self.root = os.path.abspath(os.fspath(root))
        os.makedirs(self.root, exist_ok=True)
        self._root_fd: int | None = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._cache_size = cache_size
        self._dirs: OrderedDict[tuple[str, ...], int] = OrderedDict()
        self._released: list[int] = []

    def locate(self, path: str, *, create_parents: bool = False, allow_root: bool = False) -> Loc:
        """Resolve ``path`` to its parent descriptor and name.

        Missing parents raise Missing, or are created (mode 0755, owned by the applier)
        with ``create_parents``; a parent that is a symlink raises PathEscapes, one that is
        another kind of object raises Missing. The root is refused unless ``allow_root``
        (renaming, linking or removing the set root itself is never done)."""
        parts = split(path)
        if not parts:
            if not allow_root:
                raise PathEscapes(path=path, reason="the replication set root itself")
            return Loc(path, self.root_fd, ROOT_NAME)
        return Loc(path, self._dir(parts[:-1], path, create_parents), parts[-1])

    @property
    def root_fd(self) -> int:
        """The root's descriptor, opened again from its path after ``reset`` (never
        created again: a target root that is gone is an error until it is back)."""
        if self._root_fd is None:
            self._root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._root_fd

    def reset(self) -> None:
        """Forget every descriptor, the root's too, so the next ``locate`` walks from the
        root's path again (after a failure: a descriptor kept would keep reaching a root or
        directory removed since, even once an operator has put it back)."""
        self.invalidate("")
        self.release()
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    def invalidate(self, path: str) -> None:
        """Forget cached directories at or below ``path`` (after a rename or removal)."""
        parts = split(path)
        stale = [key for key in self._dirs if key[:len(parts)] == parts]
        for key in stale:
            self._released.append(self._dirs.pop(key))

    def release(self) -> None:
        """End of an event: close invalidated descriptors and trim the cache to size."""
        while len(self._dirs) > self._cache_size:
            self._released.append(self._dirs.popitem(last=False)[1])
        for fd in self._released:
            os.close(fd)
        self._released.clear()

    def close(self) -> None:
        self.reset()

    def _dir(self, parts: tuple[str, ...], path: str, create: bool) -> int:
        depth = len(parts)
        while depth and parts[:depth] not in self._dirs:
            depth -= 1
        fd = self._dirs[parts[:depth]] if depth else self.root_fd
        if depth:
            self._dirs.move_to_end(parts[:depth])
        for i in range(depth, len(parts)):
            fd = self._open_child(fd, parts[i], path, create)
            self._dirs[parts[:i + 1]] = fd
        return fd

    def _open_child(self, parent: int, name: str, path: str, create: bool) -> int:
        try:
            return self._open_dir(parent, name, path)
        except FileNotFoundError:
            if not create:
                raise Missing(path, "has a parent directory missing on the target") from None
        try:
            os.mkdir(name, 0o755, dir_fd=parent)
        except FileExistsError:
            pass  # made meanwhile, or a symlink: the open below tells
        return self._open_dir(parent, name, path)

    def _open_dir(self, parent: int, name: str, path: str) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
        self._refuse_symlink(parent, name, path)
        raise Missing(path, "has a parent that is not a directory on the target")

    @staticmethod
    def _refuse_symlink(parent: int, name: str, path: str) -> None:
        if stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
            raise PathEscapes(path=path, reason=f"it goes through the symlink {name!r} on the target")
