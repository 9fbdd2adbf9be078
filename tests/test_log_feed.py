"""The live feed of a partition (engine/log_feed.py) between a real EmbeddedLog writer and a
read-only view of it: what the feed brings equals what the log stores, and whatever it
cannot bring (a backlog, a lagging reader, a datagram too large, a writer gone) is read
from the log, so a reader always gets every record, in order."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from datatether.engine import log_feed
from datatether.engine.log_embedded import EmbeddedLog
from datatether.engine.log_feed import Feed, FedLog, FeedingLog

P = "conn-1"


class CountingLog:
    """The reader's own view of the log, counting what the feed left to it."""

    def __init__(self, inner):
        self.inner = inner
        self.reads = 0

    def read(self, *args, **kwargs):
        self.reads += 1
        return self.inner.read(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def logs(tmp_path):
    writer = EmbeddedLog(tmp_path / "log")
    writer.ensure_partition(P)
    writer.append(P, [b"before the feed"])  # exists before the reader opens
    reader = CountingLog(EmbeddedLog.open_readonly(tmp_path / "log"))
    yield writer, reader
    writer.close()


def feed_pair(writer, reader, sndbuf: int | None = None):
    w, r = Feed.pair()
    if sndbuf is not None:
        w.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    feed = Feed(w)
    return FeedingLog(writer, P, feed), FedLog(reader, P, r), feed


def read_all(fed: FedLog, start: int, end: int) -> list:
    records = []
    while start < end:
        assert fed.wait(P, start, 30)
        batch = fed.read(P, start)
        assert batch and batch[0].offset == start
        records += batch
        start = batch[-1].offset + 1
    return records


def test_fed_records_are_what_the_log_stores_and_need_no_log_read(logs):
    writer, reader = logs
    feeding, fed, _ = feed_pair(writer, reader)
    assert [r.value for r in fed.read(P, 0)] == [b"before the feed"]  # the backlog: from the log
    reads = reader.reads
    values = [os.urandom(n) for n in (0, 1, 4096, log_feed.CARRY_MAX)]
    first = feeding.append(P, values[:2])
    feeding.append(P, values[2:])
    assert fed.wait(P, first + 3, 30)
    got = fed.read(P, first)
    assert reader.reads == reads
    assert [(r.offset, r.value) for r in got] == [(r.offset, r.value) for r in writer.read(P, first)]
    assert [r.value for r in got] == values


def test_large_records_are_announced_and_read_from_the_log_in_order(logs):
    """Records above CARRY_MAX travel as a notice; runs of small ones around them are
    still carried, and the reader gets every record of the mixed append in order."""
    writer, reader = logs
    feeding, fed, feed = feed_pair(writer, reader)
    big = log_feed.CARRY_MAX + 1
    values = [os.urandom(n) for n in (10, big, 20, 30, big, 2 * big, 40)]
    first = feeding.append(P, values)
    reads = reader.reads
    assert fed.wait(P, first + len(values) - 1, 30)
    assert [(r.offset, r.value) for r in read_all(fed, first, first + len(values))] == list(
        enumerate(values, first))
    assert feed.skipped == 0
    assert reader.reads > reads  # the announced ones came from the log


def test_announcements_lost_to_a_full_socket_are_read_from_the_log(logs):
    """A reader that does not read while large records are appended: once the socket is
    full even the announcements are lost; the next record the feed brings shows where
    the log is, and the reader gets every record in order."""
    writer, reader = logs
    feeding, fed, feed = feed_pair(writer, reader, sndbuf=4096)
    values = [os.urandom(log_feed.CARRY_MAX + 1) for _ in range(100)]
    first = feeding.append(P, values[:1])
    for value in values[1:]:
        feeding.append(P, [value])
    assert feed.skipped > 0
    assert fed.wait(P, first, 30)  # takes what reached the socket
    values.append(b"small, carried")
    feeding.append(P, values[-1:])
    assert [r.value for r in read_all(fed, first, first + len(values))] == values


def test_a_lagging_reader_gets_every_record_in_order(logs):
    """A small socket buffer and a reader that only reads at the end: most datagrams are
    skipped, and the skipped ranges are read from the log."""
    writer, reader = logs
    feeding, fed, feed = feed_pair(writer, reader, sndbuf=4096)
    values = [os.urandom(3000) for _ in range(200)]
    for i in range(0, len(values), 3):
        feeding.append(P, values[i:i + 3])
    assert feed.skipped > 0
    assert fed.wait(P, len(values), 30)
    assert [r.value for r in read_all(fed, 1, len(values) + 1)] == values


def test_a_datagram_too_large_is_announced_and_read_from_the_log(logs, monkeypatch):
    writer, reader = logs
    monkeypatch.setattr(log_feed, "MAX_DATAGRAM", 1 << 16)
    monkeypatch.setattr(log_feed, "CARRY_MAX", 1 << 20)  # a record the feed would carry
    feeding, fed, feed = feed_pair(writer, reader)
    big = os.urandom(1 << 17)
    offset = feeding.append(P, [big])
    assert feed.skipped == 1
    assert fed.wait(P, offset, 30)
    assert fed.read(P, offset)[0].value == big


def test_a_full_reader_buffer_leaves_datagrams_in_the_socket(logs, monkeypatch):
    writer, reader = logs
    monkeypatch.setattr(log_feed, "BUFFER_BYTES", 10_000)
    feeding, fed, feed = feed_pair(writer, reader)
    values = [os.urandom(4000) for _ in range(30)]
    for value in values:
        feeding.append(P, [value])
    assert [r.value for r in read_all(fed, 1, len(values) + 1)] == values
    assert feed.skipped == 0


def test_wait_returns_when_another_thread_appends_and_wake_ends_it(logs):
    writer, reader = logs
    feeding, fed, _ = feed_pair(writer, reader)
    timer = threading.Timer(0.05, lambda: feeding.append(P, [b"late"]))
    timer.start()
    assert fed.wait(P, 1, 60)
    timer.join()
    waker = threading.Timer(0.05, fed.wake)
    waker.start()
    assert fed.wait(P, 2, 60) is False
    waker.join()


def test_without_a_writer_the_reader_uses_the_log_alone(logs):
    writer, reader = logs
    feeding, fed, feed = feed_pair(writer, reader)
    feed.close()  # the writer's end closes (the daemon stopped feeding)
    writer.append(P, [b"unfed"])
    assert fed.wait(P, 1, 30)
    assert fed.read(P, 1)[0].value == b"unfed"


def test_an_unannounced_record_is_found_in_the_log_when_the_wait_ends(logs):
    """A record the writer could neither feed nor announce (its socket was full) is found
    in the log once the wait times out, and read from there."""
    writer, reader = logs
    feeding, fed, _ = feed_pair(writer, reader)
    writer.append(P, [b"behind the feed's back"])
    assert fed.wait(P, 1, 0.05)
    assert fed.read(P, 1)[0].value == b"behind the feed's back"


def test_other_partitions_are_not_fed(logs):
    writer, reader = logs
    writer.ensure_partition("other")
    feeding, fed, feed = feed_pair(writer, reader)
    feeding.append("other", [b"x"])
    assert fed.read("other", 0)[0].value == b"x"
    assert fed.wait(P, 1, 0) is False
