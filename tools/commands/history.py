"""dt history: what changed in a connection's replicated data, from its change stream.

  dt history CONNECTION [--path GLOB] [--between A B] [--summary]
  dt history export CONNECTION --parquet FILE [--path GLOB] [--between A B]

The listing shows one line per event: offset, time (ISO 8601, UTC), operation, path(s),
payload bytes (the same lines as dt tail). --summary shows one line per path instead:
events, bytes, first and last offset, time and operation of the last change.

--between A B limits the range; A and B are offsets or ISO 8601 times (Z or +HH:MM; a
time without an offset is UTC), both ends included. A point older than the retained
history is refused and the message says how far back one can go. --path GLOB keeps
events naming a matching path or a path beneath a matching directory (docs selects
docs/a.txt; '*' also matches '/').

export writes a Parquet file with one row per event: offset, time (timestamp, ns, UTC),
operation, path, path2 (a rename's destination), dir (parent of path), bytes,
connection. For example, in DuckDB, bytes changed per directory per hour:

  SELECT dir, date_trunc('hour', time) AS hour, sum(bytes) AS bytes
  FROM 'history.parquet' GROUP BY dir, hour ORDER BY hour, dir;

A connection literally named "export" is listed with `dt history export`.
"""

from __future__ import annotations

import argparse

from ...engine import history
from ...engine.errors import UsageError
from .. import output, stream
from .tail import json_line, print_events


def register(subparsers, common) -> None:
    p = subparsers.add_parser("history", parents=[common], help="list or export what changed (by path, time, offset)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              usage="dt history [export] CONNECTION [options]")
    p.add_argument("words", nargs="+", metavar="CONNECTION", help="connection id or name (after 'export' to export)")
    p.add_argument("--path", metavar="GLOB", help="only events naming a matching path (or one beneath a matching directory)")
    p.add_argument("--between", nargs=2, metavar=("A", "B"), help="only events from A to B (offsets or times, inclusive)")
    p.add_argument("--summary", action="store_true", help="one line per path instead of one per event")
    p.add_argument("--parquet", metavar="FILE", help="export: the Parquet file to write")
    p.set_defaults(func=run)


def run(args) -> int:
    exporting = len(args.words) == 2 and args.words[0] == "export"
    if len(args.words) != 1 and not exporting:
        raise UsageError(detail="use: dt history CONNECTION ... or dt history export CONNECTION --parquet FILE")
    if exporting and not args.parquet:
        raise UsageError(detail="dt history export needs --parquet FILE")
    if args.parquet and not exporting:
        raise UsageError(detail="--parquet belongs to dt history export CONNECTION")
    between = [history.parse_point(p) for p in args.between] if args.between else None
    with stream.open_state(args.state) as state:
        job = stream.job(state, args.words[-1])
        first, stop = history.range_for(state.log, job.partition, between)
        events = history.read(state.log, job.partition, first, stop, glob=args.path)
        if exporting:
            return _export(args, events, job.conn.name, first, stop)
        if args.summary:
            return _summary(args, events)
        print_events(events, args.json)
    return 0


def _summary(args, events) -> int:
    summaries = history.summarize(events, args.path)
    if args.json:
        for s in summaries:
            print(json_line({"path": s.path, "events": s.events, "bytes": s.bytes, "first_offset": s.first_offset,
                             "last_offset": s.last_offset, "last_time": history.format_time(s.last_time_ns),
                             "last_op": s.last_op}))
        return 0
    output.table([{"path": history.display_path(s.path), "events": s.events, "bytes": s.bytes,
                   "first": s.first_offset, "last": s.last_offset,
                   "last time": history.format_time(s.last_time_ns), "last op": s.last_op} for s in summaries],
                 ["path", "events", "bytes", "first", "last", "last time", "last op"])
    return 0


def _export(args, events, connection: str, first: int, stop: int) -> int:
    from ...engine.history_export import export_parquet  # pyarrow loads only for exports

    rows = export_parquet(events, args.parquet, connection)
    result = {"file": args.parquet, "rows": rows, "first_offset": first, "end_offset": stop}
    if args.json:
        output.emit_json(result)
    else:
        print(f"exported {rows} event(s) (offsets {first}..{stop - 1}) to {args.parquet}")
    return 0
