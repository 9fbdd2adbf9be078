"""FuseCapture on real FUSE mounts: pass-through to the directory it is mounted over, the
events each operation produces (order, paths, data), replication-set semantics of renames
and links, mmap, a failing sink, unmounting while busy, odd names and ownership."""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from contract.capture_contract import CaptureContract, kept, only_mtime

from datatether.capture import fuse_libc
from datatether.capture.fuse import FuseCapture
from datatether.engine.capture import Capture
from datatether.engine.errors import CaptureFailed
from datatether.engine.events import (Barrier, Create, Fallocate, FileKind, Link, RemoveXattr, Rename,
                                      Rmdir, SetAttr, SetXattr, Symlink, Truncate, Unlink, Write)
from datatether.engine.settings import Settings

pytestmark = pytest.mark.fuse
CHILD_TIMEOUT_S = 60


class Recorder:
    """A sink that keeps what it receives (thread-safe), or raises while ``failing``."""

    def __init__(self):
        self.events = []
        self.failing = False
        self._lock = threading.Lock()

    def __call__(self, events):
        if self.failing:
            raise RuntimeError("queue full")
        with self._lock:
            self.events.extend(kept(events))

    def ops(self, kind=None):
        with self._lock:
            return [e.op for e in self.events if kind is None or isinstance(e.op, kind)]

    def take(self, times=False):
        """The operations received since the last take; without the SetAttr events that
        only carry an mtime (after data changes and in parent directories) unless ``times``."""
        with self._lock:
            ops, self.events = [e.op for e in self.events], []
        return ops if times else [op for op in ops if not only_mtime(op)]


class TestFuseCaptureContract(CaptureContract):
    @pytest.fixture
    def make_capture(self, fuse_available):
        return lambda root, sink, on_gap, matches: FuseCapture(root, sink, matches=matches,
                                                               on_gap=on_gap, stop_grace_s=1.0)


def outside_excl(rel: str, is_dir: bool) -> bool:
    """The replication set of these tests: everything but the subtree ``excl``."""
    return rel != "excl" and not rel.startswith("excl/")


