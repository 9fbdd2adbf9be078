"""Durable small-file writes: temp file, fsync, rename, fsync of the directory.

Invariant: after ``write_atomic`` returns, a reader (even after a crash or power loss)
sees either the old content or the new content, never a mix or an empty file.
``folder_lock`` serialises the writers of one folder that read before they write.
``stored_names`` lists what a store folder holds.
``BackgroundFile`` keeps a file at the newest content handed to it, written atomically
beside its caller.
"""

from __future__ import annotations

import fcntl
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def write_atomic(path: str | Path, data: bytes, mode: int = 0o600) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        # On a full disk it holds the space the next try needs; a failed rename (the
        # destination a directory, say) would leave it beside the destination for good.
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: str | Path) -> None:
    """Make the entries of a directory (a rename, a new file) durable."""
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def stored_names(folder: str | Path) -> list[str]:
    """The names in a store's ``folder``; none when it does not exist (nothing stored yet).

    Any other failure raises: a state directory given as a regular file must fail
    (ENOTDIR, DT-E100) as every other access to it does, not read as an empty store."""
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


@contextmanager
def folder_lock(folder: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (flock on ``folder/.lock``, both created when
    missing): one holder at a time across processes and threads, released when the block
    ends or the holder dies."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class BackgroundFile:
    """A file kept durably at the newest content given to ``submit``, written by a thread
    of its own with ``write_atomic``, so the caller never waits for its two fsyncs (with
    gigabytes of dirty pages about, each waits behind their write-back: tens of ms).

    Invariants: every write is atomic, and writes happen in the order of the submits;
    content superseded before its turn is never written. After ``write_now``, ``discard``
    or ``close`` nothing is pending or being written. A failed write is raised by the next
    call. Meant for progress markers where an older
    content is always safe to find after a crash (a resume then starts earlier).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._cond = threading.Condition()
        self._pending: bytes | None = None
        self._busy = self._closing = False
        self._error: OSError | None = None
        self._thread: threading.Thread | None = None

    def submit(self, data: bytes) -> None:
        """Have ``data`` written soon; returns at once."""
        with self._cond:
            self._raise()
            self._pending = data
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"save {self.path.name}", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def write_now(self, data: bytes) -> None:
        """Write ``data`` and return once it is durable (after any pending write)."""
        self.discard()
        write_atomic(self.path, data)

    def discard(self) -> None:
        """Drop what is pending and wait for a write in progress (before removing the file,
        say, so that no write recreates it)."""
        with self._cond:
            self._pending = None
            self._cond.wait_for(lambda: not self._busy)
            self._raise()

    def close(self) -> None:
        """Write what is pending, then end the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._raise()

    def _raise(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closing)
                if self._pending is None:
                    return
                data, self._pending, self._busy = self._pending, None, True
            try:
                write_atomic(self.path, data)
            except OSError as exc:
                with self._cond:
                    self._error = exc
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
