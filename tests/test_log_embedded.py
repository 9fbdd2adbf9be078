"""EmbeddedLog: the Log contract, plus what only the RocksDB backend promises (exact sizes,
crash survival of a killed process, readers in other processes while a writer holds it)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from contract.log_contract import LogContract, values

from datatether.engine.errors import BackendUnavailable, CorruptRecord, NotFound, OffsetOutOfRange, UsageError
from datatether.engine.log_embedded import EmbeddedLog
from datatether.engine.offsets import NO_OFFSET

CHILD_TIMEOUT_S = 60


def stored_key(log: EmbeddedLog, partition: str, offset: int) -> bytes:
    return log._part(partition).key(offset)


class TestEmbeddedLogContract(LogContract):
    @pytest.fixture
    def make_log(self, tmp_path):
        return lambda: EmbeddedLog(tmp_path / "log")

    def corrupt(self, log, partition, offset):
        records = log._cf["records"]
        key = stored_key(log, partition, offset)
        damaged = bytearray(records[key])
        damaged[-1] ^= 0x01
        records[key] = bytes(damaged)


@pytest.fixture
def log(tmp_path):
    with EmbeddedLog(tmp_path / "log") as opened:
        opened.ensure_partition("p")
        yield opened


def test_size_is_exactly_the_retained_payload_bytes(log):
    log.append("p", [b"a" * 10, b"b" * 20])
    log.append("p", [b"c" * 30])
    assert log.size("p") == (60, 3)
    log.truncate_before("p", 1)
    assert log.size("p") == (50, 2)
    log.truncate_before("p", 3)
    assert log.size("p") == (0, 0)


def test_truncate_deletes_the_stored_records(log):
    log.append("p", values(5))
    log.truncate_before("p", 3)
    stored = [key for key in log._cf["records"].keys()]
    assert stored == [stored_key(log, "p", 3), stored_key(log, "p", 4)]


def test_damage_stays_local_to_its_record(log):
    log.append("p", values(3))
    TestEmbeddedLogContract().corrupt(log, "p", 1)
    assert [r.value for r in log.read("p", 0, max_records=1)] == values(3)[:1]
    assert [r.value for r in log.read("p", 2)] == values(3)[2:]


def test_a_record_missing_inside_the_log_is_corruption_not_a_gap(log):
    log.append("p", values(4))
    del log._cf["records"][stored_key(log, "p", 2)]
    with pytest.raises(CorruptRecord, match="record 2 is missing"):
        log.read("p", 0)
    with pytest.raises(CorruptRecord):
        log.read("p", 2)


def test_reads_racing_truncation_see_out_of_range_never_corruption(log):
    """A read whose start is truncated between its range check and its iterator must not
    mistake the vanished records for lost ones."""
    log.append("p", values(1000))

    def truncate() -> None:
        for offset in range(1000):
            log.truncate_before("p", offset)

    def read_from_start() -> None:
        start = log.start_offset("p")
        try:
            records = log.read("p", start, max_records=50)
        except OffsetOutOfRange:
            return
        assert [r.offset for r in records] == list(range(start, start + len(records)))

    truncator = threading.Thread(target=truncate)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the two threads as finely as possible
    try:
        truncator.start()
        while truncator.is_alive():
            read_from_start()
    finally:
        sys.setswitchinterval(interval)
        truncator.join()
    assert [r.offset for r in log.read("p", 999)] == [999]


def test_a_partition_created_again_after_drop_starts_empty(log):
    log.append("p", values(3))
    log.commit("p", "applier", 2)
    log.drop_partition("p")
    log.ensure_partition("p")
    assert (log.start_offset("p"), log.end_offset("p")) == (0, 0)
    assert log.consumers("p") == {}
    assert log.append("p", [b"x"]) == 0


def test_partition_names_sharing_a_prefix_stay_apart(log):
    for name in ("p.1", "p-", "p0"):
        log.ensure_partition(name)
        log.append(name, [name.encode()])
    log.append("p", [b"p"])
    log.commit("p", "c", 0)
    log.drop_partition("p.1")
    assert [r.value for r in log.read("p", 0)] == [b"p"]
    assert log.consumers("p-") == {}
    assert [r.value for r in log.read("p-", 0)] == [b"p-"]
    assert log.size("p0") == (2, 1)


def test_timestamps_never_decrease(log):
    log.append("p", [b"a"], timestamp_ns=5_000)
    log.append("p", [b"b"], timestamp_ns=3_000)
    assert [r.timestamp_ns for r in log.read("p", 0)] == [5_000, 5_000]
    assert log.offset_for_time("p", 4_000) == 0


@pytest.mark.parametrize("offset", [NO_OFFSET - 1, 3, 10])
def test_commit_refuses_offsets_that_were_never_appended(log, offset):
    log.append("p", values(3))
    with pytest.raises(OffsetOutOfRange):
        log.commit("p", "applier", offset)
    assert log.committed("p", "applier") == NO_OFFSET


def test_append_refuses_a_bare_bytes_value(log):
    with pytest.raises(UsageError):
        log.append("p", b"abc")
    assert log.end_offset("p") == 0


def test_empty_append_adds_nothing(log):
    log.append("p", values(2))
    assert log.append("p", []) == 2
    assert log.end_offset("p") == 2


def test_closed_log_refuses_calls_and_closes_twice(tmp_path):
    opened = EmbeddedLog(tmp_path / "log")
    opened.ensure_partition("p")
    opened.close()
    opened.close()
    with pytest.raises(UsageError):
        opened.end_offset("p")
    with pytest.raises(UsageError):
        opened.partitions()


def test_a_second_writer_is_refused(log, tmp_path):
    with pytest.raises(BackendUnavailable):
        EmbeddedLog(tmp_path / "log")


def test_sync_mode_keeps_everything(tmp_path):
    with EmbeddedLog(tmp_path / "log", sync=True) as opened:
        opened.ensure_partition("p")
        opened.append("p", values(3))
        opened.commit("p", "applier", 1)
    with EmbeddedLog(tmp_path / "log") as opened:
        assert [r.value for r in opened.read("p", 0)] == values(3)
        assert opened.committed("p", "applier") == 1


def test_open_readonly_of_a_missing_log_is_not_found(tmp_path):
    with pytest.raises(NotFound):
        EmbeddedLog.open_readonly(tmp_path / "nothing")


def test_readonly_log_refuses_writes(log, tmp_path):
    log.append("p", values(2))
    with EmbeddedLog.open_readonly(tmp_path / "log") as reader:
        assert [r.value for r in reader.read("p", 0)] == values(2)
        for write in (lambda: reader.append("p", [b"x"]), lambda: reader.ensure_partition("q"),
                      lambda: reader.commit("p", "c", 0), lambda: reader.truncate_before("p", 1),
                      lambda: reader.drop_partition("p")):
            with pytest.raises(UsageError):
                write()
    assert log.end_offset("p") == 2


# -- real processes ----------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from datatether.engine.log_embedded import EmbeddedLog
    log = EmbeddedLog(sys.argv[1])
    log.ensure_partition("p")
    batch = 0
    while True:  # until killed
        first = log.append("p", [b"r%d-%d" % (batch, i) for i in range(1 + batch % 3)])
        log.commit("p", "applier", first)
        print(first, log.end_offset("p"), flush=True)
        batch += 1
""")


