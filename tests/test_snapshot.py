"""apply/snapshot.py: every kind of snapshot is an exact, frozen copy of the target tree,
never shares an inode with the live target, and is listed, deleted, pruned and scheduled."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from conftest import loop_filesystem
from history_helpers import T0, tree_state

from datatether.apply import snapshot as snapshots
from datatether.engine.errors import NotFound, UsageError

SECOND = 1_000_000_000


def make_tree(root):
    """A target tree with every kind of entry a snapshot must keep."""
    root.mkdir(exist_ok=True)
    (root / "docs").mkdir()
    (root / "docs" / "a.txt").write_bytes(b"version 1 of a")
    (root / "docs" / "b.bin").write_bytes(os.urandom(5000))
    (root / "empty").mkdir()
    (root / "link").symlink_to("docs/a.txt")
    os.link(root / "docs" / "b.bin", root / "b-hardlink")
    os.mkfifo(root / "fifo")
    os.chmod(root / "docs" / "a.txt", 0o640)
    os.chown(root / "docs" / "b.bin", 1234, 5678)
    os.setxattr(root / "docs" / "a.txt", "user.note", b"kept")
    os.utime(root / "docs" / "a.txt", ns=(T0, T0))
    os.utime(root / "docs", ns=(T0, T0))


def inodes(root) -> set[tuple[int, int]]:
    out = set()
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            st = os.lstat(os.path.join(folder, name))
            out.add((st.st_dev, st.st_ino))
    return out


def check_frozen_copy(target, snap):
    assert tree_state(snap.tree) == tree_state(target)
    assert not inodes(snap.tree) & inodes(target), "a snapshot shares an inode with the live target"
    frozen = tree_state(snap.tree)
    with open(target / "docs" / "a.txt", "r+b") as f:  # the applier writes in place
        f.write(b"VERSION 2")
    (target / "docs" / "b.bin").unlink()
    assert tree_state(snap.tree) == frozen


def test_linktree_is_an_exact_frozen_copy(tmp_path):
    target = tmp_path / "target"
    make_tree(target)
    snap = snapshots.take_snapshot(target, tmp_path / "snaps", 41, T0, now_ns=T0)
    assert (snap.kind, snap.offset, snap.time_ns, snap.reason) == ("linktree", 41, T0, "manual")
    assert (snap.copied_files, snap.linked_files) == (2, 0)
    check_frozen_copy(target, snap)


def test_linktree_copies_keep_holes(tmp_path):
    """A sparse file (a disk image) costs the snapshot its data, not its size, whether the
    snapshots are on the target's filesystem or (snapshot_dir) on another one."""
    target = tmp_path / "target"
    target.mkdir()
    with open(target / "disk.img", "wb") as f:
        f.truncate(16 << 20)
        f.seek(8 << 20)
        f.write(b"data in the middle")
    with loop_filesystem(tmp_path, "ext4", 64) as elsewhere:
        for folder in (tmp_path / "snaps", elsewhere / "snaps"):
            snap = snapshots.take_snapshot(target, folder, 1, T0, kind="linktree")
            st = os.stat(snap.tree / "disk.img")
            assert st.st_size == 16 << 20 and st.st_blocks * 512 <= 1 << 20
            assert tree_state(snap.tree) == tree_state(target)


