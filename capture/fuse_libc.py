"""The few system calls the FUSE capture needs that the os module lacks or narrows.

- ``renameat2`` with flags (os.rename has none: RENAME_NOREPLACE must stay atomic).
- ``utimensat``/``futimens`` with raw timespecs, so UTIME_NOW and UTIME_OMIT reach the
  filesystem unchanged (os.utime cannot leave one time untouched).
- ``fallocate`` with a mode (os.posix_fallocate has none: no hole punching, no zeroing).
- ``remount_bind``: a mount's own flags (nosuid, nodev, noexec...), which os cannot change.

Each raises OSError with the call's errno, like the os module. ctypes releases the GIL
around the calls.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8   # linux/mount.h
MS_REMOUNT, MS_BIND, MS_RELATIME = 32, 4096, 1 << 21

Timespec = tuple[int, int]  # (seconds, nanoseconds); nanoseconds may be UTIME_NOW/UTIME_OMIT


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_Times = _Timespec * 2

_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
_libc.futimens.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]


def _check(result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def renameat2(old_dir_fd: int, old: bytes, new_dir_fd: int, new: bytes, flags: int) -> None:
    _check(_libc.renameat2(old_dir_fd, old, new_dir_fd, new, flags))


def _times(times: tuple[Timespec, Timespec] | None):
    return None if times is None else _Times(_Timespec(*times[0]), _Timespec(*times[1]))


def utimensat(dir_fd: int, path: bytes, times: tuple[Timespec, Timespec] | None) -> None:
    """Set (atime, mtime) of ``path`` without following a final symlink; None is "now"."""
    _check(_libc.utimensat(dir_fd, path, _times(times), AT_SYMLINK_NOFOLLOW))


def futimens(fd: int, times: tuple[Timespec, Timespec] | None) -> None:
    _check(_libc.futimens(fd, _times(times)))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_libc.fallocate(fd, mode, offset, length))


def remount_bind(path: str | os.PathLike, flags: int) -> None:
    """Set the flags of the mount at ``path`` itself to ``flags`` (MS_REMOUNT|MS_BIND:
    the filesystem and its options stay; a per-mount flag left out is cleared)."""
    _check(_libc.mount(None, os.fsencode(path), None, MS_REMOUNT | MS_BIND | flags, None))
