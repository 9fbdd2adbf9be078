"""EmbeddedLog: the Log contract, plus what only the RocksDB backend promises (exact sizes,
crash survival of a killed process, readers in other processes while a writer holds it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from contract.log_contract import LogContract, values
from conftest import need

from datatether.engine import log_segments
from datatether.engine.errors import BackendUnavailable, CorruptRecord, NotFound, OffsetOutOfRange, UsageError
from datatether.engine.log_embedded import EmbeddedLog

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


def segment_entry(log: EmbeddedLog, partition: str, offset: int) -> tuple[str, int, int]:
    """(segment file, position, length) of a record stored in a segment."""
    _, _, segment, position, length = log_segments.POINTER.unpack(log._cf["records"][stored_key(log, partition, offset)])
    return str(log._segments.path(partition, segment)), position, length


class TestEmbeddedLogContractInSegments(LogContract):
    """The same contract with every record in a segment file, segments rolling often."""

    @pytest.fixture
    def make_log(self, tmp_path, monkeypatch):
        monkeypatch.setattr(log_segments, "MIN_BYTES", 0)
        monkeypatch.setattr(log_segments, "ROLL_BYTES", 300)
        return lambda: EmbeddedLog(tmp_path / "log")

    def corrupt(self, log, partition, offset):
        path, position, length = segment_entry(log, partition, offset)
        with open(path, "r+b") as f:
            f.seek(position + length - 1)
            last = f.read(1)[0]
            f.seek(position + length - 1)
            f.write(bytes((last ^ 0x01,)))


@pytest.fixture
def log(tmp_path):
    with EmbeddedLog(tmp_path / "log") as opened:
        opened.ensure_partition("p")
        yield opened


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


# -- segments ---------------------------------------------------------------------------

LARGE = log_segments.MIN_BYTES


def test_large_records_are_written_once_to_a_segment(log):
    big = [b"%d" % i * LARGE for i in range(3)]
    log.append("p", [big[0], b"small", big[1]])
    log.append("p", [big[2]])
    stored = [log._cf["records"][stored_key(log, "p", o)] for o in range(4)]
    assert [log_segments.is_pointer(v) for v in stored] == [True, False, True, True]
    assert max(len(v) for v in stored) < 100
    assert [r.value for r in log.read("p", 0)] == [big[0], b"small", big[1], big[2]]
    assert log.size("p") == (3 * len(big[0]) + 5, 4)
    assert len(log._segments.segments("p")) == 1  # one writer process, one segment


def test_truncation_deletes_only_segments_wholly_below_start(log, monkeypatch):
    monkeypatch.setattr(log_segments, "ROLL_BYTES", 2 * LARGE)
    big = values(8, size=LARGE)
    for value in big:
        log.append("p", [value])
    before = log._segments.segments("p")
    assert len(before) == 8  # each record fills a segment beyond half of ROLL_BYTES
    log.truncate_before("p", 5)
    assert log._segments.segments("p") == before[5:]
    assert [r.value for r in log.read("p", 5)] == big[5:]


def test_truncating_everything_deletes_every_segment(log):
    """The newest segment too, once its last record is below the start: a queue that filled
    the disk while the target was paused must give its space back once applied, not when
    256 MiB more have been written."""
    log.append("p", values(3, size=LARGE))
    log.append("p", [b"small"])  # not in a segment, and not yet applied (a Gap, say)
    log.truncate_before("p", 2)
    assert len(log._segments.segments("p")) == 1
    log.truncate_before("p", 3)
    assert log._segments.segments("p") == []
    log.append("p", values(1, "next", size=LARGE))
    assert [r.value for r in log.read("p", 3)] == [b"small"] + values(1, "next", size=LARGE)
    log.close()
    with EmbeddedLog(log.path) as reopened:
        assert [r.value for r in reopened.read("p", 3)] == [b"small"] + values(1, "next", size=LARGE)
        reopened.truncate_before("p", 4)
        assert len(reopened._segments.segments("p")) == 1  # it holds record 4


def test_damage_in_a_segment_stays_local_to_its_record(log):
    big = values(3, size=LARGE)
    log.append("p", big)
    TestEmbeddedLogContractInSegments().corrupt(log, "p", 1)
    with pytest.raises(CorruptRecord, match="offset 1"):
        log.read("p", 0)
    assert [r.value for r in log.read("p", 0, max_records=1)] == big[:1]
    assert [r.value for r in log.read("p", 2)] == big[2:]


def test_a_pointer_to_another_records_entry_is_corruption(log):
    log.append("p", values(2, size=LARGE))
    records = log._cf["records"]
    first, second = stored_key(log, "p", 0), stored_key(log, "p", 1)
    records[first], records[second] = records[second], records[first]
    for offset in (0, 1):
        with pytest.raises(CorruptRecord, match="no entry of this record"):
            log.read("p", offset)


DAMAGED_POINTERS = {
    "cut short": lambda pointer: pointer[:20],
    "negative position": lambda pointer: pointer[:11] + (-8).to_bytes(8, "big", signed=True) + pointer[19:],
    # read as asked, this would allocate a TiB before finding the file shorter
    "length past the segment": lambda pointer: pointer[:19] + (1 << 40).to_bytes(8, "big"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGED_POINTERS))
def test_a_damaged_pointer_is_corruption(log, damage):
    big = values(3, size=LARGE)
    log.append("p", big)
    records = log._cf["records"]
    key = stored_key(log, "p", 1)
    records[key] = DAMAGED_POINTERS[damage](records[key])
    with pytest.raises(CorruptRecord, match="offset 1"):
        log.read("p", 1)
    assert [r.value for r in log.read("p", 0, max_records=1)] == big[:1]
    assert [r.value for r in log.read("p", 2)] == big[2:]


def test_a_lost_segment_is_corruption(log):
    log.append("p", values(2, size=LARGE))
    path, _, _ = segment_entry(log, "p", 0)
    log.close()
    os.unlink(path)
    with EmbeddedLog(log.path) as reopened, pytest.raises(CorruptRecord, match="record 0 is missing"):
        reopened.read("p", 0)


def test_a_reader_behind_retention_sees_out_of_range_never_corruption(log, tmp_path, monkeypatch):
    monkeypatch.setattr(log_segments, "ROLL_BYTES", LARGE)
    log.append("p", values(1, size=LARGE))
    log.append("p", values(1, "second", size=LARGE))
    with EmbeddedLog.open_readonly(tmp_path / "log") as reader:
        assert reader.end_offset("p") == 2  # it has seen both records
        log.truncate_before("p", 1)  # removes the first segment
        with pytest.raises(OffsetOutOfRange):
            reader.read("p", 0)
        assert [r.value for r in reader.read("p", 1)] == values(1, "second", size=LARGE)


def removed_segments_held_open() -> list[str]:
    """Segment files this process still has open although they were deleted."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the descriptor listdir itself used
            continue
    return [link for link in held if ".seg" in link and link.endswith("(deleted)")]


