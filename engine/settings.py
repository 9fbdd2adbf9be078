"""One typed settings model read by the config file, the CLI, the API and the console.

Names follow the reference guide where it has one (memory queue limit, disk queue limit,
minimum free space, mirror packet size, checksum all, retry delay, ignore delete
operations, RemapLink, auto-remirror). Values are validated on load: a bad value is a
SettingsError naming the field, never a crash later.

The config file is ``<state dir>/config.toml``; keys are the field names below.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from .errors import SettingsError
from .states import MirrorMode

MiB = 1 << 20
CONFIG_FILE = "config.toml"
# What a Kafka topic prefix may be (engine/log_kafka.py checks it too, for direct callers).
KAFKA_TOPIC_PREFIX = r"^[A-Za-z0-9._-]{0,40}$"
# The largest payload one Kafka record carries (engine/log_kafka.py sizes its topics and
# producer by it): one event, so no Write on a Kafka log may carry more.
KAFKA_MAX_RECORD_BYTES = 16 * MiB
# Client properties engine/log_kafka.py decides: bootstrap from ``log``, and what its
# guarantees rest on (one idempotent, fully acknowledged writer; manual offsets; no
# automatic topic creation; checked CRCs; no silent offset reset).
KAFKA_RESERVED_PROPERTIES = frozenset({
    "bootstrap.servers", "metadata.broker.list", "enable.idempotence", "acks", "request.required.acks",
    "message.timeout.ms", "delivery.timeout.ms", "group.id", "enable.auto.commit",
    "enable.auto.offset.store", "auto.offset.reset", "check.crcs", "allow.auto.create.topics",
    "isolation.level", "transactional.id"})


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Every tunable, immutable once made. ``load`` and ``parse`` validate (types, bounds,
    unknown keys, the checks of ``__post_init__``); constructing one in code does not
    check types or bounds, as with a dataclass: code is trusted, input is not.

    msgspec, not pydantic: every ``dt`` command loads the settings, and building this
    model with pydantic cost ~0.15 s of each command's start-up (msgspec: ~0.01 s)."""

    log: Annotated[str, Meta(description='"embedded" (RocksDB in the state dir) or a Kafka bootstrap address "host:port[,host:port]"')] = "embedded"
    memory_queue_limit_mb: Annotated[int, Meta(ge=32, description="Memory used to queue events before they spill to the disk queue")] = 128
    disk_queue_limit_mb: Annotated[int, Meta(ge=0, description="Disk space for queued events; None is unlimited, 0 disables disk queuing")] | None = None
    minimum_free_space_mb: Annotated[int, Meta(ge=0, description="Free space that must always remain where the queue lives")] = 50
    # 1 MiB, not the reference's 32 KiB: every event costs fixed work on both sides here
    # (encoding, a seal, a log entry, decoding, a write: about 20 us), which at 32 KiB was
    # ~2 s of a 2 GB mirror; the mirror reads files 1 MiB at a time, so larger packets buy
    # nothing, and 1 MiB still interleaves finely with live replication (the applier
    # writes one in well under a millisecond).
    mirror_packet_size: Annotated[int, Meta(ge=4096, le=16 * MiB, description="Bytes of file data per mirror event")] = MiB
    checksum_block_size: Annotated[int, Meta(ge=4096, le=16 * MiB, description="Block size of checksum comparisons")] = 65536
    checksum_all: Annotated[bool, Meta(description="A checksum difference mirror compares every file's blocks, not only files whose size or time differ")] = False
    calculate_size_first: Annotated[bool, Meta(description="Size the replication set before mirroring so progress is a percentage")] = True
    # At most a day: no wait takes an infinite delay (TOML's inf): the applier's would raise
    # OverflowError at the first failed operation.
    retry_delay_s: Annotated[float, Meta(gt=0, le=86400, description="Seconds before a failed operation is retried on the target (it holds the queue)")] = 3.0
    ignore_delete_ops: Annotated[bool, Meta(description="Keep files on the target when they are deleted on the source")] = False
    remap_link: Annotated[bool, Meta(description="Rewrite symlinks that point inside the set to the target path")] = True
    auto_remirror: Annotated[bool, Meta(description="Remirror automatically when the connection becomes Mirror Required")] = True
    auto_remirror_mode: Annotated[MirrorMode, Meta(description="Kind of mirror auto-remirror runs")] = MirrorMode.CHECKSUM
    max_write_buffer: Annotated[int, Meta(ge=4096, le=64 * MiB, description="Largest write carried by one event; larger writes are split")] = MiB
    history_window_s: Annotated[int, Meta(ge=0, description="Keep applied events at least this long for replay and restore")] = 86400
    history_max_mb: Annotated[int, Meta(ge=0, description="Upper bound of retained history per connection")] = 10240
    task_commands: Annotated[bool, Meta(description="Run TaskCommand events on the target")] = True
    verify_log_name: Annotated[str, Meta(description="Base name of the verification log; the set name is prepended")] = "verify.log"
    verify_log_max_bytes: Annotated[int, Meta(ge=1024, description="The verification log stops growing at this size")] = MiB
    verify_log_append: Annotated[bool, Meta(description="Append each verification to the log instead of overwriting it")] = True
    orphans_action: Annotated[Literal["off", "delete", "move"], Meta(description="What a mirror or verify does with orphans on the target")] = "off"
    orphans_move_to: Annotated[str, Meta(description="Folder outside the set that moved orphans go to")] | None = None
    orphans_older_than_s: Annotated[int, Meta(ge=0, description="Only orphans not modified for this many seconds")] = 0
    snapshot_interval_s: Annotated[int, Meta(ge=0, description="Take a scheduled target snapshot this often; 0 turns scheduled snapshots off")] = 0
    snapshot_max_count: Annotated[int, Meta(ge=1, le=1000, description="Keep at most this many snapshots per connection; the oldest go first")] = 30
    snapshot_max_age_s: Annotated[int, Meta(ge=0, description="Delete snapshots older than this (the newest is always kept); None keeps them by count only")] | None = None
    snapshot_dir: Annotated[str, Meta(description="Where snapshots live (one folder per connection below it); None puts them beside the target root, on its filesystem, so they can be copy-on-write")] | None = None
    kafka_timeout_s: Annotated[float, Meta(gt=0, le=3600, description="Kafka log: how long one request (offsets, metadata, a read) may wait for the cluster before it counts as unavailable")] = 30.0
    kafka_delivery_timeout_s: Annotated[float, Meta(gt=0, le=86400, description="Kafka log: how long an append may wait for the cluster; past it the capture's changes count as lost (a gap that remirrors)")] = 120.0
    kafka_topic_prefix: Annotated[str, Meta(pattern=KAFKA_TOPIC_PREFIX, description="Kafka log: prefix of every topic and consumer group of this installation (installations sharing a cluster need different ones)")] = "dt."
    kafka_properties: Annotated[dict[str, str | int | float | bool], Meta(description="Kafka log: client properties for every client, by their librdkafka names (security.protocol, ssl.ca.location, sasl.mechanism, sasl.username, sasl.password...)")] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        reserved = sorted(KAFKA_RESERVED_PROPERTIES.intersection(self.kafka_properties))
        if reserved:
            raise ValueError(f"kafka_properties: {', '.join(reserved)} cannot be set: the product sets them "
                             "(ordering, exactly-once appends and offsets depend on them)")
        if self.log != "embedded" and not all(":" in part for part in self.log.split(",")):
            raise ValueError('log: must be "embedded" or a Kafka bootstrap address like "127.0.0.1:9092"')
        if self.log != "embedded" and self.max_write_buffer > KAFKA_MAX_RECORD_BYTES:
            # Kafka refuses the record: every such Write would be a gap and a remirror.
            raise ValueError(f"max_write_buffer: at most {KAFKA_MAX_RECORD_BYTES} on a Kafka log "
                             "(one event is one Kafka record)")

    @classmethod
    def parse(cls, values: dict) -> "Settings":
        """Settings from untrusted ``values`` (a config file, a request); SettingsError
        names the first field that is wrong."""
        try:
            return msgspec.convert(values, cls)
        except msgspec.ValidationError as exc:
            # msgspec says "... - at `$.field`"; the product says "field: ..."
            message, _, where = str(exc).rpartition(" - at `$.")
            detail = f"{where.rstrip('`')}: {message}" if message else str(exc)
            raise SettingsError(detail=detail) from exc

    @classmethod
    def load(cls, state_dir: Path | str, **overrides) -> "Settings":
        """Settings from ``<state_dir>/config.toml`` (if any), then ``overrides``."""
        values: dict = {}
        path = Path(state_dir) / CONFIG_FILE
        if path.exists():
            try:
                values = tomllib.loads(path.read_text())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise SettingsError(detail=f"{path}: {exc}") from exc
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.parse(values)

    def replace(self, **changes) -> "Settings":
        """A copy with ``changes`` (trusted values, from code)."""
        return msgspec.structs.replace(self, **changes)


def default_state_dir() -> Path:
    """Per-user default: $DT_STATE, else $XDG_STATE_HOME/datatether, else ~/.local/state/datatether."""
    if os.environ.get("DT_STATE"):
        return Path(os.environ["DT_STATE"])
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "datatether"
