"""dt task: insert a task command into a connection's stream.

The target runs COMMAND once every operation captured before the task is applied and
before any operation captured after it (for example a snapshot or a backup of a
consistent point). Its exit status and output are recorded in the log; a failing task
does not stop replication. The command runs on the target with the target root as its
working directory and DT_TASK_ID, DT_TASK_NAME, DT_APPLIED_OFFSET and DT_TARGET in its
environment.

Prints the task id. With --wait, waits for the task to run and prints its exit status
and output; the exit status of dt is then 0 when the task succeeded and 1 when it did not.
Needs a running daemon (dt protect) and membership of group dtadmin (or root).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ...engine.connection import ConnectionStore
from ...engine.daemon import DEFAULT_TASK_TIMEOUT_S, MAX_TASK_TIMEOUT_S, connect, running_daemons, task_timeout_s
from ...engine.errors import EXIT_DIFFERENT, BackendUnavailable, UsageError
from .. import output
from .status import connection_of


def register(subparsers, common) -> None:
    p = subparsers.add_parser("task", parents=[common], help="run a command on the target at this point of the stream",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              usage="dt task NAME [--connection REF] [--wait] [--timeout S] -- COMMAND [ARG ...]")
    p.add_argument("name", metavar="NAME", help="a name for the task (shown in its result)")
    p.add_argument("command", nargs="+", metavar="COMMAND", help="program and arguments (after --)")
    p.add_argument("--connection", metavar="REF",
                   help="connection name, id or source directory (default: the only running daemon)")
    p.add_argument("--wait", action="store_true", help="wait for the result and print it")
    p.add_argument("--timeout", type=int, default=DEFAULT_TASK_TIMEOUT_S, metavar="S",
                   help=f"kill the task after S seconds, at most {MAX_TASK_TIMEOUT_S} "
                        f"(0: never; default {DEFAULT_TASK_TIMEOUT_S})")
    p.set_defaults(func=run)


def run(args) -> int:
    task_timeout_s(args.timeout)
    state_dir = Path(args.state)
    source = _source(state_dir, args.connection)
    client = connect(state_dir, source, timeout_s=None if args.wait else 30.0)
    if client is None:
        raise BackendUnavailable(backend="daemon", detail=f"no daemon protects {source} (start it with dt protect)")
    with client:
        answer = client.call("task", {"name": args.name, "argv": args.command, "timeout_s": args.timeout,
                                      "wait": args.wait}, timeout_s=None if args.wait else 30.0)
    result = answer.get("result")
    if args.json:
        output.emit_json(answer)
    elif not args.wait:
        print(answer["task_id"])
    elif result is None:
        print(f"{answer['task_id']}: the daemon stopped before the task ran; it runs when it starts again")
    else:
        print(f"{answer['task_id']}: exit status {result['exit_status']}")
        if result["output"]:
            print(result["output"], end="" if result["output"].endswith("\n") else "\n")
    if args.wait and (result is None or result["exit_status"] != 0):
        return EXIT_DIFFERENT
    return 0


def _source(state_dir: Path, ref: str | None) -> str:
    if ref is not None:
        return connection_of(ConnectionStore(state_dir), ref).source_root
    running = running_daemons(state_dir)
    if len(running) == 1:
        return running[0]["source"]
    if not running:
        raise BackendUnavailable(backend="daemon", detail=f"no daemon runs in {state_dir} (start one with dt protect)")
    raise UsageError(detail="several daemons run; choose one with --connection: "
                            + ", ".join(d["source"] for d in running))