def test_a_reader_lets_go_of_segments_retention_removed(log, tmp_path):
    """Else the disk space of every removed segment a reader process (the applier) had
    read stays taken for as long as it runs, however much retention drops."""
    log.append("p", values(2, size=LARGE))
    with EmbeddedLog.open_readonly(tmp_path / "log") as reader:
        assert len(reader.read("p", 0)) == 2  # the reader has the segment open now
        log.truncate_before("p", 2)
        assert reader.start_offset("p") == 2
        assert removed_segments_held_open() == []


def test_what_a_crash_leaves_in_segments_is_ignored_or_removed(tmp_path):
    path = tmp_path / "log"
    with EmbeddedLog(path) as opened:
        for name in ("p", "gone"):
            opened.ensure_partition(name)
            opened.append(name, values(2, size=LARGE))
        segment, position, length = segment_entry(opened, "p", 1)
        stale = opened._segments.folder("gone")
    # A crash after writing a segment entry but before its batch (a torn tail), and one in
    # drop_partition after its batch but before the segments were deleted.
    with open(segment, "ab") as f:
        f.write(b"torn" * 1000)
    with EmbeddedLog(path) as opened:
        opened.drop_partition("gone")
    stale.mkdir()
    (stale / f"{0:020d}.seg").write_bytes(b"left")
    with EmbeddedLog(path) as opened:
        assert not stale.exists()
        opened.append("p", values(2, "again", size=LARGE))
        opened.ensure_partition("gone")
        assert [r.value for r in opened.read("p", 0)] == values(2, size=LARGE) + values(2, "again", size=LARGE)
        assert opened.read("gone", 0) == []


def damage_table(path, first_key: bytes, skip: bytes | None = None) -> None:
    """Flip a bit in the first data block of the RocksDB table whose first key is
    ``first_key`` (and that does not contain ``skip``), as a bad disk would."""
    with EmbeddedLog(path) as opened:  # an open flushes what the last run left in the WAL
        tables = [path / f["name"].lstrip("/") for f in opened._db.live_files() if f["start_key"] == first_key]
    (table,) = [t for t in tables if skip is None or skip not in t.read_bytes()]
    damaged = bytearray(table.read_bytes())
    damaged[3] ^= 0x10
    table.write_bytes(bytes(damaged))


