"""dt verify: compare SOURCE with its replica TARGET; optionally remirror what differs.

Each differing object is listed with what differs (missing, type, size, mtime, mode,
owner, xattrs, link target, device, hard link, extra hard link, content blocks), and
the verification is written to the replication set's verification log in the state directory
("<set> verify.log": begin and end markers, one line per difference, totals).

  --checksum   compare the blocks of every file (finds changes that keep size and time;
               the report names the differing blocks, a remirror sends only those)
  --newer      remirror only files newer on the source (all differences are reported)
  --remirror   send what differs to the target, through the log and the applier

TARGET must exist; only --remirror creates a missing one. Excludes given with --exclude
replace the pair's stored ones; without it the stored ones are kept.

Exit codes: 0 identical, 1 differences found (also when they were remirrored: the
report shows the state before the remirror), 2 error.
"""

from __future__ import annotations

import argparse

from ...engine.errors import EXIT_DIFFERENT, EXIT_OK, MirrorIncomplete, VerifyIncomplete
from ...engine.verify import verify
from .. import output, runtime


def register(subparsers, common) -> None:
    p = subparsers.add_parser("verify", parents=[common], help="verify TARGET against SOURCE (and remirror)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("--checksum", action="store_true", help="compare the blocks of every file")
    p.add_argument("--newer", action="store_true", help="remirror only files newer on the source")
    p.add_argument("--remirror", action="store_true", help="mirror what differs to the target")
    p.add_argument("--exclude", action="append", metavar="GLOB",
                   help="as for dt mirror: given, they replace the pair's stored excludes, else those are kept")
    p.set_defaults(func=run)


def run(args) -> int:
    with runtime.open_state(args.state) as state, runtime.ProgressBar.for_args(args, "verify") as bar:
        job = runtime.adhoc_job(state, args.source, args.target, args.exclude,
                                  make_target=args.remirror, existing_target=not args.remirror)

        def check(log=None, locks=None):
            return verify(job.source_view(), job.target_view(), state.settings, set_name=job.rset.name,
                          state_dir=state.dir, checksum=args.checksum, newer_only=args.newer,
                          remirror=args.remirror, event_log=log, partition=job.partition, locks=locks,
                          position_path=job.position_path, link_map=job.link_map(), progress=bar)

        if args.remirror:
            result, outcome = runtime.apply_while(job, check)
        else:
            outcome = runtime.drained(job)
            result = check()
        orphans = runtime.auto_orphans(job)
    bar.close()
    diffs = [{"path": d.path or ".", "kind": d.kind.lower(), "aspects": d.aspects, "what": "; ".join(d.details),
              "blocks": d.blocks} for d in result.differences]
    if args.json:
        output.emit_json({"connection": job.conn.name, "set": job.rset.name, "source": job.rset.root,
                          "target": job.conn.target_root, "identical": result.identical,
                          "totals": result.totals(), "differences": diffs, "problems": result.stats.problems,
                          "remirrored": result.remirrored, "verify_log": result.log_path,
                          "target_data_state": outcome.data_state,
                          "orphans": None if orphans is None else {"action": orphans.action,
                                                                   "count": orphans.count,
                                                                   "paths": orphans.paths}})
    else:
        if diffs:
            output.table(diffs, ["path", "kind", "what"])
            print()
        verdict = "different" if result.differences else ("incomplete" if result.stats.problems else "identical")
        output.pairs({**result.totals(), "result": verdict,
                      "verify log": result.log_path, "target data state": outcome.data_state,
                      "orphans": "-" if orphans is None else f"{orphans.count} ({orphans.action})"})
    if result.stats.problems:
        problems = result.stats.problems
        incomplete = MirrorIncomplete if args.remirror else VerifyIncomplete
        raise incomplete(count=len(problems), shown="; ".join(problems[:10]))
    return EXIT_OK if result.identical else EXIT_DIFFERENT