@pytest.fixture
def source(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    (root / "before.txt").write_bytes(b"there before the mount\n")
    (root / "excl").mkdir()
    (root / "excl" / "outside.bin").write_bytes(b"x" * 5000)
    return root


@pytest.fixture
def real(source):
    """A descriptor of the real directory, opened before anything is mounted over it."""
    fd = os.open(source, os.O_PATH | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def read_real(real_fd, rel) -> bytes:
    fd = os.open(rel, os.O_RDONLY, dir_fd=real_fd)
    try:
        return os.read(fd, 1 << 24)
    finally:
        os.close(fd)


@pytest.fixture
def capture(fuse_available, source, real):
    recorder = Recorder()
    gaps = []
    cap = FuseCapture(source, recorder, Settings(max_write_buffer=4096), matches=outside_excl,
                      on_gap=gaps.append, stop_grace_s=1.0)
    cap.recorder, cap.gap_reasons = recorder, gaps
    cap.start()
    yield cap
    cap.stop()


def test_mounts_over_the_directory_keeping_its_files_visible(capture, source):
    assert isinstance(capture, Capture) and capture.running
    assert os.stat(source).st_dev != os.fstat(capture._root_fd).st_dev
    assert sorted(os.listdir(source)) == ["before.txt", "excl"]
    assert (source / "before.txt").read_bytes() == b"there before the mount\n"
    st_real = os.stat("before.txt", dir_fd=capture._root_fd)
    assert os.stat(source / "before.txt").st_ino == st_real.st_ino  # use_ino
    assert capture.recorder.ops() == []  # reading is not a change


def test_write_data_reaches_the_sink_without_a_copy_and_is_released_after(fuse_available, source, real):
    """The sink gets the kernel's request buffer itself, as a view; once the handler
    returned, a sink that kept the view fails to read it instead of reading a buffer
    libfuse has reused (engine/capture.py: keep copies)."""
    seen = []

    def sink(events):
        for event in events:
            if isinstance(event.op, Write):
                seen.append((type(event.op.data), bytes(event.op.data), event.op.data))

    payload = os.urandom(256 << 10)
    with FuseCapture(source, sink, stop_grace_s=1.0):
        (source / "big").write_bytes(payload)
    assert b"".join(data for _, data, _ in seen) == payload == read_real(real, "big")
    assert {kind for kind, _, _ in seen} == {memoryview}
    with pytest.raises(ValueError, match="released"):
        bytes(seen[0][2])


def test_file_operations_become_events_in_order(capture, source, real):
    f = source / "f.txt"
    with open(f, "wb") as out:
        out.write(b"hello world")
        out.flush()
        os.fsync(out.fileno())
    os.truncate(f, 5)
    os.chmod(f, 0o640)
    os.chown(f, 1234, 5678)
    os.utime(f, ns=(1_000_000_123, 2_000_000_456))
    os.setxattr(f, "user.note", b"v1")
    os.removexattr(f, "user.note")
    fd = os.open(f, os.O_RDWR)
    os.posix_fallocate(fd, 0, 8192)
    os.close(fd)
    with open(f, "wb"):
        pass  # O_TRUNC on an existing file
    os.unlink(f)
    ops = capture.recorder.take()
    created = ops[0]
    assert isinstance(created, Create) and created.path == "f.txt" and created.kind == FileKind.FILE
    assert ops[1:] == [
        Write("f.txt", 0, b"hello world"),
        Barrier("f.txt"),
        Truncate("f.txt", 5),
        SetAttr("f.txt", mode=0o640),
        SetAttr("f.txt", mode=0o640, uid=1234, gid=5678),
        SetAttr("f.txt", atime_ns=1_000_000_123, mtime_ns=2_000_000_456),
        SetXattr("f.txt", "user.note", b"v1"),
        RemoveXattr("f.txt", "user.note"),
        Fallocate("f.txt", 0, 0, 8192),
        Truncate("f.txt", 0),
        Unlink("f.txt"),
    ]
    assert not (source / "f.txt").exists()


def last_mtimes(ops) -> dict[str, int]:
    """Path -> the modification time the events leave it with (renames followed)."""
    times: dict[str, int] = {}
    for op in ops:
        if isinstance(op, (Create, Symlink)) or (isinstance(op, SetAttr) and op.mtime_ns is not None):
            times[op.path] = op.mtime_ns
        elif isinstance(op, Rename):
            for path in [p for p in times if p == op.src or p.startswith(op.src + "/")]:
                times[op.dst + path[len(op.src):]] = times.pop(path)
        elif isinstance(op, (Unlink, Rmdir)):
            times.pop(op.path, None)
    return times


def test_modification_times_follow_data_and_name_changes(capture, source, real):
    os.mkdir(source / "d")
    with open(source / "d" / "f", "wb") as f:
        f.write(b"data")
    fd = os.open(source / "before.txt", os.O_WRONLY)
    os.pwrite(fd, b"T", 0)
    os.fsync(fd)  # the time goes out with the fsync already, before the close
    times = last_mtimes(capture.recorder.ops())
    assert times["before.txt"] == os.stat("before.txt", dir_fd=real).st_mtime_ns
    os.close(fd)
    os.symlink("f", source / "d" / "ln")
    os.rename(source / "d" / "f", source / "d" / "g")
    os.truncate(source / "d" / "g", 2)
    (source / "gone").write_bytes(b"")
    os.unlink(source / "gone")
    expected = {rel: os.stat(rel or ".", dir_fd=real, follow_symlinks=False).st_mtime_ns
                for rel in ("", "before.txt", "d", "d/ln", "d/g")}
    times = last_mtimes(capture.recorder.ops())
    assert {rel: times.get(rel) for rel in expected} == expected


def test_writes_land_in_the_real_directory_at_their_offsets(capture, source, real):
    f = source / "data.bin"
    with open(f, "wb") as out:
        out.write(b"a" * 10)
    fd = os.open(f, os.O_WRONLY)
    os.pwrite(fd, b"ZZ", 3)
    os.pwrite(fd, b"end", 20)  # leaves a hole
    os.close(fd)
    with open(f, "ab") as out:  # O_APPEND: the event must carry the real offset
        out.write(b"+")
    expected = b"aaaZZaaaaa" + b"\0" * 10 + b"end+"
    assert read_real(real, "data.bin") == expected
    writes = capture.recorder.ops(Write)
    assert [(w.offset, w.data) for w in writes] == [(0, b"a" * 10), (3, b"ZZ"), (20, b"end"), (23, b"+")]


def test_large_writes_are_split_at_the_maximum_write_buffer(capture, source, real):
    payload = os.urandom(128 << 10)
    fd = os.open(source / "big", os.O_WRONLY | os.O_CREAT, 0o644)
    os.pwrite(fd, payload, 4096 * 3)
    os.close(fd)
    writes = capture.recorder.ops(Write)
    assert all(len(w.data) <= 4096 for w in writes)
    assert [w.offset for w in writes] == list(range(4096 * 3, 4096 * 3 + len(payload), 4096))
    assert b"".join(w.data for w in writes) == payload
    assert read_real(real, "big")[4096 * 3:] == payload


def test_directories_nodes_and_symlinks(capture, source):
    os.mkdir(source / "d", 0o750)
    os.mkfifo(source / "d" / "fifo", 0o600)
    os.symlink("../before.txt", source / "d" / "ln")
    os.lchown(source / "d" / "ln", 42, 43)
    assert os.readlink(source / "d" / "ln") == "../before.txt"
    assert (source / "d" / "ln").read_bytes() == b"there before the mount\n"
    fd = os.open(source / "d", os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)
    with pytest.raises(OSError) as err:
        os.rmdir(source / "d")
    assert err.value.errno == errno.ENOTEMPTY
    os.unlink(source / "d" / "fifo")
    os.unlink(source / "d" / "ln")
    os.rmdir(source / "d")
    ops = capture.recorder.take()
    assert [type(op) for op in ops] == [Create, Create, Symlink, SetAttr, Barrier, Unlink, Unlink, Rmdir]
    assert (ops[0].path, ops[0].kind, ops[0].mode) == ("d", FileKind.DIR, 0o750)
    assert (ops[1].path, ops[1].kind, ops[1].mode) == ("d/fifo", FileKind.FIFO, 0o600)
    assert (ops[2].path, ops[2].target) == ("d/ln", "../before.txt")
    assert ops[3:] == [SetAttr("d/ln", mode=0o777, uid=42, gid=43), Barrier("d"), Unlink("d/fifo"), Unlink("d/ln"),
                       Rmdir("d")]


def test_operations_in_the_excluded_subtree_produce_no_events(capture, source, real):
    (source / "excl" / "new").write_bytes(b"not replicated")
    os.mkdir(source / "excl" / "sub")
    os.unlink(source / "excl" / "new")
    assert capture.recorder.ops() == []
    assert read_real(real, "excl/outside.bin") == b"x" * 5000


def test_renames_within_into_and_out_of_the_set(capture, source):
    (source / "a").write_bytes(b"A")
    (source / "b").write_bytes(b"B")
    capture.recorder.take()
    os.rename(source / "a", source / "a2")                # within
    os.rename(source / "b", source / "a2")                # within, over an existing file
    os.rename(source / "a2", source / "excl" / "gone")    # out of the set
    os.rename(source / "excl" / "outside.bin", source / "in.bin")  # into the set
    ops = capture.recorder.take()
    assert ops[:3] == [Rename("a", "a2"), Rename("b", "a2"), Unlink("a2")]
    created, rest = ops[3], ops[4:]
    assert isinstance(created, Create) and created.path == "in.bin" and created.kind == FileKind.FILE
    assert b"".join(op.data for op in rest if isinstance(op, Write)) == b"x" * 5000
    assert Truncate("in.bin", 5000) in rest
    st = os.lstat(source / "in.bin")
    assert rest[-1] == SetAttr("in.bin", atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns)


def test_directory_moved_into_the_set_is_recreated_and_out_of_it_removed(capture, source):
    tree = source / "excl" / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_bytes(b"content")
    os.symlink("sub/f", tree / "ln")
    os.setxattr(tree / "sub" / "f", "user.k", b"v")
    os.rename(tree, source / "tree")
    ops = capture.recorder.take()
    assert [(type(op).__name__, getattr(op, "path", None)) for op in ops] == [
        ("Create", "tree"), ("Symlink", "tree/ln"), ("Create", "tree/sub"), ("Create", "tree/sub/f"),
        ("Write", "tree/sub/f"), ("Truncate", "tree/sub/f"), ("SetXattr", "tree/sub/f"),
        ("SetAttr", "tree/sub/f"), ("SetAttr", "tree/sub"), ("SetAttr", "tree"),
    ]
    assert ops[1].target == "sub/f" and ops[4].data == b"content"
    os.rename(source / "tree", source / "excl" / "back")
    assert capture.recorder.take() == [Rmdir("tree", recursive=True)]


def test_rename_flags(capture, source):
    (source / "p").write_bytes(b"p")
    (source / "q").write_bytes(b"q")
    capture.recorder.take()
    real_root = os.open(source, os.O_PATH | os.O_DIRECTORY)  # the mount, this time
    try:
        with pytest.raises(OSError) as err:
            fuse_libc.renameat2(real_root, b"p", real_root, b"q", fuse_libc.RENAME_NOREPLACE)
        assert err.value.errno == errno.EEXIST
        with pytest.raises(OSError) as err:
            fuse_libc.renameat2(real_root, b"p", real_root, b"q", fuse_libc.RENAME_EXCHANGE)
        assert err.value.errno == errno.EINVAL
        fuse_libc.renameat2(real_root, b"p", real_root, b"r", fuse_libc.RENAME_NOREPLACE)
    finally:
        os.close(real_root)
    assert capture.recorder.take() == [Rename("p", "r")]
    assert (source / "q").read_bytes() == b"q" and (source / "r").read_bytes() == b"p"


def test_hard_links(capture, source, real):
    (source / "orig").write_bytes(b"same inode")
    capture.recorder.take()
    os.link(source / "orig", source / "twin")
    os.link(source / "excl" / "outside.bin", source / "linked-in")
    ops = capture.recorder.take()
    assert ops[0] == Link("orig", "twin")
    assert isinstance(ops[1], Create) and ops[1].path == "linked-in"
    assert b"".join(op.data for op in ops if isinstance(op, Write)) == b"x" * 5000
    assert os.stat("orig", dir_fd=real).st_ino == os.stat("twin", dir_fd=real).st_ino
    with open(source / "twin", "r+b") as f:
        f.write(b"S")
    assert capture.recorder.take() == [Write("twin", 0, b"S")]
    assert read_real(real, "orig") == b"Same inode"


def test_a_change_through_a_name_outside_the_set_reaches_the_files_name_in_it(capture, source, real):
    """The data is one inode's: a write, truncate or chmod through an excluded name is
    a change of the name in the set, and is told as one."""
    (source / "in.dat").write_bytes(b"v1\n")
    os.link(source / "in.dat", source / "excl" / "alias")
    capture.recorder.take()
    with open(source / "excl" / "alias", "r+b") as f:
        f.seek(3)
        f.write(b"v2\n")
    os.truncate(source / "excl" / "alias", 5)
    os.chmod(source / "excl" / "alias", 0o640)
    os.setxattr(source / "excl" / "alias", "user.k", b"v")
    ops = capture.recorder.take(times=True)
    assert [op for op in ops if not only_mtime(op)] == [
        Write("in.dat", 3, b"v2\n"), Truncate("in.dat", 5), SetAttr("in.dat", mode=0o640),
        SetXattr("in.dat", "user.k", b"v")]
    assert {op.path for op in ops} == {"in.dat"} and capture.gap_reasons == []
    os.link(source / "excl" / "alias", source / "excl" / "alias2")
    os.unlink(source / "in.dat")
    capture.recorder.take()
    (source / "excl" / "alias2").write_bytes(b"every name known, none in the set")
    assert capture.recorder.take(times=True) == [] and capture.gap_reasons == []


def test_an_open_with_o_trunc_through_a_name_outside_the_set_truncates_the_files_name_in_it(capture, source, real):
    """`> excl/alias` empties the file of the set too: without the Truncate, the target
    would keep the old bytes past what the shorter new content covers."""
    (source / "in.dat").write_bytes(b"a" * 1000)
    os.link(source / "in.dat", source / "excl" / "alias")
    os.stat(source / "in.dat")  # the kernel caches its size
    capture.recorder.take()
    with open(source / "excl" / "alias", "wb") as f:
        assert os.stat(source / "in.dat").st_size == 0  # the other name's cache follows
        f.write(b"short")
    assert [op for op in capture.recorder.take() if not isinstance(op, SetAttr)] == [
        Truncate("in.dat", 0), Write("in.dat", 0, b"short")]
    assert read_real(real, "in.dat") == b"short" and capture.gap_reasons == []


def test_a_change_through_a_name_outside_the_set_of_a_file_with_unknown_names_is_a_gap(capture, source, real):
    os.link("excl/outside.bin", "made-behind-the-mount", src_dir_fd=real, dst_dir_fd=real)
    capture.recorder.take()
    with open(source / "excl" / "outside.bin", "r+b") as f:
        f.write(b"y")
    assert capture.recorder.take(times=True) == []
    assert capture.gap_reasons and "excl/outside.bin, outside the set" in capture.gap_reasons[0]


def test_holes_of_a_sparse_file_show_through_the_mount(capture, source, real):
    with open(source / "sparse", "wb") as f:
        f.write(b"a")
        f.seek(10 << 20)
        f.write(b"b")
    fd = os.open(source / "sparse", os.O_RDONLY)
    try:
        hole = os.lseek(fd, 0, os.SEEK_HOLE)
        assert 0 < hole < 10 << 20
        assert os.lseek(fd, hole, os.SEEK_DATA) == (10 << 20) // os.statvfs(source).f_bsize * os.statvfs(source).f_bsize
        with pytest.raises(OSError) as err:
            os.lseek(fd, (10 << 20) + 1, os.SEEK_DATA)
        assert err.value.errno == errno.ENXIO
    finally:
        os.close(fd)


def _sizes_and_modes_through_both_names(dirpath: Path, a: str, b: str) -> list:
    """What a child process sees through name ``b`` of a file after changing it through
    ``a``, within the attribute timeout (the kernel caches each name's attributes apart)."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import json, mmap, os
        a, b = {str(dirpath / a)!r}, {str(dirpath / b)!r}
        seen = [(os.stat(b).st_size, os.stat(b).st_mode & 0o777, os.stat(b).st_nlink)]
        os.truncate(a, 1000)
        os.chmod(a, 0o600)
        seen.append((os.stat(b).st_size, os.stat(b).st_mode & 0o777, os.stat(b).st_nlink))
        with open(a, "ab") as f:
            f.write(b"y" * 5000)
        seen.append((os.stat(b).st_size, os.stat(b).st_mode & 0o777, os.stat(b).st_nlink))
        with open(b, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            m[len(m) - 1] = 0x7a  # past the real end of file if the size were stale: SIGBUS
        os.unlink({str(dirpath / "third")!r})
        seen.append((os.stat(b).st_size, os.stat(b).st_mode & 0o777, os.stat(b).st_nlink))
        print(json.dumps(seen))
    """)], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr}"
    return [tuple(x) for x in json.loads(out.stdout)]


