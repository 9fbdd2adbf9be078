"""dt set: create, inspect and change replication sets (the data a connection protects).

A set is a named list of rules. Each rule is an absolute path (the last component may hold
wildcards such as *.db), include or exclude, recursive or not. The most specific rule that
applies to a path decides; a non-recursive rule is discarded when a recursive rule of the
same type already covers it. Every save increments the set's generation; pass
--generation N to refuse the change if someone else saved the set since you read it.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time

from ...engine.connection import ConnectionStore
from ...engine.errors import AlreadyExists, UsageError
from ...engine.replset import ReplicationSet, SetStore, calculate_size, overlapping_sets, to_json
from ...engine.rules import parse_rule
from .. import output


def register(subparsers, common) -> None:
    top = subparsers.add_parser("set", help="manage replication sets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="action", metavar="ACTION", required=True)
    for handler, arguments in _ACTIONS:
        name = handler.__name__.removeprefix("cmd_").replace("_", "-")
        doc = inspect.cleandoc(handler.__doc__)
        p = sub.add_parser(name, parents=[common], help=doc.splitlines()[0], description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        arguments(p)
        p.set_defaults(func=handler)


def cmd_create(args) -> int:
    """Create a replication set (generation 1).

    --include and --exclude add recursive rules; use add-rule for a non-recursive one.
    Example: dt set create web --include /srv/www --exclude '/srv/www/*.tmp'
    """
    rules = [parse_rule(p, True, True) for p in args.include] + \
            [parse_rule(p, False, True) for p in args.exclude]
    rset = SetStore(args.state).create(args.name, rules)
    return _done(args, rset, f"created replication set {rset.name} (generation {rset.generation})")


def cmd_show(args) -> int:
    """Show a set: root, generation, last calculated size, rules and overlaps."""
    store = SetStore(args.state)
    rset = store.get(args.name)
    size = store.last_size(args.name)
    overlaps = overlapping_sets(rset, store.list())
    doc = _as_dict(rset)
    doc["size"] = None if size is None else {
        **size.size._asdict(), "generation": size.generation, "stale": size.generation != rset.generation,
        "calculated": _when(size.calculated_ns)}
    doc["overlaps"] = overlaps
    if args.json:
        output.emit_json(doc)
        return 0
    output.pairs({
        "name": rset.name, "generation": rset.generation, "root": rset.root,
        "devices": ", ".join(rset.members_devices()) or "-",
        "size": _size_text(size, rset.generation), "overlaps": ", ".join(overlaps) or "-"})
    print()
    output.table([{**r, "recursive": "yes" if r["recursive"] else "no"} for r in doc["rules"]],
                 ["path", "type", "recursive", "status"])
    return 0


def cmd_list(args) -> int:
    """List every replication set."""
    store = SetStore(args.state)
    rows = [{"name": s.name, "generation": s.generation, "rules": len(s.rules), "root": s.root}
            for s in store.list()]
    if args.json:
        output.emit_json(rows)
    else:
        output.table(rows, ["name", "generation", "rules", "root"])
    return 0


def cmd_add_rule(args) -> int:
    """Add a rule to a set, or change the rule for the same path.

    Example: dt set add-rule web '/srv/www/cache' --exclude --no-recursive
    """
    store = SetStore(args.state)
    rset = store.get(args.name)
    rule = parse_rule(args.path, args.include, not args.no_recursive)
    saved = store.save(rset.with_rule(rule), _expected(args, rset))
    note = f" (discarded: {saved.discarded[rule.path]} already covers it)" if rule.path in saved.discarded else ""
    return _done(args, saved, f"rule {rule.path} added to {saved.name}, now generation {saved.generation}{note}")


def cmd_remove_rule(args) -> int:
    """Remove the rule for PATH from a set."""
    store = SetStore(args.state)
    rset = store.get(args.name)
    saved = store.save(rset.without_rule(args.path), _expected(args, rset))
    return _done(args, saved, f"rule {args.path} removed from {saved.name}, now generation {saved.generation}")


def cmd_export(args) -> int:
    """Write a set to FILE as JSON ('-' for standard output); import reads it back."""
    store = SetStore(args.state)
    if args.file == "-":
        sys.stdout.write(to_json(store.get(args.name)))
        return 0
    rset = store.export_to(args.name, args.file)
    return _done(args, rset, f"exported {rset.name} (generation {rset.generation}) to {args.file}")


def cmd_import(args) -> int:
    """Create a set from a JSON export ('-' for standard input), validating every rule.

    An existing set of the same name is refused unless --replace.
    """
    store = SetStore(args.state)
    try:
        if args.file == "-":
            rset = store.import_text(sys.stdin.read(), "standard input", args.replace)
        else:
            rset = store.import_from(args.file, args.replace)
    except AlreadyExists as exc:
        raise UsageError(detail=f"{exc.message}; use --replace to overwrite it") from None
    return _done(args, rset, f"imported {rset.name} (generation {rset.generation})")


def cmd_size(args) -> int:
    """Calculate a set's size now (files, directories, bytes) and keep it for progress."""
    store = SetStore(args.state)
    rset = store.get(args.name)
    size = calculate_size(rset)
    store.record_size(rset.name, size, rset.generation)
    if args.json:
        output.emit_json({"name": rset.name, "generation": rset.generation, **size._asdict()})
    else:
        output.pairs({"files": size.files, "directories": size.dirs,
                      "bytes": f"{size.bytes} ({output.human_bytes(size.bytes)})"})
    return 0