def test_linktree_links_unchanged_files_from_the_previous_snapshot_only(tmp_path):
    target, snaps = tmp_path / "target", tmp_path / "snaps"
    make_tree(target)
    for n in range(20):
        (target / f"same{n}").write_bytes(b"unchanged %d" % n)
    first = snapshots.take_snapshot(target, snaps, 10, T0)
    a = target / "docs" / "a.txt"
    before = a.stat()
    with open(a, "r+b") as f:  # same size, and the old mtime put back: only ctime tells
        f.write(b"VERSION 1")
    os.utime(a, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert a.stat().st_size == before.st_size and a.stat().st_mtime_ns == before.st_mtime_ns
    second = snapshots.take_snapshot(target, snaps, 20, T0 + SECOND)
    assert second.linked_files == 21 and second.copied_files == 1
    assert (second.tree / "docs" / "a.txt").read_bytes() == b"VERSION 1 of a"
    assert (first.tree / "docs" / "a.txt").read_bytes() == b"version 1 of a"
    assert os.stat(second.tree / "same3").st_ino == os.stat(first.tree / "same3").st_ino
    assert os.stat(second.tree / "b-hardlink").st_ino == os.stat(second.tree / "docs" / "b.bin").st_ino
    check_frozen_copy(target, second)
    assert (first.tree / "docs" / "b.bin").exists()


def test_reflink_on_xfs(tmp_path):
    with loop_filesystem(tmp_path, "xfs", 300) as mnt:
        target = mnt / "target"
        make_tree(target)
        snap = snapshots.take_snapshot(target, mnt / "snaps", 5, T0)
        assert snap.kind == "reflink"
        check_frozen_copy(target, snap)


def test_btrfs_subvolume_snapshot(tmp_path):
    with loop_filesystem(tmp_path, "btrfs", 150) as mnt:
        target = mnt / "target"
        subprocess.run(["btrfs", "subvolume", "create", str(target)], check=True, capture_output=True)
        make_tree(target)
        snap = snapshots.take_snapshot(target, mnt / "snaps", 5, T0)
        assert snap.kind == "btrfs"
        check_frozen_copy(target, snap)
        snapshots.delete_snapshot(mnt / "snaps", snap.id)
        assert snapshots.list_snapshots(mnt / "snaps") == []
        assert not snap.folder.exists()
        # A plain folder on btrfs is not a subvolume: reflink copies serve it.
        plain = mnt / "plain"
        make_tree(plain)
        assert snapshots.take_snapshot(plain, mnt / "snaps2", 1, T0).kind == "reflink"


def test_forcing_a_kind_the_filesystem_lacks_is_refused_and_leaves_nothing(tmp_path):
    """Bad input (DT-E001), whether dt snapshot take runs it or a daemon's API: the
    daemon answers an OSError as an internal error."""
    target = tmp_path / "target"
    make_tree(target)
    with pytest.raises(UsageError, match="reflink needs a filesystem that clones"):
        snapshots.take_snapshot(target, tmp_path / "snaps", 1, T0, kind="reflink")
    with pytest.raises(UsageError, match="btrfs needs the target root to be a btrfs subvolume"):
        snapshots.take_snapshot(target, tmp_path / "snaps", 1, T0, kind="btrfs")
    assert snapshots.list_snapshots(tmp_path / "snaps") == []
    assert [p.name for p in (tmp_path / "snaps").iterdir()] == [".lock"]


def test_list_nearest_delete(tmp_path):
    target, snaps = tmp_path / "target", tmp_path / "snaps"
    make_tree(target)
    taken = [snapshots.take_snapshot(target, snaps, off, T0 + off * SECOND, now_ns=T0 + off * SECOND)
             for off in (30, 10, 20)]
    listed = snapshots.list_snapshots(snaps)
    assert [s.offset for s in listed] == [10, 20, 30]
    assert snapshots.nearest(listed, 25).offset == 20
    assert snapshots.nearest(listed, 10).offset == 10
    assert snapshots.nearest(listed, 9) is None
    snapshots.delete_snapshot(snaps, taken[1].id)
    assert [s.offset for s in snapshots.list_snapshots(snaps)] == [20, 30]
    with pytest.raises(NotFound):
        snapshots.delete_snapshot(snaps, taken[1].id)
    with pytest.raises(UsageError):
        snapshots.take_snapshot(target, snaps, 1, T0, reason="because")


def test_an_incomplete_snapshot_is_never_listed_and_is_cleaned_up(tmp_path):
    target, snaps = tmp_path / "target", tmp_path / "snaps"
    make_tree(target)
    done = snapshots.take_snapshot(target, snaps, 1, T0)
    crashed = snaps / "0000000000000002-123"
    (crashed / "tree").mkdir(parents=True)
    assert snapshots.list_snapshots(snaps) == [done]
    snapshots.take_snapshot(target, snaps, 3, T0)
    assert not crashed.exists()


def test_prune_by_count_and_age_keeps_the_newest(tmp_path):
    target, snaps = tmp_path / "target", tmp_path / "snaps"
    make_tree(target)
    for n in range(5):
        snapshots.take_snapshot(target, snaps, n, None, now_ns=T0 + n * 3600 * SECOND)
    gone = snapshots.prune(snaps, max_count=3, max_age_s=None)
    assert [s.offset for s in gone] == [0, 1]
    gone = snapshots.prune(snaps, max_count=3, max_age_s=3600, now_ns=T0 + 4 * 3600 * SECOND)
    assert [s.offset for s in gone] == [2]
    gone = snapshots.prune(snaps, max_count=3, max_age_s=60, now_ns=T0 + 100 * 3600 * SECOND)
    assert [s.offset for s in gone] == [3]
    assert [s.offset for s in snapshots.list_snapshots(snaps)] == [4]


def test_due_follows_the_interval_and_labels_missed_ones_deferred(tmp_path):
    target, snaps = tmp_path / "target", tmp_path / "snaps"
    make_tree(target)
    assert snapshots.due([], T0, 0) is None
    assert snapshots.due([], T0, 600) == "scheduled"
    listed = [snapshots.take_snapshot(target, snaps, 1, None, now_ns=T0)]
    assert snapshots.due(listed, T0 + 599 * SECOND, 600) is None
    assert snapshots.due(listed, T0 + 600 * SECOND, 600) == "scheduled"
    assert snapshots.due(listed, T0 + 1199 * SECOND, 600) == "scheduled"
    assert snapshots.due(listed, T0 + 1200 * SECOND, 600) == "deferred"


# -- dt snapshot ------------------------------------------------------------------------

def test_dt_snapshot_take_list_prune_and_refusals(tmp_path):
    import json

    from history_helpers import StreamWorld, create, dt

    from datatether.apply.progress import Progress

    world = StreamWorld(tmp_path, "embedded")
    try:
        world.append(create("f"), T0)
        never = dt("snapshot", "take", "web", state=world.state, check=False)
        assert never.returncode == 2 and "nothing applied yet" in never.stderr
        (world.state / "config.toml").write_text("snapshot_max_count = 2\n")
        world.target.mkdir()
        progress = Progress(world.state / "targets" / world.partition)
        progress.commit(0)
        busy = dt("snapshot", "take", "web", state=world.state, check=False)
        assert busy.returncode == 2 and "another applier" in busy.stderr
        progress.close()
        ids = []
        for n in range(3):
            (world.target / f"file{n}").write_bytes(b"%d" % n)
            ids.append(json.loads(dt("snapshot", "take", "web", "--json", state=world.state).stdout)[0]["id"])
        listed = json.loads(dt("snapshot", "list", str(world.conn.id), "--json", state=world.state).stdout)
        assert [s["id"] for s in listed] == ids[1:]  # the oldest went: snapshot_max_count = 2
        assert sorted(os.listdir(listed[-1]["folder"] + "/tree")) == ["file0", "file1", "file2"]
        assert listed[0]["offset"] == 0 and listed[0]["time_ns"] == T0
        table = dt("snapshot", "list", "web", state=world.state).stdout.splitlines()
        assert table[0].split()[:3] == ["ID", "OFFSET", "TIME"] and len(table) == 3
        (world.state / "config.toml").write_text("snapshot_max_count = 1\n")
        assert json.loads(dt("snapshot", "prune", "web", "--json", state=world.state).stdout) == {"deleted": [ids[1]]}
        gone = dt("snapshot", "delete", "web", ids[0], state=world.state, check=False)
        assert gone.returncode == 2 and "snapshot not found" in gone.stderr
    finally:
        world.close()


def test_take_while_paused_snapshots_a_running_applier_at_an_exact_offset(tmp_path):
    import threading

    from history_helpers import SECOND, append, create

    from datatether.apply.applier import Applier
    from datatether.apply.progress import Progress
    from datatether.apply.restore import restore
    from datatether.engine import events as ev
    from datatether.engine.history import Point
    from datatether.engine.log_embedded import EmbeddedLog
    from datatether.engine.settings import Settings
    from datatether.engine.states import TargetStatus

    P = "conn-1"
    with EmbeddedLog(tmp_path / "log") as log:
        log.ensure_partition(P)
        append(log, P, create("f"), T0)
        progress = Progress(tmp_path / "progress")
        applier = Applier(log, P, tmp_path / "target", "/src", progress, Settings())
        stop, appended = threading.Event(), threading.Event()
        threads = [threading.Thread(target=applier.run, args=(stop,))]

        def writer():
            for n in range(400):  # versions of one file, so any mix of two offsets shows
                append(log, P, ev.Write("f", 0, b"%06d" % n * 100), T0 + n * SECOND)
                if n == 100:
                    appended.set()

        threads.append(threading.Thread(target=writer))
        for t in threads:
            t.start()
        try:
            appended.wait(30)
            snaps = [snapshots.take_while_paused(applier, log, P, tmp_path / "target", tmp_path / "snaps")
                     for _ in range(3)]
        finally:
            threads[1].join()
            # Caught up and resumed after each snapshot: the applier reports OK once its
            # loop wakes from the pause (resume() does not wait for that).
            deadline = time.monotonic() + 30
            while ((applier.applied_offset < log.end_offset(P) - 1 or progress.status is not TargetStatus.OK)
                   and threads[0].is_alive() and time.monotonic() < deadline):
                stop.wait(0.05)
            status = progress.status
            stop.set()
            threads[0].join()
            applier.close()
            progress.close()
        assert status is TargetStatus.OK
        assert (tmp_path / "target" / "f").read_bytes() == b"%06d" % 399 * 100
        for snap in snaps:
            assert snap.time_ns == T0 + max(0, snap.offset - 1) * SECOND
            into = tmp_path / f"from-log-{snap.id}"
            restore(log, P, Point(offset=snap.offset), into, snapshots_dir=tmp_path / "none", source_root="/src",
                    target_root=str(tmp_path / "target"), settings=Settings())
            assert (snap.tree / "f").read_bytes() == (into / "f").read_bytes()
