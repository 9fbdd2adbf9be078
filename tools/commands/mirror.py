"""dt mirror: copy SOURCE to TARGET through the log and the applier, then report.

Modes (one of --diff, --checksum, --checksum-all, or --newer; the default is a full
mirror; two of the first three together are refused):
  --diff          send files whose size or modification time differ, whole
  --newer         send files newer on the source, whole (combines with --checksum)
  --checksum      compare the blocks of files whose size or time differ; send only
                  the blocks whose blake3 digests differ
  --checksum-all  compare the blocks of every file (finds changes that keep size and time)

Mode, owner, times, xattrs, symlinks, hard links within the set and sparse files are
kept. The SOURCE/TARGET pair gets a replication set and a connection the first time
(`dt set show` names them mirror-<source>-<hash>); later runs reuse them. An
interrupted mirror (Ctrl-C, a crash) continues where it stopped when run again with
the same options. With orphans_action (delete or move) in the state's config.toml,
orphans are handled after the mirror (see dt orphans). Objects that cannot be read are reported; the rest is mirrored, the
target is left Mirror Required and the exit code is 2.
"""

from __future__ import annotations

import argparse

from ...engine.errors import MirrorIncomplete
from ...engine.mirror import Mirror
from ...engine.states import MirrorMode
from .. import output, runtime


def register(subparsers, common) -> None:
    p = subparsers.add_parser("mirror", parents=[common], help="mirror SOURCE to TARGET (full, differences, checksum)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="directory to mirror")
    p.add_argument("target", metavar="TARGET", help="directory that becomes its replica")
    # One way of comparing; --newer narrows any of them (with --diff it is --newer alone).
    compare = p.add_mutually_exclusive_group()
    compare.add_argument("--diff", action="store_true", help="only files whose size or time differ")
    compare.add_argument("--checksum", action="store_true", help="send only differing blocks of differing files")
    compare.add_argument("--checksum-all", action="store_true", help="compare the blocks of every file")
    p.add_argument("--newer", action="store_true", help="only files newer on the source")
    p.add_argument("--exclude", action="append", metavar="GLOB",
                   help="exclude matching names (recursive; relative to SOURCE, or absolute inside it); "
                        "repeatable; given, they replace the pair's stored excludes, else those are kept")
    p.set_defaults(func=run)


def mode_of(args) -> tuple[MirrorMode, bool]:
    """(mode, newer_only) from the flags."""
    if args.checksum_all:
        return MirrorMode.CHECKSUM_ALL, args.newer
    if args.checksum:
        return MirrorMode.CHECKSUM, args.newer
    if args.newer:
        return MirrorMode.NEWER, True
    return (MirrorMode.DIFF if args.diff else MirrorMode.FULL), False


def run(args) -> int:
    mode, newer = mode_of(args)
    with runtime.open_state(args.state) as state, runtime.ProgressBar.for_args(args, "mirror") as bar:
        job = runtime.adhoc_job(state, args.source, args.target, args.exclude, make_target=True)
        mirrors: list[Mirror] = []

        def produce(log, locks):
            mirrors.append(Mirror(job.source_view(), job.target_view(), log, job.partition, state.settings,
                                  locks, mode=mode, newer_only=newer, position_path=job.position_path,
                                  progress=bar, link_map=job.link_map()))
            return mirrors[0].run()

        # A checksum mirror mostly reads and compares, and sends little: its applier runs
        # in a thread (a process costs ~0.2 s of start-up, on the core the comparison
        # hashes with). The other modes send whole files: the applier gets a process.
        checksum = mode in (MirrorMode.CHECKSUM, MirrorMode.CHECKSUM_ALL)
        stats, outcome = runtime.apply_while(job, produce, on_apply_failure=lambda: mirrors and mirrors[0].pause(),
                                             separate_process=not checksum)
        orphans = runtime.auto_orphans(job)
    bar.close()
    report = {"connection": job.conn.name, "set": job.rset.name, "source": job.rset.root,
              "target": job.conn.target_root, **stats.as_dict(),
              "target_data_state": outcome.data_state, "applied_offset": outcome.applied,
              "orphans": None if orphans is None else {"action": orphans.action, "count": orphans.count,
                                                       "bytes": orphans.bytes, "failed": orphans.failed}}
    if args.json:
        output.emit_json(report)
    else:
        output.pairs({k: report[k] for k in ("connection", "source", "target", "mode", "mirror_id")} | {
            "objects": f"{stats.objects} examined, {stats.sent_objects} sent",
            "sent": output.human_bytes(stats.sent_bytes),
            "skipped": output.human_bytes(stats.skipped_bytes),
            "elapsed": f"{stats.elapsed_s:.2f} s" + (" (resumed)" if stats.resumed else ""),
            "target data state": outcome.data_state,
            "orphans": "-" if orphans is None else f"{orphans.count} ({orphans.action})",
            "problems": len(stats.problems)})
    if stats.problems:
        shown = "; ".join(stats.problems[:10]) + (" ..." if len(stats.problems) > 10 else "")
        raise MirrorIncomplete(count=len(stats.problems), shown=shown)
    return 0