@pytest.mark.parametrize("where", ["", "excl/"])
def test_a_change_through_one_name_of_a_hard_link_is_seen_through_the_others(capture, source, real, where):
    # The mount is path based: each name is an inode of its own in the kernel, with its
    # own cached attributes. Without invalidating the other names, this saw the old size
    # and mode through "twin", and the mmap store past the real end of file was a SIGBUS.
    d = source / where
    (d / "orig").write_bytes(b"x" * 100_000)
    os.link(d / "orig", d / "twin")
    os.link(d / "orig", d / "third")
    assert _sizes_and_modes_through_both_names(d, "orig", "twin") == [
        (100_000, 0o644, 3), (1000, 0o600, 3), (6000, 0o600, 3), (6000, 0o600, 2)]
    assert read_real(real, where + "orig")[-1:] == b"z"


def test_linked_names_follow_renames(capture, source):
    (source / "dir").mkdir()
    (source / "dir" / "orig").write_bytes(b"x" * 100_000)
    os.link(source / "dir" / "orig", source / "twin")
    os.link(source / "twin", source / "third")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os
        root = {str(source)!r}
        sizes = [os.stat(root + p).st_size for p in ("/dir/orig", "/twin", "/third")]
        os.rename(root + "/dir", root + "/moved")
        os.rename(root + "/twin", root + "/third")  # two names of one file: nothing happens
        os.stat(root + "/moved/orig"), os.stat(root + "/third")
        os.truncate(root + "/twin", 10)
        sizes += [os.stat(root + "/moved/orig").st_size, os.stat(root + "/third").st_size]
        os.truncate(root + "/moved/orig", 20)
        sizes += [os.stat(root + "/twin").st_size, os.stat(root + "/third").st_size]
        print(sizes)
    """)], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[100000,", "100000,", "100000,", "10,", "10,", "20,", "20]"]


def test_chmod_through_a_symlink_names_the_file_it_reaches(capture, source):
    (source / "target").write_bytes(b"t")
    os.symlink("target", source / "link")
    capture.recorder.take()
    os.chmod(source / "link", 0o600)
    assert capture.recorder.take() == [SetAttr("target", mode=0o600)]


def test_ignore_delete_operations_keeps_deletes_off_the_log(fuse_available, source, real):
    recorder = Recorder()
    settings = Settings(ignore_delete_ops=True)
    with FuseCapture(source, recorder, settings, matches=outside_excl):
        (source / "doomed").write_bytes(b"d")
        os.mkdir(source / "dir")
        os.mkdir(source / "leaving")
        recorder.take()
        os.unlink(source / "doomed")
        os.rmdir(source / "dir")
        os.rename(source / "leaving", source / "excl" / "left")
        assert recorder.take() == []
    assert not os.path.exists(source / "doomed") and not os.path.exists(source / "dir")


def test_shared_writable_mmap_reaches_the_log(capture, source, real):
    # In a child process: touching a mapped page of this mount faults into the filesystem,
    # whose handlers need the GIL that an mmap store in this process would be holding.
    path = source / "mapped"
    with open(path, "wb") as f:
        f.write(b"\0" * 3 * mmap.PAGESIZE)
    capture.recorder.take()
    subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import mmap
        with open({str(path)!r}, "r+b") as f:
            with mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
                m[10:15] = b"first"
                m.flush()
                m[2 * mmap.PAGESIZE:2 * mmap.PAGESIZE + 6] = b"second"
    """)], check=True, timeout=CHILD_TIMEOUT_S)
    image = bytearray(3 * mmap.PAGESIZE)
    for w in capture.recorder.ops(Write):
        assert w.path == "mapped"
        image[w.offset:w.offset + len(w.data)] = w.data
    expected = read_real(real, "mapped")
    assert expected[10:15] == b"first" and expected[2 * mmap.PAGESIZE:][:6] == b"second"
    assert bytes(image) == expected