def test_a_damaged_partition_table_fails_the_open_and_loses_nothing(log):
    """A scan of the partition table that stops at a damaged block must not pass for the
    whole table: the partitions it did not see would be taken for dropped ones, their
    segments deleted and their offsets given out again."""
    log.append("p", values(2, size=LARGE))
    segment, _, _ = segment_entry(log, "p", 0)
    log.close()
    damage_table(log.path, b"p")
    with pytest.raises(CorruptRecord, match="partition table"):
        EmbeddedLog(log.path)
    assert os.path.exists(segment)


def test_damaged_consumer_offsets_are_corruption_not_absent(log):
    log.append("p", values(3))
    log.commit("p", "applier", 2)
    log.close()
    damage_table(log.path, b"p\x00applier")
    with EmbeddedLog(log.path) as reopened:
        with pytest.raises(CorruptRecord):
            reopened.consumers("p")  # {} would let retention think nobody needs the records
        with pytest.raises(CorruptRecord):
            reopened.committed("p", "applier")


def test_a_damaged_index_is_corruption(log):
    log.append("p", values(3, "payload"))
    first = stored_key(log, "p", 0)
    log.close()
    damage_table(log.path, first, skip=b"payload")
    with EmbeddedLog(log.path) as reopened:
        with pytest.raises(CorruptRecord):
            reopened.size("p")
        with pytest.raises(CorruptRecord):
            reopened.offset_for_time("p", 0)
        assert [r.value for r in reopened.read("p", 0)] == values(3, "payload")


@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs, unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True)
    need(mounted.returncode == 0, f"tmpfs mounts ({mounted.stderr.decode().strip()})", "run the tests as root")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_disk_is_backend_unavailable_and_the_log_reopens(small_fs):
    """RocksDB fails every write once its disk is full, closing included: the caller gets
    an error it knows (the command line's message and exit code, not an internal error),
    and the directory is released to be opened again once there is room."""
    ballast = small_fs / "ballast"
    ballast.write_bytes(bytes(5 << 20))  # room enough, once removed, to flush what the log holds
    opened = EmbeddedLog(small_fs / "log")
    opened.ensure_partition("p")
    appended = 0
    with pytest.raises(BackendUnavailable, match="No space left"):
        while True:
            opened.append("p", [b"%06d" % appended + b"." * 100])
            appended += 1
    try:
        opened.close()
    except BackendUnavailable:
        pass  # the write-ahead log could not be flushed: what was appended is in it anyway
    ballast.unlink()
    with EmbeddedLog(small_fs / "log") as reopened:
        assert reopened.end_offset("p") == appended
        assert reopened.read("p", appended - 1)[0].value.startswith(b"%06d" % (appended - 1))
        assert reopened.append("p", [b"room again"]) == appended


# -- real processes ----------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from datatether.engine.log_embedded import EmbeddedLog
    log = EmbeddedLog(sys.argv[1])
    log.ensure_partition("p")
    pad = int(sys.argv[2])
    batch = 0
    while True:  # until killed
        first = log.append("p", [(b"r%d-%d-" % (batch, i)).ljust(pad, b".") for i in range(1 + batch % 3)])
        log.commit("p", "applier", first)
        print(first, log.end_offset("p"), flush=True)
        batch += 1
""")


@pytest.mark.parametrize("pad", [0, LARGE], ids=["inline", "segments"])
def test_records_and_commits_survive_sigkill_of_the_writer(tmp_path, pad):
    path = tmp_path / "log"
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(pad)], stdout=subprocess.PIPE, text=True)
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
        records = LogContract.read_all(reopened, "p")
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


@pytest.mark.parametrize("size", [0, LARGE], ids=["inline", "segments"])
def test_a_reader_process_follows_the_writer(log, tmp_path, size):
    log.append("p", values(3, "before", size))
    log.commit("p", "applier", 1)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(tmp_path / "log")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "ready"
        log.append("p", values(2, "after", size))
        report = json.loads(reader.stdout.readline())
    finally:
        reader.wait(CHILD_TIMEOUT_S)
    assert reader.returncode == 0
    assert report["woke"] and report["refused"]
    assert report["seen"] == [v.decode() for v in values(3, "before", size) + values(2, "after", size)]
    assert report["committed"] == 1
    assert report["size"] == [log.size("p")[0], 5]
