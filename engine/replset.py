"""Replication sets: named, versioned lists of rules, stored durably.

A ``ReplicationSet`` is an immutable value: a name, rules (engine/rules.py defines what
they select) and the generation it was loaded at. Changing a set makes a new value
(``with_rule``, ``without_rule``) that ``SetStore.save`` stores as generation + 1.

Invariants:
- Names are 1-64 characters (and at most 250 bytes of UTF-8) without . ? < > : " \\ / * |,
  control characters or invalid Unicode, so a name is also a safe file name.
- Generations only grow. A save names the generation it was prepared from and is refused
  (StaleGeneration) if the stored set has moved on: two operators cannot silently
  overwrite each other's rules.
- The root is the deepest common directory of the include rules in force (block devices
  left out); event paths are relative to it (``relpath``/``abspath``).
- The same data is replicated by one set only: ``check_no_overlap`` refuses a set whose
  selection intersects another set that is already connected (connections call it).
- Walks (``walk``, ``calculate_size``) never follow symlinks, prune subtrees the rules
  exclude, and skip (and log) paths longer than rules.PATH_MAX_BYTES.

On disk: ``<state>/sets/<name>.set``, one Avro object container file per set
(schemas/replset.avsc) sealed with a checksum (engine/frame.py), written with
temp file, fsync, rename. Writers hold ``<state>/sets/.lock`` (flock) so the generation
check and the write are atomic across processes; readers need no lock.
Export files are JSON (``EXPORT_FORMAT``), meant to be read and edited by people.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import posixpath
import stat
import time
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import fastavro

from . import frame, logs
from .durable import folder_lock, fsync_dir, stored_names, write_atomic
from .errors import (AlreadyExists, CorruptRecord, DtError, InvalidName, InvalidRule, NotFound, Overlap,
                     PathEscapes, StaleGeneration, UsageError)
from .events import ReplicationSetDefinition, Rule
from .rules import RuleSet, check_rule, is_within, normalise, skip_long_path

log = logs.get(__name__)

_REMEMBERED_ANSWERS = 1 << 16  # answers a relative_matches keeps (then it starts over)

NAME_MAX_CHARS = 64
NAME_MAX_BYTES = 250  # the name is a file name: NAME_MAX (255) minus the suffix
ILLEGAL_NAME_CHARS = '.?<>:"\\/*|'
EXPORT_FORMAT = "datatether-replication-set"
EXPORT_VERSION = 1
_SUFFIX = ".set"
_SCHEMA = fastavro.parse_schema(json.loads(
    resources.files("datatether.schemas").joinpath("replset.avsc").read_text()))


def validate_name(name: str) -> str:
    """``name`` if it is a legal set name, else InvalidName saying why."""
    if not isinstance(name, str) or not name:
        raise InvalidName(name=name, reason="a replication set needs a name")
    if len(name) > NAME_MAX_CHARS:
        raise InvalidName(name=name, reason=f"at most {NAME_MAX_CHARS} characters (this one has {len(name)})")
    bad = sorted({ch for ch in name if ch in ILLEGAL_NAME_CHARS})
    if bad:
        raise InvalidName(name=name, reason=f"it contains {' '.join(bad)}; these characters are not "
                                            f"allowed: {' '.join(ILLEGAL_NAME_CHARS)}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise InvalidName(name=name, reason="control characters (such as newline or tab) are not allowed")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidName(name=name, reason="it is not valid UTF-8 text") from None
    if len(encoded) > NAME_MAX_BYTES:
        raise InvalidName(name=name, reason=f"at most {NAME_MAX_BYTES} bytes in UTF-8 (this one has {len(encoded)})")
    return name


class SetSize(NamedTuple):
    files: int
    dirs: int
    bytes: int


class StoredSize(NamedTuple):
    """A size calculation as stored with the set; stale when the set changed since."""

    size: SetSize
    generation: int
    calculated_ns: int


@dataclasses.dataclass(frozen=True)
class ReplicationSet:
    """A named list of rules at one generation (0: never saved). Rules are validated and
    normalised on construction; a set holds at most one rule per path."""

    name: str
    rules: tuple[Rule, ...] = ()
    generation: int = 0

    def __post_init__(self):
        validate_name(self.name)
        rules = tuple(check_rule(r) for r in self.rules)
        paths = [r.path for r in rules]
        for path in paths:
            if paths.count(path) > 1:
                raise InvalidRule(path=path, reason="the set already has a rule for this path")
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "_selection", RuleSet(rules))

    # -- what the set selects ------------------------------------------------------------

    def matches(self, abs_path: str, is_dir: bool) -> bool:
        """Is ``abs_path`` a member? Block devices and other non-directories: is_dir False."""
        return self._selection.matches(os.fsdecode(abs_path), is_dir)

    def relative_matches(self, root: str) -> "Callable[[str, bool], bool]":
        """``(rel, is_dir) -> member`` for paths relative to ``root`` ("" is ``root``
        itself), remembering its answers: a live capture asks for every write, mostly
        about the same few files. Sound because a set never changes (a new generation is a
        new object); bounded, as RuleSet's scope cache is."""
        answers: dict[tuple[str, bool], bool] = {}

        def matches(rel: str, is_dir: bool) -> bool:
            key = (rel, is_dir)
            answer = answers.get(key)
            if answer is None:
                if len(answers) >= _REMEMBERED_ANSWERS:
                    answers.clear()
                answer = answers[key] = self.matches(posixpath.join(root, rel) if rel else root, is_dir)
            return answer
        return matches

    def must_traverse(self, abs_dir: str) -> bool:
        """May anything beneath ``abs_dir`` be a member (False is a guarantee)?"""
        return self._selection.must_traverse(os.fsdecode(abs_dir))

    def entry_verdict(self, abs_dir: str):
        """A fast ``(name, is_dir) -> member`` for the entries of one directory."""
        return self._selection.entry_verdict(os.fsdecode(abs_dir))

    @property
    def discarded(self) -> dict[str, str]:
        """{rule path: path of the recursive rule that makes it redundant} (rules.py, 1.)."""
        return self._selection.discarded

    def members_devices(self) -> list[str]:
        """Paths of the include rules in force that name block devices."""
        return [r.path for r in self._selection.effective if r.include and _is_block_device(r.path)]

    @cached_property
    def root(self) -> str:
        """Deepest common directory of the include rules in force, block devices left out;
        ``/`` for a set without any. A common path that exists as a non-directory (a
        single-file set) gives its parent."""
        devices = set(self.members_devices())
        anchors = [a for a in self._selection.include_anchors() if a not in devices]
        if not anchors:
            return "/"
        common = posixpath.commonpath(anchors)
        try:
            if not stat.S_ISDIR(os.lstat(common).st_mode):
                return posixpath.dirname(common)
        except OSError:
            pass  # not there (yet): a rule path that does not exist is taken as a directory
        return common

    def relpath(self, abs_path: str) -> str:
        """The event path of ``abs_path`` ('' for the root itself, as engine/tree.py writes
        it); PathEscapes if outside the root."""
        path = normalise(os.fsdecode(abs_path))
        if not is_within(path, self.root):
            raise PathEscapes(path=path, reason=f"outside the root {self.root} of replication set {self.name}")
        return path[len(self.root):].lstrip("/")

    def abspath(self, rel_path: str) -> str:
        """The absolute source path of an event path; PathEscapes if it would leave the root."""
        rel_path = os.fsdecode(rel_path)
        parts = rel_path.split("/")
        if rel_path.startswith("/") or ".." in parts or "\0" in rel_path:
            raise PathEscapes(path=rel_path, reason="an event path must be relative, without '..'")
        return normalise(posixpath.join(self.root, rel_path))

    def overlap(self, other: "ReplicationSet") -> str | None:
        """A path both sets select, or None (see rules.RuleSet.overlap)."""
        return self._selection.overlap(other._selection)

    # -- new values ----------------------------------------------------------------------

    def with_rule(self, rule: Rule) -> "ReplicationSet":
        """This set with ``rule`` added, replacing any rule for the same path."""
        rule = check_rule(rule)
        kept = [r for r in self.rules if r.path != rule.path]
        return dataclasses.replace(self, rules=tuple(kept) + (rule,))

    def without_rule(self, path: str) -> "ReplicationSet":
        """This set without the rule for ``path``; NotFound if it has none."""
        path = check_rule(Rule(path, True, True)).path
        kept = tuple(r for r in self.rules if r.path != path)
        if len(kept) == len(self.rules):
            raise NotFound(what=f"rule in replication set {self.name}", name=path)
        return dataclasses.replace(self, rules=kept)

    def definition(self) -> ReplicationSetDefinition:
        """The control event that announces this set in a connection's log."""
        return ReplicationSetDefinition(name=self.name, generation=self.generation,
                                        root=self.root, rules=list(self.rules))


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


