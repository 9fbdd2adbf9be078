"""FUSE_HANDLE_KILLPRIV_V2: the filesystem, not the kernel, drops privileges on a write.

Why: without it the kernel asks the filesystem for ``security.capability`` before every
write to see whether the write must remove it, a whole extra request through this
process for each one (two round trips per 4 KiB write; answering that question with
ENOSYS, for the measurement only, took a captured 4 KiB random-write load from 12-15 to
17-23 MB/s). With it the kernel marks an inode S_NOSEC after its first check and sends
writes alone; in exchange the filesystem has to drop privileges itself.

libfuse 3.14 (Debian 12's) knows the kernel flag but has no capability bit for it, so
``InitPatch`` adds it to the INIT reply itself, through libfuse's custom I/O hooks
(``fuse_session_custom_io``): libfuse's writev of /dev/fuse goes through a Python function
until the INIT reply is written, and through libc's writev from then on; reads are libc's
read throughout, so no worker ever waits for a request inside Python: libfuse cancels
waiting workers when the session ends (pthread_cancel), which does not unwind a Python
frame safely. An earlier version hooked reads until INIT too, and kept a worker waiting
in Python for as long as no request came to it; with it, about one in twenty `dt protect`
runs stopped soon after starting hung. The
flag is only added when the kernel offers it: every kernel of protocol 7.33 or later does
(``offered``, set from the INIT request's minor version, which libfuse hands the init
handler before it replies).

What the filesystem owes once the flag is on (linux/fuse.h, protocol 7.33), and where it is
done (``drop``, through ``Drops``, called by capture/fuse.py before the data changes,
under the path lock):
- A write, truncate (also the one an open with O_TRUNC stands for: capture/fuse.py) or
  fallocate by a caller without CAP_FSETID clears set-user-ID, and set-group-ID when the
  file is group-executable or the caller is not in its group (the VFS's rule). libfuse
  3.14 passes none of the kernel's kill flags on to the handlers, so the caller's
  credentials are read from /proc, and only when the file has such a bit (almost never:
  the common path costs an fstat and a removexattr that finds nothing, some 4 us).
- ``security.capability``: the kernel still removes it itself, through removexattr (it
  asks once per inode, and again after an attribute change). ``drop`` removes it too, a
  second line that finds nothing unless the kernel did not (the daemon's own write to
  the real file would remove it without an event).
- Both changes are events (SetAttr of the mode, RemoveXattr) that precede the data change,
  as the kernel's own chmod and removexattr did. The kernel marks a file's cached mode
  stale after each write, truncate and fallocate, so the next exec or stat asks again and
  sees the dropped bits (the tests exec a set-user-ID program right after such a change).
- chown is left to the filesystems: the daemon's chown on the source and the applier's on
  the target both go through the VFS, which drops the same bits on both sides.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import threading
from dataclasses import dataclass

from datatether.engine import logs
from datatether.engine.events import Operation, RemoveXattr, SetAttr

log = logs.get(__name__)

# linux/fuse.h
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28   # an INIT flag (fuse_init_in/out.flags)
KILLPRIV_V2_MINOR = 33              # the protocol minor version that brought it
_OUT_HEADER = struct.Struct("<IiQ")  # fuse_out_header: len, error, unique
_INIT_OUT_FLAGS_AT = 12              # fuse_init_out.flags
CUSTOM_IO_VERSIONS = (314,)         # libfuse versions (fuse_version()) whose layout _CustomIO is
CAPABILITY_XATTR = "security.capability"
_CAP_FSETID = 4


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _CustomIO(ctypes.Structure):
    """struct fuse_custom_io of libfuse 3.14 (libfuse copies it)."""
    _fields_ = [("writev", ctypes.c_void_p), ("read", ctypes.c_void_p),
                ("splice_receive", ctypes.c_void_p), ("splice_send", ctypes.c_void_p)]


_WRITEV = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_int,
                           ctypes.c_void_p, use_errno=True)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.writev.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_int]
_libc.writev.restype = ctypes.c_ssize_t
# libfuse calls its hooks with one more argument (userdata) than read(2) and writev(2)
# take; in the x86-64 and aarch64 calling conventions a callee ignores extra arguments.
_LIBC_READ = ctypes.cast(_libc.read, ctypes.c_void_p).value
_PLAIN_IO = _CustomIO(ctypes.cast(_libc.writev, ctypes.c_void_p).value, _LIBC_READ, None, None)


class InitPatch:
    """Adds FUSE_HANDLE_KILLPRIV_V2 to the INIT reply of one libfuse session.

    ``install(custom_io, session, fd, version)`` (before the loop serves anything) routes
    libfuse's writes through ``_writev`` until the first reply has gone, then puts libc's
    writev in its place. The first reply is INIT's: the kernel sends nothing else before
    INIT is answered. ``offered`` is set by the init handler (the kernel's protocol minor
    version); ``enabled`` tells, once ``done`` is set, whether the flag went back.

    Invariants: nothing but the flags word of the INIT reply is ever changed; a failure
    here only means the flag is not added (the reply goes out as libfuse made it); no
    worker waits inside Python (reads are libc's). The C callback lives as long as this
    object, which its Session keeps.
    """

    def __init__(self) -> None:
        self.offered = False
        self.enabled = False
        self.done = threading.Event()
        self._install = None
        self._callback = _WRITEV(self._writev)
        self._io = _CustomIO(ctypes.cast(self._callback, ctypes.c_void_p).value, _LIBC_READ, None, None)

    def install(self, custom_io, session: int, fd: int, libfuse_version: int) -> None:
        """``custom_io`` is libfuse's fuse_session_custom_io; raises OSError if it refuses,
        or if ``libfuse_version`` (fuse_version()) is not one whose struct fuse_custom_io
        ``_CustomIO`` is known to match (a wrong layout would hand libfuse bad pointers)."""
        if libfuse_version not in CUSTOM_IO_VERSIONS:
            raise OSError(errno.ENOTSUP, f"libfuse {libfuse_version // 100}.{libfuse_version % 100}: "
                                         "struct fuse_custom_io not known here")

        def put(io: _CustomIO) -> None:
            rc = custom_io(session, ctypes.byref(io), fd)
            if rc != 0:
                raise OSError(-rc, "fuse_session_custom_io refused")
        put(self._io)
        self._install = put

    def _writev(self, fd, iov, count, userdata):
        if not self.done.is_set():
            try:
                self._patch(iov, count)
            except Exception as exc:  # never let an exception unwind into libfuse
                log.error("INIT reply not patched", msgid="DT-F012", error=repr(exc))
            finally:
                # Only this worker writes now (nothing else is asked before INIT is
                # answered); libfuse copies the struct, the old copy leaks.
                self._install(_PLAIN_IO)
                self.done.set()
                log.debug("fuse init reply", msgid="DT-F013", killpriv_v2_offered=self.offered,
                          killpriv_v2=self.enabled)
        # Both sides use ctypes' private errno: writev's is handed back to libfuse as is.
        return _libc.writev(fd, iov, count)

    def _patch(self, iov, count: int) -> None:
        if count < 2 or iov[0].len < _OUT_HEADER.size or iov[1].len < _INIT_OUT_FLAGS_AT + 4:
            return
        _length, error, _unique = _OUT_HEADER.unpack(ctypes.string_at(iov[0].base, _OUT_HEADER.size))
        if error == 0 and self.offered:
            word = ctypes.c_uint32.from_address(iov[1].base + _INIT_OUT_FLAGS_AT)
            word.value |= FUSE_HANDLE_KILLPRIV_V2
            self.enabled = True


# -- what the filesystem owes ---------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    """What decides a privilege drop about the caller: CAP_FSETID, and its groups (the
    filesystem group id and the supplementary ones)."""

    fsetid: bool
    groups: frozenset[int]

    @classmethod
    def of(cls, pid: int, uid: int, gid: int) -> "Credentials":
        """The calling thread's, from /proc/<pid>/status. When that cannot be read (the
        thread is gone, or it is the kernel's own write-back, pid 0), root is taken to
        have CAP_FSETID and others to be in their group only."""
        fields: dict[bytes, list[bytes]] = {}
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    key, _, rest = line.partition(b":")
                    fields[key] = rest.split()
            caps = int(fields[b"CapEff"][0], 16)
            groups = {int(fields[b"Gid"][3]), *(int(g) for g in fields.get(b"Groups", []))}
            return cls(bool(caps >> _CAP_FSETID & 1), frozenset(groups))
        except (OSError, KeyError, IndexError, ValueError):
            return cls(uid == 0, frozenset((gid,)))

    def mode_after_write(self, st: os.stat_result) -> int | None:
        """The mode a write by this caller leaves (the VFS's rule: set-user-ID goes;
        set-group-ID goes when group-executable or when the caller is not in the file's
        group; nothing goes for a caller with CAP_FSETID), or None when it keeps it."""
        mode = st.st_mode
        if self.fsetid or not stat.S_ISREG(mode):
            return None
        kill = mode & stat.S_ISUID
        if mode & stat.S_ISGID and (mode & stat.S_IXGRP or st.st_gid not in self.groups):
            kill |= stat.S_ISGID
        return stat.S_IMODE(mode & ~kill) if kill else None


def drop(rel: str | None, fd: int, caller) -> tuple[list[Operation], bool]:
    """Drop what a data change of the open file ``fd`` must drop (see the module
    docstring): set-id bits by ``Credentials.mode_after_write`` of ``caller()``
    ((uid, gid, pid), asked only when the file has such a bit), and the
    security.capability attribute. Returns the events, for ``rel`` (none when None),
    and whether the file is left with neither (nothing to drop for any caller)."""
    ops: list[Operation] = []
    st = os.fstat(fd)
    setid = st.st_mode & (stat.S_ISUID | stat.S_ISGID)
    if setid:
        uid, gid, pid = caller()
        mode = Credentials.of(pid, uid, gid).mode_after_write(st)
        if mode is not None:
            os.fchmod(fd, mode)
            setid = mode & (stat.S_ISUID | stat.S_ISGID)
            if rel is not None:
                ops.append(SetAttr(rel, mode=mode))
    capability_gone = True
    try:
        os.removexattr(fd, CAPABILITY_XATTR)
    except OSError as exc:
        # None (ENODATA; a truncate's was removed by the kernel), or no xattrs here; any
        # other failure may have left one, so the file is not taken to be clean.
        capability_gone = exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP)
    else:
        if rel is not None:
            ops.append(RemoveXattr(rel, CAPABILITY_XATTR))
    return ops, not setid and capability_gone


class Drops:
    """``drop`` for open handles, skipped for a handle whose file was left with nothing
    to drop (the filesystem's S_NOSEC): a 4 KiB write's fstat and removexattr were a
    tenth of its handler's time.

    Invariant: a handle is skipped only while no chmod, chown or extended-attribute
    change went through the mount since its file was found clean (``changed`` counts
    them; the count is read before the check, so a change during it is never missed).
    Nothing else can give a file a set-id bit or security.capability: every change
    reaches the real tree through this filesystem. ``forget`` a handle before its
    descriptor is closed (the number is reused)."""

    def __init__(self, caller) -> None:
        self._caller = caller
        self._generation = 0
        self._clean: dict[int, int] = {}  # handle -> generation when found clean

    def changed(self) -> None:
        self._generation += 1

    def forget(self, fh: int) -> None:
        self._clean.pop(fh, None)

    def before_change(self, rel: str | None, fd: int, handle: bool = True) -> list[Operation]:
        """The drops before a data change of ``fd`` (an open handle unless ``handle`` is
        False: a descriptor of the moment, never remembered)."""
        generation = self._generation
        if handle and self._clean.get(fd) == generation:
            return []
        ops, clean = drop(rel, fd, self._caller)
        if clean and handle:
            self._clean[fd] = generation
        return ops
