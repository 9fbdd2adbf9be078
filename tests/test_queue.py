"""Source queue accounting and limits (engine/queue.py) on a real embedded log."""

from __future__ import annotations

import threading

import pytest

from datatether.engine.errors import QueueFull
from datatether.engine.log_embedded import EmbeddedLog
from datatether.engine.offsets import NO_OFFSET
from datatether.engine.queue import QueueLimits, SourceQueue, free_bytes
from datatether.engine.settings import MiB, Settings

PART = "conn-1"


class Applied:
    """Stands for the applier's progress: the applied offset, moved by the test."""

    def __init__(self, offset: int = NO_OFFSET):
        self.offset = offset

    def __call__(self) -> int:
        return self.offset


@pytest.fixture
def elog(tmp_path):
    with EmbeddedLog(tmp_path / "log") as log_:
        log_.ensure_partition(PART)
        yield log_


def make(elog, tmp_path, applied, memory=1000, disk=0, min_free=0, overflows=None):
    limits = QueueLimits(memory_bytes=memory, disk_bytes=disk, min_free_bytes=min_free)
    on_overflow = overflows.append if overflows is not None else None
    return SourceQueue(elog, PART, limits, applied, tmp_path, on_overflow=on_overflow)


def test_counts_appended_and_not_applied(elog, tmp_path):
    applied = Applied()
    queue = make(elog, tmp_path, applied)
    assert queue.offer([b"a" * 10, b"b" * 20]) == 0
    assert queue.append([b"c" * 30]) == 2
    stats = queue.stats()
    assert (stats.ops, stats.bytes) == (3, 60)
    applied.offset = 0
    assert (queue.stats().ops, queue.stats().bytes) == (2, 50)
    applied.offset = 2
    assert (queue.stats().ops, queue.stats().bytes) == (0, 0)
    assert elog.end_offset(PART) == 3


def test_overflow_drops_until_reopen_and_reports_once(elog, tmp_path):
    applied = Applied()
    overflows: list[str] = []
    queue = make(elog, tmp_path, applied, memory=100, overflows=overflows)
    assert queue.offer([b"x" * 60]) == 0
    assert queue.offer([b"y" * 60]) is None  # 120 > 100
    assert queue.overflow and "queue limit of 100 bytes" in queue.overflow
    applied.offset = 0  # drained: there is room again, but the gap is not repaired yet
    assert queue.offer([b"z"]) is None
    assert len(overflows) == 1 and overflows[0] == queue.overflow
    assert elog.end_offset(PART) == 1
    assert queue.reopen() == 2
    assert queue.overflow is None
    assert queue.offer([b"w" * 10]) == 1


def test_control_records_are_appended_over_the_limit(elog, tmp_path):
    queue = make(elog, tmp_path, Applied(), memory=10)
    assert queue.offer([b"x" * 11]) is None
    assert queue.append([b"gap record"]) == 0
    assert queue.log().append(PART, [b"task result"]) == 1
    stats = queue.stats()
    assert (stats.ops, stats.bytes) == (2, len(b"gap record") + len(b"task result"))


def test_log_view_delegates_and_counts(elog, tmp_path):
    queue = make(elog, tmp_path, Applied())
    view = queue.log()
    view.append(PART, [b"abc"])
    assert view.end_offset(PART) == 1
    assert [r.value for r in view.read(PART, 0)] == [b"abc"]
    assert queue.stats().bytes == 3


def test_throttled_append_waits_for_the_applier(elog, tmp_path):
    applied = Applied()
    queue = make(elog, tmp_path, applied, memory=100)
    queue.append([b"x" * 40])
    done = []
    writer = threading.Thread(target=lambda: done.append(queue.throttled().append(PART, [b"m" * 20])))
    writer.start()
    writer.join(0.3)
    assert writer.is_alive() and not done  # 40 + 20 > half of 100: it waits
    applied.offset = 0
    writer.join(10)
    assert done == [1]


def test_a_mirror_feed_waits_for_room_first_and_then_appends_at_once(elog, tmp_path):
    applied = Applied()
    queue = make(elog, tmp_path, applied, memory=100)
    feed = queue.mirror_feed()
    queue.append([b"x" * 40])
    waiter = threading.Thread(target=feed.room, args=(20,))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and elog.end_offset(PART) == 1  # it waits, appending nothing
    applied.offset = 0
    waiter.join(10)
    assert not waiter.is_alive()
    queue.append([b"y" * 60])  # the capture took the room meanwhile
    assert feed.log.append(PART, [b"m" * 20]) == 2  # appended at once all the same
    assert queue.stats().bytes == 80


def test_a_batch_larger_than_the_limit_goes_into_an_empty_queue(elog, tmp_path):
    queue = make(elog, tmp_path, Applied(), memory=100)
    assert queue.append_when_room([b"m" * 101]) == 0