def test_a_handler_failure_is_an_error_for_that_call_only(fuse_available, source):
    def matches(rel, is_dir):
        if rel == "boom":
            raise RuntimeError("bug in the rules")
        return True
    recorder = Recorder()
    with FuseCapture(source, recorder, matches=matches):
        with pytest.raises(OSError) as err:
            os.mkdir(source / "boom")
        assert err.value.errno == errno.EIO
        (source / "fine").write_bytes(b"f")
        assert [type(op) for op in recorder.take()] == [Create, Write]


def test_listing_a_directory_never_asks_the_mount_from_inside_a_handler(fuse_available, source):
    # readdir used to stat ".." of the listed directory: for a top-level directory that
    # is the set's root, under this very mount, so the handler waited for a request of
    # its own. With one worker (or every worker doing it, or a killed daemon) nobody
    # answered: the listing hung, and a SIGKILLed daemon never exited (its mount stayed).
    from datatether.capture.fuse_session import Tuning
    (source / "top").mkdir()
    (source / "top" / "inner").mkdir()
    with FuseCapture(source, Recorder(), tuning=Tuning(max_threads=1, attr_timeout=0.0),
                     stop_grace_s=1.0):
        listed = {}
        lister = threading.Thread(target=lambda: listed.update(
            top=sorted(os.listdir(source / "top")), inner=os.listdir(source / "top" / "inner"),
            root=sorted(os.listdir(source))), daemon=True)
        lister.start()
        lister.join(10)
        assert not lister.is_alive(), "listing a directory waited for the mount itself"
    assert listed == {"top": ["inner"], "inner": [], "root": ["before.txt", "excl", "top"]}


