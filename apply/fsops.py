"""Primitive operations on one target object, given as a ``Loc`` (parent descriptor + name).

The attribute operations also take an ``Obj``: a Loc, or an open descriptor of a regular
file (apply/handles.py; opened by ``make`` or ``open_regular``, so never through a symlink),
which spares a path lookup per call when the file is open anyway.

Every function acts on the named object itself and never follows it when it is a
symlink (containment, see apply/paths.py). Functions are idempotent where the name says
so (``remove`` of a missing object, ``remove_xattr`` of a missing attribute succeed).
Failures are OSError (transient: the applier retries them) except PathEscapes and
Missing, which say the event cannot be applied as it stands.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat

import blake3

from datatether.engine import durable
from datatether.engine.errors import InvalidEvent, PathEscapes
from datatether.engine.events import FileKind

from .paths import Loc, Missing

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
FALLOC_FL_UNSHARE_RANGE = 0x40
# Modes that shift data: applying one twice is not the same as once, so they are refused.
_SHIFTING = FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE
_KNOWN = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | FALLOC_FL_UNSHARE_RANGE

_UTIME_OMIT = (1 << 30) - 2
_COPY_CHUNK = 8 << 20  # bytes per copy_file_range call
_AT_SYMLINK_NOFOLLOW = 0x100
_ZEROS = bytes(1 << 20)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_libc.futimens.argtypes = [ctypes.c_int, ctypes.POINTER(_Timespec)]
_libc.syncfs.argtypes = [ctypes.c_int]


def _check(result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def lstat(loc: Loc) -> os.stat_result | None:
    """The object's own status, or None when nothing has that name."""
    try:
        return os.stat(loc.name, dir_fd=loc.dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def is_kind(st: os.stat_result, kind: FileKind, rdev: int = 0) -> bool:
    if stat.S_IFMT(st.st_mode) != kind.ifmt:
        return False
    return kind not in (FileKind.CHAR, FileKind.BLOCK) or st.st_rdev == rdev


def remove(loc: Loc) -> bool:
    """Remove whatever has that name (a directory with its whole subtree). False if none."""
    st = lstat(loc)
    if st is None:
        return False
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(loc.name, dir_fd=loc.dir_fd)
    else:
        try:
            os.unlink(loc.name, dir_fd=loc.dir_fd)
        except FileNotFoundError:
            return False
    return True


Obj = Loc | int


def make(loc: Loc, kind: FileKind, rdev: int = 0, link_target: str | None = None) -> int | None:
    """Create a new object, private until ``set_meta`` gives it its real mode and owner.
    A regular file is returned open read-write (its descriptor is the caller's)."""
    if kind is FileKind.FILE:
        return os.open(loc.name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
                       0o600, dir_fd=loc.dir_fd)
    if kind is FileKind.DIR:
        os.mkdir(loc.name, 0o700, dir_fd=loc.dir_fd)
    elif kind is FileKind.SYMLINK:
        os.symlink(link_target if link_target is not None else "", loc.name, dir_fd=loc.dir_fd)
    elif kind is FileKind.FIFO:
        os.mkfifo(loc.name, 0o600, dir_fd=loc.dir_fd)
    else:
        os.mknod(loc.name, 0o600 | kind.ifmt, rdev, dir_fd=loc.dir_fd)


def set_meta(obj: Obj, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
             atime_ns: int | None = None, mtime_ns: int | None = None, st: os.stat_result | None = None) -> None:
    """Owner, then mode (a chown clears set-id bits), then times (the others change ctime
    only, but a chmod through a fresh descriptor must not be the last word on times).
    ``st``, the object's status just before, spares a chown to the owner it has (the
    mode, when given, is set anyway)."""
    owner = (-1 if uid is None else uid, -1 if gid is None else gid)
    has = (-1, -1) if st is None else (st.st_uid if uid is not None else -1, st.st_gid if gid is not None else -1)
    if owner != (-1, -1) and owner != has:
        if isinstance(obj, int):
            os.chown(obj, *owner)
        else:
            os.chown(obj.name, *owner, dir_fd=obj.dir_fd, follow_symlinks=False)
    if mode is not None:
        set_mode(obj, mode)
    if atime_ns is not None or mtime_ns is not None:
        set_times(obj, atime_ns, mtime_ns)


def set_mode(obj: Obj, mode: int) -> None:
    """chmod without following: Linux has no lchmod, so go through an O_PATH descriptor
    of the object itself; a symlink's own mode means nothing on Linux and is left alone."""
    if isinstance(obj, int):
        os.chmod(obj, stat.S_IMODE(mode))
        return
    fd = os.open(obj.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=obj.dir_fd)
    try:
        if not stat.S_ISLNK(os.fstat(fd).st_mode):
            os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(mode))
    finally:
        os.close(fd)


def set_times(obj: Obj, atime_ns: int | None, mtime_ns: int | None) -> None:
    """utimensat without following; None leaves that time as it is (UTIME_OMIT)."""
    if atime_ns is not None and mtime_ns is not None:  # os.utime does it, without ctypes
        if isinstance(obj, int):
            os.utime(obj, ns=(atime_ns, mtime_ns))
        else:
            os.utime(obj.name, ns=(atime_ns, mtime_ns), dir_fd=obj.dir_fd, follow_symlinks=False)
        return
    times = (_Timespec * 2)(_timespec(atime_ns), _timespec(mtime_ns))
    if isinstance(obj, int):
        _check(_libc.futimens(obj, times))
    else:
        _check(_libc.utimensat(obj.dir_fd, os.fsencode(obj.name), times, _AT_SYMLINK_NOFOLLOW))


