"""The applier on real files and a real EmbeddedLog: every event kind, replay, refusals,
retries, task commands."""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from datatether.apply.applier import Applier
from datatether.apply.progress import Progress
from datatether.apply.tasks import OUTPUT_LIMIT, TASK_NOT_RUN
from datatether.engine import codec, digest
from datatether.engine import events as ev
from datatether.engine.errors import CorruptRecord
from datatether.engine.events import FileKind
from datatether.engine.log_embedded import EmbeddedLog
from datatether.engine.settings import Settings
from datatether.engine.states import TargetDataState, TargetStatus

from apply_helpers import PARTITION, append, snapshot
from conftest import loop_filesystem

T0 = 1_600_000_000_000_000_000
SOURCE = "/srv/source/set"


class Target:
    """A log, a target tree and its state dir; ``applier()`` (re)opens the applier."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.root = tmp_path / "target"
        self.state = tmp_path / "state"
        self.log = EmbeddedLog(tmp_path / "log")
        self.log.ensure_partition(PARTITION)
        self._applier: Applier | None = None
        self._progress: Progress | None = None

    def applier(self, **settings) -> Applier:
        self.close()
        self._progress = Progress(self.state)
        opts = {"retry_delay_s": 0.01, **settings}
        devices = opts.pop("devices", None)
        self._applier = Applier(self.log, PARTITION, self.root, SOURCE, self._progress, Settings(**opts),
                                devices=devices)
        return self._applier

    @property
    def a(self) -> Applier:
        return self._applier or self.applier()

    def apply(self, *ops) -> int:
        """Append ``ops`` and apply everything the log has; returns the first new offset."""
        first = append(self.log, *ops)
        while self.a.run_once() and self.a.progress.status is TargetStatus.OK:
            pass
        return first

    @property
    def state_now(self) -> TargetDataState:
        return self.a.progress.data_state

    def close(self) -> None:
        if self._applier is not None:
            self._applier.close()
            self._progress.close()
            self._applier = self._progress = None


@pytest.fixture
def t(tmp_path):
    target = Target(tmp_path)
    yield target
    target.close()
    target.log.close()


def file_(path, mode=0o644, uid=0, gid=0, mtime=T0):
    return ev.Create(path, FileKind.FILE, mode, uid, gid, T0, mtime)


def dir_(path, mode=0o755, mtime=T0):
    return ev.Create(path, FileKind.DIR, mode, 0, 0, T0, mtime)


# -- every replication event ------------------------------------------------------------

def test_create_every_kind_with_mode_owner_and_times(t):
    t.apply(dir_("d", 0o2750),
            file_("d/f", 0o4755, 1001, 1002, T0 + 5),
            ev.Create("d/fifo", FileKind.FIFO, 0o640, 7, 8, T0, T0 + 1),
            ev.Create("d/sock", FileKind.SOCKET, 0o600, 0, 0, T0, T0 + 2),
            ev.Create("d/null", FileKind.CHAR, 0o666, 0, 0, T0, T0 + 3, rdev=os.makedev(1, 3)),
            ev.Create("d/blk", FileKind.BLOCK, 0o660, 0, 6, T0, T0 + 4, rdev=os.makedev(7, 99)),
            ev.SetAttr("d", mtime_ns=T0 + 9))
    r = t.root
    st = os.lstat(r / "d/f")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o4755
    assert (st.st_uid, st.st_gid, st.st_mtime_ns, st.st_atime_ns) == (1001, 1002, T0 + 5, T0)
    assert stat.S_IMODE(os.lstat(r / "d").st_mode) == 0o2750 and os.lstat(r / "d").st_mtime_ns == T0 + 9
    assert stat.S_ISFIFO(os.lstat(r / "d/fifo").st_mode) and os.lstat(r / "d/fifo").st_uid == 7
    assert stat.S_ISSOCK(os.lstat(r / "d/sock").st_mode)
    assert os.lstat(r / "d/null").st_rdev == os.makedev(1, 3) and stat.S_ISCHR(os.lstat(r / "d/null").st_mode)
    assert os.lstat(r / "d/blk").st_rdev == os.makedev(7, 99) and os.lstat(r / "d/blk").st_gid == 6
    assert t.state_now is TargetDataState.OK and t.a.applied_offset == 6


def test_create_makes_missing_parents_and_replaces_what_is_in_the_way(t):
    (t.root / "x").mkdir(parents=True)
    (t.root / "x/inner").write_text("old")
    (t.root / "f").write_text("stale content")
    t.apply(file_("x"), file_("f"), dir_("deep/er/dir"))
    assert (t.root / "x").is_file() and (t.root / "f").read_bytes() == b""
    assert (t.root / "deep/er/dir").is_dir()


def test_write_truncate_and_fallocate(t):
    t.apply(file_("f"), ev.Write("f", 0, b"hello world"), ev.Write("f", 20, b"!"),
            ev.Truncate("f", 5), ev.Write("f", 5, b"+"),
            file_("s"), ev.Fallocate("s", 0, 0, 1 << 20),                      # allocate: size grows
            ev.Write("s", 0, b"x" * (1 << 20)),
            ev.Fallocate("s", 0x1 | 0x2, 4096, 8192),                          # punch a hole, keep size
            ev.Fallocate("s", 0x10, 65536, 4096))                              # zero a range
    assert (t.root / "f").read_bytes() == b"hello+"
    data = (t.root / "s").read_bytes()
    assert len(data) == 1 << 20
    assert data[:4096] == b"x" * 4096 and data[4096:12288] == bytes(8192) and data[12288:16384] == b"x" * 4096
    assert data[65536:69632] == bytes(4096) and data[69632] == ord("x")
    assert os.stat(t.root / "s").st_blocks * 512 < 1 << 20  # the punched hole is a hole


def test_fallocate_that_shifts_data_is_refused(t):
    t.apply(file_("f"), ev.Write("f", 0, b"abcdefgh" * 1024), ev.Fallocate("f", 0x8, 0, 4096),
            ev.Write("f", 0, b"Z"))
    assert t.state_now is TargetDataState.MIRROR_REQUIRED
    assert (t.root / "f").read_bytes()[:2] == b"Zb" and t.a.applied_offset == 3


def test_setattr_changes_the_object_and_never_follows_a_symlink(t, tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("x")
    os.chmod(outside, 0o600)
    before = os.stat(outside)
    t.apply(file_("f"), ev.SetAttr("f", mode=0o751, uid=5, gid=6, atime_ns=T0 + 1, mtime_ns=T0 + 2),
            ev.SetAttr("f", mtime_ns=T0 + 3),
            ev.Symlink("l", str(outside), 0, 0, T0),
            ev.SetAttr("l", mode=0o777, uid=9, gid=9, mtime_ns=T0 + 4))
    st = os.lstat(t.root / "f")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns) == \
        (0o751, 5, 6, T0 + 1, T0 + 3)
    lst = os.lstat(t.root / "l")
    assert (lst.st_uid, lst.st_mtime_ns) == (9, T0 + 4)
    after = os.stat(outside)
    assert (after.st_mode, after.st_uid, after.st_mtime_ns) == (before.st_mode, before.st_uid, before.st_mtime_ns)
    assert t.state_now is TargetDataState.OK


def test_xattrs(t):
    t.apply(file_("f"), ev.SetXattr("f", "user.a", b"1"), ev.SetXattr("f", "user.b", b"\0bin"),
            ev.RemoveXattr("f", "user.a"), ev.RemoveXattr("f", "user.never"),
            ev.SetXattr("", "user.root", b"r"))
    assert os.listxattr(t.root / "f") == ["user.b"] and os.getxattr(t.root / "f", "user.b") == b"\0bin"
    assert os.getxattr(t.root, "user.root") == b"r"
    assert t.state_now is TargetDataState.OK


def test_user_xattr_on_a_symlink_is_refused_not_retried_forever(t):
    t.apply(ev.Symlink("l", "x", 0, 0, T0), ev.SetXattr("l", "user.a", b"1"), file_("after"))
    assert t.state_now is TargetDataState.MIRROR_REQUIRED and (t.root / "after").exists()


def test_rename_files_over_existing_and_directories(t):
    t.apply(file_("a"), ev.Write("a", 0, b"A"), file_("b"), ev.Write("b", 0, b"B"),
            ev.Rename("a", "b"),
            dir_("d"), file_("d/x"), ev.Write("d/x", 0, b"X"),
            ev.Rename("d", "e/moved"),            # destination parent made as needed
            ev.Write("e/moved/x", 1, b"Y"))
    assert not (t.root / "a").exists() and (t.root / "b").read_bytes() == b"A"
    assert not (t.root / "d").exists() and (t.root / "e/moved/x").read_bytes() == b"XY"


def test_rename_replaces_a_directory_in_the_way(t):
    (t.root / "dst/junk").mkdir(parents=True)
    t.apply(file_("src"), ev.Write("src", 0, b"S"), ev.Rename("src", "dst"))
    assert (t.root / "dst").read_bytes() == b"S"


def test_hard_links(t):
    t.apply(file_("a"), ev.Write("a", 0, b"shared"), ev.Link("a", "sub/b"), ev.Write("sub/b", 6, b"!"))
    assert os.stat(t.root / "a").st_ino == os.stat(t.root / "sub/b").st_ino
    assert (t.root / "a").read_bytes() == b"shared!"


def test_symlinks_are_remapped_inside_the_set_only(t):
    t.apply(ev.Symlink("in", SOURCE + "/dir/file", 0, 0, T0 + 1),
            ev.Symlink("out", "/etc/passwd", 0, 0, T0),
            ev.Symlink("rel", "../x/y", 3, 4, T0))
    assert os.readlink(t.root / "in") == str(t.root / "dir/file")
    assert os.readlink(t.root / "out") == "/etc/passwd"
    assert os.readlink(t.root / "rel") == "../x/y" and os.lstat(t.root / "rel").st_uid == 3
    assert os.lstat(t.root / "in").st_mtime_ns == T0 + 1


def test_remap_link_off_keeps_targets(t):
    t.applier(remap_link=False)
    t.apply(ev.Symlink("in", SOURCE + "/f", 0, 0, T0))
    assert os.readlink(t.root / "in") == SOURCE + "/f"


def test_symlink_replaces_a_different_one(t):
    t.apply(ev.Symlink("l", "one", 0, 0, T0), ev.Symlink("l", "two", 0, 0, T0))
    assert os.readlink(t.root / "l") == "two"


def test_unlink_and_rmdir(t):
    t.apply(dir_("d"), file_("d/f"), ev.Unlink("d/f"), ev.Rmdir("d"),
            dir_("tree/a/b"), file_("tree/a/b/f"), ev.Rmdir("tree", recursive=True),
            ev.Unlink("never"), ev.Rmdir("never/either"))
    assert sorted(os.listdir(t.root)) == []
    assert t.state_now is TargetDataState.OK


def test_rmdir_keeps_a_directory_with_target_only_entries(t):
    t.apply(dir_("d"))
    (t.root / "d/orphan").write_text("mine")
    t.apply(ev.Rmdir("d"), file_("after"))
    assert (t.root / "d/orphan").read_text() == "mine" and (t.root / "after").exists()


def test_ignore_delete_ops_keeps_files_and_directories(t):
    t.applier(ignore_delete_ops=True)
    t.apply(dir_("d"), file_("d/f"), ev.Write("d/f", 0, b"keep"), ev.Unlink("d/f"),
            ev.Rmdir("d", recursive=True), ev.Write("d/f", 4, b"!"))
    assert (t.root / "d/f").read_bytes() == b"keep!"


def test_barrier_makes_progress_durable(t):
    t.apply(file_("f"), ev.Write("f", 0, b"data"), ev.Barrier("f"))
    t.close()
    assert Progress.read_snapshot(t.state)["applied_offset"] == 2


@pytest.mark.parametrize("sync", [True, False])
def test_close_syncs_the_target_unless_told_not_to(t, sync):
    t.apply(file_("f"), ev.Write("f", 0, b"data"))
    applier, progress = t.a, t._progress
    t._applier = t._progress = None
    applier.close(sync=sync)
    assert progress.synced is sync  # unsynced: a machine stop now would mean Mirror Required
    progress.close()
    assert t.a.applied_offset == 1 and t.state_now is TargetDataState.OK


def test_block_events_go_to_the_mapped_image(t, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(b"\xff" * 65536)
    t.applier(devices={"disk0": str(image)})
    t.apply(ev.BlockWrite("disk0", 4096, b"B" * 4096), ev.BlockDiscard("disk0", 8192, 4096),
            ev.BlockFlush("disk0"))
    data = image.read_bytes()
    assert data[4096:8192] == b"B" * 4096 and data[8192:12288] == bytes(4096) and data[12288] == 0xFF
    assert len(data) == 65536
    t.apply(ev.BlockWrite("unmapped", 0, b"x"))
    assert t.state_now is TargetDataState.MIRROR_REQUIRED


def test_control_events_are_recorded_no_ops(t):
    t.apply(ev.Marker("m", "note"), ev.ReplicationSetDefinition("s", 1, "/x", [ev.Rule("a", True, True)]),
            ev.TaskResult("t", 0, "", 0))
    assert t.a.applied_offset == 2 and os.listdir(t.root) == []


def test_gap_makes_mirror_required(t):
    t.apply(ev.Gap("kernel queue overflow"), file_("f"))
    assert t.state_now is TargetDataState.MIRROR_REQUIRED and (t.root / "f").exists()
    assert "overflow" in t.a.progress.data_state_reason


# -- mirror events ------------------------------------------------------------------------

def mirror_file(path, data_blocks: dict[int, bytes], size, *, kind=FileKind.FILE, whole=True, listed=False,
                base: bytes = b"", **kw):
    """MirrorFile, its MirrorData and MirrorFileEnd, with the digest of the file they make
    (over ``base``, what the target has, for a file sent in blocks); ``listed``: with the
    file's block digests, as a checksum mirror sends them."""
    content = bytearray(base[:size].ljust(size, b"\0"))
    for off, block in data_blocks.items():
        content[off:off + len(block)] = block
    blocks = [digest.block_digest(bytes(content[i:i + digest.DIGEST_BLOCK]))
              for i in range(0, size, digest.DIGEST_BLOCK)]
    head = ev.MirrorFile(path, kind, kw.pop("mode", 0o640), kw.pop("uid", 0), kw.pop("gid", 0), T0, T0 + 7,
                         size, whole=whole, **kw)
    return [head, *(ev.MirrorData(path, off, block) for off, block in data_blocks.items()),
            ev.MirrorFileEnd(path, size, digest.combine(blocks, size), T0 + 8, b"".join(blocks) if listed else b"")]


