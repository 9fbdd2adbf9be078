"""Domain events: one frozen dataclass per operation in ``schemas/event.avsc``.

Invariants:
- Paths are ``str`` relative to the replication set root, never absolute and never
  containing ``..``; non-UTF-8 bytes survive as surrogate escapes (``os.fsdecode``).
- An event says what happened, not how to store it: encoding lives in engine/codec.py.
- The class name is the Avro record name; a new operation needs a schema record and a
  class here, nothing else.
"""

from __future__ import annotations

import enum
import stat
from dataclasses import dataclass, field


class FileKind(str, enum.Enum):
    FILE = "FILE"
    DIR = "DIR"
    SYMLINK = "SYMLINK"
    FIFO = "FIFO"
    CHAR = "CHAR"
    BLOCK = "BLOCK"
    SOCKET = "SOCKET"

    @property
    def ifmt(self) -> int:
        """The file type bits (``stat.S_IFMT``) of an object of this kind."""
        return _IFMT[self]

    @classmethod
    def of_mode(cls, mode: int) -> FileKind | None:
        """The kind of an ``st_mode`` (Linux has no file type outside the seven)."""
        return _KIND_OF_IFMT.get(stat.S_IFMT(mode))


_IFMT = {
    FileKind.FILE: stat.S_IFREG, FileKind.DIR: stat.S_IFDIR, FileKind.SYMLINK: stat.S_IFLNK,
    FileKind.FIFO: stat.S_IFIFO, FileKind.CHAR: stat.S_IFCHR, FileKind.BLOCK: stat.S_IFBLK,
    FileKind.SOCKET: stat.S_IFSOCK,
}
_KIND_OF_IFMT = {ifmt: kind for kind, ifmt in _IFMT.items()}


@dataclass(frozen=True, slots=True)
class Create:
    path: str
    kind: FileKind
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    rdev: int = 0


@dataclass(frozen=True, slots=True)
class Write:
    path: str
    offset: int
    data: bytes | memoryview  # a view while in flight: engine/capture.py, codec.decode(views=True)


@dataclass(frozen=True, slots=True)
class Truncate:
    path: str
    size: int


@dataclass(frozen=True, slots=True)
class Fallocate:
    path: str
    mode: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class SetAttr:
    path: str
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


@dataclass(frozen=True, slots=True)
class SetXattr:
    path: str
    name: str
    value: bytes


@dataclass(frozen=True, slots=True)
class RemoveXattr:
    path: str
    name: str


@dataclass(frozen=True, slots=True)
class Rename:
    src: str
    dst: str


@dataclass(frozen=True, slots=True)
class Link:
    existing: str
    path: str


@dataclass(frozen=True, slots=True)
class Symlink:
    path: str
    target: str
    uid: int
    gid: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class Unlink:
    path: str


@dataclass(frozen=True, slots=True)
class Rmdir:
    path: str
    recursive: bool = False


@dataclass(frozen=True, slots=True)
class Barrier:
    path: str


@dataclass(frozen=True, slots=True)
class BlockWrite:
    device: str
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class BlockDiscard:
    device: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class BlockFlush:
    device: str


@dataclass(frozen=True, slots=True)
class MirrorStart:
    mirror_id: str
    mode: str
    total_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class MirrorFile:
    path: str
    kind: FileKind
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    size: int
    rdev: int = 0
    link_target: str | None = None
    hardlink_of: str | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)
    whole: bool = True
    # A small regular file sent in this one event: all of its ``size`` bytes and its file
    # digest; no MirrorData or MirrorFileEnd follows (``complete``).
    data: bytes = b""
    digest: bytes | None = None

    @property
    def complete(self) -> bool:
        return self.digest is not None


@dataclass(frozen=True, slots=True)
class MirrorData:
    path: str
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class MirrorFileEnd:
    path: str
    size: int
    digest: bytes
    mtime_ns: int
    block_digests: bytes = b""


@dataclass(frozen=True, slots=True)
class MirrorEnd:
    mirror_id: str
    sent_bytes: int
    skipped_bytes: int
    files: int


@dataclass(frozen=True, slots=True)
class TaskCommand:
    task_id: str
    name: str
    argv: list[str]
    timeout_s: int = 600


@dataclass(frozen=True, slots=True)
class TaskResult:
    task_id: str
    exit_status: int
    output: str
    applied_offset: int


@dataclass(frozen=True, slots=True)
class Marker:
    name: str
    note: str = ""


@dataclass(frozen=True, slots=True)
class Gap:
    reason: str


@dataclass(frozen=True, slots=True)
class Rule:
    path: str
    include: bool
    recursive: bool


@dataclass(frozen=True, slots=True)
class ReplicationSetDefinition:
    name: str
    generation: int
    root: str
    rules: list[Rule]


Operation = (
    Create | Write | Truncate | Fallocate | SetAttr | SetXattr | RemoveXattr | Rename | Link
    | Symlink | Unlink | Rmdir | Barrier | BlockWrite | BlockDiscard | BlockFlush | MirrorStart
    | MirrorFile | MirrorData | MirrorFileEnd | MirrorEnd | TaskCommand | TaskResult | Marker
    | Gap | ReplicationSetDefinition
)

OPERATIONS: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        Create, Write, Truncate, Fallocate, SetAttr, SetXattr, RemoveXattr, Rename, Link,
        Symlink, Unlink, Rmdir, Barrier, BlockWrite, BlockDiscard, BlockFlush, MirrorStart,
        MirrorFile, MirrorData, MirrorFileEnd, MirrorEnd, TaskCommand, TaskResult, Marker, Gap,
        ReplicationSetDefinition,
    )
}

# Field names holding a path relative to the set root (checked by the applier for containment).
PATH_FIELDS = ("path", "src", "dst", "existing", "hardlink_of")


@dataclass(frozen=True, slots=True)
class Event:
    """An operation with its capture time. The log assigns its offset."""

    op: Operation
    time_ns: int
    origin: str = "cli"

    @property
    def kind(self) -> str:
        return type(self.op).__name__

    def paths(self) -> list[str]:
        """Every set-relative path the operation names (for containment and history)."""
        return [getattr(self.op, n) for n in PATH_FIELDS
                if getattr(self.op, n, None) is not None]

    def data_bytes(self) -> int:
        """Payload bytes carried (file or block data)."""
        data = getattr(self.op, "data", None)
        return len(data) if data is not None else 0