# -- the same data in one set only -------------------------------------------------------

def overlapping_sets(rset: ReplicationSet, candidates: Iterable[ReplicationSet]) -> list[str]:
    """Names of the other sets among ``candidates`` that select some of the same paths."""
    return [c.name for c in candidates if c.name != rset.name and rset.overlap(c) is not None]


def check_no_overlap(rset: ReplicationSet, connected: Iterable[ReplicationSet]) -> None:
    """Refuse (Overlap) to connect ``rset`` when a connected set selects the same data.

    The reference replicates any piece of data from one set only; to send the same data
    to several targets, connect one set several times.
    """
    for other in connected:
        if other.name == rset.name:
            continue
        witness = rset.overlap(other)
        if witness is not None:
            raise Overlap(detail=f"replication sets {rset.name} and {other.name} both select "
                                 f"{witness}: the same data can be replicated by one set only "
                                 f"(connect {other.name} to several targets instead, or change the rules)")


# -- walking and size --------------------------------------------------------------------

def walk(rset: ReplicationSet) -> Iterator[tuple[str, os.stat_result]]:
    """Every member as ``(absolute path, lstat)``, parents before children, names sorted.

    Starts at the root, prunes what ``must_traverse`` rules out, follows no symlink, skips
    (and logs) over-long paths and unreadable directories, then adds block device members
    that lie outside the root.
    """
    root = rset.root
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        st = None
    if st is not None and not skip_long_path(root):
        is_dir = stat.S_ISDIR(st.st_mode)
        if rset.matches(root, is_dir):
            yield root, st
        if is_dir and rset.must_traverse(root):
            yield from _walk_below(rset, root)
    for device in rset.members_devices():
        if not is_within(device, root):
            yield device, os.stat(device)


