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
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import SettingsError
from .states import MirrorMode

MiB = 1 << 20
CONFIG_FILE = "config.toml"
# What a Kafka topic prefix may be (engine/log_kafka.py checks it too, for direct callers).
KAFKA_TOPIC_PREFIX = r"^[A-Za-z0-9._-]{0,40}$"
# Client properties engine/log_kafka.py decides: bootstrap from ``log``, and what its
# guarantees rest on (one idempotent, fully acknowledged writer; manual offsets; no
# automatic topic creation; checked CRCs; no silent offset reset).
KAFKA_RESERVED_PROPERTIES = frozenset({
    "bootstrap.servers", "metadata.broker.list", "enable.idempotence", "acks", "request.required.acks",
    "message.timeout.ms", "delivery.timeout.ms", "group.id", "enable.auto.commit",
    "enable.auto.offset.store", "auto.offset.reset", "check.crcs", "allow.auto.create.topics",
    "isolation.level", "transactional.id"})


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    log: str = Field("embedded", description='"embedded" (RocksDB in the state dir) or a Kafka bootstrap address "host:port[,host:port]"')
    memory_queue_limit_mb: int = Field(128, ge=32, description="Memory used to queue events before they spill to the disk queue")
    disk_queue_limit_mb: int | None = Field(None, ge=0, description="Disk space for queued events; None is unlimited, 0 disables disk queuing")
    minimum_free_space_mb: int = Field(50, ge=0, description="Free space that must always remain where the queue lives")
    # 1 MiB, not the reference's 32 KiB: every event costs fixed work on both sides here
    # (encoding, a seal, a log entry, decoding, a write: about 20 us), which at 32 KiB was
    # ~2 s of a 2 GB mirror; the mirror reads files 1 MiB at a time, so larger packets buy
    # nothing, and 1 MiB still interleaves finely with live replication (the applier
    # writes one in well under a millisecond).
    mirror_packet_size: int = Field(MiB, ge=4096, le=16 * MiB, description="Bytes of file data per mirror event")
    checksum_block_size: int = Field(65536, ge=4096, le=16 * MiB, description="Block size of checksum comparisons")
    checksum_all: bool = Field(False, description="A checksum difference mirror compares every file's blocks, not only files whose size or time differ")
    calculate_size_first: bool = Field(True, description="Size the replication set before mirroring so progress is a percentage")
    retry_delay_s: float = Field(3.0, gt=0, description="Seconds before a failed operation is retried on the target (it holds the queue)")
    ignore_delete_ops: bool = Field(False, description="Keep files on the target when they are deleted on the source")
    remap_link: bool = Field(True, description="Rewrite symlinks that point inside the set to the target path")
    auto_remirror: bool = Field(True, description="Remirror automatically when the connection becomes Mirror Required")
    auto_remirror_mode: MirrorMode = Field(MirrorMode.CHECKSUM, description="Kind of mirror auto-remirror runs")
    max_write_buffer: int = Field(MiB, ge=4096, le=64 * MiB, description="Largest write carried by one event; larger writes are split")
    history_window_s: int = Field(86400, ge=0, description="Keep applied events at least this long for replay and restore")
    history_max_mb: int = Field(10240, ge=0, description="Upper bound of retained history per connection")
    task_commands: bool = Field(True, description="Run TaskCommand events on the target")
    verify_log_name: str = Field("verify.log", description="Base name of the verification log; the set name is prepended")
    verify_log_max_bytes: int = Field(MiB, ge=1024, description="The verification log stops growing at this size")
    verify_log_append: bool = Field(True, description="Append each verification to the log instead of overwriting it")
    orphans_action: Literal["off", "delete", "move"] = Field("off", description="What a mirror or verify does with orphans on the target")
    orphans_move_to: str | None = Field(None, description="Folder outside the set that moved orphans go to")
    orphans_older_than_s: int = Field(0, ge=0, description="Only orphans not modified for this many seconds")
    snapshot_interval_s: int = Field(0, ge=0, description="Take a scheduled target snapshot this often; 0 turns scheduled snapshots off")
    snapshot_max_count: int = Field(30, ge=1, le=1000, description="Keep at most this many snapshots per connection; the oldest go first")
    snapshot_max_age_s: int | None = Field(None, ge=0, description="Delete snapshots older than this (the newest is always kept); None keeps them by count only")
    snapshot_dir: str | None = Field(None, description="Where snapshots live (one folder per connection below it); None puts them beside the target root, on its filesystem, so they can be copy-on-write")
    kafka_timeout_s: float = Field(30.0, gt=0, le=3600, description="Kafka log: how long one request (offsets, metadata, a read) may wait for the cluster before it counts as unavailable")
    kafka_delivery_timeout_s: float = Field(120.0, gt=0, le=86400, description="Kafka log: how long an append may wait for the cluster; past it the capture's changes count as lost (a gap that remirrors)")
    kafka_topic_prefix: str = Field("dt.", pattern=KAFKA_TOPIC_PREFIX, description="Kafka log: prefix of every topic and consumer group of this installation (installations sharing a cluster need different ones)")
    kafka_properties: dict[str, str | int | float | bool] = Field(default_factory=dict, description="Kafka log: client properties for every client, by their librdkafka names (security.protocol, ssl.ca.location, sasl.mechanism, sasl.username, sasl.password...)")

    @field_validator("kafka_properties")
    @classmethod
    def _kafka_properties(cls, v: dict) -> dict:
        reserved = sorted(KAFKA_RESERVED_PROPERTIES.intersection(v))
        if reserved:
            raise ValueError(f"{', '.join(reserved)} cannot be set: the product sets them (ordering, "
                             "exactly-once appends and offsets depend on them)")
        return v

    @field_validator("log")
    @classmethod
    def _log_backend(cls, v: str) -> str:
        if v != "embedded" and not all(":" in part for part in v.split(",")):
            raise ValueError('must be "embedded" or a Kafka bootstrap address like "127.0.0.1:9092"')
        return v

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
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "settings"
            raise SettingsError(detail=f"{where}: {first['msg']}") from exc


def default_state_dir() -> Path:
    """Per-user default: $DT_STATE, else $XDG_STATE_HOME/datatether, else ~/.local/state/datatether."""
    if os.environ.get("DT_STATE"):
        return Path(os.environ["DT_STATE"])
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "datatether"
