"""dt snapshot: target snapshots of a connection, each tagged with the offset it holds.

  dt snapshot take CONNECTION [--kind btrfs|reflink|linktree]
  dt snapshot list CONNECTION
  dt snapshot delete CONNECTION ID
  dt snapshot prune CONNECTION

A snapshot is a frozen copy of the target tree holding exactly the events up to its
offset; dt restore starts from the nearest one. The kind is the best the target's
filesystem offers: a btrfs subvolume snapshot (target root is a subvolume), a reflink
copy (xfs, btrfs), else a link tree (files unchanged since the previous snapshot are
hard-linked to it, others copied; never sharing an inode with the live target).
Snapshots live beside the target root (<target>.dt-snapshots) unless snapshot_dir is set.
Each belongs to the connection that took it: a connection removed and made again to the
same target neither lists, restores from nor prunes the old one's (delete them by hand).

take asks the running daemon of the connection (dt protect) when there is one: it pauses
its applier for the copy and resumes it (root or group dtadmin). Without a daemon, take
holds the target's progress lock while copying, so no event is applied meanwhile. After
taking, snapshots beyond snapshot_max_count or older than snapshot_max_age_s are pruned
(the newest is always kept); prune does only that. A snapshot that a dt restore is
copying is not deleted: delete refuses it, prune keeps it until its next run. Scheduled
snapshots are the daemon's (snapshot_interval_s).
"""

from __future__ import annotations

import argparse
import inspect

from ...apply import snapshot as snapshots
from ...apply.progress import RECORD_FILE, Progress
from ...engine import history
from ...engine.daemon import connect
from ...engine.errors import BackendUnavailable, NotFound
from .. import output, stream


def register(subparsers, common) -> None:
    top = subparsers.add_parser("snapshot", help="take, list, delete and prune target snapshots",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="action", metavar="ACTION", required=True)
    for handler in (cmd_take, cmd_list, cmd_delete, cmd_prune):
        doc = inspect.cleandoc(handler.__doc__)
        p = sub.add_parser(handler.__name__.removeprefix("cmd_"), parents=[common], help=doc.splitlines()[0],
                           description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("connection", metavar="CONNECTION", help="connection id or name")
        p.set_defaults(func=handler)
        if handler is cmd_take:
            p.add_argument("--kind", choices=snapshots.KINDS, help="force a kind (default: the best available)")
        if handler is cmd_delete:
            p.add_argument("id", metavar="ID", help="snapshot id (dt snapshot list)")


def cmd_take(args) -> int:
    """Snapshot the target now, tagged with its applied offset (through the connection's
    daemon when one runs)."""
    with stream.open_state(args.state) as state:
        job = stream.job(state, args.connection)
        client = connect(state.dir, job.conn.source_root, timeout_s=None)
        if client is not None:
            with client:
                snap = snapshots.Snapshot.from_dict(client.call("snapshot_take", {"kind": args.kind}, timeout_s=None))
        else:
            snap = _take_standalone(state, job, args.kind)
    _show([snap], args)
    return 0


def _take_standalone(state, job, kind: str | None) -> snapshots.Snapshot:
    """Snapshot a target no daemon applies, holding its progress lock meanwhile; then prune."""
    if not (job.target_state_dir / RECORD_FILE).exists():
        raise NotFound(what=f"applied target of connection {job.conn.name} (nothing applied yet)",
                       name=job.conn.target_root)
    try:
        progress = Progress(job.target_state_dir)
    except BackendUnavailable:
        raise BackendUnavailable(backend=f"target of connection {job.conn.name}",
                                 detail="another applier (dt apply, or a daemon starting or stopping) "
                                        "is applying it; try again when it is done") from None
    folder = snapshots.snapshots_dir_for(job.conn, state.settings)
    stream = snapshots.stream_of(job.conn)
    try:
        applied = progress.applied_offset
        snap = snapshots.take_snapshot(job.conn.target_root, folder, applied,
                                       snapshots.applied_time(state.log, job.partition, applied), kind=kind,
                                       data_state=progress.data_state.value, stream=stream)
    finally:
        progress.close()
    snapshots.prune(folder, state.settings.snapshot_max_count, state.settings.snapshot_max_age_s, stream=stream)
    return snap


def cmd_list(args) -> int:
    """List the snapshots of a connection, oldest offset first."""
    with stream.open_state(args.state) as state:
        job = stream.job(state, args.connection)
        found = snapshots.list_snapshots(snapshots.snapshots_dir_for(job.conn, state.settings),
                                         snapshots.stream_of(job.conn))
    _show(found, args)
    return 0


def cmd_delete(args) -> int:
    """Delete one snapshot."""
    with stream.open_state(args.state) as state:
        job = stream.job(state, args.connection)
        snap = snapshots.delete_snapshot(snapshots.snapshots_dir_for(job.conn, state.settings), args.id,
                                         snapshots.stream_of(job.conn))
    if args.json:
        output.emit_json({"deleted": snap.id})
    else:
        print(f"deleted snapshot {snap.id} (offset {snap.offset})")
    return 0


def cmd_prune(args) -> int:
    """Delete snapshots beyond snapshot_max_count or older than snapshot_max_age_s."""
    with stream.open_state(args.state) as state:
        job = stream.job(state, args.connection)
        settings = state.settings
        gone = snapshots.prune(snapshots.snapshots_dir_for(job.conn, settings), settings.snapshot_max_count,
                               settings.snapshot_max_age_s, stream=snapshots.stream_of(job.conn))
    if args.json:
        output.emit_json({"deleted": [s.id for s in gone]})
    else:
        print(f"deleted {len(gone)} snapshot(s)")
    return 0


def _show(found: list, args) -> None:
    if args.json:
        output.emit_json([s.as_dict() for s in found])
        return
    output.table([{"id": s.id, "offset": s.offset,
                   "time": history.format_time(s.time_ns) if s.time_ns is not None else None,
                   "taken": history.format_time(s.taken_ns), "kind": s.kind, "reason": s.reason,
                   "data state": s.data_state} for s in found],
                 ["id", "offset", "time", "taken", "kind", "reason", "data state"])