def test_mirror_pass_builds_files_sparse_links_and_attributes(t):
    (t.root / "dir").mkdir(parents=True)
    (t.root / "dir/sparse").write_bytes(b"old" * 1000)
    os.setxattr(t.root / "dir", "user.stale", b"x")
    t.apply(ev.MirrorStart("m1", "full", None))
    assert t.state_now is TargetDataState.MIRRORING
    t.apply(ev.MirrorFile("", FileKind.DIR, 0o755, 0, 0, T0, T0, 0, xattrs={"user.top": b"t"}),
            ev.MirrorFile("dir", FileKind.DIR, 0o750, 3, 4, T0, T0 + 1, 0, xattrs={"user.keep": b"k"}),
            *mirror_file("dir/sparse", {0: b"head", 3 << 20: b"tail"}, 4 << 20, uid=5),
            ev.MirrorFile("dir/link", FileKind.FILE, 0o640, 5, 0, T0, T0 + 7, 4 << 20, hardlink_of="dir/sparse"),
            ev.MirrorFile("dir/sym", FileKind.SYMLINK, 0o777, 0, 0, T0, T0 + 2, 0, link_target=SOURCE + "/dir"),
            ev.MirrorFile("dir/fifo", FileKind.FIFO, 0o600, 0, 0, T0, T0 + 3, 0),
            ev.SetAttr("dir", atime_ns=T0, mtime_ns=T0 + 1),
            ev.MirrorEnd("m1", 8, 0, 5))
    assert t.state_now is TargetDataState.OK
    r = t.root
    st = os.stat(r / "dir/sparse")  # before reading it (which moves the atime)
    assert st.st_blocks * 512 < 1 << 20 and st.st_mtime_ns == T0 + 8 and st.st_atime_ns == T0 and st.st_uid == 5
    data = (r / "dir/sparse").read_bytes()
    assert len(data) == 4 << 20 and data[:4] == b"head" and data[3 << 20:(3 << 20) + 4] == b"tail"
    assert data[4:3 << 20] == bytes((3 << 20) - 4)
    assert os.stat(r / "dir/link").st_ino == st.st_ino
    assert os.readlink(r / "dir/sym") == str(r / "dir")
    assert os.listxattr(r / "dir") == ["user.keep"] and os.getxattr(r, "user.top") == b"t"
    dst = os.stat(r / "dir")
    assert (stat.S_IMODE(dst.st_mode), dst.st_uid, dst.st_mtime_ns) == (0o750, 3, T0 + 1)


