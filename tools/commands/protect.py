"""dt protect: replicate SOURCE into TARGET in real time, in the foreground.

SOURCE is protected in place: a capture filesystem is mounted over it, so applications
keep their paths and every change they make is recorded, in order, in the connection's log
and applied to TARGET. The first run creates a replication set (SOURCE, recursive) and a
connection, runs the initial mirror (--mirror, full by default) while already capturing,
then replicates continuously. Run again after a stop or a crash, it resumes the same
connection; changes made while it was not running were not captured, so it runs the
configured remirror (settings auto_remirror_mode; --mirror overrides) while capturing.
Objects deleted meanwhile stay on the target as orphans unless the state directory's
config.toml says orphans_action = "delete" (then every mirror is followed by their removal).

A live status line shows the state, the queue, the applied and end offsets and the
recovery point latency (plain lines every --status-interval seconds when not on a
terminal, JSON lines with --json). SIGINT or SIGTERM stops cleanly: the capture is
unmounted, every captured change is applied, the state is saved, exit status 0 (a second
signal skips applying what is left: it stays in the log for the next start).

Target snapshots are taken every snapshot_interval_s seconds when config.toml sets it (and
on demand with dt snapshot take), kept per snapshot_max_count and snapshot_max_age_s.

Control it from another shell with dt status, dt task, dt snapshot take, dt unprotect
(through the daemon's socket in the state directory; root and group dtadmin may act, group
dtmonitor may read).
One daemon per source; with the embedded log, one daemon per state directory.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ...apply.orphans import process_orphans
from ...apply.snapshot import TargetSnapshots
from ...capture.fuse import FuseCapture
from ...engine import codec, logs
from ...engine.api import ApiServer
from ...engine.connection import Connection, map_target
from ...engine.daemon import Daemon, DaemonLock, Parts, refuse_other_daemons, socket_path
from ...engine.errors import NotFound, UsageError
from ...engine.log_feed import FeedingLog
from ...engine.events import Event, Rmdir, SetAttr, Unlink
from ...engine.mirror import Mirror
from ...engine.pathlocks import PathLocks
from ...engine.queue import MirrorFeed, QueueLimits
from ...engine.replset import LiveSet, ReplicationSet, check_no_overlap
from ...engine.rules import is_within
from ...engine.settings import Settings
from ...engine.states import MirrorMode
from ...engine.tree import Tree
from .. import output, runtime
from ..applier_process import ApplierProcess

log = logs.get(__name__)

MIRROR_CHOICES = ("full", "diff", "checksum")


def register(subparsers, common) -> None:
    p = subparsers.add_parser("protect", parents=[common], help="replicate SOURCE into TARGET live (foreground)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="directory to protect (captured in place)")
    p.add_argument("--to", dest="target", required=True, metavar="TARGET", help="directory that becomes its replica")
    p.add_argument("--name", help="connection name (default: derived from SOURCE); reuses a connection of that name")
    p.add_argument("--mirror", choices=MIRROR_CHOICES,
                   help="kind of the first mirror (default: full for a new connection, "
                        "auto_remirror_mode when resuming)")
    p.add_argument("--mapping", choices=("custom", "all_to_one"), default="custom",
                   help="custom: TARGET is SOURCE's replica; all_to_one: SOURCE's path is recreated below TARGET")
    p.add_argument("--status-interval", type=float, default=10.0, metavar="S",
                   help="seconds between status lines when not on a terminal (more than 0; default 10)")
    # Test-only: queue limits below the settings' minimums (engine/queue.py).
    p.add_argument("--queue-limit-bytes", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args) -> int:
    _check_status_interval(args.status_interval)
    source = _source_dir(args.source)
    state_dir = Path(args.state).absolute()
    _refuse_state_inside(state_dir, source)
    lock = DaemonLock(state_dir, source)
    lock.acquire(socket=str(socket_path(state_dir, source)))
    try:
        if Settings.load(state_dir).log == "embedded":
            refuse_other_daemons(state_dir, source, "this daemon")
        with runtime.open_state(state_dir) as state:
            job, created = protect_job(state, source, args.target, args.name, args.mapping)
            mode = _first_mirror(args.mirror, created is not None, state.settings)
            return _serve(args, state, job, created, mode)
    finally:
        lock.release()


def _check_status_interval(seconds: float) -> None:
    # float() takes "nan", "inf" and negatives: no line ever, or lines as fast as the loop runs.
    if not (math.isfinite(seconds) and seconds > 0):
        raise UsageError(detail=f"--status-interval {seconds}: give a number of seconds greater than 0")


def _source_dir(path: str) -> str:
    source = os.path.realpath(path)
    if not os.path.isdir(source):
        if os.path.lexists(path):
            raise UsageError(detail=f"the source {path} is not a directory")
        raise NotFound(what="source directory", name=path)
    if source == "/":
        raise UsageError(detail="the root directory cannot be protected in place")
    return source


def _refuse_state_inside(state_dir: Path, source: str) -> None:
    if is_within(os.path.realpath(state_dir), source):
        raise UsageError(detail=f"the state directory {state_dir} is inside the source {source}: "
                                "the log would replicate itself; use --state elsewhere")


def derive_name(source: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.basename(source)).strip("_-")[:56] or "root"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


@dataclass
class Created:
    """What one run made for a new connection, so that a run that cannot start (the mount
    refused) leaves the state directory and the target as it found them."""

    conn: Connection
    set_name: str | None   # the replication set, when this run made it
    dirs: list[str]        # target directories this run made, outermost first

    def undo(self, state: runtime.State) -> None:
        runtime.remove_connection(state, self.conn)
        if self.set_name is not None:
            state.sets.delete(self.set_name)
        for path in reversed(self.dirs):
            try:
                os.rmdir(path)
            except OSError:
                break  # something else put an entry there meanwhile: keep it


def protect_job(state: runtime.State, source: str, target: str, name: str | None,
                mapping: str) -> tuple[runtime.Job, Created | None]:
    """The connection of SOURCE -> TARGET (found by name, or by source and target root),
    created with a replication set of SOURCE (recursive) when there is none.
    Every check that can refuse runs before anything is made, so a refusal changes nothing.
    Returns the job and, for a connection made now, what was made."""
    target_root = map_target(source, target, mapping)
    conns = state.connections.list()
    conn = next((c for c in conns if c.name == name), None) if name else next(
        (c for c in conns if c.source_root == source and c.target_root == target_root and c.target_host == "local"),
        None)
    if conn is not None:
        if (conn.source_root, conn.target_root) != (source, target_root):
            raise UsageError(detail=f"connection {conn.name} replicates {conn.source_root} to {conn.target_root}, "
                                    f"not {source} to {target_root}; choose another --name")
        rset = state.sets.get(conn.set_name)
        _check_set_root(rset, source)
        runtime.make_target_root(source, target_root)
        state.log.ensure_partition(conn.partition)
        return runtime.Job(state=state, conn=conn, rset=rset), None
    name = name or derive_name(source, {c.name for c in conns})
    stored = state.sets.exists(name)
    rset = state.sets.get(name) if stored else ReplicationSet(name=name, rules=tuple(runtime.adhoc_rules(source, [])))
    _check_set_root(rset, source)
    check_no_overlap(rset, [state.sets.get(c.set_name) for c in conns
                            if c.set_name != rset.name and state.sets.exists(c.set_name)])
    in_log = state.log.partitions()
    state.connections.check_new(name=name, source_root=source, target=target, mapping=mapping,
                                log_partitions=in_log)
    dirs = runtime.make_target_root(source, target_root)
    if not stored:
        rset = state.sets.create(rset.name, rset.rules)
    conn = state.connections.create(name=name, set_name=rset.name, source_root=source, target=target,
                                    mapping=mapping, log_partitions=in_log)
    log.info("connection created", msgid="DT-D040", connection=conn.name, source=source, target=conn.target_root)
    state.log.ensure_partition(conn.partition)
    return runtime.Job(state=state, conn=conn, rset=rset), Created(conn, None if stored else rset.name, dirs)


def _check_set_root(rset: ReplicationSet, source: str) -> None:
    if rset.root != source:
        raise UsageError(detail=f"replication set {rset.name} has its root at {rset.root}, not at the "
                                f"protected directory {source}")


def _first_mirror(flag: str | None, created: bool, settings) -> MirrorMode | None:
    if flag is not None:
        return MirrorMode(flag)
    if created:
        return MirrorMode.FULL
    return MirrorMode(settings.auto_remirror_mode) if settings.auto_remirror else None


def _limits(args, settings) -> QueueLimits:
    if args.queue_limit_bytes is None:
        return QueueLimits.from_settings(settings)
    return QueueLimits(memory_bytes=args.queue_limit_bytes, disk_bytes=0,
                       min_free_bytes=settings.minimum_free_space_mb << 20)


class _Underneath:
    """The set's rules (a Matcher) for a view of the set root through another path.

    The mirror reads the source through ``/proc/self/fd/N``, a descriptor of the directory
    opened before the capture was mounted on it: reads then never go through the capture
    (whose threads may all be waiting for path locks the mirror holds)."""

    def __init__(self, live: LiveSet, view_root: str):
        self._live, self._view, self._real = live, view_root, live.current.root

    def _map(self, path) -> str:
        path = os.fsdecode(path)
        return self._real + path[len(self._view):]

    def matches(self, abs_path, is_dir):
        return self._live.current.matches(self._map(abs_path), is_dir)

    def must_traverse(self, abs_dir):
        return self._live.current.must_traverse(self._map(abs_dir))

    def entry_verdict(self, abs_dir):
        return self._live.current.entry_verdict(self._map(abs_dir))


def build_daemon(args, state: runtime.State, job: runtime.Job, source_fd: int) -> Daemon:
    settings = state.settings
    conn = job.conn
    live = LiveSet(state.sets, job.rset)  # rules saved while running take over (Parts.reload_set)
    locks = PathLocks()
    view_root = f"/proc/self/fd/{source_fd}"
    underneath = _Underneath(live, view_root)

    def make_mirror(feed: MirrorFeed, mode: MirrorMode, changed_since_ns: int | None) -> Mirror:
        # No position file: every mirror a daemon starts is a whole new pass (module docstring).
        return Mirror(Tree(view_root, underneath), job.target_view(), feed.log, job.partition, settings, locks,
                      mode=mode, link_map=job.link_map(), origin="mirror", changed_since_ns=changed_since_ns,
                      room=feed.room)

    applier = ApplierProcess(job)  # in a process of its own, fed as records are appended
    return Daemon(Parts(
        conn=conn, log=FeedingLog(state.log, job.partition, applier.feed), settings=settings,
        limits=_limits(args, settings), space_path=state.dir, progress=applier.progress,
        make_applier=applier.bind,
        make_capture=lambda sink, on_gap: FuseCapture(conn.source_root, sink, settings, matches=live.matches,
                                                      locks=locks, on_gap=on_gap),
        make_mirror=make_mirror,
        remove_orphans=orphan_remover(settings, job, live, locks, view_root),
        snapshots=TargetSnapshots(state.log, conn, settings),
        reload_set=live.reload))


def orphan_remover(settings, job: runtime.Job, live: LiveSet, locks: PathLocks, view_root: str):
    """With ``orphans_action = "delete"``: after each mirror, an Unlink or Rmdir event for
    every orphan of the target (apply/orphans.py decides what is one), appended under the
    path's lock once the source is checked again, so it is ordered with live changes and
    applied by the applier like any other event (no side channel). Moving orphans needs
    ``dt orphans remove --move-to``; the daemon leaves them then."""
    if settings.orphans_action != "delete":
        if settings.orphans_action == "move":
            log.warning("the daemon does not move orphans; use dt orphans remove --move-to", msgid="DT-D042")
        return None
    target_root = job.conn.target_root

    def source_exists(rel: str) -> bool:
        return os.path.lexists(os.path.join(view_root, rel))

    def append(log_, op) -> None:
        log_.append(job.partition, [codec.encode(Event(op, time.time_ns(), "orphans"))])

    def remove(log_, stop: threading.Event) -> int:
        found = process_orphans(target_root, live.current, source_exists, action="preview",
                                older_than_s=settings.orphans_older_than_s, stop=stop)
        removed, parents = 0, set()
        for rel in found.paths:
            with locks.hold(rel):
                if source_exists(rel):
                    continue  # it came back meanwhile
                path = os.path.join(target_root, rel)
                is_dir = os.path.isdir(path) and not os.path.islink(path)
                append(log_, Rmdir(rel, recursive=True) if is_dir else Unlink(rel))
                removed += 1
                parents.add(os.path.dirname(rel))
        # Removing entries moved the times of their directories on the target only.
        for rel in sorted(parents, key=len, reverse=True):
            with locks.hold(rel):
                try:
                    st = os.lstat(os.path.join(view_root, rel) if rel else view_root + "/.")
                except FileNotFoundError:
                    continue
                append(log_, SetAttr(rel, atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns))
        return removed

    return remove


def _serve(args, state, job, created: Created | None, mode: MirrorMode | None) -> int:
    """Run the daemon until a stop. When the daemon of a connection made by this run cannot
    start (the mount refused, another applier on the target), what the run made is undone."""
    source_fd = os.open(job.conn.source_root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    started = False
    try:
        daemon = build_daemon(args, state, job, source_fd)
        abort = threading.Event()
        show = StatusLine.for_args(args)
        api = ApiServer(socket_path(state.dir, job.conn.source_root), daemon.operations())
        with runtime.stop_signals(_stopper(daemon.stop_requested, abort)):
            try:
                daemon.start(restarted=created is None, mirror=mode)
                started = True
                api.start()
                show.note(f"protecting {job.conn.source_root} -> {job.conn.target_root} "
                          f"(connection {job.conn.name}, pid {os.getpid()})"
                          + _resume_note(created is not None, mode))
                daemon.supervise(tick=show, tick_s=show.interval)
            finally:
                final = daemon.shutdown(abort, tick=show, tick_s=show.interval)
                api.stop()  # after the drain, so dt status can follow it
        show.done(final)
        return 0
    finally:
        os.close(source_fd)
        if created is not None and not started:
            created.undo(state)  # after the shutdown: the applier no longer holds the target


def _resume_note(created: bool, mode: MirrorMode | None) -> str:
    if created:
        return ""
    if mode is None:
        return ("; resuming with auto-remirror off: the target stays Mirror Required until a mirror "
                "is started (control API mirror_start)")
    return f"; resuming: changes made while stopped are repaired by a {mode.value} remirror"


def _stopper(stop: threading.Event, abort: threading.Event) -> Callable[[], None]:
    """First SIGINT/SIGTERM: stop cleanly; a second one: do not wait for the queue."""
    def handler() -> None:
        if stop.is_set():
            abort.set()
        stop.set()
    return handler


class StatusLine:
    """The live status: one rewritten line on a terminal, else periodic lines (JSON with --json)."""

    def __init__(self, tty: bool, as_json: bool, interval: float, stream=None):
        self.tty, self.as_json, self.stream = tty, as_json, stream or sys.stdout
        self.interval = 1.0 if tty else interval
        self._width = 0

    @classmethod
    def for_args(cls, args) -> StatusLine:
        return cls(sys.stdout.isatty() and not args.json, args.json, args.status_interval)

    def __call__(self, status: dict) -> None:
        if self.as_json:
            output.emit_json(status, stream=self.stream)
        elif self.tty:
            line = summary(status)
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            print(summary(status), file=self.stream)
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.as_json:
            output.emit_json({"note": text}, stream=self.stream)
        else:
            print(text, file=self.stream)
        self.stream.flush()

    def done(self, final: dict) -> None:
        if self.tty:
            self.stream.write("\n")
        self.note(f"stopped: applied offset {final['applied_offset']} of {final['end_offset'] - 1}, "
                  f"{final['queued_ops']} operation(s) left in the log; target data state "
                  f"{final['target_data_state']}")


def summary(status: dict) -> str:
    """One line: state, queue, offsets, latency, mirror progress."""
    lat = status.get("recovery_point_latency_ms") or {}
    parts = [f"[{status['state']}]", f"target {status['target_data_state']}",
             f"queue {status['queued_ops']} ops/{output.human_bytes(status['queued_bytes'])}",
             f"applied {status['applied_offset']}/{status['end_offset'] - 1}",
             f"latency now {_ms(lat.get('current'))} p50 {_ms(lat.get('p50'))} p99 {_ms(lat.get('p99'))}"]
    mirror = status.get("mirror") or {}
    if status.get("mirror_status") not in (None, "Idle"):
        pct = mirror.get("percent")
        parts.append(f"mirror {status['mirror_status']}" + (f" {pct:.0f}%" if pct is not None else ""))
    if status.get("transmit_mode") == "Paused":
        parts.append("target paused")
    if status.get("queue_overflow"):
        parts.append("queue overflow")
    if status.get("log_unreachable"):
        parts.append("log unreachable")
    return "  ".join(parts)


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f}ms"
