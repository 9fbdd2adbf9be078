"""dt restore: materialise a connection's replicated tree as it was at an offset or a time.

  dt restore CONNECTION --at OFFSET|TIME --into DIR [--path GLOB]

The state at offset N holds every event up to and including N; at TIME, every event
recorded at or before TIME (ISO 8601 with Z or an offset such as +02:00; a time without
an offset is UTC). It is rebuilt from the newest target snapshot at or before that point
(dt snapshot) plus the events after it, applied as the target applies them; without a
snapshot, from the beginning of the log if the log still holds it. How far back one can
go is bounded by the oldest snapshot and the log's retention (history window and size);
a point outside says so, with what is reachable.

DIR must be empty or absent, and apart from the source, the target, its snapshots and
the state directory. Nothing is written to DIR unless the restore succeeds (what a restore
killed mid-way leaves, a hidden .dt-restore-PID folder, the next restore into DIR removes).
--path GLOB restores only matching paths (and what is beneath them, with the directories
leading to them).
Errors (exit 2): unknown connection, a point after the end or before what is reachable,
a corrupt record on the way (its offset is named; nothing from it is applied), DIR not
empty.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ...apply.restore import restore
from ...apply.snapshot import snapshots_dir_for, stream_of
from ...engine import history
from .. import output, stream


def register(subparsers, common) -> None:
    p = subparsers.add_parser("restore", parents=[common], help="materialise the replicated tree at an offset or time",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("connection", metavar="CONNECTION", help="connection id or name")
    p.add_argument("--at", required=True, metavar="OFFSET|TIME", help="the point to restore")
    p.add_argument("--into", required=True, metavar="DIR", help="empty or new directory to restore into")
    p.add_argument("--path", metavar="GLOB", help="restore only matching paths")
    p.set_defaults(func=run)


def run(args) -> int:
    point = history.parse_point(args.at)
    into = Path(args.into).absolute()
    with stream.open_state(args.state) as state:
        job = stream.job(state, args.connection)
        conn = job.conn
        stream.check_apart(into, job)
        done = restore(state.log, job.partition, point, into, snapshots_dir=snapshots_dir_for(conn, state.settings),
                       source_root=job.rset.root, target_root=conn.target_root, settings=state.settings,
                       glob=args.path, stream=stream_of(conn))
    result = {"connection": conn.name, "offset": done.offset,
              "time": history.format_time(done.time_ns) if done.time_ns is not None else None,
              "snapshot": done.snapshot, "replayed": done.replayed, "target_data_state": done.data_state,
              "into": done.into}
    if args.json:
        output.emit_json(result)
    else:
        output.pairs(result)
        if done.data_state != "OK":
            print(f"note: at that point the target was {done.data_state}: the tree is what the target held then")
    return 0