def test_odd_names(capture, source, real):
    names = ["with space", "new\nline", "ünïcödé ☃", "-leading-dash", os.fsdecode(b"bad\xffbyte")]
    for name in names:
        with open(os.path.join(os.fsencode(source), os.fsencode(name)), "wb") as f:
            f.write(name.encode("utf-8", "surrogateescape"))
    ops = capture.recorder.take()
    assert [op.path for op in ops if isinstance(op, Create)] == names
    for name in names:
        raw = os.fsencode(name)
        assert read_real(real, raw) == raw
    assert set(os.listdir(source)) >= set(names)


@pytest.fixture
def shared_dir():
    """A directory other users can reach (pytest's tmp_path lives under a 0700 directory)."""
    top = tempfile.mkdtemp(prefix="dt-fuse-")
    os.chmod(top, 0o755)
    yield Path(top)
    shutil.rmtree(top)


def test_created_objects_belong_to_the_calling_user(fuse_available, shared_dir):
    source = shared_dir / "src"
    source.mkdir(mode=0o777)
    os.chmod(source, 0o777)
    (source / "setgid").mkdir()
    os.chown(source / "setgid", 0, 777)
    os.chmod(source / "setgid", 0o2777)
    real = os.open(source, os.O_PATH | os.O_DIRECTORY)
    recorder = Recorder()
    script = textwrap.dedent(f"""
        import os
        os.setgroups([]); os.setgid(4321); os.setuid(4321); os.umask(0)
        os.close(os.open({str(source / 'mine')!r}, os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir({str(source / 'mydir')!r}, 0o777)
        os.close(os.open({str(source / 'setgid' / 'grouped')!r}, os.O_CREAT | os.O_WRONLY, 0o640))
    """)
    try:
        with FuseCapture(source, recorder):
            subprocess.run([sys.executable, "-c", script], check=True, timeout=CHILD_TIMEOUT_S)
        expected = [("mine", 4321, 4321, 0o666), ("mydir", 4321, 4321, 0o777),
                    ("setgid/grouped", 4321, 777, 0o640)]
        for name, uid, gid, mode in expected:
            st = os.stat(name, dir_fd=real)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, mode)
        assert [(c.path, c.uid, c.gid, c.mode) for c in recorder.ops(Create)] == expected
    finally:
        os.close(real)


