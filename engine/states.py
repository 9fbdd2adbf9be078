"""Every state enumeration, named as operators of this kind of software know them.

Values are the display names; transitions are logged with message id DT-S001 by
``engine.logs.transition``.
"""

from __future__ import annotations

import enum


class TargetDataState(str, enum.Enum):
    OK = "OK"
    MIRRORING = "Mirroring"
    MIRROR_REQUIRED = "Mirror Required"
    RESTORE_REQUIRED = "Restore Required"
    NOT_READY = "Not Ready"


class TargetStatus(str, enum.Enum):
    OK = "OK"
    NOT_LOADED = "Not Loaded"
    PAUSED = "Paused"
    RETRYING = "Retrying"


class MirrorStatus(str, enum.Enum):
    MIRRORING = "Mirroring"
    IDLE = "Idle"
    PAUSED = "Paused"
    WAITING = "Waiting"
    RESTORING = "Restoring"
    VERIFYING = "Verifying"
    REMOVING_ORPHANS = "Removing Orphans"


class ReplicationStatus(str, enum.Enum):
    REPLICATING = "Replicating"
    READY = "Ready"
    STOPPED = "Stopped"
    PENDING = "Pending"


class TransmitMode(str, enum.Enum):
    STARTED = "Started"
    PAUSED = "Paused"
    SCHEDULED = "Scheduled"
    STOPPED = "Stopped"
    ERROR = "Error"


class MirrorMode(str, enum.Enum):
    """How a mirror decides what to send (see the README's mirror table)."""

    FULL = "full"            # every file, whole
    DIFF = "diff"            # files whose size or mtime differ, whole
    NEWER = "newer"          # files newer on the source, whole
    CHECKSUM = "checksum"    # files that differ by size/mtime: only blocks whose digest differs
    CHECKSUM_ALL = "checksum-all"  # every file: only blocks whose digest differs
