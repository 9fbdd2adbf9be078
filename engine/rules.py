"""Replication set rules: which absolute paths a set selects.

A rule is ``events.Rule(path, include, recursive)``: one type serves the stored set, the
``ReplicationSetDefinition`` event and this matcher. ``path`` is absolute and normalised;
only its last component may hold shell wildcards (``*``, ``?``, ``[...]``, matched with
``fnmatch.fnmatchcase``; write ``[*]`` for a literal star). A rule without wildcards is
*plain*. Every rule has an *anchor*: a plain rule's own path, or the directory a wildcard
rule looks in.

What a rule applies to (a rule never applies to anything outside its anchor):

- plain, recursive: its path and everything beneath it;
- plain, non-recursive: its path, and the entries directly in it that are not
  directories (as the reference says, the rule "is not applied to subdirectories");
- wildcard, recursive: every entry at any depth beneath the anchor whose name matches the
  pattern, and everything beneath such an entry (so ``/srv/*`` recursive is all of /srv);
- wildcard, non-recursive: the entries directly in the anchor whose name matches and
  that are not directories.

Block devices and every other non-directory are files for these purposes.

Precedence (decides a path; ``rank`` below):

1. Discarding, as the reference describes: a non-recursive rule is discarded when a
   recursive rule of the same type (include/include or exclude/exclude) already applies
   to its anchor; e.g. ``/var/data`` include recursive discards ``/var/data/old`` include
   non-recursive. Rules of different types are never discarded: both apply.
2. Among the remaining rules that apply to a path, the most specific one decides: the
   deeper anchor wins; at equal depth a wildcard rule beats a plain one; at full equality
   exclude beats include. A path no rule applies to is not selected. A set holds at most
   one rule per path, so two rules never tie with different verdicts.

Traversal: a directory must be walked if something beneath it may be selected, i.e. an
include rule is anchored at or beneath it, or a recursive include from above reaches into
it and no exclude that covers its whole subtree outranks that include. So walkers prune
excluded subtrees and still reach includes nested in them. A selected entry's parent
directories need not be selected themselves (the mirror creates them as needed).

Limits: a rule is at most 259 characters (``RULE_MAX_CHARS``); paths up to 4094 bytes
(``PATH_MAX_BYTES``) are handled and longer ones are skipped with a log line
(``skip_long_path``), never an error that stops a walk.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
import syslog
from dataclasses import dataclass
from typing import Callable, Iterable

from . import logs
from .errors import InvalidRule
from .events import Rule

log = logs.get(__name__)

RULE_MAX_CHARS = 259
PATH_MAX_BYTES = 4094
_WILDCARD = re.compile(r"[*?\[]")
_PROBE_NAME = "dt-overlap-probe"

# How one rule applies to the entries of one directory: (name, is_dir) -> applies.
EntryTest = Callable[[str, bool], bool]


def parse_rule(path: str, include: bool = True, recursive: bool = True) -> Rule:
    """A validated, normalised rule; raises InvalidRule with the reason."""
    if not isinstance(path, str) or not path:
        raise InvalidRule(path=path, reason="the path is empty")
    if "\0" in path:
        raise InvalidRule(path=path, reason="the path contains a NUL character")
    if not path.startswith("/"):
        raise InvalidRule(path=path, reason="the path must be absolute (start with /)")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidRule(path=path, reason="'..' is not allowed in a rule")
    if any(_WILDCARD.search(p) for p in parts[:-1]):
        raise InvalidRule(path=path, reason="wildcards are allowed only in the last component")
    normal = "/" + "/".join(parts)
    if len(normal) > RULE_MAX_CHARS:
        raise InvalidRule(path=path, reason=f"a rule is at most {RULE_MAX_CHARS} characters "
                                            f"(this one has {len(normal)})")
    return Rule(path=normal, include=bool(include), recursive=bool(recursive))


def check_rule(rule: Rule) -> Rule:
    """The same rule, validated and normalised (for rules read from files or records)."""
    return parse_rule(rule.path, rule.include, rule.recursive)


def path_too_long(path: str) -> bool:
    """True when ``path`` is longer than the paths we handle (PATH_MAX_BYTES encoded)."""
    return len(os.fsencode(path)) > PATH_MAX_BYTES


def skip_long_path(path: str) -> bool:
    """True (and logged to our log and the system log) when ``path`` must be skipped."""
    if not path_too_long(path):
        return False
    size = len(os.fsencode(path))
    log.warning("path too long, skipped", msgid="DT-R004", bytes=size, limit=PATH_MAX_BYTES,
                start=path[:200])
    syslog.syslog(syslog.LOG_WARNING, f"datatether DT-R004: skipped a path of {size} bytes "
                                      f"(limit {PATH_MAX_BYTES}): {path[:200]}...")
    return True


def normalise(path: str) -> str:
    """An absolute path without '.', '//' or a trailing slash ('..' is resolved lexically)."""
    if not path.startswith("/"):
        raise ValueError(f"not an absolute path: {path!r}")
    normal = posixpath.normpath(path)
    return "/" + normal.lstrip("/")


def is_within(path: str, top: str) -> bool:
    """``path`` is ``top`` or beneath it (both normalised)."""
    return path == top or path.startswith(top if top == "/" else top + "/")


def depth(path: str) -> int:
    return 0 if path == "/" else path.count("/")


def _always(name: str, is_dir: bool) -> bool:
    return True


def _non_dir(name: str, is_dir: bool) -> bool:
    return not is_dir


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule with what matching needs precomputed. ``rank``: larger is more specific."""

    rule: Rule
    anchor: str
    pattern: str | None
    rank: tuple[int, bool, bool]
    match_name: Callable[[str], object] | None

    @classmethod
    def of(cls, rule: Rule) -> "CompiledRule":
        head, last = posixpath.split(rule.path)
        if _WILDCARD.search(last):
            anchor, pattern = head, last
            matcher = re.compile(fnmatch.translate(pattern)).match
        else:
            anchor, pattern, matcher = rule.path, None, None
        return cls(rule, anchor, pattern, (depth(anchor), pattern is not None, not rule.include), matcher)

    def entry_test(self, directory: str) -> EntryTest | None:
        """How this rule applies to the entries of ``directory`` (None: to none of them).

        This is the one definition of "applies" (see the module docstring); every other
        question (a single path, discarding, traversal, overlap) is answered through it.
        """
        rule = self.rule
        if self.pattern is None:
            if posixpath.dirname(rule.path) == directory and rule.path != "/":
                name = posixpath.basename(rule.path)
                return lambda n, is_dir: n == name
            if not is_within(directory, rule.path):
                return None
            if rule.recursive:
                return _always
            return _non_dir if directory == rule.path else None
        if not is_within(directory, self.anchor):
            return None
        match = self.match_name
        if rule.recursive:
            below = directory[len(self.anchor):].split("/")
            if any(part and match(part) for part in below):
                return _always
            return lambda n, is_dir: match(n) is not None
        if directory != self.anchor:
            return None
        return lambda n, is_dir: not is_dir and match(n) is not None

    def applies(self, path: str, is_dir: bool) -> bool:
        if path == "/":
            return self.pattern is None and self.rule.path == "/"
        parent, name = posixpath.split(path)
        test = self.entry_test(parent)
        return test is not None and test(name, is_dir)