def _walk_below(rset: ReplicationSet, top: str) -> Iterator[tuple[str, os.stat_result]]:
    stack = [top]  # explicit stack: 4094-byte paths nest deeper than Python's recursion limit
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            continue  # removed while we walked: nothing to count
        except OSError as exc:
            log.warning("cannot read directory, skipped", msgid="DT-R006", path=directory, error=exc.strerror)
            continue
        verdict = rset.entry_verdict(directory)
        subdirs = []
        for entry in entries:
            if skip_long_path(entry.path):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
                if verdict(entry.name, is_dir):
                    yield entry.path, entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if is_dir and rset.must_traverse(entry.path):
                subdirs.append(entry.path)
        stack.extend(reversed(subdirs))


def calculate_size(rset: ReplicationSet) -> SetSize:
    """Members counted as the mirror would send them: directories, other entries, and
    the bytes of regular files (a hard-linked inode once) and of block devices."""
    files = dirs = size = 0
    seen_inodes: set[tuple[int, int]] = set()
    for path, st in walk(rset):
        if stat.S_ISDIR(st.st_mode):
            dirs += 1
            continue
        files += 1
        if stat.S_ISREG(st.st_mode):
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen_inodes:
                    continue
                seen_inodes.add((st.st_dev, st.st_ino))
            size += st.st_size
        elif stat.S_ISBLK(st.st_mode):
            size += _device_bytes(path)
    log.info("size calculated", msgid="DT-R009", set=rset.name, files=files, dirs=dirs, bytes=size)
    return SetSize(files, dirs, size)


