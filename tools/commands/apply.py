"""dt apply: feed one more target from a connection's change stream (one-to-many).

  dt apply CONNECTION --to DIR --consumer NAME [--follow] [--run-tasks]

An independent applier applies the connection's events to DIR, in order and exactly once
in effect, like the connection's own target, while the source captures and sends each
change once. NAME identifies this target: its applied offset is kept in
<state>/consumers/<partition>/<NAME>/ (apply/progress.py), and its consumer offset is
committed to the log under NAME (Kafka: a consumer group of its own), so retention keeps
the events it has not applied yet. On the embedded log the consumer offset cannot be
recorded while a daemon holds the log, nor ever with --follow (the log has one writer,
and a follower holding it would keep dt protect from starting): the log is read-only to
such a dt apply and a warning says so; the applied offset still is recorded, and events
retention removed before this target applied them make it Mirror Required.

Without --follow it applies what the log holds now and exits; with --follow it keeps
applying until interrupted (Ctrl-C or SIGTERM: it stops after the current batch, exit 0).
Task commands in the stream run only with --run-tasks; their results are not added to
the stream (they belong to the connection's own target). A NAME always feeds the DIR it
was first used with. DIR must be apart from the source, the connection's own target, its
snapshots and the state directory.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

from ...apply.applier import Applier
from ...apply.progress import Progress
from ...engine.durable import write_atomic
from ...engine.errors import ApplyFailed, InvalidName, UsageError
from ...engine.log import check_partition_name
from ...engine.log_view import LogView
from ...engine.states import TargetStatus
from .. import output, runtime, stream

RESERVED = ("applier", "restore")  # the connection's own target; restores


def register(subparsers, common) -> None:
    p = subparsers.add_parser("apply", parents=[common], help="apply a connection's stream to one more target",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("connection", metavar="CONNECTION", help="connection id or name")
    p.add_argument("--to", required=True, metavar="DIR", help="the additional target directory")
    p.add_argument("--consumer", required=True, metavar="NAME", help="name of this target's consumer offset")
    p.add_argument("-f", "--follow", action="store_true", help="keep applying new events until interrupted")
    p.add_argument("--run-tasks", action="store_true", help="run task commands found in the stream on this target")
    p.set_defaults(func=run)


def consumer_dir(state_dir: Path, partition: str, consumer: str) -> Path:
    return Path(state_dir) / "consumers" / partition / consumer


def run(args) -> int:
    check_partition_name(args.consumer)
    if args.consumer in (".", ".."):  # the name is a folder under consumers/<partition>/
        raise InvalidName(name=args.consumer, reason="'.' and '..' are folders, not a consumer's own")
    if args.consumer in RESERVED:
        raise UsageError(detail=f"consumer name {args.consumer!r} is reserved; choose another")
    to = Path(args.to).absolute()
    # A follower runs for days: holding the embedded log's one writer would keep the
    # connection's daemon from starting; catching up is short, and records its offset.
    with stream.open_state(args.state, write=not args.follow) as state:
        job = stream.job(state, args.connection)
        stream.check_apart(to, job)
        folder = consumer_dir(state.dir, job.partition, args.consumer)
        _bind(folder, to)
        progress = Progress(folder)
        settings = state.settings.replace(task_commands=args.run_tasks)
        applier = Applier(LogView(state.log), job.partition, to, job.rset.root, progress, settings,
                          consumer=args.consumer)
        try:
            if args.follow:
                _follow(applier)
            else:
                _catch_up(applier, state.log.end_offset(job.partition) - 1, state.settings.retry_delay_s)
        finally:
            applier.close()
            progress.close()
        result = {"connection": job.conn.name, "consumer": args.consumer, "target": str(to),
                  "applied_offset": progress.applied_offset, "end_offset": state.log.end_offset(job.partition),
                  "target_data_state": progress.data_state.value,
                  "target_data_state_reason": progress.data_state_reason}
    if args.json:
        output.emit_json(result)
    else:
        output.pairs(result)
    return 0


def _bind(folder: Path, to: Path) -> None:
    """A consumer's progress is about one directory: refuse to point it at another."""
    record = folder / "target"
    if record.exists():
        bound = record.read_text()
        if bound != str(to):
            raise UsageError(detail=f"consumer {folder.name} feeds {bound}, not {to}; use another --consumer")
        return
    write_atomic(record, str(to).encode())


def _catch_up(applier: Applier, last: int, retry_delay_s: float) -> None:
    """Apply up to ``last``; give up after runtime.APPLY_ATTEMPTS failed tries of one event."""
    attempts = 0
    stop = threading.Event()
    while applier.applied_offset < last:
        applied = applier.run_once()
        if applier.progress.status is TargetStatus.RETRYING:
            attempts += 1
            if attempts >= runtime.APPLY_ATTEMPTS:
                raise ApplyFailed(detail=applier.progress.status_detail)
            stop.wait(retry_delay_s)
        elif applied == 0:
            break
        else:
            attempts = 0


def _follow(applier: Applier) -> None:
    stop = threading.Event()
    with runtime.stop_signals(stop.set):
        applier.run(stop)