def test_checksum_mirror_changes_blocks_in_place(t):
    t.apply(file_("f"), ev.Write("f", 0, b"a" * 8192))
    t.apply(ev.MirrorStart("m", "checksum"), *mirror_file("f", {0: b"a" * 4096, 4096: b"b" * 4096, 8192: b"c"},
                                                              8193, whole=False),
            ev.MirrorEnd("m", 0, 0, 1))
    assert (t.root / "f").read_bytes() == b"a" * 4096 + b"b" * 4096 + b"c"
    assert t.state_now is TargetDataState.OK


def test_checksum_mirror_gives_a_hard_linked_file_its_own_copy_and_asks_for_a_new_pass(t):
    t.apply(file_("a"), ev.Write("a", 0, b"1111"), ev.Link("a", "b"))
    t.apply(ev.MirrorStart("m", "checksum"), *mirror_file("a", {0: b"1111", 2: b"22"}, 4, whole=False),
            ev.MirrorEnd("m", 0, 0, 1))
    assert (t.root / "a").read_bytes() == b"1122" and (t.root / "b").read_bytes() == b"1111"
    assert t.state_now is TargetDataState.MIRROR_REQUIRED  # the next pass re-checks the links
    t.apply(ev.MirrorStart("m2", "checksum"),
            ev.MirrorFile("b", FileKind.FILE, 0o644, 0, 0, T0, T0, 4, hardlink_of="a"), ev.MirrorEnd("m2", 0, 0, 1))
    assert os.stat(t.root / "a").st_ino == os.stat(t.root / "b").st_ino and t.state_now is TargetDataState.OK