def cmd_delete(args) -> int:
    """Delete a set (refused while a connection uses it: dt unprotect removes one)."""
    users = [c.name for c in ConnectionStore(args.state).list() if c.set_name == args.name]
    if users:
        raise UsageError(detail=f"replication set {args.name} is used by connection(s) {', '.join(users)}: "
                                f"remove them first (dt unprotect {users[0]})")
    rset = SetStore(args.state).delete(args.name, args.generation)
    return _done(args, rset, f"deleted replication set {rset.name}")


# -- arguments ---------------------------------------------------------------------------

def _name(p) -> None:
    p.add_argument("name", metavar="NAME", help="replication set name")


def _generation(p) -> None:
    p.add_argument("--generation", type=int, metavar="N",
                   help="refuse the change unless the stored set is at generation N")


def _args_create(p) -> None:
    _name(p)
    p.add_argument("--include", action="append", default=[], metavar="PATH",
                   help="include PATH recursively (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATH",
                   help="exclude PATH recursively (repeatable)")


def _args_add_rule(p) -> None:
    _name(p)
    p.add_argument("path", metavar="PATH", help="absolute path; the last component may hold wildcards")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--include", dest="include", action="store_true", help="include what the rule covers")
    kind.add_argument("--exclude", dest="include", action="store_false", help="exclude what the rule covers")
    p.add_argument("--no-recursive", action="store_true",
                   help="apply to PATH and the files directly in it, not to subdirectories")
    _generation(p)


def _args_remove_rule(p) -> None:
    _name(p)
    p.add_argument("path", metavar="PATH", help="path of the rule to remove")
    _generation(p)


def _args_file(p) -> None:
    _name(p)
    p.add_argument("file", metavar="FILE", help="file to write ('-': standard output)")


def _args_import(p) -> None:
    p.add_argument("file", metavar="FILE", help="export file to read ('-': standard input)")
    p.add_argument("--replace", action="store_true", help="replace a set of the same name")


def _args_delete(p) -> None:
    _name(p)
    _generation(p)


_ACTIONS = [
    (cmd_create, _args_create), (cmd_show, _name), (cmd_list, lambda p: None),
    (cmd_add_rule, _args_add_rule), (cmd_remove_rule, _args_remove_rule), (cmd_export, _args_file),
    (cmd_import, _args_import), (cmd_size, _name), (cmd_delete, _args_delete),
]


# -- printing ----------------------------------------------------------------------------

def _expected(args, rset: ReplicationSet) -> int:
    return rset.generation if args.generation is None else args.generation


def _as_dict(rset: ReplicationSet) -> dict:
    return {"name": rset.name, "generation": rset.generation, "root": rset.root,
            "devices": rset.members_devices(),
            "rules": [{"path": r.path, "type": "include" if r.include else "exclude",
                       "recursive": r.recursive,
                       "status": f"discarded (covered by {rset.discarded[r.path]})"
                       if r.path in rset.discarded else "in force"} for r in rset.rules]}


def _done(args, rset: ReplicationSet, message: str) -> int:
    if args.json:
        output.emit_json(_as_dict(rset))
    else:
        print(message)
    return 0


def _size_text(stored, generation: int) -> str:
    if stored is None:
        return "not calculated (dt set size NAME)"
    s = stored.size
    stale = " (stale: the rules changed since)" if stored.generation != generation else ""
    return (f"{s.files} files, {s.dirs} directories, {output.human_bytes(s.bytes)} "
            f"at {_when(stored.calculated_ns)}{stale}")


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))