def test_throttled_append_fails_when_an_empty_queue_has_no_free_space(elog, tmp_path):
    queue = make(elog, tmp_path, Applied(), memory=1 << 30, disk=None, min_free=free_bytes(tmp_path) + MiB)
    with pytest.raises(QueueFull) as full:
        queue.append_when_room([b"m"])
    assert "minimum free space" in full.value.message
    assert elog.end_offset(PART) == 0


def test_closing_wakes_throttled_appends(elog, tmp_path):
    queue = make(elog, tmp_path, Applied(), memory=100)
    queue.append([b"x" * 90])
    errors = []

    def mirror():
        try:
            queue.append_when_room([b"m" * 20])
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            errors.append(exc)

    writer = threading.Thread(target=mirror)
    writer.start()
    queue.close()
    writer.join(10)
    assert not writer.is_alive() and errors and "closed" in str(errors[0])


def test_minimum_free_space_overflows(elog, tmp_path):
    overflows: list[str] = []
    queue = make(elog, tmp_path, Applied(), memory=1 << 40, disk=None,
                 min_free=free_bytes(tmp_path) + MiB, overflows=overflows)
    assert queue.offer([b"x"]) is None
    assert "minimum free space" in overflows[0]


def test_memory_then_disk_split(elog, tmp_path):
    queue = make(elog, tmp_path, Applied(), memory=100, disk=None)
    queue.offer([b"x" * 150])
    stats = queue.stats()
    assert (stats.memory_bytes, stats.disk_bytes, stats.limit_bytes) == (100, 50, None)


def test_restart_counts_the_backlog(tmp_path):
    with EmbeddedLog(tmp_path / "log") as log_:
        log_.ensure_partition(PART)
        log_.append(PART, [b"a", b"bb", b"ccc", b"dddd"])
    with EmbeddedLog(tmp_path / "log") as log_:
        applied = Applied(1)
        queue = SourceQueue(log_, PART, QueueLimits(1000, 0, 0), applied, tmp_path)
        assert (queue.stats().ops, queue.stats().bytes) == (2, 7)
        queue.append([b"e"])
        assert (queue.stats().ops, queue.stats().bytes) == (3, 8)


def test_a_damaged_record_in_the_backlog_does_not_keep_a_restart_from_counting(tmp_path):
    """The applier refuses a damaged record (the target becomes Mirror Required); counting
    the backlog must not fail first, which kept the daemon (and dt status) from starting."""
    with EmbeddedLog(tmp_path / "log") as log_:
        log_.ensure_partition(PART)
        log_.append(PART, [b"a", b"bb", b"ccc", b"dddd", b"eeeee"])
        key = log_._part(PART).key(2)
        damaged = bytearray(log_._cf["records"][key])
        damaged[-1] ^= 0x01
        log_._cf["records"][key] = bytes(damaged)
    with EmbeddedLog(tmp_path / "log") as log_:
        queue = SourceQueue(log_, PART, QueueLimits(1000, 0, 0), Applied(0), tmp_path)
        assert (queue.stats().ops, queue.stats().bytes) == (4, 2 + 4 + 5)  # the damaged one's size is unknown


def test_limits_from_settings():
    limits = QueueLimits.from_settings(Settings(memory_queue_limit_mb=64, disk_queue_limit_mb=10,
                                                minimum_free_space_mb=5))
    assert limits == QueueLimits(64 * MiB, 10 * MiB, 5 * MiB)
    assert limits.total_bytes == 74 * MiB
    assert QueueLimits.from_settings(Settings()).total_bytes is None


def test_sizes_of_applied_records_are_forgotten_without_changing_counts(elog, tmp_path):
    from datatether.engine import queue as queue_module

    applied = Applied()
    queue = make(elog, tmp_path, applied, memory=1 << 30)
    count = queue_module._TRIM_AT + 10
    queue.append([b"x" * 3] * count)
    applied.offset = count - 6  # 5 records left
    queue.append([b"yy"])  # the append trims what is applied
    assert len(queue._cum) < count
    assert (queue.stats().ops, queue.stats().bytes) == (6, 5 * 3 + 2)


def test_refusal_names_the_limit_hit(elog, tmp_path):
    by_size = make(elog, tmp_path, Applied(), memory=10)
    by_size.offer([b"x" * 11])
    assert by_size.refusal().params == {"queue": "source", "limit": 10}
    by_space = make(elog, tmp_path, Applied(), memory=1 << 40, disk=None, min_free=free_bytes(tmp_path) + MiB)
    by_space.offer([b"x"])
    assert by_space.refusal().params["queue"] == "source (minimum free space)"


def test_a_waiting_throttled_append_can_be_cancelled(elog, tmp_path):
    from datatether.engine.queue import Cancelled

    queue = make(elog, tmp_path, Applied(), memory=100)
    queue.append([b"x" * 90])
    cancel = threading.Event()
    errors = []

    def mirror():
        try:
            queue.throttled(cancel).append(PART, [b"m" * 20])
        except Cancelled as exc:
            errors.append(exc)

    writer = threading.Thread(target=mirror)
    writer.start()
    cancel.set()
    writer.join(10)
    assert not writer.is_alive() and len(errors) == 1
    assert elog.end_offset(PART) == 1