def test_digest_mismatch_marks_mirror_required_through_the_end_of_the_pass(t):
    events = mirror_file("f", {0: b"right"}, 5)
    events[1] = ev.MirrorData("f", 0, b"wrong")
    t.apply(ev.MirrorStart("m", "full"), *events, ev.MirrorEnd("m", 5, 0, 1))
    assert t.state_now is TargetDataState.MIRROR_REQUIRED and "digest" in t.a.progress.data_state_reason


def whole_small_file(path, data: bytes, **kw) -> ev.MirrorFile:
    """A small file in one MirrorFile, as the mirror sends it (content and file digest)."""
    blocks = [digest.block_digest(data[i:i + digest.DIGEST_BLOCK]) for i in range(0, len(data), digest.DIGEST_BLOCK)]
    fields = {"mode": 0o640, "uid": 0, "gid": 0, "atime_ns": T0, "mtime_ns": T0 + 7, "size": len(data),
              "data": data, "digest": digest.combine(blocks, len(data)), **kw}
    return ev.MirrorFile(path, FileKind.FILE, **fields)


def test_a_small_file_in_one_event_replaces_what_is_there_and_is_checked(t, monkeypatch):
    monkeypatch.setattr(digest, "file_digest", no_reading_back)
    (t.root / "dir").mkdir(parents=True)
    (t.root / "dir/f").write_bytes(b"old content, longer than the new one" * 100)
    (t.root / "dir/e").write_bytes(b"something")
    data = os.urandom(3 * digest.DIGEST_BLOCK + 5)
    t.apply(ev.MirrorStart("m", "full"), whole_small_file("dir/f", data, uid=5),
            whole_small_file("dir/e", b""), ev.MirrorEnd("m", len(data), 0, 2))
    assert t.state_now is TargetDataState.OK
    st = os.stat(t.root / "dir/f")
    assert (st.st_mtime_ns, st.st_atime_ns, st.st_uid, stat.S_IMODE(st.st_mode)) == (T0 + 7, T0, 5, 0o640)
    assert (t.root / "dir/f").read_bytes() == data and (t.root / "dir/e").read_bytes() == b""
    t.apply(ev.MirrorStart("m2", "full"), replace(whole_small_file("dir/f", b"right"), data=b"wrong"),
            ev.MirrorEnd("m2", 5, 0, 1))
    assert t.state_now is TargetDataState.MIRROR_REQUIRED and "digest" in t.a.progress.data_state_reason


@pytest.mark.parametrize("bad", [
    {"size": 4},                                  # the content is not the whole file
    {"kind": FileKind.SYMLINK, "link_target": "x"},
    {"whole": False},
    {"hardlink_of": "other"},
], ids=["short", "not-a-file", "blocks", "hard-link"])
def test_content_in_a_mirror_file_that_is_no_whole_regular_file_is_refused(t, bad):
    op = replace(whole_small_file("f", b"12345"), **bad)
    t.apply(ev.MirrorStart("m", "full"), op)
    assert t.state_now is TargetDataState.MIRROR_REQUIRED and "refused" in t.a.progress.data_state_reason
    assert t.a.progress.status is TargetStatus.OK  # refused, not retried forever


