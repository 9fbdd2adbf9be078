"""Odd test trees and a byte-and-metadata comparison of two trees (shared by test modules).

``make_odd_tree(root)`` builds everything a mirror must carry: unicode, spaces,
newlines, leading dashes and non-UTF-8 bytes in names, a path close to the 4094-byte
limit, symlinks inside and outside the tree (relative, absolute, dangling, to a
directory), hard links, a sparse file, xattrs, modes (setuid, sticky, 000), other
owners, empty directories, a fifo, a character device when allowed, files around the
block and chunk sizes, and nanosecond times on everything (set last, directories
bottom-up, so they are what the tree really has).

``diff_trees(a, b)`` walks both trees on its own (it deliberately does not use
engine/tree.py, the code under test) and returns one line per difference: missing or
extra objects, type, content, size, mode, uid/gid, mtime (ns; symlinks included:
Linux sets them with utimensat(AT_SYMLINK_NOFOLLOW)), xattrs, symlink targets, device
numbers, hard-link structure, and optionally the sparse layout. atime is never compared
(reading changes it).
"""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path
from typing import Callable

MAX_PATH = 4094
ODD_UID, ODD_GID = 1234, 5678
_BASE_NS = 1_600_000_000_123_456_789


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_odd_tree(root: str | os.PathLike, *, seed: int = 1, long_path_budget: int | None = None,
                  outside: str | os.PathLike | None = None) -> dict[str, str]:
    """Fill ``root`` with odd objects; return {what: relative path} for tests to poke at.

    ``long_path_budget``: the byte length the longest *absolute* path may reach on any
    tree this one is mirrored to (default: MAX_PATH minus the longest root of the test,
    assumed to be at most 100 bytes longer than ``root``). ``outside``: a directory
    outside the tree for a hard link and a symlink that leave it.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    made: dict[str, str] = {}

    def add(what: str, rel: str | bytes) -> Path:
        made[what] = os.fsdecode(rel)
        return Path(os.fsdecode(os.path.join(os.fsencode(root), os.fsencode(rel))))

    _write(add("unicode", "ünïcødé-日本語-😀.txt"), "unicode content ✓\n".encode())
    _write(add("spaces", "dir with spaces/file with spaces.txt"), b"spaces\n")
    _write(add("newline", "new\nline"), b"newline in the name\n")
    _write(add("dash", "-rf"), b"leading dash\n")
    _write(add("dashdash", "--help"), b"two dashes\n")
    _write(add("non_utf8", b"latin1-\xe9t\xe9-\xff"), b"not utf-8 name\n")
    _write(add("empty_file", "empty"), b"")
    _write(add("block", "sizes/exactly-64k"), rnd.randbytes(65536))
    _write(add("odd_size", "sizes/one-mib-plus-one"), rnd.randbytes((1 << 20) + 1))
    _write(add("large", "sizes/large-5mib"), rnd.randbytes(5 << 20))
    (root / "sizes" / "small-many").mkdir(parents=True)
    for i in range(40):
        _write(root / "sizes" / "small-many" / f"f{i:03d}", rnd.randbytes(rnd.randint(0, 3000)))

    # A path whose absolute form reaches the budget on the longest root of the test.
    budget = (MAX_PATH - 100 - len(os.fsencode(str(root)))) if long_path_budget is None \
        else long_path_budget - len(os.fsencode(str(root)))
    parts, used = [], 0
    while used + 201 + 60 < budget:
        parts.append(f"long-{len(parts):02d}-" + "d" * 192)
        used += len(parts[-1]) + 1
    leaf = "f" * max(1, min(200, budget - used - 1))
    long_rel = "/".join(parts + [leaf])
    _write(add("long_path", long_rel), b"deep\n")

    # Symlinks: relative inside, absolute inside, absolute outside, dangling, to a dir.
    (root / "links").mkdir()
    os.symlink("../dir with spaces/file with spaces.txt", add("link_rel", "links/relative"))
    os.symlink("/etc/hostname", add("link_outside", "links/outside"))
    os.symlink("nowhere/at/all", add("link_dangling", "links/dangling"))
    os.symlink("../sizes", add("link_dir", "links/to-dir"))

    # Hard links inside the tree (three names), and one leaving it.
    _write(add("hardlink_a", "hard/a"), b"hard linked content\n")
    os.link(root / "hard/a", add("hardlink_b", "hard/b"))
    (root / "hard/deeper").mkdir()
    os.link(root / "hard/a", add("hardlink_c", "hard/deeper/c"))
    if outside is not None:
        Path(outside).mkdir(parents=True, exist_ok=True)
        _write(Path(outside) / "shared", b"linked from outside\n")
        os.link(Path(outside) / "shared", add("hardlink_outside", "hard/from-outside"))
        os.symlink(os.path.join(str(outside), "shared"), add("link_abs_outside", "links/abs-outside"))

    # A sparse file: data, a hole, data, a hole up to 12 MiB.
    sparse = add("sparse", "sparse.img")
    with open(sparse, "wb") as f:
        f.write(rnd.randbytes(4096))
        f.seek(5 << 20)
        f.write(rnd.randbytes(70000))
        f.truncate(12 << 20)

    # xattrs on a file and a directory.
    xf = add("xattr_file", "xattrs/file")
    _write(xf, b"with xattrs\n")
    os.setxattr(xf, "user.test", b"value")
    os.setxattr(xf, "user.binary", b"\x00\xff\x01")
    os.setxattr(xf.parent, "user.dir", b"on a directory")

    # Modes and owners.
    modes = root / "modes"
    modes.mkdir()
    for name, mode in (("setuid", 0o4755), ("none", 0o000), ("group-write", 0o664)):
        _write(add(f"mode_{name}", f"modes/{name}"), name.encode())
        os.chmod(modes / name, mode)
    (modes / "sticky").mkdir()
    os.chmod(modes / "sticky", 0o1777)
    made["mode_sticky_dir"] = "modes/sticky"
    owned = add("owned", "owners/file")
    _write(owned, b"owned by someone else\n")
    os.chown(owned, ODD_UID, ODD_GID)
    os.chown(owned.parent, ODD_UID + 1, ODD_GID + 1)
    os.symlink("file", add("owned_link", "owners/link"))
    os.chown(root / "owners/link", ODD_UID + 2, ODD_GID + 2, follow_symlinks=False)

    # Empty directories, nested, and special files.
    (root / "empty-dirs/nested/deeper").mkdir(parents=True)
    made["empty_dir"] = "empty-dirs/nested/deeper"
    (root / "special").mkdir()
    os.mkfifo(add("fifo", "special/fifo"), 0o640)
    try:
        os.mknod(root / "special/null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        made["char_device"] = "special/null"
    except PermissionError:
        pass  # no CAP_MKNOD here (a container): the tree simply has no device

    _set_times(root)
    return made


def _set_times(root: Path) -> None:
    """Distinct nanosecond times on every object, children before their directories."""
    i = 0
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root), topdown=False):
        for name in sorted(filenames) + sorted(d for d in dirnames if os.path.islink(os.path.join(dirpath, d))):
            i += 1
            ns = _BASE_NS + i * 1_000_003_007
            os.utime(os.path.join(dirpath, name), ns=(ns, ns), follow_symlinks=False)
        i += 1
        ns = _BASE_NS + i * 1_000_003_007
        os.utime(dirpath, ns=(ns, ns))


# -- comparison ------------------------------------------------------------------------

def _walk(root: str | os.PathLike) -> dict[bytes, os.stat_result]:
    top = os.fsencode(root)
    out = {b"": os.lstat(top)}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, top)] = os.lstat(path)
    return out


def _xattrs(path: bytes) -> dict[str, bytes]:
    try:
        return {n: os.getxattr(path, n, follow_symlinks=False)
                for n in os.listxattr(path, follow_symlinks=False)}
    except OSError:
        return {}


def _same_content(a: bytes, b: bytes) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def _extents(path: bytes) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos, out = os.fstat(fd).st_size, 0, []
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
        return out
    finally:
        os.close(fd)


def _link_groups(tree: dict[bytes, os.stat_result]) -> set[frozenset[bytes]]:
    groups: dict[tuple[int, int], set[bytes]] = {}
    for rel, st in tree.items():
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            groups.setdefault((st.st_dev, st.st_ino), set()).add(rel)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def diff_trees(a: str | os.PathLike, b: str | os.PathLike, *, compare_root: bool = True,
               holes: bool = False, link_map: Callable[[str], str] | None = None,
               ignore: Callable[[str], bool] | None = None) -> list[str]:
    """Differences between tree ``a`` (the source) and tree ``b`` (its replica).

    ``holes``: also require the same data extents (sparse layout). ``link_map``: the
    symlink target expected in ``b`` for a target in ``a`` (link remapping).
    ``ignore(rel)``: paths to leave out (with everything beneath them).
    """
    ta, tb = _walk(a), _walk(b)
    if ignore is not None:
        def keep(rel: bytes) -> bool:
            parts = os.fsdecode(rel).split("/")
            return not any(ignore("/".join(parts[:i + 1])) for i in range(len(parts))) if rel else True
        ta = {k: v for k, v in ta.items() if keep(k)}
        tb = {k: v for k, v in tb.items() if keep(k)}
    out: list[str] = []
    root_a, root_b = os.fsencode(a), os.fsencode(b)
    for rel in sorted(ta.keys() | tb.keys()):
        name = os.fsdecode(rel) or "."
        if rel not in tb:
            out.append(f"{name!r}: missing in {b}")
            continue
        if rel not in ta:
            out.append(f"{name!r}: extra in {b}")
            continue
        if rel == b"" and not compare_root:
            continue
        sa, sb = ta[rel], tb[rel]
        pa, pb = os.path.join(root_a, rel) if rel else root_a, os.path.join(root_b, rel) if rel else root_b
        if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
            out.append(f"{name!r}: type {stat.filemode(sa.st_mode)} != {stat.filemode(sb.st_mode)}")
            continue
        if stat.S_IMODE(sa.st_mode) != stat.S_IMODE(sb.st_mode):
            out.append(f"{name!r}: mode {oct(stat.S_IMODE(sa.st_mode))} != {oct(stat.S_IMODE(sb.st_mode))}")
        if (sa.st_uid, sa.st_gid) != (sb.st_uid, sb.st_gid):
            out.append(f"{name!r}: owner {sa.st_uid}:{sa.st_gid} != {sb.st_uid}:{sb.st_gid}")
        if sa.st_mtime_ns != sb.st_mtime_ns:
            out.append(f"{name!r}: mtime {sa.st_mtime_ns} != {sb.st_mtime_ns}")
        xa, xb = _xattrs(pa), _xattrs(pb)
        if xa != xb:
            out.append(f"{name!r}: xattrs {xa} != {xb}")
        if stat.S_ISLNK(sa.st_mode):
            want = os.fsdecode(os.readlink(pa))
            want = link_map(want) if link_map else want
            have = os.fsdecode(os.readlink(pb))
            if want != have:
                out.append(f"{name!r}: link target {want!r} != {have!r}")
        elif stat.S_ISREG(sa.st_mode):
            if sa.st_size != sb.st_size:
                out.append(f"{name!r}: size {sa.st_size} != {sb.st_size}")
            elif not _same_content(pa, pb):
                out.append(f"{name!r}: content differs")
            elif holes and _extents(pa) != _extents(pb):
                out.append(f"{name!r}: data extents {_extents(pa)} != {_extents(pb)}")
        elif stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode):
            if sa.st_rdev != sb.st_rdev:
                out.append(f"{name!r}: device {sa.st_rdev} != {sb.st_rdev}")
    ga, gb = _link_groups(ta), _link_groups(tb)
    for g in sorted(ga ^ gb, key=sorted):
        side = "source" if g in ga else "replica"
        out.append(f"hard links {sorted(os.fsdecode(p) for p in g)} only in the {side}")
    return out
