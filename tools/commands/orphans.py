"""dt orphans: find, remove or move files on TARGET that SOURCE does not have.

  preview   list the orphans (exit 1 when there are some, 0 when none)
  remove    delete them, or with --move-to DIR move them below DIR (outside the set),
            never over what DIR holds: a taken name becomes <name>.1, <name>.2...

Only objects the set's rules would carry count: files matching an --exclude pattern are
never orphans; files outside the source set are. --older-than DURATION (30s, 15m, 2h,
7d) keeps orphans modified more recently than that (default: settings.orphans_older_than_s).
A directory goes only once nothing in it stays; the preview lists what remove would take.
TARGET must exist (a missing one is an error, exit 2).
Each orphan handled is written to the log (message id DT-M020), with a summary (DT-M021).
"""

from __future__ import annotations

import argparse
import re

from ...apply.orphans import process_orphans
from ...engine.errors import EXIT_DIFFERENT, EXIT_ERROR, EXIT_OK, UsageError
from .. import output, runtime

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> int:
    """Seconds in ``30s``, ``15m``, ``2h``, ``7d``, ``1w`` or a plain number of seconds."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", text or "")
    if not match:
        raise UsageError(detail=f"bad duration {text!r}: use a number with s, m, h, d or w (e.g. 7d)")
    return int(match.group(1)) * _UNITS[match.group(2)]


def register(subparsers, common) -> None:
    p = subparsers.add_parser("orphans", parents=[common], help="preview or remove orphan files on TARGET",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["preview", "remove"])
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("--move-to", metavar="DIR", help="move orphans below DIR instead of deleting them")
    p.add_argument("--older-than", metavar="DURATION",
                   help="only orphans not modified for this long (30s, 15m, 2h, 7d)")
    p.add_argument("--exclude", action="append", metavar="GLOB",
                   help="as for dt mirror (given, they replace the pair's stored excludes, else those are kept): "
                        "excluded names are never orphans")
    p.set_defaults(func=run)


def run(args) -> int:
    older = None if args.older_than is None else parse_duration(args.older_than)
    with runtime.open_state(args.state) as state:
        job = runtime.adhoc_job(state, args.source, args.target, args.exclude, existing_target=True)
        runtime.drained(job)
        # An empty --move-to is a move without a folder (refused), never a removal.
        action = "preview" if args.action == "preview" else ("delete" if args.move_to is None else "move")
        older = state.settings.orphans_older_than_s if older is None else older
        result = process_orphans(job.conn.target_root, job.rset, job.scan().exists, action=action,
                                 move_to=args.move_to, older_than_s=older)
    summary = {"action": action, "orphans": result.count, "files": result.files, "directories": result.dirs,
               "bytes": result.bytes, "kept_recent": result.kept_recent, "failed": len(result.failed)}
    if args.json:
        output.emit_json({**summary, "paths": result.paths, "failures": result.failed})
    else:
        if result.paths:
            output.table([{"path": p} for p in result.paths], ["path"])
            print()
        output.pairs(summary | {"bytes": output.human_bytes(result.bytes)})
        for failure in result.failed:
            print(f"failed: {failure}")
    if result.failed:
        return EXIT_ERROR
    if action == "preview" and result.count:
        return EXIT_DIFFERENT
    return EXIT_OK