def _timespec(ns: int | None) -> _Timespec:
    if ns is None:
        return _Timespec(0, _UTIME_OMIT)
    sec, nsec = divmod(ns, 1_000_000_000)
    return _Timespec(sec, nsec)


def _xattr_target(obj: Obj) -> tuple[int | str, dict]:
    """What the os.*xattr calls take for ``obj``: a descriptor, or a path not followed."""
    return (obj, {}) if isinstance(obj, int) else (obj.proc_path, {"follow_symlinks": False})


def set_xattr(obj: Obj, name: str, value: bytes) -> None:
    target, kw = _xattr_target(obj)
    os.setxattr(target, name, value, **kw)


def remove_xattr(obj: Obj, name: str) -> None:
    target, kw = _xattr_target(obj)
    try:
        os.removexattr(target, name, **kw)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise


def replace_xattrs(obj: Obj, wanted: dict[str, bytes]) -> None:
    """Make the object's extended attributes exactly ``wanted``."""
    target, kw = _xattr_target(obj)
    for name in os.listxattr(target, **kw):
        if name not in wanted:
            remove_xattr(obj, name)
    for name, value in wanted.items():
        try:
            if os.getxattr(target, name, **kw) == value:
                continue
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
        set_xattr(obj, name, value)


def open_regular(loc: Loc, flags: int = os.O_RDWR) -> int:
    """Open the regular file at ``loc`` without following it and without opening anything
    else (opening a FIFO or a device could block or act on hardware)."""
    try:
        probe = os.open(loc.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=loc.dir_fd)
    except FileNotFoundError:
        raise Missing(loc.path) from None
    try:
        mode = os.fstat(probe).st_mode
        if stat.S_ISLNK(mode):
            raise PathEscapes(path=loc.path, reason="it is a symlink on the target (never written through)")
        if not stat.S_ISREG(mode):
            raise Missing(loc.path, "is not a regular file on the target")
        return os.open(f"/proc/self/fd/{probe}", flags | os.O_CLOEXEC)
    finally:
        os.close(probe)


def copy_unlinked(loc: Loc) -> None:
    """Give the file at ``loc`` its own inode with the same content (breaks a hard link
    on the target that the source does not have), atomically by rename."""
    src = open_regular(loc, os.O_RDONLY)
    try:
        tmp = os.open(f"/proc/self/fd/{loc.dir_fd}", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            copy_range(src, tmp, 0, os.fstat(src).st_size)
            # Named after the file, so applying the event again removes what a crash left.
            tmp_name = ".dt-unlinked-" + blake3.blake3(os.fsencode(loc.name)).hexdigest(16)
            remove(Loc(loc.path, loc.dir_fd, tmp_name))
            os.link(f"/proc/self/fd/{tmp}", tmp_name, dst_dir_fd=loc.dir_fd, follow_symlinks=True)
            os.rename(tmp_name, loc.name, src_dir_fd=loc.dir_fd, dst_dir_fd=loc.dir_fd)
        finally:
            os.close(tmp)
    finally:
        os.close(src)


def copy_range(fin: int, fout: int, start: int, end: int) -> None:
    """Bytes ``start..end`` of ``fin`` to the same place in ``fout``: in the kernel where it
    can (copy_file_range), else through a buffer (the two on different file systems)."""
    in_kernel = True
    while start < end:
        size = min(end - start, _COPY_CHUNK)
        if in_kernel:
            try:
                copied = os.copy_file_range(fin, fout, size, start, start)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                in_kernel = False
                continue
        else:
            copied = os.pwrite(fout, os.pread(fin, size, start), start)
        if copied == 0:
            return  # end of file (never while the caller holds the file still)
        start += copied


def fallocate(fd: int, mode: int, offset: int, length: int, path: str = "") -> None:
    """fallocate(2) with the same flags as on the source; where the target file system
    lacks it, the visible effect is reproduced (zeros written, or nothing to do)."""
    if mode & _SHIFTING or mode & ~_KNOWN:
        raise InvalidEvent(reason=f"fallocate mode {mode:#x} on {path!r} shifts data or is unknown; "
                                  "it cannot be replayed safely")
    if length <= 0:
        return
    try:
        _check(_libc.fallocate(fd, mode, offset, length))
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        _fallocate_by_hand(fd, mode, offset, length)


def _fallocate_by_hand(fd: int, mode: int, offset: int, length: int) -> None:
    size = os.fstat(fd).st_size
    if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
        end = min(offset + length, size) if mode & FALLOC_FL_KEEP_SIZE else offset + length
        write_zeros(fd, offset, end)
    elif not mode & FALLOC_FL_KEEP_SIZE and offset + length > size:
        os.posix_fallocate(fd, offset, length)


def write_zeros(fd: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        pos += os.pwrite(fd, memoryview(_ZEROS)[:min(len(_ZEROS), end - pos)], pos)


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def syncfs(fd: int) -> None:
    _check(_libc.syncfs(fd))


def fsync_dir(dir_fd: int) -> None:
    """fsync a directory known by an O_PATH descriptor (which cannot be fsynced itself)."""
    durable.fsync_dir(f"/proc/self/fd/{dir_fd}")