def no_reading_back(fd, size):
    raise AssertionError("the whole file was read back")


def test_a_whole_file_is_checked_by_what_was_written_without_reading_it_back(t, monkeypatch):
    monkeypatch.setattr(digest, "file_digest", no_reading_back)
    block = digest.DIGEST_BLOCK
    t.apply(ev.MirrorStart("m", "full"),
            *mirror_file("f", {0: b"a" * (block + 3), 3 * block - 1: b"b" * 2, 5 * block + 7: b"c"}, 6 * block),
            ev.SetAttr("elsewhere", mode=0o600),  # another object's data events leave the check as it is
            ev.MirrorEnd("m", 0, 0, 1))
    assert t.state_now is TargetDataState.OK
    events = mirror_file("g", {0: b"x" * 10}, 10)
    events[1] = ev.MirrorData("g", 0, b"y" * 10)
    t.apply(ev.MirrorStart("m2", "full"), *events, ev.MirrorEnd("m2", 0, 0, 1))
    assert t.state_now is TargetDataState.MIRROR_REQUIRED and "digest" in t.a.progress.data_state_reason


def test_a_file_sent_in_blocks_is_checked_by_reading_back_only_the_blocks_written(t, monkeypatch):
    block = digest.DIGEST_BLOCK
    base = b"a" * (5 * block + 10)
    t.apply(file_("f"), ev.Write("f", 0, base))
    monkeypatch.setattr(digest, "file_digest", no_reading_back)
    t.apply(ev.MirrorStart("m", "checksum"),
            *mirror_file("f", {block: b"b" * block, 3 * block + 5: b"c" * 10}, len(base), whole=False, listed=True,
                         base=base),
            ev.MirrorEnd("m", 0, 0, 1))
    assert t.state_now is TargetDataState.OK
    assert (t.root / "f").read_bytes()[block:2 * block] == b"b" * block
    events = mirror_file("f", {2 * block: b"d" * 10}, len(base), whole=False, listed=True, base=base)
    events[1] = ev.MirrorData("f", 2 * block, b"e" * 10)  # what reaches the file is not the source's
    t.apply(ev.MirrorStart("m2", "checksum"), *events, ev.MirrorEnd("m2", 0, 0, 1))
    assert t.state_now is TargetDataState.MIRROR_REQUIRED and "digest" in t.a.progress.data_state_reason


def test_a_block_list_that_is_not_the_files_sends_the_applier_back_to_the_whole_file(t):
    t.apply(file_("f"), ev.Write("f", 0, b"a" * 100))
    head, data, end = mirror_file("f", {10: b"b"}, 100, whole=False, listed=True, base=b"a" * 100)
    wrong_list = replace(end, block_digests=digest.block_digest(b"x"))
    t.apply(ev.MirrorStart("m", "checksum"), head, data, wrong_list, ev.MirrorEnd("m", 0, 0, 1))
    assert t.state_now is TargetDataState.OK  # the file itself matches the digest


@pytest.mark.parametrize("between, expected", [
    (ev.Write("f", 1, b"!"), TargetDataState.MIRROR_REQUIRED),  # what was written no longer is the file
    (ev.Link("f", "g"), TargetDataState.OK),
    (ev.MirrorData("f", 2, b"ri"), TargetDataState.OK),  # out of order: the same bytes again
], ids=["write", "link", "out of order"])
def test_the_file_is_read_back_when_more_than_its_mirror_data_touched_it(t, between, expected):
    """Anything else that may have changed the file sends the applier back to its content."""
    head, data, end = mirror_file("f", {2: b"right"}, 7)
    t.apply(ev.MirrorStart("m", "full"), head, data, between, end, ev.MirrorEnd("m", 0, 0, 1))
    assert t.state_now is expected


def test_events_for_files_not_mirrored_yet_are_dropped_only_while_mirroring(t):
    t.apply(ev.MirrorStart("m", "full"), ev.Write("later", 0, b"x"), ev.SetAttr("later", mode=0o600),
            *mirror_file("later", {0: b"xy"}, 2), ev.MirrorEnd("m", 2, 0, 1))
    assert t.state_now is TargetDataState.OK and (t.root / "later").read_bytes() == b"xy"
    t.apply(ev.Write("ghost", 0, b"x"))
    assert t.state_now is TargetDataState.MIRROR_REQUIRED and not (t.root / "ghost").exists()


def test_missing_hard_link_origin_fails_the_pass(t):
    t.apply(ev.MirrorStart("m", "full"),
            ev.MirrorFile("b", FileKind.FILE, 0o644, 0, 0, T0, T0, 1, hardlink_of="a"), ev.MirrorEnd("m", 0, 0, 1))
    assert t.state_now is TargetDataState.MIRROR_REQUIRED


# -- exactly once -------------------------------------------------------------------------

REPLAY_STREAM = [
    dir_("d"), file_("d/f", 0o600, 1, 2), ev.Write("d/f", 0, b"0123456789"), ev.Truncate("d/f", 4),
    ev.Write("d/f", 8, b"tail"), ev.Fallocate("d/f", 0x3, 0, 2), ev.SetAttr("d/f", mode=0o4750, uid=3),
    ev.SetXattr("d/f", "user.x", b"1"), ev.RemoveXattr("d/f", "user.x"),
    ev.Rename("d/f", "d/g"), file_("d/f"), ev.Write("d/f", 0, b"new"),
    ev.Link("d/g", "d/h"), ev.Symlink("d/s", SOURCE + "/d/g", 0, 0, T0),
    ev.Rename("d", "e"), ev.Unlink("e/h"), dir_("e/sub"), file_("e/sub/x"),
    ev.Rmdir("e/sub", recursive=True), dir_("e/empty"), ev.Rmdir("e/empty"),
    ev.Rename("e/f", "e/g"),                     # over an existing file
    ev.MirrorStart("m", "full"), *mirror_file("e/m", {0: b"mm", 70000: b"z"}, 80000),
    ev.MirrorFile("e/ml", FileKind.FILE, 0o644, 0, 0, T0, T0, 80000, hardlink_of="e/m"),
    ev.MirrorFile("e/md", FileKind.DIR, 0o700, 0, 0, T0, T0, 0, xattrs={"user.a": b"b"}),
    ev.MirrorEnd("m", 3, 0, 3), ev.Barrier("e/g"), ev.Gap("test"),
]


