"""The log's page-cache window (engine/page_cache.py) on a real file system.

Whether a page is cached is asked of the kernel itself: a read with RWF_NOWAIT fails
with EAGAIN when the page is not in the page cache. Dropping is advice that the kernel
ignores for dirty pages, so the tests write with ``sync`` (every write fdatasynced) or
fsync before they look: then the pages are clean and the advice is always taken.
"""

from __future__ import annotations

import os

import pytest

from datatether.engine import page_cache
from datatether.engine.log_segments import Segments

MiB = 1 << 20


def cached(path, offset: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(page_cache.PAGE)], offset, os.RWF_NOWAIT)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.fixture
def small_window(monkeypatch):
    monkeypatch.setattr(page_cache, "FLUSH_BYTES", 2 * MiB)
    monkeypatch.setattr(page_cache, "KEEP_BYTES", 8 * MiB)
    monkeypatch.setattr(page_cache, "READ_LAG_BYTES", 4 * MiB)


def write_entries(segments: Segments, count: int) -> tuple[bytes, list[bytes]]:
    """``count`` entries of one MiB (the same payload); returns it and their pointers."""
    payload = os.urandom(MiB)
    return payload, [segments.write("p", [(i, [payload])])[0] for i in range(count)]


def test_the_writer_keeps_only_its_newest_bytes_cached(tmp_path, small_window):
    segments = Segments(tmp_path, sync=True)
    write_entries(segments, 32)
    (path,) = (tmp_path / "p.p").iterdir()
    assert os.path.getsize(path) > 32 * MiB
    assert not cached(path, 0) and not cached(path, 16 * MiB)
    assert cached(path, 31 * MiB)  # within KEEP_BYTES of the end
    segments.close()


def test_a_reader_drops_what_it_consumed_and_the_data_stays_readable(tmp_path, small_window, monkeypatch):
    monkeypatch.setattr(page_cache, "KEEP_BYTES", 1 << 40)  # only the reader drops here
    segments = Segments(tmp_path)
    payload, pointers = write_entries(segments, 24)
    (path,) = (tmp_path / "p.p").iterdir()
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    assert cached(path, 0)
    for i, pointer in enumerate(pointers[:16]):
        head, rest = segments.read("p", i, pointer, 0)
        assert head + rest == payload
    assert not cached(path, 0) and not cached(path, 8 * MiB)
    assert cached(path, 14 * MiB) and cached(path, 20 * MiB)  # within the lag, and not read yet
    # What was dropped is read back from the disk, the same bytes.
    head, rest = segments.read("p", 0, pointers[0], 0)
    assert head + rest == payload
    segments.close()


def test_drop_read_waits_for_a_flush_worth_of_pages(small_window):
    lag = page_cache.READ_LAG_BYTES
    assert page_cache.drop_read(-1, 0, lag + MiB) == 0  # less than FLUSH_BYTES behind the lag: nothing
    assert page_cache.drop_read(-1, 0, lag + 3 * MiB + 5) == 3 * MiB  # whole pages only
    assert page_cache.drop_read(-1, 3 * MiB, 0) == 3 * MiB  # a reader going back drops nothing


def test_advice_on_a_bad_descriptor_is_ignored():
    page_cache.drop(-1, 0, MiB)
    page_cache.start_writeback(-1, 0, MiB)
