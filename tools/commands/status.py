"""dt status: every connection of the state directory, with its states and statistics.

For each connection: state, mirror status, replication status, transmit mode, target data
state, target status (with the error it retries while Retrying), queued operations and
bytes (source queue: captured and not applied yet), sent bytes (applied on the target by
the running daemon), applied and end offsets, recovery point latency in milliseconds (current: age of the oldest event not applied yet; p50 and
p99 of capture-to-applied times over the last minute of the latest run) and the last file
applied.

A running daemon answers through its control API (root and groups dtadmin, dtmonitor may
ask). Without one, the figures come from what was saved (the log, read only, and the
target's progress record) and the replication status is Stopped. While the log is
unreachable (a Kafka cluster away) a daemon still answers: the end offset is the one it
appended, shown with the log's error, and the current latency is unknown.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ...apply.progress import Progress
from ...engine.connection import Connection, ConnectionStore
from ...engine.daemon import connect, current_latency_ms
from ...engine.errors import BackendUnavailable, NotFound
from ...engine.log import Log
from ...engine.queue import QueueLimits, SourceQueue
from ...engine.settings import Settings
from ...engine.states import MirrorStatus, ReplicationStatus, TransmitMode
from .. import output, runtime

SHOWN = ("state", "mirror_status", "replication_status", "transmit_mode", "target_data_state",
         "target_status", "queued_ops", "queued_bytes", "sent_bytes", "applied_offset", "end_offset",
         "recovery_point_latency_ms", "last_file", "pid")


def register(subparsers, common) -> None:
    p = subparsers.add_parser("status", parents=[common], help="states and statistics of every connection",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("connection", nargs="?", metavar="CONNECTION",
                   help="only this connection (name, id or source directory)")
    p.set_defaults(func=run)


def run(args) -> int:
    state_dir = Path(args.state)
    store = ConnectionStore(state_dir)
    conns = store.list() if args.connection is None else [connection_of(store, args.connection)]
    statuses = collect(state_dir, conns)
    if args.json:
        output.emit_json({"connections": statuses})
        return 0
    if not statuses:
        print(f"no connections in {state_dir} (start one with: dt protect SOURCE --to TARGET)")
    for i, status in enumerate(statuses):
        if i:
            print()
        print(f"{status['connection']} (id {status['id']}): {status['source']} -> {status['target']}")
        output.pairs({key.replace("_", " "): _shown(key, status) for key in SHOWN})
    return 0


def collect(state_dir: Path, conns: list[Connection]) -> list[dict]:
    """Live status of connections with a daemon, saved status of the others."""
    statuses: dict[int, dict] = {}
    stopped = []
    for conn in conns:
        try:
            client = connect(state_dir, conn.source_root)
        except BackendUnavailable:  # between taking its lock and serving, or after serving
            stopped.append((conn, "starting or stopping"))
            continue
        if client is None:
            stopped.append((conn, "stopped"))
            continue
        with client:
            statuses[conn.id] = client.call("status")
    if stopped:
        settings = Settings.load(state_dir)
        log_ = open_log_readonly(state_dir, settings)
        try:
            for conn, daemon_state in stopped:
                statuses[conn.id] = saved_status(state_dir, conn, settings, log_, daemon_state)
        finally:
            if log_ is not None:
                log_.close()
    return [statuses[c.id] for c in conns]


def open_log_readonly(state_dir: Path, settings: Settings) -> Log | None:
    """The state directory's log opened for reading beside a daemon; None if none exists."""
    if settings.log != "embedded":
        return runtime.open_log(state_dir, settings)
    from ...engine.log_embedded import EmbeddedLog
    try:
        return EmbeddedLog.open_readonly(state_dir / "log")
    except NotFound:
        return None


def saved_status(state_dir: Path, conn: Connection, settings: Settings, log_: Log | None,
                 daemon_state: str = "stopped") -> dict:
    """The status of a connection without a daemon answering, from what was saved."""
    snap = Progress.read_snapshot(state_dir / "targets" / conn.partition)
    applied = snap["applied_offset"]
    queue = None
    if log_ is not None and conn.partition in log_.partitions():
        queue = SourceQueue(log_, conn.partition, QueueLimits.from_settings(settings), lambda: applied,
                            state_dir).stats()
        end = log_.end_offset(conn.partition)
    else:
        end = applied + 1
    latency = dict(snap.get("recovery_point_latency_ms") or {})
    latency["current"] = current_latency_ms(log_, conn.partition, applied) if queue else 0.0
    return {
        "connection": conn.name, "id": conn.id, "source": conn.source_root, "target": conn.target_root,
        "replication_set": conn.set_name, "partition": conn.partition, "pid": None, "daemon": daemon_state,
        "state": daemon_state, "mirror_status": MirrorStatus.IDLE.value, "mirror": None,
        "replication_status": ReplicationStatus.STOPPED.value, "transmit_mode": TransmitMode.STOPPED.value,
        "target_data_state": snap["target_data_state"],
        "target_data_state_reason": snap.get("target_data_state_reason"),
        "target_status": snap.get("target_status"),
        "target_status_detail": snap.get("target_status_detail") or None,
        "queued_bytes": queue.bytes if queue else 0, "queued_ops": queue.ops if queue else 0,
        "memory_queue_bytes": queue.memory_bytes if queue else 0,
        "disk_queue_bytes": queue.disk_bytes if queue else 0,
        "queue_limit_bytes": queue.limit_bytes if queue else None,
        "free_bytes": queue.free_bytes if queue else None, "queue_overflow": None,
        "sent_bytes": 0, "applied_offset": applied, "end_offset": end, "log_unreachable": None,
        "recovery_point_latency_ms": latency, "last_file": snap.get("last_file"),
        "capture": "stopped",
    }


def _shown(key: str, status: dict):
    value = status.get(key)
    if key == "target_status" and status.get("target_status_detail"):  # why it is Retrying, say
        return f"{value}: {status['target_status_detail']}"
    if key == "end_offset" and status.get("log_unreachable"):  # as the daemon appended it
        return f"{value} (the log is unreachable: {status['log_unreachable']})"
    if key in ("queued_bytes", "sent_bytes"):
        return output.human_bytes(value)
    if key == "recovery_point_latency_ms":
        value = value or {}
        return " ".join(f"{k} {'-' if value.get(k) is None else f'{value[k]:.1f}'}"
                        for k in ("current", "p50", "p99")) + f" (over {value.get('window_s', 60):.0f} s)"
    return value


def connection_of(store: ConnectionStore, ref: str) -> Connection:
    """The connection named ``ref`` (name or id) or protecting the directory ``ref``."""
    found = store.find(ref)
    if found is not None:
        return found
    source = os.path.realpath(ref)
    for conn in store.list():
        if conn.source_root == source:
            return conn
    raise NotFound(what="connection (name, id or source directory)", name=ref)
