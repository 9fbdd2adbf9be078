"""The ``dt`` command line: parse, open resources, call one domain operation, print.

Each command lives in ``tools/commands/<name>.py`` and exposes ``register(subparsers,
common)``; ``common`` is a parent parser holding the options every command takes
(``--state``, ``--json``). The parser's ``func(args)`` returns an exit code.
Errors derived from DtError print their message (or JSON) and exit with their code;
anything else is a bug and exits 2 with a message rather than a traceback. A command line
argparse cannot read is a usage error like any other (DT-E001, exit 2, JSON with --json).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from typing import NoReturn

from .. import __version__
from ..engine import logs
from ..engine.errors import EXIT_ERROR, EXIT_INTERRUPTED, DtError, UsageError
from ..engine.settings import default_state_dir
from . import allocator, commands

log = logs.get(__name__)


class _Parser(argparse.ArgumentParser):
    """argparse's own refusals reported as every other usage error is (``_report``).
    Subparsers are made of the same class (argparse's default ``parser_class``)."""

    json_errors = False  # set by build_parser: the command line asks for --json

    def error(self, message: str) -> NoReturn:
        err = UsageError(detail=message).as_dict()
        if self.json_errors:
            print(json.dumps(err), file=sys.stderr)
        else:
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {err['message']} [{err['error']}]", file=sys.stderr)
        sys.exit(EXIT_ERROR)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of the one ``argv`` names: a command module
    imports what its command needs (the log, the applier, FUSE ...), so ``dt mirror``
    does not pay for the imports of ``dt protect`` before it starts."""
    _Parser.json_errors = "--json" in (argv or [])
    common = _Parser(add_help=False)
    common.add_argument("--state", default=None, metavar="DIR",
                        help=f"state directory (default: $DT_STATE or {default_state_dir()})")
    common.add_argument("--json", action="store_true", help="machine-readable JSON output")
    common.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                        help="log verbosity on stderr (default: warning)")
    parser = _Parser(
        prog="dt", description="datatether: real-time replication and failover on an ordered event log.",
        epilog="Exit codes: 0 success, 1 differences found, 2 error, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"dt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = sorted(info.name for info in pkgutil.iter_modules(commands.__path__))
    named = next((arg for arg in argv or [] if not arg.startswith("-")), None)
    for name in [named] if named in names else names:
        importlib.import_module(f"{commands.__name__}.{name}").register(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    allocator.keep_freed_buffers()
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.state is None:
        args.state = str(default_state_dir())
    logs.configure(json=args.json, level=args.log_level)
    try:
        return int(args.func(args) or 0)
    except DtError as exc:
        _report(args, exc.as_dict())
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except OSError as exc:
        _report(args, {"error": "DT-E100", "message": f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")})
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - a bug: a message and exit 2, the traceback at debug level
        log.debug("internal error", msgid="DT-E101", exc_info=True)
        _report(args, {"error": "DT-E101", "message": f"internal error, please report it: {type(exc).__name__}: {exc} "
                                                      "(--log-level debug shows where)"})
        return EXIT_ERROR


def _report(args, err: dict) -> None:
    if getattr(args, "json", False):
        print(json.dumps(err), file=sys.stderr)
    else:
        print(f"dt: error: {err['message']} [{err['error']}]", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
