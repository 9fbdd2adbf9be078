"""Orphans: objects in the target's copy of a set that the source set does not have.

An object on the target is an orphan when
- its path is selected by the set's rules (or is a directory the rules walk through)
  and nothing exists at that path on the source, or
- no rule selects it at all: outside every include rule, e.g. a file that does not
  match an included wildcard (the reference: "those files that fall outside the
  wildcard inclusion rule will be considered orphans").
It is never an orphan when an *exclude* rule is what keeps it out of the set: excluded
wildcards are left alone, wherever they are. Everything inside an orphan directory is
an orphan too, except what exclude rules cover.

Actions: ``preview`` (list only), ``delete``, or ``move`` to a folder outside both the
target and the source set (the relative path is kept below it; a folder inside the
target set is refused, as the reference warns it would move files again and again).
``older_than_s`` keeps orphans modified within that many seconds. An orphan directory
goes when it is empty after its own orphans went (other entries keep it); a preview
counts it by the same rule, so it lists what a removal would remove. A move never
replaces what the folder already holds: an orphan whose path is taken there (by an
earlier run's) gets the first free name ``<name>.1``, ``<name>.2``...; a directory
taken by another kind of object likewise becomes the first ``<name>.N`` that is free
or a directory, the same one for all its entries, so they stay together.

Every orphan acted on is logged (DT-M020) and a summary closes the run (DT-M021), as
the reference keeps them in the target's log. The target is only touched through
apply/paths.TargetTree (file descriptors of the target root, no symlink is followed),
so an orphan pass can never remove anything outside the target root.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from datatether.engine import logs
from datatether.engine.errors import UsageError
from datatether.engine.events import Rule
from datatether.engine.rules import RuleSet, is_within
from datatether.engine.tree import DirEnd, Entry, Tree

from . import fsops
from .paths import Loc, TargetTree

log = logs.get(__name__)

ACTIONS = ("preview", "delete", "move")


@dataclass
class OrphanResult:
    action: str
    files: int = 0             # orphans that are not directories
    dirs: int = 0
    bytes: int = 0
    paths: list[str] = field(default_factory=list)   # set-relative, in walk order
    kept_recent: int = 0       # orphans left because they were modified too recently
    failed: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return self.files + self.dirs


def check_move_to(move_to: str, target_root: str, source_root: str) -> str:
    """The move folder, refused when inside the target set or the source set, when it
    holds either (an orphan's relative path below it could name a place in the set), or
    when something other than a directory has its name (every orphan would fail)."""
    dest = os.path.realpath(move_to)
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise UsageError(detail=f"the orphan folder {move_to} is not a folder; choose a directory "
                                "(one that does not exist yet is made)")
    for root, what in ((target_root, "the target set"), (source_root, "the source set")):
        real = os.path.realpath(root)
        if is_within(dest, real):
            raise UsageError(detail=f"the orphan folder {move_to} is inside {what} ({root}); "
                                    "choose a folder outside it")
        if is_within(real, dest):
            raise UsageError(detail=f"the orphan folder {move_to} holds {what} ({root}); "
                                    "choose a folder beside it")
    return dest


class _Classifier:
    """Decides, path by path, whether a target object is an orphan (module docstring)."""

    def __init__(self, rset, source_exists: Callable[[str], bool]):
        self._set = rset
        self._exists = source_exists
        self._excluded = RuleSet([Rule(r.path, True, r.recursive) for r in rset.rules if not r.include])

    def excluded(self, abs_path: str, is_dir: bool) -> bool:
        return not self._set.matches(abs_path, is_dir) and self._excluded.matches(abs_path, is_dir)

    def orphan(self, rel: str, is_dir: bool, in_orphan_dir: bool) -> bool:
        path = os.path.join(self._set.root, rel)
        if self.excluded(path, is_dir):
            return False
        if in_orphan_dir:
            return True
        wanted = self._set.matches(path, is_dir) or (is_dir and self._set.must_traverse(path))
        return not wanted or not self._exists(rel)


def process_orphans(target_root: str, rset, source_exists: Callable[[str], bool], *,
                    action: str = "preview", move_to: str | None = None, older_than_s: int = 0,
                    now_ns: int | None = None, stop: threading.Event | None = None) -> OrphanResult:
    """Find (and with ``delete``/``move``, remove) the orphans of ``rset`` under ``target_root``.

    ``rset`` is an engine/replset.ReplicationSet (``root``, ``rules``, ``matches``,
    ``must_traverse``); ``source_exists(rel)`` says whether the source has the path.
    """
    if action not in ACTIONS:
        raise UsageError(detail=f"unknown orphan action {action!r} (use {', '.join(ACTIONS)})")
    if action == "move":
        if not move_to:
            raise UsageError(detail="moving orphans needs a folder to move them to")
        move_to = check_move_to(move_to, target_root, rset.root)
    cutoff = (time.time_ns() if now_ns is None else now_ns) - older_than_s * 1_000_000_000
    result = OrphanResult(action=action)
    classify = _Classifier(rset, source_exists)
    view = Tree(target_root)
    tree = TargetTree(target_root) if action != "preview" else None
    stack: list[_Open] = []  # the directories being walked, innermost last
    try:
        for item in view.walk(dir_ends=True):
            if stop is not None and stop.is_set():
                break
            if isinstance(item, DirEnd):
                d = stack.pop()
                gone = d.orphan and not d.keeps and _one(item.entry, result, tree, move_to, cutoff)
                if stack and not gone:
                    stack[-1].keeps = True
                continue
            in_orphan_dir = bool(stack) and stack[-1].orphan
            is_orphan = item.rel != "" and classify.orphan(item.rel, item.is_dir, in_orphan_dir)
            if item.is_dir:
                stack.append(_Open(is_orphan))
            elif not (is_orphan and _one(item, result, tree, move_to, cutoff)) and stack:
                stack[-1].keeps = True
    finally:
        if tree is not None:
            tree.close()
    log.info("orphans processed", msgid="DT-M021", target=target_root, action=action, files=result.files,
             dirs=result.dirs, bytes=result.bytes, kept_recent=result.kept_recent, failed=len(result.failed))
    return result


@dataclass
class _Open:
    """A directory of the walk: is it an orphan, does anything in it stay?"""

    orphan: bool
    keeps: bool = False


def _one(entry: Entry, result: OrphanResult, tree: TargetTree | None, move_to: str | None, cutoff: int) -> bool:
    """One orphan (a directory after its entries, once nothing in it stays); whether it
    went (or, in a preview, would go)."""
    if entry.mtime_ns > cutoff:
        result.kept_recent += 1
        return False
    if tree is not None and not _act(tree, entry, move_to, result):
        return False
    size = 0 if entry.is_dir else entry.size
    if entry.is_dir:
        result.dirs += 1
    else:
        result.files += 1
        result.bytes += size
    result.paths.append(entry.rel)
    log.info("orphan", msgid="DT-M020", action=result.action, path=entry.rel, bytes=size)
    return True


def _act(tree: TargetTree, entry: Entry, move_to: str | None, result: OrphanResult) -> bool:
    """Delete or move one object; False (and noted) when it stays."""
    try:
        loc = tree.locate(entry.rel)
        try:
            if move_to is not None:
                _move(loc, entry, move_to)
            elif entry.is_dir:
                tree.invalidate(entry.rel)
                os.rmdir(loc.name, dir_fd=loc.dir_fd)
            else:
                os.unlink(loc.name, dir_fd=loc.dir_fd)
        finally:
            tree.release()
    except OSError as exc:
        if entry.is_dir and exc.errno == errno.ENOTEMPTY:
            return False  # excluded or recent entries keep it
        result.failed.append(f"{entry.rel}: {exc.strerror}")
        log.warning("orphan not removed", msgid="DT-M022", path=entry.rel, error=exc.strerror)
        return False
    return True


def _move(loc: Loc, entry: Entry, move_to: str) -> None:
    if entry.is_dir:
        # Its entries were moved one by one; remove it here (it may still hold some),
        # then make sure it is there too.
        os.rmdir(loc.name, dir_fd=loc.dir_fd)
        os.chmod(_move_dir(move_to, entry.rel), entry.mode)
        return
    parent, name = os.path.split(entry.rel)
    dest = _free_name(os.path.join(_move_dir(move_to, parent), name))
    try:
        os.rename(loc.name, dest, src_dir_fd=loc.dir_fd)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    _copy(loc, entry, dest)
    os.unlink(loc.name, dir_fd=loc.dir_fd)


def _move_dir(move_to: str, rel: str) -> str:
    """The directory below ``move_to`` for the orphan directory ``rel``, made as needed:
    each component is the first of ``name``, ``name.1``... that is free or a directory
    (never a symlink to one), so every entry of a directory lands in the same one."""
    os.makedirs(move_to, exist_ok=True)
    top = move_to
    for part in filter(None, rel.split("/")):
        top = _free_name(os.path.join(top, part), directory=True)
        if not os.path.lexists(top):
            os.mkdir(top)
    return top


def _free_name(dest: str, directory: bool = False) -> str:
    """``dest``, or the first of ``dest.1``, ``dest.2``... that nothing holds (with
    ``directory``, that is a directory or nothing). (Only another orphan pass into the
    same folder could take it before the rename.)"""
    name, n = dest, 0
    while os.path.lexists(name) and not (directory and stat.S_ISDIR(os.lstat(name).st_mode)):
        n += 1
        name = f"{dest}.{n}"
    if n and not os.path.lexists(name):
        log.info("orphan moved under another name", msgid="DT-M023", taken=dest, moved_to=name)
    return name


def _copy(loc: Loc, entry: Entry, dest: str) -> None:
    """Another file system: copy the object itself (never what a link points to)."""
    if entry.is_file:
        shutil.copy2(loc.proc_path, dest, follow_symlinks=False)
    elif entry.link_target is not None:
        os.symlink(entry.link_target, dest)
    else:
        os.mknod(dest, stat.S_IFMT(fsops.lstat(loc).st_mode) | entry.mode, entry.rdev)
    os.chown(dest, entry.uid, entry.gid, follow_symlinks=False)
    os.utime(dest, ns=(entry.atime_ns, entry.mtime_ns), follow_symlinks=False)
