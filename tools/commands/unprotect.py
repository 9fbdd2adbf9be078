"""dt unprotect: stop protecting SOURCE and remove its connection.

A daemon protecting SOURCE is stopped cleanly through its control API (the capture is
unmounted and every captured change applied first). While it drains, a line on stderr
says every WAIT_NOTE_S seconds what is left and why, when its target keeps failing
(Retrying: a full disk, say); interrupting dt unprotect then leaves the daemon to finish
draining. Then the connection, its log partition and the target's progress record are
removed. The data on the target is kept, and so is
the replication set (dt set delete removes it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...engine.connection import ConnectionStore
from ...engine.daemon import connect, refuse_other_daemons, wait_stopped
from ...engine.errors import DtError
from ...engine.settings import Settings
from .. import output, runtime
from .status import connection_of

WAIT_NOTE_S = 10.0  # how often a daemon still draining is reported


def register(subparsers, common) -> None:
    p = subparsers.add_parser("unprotect", parents=[common], help="stop protecting SOURCE and remove its connection",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="protected directory (or connection name or id)")
    p.set_defaults(func=run)


def run(args) -> int:
    state_dir = Path(args.state)
    conn = connection_of(ConnectionStore(state_dir), args.source)
    stopped_pid = None
    client = connect(state_dir, conn.source_root, timeout_s=None)
    if client is not None:
        with client:
            stopped_pid = client.call("stop")["pid"]
        while not wait_stopped(state_dir, conn.source_root, timeout_s=WAIT_NOTE_S):
            print(f"dt unprotect: {_still_draining(state_dir, conn.source_root)}", file=sys.stderr, flush=True)
    if Settings.load(state_dir).log == "embedded":
        refuse_other_daemons(state_dir, None, "dt unprotect")
    with runtime.open_state(state_dir) as state:
        runtime.remove_connection(state, conn)
    report = {"connection": conn.name, "source": conn.source_root, "target": conn.target_root,
              "daemon_stopped": stopped_pid, "replication_set": conn.set_name,
              "note": f"the data in {conn.target_root} is kept; replication set {conn.set_name} is kept"}
    if args.json:
        output.emit_json(report)
    else:
        if stopped_pid is not None:
            print(f"stopped the daemon (pid {stopped_pid}) protecting {conn.source_root}")
        print(f"removed connection {conn.name} ({conn.source_root} -> {conn.target_root})")
        print(report["note"])
    return 0


def _still_draining(state_dir: Path, source_root: str) -> str:
    """What the stopping daemon has left to apply, and the error its target retries."""
    try:
        client = connect(state_dir, source_root, timeout_s=5)
        if client is None:
            return "waiting for the daemon to exit"
        with client:
            status = client.call("status", timeout_s=5)
    except (DtError, OSError):
        return "waiting for the daemon to finish stopping"
    note = f"waiting for the daemon to apply {status['queued_ops']} queued operations"
    if status.get("target_status") == "Retrying":
        note += f"; the target keeps failing: {status.get('target_status_detail')}"
    return note
