"""The ``Log`` contract (engine/log.py), one test per clause, run against every backend.

A backend opts in with a subclass named ``Test...`` that provides two hooks::

    class TestMyLog(LogContract):
        @pytest.fixture
        def make_log(self, tmp_path):
            # A callable opening the log of this test; every call opens the same store again
            # (that is how durability across close/reopen is tested).
            return lambda: MyLog(tmp_path / "log")

        def corrupt(self, log, partition, offset):
            ...  # damage the stored bytes of that record so that its check fails

The suite opens logs only through ``make_log`` and closes each one it opened (``reopen``
closes the old one first). Partition names are unique per test (``self.name()``), so a
backend whose store is shared between tests (one Kafka cluster) needs nothing more.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from datatether.engine.errors import CorruptRecord, InvalidName, NotFound, OffsetOutOfRange, UsageError
from datatether.engine.log import Log, LogRecord
from datatether.engine.offsets import NO_OFFSET

WAKE_TIMEOUT_S = 30.0  # generous: a wait that is woken returns long before this
READ_AHEAD_S = 1.0  # lets a backend that fetches ahead after a read get far (a head start)


def values(count: int, tag: str = "v", size: int = 0) -> list[bytes]:
    """Distinct values; ``size`` pads each one to at least that many bytes."""
    return [f"{tag}-{index}".encode().ljust(size, b".") for index in range(count)]


class LogContract:
    # -- hooks of a backend ------------------------------------------------------------

    @pytest.fixture
    def make_log(self):
        raise NotImplementedError("a backend's subclass provides make_log")

    def corrupt(self, log: Log, partition: str, offset: int) -> None:
        raise NotImplementedError("a backend's subclass provides corrupt")

    # -- fixtures and helpers ----------------------------------------------------------

    @pytest.fixture
    def log(self, make_log):
        self._make_log = make_log
        self._open: list[Log] = []
        first = self.open()
        yield first
        for opened in self._open:
            opened.close()

    def open(self) -> Log:
        opened = self._make_log()
        self._open.append(opened)
        return opened

    def reopen(self, log: Log) -> Log:
        """Close ``log`` and open its store again."""
        self._open.remove(log)
        log.close()
        return self.open()

    @staticmethod
    def name(tag: str = "p") -> str:
        return f"dt-{tag}-{uuid.uuid4().hex[:16]}"

    def partition(self, log: Log, records: int = 0, **kw) -> str:
        name = self.name()
        log.ensure_partition(name)
        if records:
            log.append(name, values(records, **kw))
        return name

    @staticmethod
    def read_all(log: Log, partition: str, start: int | None = None) -> list[LogRecord]:
        offset = log.start_offset(partition) if start is None else start
        found = []
        while offset < log.end_offset(partition):
            batch = log.read(partition, offset)
            found += batch
            offset += len(batch)
        return found

    # -- conformance -------------------------------------------------------------------

    def test_is_a_log(self, log):
        assert isinstance(log, Log)

    # -- partitions --------------------------------------------------------------------

    def test_ensure_partition_is_idempotent_and_listed_sorted(self, log):
        names = [self.name("b"), self.name("a")]
        for name in names + names:
            log.ensure_partition(name)
        listed = log.partitions()
        assert set(names) <= set(listed)
        assert listed == sorted(listed)
        assert log.end_offset(names[0]) == log.start_offset(names[0]) == 0

    def test_ensure_partition_keeps_existing_records(self, log):
        name = self.partition(log, 3)
        log.ensure_partition(name)
        assert [r.value for r in log.read(name, 0)] == values(3)

    @pytest.mark.parametrize("bad", ["", "a/b", "a b", "x" * 201, "é", "a\x00b", "../up", "tab\t"])
    def test_invalid_partition_names_are_refused(self, log, bad):
        with pytest.raises(InvalidName):
            log.ensure_partition(bad)
        with pytest.raises(InvalidName):
            log.append(bad, [b"x"])
        assert bad not in log.partitions()

    def test_longest_valid_name_is_accepted(self, log):
        name = (self.name() + "x" * 200)[:200]
        log.ensure_partition(name)
        assert log.append(name, [b"x"]) == 0

    MISSING_CALLS = {
        "drop_partition": lambda log, p: log.drop_partition(p),
        "append": lambda log, p: log.append(p, [b"x"]),
        "read": lambda log, p: log.read(p, 0),
        "wait": lambda log, p: log.wait(p, 0, 0.01),
        "start_offset": lambda log, p: log.start_offset(p),
        "end_offset": lambda log, p: log.end_offset(p),
        "offset_for_time": lambda log, p: log.offset_for_time(p, 0),
        "commit": lambda log, p: log.commit(p, "c", NO_OFFSET),
        "committed": lambda log, p: log.committed(p, "c"),
        "consumers": lambda log, p: log.consumers(p),
        "truncate_before": lambda log, p: log.truncate_before(p, 0),
        "size": lambda log, p: log.size(p),
    }

    @pytest.mark.parametrize("call", sorted(MISSING_CALLS))
    def test_missing_partition_raises_not_found(self, log, call):
        missing = self.name("missing")
        with pytest.raises(NotFound):
            self.MISSING_CALLS[call](log, missing)
        assert missing not in log.partitions()

    def test_drop_partition_removes_records_and_consumers(self, log):
        dropped, kept = self.partition(log, 3), self.partition(log, 2)
        log.commit(dropped, "applier", 1)
        log.drop_partition(dropped)
        assert dropped not in log.partitions()
        assert kept in log.partitions()
        for call in self.MISSING_CALLS.values():
            with pytest.raises(NotFound):
                call(log, dropped)
        assert [r.value for r in log.read(kept, 0)] == values(2)

    def test_a_partition_created_again_after_drop_starts_empty(self, log):
        name = self.partition(log, 3)
        log.commit(name, "applier", 2)
        log.drop_partition(name)
        log.ensure_partition(name)
        assert (log.start_offset(name), log.end_offset(name)) == (0, 0)
        assert log.consumers(name) == {}
        assert log.append(name, [b"x"]) == 0

    # -- append ------------------------------------------------------------------------

    def test_offsets_are_consecutive_from_zero(self, log):
        name = self.partition(log)
        assert log.append(name, values(2, "a")) == 0
        assert log.append(name, values(1, "b")) == 2
        assert log.append(name, values(3, "c")) == 3
        assert log.end_offset(name) == 6
        assert log.start_offset(name) == 0
        assert [r.offset for r in log.read(name, 0)] == list(range(6))

    def test_partitions_have_independent_offsets(self, log):
        first, second = self.partition(log, 4), self.partition(log)
        assert log.append(second, [b"x"]) == 0
        assert log.end_offset(first) == 4

    def test_append_keeps_values_and_timestamps(self, log):
        name = self.partition(log)
        payloads = [b"", b"\x00\xff" * 100, bytes(range(256)), b"x" * 70000]
        # whole milliseconds: some brokers keep no finer timestamps
        log.append(name, payloads[:2], timestamp_ns=1_000_000_000)
        log.append(name, payloads[2:], timestamp_ns=2_000_000_000)
        records = log.read(name, 0)
        assert [r.value for r in records] == payloads
        assert [r.timestamp_ns for r in records] == [1_000_000_000] * 2 + [2_000_000_000] * 2

    def test_append_without_timestamp_uses_the_clock(self, log):
        name = self.partition(log)
        before = time.time_ns()
        log.append(name, [b"x"])
        after = time.time_ns()
        # Brokers may keep millisecond timestamps: allow the rounding, not more.
        assert before - 1_000_000 <= log.read(name, 0)[0].timestamp_ns <= after + 1_000_000

    def test_timestamps_never_decrease(self, log):
        """An append older than the previous record takes its time (a clock stepping back
        must not break lookups by time)."""
        name = self.partition(log)
        log.append(name, [b"a"], timestamp_ns=5_000_000_000)
        log.append(name, [b"b"], timestamp_ns=3_000_000_000)
        assert [r.timestamp_ns for r in log.read(name, 0)] == [5_000_000_000] * 2
        assert log.offset_for_time(name, 4_000_000_000) == 0

    def test_append_refuses_a_bare_bytes_value(self, log):
        name = self.partition(log)
        with pytest.raises(UsageError):
            log.append(name, b"abc")
        assert log.end_offset(name) == 0

    def test_empty_append_adds_nothing(self, log):
        name = self.partition(log, 2)
        assert log.append(name, []) == 2
        assert log.end_offset(name) == 2

    def test_concurrent_appends_form_one_total_order(self, log):
        name = self.partition(log)
        threads, rounds = 4, 50
        firsts: dict[str, list[int]] = {}

        def produce(tag: str) -> None:
            firsts[tag] = []
            for round_ in range(rounds):
                batch = [f"{tag}-{round_}-{i}".encode() for i in range(1 + round_ % 3)]
                firsts[tag].append(log.append(name, batch))

        workers = [threading.Thread(target=produce, args=(f"t{i}",)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        records = self.read_all(log, name)
        expected_total = threads * sum(1 + r % 3 for r in range(rounds))
        assert [r.offset for r in records] == list(range(expected_total))
        assert len({r.value for r in records}) == expected_total
        by_value = {r.value: r.offset for r in records}
        for tag, offsets in firsts.items():
            for round_, first in enumerate(offsets):
                batch = [f"{tag}-{round_}-{i}".encode() for i in range(1 + round_ % 3)]
                # each batch is contiguous, starting at the offset append returned
                assert [by_value[v] for v in batch] == list(range(first, first + len(batch)))
            assert offsets == sorted(offsets)

    # -- read --------------------------------------------------------------------------

    def test_read_from_the_middle(self, log):
        name = self.partition(log, 10)
        records = log.read(name, 4)
        assert [r.offset for r in records] == list(range(4, 10))
        assert [r.value for r in records] == values(10)[4:]

    def test_read_honours_max_records(self, log):
        name = self.partition(log, 10)
        assert [r.offset for r in log.read(name, 2, max_records=3)] == [2, 3, 4]
        assert [r.offset for r in log.read(name, 8, max_records=5)] == [8, 9]

    def test_read_stops_at_max_bytes(self, log):
        name = self.partition(log, 10, size=100)
        records = log.read(name, 0, max_bytes=250)
        # Either stop before exceeding the bound or once it is reached; never go on.
        assert [r.offset for r in records] in ([0, 1], [0, 1, 2])
        assert [r.value for r in records] == values(10, size=100)[:len(records)]

    def test_read_returns_at_least_one_record_whatever_max_bytes(self, log):
        name = self.partition(log, 3, size=1000)
        assert [r.offset for r in log.read(name, 1, max_bytes=1)] == [1]

    def test_read_at_end_returns_nothing(self, log):
        name = self.partition(log)
        assert log.read(name, 0) == []
        log.append(name, values(3))
        assert log.read(name, 3) == []

    @pytest.mark.parametrize("offset", [-1, 4, 100])
    def test_read_outside_the_log_raises(self, log, offset):
        name = self.partition(log, 3)
        with pytest.raises(OffsetOutOfRange):
            log.read(name, offset)

    def test_read_below_start_after_truncation_raises(self, log):
        name = self.partition(log, 5)
        log.truncate_before(name, 3)
        with pytest.raises(OffsetOutOfRange):
            log.read(name, 2)
        assert [r.offset for r in log.read(name, 3)] == [3, 4]

    # -- integrity ---------------------------------------------------------------------

    def test_damaged_record_raises_corrupt_record(self, log):
        name = self.partition(log, 3, size=64)
        self.corrupt(log, name, 1)
        with pytest.raises(CorruptRecord):
            log.read(name, 0)
        with pytest.raises(CorruptRecord):
            log.read(name, 1)

    def test_records_before_a_damaged_one_stay_readable(self, log):
        """Only the damaged record itself is CorruptRecord, whatever reads came before: one
        that stopped short of it (a backend may fetch ahead past it meanwhile), one that met
        it, one that continued after it."""
        name = self.partition(log)
        intact = values(8, size=64)
        for value in intact:
            log.append(name, [value])  # one append each, so the damage hits one record only
        self.corrupt(log, name, 5)
        assert [r.value for r in log.read(name, 0, max_records=1)] == intact[:1]
        time.sleep(READ_AHEAD_S)
        assert [r.value for r in log.read(name, 0, max_records=5)] == intact[:5]
        assert [r.value for r in log.read(name, 1, max_records=2)] == intact[1:3]
        assert [r.value for r in log.read(name, 3, max_records=2)] == intact[3:5]  # goes on
        with pytest.raises(CorruptRecord, match=r"offset 5\b"):  # blamed on the damaged one
            log.read(name, 3)
        assert [r.value for r in log.read(name, 6)] == intact[6:]
        assert [r.value for r in log.read(name, 4, max_records=1)] == intact[4:5]
        assert [r.value for r in log.read(name, 0, max_records=5)] == intact[:5]

    # -- wait --------------------------------------------------------------------------

    def test_wait_returns_at_once_for_an_existing_record(self, log):
        name = self.partition(log, 2)
        assert log.wait(name, 1, WAKE_TIMEOUT_S)
        assert log.wait(name, 0, 0)

    def test_wait_times_out_without_append(self, log):
        name = self.partition(log, 2)
        assert not log.wait(name, 2, 0.2)
        assert not log.wait(name, 5, 0)

    def test_wait_wakes_when_another_thread_appends(self, log):
        name = self.partition(log, 1)

        def produce() -> None:
            time.sleep(0.2)  # let the waiter block first (a head start, not an assertion)
            log.append(name, [b"late"])

        producer = threading.Thread(target=produce)
        producer.start()
        try:
            assert log.wait(name, 1, WAKE_TIMEOUT_S)
        finally:
            producer.join()
        assert log.read(name, 1)[0].value == b"late"

    # -- start, end, size, retention ---------------------------------------------------

    def test_size_is_exactly_the_retained_value_bytes(self, log):
        name = self.partition(log)
        assert log.size(name) == (0, 0)
        log.append(name, [b"a" * 10, b"b" * 20])
        log.append(name, [b"c" * 30])
        assert log.size(name) == (60, 3)
        log.truncate_before(name, 1)
        assert log.size(name) == (50, 2)
        log.truncate_before(name, 3)
        assert log.size(name) == (0, 0)

    def test_truncate_before_removes_the_prefix_only(self, log):
        name = self.partition(log, 6, size=100)
        log.truncate_before(name, 4)
        assert log.start_offset(name) == 4
        assert log.end_offset(name) == 6
        assert [r.value for r in log.read(name, 4)] == values(6, size=100)[4:]
        assert log.size(name) == (sum(map(len, values(6, size=100)[4:])), 2)

    def test_truncate_never_moves_start_backwards(self, log):
        name = self.partition(log, 6)
        log.truncate_before(name, 4)
        log.truncate_before(name, 2)
        assert log.start_offset(name) == 4
        assert [r.offset for r in log.read(name, 4)] == [4, 5]

    def test_truncate_is_clamped_to_end_offset(self, log):
        name = self.partition(log, 3)
        log.truncate_before(name, 50)
        assert log.start_offset(name) == log.end_offset(name) == 3
        assert log.size(name)[1] == 0
        assert log.read(name, 3) == []

    def test_offsets_are_not_reused_after_truncation(self, log):
        name = self.partition(log, 3)
        log.truncate_before(name, 3)
        assert log.append(name, [b"next"]) == 3
        assert [(r.offset, r.value) for r in log.read(name, 3)] == [(3, b"next")]

    def test_offset_for_time(self, log):
        name = self.partition(log)
        log.append(name, values(2, "a"), timestamp_ns=1_000_000_000)
        log.append(name, values(3, "b"), timestamp_ns=2_000_000_000)
        log.append(name, values(1, "c"), timestamp_ns=3_000_000_000)
        assert log.offset_for_time(name, 0) == 0
        assert log.offset_for_time(name, 1_000_000_000) == 0
        assert log.offset_for_time(name, 1_500_000_000) == 2
        assert log.offset_for_time(name, 2_000_000_000) == 2
        assert log.offset_for_time(name, 2_999_000_000) == 5
        assert log.offset_for_time(name, 3_000_000_000) == 5
        assert log.offset_for_time(name, 4_000_000_000) == 6
        log.truncate_before(name, 3)
        assert log.offset_for_time(name, 0) == 3
        assert log.offset_for_time(name, 2_000_000_000) == 3
        assert log.offset_for_time(name, 3_000_000_000) == 5

    def test_offset_for_time_of_an_empty_partition_is_its_end(self, log):
        name = self.partition(log, 2)
        log.truncate_before(name, 2)
        assert log.offset_for_time(name, 0) == 2

    # -- consumer offsets --------------------------------------------------------------

    def test_committed_defaults_to_no_offset(self, log):
        name = self.partition(log, 2)
        assert log.committed(name, "applier") == NO_OFFSET
        assert log.consumers(name) == {}

    def test_commit_records_and_may_move_backwards(self, log):
        name = self.partition(log, 10)
        log.commit(name, "applier", 7)
        log.commit(name, "transmitter", 9)
        assert log.committed(name, "applier") == 7
        log.commit(name, "applier", 2)  # replay
        assert log.committed(name, "applier") == 2
        log.commit(name, "applier", NO_OFFSET)
        assert log.committed(name, "applier") == NO_OFFSET
        log.commit(name, "applier", 4)
        assert log.consumers(name) == {"applier": 4, "transmitter": 9}

    @pytest.mark.parametrize("offset", [NO_OFFSET - 1, 3, 10])
    def test_commit_refuses_offsets_that_were_never_appended(self, log, offset):
        name = self.partition(log, 3)
        with pytest.raises(OffsetOutOfRange):
            log.commit(name, "applier", offset)
        assert log.committed(name, "applier") == NO_OFFSET

    def test_consumers_are_per_partition(self, log):
        first, second = self.partition(log, 3), self.partition(log, 3)
        log.commit(first, "applier", 2)
        assert log.committed(second, "applier") == NO_OFFSET
        assert log.consumers(second) == {}

    # -- durability --------------------------------------------------------------------

    def test_records_offsets_and_truncation_survive_reopen(self, log):
        name = self.partition(log)
        log.append(name, values(3, "a"), timestamp_ns=1_000_000_000)
        log.append(name, values(2, "b"), timestamp_ns=2_000_000_000)
        log.commit(name, "applier", 3)
        log.truncate_before(name, 1)
        log = self.reopen(log)
        assert name in log.partitions()
        assert (log.start_offset(name), log.end_offset(name)) == (1, 5)
        assert [r.value for r in log.read(name, 1)] == (values(3, "a") + values(2, "b"))[1:]
        assert log.committed(name, "applier") == 3
        assert log.size(name)[1] == 4
        assert log.offset_for_time(name, 2_000_000_000) == 3
        assert log.append(name, [b"after"]) == 5

    def test_a_closed_log_refuses_calls_and_closes_twice(self, log):
        name = self.partition(log)
        log.close()
        log.close()
        for call in (lambda: log.end_offset(name), lambda: log.partitions(), lambda: log.append(name, [b"x"]),
                     lambda: log.read(name, 0), lambda: log.commit(name, "applier", NO_OFFSET)):
            with pytest.raises(UsageError):
                call()

    def test_dropped_partition_stays_dropped_after_reopen(self, log):
        name = self.partition(log, 2)
        log.drop_partition(name)
        log = self.reopen(log)
        assert name not in log.partitions()
        with pytest.raises(NotFound):
            log.read(name, 0)