def _device_bytes(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("cannot size block device", msgid="DT-R010", path=path, error=exc.strerror)
        return 0
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


# -- export files ------------------------------------------------------------------------

def to_json(rset: ReplicationSet) -> str:
    """The export form of a set (ASCII JSON: odd bytes in paths survive as escapes)."""
    return json.dumps({
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "name": rset.name,
        "generation": rset.generation,
        "rules": [{"path": r.path, "include": r.include, "recursive": r.recursive} for r in rset.rules],
    }, indent=2) + "\n"


def from_json(text: str, source: str) -> ReplicationSet:
    """Parse and validate an export; UsageError naming ``source`` for a malformed file,
    InvalidName/InvalidRule for a bad name or rule."""
    def bad(reason: str) -> UsageError:
        return UsageError(detail=f"cannot import {source}: {reason}")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad(f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise bad(f'not a replication set export (expected "format": "{EXPORT_FORMAT}")')
    if doc.get("version") != EXPORT_VERSION:
        raise bad(f"unsupported export version {doc.get('version')!r} (this is version {EXPORT_VERSION})")
    unknown = set(doc) - {"format", "version", "name", "generation", "rules"}
    if unknown:
        raise bad(f"unknown fields {', '.join(sorted(unknown))}")
    rules = doc.get("rules")
    if not isinstance(rules, list):
        raise bad('"rules" must be a list')
    parsed = []
    for i, item in enumerate(rules, 1):
        if not isinstance(item, dict) or set(item) != {"path", "include", "recursive"}:
            raise bad(f'rule {i} must have exactly the fields "path", "include", "recursive"')
        if not isinstance(item["path"], str) or not all(isinstance(item[k], bool) for k in ("include", "recursive")):
            raise bad(f'rule {i}: "path" must be a string, "include" and "recursive" true or false')
        parsed.append(Rule(item["path"], item["include"], item["recursive"]))
    return ReplicationSet(name=doc.get("name"), rules=tuple(parsed))


# -- storage -----------------------------------------------------------------------------

class SetStore:
    """The replication sets of one state directory (layout in the module docstring)."""

    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir) / "sets"

    def create(self, name: str, rules: Iterable[Rule] = ()) -> ReplicationSet:
        """A new set at generation 1; AlreadyExists if the name is taken."""
        rset = ReplicationSet(name=name, rules=tuple(rules))
        with self._lock():
            if self._path(name).exists():
                raise AlreadyExists(what="replication set", name=name)
            return self._write(rset, generation=1, previous=None, event="created", msgid="DT-R001")

    def get(self, name: str) -> ReplicationSet:
        return self._to_set(self._read(name))

    def exists(self, name: str) -> bool:
        return self._path(name).exists()

    def list(self) -> list[ReplicationSet]:
        """Every set, by name. A damaged set file raises CorruptRecord naming it."""
        names = sorted(name[:-len(_SUFFIX)] for name in stored_names(self.dir)
                       if name.endswith(_SUFFIX) and not name.startswith("."))
        return [self.get(n) for n in names]

    def save(self, rset: ReplicationSet, expected_generation: int | None = None) -> ReplicationSet:
        """Store ``rset`` as the next generation and return it.

        ``expected_generation`` (default: the generation ``rset`` was loaded at) must be the
        stored one, else StaleGeneration and nothing changes.
        """
        expected = rset.generation if expected_generation is None else expected_generation
        with self._lock():
            current = self._read(rset.name)
            if current["generation"] != expected:
                raise StaleGeneration(name=rset.name, actual=current["generation"], expected=expected)
            return self._write(rset, generation=expected + 1, previous=current, event="saved", msgid="DT-R002")

    def delete(self, name: str, expected_generation: int | None = None) -> ReplicationSet:
        """Remove a set (refused with StaleGeneration if ``expected_generation`` is stale)."""
        with self._lock():
            current = self._to_set(self._read(name))
            if expected_generation is not None and current.generation != expected_generation:
                raise StaleGeneration(name=name, actual=current.generation, expected=expected_generation)
            self._path(name).unlink()
            fsync_dir(self.dir)
        log.info("replication set deleted", msgid="DT-R003", set=name, generation=current.generation)
        return current

    def record_size(self, name: str, size: SetSize, generation: int) -> None:
        """Keep a size calculation made at ``generation``; the set's generation is unchanged."""
        with self._lock():
            current = self._read(name)
            current["size"] = {"files": size.files, "dirs": size.dirs, "bytes": size.bytes,
                               "generation": generation, "calculated_ns": time.time_ns()}
            self._store(current)

    def last_size(self, name: str) -> StoredSize | None:
        found = self._read(name)["size"]
        if found is None:
            return None
        return StoredSize(SetSize(found["files"], found["dirs"], found["bytes"]),
                          found["generation"], found["calculated_ns"])

    def export_to(self, name: str, dest: str | Path) -> ReplicationSet:
        """Write the set to ``dest`` as JSON (durably; readable by others). ``dest`` names a
        file in an existing folder: a directory, or a folder that is not there, is refused
        (UsageError) rather than made or left with a temporary file."""
        rset = self.get(name)
        dest = Path(dest)
        if dest.is_dir():
            raise UsageError(detail=f"cannot export to {dest}: it is a directory; name a file in it")
        if not dest.parent.is_dir():
            raise UsageError(detail=f"cannot export to {dest}: the folder {dest.parent} does not exist")
        write_atomic(dest, to_json(rset).encode("ascii"), mode=0o644)
        log.info("replication set exported", msgid="DT-R008", set=name, file=str(dest))
        return rset

    def import_from(self, src: str | Path, replace: bool = False) -> ReplicationSet:
        """Create a set from an export file, validating every rule. An existing set of that
        name is refused (AlreadyExists) unless ``replace``; a replaced set keeps counting
        generations from its stored one, so generations never go back."""
        try:
            text = Path(src).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(detail=f"cannot import {src}: not UTF-8 text") from None
        return self.import_text(text, str(src), replace)

    def import_text(self, text: str, source: str, replace: bool = False) -> ReplicationSet:
        rset = from_json(text, source)
        with self._lock():
            previous = self._read(rset.name) if self.exists(rset.name) else None
            if previous is not None and not replace:
                raise AlreadyExists(what="replication set", name=rset.name)
            generation = 1 if previous is None else previous["generation"] + 1
            return self._write(rset, generation=generation, previous=previous, event="imported",
                               msgid="DT-R007", source=source)

    # -- records -------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.dir / (validate_name(name) + _SUFFIX)

    def _lock(self):
        return folder_lock(self.dir)

    def _write(self, rset: ReplicationSet, *, generation: int, previous: dict | None,
               event: str, msgid: str, **kw) -> ReplicationSet:
        now = time.time_ns()
        record = {
            "name": rset.name, "generation": generation,
            "rules": [{"path": os.fsencode(r.path), "include": r.include, "recursive": r.recursive}
                      for r in rset.rules],
            "created_ns": previous["created_ns"] if previous else now, "modified_ns": now,
            "size": previous["size"] if previous else None,
        }
        self._store(record)
        saved = dataclasses.replace(rset, generation=generation)
        log.info(f"replication set {event}", msgid=msgid, set=rset.name, generation=generation,
                 rules=len(rset.rules), **kw)
        if saved.discarded:
            log.info("rules discarded by precedence", msgid="DT-R005", set=rset.name,
                     discarded=saved.discarded)
        return saved

    def _store(self, record: dict) -> None:
        buf = io.BytesIO()
        fastavro.writer(buf, _SCHEMA, [record])
        write_atomic(self._path(record["name"]), frame.seal(buf.getvalue()))

    def _read(self, name: str) -> dict:
        path = self._path(name)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(what="replication set", name=name) from None
        try:
            records = list(fastavro.reader(io.BytesIO(frame.unseal(blob)), reader_schema=_SCHEMA))
        except CorruptRecord as exc:
            raise CorruptRecord(reason=f"{path}: {exc.params['reason']}") from None
        except Exception as exc:  # a sealed file that is not our Avro: a bug or a foreign file
            raise CorruptRecord(reason=f"{path}: not a replication set record ({exc})") from None
        if len(records) != 1 or records[0]["name"] != name:
            raise CorruptRecord(reason=f"{path}: does not hold replication set {name}")
        return records[0]

    @staticmethod
    def _to_set(record: dict) -> ReplicationSet:
        rules = tuple(Rule(os.fsdecode(r["path"]), r["include"], r["recursive"]) for r in record["rules"])
        return ReplicationSet(name=record["name"], rules=rules, generation=record["generation"])


class LiveSet:
    """A running connection's replication set, following the saved one.

    ``current`` is the generation in force; ``matches(rel, is_dir)`` answers for it (paths
    relative to its root). ``reload()`` reads the stored set: a newer generation becomes
    current at once, for every caller (the capture's next operation, the mirror's next
    question). A set whose root moved, or that cannot be read, is not taken: the
    running daemon keeps the generation it has, and says so once per generation.
    """

    def __init__(self, store: SetStore, rset: ReplicationSet):
        self._store = store
        self.current = rset
        self._matches = rset.relative_matches(rset.root)
        self._refused = rset.generation

    def matches(self, rel: str, is_dir: bool) -> bool:
        return self._matches(rel, is_dir)

    def reload(self) -> str:
        """Why the rules changed ("" when they did not)."""
        old = self.current
        try:
            new = self._store.get(old.name)
        except (DtError, OSError) as exc:
            log.warning("replication set unreadable: the running daemon keeps its rules", msgid="DT-R011",
                        set=old.name, error=str(exc))
            return ""
        if new.generation in (old.generation, self._refused):
            return ""
        if new.root != old.root:
            self._refused = new.generation
            log.error("replication set root changed: not taken while running; restart to use it", msgid="DT-R012",
                      set=old.name, generation=new.generation, root=new.root, running_root=old.root)
            return ""
        self._matches = new.relative_matches(new.root)
        self.current = new
        return f"replication set {new.name} changed (generation {old.generation} -> {new.generation})"