class RuleSet:
    """An immutable list of rules and the selection they define (see the module docstring).

    Rules keep their given order for display; matching uses them ranked. The per-directory
    verdict tables are cached because walkers ask about every entry of a directory in turn.
    """

    _CACHE_DIRS = 4096

    def __init__(self, rules: Iterable[Rule]):
        self.rules: tuple[Rule, ...] = tuple(rules)
        compiled = [CompiledRule.of(r) for r in self.rules]
        self.discarded: dict[str, str] = _discarded(compiled)
        kept = [c for c in compiled if c.rule.path not in self.discarded]
        self._ranked = sorted(kept, key=lambda c: c.rank, reverse=True)
        self._scopes: dict[str, list[tuple[EntryTest, bool]]] = {}

    @property
    def effective(self) -> list[Rule]:
        """The rules in force (discarded ones left out), in their given order."""
        return [r for r in self.rules if r.path not in self.discarded]

    def matches(self, path: str, is_dir: bool) -> bool:
        """Is the absolute ``path`` selected? ``is_dir`` is False for files and devices."""
        path = normalise(path)
        if path == "/":
            return next((c.rule.include for c in self._ranked if c.applies("/", True)), False)
        parent, name = posixpath.split(path)
        return _decide(self._scope(parent), name, is_dir)

    def entry_verdict(self, directory: str) -> Callable[[str, bool], bool]:
        """A fast ``(name, is_dir) -> selected`` for the entries of ``directory``."""
        scope = self._scope(normalise(directory))
        return lambda name, is_dir: _decide(scope, name, is_dir)

    def must_traverse(self, directory: str) -> bool:
        """Must a walker look inside ``directory`` (may anything beneath it be selected)?

        Conservative: True may find nothing, False is a guarantee.
        """
        directory = normalise(directory)
        from_above = []
        for c in self._ranked:
            if not c.rule.include:
                continue
            if is_within(c.anchor, directory):
                return True
            if c.rule.recursive and is_within(directory, c.anchor):
                from_above.append(c.rank)
        if not from_above:
            return False
        strongest = max(from_above)
        return not any(not c.rule.include and c.rule.recursive and c.rank > strongest
                       and c.applies(directory, True) for c in self._ranked)

    def include_anchors(self) -> list[str]:
        """Anchors of the include rules in force (where selected data can start)."""
        return [c.anchor for c in self._ranked if c.rule.include]

    def overlap(self, other: "RuleSet") -> str | None:
        """A path both rule sets select, or None.

        Probes the rule paths of both sets, their anchors and a sample name for every
        wildcard pattern in each of those directories, as file and as directory. A path it
        returns is truly selected by both; combinations of several patterns that only an
        unusual name satisfies may go unnoticed.
        """
        compiled = self._ranked + other._ranked
        names = {_PROBE_NAME} | {s for c in compiled if c.pattern and (s := _sample(c.pattern))}
        directories = {c.anchor for c in compiled} | {posixpath.dirname(c.anchor) for c in compiled}
        candidates = set(directories)
        for d in directories:
            candidates.update(posixpath.join(d, n) for n in names)
        for path in sorted(candidates, key=lambda p: (depth(p), p)):
            if path_too_long(path):
                continue
            for is_dir in (True, False):
                if self.matches(path, is_dir) and other.matches(path, is_dir):
                    return path
        return None

    def _scope(self, directory: str) -> list[tuple[EntryTest, bool]]:
        scope = self._scopes.get(directory)
        if scope is None:
            if len(self._scopes) >= self._CACHE_DIRS:
                self._scopes.clear()
            scope = [(t, c.rule.include) for c in self._ranked if (t := c.entry_test(directory))]
            self._scopes[directory] = scope
        return scope