def rewind(t: Target, offset: int, task_offset: int | None = None) -> None:
    """Put the committed offset back, as if the commits after it had not happened."""
    t.close()
    p = Progress(t.state)
    if task_offset is not None:
        p.begin_task(task_offset)
    p.commit(offset)
    p.close()


def test_applying_any_event_a_second_time_changes_nothing(t):
    """Crash after an event's effects and before its commit: the restarted applier applies
    it again. For every event of a stream covering every kind, the tree after applying it
    twice is the tree after applying it once."""
    append(t.log, *REPLAY_STREAM)
    for offset in range(len(REPLAY_STREAM)):
        a = t.applier()
        assert a.run_once(max_events=1) == 1 and a.applied_offset == offset
        once = snapshot(t.root, file_mtimes=False)
        state = a.progress.data_state
        rewind(t, offset - 1)  # the commit is lost: as if killed just before it
        a = t.applier()
        assert a.run_once(max_events=1) == 1 and a.applied_offset == offset
        assert snapshot(t.root, file_mtimes=False) == once, REPLAY_STREAM[offset]
        assert a.progress.data_state is state
    assert os.readlink(t.root / "e/s") == str(t.root / "d/g")  # remapped when made; kept verbatim since


def test_applied_offset_survives_a_restart(t):
    t.apply(file_("f"), ev.Write("f", 0, b"x"))
    t.close()
    assert t.log.committed(PARTITION, "applier") == 1  # the advisory consumer offset
    p = Progress(t.state)
    assert p.synced and p.applied_offset == 1  # closing synced the target first
    p.close()
    a = t.applier()
    assert a.applied_offset == 1 and a.run_once() == 0
    t.apply(ev.Write("f", 1, b"y"))
    assert (t.root / "f").read_bytes() == b"xy"


# -- refusals and failures ----------------------------------------------------------------

@pytest.mark.parametrize("bad", ["../x", "/etc/x", "a/../../x", "a//b", "a\0b"])
def test_escaping_paths_are_refused_and_the_applier_moves_on_in_mirror_required(t, tmp_path, bad):
    t.applier()
    before = sorted(p.name for p in tmp_path.iterdir())
    t.apply(file_(bad), ev.Write(bad, 0, b"escaped"), file_("ok"))
    assert t.state_now is TargetDataState.MIRROR_REQUIRED and "refused" in t.a.progress.data_state_reason
    assert (t.root / "ok").exists() and t.a.applied_offset == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not os.path.exists("/etc/x")
    assert Progress.read_snapshot(t.state)["target_data_state"] == "Mirror Required"


