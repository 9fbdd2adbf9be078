"""Opening a connection's change stream for the stream commands (tail, history, restore,
snapshot, apply), whether or not a daemon is running.

The embedded log (RocksDB) admits one writing process. A command that only reads opens it
as a read-only secondary (engine/log_embedded.py), which works beside a running daemon and
sees its appends. A command that would like to write (``dt apply`` records its consumer
offset) opens it for writing when no other process holds it, and read-only otherwise; a
command that runs for long (``dt apply --follow``) never asks to write, so that the
connection's daemon can always start beside it. The
Kafka backend needs no such care: any number of clients read and commit.

Everything else comes from tools/runtime.py (``State``, ``Job``, ``open_log``), so the
state directory's layout is decided in one place.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..apply.snapshot import snapshots_dir_for
from ..engine.connection import ConnectionStore
from ..engine.errors import BackendUnavailable, NotFound, UsageError
from ..engine.log import Log
from ..engine.log_embedded import EmbeddedLog
from ..engine.replset import SetStore
from ..engine.rules import is_within
from ..engine.settings import Settings
from . import runtime

EMBEDDED_LOG_DIR = "log"  # as runtime.open_log places it


def open_state(state_dir: str | os.PathLike, *, write: bool = False) -> runtime.State:
    """A state directory with its Log opened for reading (``write``: for writing if free)."""
    path = Path(state_dir)
    settings = Settings.load(path)
    return runtime.State(dir=path, settings=settings, log=_open_log(path, settings, write),
                         connections=ConnectionStore(path), sets=SetStore(path))


def _open_log(path: Path, settings: Settings, write: bool) -> Log:
    if settings.log != "embedded":
        return runtime.open_log(path, settings)
    if write:
        try:
            return runtime.open_log(path, settings)
        except BackendUnavailable:
            pass  # held by a running daemon: read beside it
    try:
        return EmbeddedLog.open_readonly(path / EMBEDDED_LOG_DIR)
    except NotFound:
        raise NotFound(what="change log (nothing was ever replicated with this state directory)",
                       name=str(path / EMBEDDED_LOG_DIR)) from None


def job(state: runtime.State, ref: str) -> runtime.Job:
    """The connection named ``ref`` (id or name) with its replication set and partition."""
    conn = state.connections.get(ref)
    try:
        state.log.end_offset(conn.partition)
    except NotFound:
        raise NotFound(what=f"change stream of connection {conn.name}", name=conn.partition) from None
    return runtime.Job(state=state, conn=conn, rset=state.sets.get(conn.set_name))


def check_apart(path: Path, job: runtime.Job) -> None:
    """Refuse a directory that a stream command fills (dt restore --into, dt apply --to) when
    it is, holds or lies inside what the connection itself keeps: the source, the target,
    the target's snapshots or the state directory (the log, offsets and settings). Events
    applied there would overwrite or delete them by their own paths."""
    real = os.path.realpath(path)
    kept = ((job.rset.root, "the source"), (job.conn.target_root, "the target"),
            (snapshots_dir_for(job.conn, job.state.settings), "the snapshots"), (job.state.dir, "the state directory"))
    for where, what in kept:
        where_real = os.path.realpath(where)
        if is_within(real, where_real) or is_within(where_real, real):
            raise UsageError(detail=f"{path} overlaps {what} of connection {job.conn.name} ({where})")
