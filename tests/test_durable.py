"""engine/durable.py: atomic small-file writes and the background writer of progress files."""

from __future__ import annotations

import errno
import subprocess
import threading

import pytest
from conftest import need

from datatether.engine import durable


def test_write_atomic_replaces_the_whole_content(tmp_path):
    durable.write_atomic(tmp_path / "f", b"first, longer content")
    durable.write_atomic(tmp_path / "f", b"second")
    assert (tmp_path / "f").read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # no temporary file left


def test_a_failed_write_atomic_leaves_the_old_content_and_no_temporary_file(tmp_path):
    """A full disk (the state directory's, say): the temporary file must not stay behind
    holding the space the next write needs."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True)
    need(mounted.returncode == 0, f"tmpfs mounts ({mounted.stderr.decode().strip()})", "run the tests as root")
    try:
        durable.write_atomic(small / "f", b"old")
        with pytest.raises(OSError) as failed:
            durable.write_atomic(small / "f", bytes(2 << 20))
        assert failed.value.errno == errno.ENOSPC
        assert sorted(p.name for p in small.iterdir()) == ["f"]
        assert (small / "f").read_bytes() == b"old"
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_write_atomic_whose_rename_fails_leaves_no_temporary_file(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        durable.write_atomic(tmp_path / "d", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.fixture
def gated(monkeypatch):
    """write_atomic held at a gate: ``started`` is set when a write begins."""
    written, started, gate = [], threading.Event(), threading.Event()
    real = durable.write_atomic

    def gated_write(path, data, mode=0o600):
        started.set()
        assert gate.wait(5)
        real(path, data, mode)
        written.append(data)

    monkeypatch.setattr(durable, "write_atomic", gated_write)
    return written, started, gate


def test_background_file_writes_in_order_and_skips_superseded_content(tmp_path, gated):
    written, started, gate = gated
    f = durable.BackgroundFile(tmp_path / "pos")
    f.submit(b"1")
    assert started.wait(5)  # the thread is writing 1 and waits at the gate
    f.submit(b"2")
    f.submit(b"3")  # 2 is superseded before its turn: never written
    gate.set()
    f.close()
    assert written == [b"1", b"3"] and (tmp_path / "pos").read_bytes() == b"3"


def test_after_discard_no_write_in_flight_can_bring_the_file_back(tmp_path, gated):
    written, started, gate = gated
    f = durable.BackgroundFile(tmp_path / "pos")
    f.submit(b"1")
    assert started.wait(5)
    f.submit(b"2")
    threading.Timer(0.05, gate.set).start()
    f.discard()  # drops 2 and waits for 1 to be written
    assert written == [b"1"]
    (tmp_path / "pos").unlink()
    f.close()
    assert written == [b"1"] and not (tmp_path / "pos").exists()


def test_write_now_is_durable_on_return_and_close_writes_what_is_pending(tmp_path):
    f = durable.BackgroundFile(tmp_path / "pos")
    f.write_now(b"now")
    assert (tmp_path / "pos").read_bytes() == b"now"
    f.submit(b"later")
    f.close()
    assert (tmp_path / "pos").read_bytes() == b"later"


def test_a_failed_background_write_is_raised_by_the_next_call(tmp_path):
    (tmp_path / "not-a-dir").write_bytes(b"")
    f = durable.BackgroundFile(tmp_path / "not-a-dir" / "pos")
    f.submit(b"1")
    with pytest.raises(OSError):
        f.close()
    f.close()  # the error was reported once