def test_stop_with_a_busy_file_does_not_hang(fuse_available, source):
    recorder = Recorder()
    cap = FuseCapture(source, recorder, stop_grace_s=1.0)
    cap.start()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        f = open({str(source / 'held')!r}, 'wb')
        print('open', flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        with holder.stdout:
            assert holder.stdout.readline().strip() == "open"
        started = time.monotonic()
        cap.stop()
        assert not cap.running and time.monotonic() - started < 30
        assert not mounted(source)
        assert (source / "before.txt").read_bytes() == b"there before the mount\n"  # the real directory again
    finally:
        holder.kill()
        holder.wait()


def test_the_root_stays_put_and_reports_the_real_file_system(capture, source, tmp_path):
    with pytest.raises(OSError) as err:
        os.rename(source, tmp_path / "elsewhere")
    assert err.value.errno == errno.EBUSY  # the root is the mountpoint
    mounted_fs, real_fs = os.statvfs(source), os.statvfs(tmp_path)
    assert (mounted_fs.f_blocks, mounted_fs.f_bsize) == (real_fs.f_blocks, real_fs.f_bsize)
    assert capture.recorder.ops() == []


def test_one_capture_per_directory(capture, source):
    second = FuseCapture(source, Recorder())
    with pytest.raises(CaptureFailed):
        second.start()
    assert capture.running and (source / "before.txt").exists()


def test_a_missing_directory_cannot_be_captured(fuse_available, tmp_path):
    capture = FuseCapture(tmp_path / "nowhere", Recorder())
    with pytest.raises(CaptureFailed) as err:
        capture.start()
    assert "cannot open the directory" in err.value.message and not capture.running


@contextmanager
def holder_of_a_capture(source, *, new_session: bool):
    """A child process that mounts a capture over ``source`` and waits to be killed; any
    mount it leaves behind is removed afterwards, whatever the test found."""
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from datatether.capture.fuse import FuseCapture
        FuseCapture({str(source)!r}, lambda events: None).start()
        print("mounted", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, start_new_session=new_session)
    try:
        with child.stdout:
            assert child.stdout.readline().strip() == "mounted"
        yield child
    finally:
        child.kill()
        child.wait()
        if mounted(source):
            subprocess.run(["fusermount3", "-u", "-z", str(source)], check=True)


def mounted(path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def test_a_killed_capture_leaves_the_directory_usable(fuse_available, source):
    with holder_of_a_capture(source, new_session=False) as child:
        child.kill()
        child.wait()
        deadline = time.monotonic() + CHILD_TIMEOUT_S  # auto_unmount's helper acts asynchronously
        while mounted(source) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not mounted(source)
        assert (source / "before.txt").read_bytes() == b"there before the mount\n"


def test_start_clears_a_dead_mount_left_behind(fuse_available, source):
    with holder_of_a_capture(source, new_session=True) as child:
        os.killpg(child.pid, signal.SIGKILL)  # with its auto_unmount helper: the mount stays, dead
        child.wait()
        with pytest.raises(OSError) as err:
            os.listdir(source)
        assert err.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        recorder = Recorder()
        with FuseCapture(source, recorder):
            assert sorted(os.listdir(source)) == ["before.txt", "excl"]
            (source / "new").write_bytes(b"n")
        assert [type(op) for op in recorder.take()] == [Create, Write]


def test_a_capability_set_through_the_mount_is_dropped_by_the_next_write(capture, source, real):
    """A write drops security.capability (the filesystem's job under KILLPRIV_V2, the
    kernel's before): set through the mount after a first write through the same open
    file (which found none, so later writes skip the check), it is gone after the next,
    and the drop is an event like any removal."""
    import struct
    f = source / "prog"
    f.write_bytes(b"#!/bin/true\n")
    real_prog = f"/proc/self/fd/{real}/prog"
    caps = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)  # revision 2, effective, cap_net_raw
    with open(f, "r+b", buffering=0) as out:
        out.write(b"#")  # looks, and finds none
        os.setxattr(f, "security.capability", caps)
        assert os.getxattr(real_prog, "security.capability") == caps
        capture.recorder.take()
        out.write(b"#")
    with pytest.raises(OSError) as gone:
        os.getxattr(real_prog, "security.capability")
    assert gone.value.errno == errno.ENODATA
    assert RemoveXattr("prog", "security.capability") in capture.recorder.take()


def test_the_kernel_leaves_privilege_drops_to_the_filesystem(fuse_available, source, monkeypatch):
    """FUSE_HANDLE_KILLPRIV_V2 is agreed at INIT (capture/fuse_killpriv.py): the kernel
    asks for security.capability once per file, not before every write."""
    from datatether.capture.fuse import CaptureFs
    asked = []
    real_getxattr = CaptureFs.getxattr

    def counted(self, path, name):
        asked.append(name)
        return real_getxattr(self, path, name)

    monkeypatch.setattr(CaptureFs, "getxattr", counted)
    recorder = Recorder()
    with FuseCapture(source, recorder) as cap:
        assert cap._session.init_patch.enabled
        with open(source / "many", "wb") as f:
            for i in range(100):
                f.write(b"w" * 4096)
                f.flush()
    assert asked.count(b"security.capability") <= 1
    assert len(recorder.ops(Write)) == 100


OTHER_ID = 4321  # the unprivileged writer's uid and gid


def _program_others_may_change(shared_dir: Path, mode: int) -> tuple[Path, Path]:
    """A source directory anyone may write in, holding a script ``prog`` of ``mode``."""
    source = shared_dir / "src"
    source.mkdir()
    os.chmod(source, 0o777)
    f = source / "prog"
    f.write_bytes(b"#!/bin/true\n")
    os.chmod(f, mode)
    return source, f


def _write_as_other(path: Path, how: str, *, in_group: bool = False, then_run: bool = False) -> str:
    """As uid OTHER_ID: stat the file (the kernel caches its mode), change its data, and,
    ``then_run``, run it at once; returns what it printed."""
    change = {"write": "os.pwrite(fd, open(path, 'rb').read(4), 0)", "truncate": "os.ftruncate(fd, 1 << 20)",
              "fallocate": "os.posix_fallocate(fd, 0, 1 << 20)",
              # emptied by the open, then its program written back so that it still runs
              "open(O_TRUNC)": "data = open(path, 'rb').read(); os.close(fd); "
                               "fd = os.open(path, os.O_WRONLY | os.O_TRUNC); os.write(fd, data)"}[how]
    script = textwrap.dedent(f"""
        import os, subprocess
        path = {str(path)!r}
        os.setgroups([{OTHER_ID + 1 if in_group else OTHER_ID}]); os.setgid({OTHER_ID}); os.setuid({OTHER_ID})
        os.stat(path)
        fd = os.open(path, os.O_WRONLY)
        {change}
        os.close(fd)
        if {then_run}:
            print(subprocess.run([path, "-u"], capture_output=True, text=True, check=True).stdout, end="")
    """)
    return subprocess.run([sys.executable, "-c", script], check=True, timeout=CHILD_TIMEOUT_S,
                          capture_output=True, text=True).stdout


def test_an_unknown_libfuse_leaves_privilege_drops_to_the_kernel(fuse_available, shared_dir, monkeypatch):
    """Where the layout of libfuse's custom I/O struct is not known, the INIT reply is left
    alone (DT-F014): the kernel keeps checking before writes, and drops still happen."""
    from datatether.capture import fuse_killpriv
    monkeypatch.setattr(fuse_killpriv, "CUSTOM_IO_VERSIONS", ())
    source, f = _program_others_may_change(shared_dir, 0o4777)
    recorder = Recorder()
    with FuseCapture(source, recorder) as cap:
        assert not cap._session.init_patch.enabled
        _write_as_other(f, "write")
        assert stat.S_IMODE(f.stat().st_mode) == 0o777
    assert SetAttr("prog", mode=0o777) in recorder.take()


@pytest.mark.parametrize("how", ["write", "truncate", "fallocate", "open(O_TRUNC)"])
def test_an_unprivileged_data_change_drops_set_id_bits_and_says_so(fuse_available, shared_dir, how):
    """A set-user-ID-root program changed by an unprivileged user loses set-user-ID (and
    its group-executable set-group-ID) on the source, as an event before the data change,
    and in the kernel's view at once, though it had the mode cached for 30 s: run right
    after the change, it does not run as root."""
    from datatether.capture.fuse_session import Tuning
    source = shared_dir / "src"
    source.mkdir()
    os.chmod(source, 0o777)
    prog = source / "id"
    shutil.copy("/usr/bin/id", prog)
    os.chmod(prog, 0o6777)
    real = os.open(source, os.O_PATH | os.O_DIRECTORY)
    recorder = Recorder()
    try:
        with FuseCapture(source, recorder, tuning=Tuning(attr_timeout=30.0)):
            as_root_first = _run_as_other(prog)
            ran_as = _write_as_other(prog, how, then_run=True)
            ops = recorder.take()
            assert stat.S_IMODE(os.stat("id", dir_fd=real).st_mode) == 0o777
            assert stat.S_IMODE(prog.stat().st_mode) == 0o777
    finally:
        os.close(real)
    assert (as_root_first, ran_as) == ("0\n", f"{OTHER_ID}\n")
    drop = ops.index(SetAttr("id", mode=0o777))
    data = next(i for i, op in enumerate(ops) if isinstance(op, (Write, Truncate, Fallocate)))
    assert drop < data


def test_a_set_id_bit_given_to_an_open_file_goes_at_its_next_unprivileged_write(fuse_available, shared_dir):
    """An unprivileged writer's open file found clean skips the check on later writes,
    until a chmod through the mount: set-user-ID given between two of its writes goes
    at the second."""
    source, f = _program_others_may_change(shared_dir, 0o777)
    recorder = Recorder()
    script = textwrap.dedent(f"""
        import os, sys
        os.setgroups([{OTHER_ID}]); os.setgid({OTHER_ID}); os.setuid({OTHER_ID})
        fd = os.open({str(f)!r}, os.O_WRONLY)
        os.pwrite(fd, b"#", 0)
        print("written", flush=True)
        sys.stdin.readline()
        os.pwrite(fd, b"#", 1)
        os.close(fd)
    """)
    with FuseCapture(source, recorder):
        child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
        try:
            assert child.stdout.readline() == "written\n"
            os.chmod(f, 0o4777)
            child.stdin.write("go\n")
            child.stdin.close()
            assert child.wait(CHILD_TIMEOUT_S) == 0
        finally:
            child.kill()
        assert stat.S_IMODE(f.stat().st_mode) == 0o777
    assert [op for op in recorder.take() if isinstance(op, SetAttr) and op.mode is not None] == [
        SetAttr("prog", mode=0o4777), SetAttr("prog", mode=0o777)]


def _run_as_other(prog: Path) -> str:
    script = (f"import os, subprocess; os.setgroups([]); os.setgid({OTHER_ID}); os.setuid({OTHER_ID}); "
              f"print(subprocess.run([{str(prog)!r}, '-u'], capture_output=True, text=True).stdout, end='')")
    return subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S).stdout


