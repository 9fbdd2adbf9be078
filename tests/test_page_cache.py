"""The log's page-cache window (engine/page_cache.py) on a real file system.

Whether pages are cached is asked of the kernel itself, with mincore(2) on a mapping of
the file (what util-linux's fincore does; a probing read would start readahead and bring
pages back). Dropping is advice that the kernel ignores for dirty pages, so the tests
write with ``sync`` (every write fdatasynced) or fsync before they look. A clean page
that something else holds at that instant stays too (a fresh-clone CI run once found a
few on this VM, whose kernel runs DAMON scans), so a range counts as dropped when at
most a tenth of its pages stayed, and as kept when all of them are there.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from datatether.engine import page_cache
from datatether.engine.log_segments import Segments

MiB = 1 << 20


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def cached_share(path, start: int, end: int) -> float:
    """The share of the pages of [start, end) (page-aligned) in the page cache."""
    length = end - start
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        if address == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            pages = length // page_cache.PAGE
            vec = ctypes.create_string_buffer(pages)
            if _libc.mincore(address, length, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(b & 1 for b in vec.raw) / pages
        finally:
            _libc.munmap(address, length)
    finally:
        os.close(fd)


def dropped(path, start: int, end: int) -> bool:
    return cached_share(path, start, end) <= 0.1


def kept(path, start: int, end: int) -> bool:
    return cached_share(path, start, end) == 1.0


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
    assert dropped(path, 0, 16 * MiB)
    assert kept(path, 31 * MiB, 32 * MiB)  # within KEEP_BYTES of the end
    segments.close()


def test_a_reader_drops_what_it_consumed_and_the_data_stays_readable(tmp_path, small_window, monkeypatch):
    monkeypatch.setattr(page_cache, "KEEP_BYTES", 1 << 40)  # only the reader drops here
    segments = Segments(tmp_path)
    payload, pointers = write_entries(segments, 24)
    (path,) = (tmp_path / "p.p").iterdir()
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    assert kept(path, 0, 24 * MiB)
    for i, pointer in enumerate(pointers[:16]):
        head, rest = segments.read("p", i, pointer, 0)
        assert head + rest == payload
    assert dropped(path, 0, 8 * MiB)
    assert kept(path, 14 * MiB, 24 * MiB)  # within the lag, and not read yet
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
