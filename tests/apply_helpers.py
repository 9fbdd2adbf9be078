"""Helpers for the applier tests: a log with a partition, event appending, and a
comparable snapshot of a target tree."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path

from datatether.engine import codec
from datatether.engine import events as ev

PARTITION = "conn-1"


def encode(op, time_ns: int | None = None) -> bytes:
    return codec.encode(ev.Event(op, time.time_ns() if time_ns is None else time_ns, origin="test"))


def append(log, *ops, partition: str = PARTITION) -> int:
    """Append operations as events; return the offset of the first."""
    return log.append(partition, [encode(op) for op in ops])


def snapshot(root: str | os.PathLike, *, file_mtimes: bool = True, dir_mtimes: bool = True) -> dict:
    """Everything observable about a tree except atime and ctime, as a comparable value:
    per path its type, mode, owner, size, content digest or link target, xattrs, device
    number, mtimes (files' and directories' optionally), and which paths share an inode."""
    root = Path(root)
    out: dict[str, tuple] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    body = hashlib.sha256(f.read()).hexdigest()
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISLNK(st.st_mode):  # the root itself shows as $ROOT (remapped links)
                body = os.readlink(full).replace(str(root), "$ROOT", 1)
            else:
                body = None
            wanted = dir_mtimes if stat.S_ISDIR(st.st_mode) else file_mtimes
            mtime = st.st_mtime_ns if wanted else None
            xattrs = {n: os.getxattr(full, n, follow_symlinks=False)
                      for n in sorted(os.listxattr(full, follow_symlinks=False))}
            size = None if stat.S_ISLNK(st.st_mode) else st.st_size  # a link's is its body's
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, body,
                        tuple(xattrs.items()), st.st_rdev, mtime)
    links = sorted(sorted(group) for group in inodes.values() if len(group) > 1)
    return {"objects": out, "hardlinks": links}


def differences(a: dict, b: dict) -> list[str]:
    """Readable differences between two snapshots (empty when equal)."""
    out = [f"{path!r}: {a['objects'].get(path)} != {b['objects'].get(path)}"
           for path in sorted(a["objects"].keys() | b["objects"].keys())
           if a["objects"].get(path) != b["objects"].get(path)]
    if a["hardlinks"] != b["hardlinks"]:
        out.append(f"hard links {a['hardlinks']} != {b['hardlinks']}")
    return out