def _mount_options(path: Path) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        found = [line.split()[5] for line in f if line.split()[4] == str(path)]
    return set(found[-1].split(","))


def test_set_user_id_programs_and_device_nodes_work_as_without_the_capture(fuse_available, shared_dir):
    """fusermount3 mounts nosuid,nodev; the capture takes those from the directory's own
    mount instead, which allows both here."""
    source = shared_dir / "src"
    source.mkdir()
    prog = source / "id"
    shutil.copy("/usr/bin/id", prog)
    os.chmod(prog, 0o4755)
    os.mknod(source / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    assert _run_as_other(prog) == "0\n"
    with FuseCapture(source, Recorder()):
        assert not {"nosuid", "nodev", "noexec"} & _mount_options(source)
        assert _run_as_other(prog) == "0\n"
        with open(source / "null", "r+b", buffering=0) as null:
            assert null.write(b"gone") == 4
            assert null.read() == b""


def test_the_capture_keeps_the_restrictions_of_the_directorys_mount(fuse_available, shared_dir):
    """On a nosuid,nodev,noexec mount the capture is nosuid,nodev,noexec too: it must not
    make a directory's programs runnable, nor their set-user-ID bit count."""
    source = shared_dir / "src"
    source.mkdir()
    prog = source / "id"
    shutil.copy("/usr/bin/id", prog)
    os.chmod(prog, 0o4755)
    subprocess.run(["mount", "--bind", str(source), str(source)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,nosuid,nodev,noexec", str(source)], check=True)
        with FuseCapture(source, Recorder()):
            assert {"nosuid", "nodev", "noexec"} <= _mount_options(source)
            with pytest.raises(PermissionError):
                subprocess.run([str(prog)], capture_output=True)
    finally:
        subprocess.run(["umount", str(source)], check=True)


@pytest.mark.parametrize("mode, group, in_group, root, left", [
    (0o6777, 0, False, True, 0o6777),          # CAP_FSETID keeps everything
    (0o2766, 0, False, False, 0o0766),         # not in the file's group: set-group-ID goes
    (0o2766, OTHER_ID + 1, True, False, 0o2766),  # in it, and not group-executable: it stays
    (0o2776, OTHER_ID + 1, True, False, 0o0776),  # group-executable: it goes even so
])
def test_set_id_bits_follow_the_vfs_rule(fuse_available, shared_dir, mode, group, in_group, root, left):
    source, f = _program_others_may_change(shared_dir, mode)
    os.chown(f, 0, group)
    os.chmod(f, mode)  # the chown cleared set-id bits
    recorder = Recorder()
    with FuseCapture(source, recorder):
        if root:
            with open(f, "r+b") as out:
                out.write(b"#")
        else:
            _write_as_other(f, "write", in_group=in_group)
        assert stat.S_IMODE(f.stat().st_mode) == left
    assert stat.S_IMODE(f.stat().st_mode) == left
    assert [op for op in recorder.take() if isinstance(op, SetAttr) and op.mode is not None] == (
        [] if left == mode else [SetAttr("prog", mode=left)])
