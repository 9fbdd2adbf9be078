"""dt tail: print a connection's change stream, one event per line, as it is appended.

Each line: offset, time (ISO 8601, UTC, nanoseconds), operation, path(s) (for a task: its
name and id, or its id and exit status), payload bytes.
With --json, one JSON object per line (fields: offset, time, time_ns, op, paths, bytes,
record_bytes, origin, event_time_ns, fields); it is pure ASCII: a path that is not
UTF-8 keeps its bytes as \\udcNN escapes (Python: os.fsencode(path) gives the bytes back).

Where to start: the last --lines events (default 10), or --from OFFSET, or --since TIME
(the first event at or after TIME; ISO 8601 with Z or an offset such as +02:00; a time
without an offset is UTC). A point older than what the log retains is refused and the
message says how far back one can go. --follow keeps printing new events until
interrupted (Ctrl-C ends it normally, exit 0); events that retention drops before they
are printed are passed over with a warning naming their offsets (DT-H030); a log that
does not answer (a Kafka cluster away) is waited for, with a warning (DT-H031).
CONNECTION is a connection id or name.
Works beside a running daemon, on the embedded and the Kafka backend alike.
"""

from __future__ import annotations

import argparse
import json
import threading
from typing import Iterable

from ...engine import history
from ...engine.history import HistoryEvent
from .. import output, runtime, stream

DEFAULT_LINES = 10


def register(subparsers, common) -> None:
    p = subparsers.add_parser("tail", parents=[common], help="print a connection's change stream (--follow: as it grows)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("connection", metavar="CONNECTION", help="connection id or name")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--from", dest="start", metavar="OFFSET", type=_offset, help="start at this offset")
    start.add_argument("--since", metavar="TIME", type=_time, help="start at the first event at or after TIME")
    start.add_argument("-n", "--lines", type=int, default=DEFAULT_LINES, metavar="N",
                       help=f"start with the last N events (default {DEFAULT_LINES})")
    p.add_argument("--path", metavar="GLOB", help="only events naming a matching path (or one beneath a matching directory)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events until interrupted")
    p.set_defaults(func=run)


def _offset(text: str) -> history.Point:
    if not history.is_offset(text):
        raise argparse.ArgumentTypeError(f"not an offset: {text!r}")
    return history.Point(offset=int(text))


def _time(text: str) -> history.Point:
    try:
        return history.Point(time_ns=history.parse_time(text))
    except Exception as exc:  # argparse reports it as a usage error
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args) -> int:
    with stream.open_state(args.state) as state:
        job = stream.job(state, args.connection)
        log, partition = state.log, job.partition
        point = args.start or args.since
        if point is None:
            first = max(log.start_offset(partition), log.end_offset(partition) - max(args.lines, 0))
        else:
            first = history.start_for(log, partition, point)
        interrupted = threading.Event()
        with runtime.stop_signals(interrupted.set):
            if args.follow:
                events = history.follow(log, partition, first, glob=args.path, stop=interrupted)
            else:
                events = history.read(log, partition, first, max(first, log.end_offset(partition)), glob=args.path)
            print_events(events, args.json, flush=args.follow, stop=interrupted)
    return 0


def print_events(events: Iterable[HistoryEvent], as_json: bool, flush: bool = False,
                 stop: threading.Event | None = None) -> None:
    """One line per event (shared by dt history), until ``stop`` is set."""
    for hev in events:
        if stop is not None and stop.is_set():
            return
        print(event_line(hev, as_json), flush=flush)


def json_line(obj: dict) -> str:
    """ASCII JSON: paths with surrogate-escaped bytes print on any terminal or pipe."""
    return json.dumps(obj, ensure_ascii=True)


def event_line(hev: HistoryEvent, as_json: bool) -> str:
    if as_json:
        return json_line(history.as_dict(hev))
    size = output.human_bytes(hev.bytes) if hev.bytes else "-"
    return f"{hev.offset:>8}  {history.format_time(hev.time_ns)}  {hev.op:<13} {history.describe(hev)}  {size}"
