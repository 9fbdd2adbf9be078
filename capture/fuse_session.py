"""A libfuse 3 high-level session driven from Python: mount, serve, unmount.

Why not mfusepy's ``FUSE`` class: it runs ``fuse_main_real``, which installs process-wide
handlers for SIGHUP, SIGINT and SIGTERM (a signal meant for the daemon would silently end
the mount instead), keeps one global session per process, and resets SIGPIPE to SIG_DFL
when it returns (the next broken pipe would kill the daemon). It also drops rename flags,
so a RENAME_EXCHANGE would quietly become a plain rename. This module drives the session
itself (``fuse_new``, ``fuse_mount``, ``fuse_loop_mt``, ``fuse_unmount``,
``fuse_destroy``) and keeps mfusepy for what it is good at: the ABI of libfuse's
structures for the installed version (fuse_operations, fuse_file_info, stat, statvfs,
fuse_conn_info, fuse_config). Only fields whose layout is stable across 3.x are touched.

The handlers live in a plain Python object, one method per libfuse operation it serves
(named like the fuse_operations field; getattr is required, the others optional). They
see bytes paths (``b"/"`` is the mount root; None for an open file unlinked meanwhile) and
file handles as ints (``fh``: what open/create/opendir returned, None when the kernel has
no open file for the call), and answer with os-style values: getattr -> os.stat_result,
readlink -> bytes, open/create/opendir -> handle, read -> bytes, write -> count (its data
is a memoryview of libfuse's request buffer, released when the handler returns: a
handler copies what it keeps),
statfs -> os.statvfs_result, lseek -> offset, getxattr -> bytes, listxattr -> [bytes], readdir -> iterable
of (name, inode, file-type bits); utimens gets ((sec, nsec), (sec, nsec)) or None for
"now". Contract of the adaptation:
- A handler raising OSError answers the kernel with its errno. Anything else is logged
  (DT-F010) and answered with EIO: one failing operation never takes the mount down.
- libfuse calls handlers from several worker threads at once. Its path tree locking
  ("treelock") keeps a path stable while a handler runs: a rename or unlink of a node (or
  of any of its parents) waits for handlers using it, and the other way round.
- ``serve()`` returns once the kernel connection ended (unmount or abort).
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import traceback
from dataclasses import dataclass
from typing import Sequence

import mfusepy

from datatether.engine import logs

from .fuse_killpriv import KILLPRIV_V2_MINOR, InitPatch

log = logs.get(__name__)

_lib = ctypes.CDLL("libfuse3.so.3", use_errno=True)

# fuse_common.h capability bits this module switches off (see ``Tuning``).
FUSE_CAP_SPLICE_WRITE = 1 << 7
FUSE_CAP_SPLICE_MOVE = 1 << 8
FUSE_CAP_SPLICE_READ = 1 << 9
FUSE_CAP_WRITEBACK_CACHE = 1 << 16
FUSE_CAP_POSIX_ACL = 1 << 19
FUSE_CAP_HANDLE_KILLPRIV = 1 << 20
# The kernel's largest request (fuse max_pages_limit, 256 pages) and libfuse's buffer.
MAX_WRITE_LIMIT = 1 << 20


class _FuseArgs(ctypes.Structure):
    _fields_ = [("argc", ctypes.c_int), ("argv", ctypes.POINTER(ctypes.c_char_p)),
                ("allocated", ctypes.c_int)]


_lib.fuse_new_31.restype = ctypes.c_void_p
_lib.fuse_new_31.argtypes = [ctypes.POINTER(_FuseArgs), ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_lib.fuse_mount.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_lib.fuse_unmount.argtypes = [ctypes.c_void_p]
_lib.fuse_destroy.argtypes = [ctypes.c_void_p]
_lib.fuse_loop_cfg_create.restype = ctypes.c_void_p
_lib.fuse_loop_cfg_set_max_threads.argtypes = [ctypes.c_void_p, ctypes.c_uint]
_lib.fuse_loop_cfg_set_idle_threads.argtypes = [ctypes.c_void_p, ctypes.c_uint]
_lib.fuse_loop_cfg_destroy.argtypes = [ctypes.c_void_p]
_lib.fuse_loop_mt_312.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_lib.fuse_get_session.restype = ctypes.c_void_p
_lib.fuse_get_session.argtypes = [ctypes.c_void_p]
_lib.fuse_session_fd.argtypes = [ctypes.c_void_p]
_lib.fuse_session_custom_io.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
_lib.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]


@dataclass(frozen=True)
class Tuning:
    """How the kernel may cache and batch. Defaults favour correctness of capture.

    - No writeback cache: with it the kernel acknowledges a write() before the filesystem
      sees it and sends it up to ~30 s later, so the event would trail the application
      (latency, and "appended before the caller gets its answer" would not hold). Shared
      writable mmap still works without it: dirty pages reach ``write`` on msync, munmap
      and close.
    - No direct I/O: page cache reads, and mmap, keep working.
    - Attribute and entry caches of one second: every change goes through this mount, so
      the kernel's view stays right; the timeout only bounds changes made behind it.
    - No negative entry cache, so a name created behind the mount shows up at once.
    - No POSIX ACLs, and not HANDLE_KILLPRIV (v1, where the kernel would leave set-id bits
      to a filesystem told nothing of the caller).
    - libfuse's default atomic O_TRUNC stays: open() sees O_TRUNC and reports it.
    - ``killpriv_v2``: the filesystem drops privileges on writes itself, so the kernel
      stops asking for security.capability before each one (capture/fuse_killpriv.py;
      the handlers must then do what that module says).
    - Four worker threads: the kernel hands each request to the idle worker that waited
      longest, so every idle worker takes its turn, cold; handlers take turns at the
      interpreter lock anyway. A 4 KiB write cost 63-68 us of CPU with 10 workers, 58 with
      4 (49-56 with 1-2, but then one slow request, a long fsync, would hold up all).
    """

    max_write: int = MAX_WRITE_LIMIT
    max_threads: int = 4
    attr_timeout: float = 1.0
    entry_timeout: float = 1.0
    negative_timeout: float = 0.0
    killpriv_v2: bool = True


def caller() -> tuple[int, int, int]:
    """(uid, gid, pid) of the process whose request the current handler serves."""
    return mfusepy.fuse_get_context()


def _fh(fip) -> int | None:
    return fip.contents.fh if fip else None


def _fill_stat(buf, st: os.stat_result) -> None:
    c = buf.contents
    c.st_dev, c.st_ino, c.st_nlink, c.st_mode = st.st_dev, st.st_ino, st.st_nlink, st.st_mode
    c.st_uid, c.st_gid, c.st_rdev, c.st_size = st.st_uid, st.st_gid, st.st_rdev, st.st_size
    c.st_blksize, c.st_blocks = st.st_blksize, st.st_blocks
    c.st_atimespec.tv_sec, c.st_atimespec.tv_nsec = divmod(st.st_atime_ns, 1_000_000_000)
    c.st_mtimespec.tv_sec, c.st_mtimespec.tv_nsec = divmod(st.st_mtime_ns, 1_000_000_000)
    c.st_ctimespec.tv_sec, c.st_ctimespec.tv_nsec = divmod(st.st_ctime_ns, 1_000_000_000)


def _copy_out(data: bytes, buf, size: int) -> int:
    """Answer of getxattr/listxattr: a size query (size 0) or the bytes, never truncated."""
    if size == 0:
        return len(data)
    if len(data) > size:
        return -errno.ERANGE
    ctypes.memmove(buf, data, len(data))
    return len(data)


class _Adapters:
    """One method per fuse_operations field: C arguments in, handler call, C answer out."""

    def __init__(self, fs, tuning: Tuning, ready: threading.Event, init_patch: InitPatch):
        self.fs, self.tuning, self.ready, self.init_patch = fs, tuning, ready, init_patch

    def getattr(self, path, buf, fip):
        _fill_stat(buf, self.fs.getattr(path, _fh(fip)))
        return 0

    def readlink(self, path, buf, size):
        target = self.fs.readlink(path)[: size - 1] + b"\0"
        ctypes.memmove(buf, target, len(target))
        return 0

    def mknod(self, path, mode, rdev):
        return self.fs.mknod(path, mode, rdev)

    def mkdir(self, path, mode):
        return self.fs.mkdir(path, mode)

    def unlink(self, path):
        return self.fs.unlink(path)

    def rmdir(self, path):
        return self.fs.rmdir(path)

    def symlink(self, target, path):
        return self.fs.symlink(target, path)

    def rename(self, old, new, flags):
        return self.fs.rename(old, new, flags)

    def link(self, existing, new):
        return self.fs.link(existing, new)

    def chmod(self, path, mode, fip):
        return self.fs.chmod(path, mode, _fh(fip))

    def chown(self, path, uid, gid, fip):
        # (uid_t)-1 and (gid_t)-1 mean "leave unchanged"
        return self.fs.chown(path, -1 if uid == 0xFFFFFFFF else uid,
                             -1 if gid == 0xFFFFFFFF else gid, _fh(fip))

    def truncate(self, path, size, fip):
        return self.fs.truncate(path, size, _fh(fip))

    def _opened(self, fi, fh: int) -> int:
        fi.fh, fi.direct_io, fi.keep_cache = fh, 0, 0
        return 0

    def open(self, path, fip):
        return self._opened(fip.contents, self.fs.open(path, fip.contents.flags))

    def create(self, path, mode, fip):
        return self._opened(fip.contents, self.fs.create(path, mode, fip.contents.flags))

    def read(self, path, buf, size, offset, fip):
        data = self.fs.read(path, size, offset, fip.contents.fh)
        ctypes.memmove(buf, data, len(data))
        return len(data)

    def write(self, path, buf, size, offset, fip):
        # No copy: a 1 MiB write spent 7% of its handler's time copying the buffer into a
        # bytes object, which the log's encoding then copied again. Released on return, so
        # whoever kept the view itself fails loudly instead of reading a reused buffer
        # (slices of it cannot be released: they are as short-lived by contract).
        array = (ctypes.c_char * size).from_address(ctypes.addressof(buf.contents))
        with memoryview(array).cast("B") as data:
            return self.fs.write(path, data, offset, fip.contents.fh)

    def statfs(self, path, buf):
        st, c = self.fs.statfs(path), buf.contents
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_fsid", "f_flag", "f_namemax"):
            setattr(c, name, getattr(st, name))
        return 0

    def flush(self, path, fip):
        return self.fs.flush(path, _fh(fip))

    def release(self, path, fip):
        return self.fs.release(path, fip.contents.fh)

    def fsync(self, path, datasync, fip):
        return self.fs.fsync(path, datasync, fip.contents.fh)

    def setxattr(self, path, name, value, size, flags):
        return self.fs.setxattr(path, name, ctypes.string_at(value, size), flags)

    def getxattr(self, path, name, buf, size):
        return _copy_out(self.fs.getxattr(path, name), buf, size)

    def listxattr(self, path, buf, size):
        return _copy_out(b"".join(n + b"\0" for n in self.fs.listxattr(path)), buf, size)

    def removexattr(self, path, name):
        return self.fs.removexattr(path, name)

    def opendir(self, path, fip):
        fip.contents.fh = self.fs.opendir(path)
        return 0

    def readdir(self, path, buf, filler, offset, fip, flags):
        # Offsets 0: libfuse collects the whole listing in this first call and serves
        # later chunks from its own buffer.
        st = mfusepy.c_stat()
        for name, ino, type_mode in self.fs.readdir(path, fip.contents.fh):
            st.st_ino, st.st_mode = ino, type_mode
            if filler(buf, name, ctypes.byref(st), 0, 0):
                break
        return 0

    def releasedir(self, path, fip):
        return self.fs.releasedir(path, fip.contents.fh)

    def fsyncdir(self, path, datasync, fip):
        return self.fs.fsyncdir(path, datasync, fip.contents.fh)

    def init(self, conn, config):
        cfg, con = config.contents, conn.contents
        t = self.tuning
        cfg.use_ino = 1          # applications see the real inode numbers
        cfg.readdir_ino = 0
        cfg.hard_remove = 1      # no .fuse_hidden files in the protected tree: an unlinked
        cfg.nullpath_ok = 0      # open file is served by handle with path None; other
                                 # handle calls get the current path (nullpath_ok drops it)
        cfg.kernel_cache = cfg.auto_cache = cfg.direct_io = 0
        cfg.attr_timeout, cfg.entry_timeout = t.attr_timeout, t.entry_timeout
        cfg.negative_timeout = t.negative_timeout
        con.max_write = min(t.max_write, MAX_WRITE_LIMIT)
        self.init_patch.offered = con.proto_minor >= KILLPRIV_V2_MINOR
        con.want &= ~(FUSE_CAP_WRITEBACK_CACHE | FUSE_CAP_HANDLE_KILLPRIV | FUSE_CAP_POSIX_ACL
                      | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE | FUSE_CAP_SPLICE_READ)
        log.debug("fuse init", msgid="DT-F011", capable=hex(con.capable), want=hex(con.want),
                  max_write=con.max_write)
        self.ready.set()
        return None

    def destroy(self, private_data):
        return None

    def access(self, path, mask):
        return self.fs.access(path, mask)

    def utimens(self, path, times, fip):
        if times:
            a, m = times.contents.actime, times.contents.modtime
            spec = ((a.tv_sec, a.tv_nsec), (m.tv_sec, m.tv_nsec))
        else:
            spec = None
        return self.fs.utimens(path, spec, _fh(fip))

    def fallocate(self, path, mode, offset, length, fip):
        return self.fs.fallocate(path, mode, offset, length, fip.contents.fh)

    def lseek(self, path, offset, whence, fip):
        return self.fs.lseek(path, offset, whence, _fh(fip))


_SESSION_OPS = ("init", "destroy")  # answered by the session itself, never raise
_pinned = threading.local()


def _pin_thread_state() -> None:
    """Keep this libfuse worker's Python thread state for the thread's life.

    A ctypes callback on a thread Python did not create gets a new thread state for the
    call and loses it on return: every request paid for creating one, and anything kept
    per thread (threading.local: the codec's zstd contexts) started over each time,
    which made a captured 4 KiB write about twice as slow. One extra PyGILState_Ensure,
    never released, keeps the state; the workers live as long as the session (idle
    threads are never destroyed, ``Session.serve``). A state is left behind per worker
    when the session ends (a few KiB each)."""
    if not getattr(_pinned, "done", False):
        ctypes.pythonapi.PyGILState_Ensure()
        _pinned.done = True


def _guard(name: str, adapter):
    def call(*args):
        _pin_thread_state()
        try:
            return adapter(*args) or 0
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        except BaseException as exc:  # never let an exception unwind into libfuse
            log.error("filesystem handler failed", msgid="DT-F010", op=name, error=repr(exc),
                      trace=traceback.format_exc())
            return -errno.EIO
    return call


class Session:
    """One mount of ``fs`` on ``mountpoint``: ``mount()``, then ``serve()`` in a thread.

    ``options`` are libfuse ``-o`` options (mount options such as allow_other,
    default_permissions, fsname, subtype, auto_unmount). ``ready`` is set once the
    kernel's INIT was answered, i.e. requests are being served.
    """

    def __init__(self, fs, mountpoint: str, options: Sequence[str], tuning: Tuning = Tuning()):
        self.mountpoint = mountpoint
        self.ready = threading.Event()
        self._options = list(options)
        self._tuning = tuning
        self._fuse = None
        self._fuse_lock = threading.Lock()  # invalidate() never uses a destroyed session
        self.init_patch = InitPatch()
        adapters = _Adapters(fs, tuning, self.ready, self.init_patch)
        self._ops = mfusepy.fuse_operations()
        self._callbacks = []  # the C function objects must outlive the session
        for field in mfusepy.fuse_operations._fields_:
            name, proto = field[0], field[1]
            if not hasattr(adapters, name) or not (name in _SESSION_OPS or hasattr(fs, name)):
                continue
            method = getattr(adapters, name)
            callback = proto(method if name in _SESSION_OPS else _guard(name, method))
            self._callbacks.append(callback)
            setattr(self._ops, name, callback)

    def mount(self) -> None:
        """Create the session and mount it; OSError when libfuse refuses (reason on stderr)."""
        argv_list = [b"datatether"] + ([b"-o", ",".join(self._options).encode()] if self._options else [])
        argv = (ctypes.c_char_p * len(argv_list))(*argv_list)
        args = _FuseArgs(len(argv_list), argv, 0)
        fuse = _lib.fuse_new_31(ctypes.byref(args), ctypes.byref(self._ops),
                                ctypes.sizeof(self._ops), None)
        if not fuse:
            raise OSError(errno.EINVAL, f"fuse_new refused options {self._options}")
        if _lib.fuse_mount(fuse, os.fsencode(self.mountpoint)) != 0:
            _lib.fuse_destroy(fuse)
            raise OSError(errno.EIO, f"fuse_mount failed on {self.mountpoint}")
        if self._tuning.killpriv_v2:
            session = _lib.fuse_get_session(fuse)
            try:
                self.init_patch.install(_lib.fuse_session_custom_io, session, _lib.fuse_session_fd(session),
                                        _lib.fuse_version())
            except OSError as exc:  # the kernel keeps dropping privileges: slower, still right
                log.warning("cannot hand privilege drops to the filesystem", msgid="DT-F014",
                            error=str(exc))
        self._fuse = fuse

    def serve(self) -> int:
        """Serve requests until the connection ends, then release the session."""
        config = _lib.fuse_loop_cfg_create()
        _lib.fuse_loop_cfg_set_max_threads(config, self._tuning.max_threads)
        _lib.fuse_loop_cfg_set_idle_threads(config, self._tuning.max_threads)  # workers never end early
        try:
            return _lib.fuse_loop_mt_312(self._fuse, config)
        finally:
            _lib.fuse_loop_cfg_destroy(config)
            with self._fuse_lock:
                _lib.fuse_unmount(self._fuse)
                _lib.fuse_destroy(self._fuse)
                self._fuse = None

    def invalidate(self, path: bytes) -> int:
        """Drop the kernel's cached attributes and pages of ``path`` (a mount path such as
        b"/a/b"): 0, or a negative errno (-ENOENT: the kernel has no node for it). Not
        for the path of a request in progress (capture/fuse_links.py)."""
        with self._fuse_lock:
            if self._fuse is None:
                return -errno.ENOTCONN
            return _lib.fuse_invalidate_path(self._fuse, path)