def test_records_and_commits_survive_sigkill_of_the_writer(tmp_path):
    path = tmp_path / "log"
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        reported = [tuple(map(int, child.stdout.readline().split())) for _ in range(200)]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(CHILD_TIMEOUT_S)
    assert child.returncode == -signal.SIGKILL
    last_commit, last_end = reported[-1]
    with EmbeddedLog(path) as reopened:
        assert reopened.end_offset("p") >= last_end
        assert reopened.committed("p", "applier") >= last_commit
        records = reopened.read("p", 0, max_records=reopened.end_offset("p"))
        assert [r.offset for r in records] == list(range(reopened.end_offset("p")))
        batch_of = [r.value.split(b"-")[0] for r in records]
        # whole batches only: a batch is one atomic write
        expected = [b"r%d" % batch for batch in range(len(set(batch_of))) for _ in range(1 + batch % 3)]
        assert batch_of == expected


READER = textwrap.dedent("""
    import json, sys
    from datatether.engine.errors import UsageError
    from datatether.engine.log_embedded import EmbeddedLog
    with EmbeddedLog.open_readonly(sys.argv[1]) as log:
        seen = [r.value.decode() for r in log.read("p", 0)]
        print("ready", flush=True)
        woke = log.wait("p", len(seen), 60)
        seen += [r.value.decode() for r in log.read("p", len(seen))]
        try:
            log.append("p", [b"x"])
            refused = False
        except UsageError:
            refused = True
        print(json.dumps({"seen": seen, "woke": woke, "refused": refused,
                          "committed": log.committed("p", "applier"), "size": log.size("p")}))
""")


def test_a_reader_process_follows_the_writer(log, tmp_path):
    log.append("p", values(3, "before"))
    log.commit("p", "applier", 1)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(tmp_path / "log")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "ready"
        log.append("p", values(2, "after"))
        report = json.loads(reader.stdout.readline())
    finally:
        reader.wait(CHILD_TIMEOUT_S)
    assert reader.returncode == 0
    assert report["woke"] and report["refused"]
    assert report["seen"] == [v.decode() for v in values(3, "before") + values(2, "after")]
    assert report["committed"] == 1
    assert report["size"] == [log.size("p")[0], 5]
