"""Connections: a replication set, a source root, a target root and one log partition.

Invariants:
- ids grow and are never reused; names are unique; the partition of connection N is
  ``conn-N`` for its whole life (so offsets never mix two connections' histories). Ids are
  per state directory: a new connection whose partition the log already holds is refused
  (another installation appends to it, e.g. two on one Kafka topic prefix).
- The target root is never inside the source root and vice versa (on one server that
  would replicate the replica into itself forever).
- Stored durably, one Avro record per connection (schemas/connection.avsc). A file that
  does not decode as exactly one record is CorruptRecord.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Collection

import fastavro

from .durable import stored_names, write_atomic
from .errors import AlreadyExists, CorruptRecord, InvalidName, NotFound, UsageError
from .rules import is_within

MAPPINGS = ("custom", "all_to_one", "one_to_one")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SCHEMA = fastavro.parse_schema(json.loads(
    resources.files("datatether.schemas").joinpath("connection.avsc").read_text()))


@dataclass(frozen=True)
class Connection:
    id: int
    name: str
    set_name: str
    source_root: str
    target_root: str
    mapping: str
    created_ns: int
    target_host: str = "local"

    @property
    def partition(self) -> str:
        return f"conn-{self.id}"


def map_target(source_root: str, target: str, mapping: str) -> str:
    """Where the set root lands on the target.

    custom: ``target`` is the set root's replica; all_to_one: the source path is recreated
    below ``target``; one_to_one: the same path as on the source (another host only).
    """
    source_root = os.path.abspath(source_root)
    if mapping == "custom":
        return os.path.abspath(target)
    if mapping == "all_to_one":
        return os.path.join(os.path.abspath(target), source_root.lstrip("/"))
    if mapping == "one_to_one":
        return source_root
    raise UsageError(detail=f"unknown mapping {mapping!r} (use one of {', '.join(MAPPINGS)})")


def check_roots(source_root: str, target_root: str, target_host: str = "local") -> None:
    """Refuse a target that would hold (or be held by) the source on the same host."""
    if target_host != "local":
        return
    src = os.path.realpath(source_root)
    tgt = os.path.realpath(target_root)
    if src == tgt:
        raise UsageError(detail=f"the target {target_root} is the source itself")
    if is_within(tgt, src):
        raise UsageError(detail=f"the target {target_root} is inside the source {source_root}: "
                                "it would replicate its own replica forever")
    if is_within(src, tgt):
        raise UsageError(detail=f"the source {source_root} is inside the target {target_root}")


class ConnectionStore:
    """Connections of one state directory (``<state>/connections/<id>.avro``)."""

    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir) / "connections"

    def list(self) -> list[Connection]:
        found = [self._read(self.dir / name) for name in stored_names(self.dir)
                 if name.endswith(".avro") and not name.startswith(".")]
        return sorted(found, key=lambda c: c.id)

    def get(self, ref: str | int) -> Connection:
        """By id (``3``, ``"3"``) or by name."""
        for conn in self.list():
            if str(conn.id) == str(ref) or conn.name == ref:
                return conn
        raise NotFound(what="connection", name=str(ref))

    def find(self, ref: str | int) -> Connection | None:
        try:
            return self.get(ref)
        except NotFound:
            return None

    def check_new(self, *, name: str, source_root: str, target: str, mapping: str = "custom",
                  target_host: str = "local", log_partitions: Collection[str] = ()) -> list[Connection]:
        """Refuse what ``create`` would refuse, storing nothing (so a caller can check before
        it makes anything else the connection needs); the existing connections.
        ``log_partitions``: those the log already holds."""
        if not _NAME.match(name or ""):
            raise InvalidName(name=name, reason="use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        existing = self.list()
        if any(c.name == name for c in existing):
            raise AlreadyExists(what="connection", name=name)
        source_root = os.path.abspath(source_root)
        target_root = map_target(source_root, target, mapping)
        check_roots(source_root, target_root, target_host)
        for c in existing:
            if c.target_root == target_root and c.target_host == target_host:
                raise UsageError(detail=f"connection {c.name} already sends to {target_root}: "
                                        "two connections to one target location would overwrite each other")
        partition = f"conn-{self._next_id(existing)}"
        if partition in log_partitions:
            # Its records and consumer offsets are another installation's: this connection's
            # applier would apply them to its target, and the other's would apply this one's.
            raise UsageError(detail=(
                f"the log already holds partition {partition}, which no connection of this state "
                "directory made: another installation writes to the same log (on Kafka, give each "
                "installation a kafka_topic_prefix of its own)"))
        return existing

    def create(self, *, name: str, set_name: str, source_root: str, target: str,
               mapping: str = "custom", target_host: str = "local",
               log_partitions: Collection[str] = ()) -> Connection:
        """Store a new connection (``check_new`` first)."""
        existing = self.check_new(name=name, source_root=source_root, target=target, mapping=mapping,
                                  target_host=target_host, log_partitions=log_partitions)
        source_root = os.path.abspath(source_root)
        target_root = map_target(source_root, target, mapping)
        next_id = self._next_id(existing)
        conn = Connection(id=next_id, name=name, set_name=set_name, source_root=source_root,
                          target_root=target_root, mapping=mapping, created_ns=time.time_ns(),
                          target_host=target_host)
        self._write(conn)
        write_atomic(self.dir / "last_id", str(next_id).encode())
        return conn

    def delete(self, ref: str | int) -> Connection:
        conn = self.get(ref)
        (self.dir / f"{conn.id}.avro").unlink()
        return conn

    def _next_id(self, existing: list[Connection]) -> int:
        return max([c.id for c in existing] + [self._last_id()]) + 1

    def _last_id(self) -> int:
        """The highest id ever given (0 before the first). A damaged file is CorruptRecord:
        any guess could give a removed connection's id, and with it its partition and its
        snapshot folder, to a new one."""
        path = self.dir / "last_id"
        try:
            raw = path.read_bytes().strip()
        except FileNotFoundError:
            return 0
        if not raw.isdigit():
            raise CorruptRecord(reason=f"{path}: not a connection id ({raw[:20]!r})")
        return int(raw)

    def _write(self, conn: Connection) -> None:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, _SCHEMA, asdict(conn))
        write_atomic(self.dir / f"{conn.id}.avro", buf.getvalue())

    @staticmethod
    def _read(path: Path) -> Connection:
        """The connection stored at ``path``; CorruptRecord when it does not decode (a
        damaged or truncated file), never a half-read connection."""
        with open(path, "rb") as f:
            try:
                record = fastavro.schemaless_reader(f, _SCHEMA)
                if f.read(1):
                    raise ValueError("bytes after the record")
                return Connection(**record)
            except (EOFError, ValueError, TypeError, IndexError, KeyError, OverflowError) as exc:
                raise CorruptRecord(reason=f"{path}: not a connection record ({exc or 'truncated'})") from None