def _decide(scope: list[tuple[EntryTest, bool]], name: str, is_dir: bool) -> bool:
    """The verdict of the most specific rule (``scope`` is ranked) that applies."""
    for test, include in scope:
        if test(name, is_dir):
            return include
    return False


def _discarded(compiled: list[CompiledRule]) -> dict[str, str]:
    """{path of a discarded non-recursive rule: path of the recursive rule that covers it}."""
    out = {}
    for low in compiled:
        if low.rule.recursive:
            continue
        for high in compiled:
            if (high.rule.recursive and high.rule.include == low.rule.include
                    and high.applies(low.anchor, True)):
                out[low.rule.path] = high.rule.path
                break
    return out


def _sample(pattern: str) -> str | None:
    """A name matching the fnmatch ``pattern`` (None if this simple construction fails)."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            i += 1
            continue
        if ch == "?":
            out.append("x")
            i += 1
            continue
        if ch == "[":
            end = pattern.find("]", i + 2)
            if end != -1:
                klass = re.compile(fnmatch.translate(pattern[i:end + 1]))
                pick = next((c for c in "xa0_Z-." if klass.match(c)), None)
                if pick is None:
                    return None
                out.append(pick)
                i = end + 1
                continue
        out.append(ch)
        i += 1
    name = "".join(out) or "x"
    return name if fnmatch.fnmatchcase(name, pattern) else None