def test_a_symlink_on_the_target_is_never_written_through(t, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("keep")
    t.apply(dir_("d"))
    os.symlink(outside, t.root / "d/link")       # planted on the target
    os.symlink(outside / "f", t.root / "d/flink")
    t.apply(ev.Write("d/link/f", 0, b"pwned"), file_("d/link/new"), ev.Write("d/flink", 0, b"pwned"),
            ev.Truncate("d/flink", 0), ev.SetXattr("d/link/f", "user.x", b"1"), file_("d/fine"))
    assert (outside / "f").read_text() == "keep" and sorted(os.listdir(outside)) == ["f"]
    assert os.listxattr(outside / "f") == []
    assert t.state_now is TargetDataState.MIRROR_REQUIRED and (t.root / "d/fine").exists()


def test_undecodable_record_is_refused(t):
    append(t.log, file_("a"))
    t.log.append(PARTITION, [b"\x02\x00garbage that is not an event"])
    t.apply(file_("b"))
    assert t.a.applied_offset == 2 and (t.root / "b").exists()
    assert t.state_now is TargetDataState.MIRROR_REQUIRED


class CorruptAt:
    """A Log whose record at one offset fails its check (as a damaged stored record does)."""

    def __init__(self, log, bad: int):
        self._log, self._bad = log, bad

    def read(self, partition, start, max_records=1000, max_bytes=8 << 20):
        records = self._log.read(partition, start, max_records, max_bytes)
        if any(r.offset == self._bad for r in records):
            raise CorruptRecord(reason="checksum mismatch")
        return records

    def __getattr__(self, name):
        return getattr(self._log, name)


def test_record_failing_its_checksum_is_refused_and_the_others_applied(t):
    append(t.log, file_("a"), file_("b"), file_("c"), file_("d"))
    p = Progress(t.state)
    a = Applier(CorruptAt(t.log, 2), PARTITION, t.root, SOURCE, p, Settings())
    while a.run_once():
        pass
    assert a.applied_offset == 3 and sorted(os.listdir(t.root)) == ["a", "b", "d"]
    assert p.data_state is TargetDataState.MIRROR_REQUIRED
    a.close()
    p.close()


def test_events_removed_before_being_applied_make_mirror_required(t):
    append(t.log, file_("a"), file_("b"), file_("c"))
    t.log.truncate_before(PARTITION, 2)
    t.apply()
    assert t.a.applied_offset == 2 and sorted(os.listdir(t.root)) == ["c"]
    assert t.state_now is TargetDataState.MIRROR_REQUIRED


def test_lost_progress_resumes_after_the_consumer_offset_in_mirror_required(t):
    t.apply(file_("a"), file_("b"))
    t.close()
    for name in os.listdir(t.state):
        os.unlink(t.state / name)
    a = t.applier()
    assert a.applied_offset == 1 and a.progress.data_state is TargetDataState.MIRROR_REQUIRED


def _log_goes_back(t, keep: int) -> None:
    """The log loses every record from ``keep`` on and its offsets go to new records (as
    RocksDB recovering a damaged write-ahead log does): the kept ones keep their stamps."""
    kept = t.log.read(PARTITION, 0, max_records=keep) if keep else []
    t.log.drop_partition(PARTITION)
    t.log.ensure_partition(PARTITION)
    for record in kept:
        t.log.append(PARTITION, [record.value], timestamp_ns=record.timestamp_ns)


@pytest.mark.parametrize("new_records", [2, 9])  # the log ends before the applied offset; beyond it
def test_a_log_that_went_back_makes_the_target_mirror_required_and_nothing_new_is_skipped(t, new_records):
    t.apply(file_("f"), *(ev.Write("f", n, b"%d" % (n % 10)) for n in range(9)))  # offsets 0..9
    t.close()
    _log_goes_back(t, keep=5)  # 0..4 stay: the file and its first four bytes
    append(t.log, *(ev.Write("f", 4 + n, b"n") for n in range(new_records)))  # offsets 5.. again
    a = t.applier()
    assert a.run_once() == new_records
    assert (t.root / "f").read_bytes() == b"0123" + b"n" * new_records + b"45678"[new_records:]
    assert a.progress.data_state is TargetDataState.MIRROR_REQUIRED
    assert "events the target applied are gone from the log" in a.progress.data_state_reason


def test_a_log_made_anew_is_applied_from_its_start(t):
    t.apply(file_("f"), ev.Write("f", 0, b"old"))
    t.close()
    _log_goes_back(t, keep=0)
    t.apply(file_("g"))  # offset 0 of the new log
    assert (t.root / "g").exists() and t.a.applied_offset == 0
    assert t.state_now is TargetDataState.MIRROR_REQUIRED


def test_a_log_that_kept_what_the_target_applied_leaves_it_ok(t):
    t.apply(file_("f"), ev.Write("f", 0, b"x"))
    t.close()
    t.log.truncate_before(PARTITION, 2)  # retention, not a loss: the target applied all of it
    t.apply(ev.Write("f", 1, b"y"))
    assert (t.root / "f").read_bytes() == b"xy" and t.state_now is TargetDataState.OK


@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB ext4 file system on a loop device, unmounted afterwards."""
    with loop_filesystem(tmp_path, "ext4", 8) as mnt:
        yield mnt


def test_full_disk_holds_the_queue_retrying_then_completes(tmp_path, small_fs):
    filler = small_fs / "filler"
    with open(filler, "wb") as f:
        f.write(os.urandom(3 << 20))
    log = EmbeddedLog(tmp_path / "log")
    log.ensure_partition(PARTITION)
    chunk = os.urandom(1 << 20)
    append(log, file_("big"), *(ev.Write("big", i << 20, chunk) for i in range(5)), file_("after"))
    p = Progress(tmp_path / "state")
    a = Applier(log, PARTITION, small_fs / "target", SOURCE, p, Settings(retry_delay_s=0.01))
    a.run_once()
    held = a.applied_offset
    assert p.status is TargetStatus.RETRYING and "No space" in p.status_detail and held < 5
    for _ in range(3):  # retried, never skipped
        assert a.run_once() == 0 and a.applied_offset == held and p.status is TargetStatus.RETRYING
    assert Progress.read_snapshot(tmp_path / "state")["target_status"] == "Retrying"
    filler.unlink()
    while a.run_once():
        pass
    assert p.status is TargetStatus.OK and a.applied_offset == 6
    assert (small_fs / "target/big").read_bytes() == chunk * 5 and (small_fs / "target/after").exists()
    assert p.data_state is TargetDataState.OK
    a.close()
    p.close()
    log.close()


def test_space_freed_on_a_full_target_by_removing_a_file_the_applier_had_open_lets_it_resume(tmp_path, small_fs):
    log = EmbeddedLog(tmp_path / "log")
    log.ensure_partition(PARTITION)
    chunk = os.urandom(1 << 20)
    append(log, file_("old"), *(ev.Write("old", i << 20, chunk) for i in range(4)),
           file_("big"), *(ev.Write("big", i << 20, chunk) for i in range(5)))
    p = Progress(tmp_path / "state")
    a = Applier(log, PARTITION, small_fs / "target", SOURCE, p, Settings(retry_delay_s=0.01))
    try:
        a.run_once()
        assert p.status is TargetStatus.RETRYING and "No space" in p.status_detail
        (small_fs / "target/old").unlink()  # the operator frees space on the target
        while a.run_once():
            pass
        assert p.status is TargetStatus.OK and a.applied_offset == 10
        assert (small_fs / "target/big").read_bytes() == chunk * 5
    finally:  # the file system is unmounted afterwards: nothing may stay open on it
        a.close()
        p.close()
        log.close()


def test_a_target_root_removed_holds_the_queue_until_it_is_back_then_resumes(t):
    t.apply(dir_("d"), file_("d/f"), ev.Write("d/f", 0, b"before"))
    shutil.rmtree(t.root)
    t.apply(file_("g"), ev.Write("g", 0, b"after"))
    held = t.a.applied_offset
    for _ in range(3):  # retried, never skipped
        assert t.a.run_once() == 0 and t.a.applied_offset == held
        assert t.a.progress.status is TargetStatus.RETRYING
    t.root.mkdir()
    while t.a.run_once():
        pass
    assert t.a.progress.status is TargetStatus.OK and t.a.applied_offset == 4
    assert (t.root / "g").read_bytes() == b"after"


def test_run_loop_applies_as_events_arrive_and_stops(t):
    a = t.applier()
    stop = threading.Event()
    runner = threading.Thread(target=a.run, args=(stop,))
    runner.start()
    try:
        append(t.log, file_("f"), ev.Write("f", 0, b"live"))
        deadline = time.monotonic() + 30
        while a.applied_offset < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        a.pause()
        time.sleep(0.6)
        append(t.log, ev.Write("f", 4, b"!"))
        time.sleep(0.6)
        assert (t.root / "f").read_bytes() == b"live" and a.progress.status is TargetStatus.PAUSED
        a.resume()
        while a.applied_offset < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        runner.join()
    assert (t.root / "f").read_bytes() == b"live!"
    snap = a.progress.snapshot()
    assert snap["last_file"] == "f" and snap["recovery_point_latency_ms"]["samples"] == 3


# -- task commands ------------------------------------------------------------------------

def results(log) -> list[ev.TaskResult]:
    return [op for op in (codec.decode(r.value).op for r in log.read(PARTITION, 0)) if isinstance(op, ev.TaskResult)]


def test_a_task_sees_the_write_before_it_and_not_the_one_after(t):
    script = 'cat f; echo " $DT_TASK_ID $DT_APPLIED_OFFSET $DT_TARGET $(pwd)"'
    t.apply(file_("f"), ev.Write("f", 0, b"first"), ev.TaskCommand("t1", "snap", ["sh", "-c", script]),
            ev.Write("f", 0, b"SECOND"))
    [result] = results(t.log)
    assert result.exit_status == 0 and result.applied_offset == 2
    assert result.output == f"first t1 1 {t.root} {t.root}\n"
    assert (t.root / "f").read_bytes() == b"SECOND" and t.a.applied_offset == 4  # the result applied too


def test_failing_and_timed_out_tasks_do_not_stop_replication(t):
    t.apply(ev.TaskCommand("bad", "n", ["sh", "-c", "echo oops; exit 3"]),
            ev.TaskCommand("missing", "n", ["/nonexistent/program"]),
            ev.TaskCommand("slow", "n", ["sh", "-c", "echo started; sleep 30"], timeout_s=1),
            ev.TaskCommand("loud", "n", ["sh", "-c", "head -c 200000 /dev/zero | tr '\\0' a"]),
            file_("after"))
    by_id = {r.task_id: r for r in results(t.log)}
    assert (by_id["bad"].exit_status, by_id["bad"].output) == (3, "oops\n")
    assert by_id["missing"].exit_status == 127
    assert by_id["slow"].exit_status < 0 and by_id["slow"].output.startswith("started")
    assert "killed after 1 s" in by_id["slow"].output
    assert len(by_id["loud"].output.encode()) <= OUTPUT_LIMIT and "truncated" in by_id["loud"].output
    assert (t.root / "after").exists() and t.state_now is TargetDataState.OK


@pytest.mark.parametrize("name, argv", [("n", ["tr\0ue"]), ("n\0", ["true"])])
def test_a_task_no_program_can_be_started_with_is_a_failed_task_not_a_retry(t, name, argv):
    t.apply(ev.TaskCommand("nul", name, argv), file_("after"))
    (result,) = results(t.log)
    assert result.exit_status == 126 and "null byte" in result.output
    assert (t.root / "after").exists() and t.a.progress.status is TargetStatus.OK


def test_tasks_disabled_on_the_target_are_not_run(t, tmp_path):
    t.applier(task_commands=False)
    t.apply(ev.TaskCommand("t", "n", ["touch", str(tmp_path / "ran")]), file_("after"))
    assert not (tmp_path / "ran").exists() and (t.root / "after").exists()
    assert results(t.log)[0].exit_status == TASK_NOT_RUN


def test_a_task_interrupted_by_a_crash_is_not_run_again(t, tmp_path):
    marker = tmp_path / "runs"
    append(t.log, file_("f"), ev.TaskCommand("t", "n", ["sh", "-c", f"echo run >> {marker}"]), file_("g"))
    t.applier().run_once(max_events=1)
    rewind(t, 0, task_offset=1)  # as if the process died while the task ran
    a = t.applier()
    while a.run_once():
        pass
    assert not marker.exists() and (t.root / "g").exists()
    [result] = results(t.log)
    assert result.exit_status == TASK_NOT_RUN and "interrupted" in result.output


def test_a_task_whose_result_was_recorded_before_a_crash_is_not_recorded_twice(t, tmp_path):
    marker = tmp_path / "runs"
    append(t.log, ev.TaskCommand("t", "n", ["sh", "-c", f"echo run >> {marker}"]))
    t.applier().run_once(max_events=1)
    rewind(t, -1, task_offset=0)  # the result is in the log, the task's offset not committed
    a = t.applier()
    while a.run_once():
        pass
    assert marker.read_text() == "run\n" and len(results(t.log)) == 1
