"""apply/restore.py: the state at an offset or a time, byte for byte, from snapshots of each
kind or from the log alone; partial restores; and every way a restore is refused."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest
from conftest import loop_filesystem
from history_helpers import SECOND, T0, append, corrupt_embedded, create, tree_state

from datatether.apply import snapshot as snapshots
from datatether.apply.applier import Applier
from datatether.apply.progress import Progress
from datatether.apply.restore import STAGING_PREFIX, restore
from datatether.engine import events as ev
from datatether.engine.errors import BackendUnavailable, NotFound, OutsideHistory, RestoreFailed, UsageError
from datatether.engine.history import Point
from datatether.engine.log_embedded import EmbeddedLog
from datatether.engine.log_view import LogView
from datatether.engine.settings import Settings

P = "conn-1"
SOURCE = "/srv/source"
SETTINGS = Settings()

# (operation, content of the files after it, by hand: the oracle that does not use the applier)
STORY = [
    (create("docs", ev.FileKind.DIR), {"docs": None}),
    (create("docs/a.txt"), {"docs": None, "docs/a.txt": b""}),
    (ev.Write("docs/a.txt", 0, b"version one"), {"docs": None, "docs/a.txt": b"version one"}),
    (create("b.txt"), {"docs": None, "docs/a.txt": b"version one", "b.txt": b""}),
    (ev.Write("b.txt", 0, b"B" * 3000), {"docs": None, "docs/a.txt": b"version one", "b.txt": b"B" * 3000}),
    (ev.Write("docs/a.txt", 0, b"VERSION"), {"docs": None, "docs/a.txt": b"VERSION one", "b.txt": b"B" * 3000}),
    (ev.Rename("b.txt", "docs/b.txt"), {"docs": None, "docs/a.txt": b"VERSION one", "docs/b.txt": b"B" * 3000}),
    (ev.Symlink("ln", f"{SOURCE}/docs/a.txt", 0, 0, T0),
     {"docs": None, "docs/a.txt": b"VERSION one", "docs/b.txt": b"B" * 3000, "ln": "link"}),
    (ev.Truncate("docs/a.txt", 3), {"docs": None, "docs/a.txt": b"VER", "docs/b.txt": b"B" * 3000, "ln": "link"}),
    (ev.Unlink("docs/a.txt"), {"docs": None, "docs/b.txt": b"B" * 3000, "ln": "link"}),
    (create("docs/a.txt"), {"docs": None, "docs/a.txt": b"", "docs/b.txt": b"B" * 3000, "ln": "link"}),
    (ev.Write("docs/a.txt", 0, b"third life"),
     {"docs": None, "docs/a.txt": b"third life", "docs/b.txt": b"B" * 3000, "ln": "link"}),
    (ev.SetAttr("docs/a.txt", mode=0o100600, mtime_ns=T0 - 7 * SECOND, atime_ns=T0),
     {"docs": None, "docs/a.txt": b"third life", "docs/b.txt": b"B" * 3000, "ln": "link"}),
    (ev.SetXattr("docs/b.txt", "user.color", b"blue"),
     {"docs": None, "docs/a.txt": b"third life", "docs/b.txt": b"B" * 3000, "ln": "link"}),
    (ev.Link("docs/b.txt", "b-again"),
     {"docs": None, "docs/a.txt": b"third life", "docs/b.txt": b"B" * 3000, "ln": "link", "b-again": b"B" * 3000}),
]
LAST = len(STORY) - 1


def contents(root) -> dict:
    out = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            out[rel] = None if os.path.isdir(path) and not os.path.islink(path) else (
                "link" if os.path.islink(path) else open(path, "rb").read())
    return out


class World:
    """A log holding STORY (event n at T0 + n s), the live target that applied it step by
    step, the state of that target after every offset, and snapshots taken on the way."""

    def __init__(self, base, snapshot_at=(), kind=None, target=None):
        self.base = base
        self.log = EmbeddedLog(base / "log")
        self.log.ensure_partition(P)
        for n, (op, _) in enumerate(STORY):
            append(self.log, P, op, T0 + n * SECOND)
        self.target = target or base / "target"
        self.snaps = base / "snaps"
        self.states = {-1: tree_state(self._empty(), times=False)}
        view = LogView(self.log, last=-1)
        progress = Progress(base / "progress")
        applier = Applier(view, P, self.target, SOURCE, progress, SETTINGS)
        for n in range(len(STORY)):
            view.last = n
            applier.run_once()
            assert applier.applied_offset == n
            applier.checkpoint()
            self.states[n] = tree_state(self.target, times=False)
            if n in snapshot_at:
                snapshots.take_snapshot(self.target, self.snaps, n, T0 + n * SECOND, kind=kind)
        applier.close()
        progress.close()
        self._count = 0

    def _empty(self):
        empty = self.base / "empty-root"
        empty.mkdir(mode=0o755)
        return empty

    def restore(self, point, glob=None, into=None):
        self._count += 1
        into = into or self.base / f"restored-{self._count}"
        return into, restore(self.log, P, point, into, snapshots_dir=self.snaps, source_root=SOURCE,
                             target_root=str(self.target), settings=SETTINGS, glob=glob)

    def check(self, offset, into):
        got = tree_state(into, times=False)
        want = self.states[offset]
        got.pop(""), want.pop("")  # the root's own mode: checked apart (test_root_attributes)
        assert got == want, f"state at offset {offset}"
        expected = STORY[offset][1] if offset >= 0 else {}
        assert contents(into) == expected, f"contents at offset {offset}"


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.log.close()


def test_the_oracle_holds_on_the_live_target(world):
    # The hand-written contents agree with what the applier made of the story.
    assert contents(world.target) == STORY[LAST][1]
    assert os.readlink(world.target / "ln") == f"{world.target}/docs/a.txt"  # RemapLink


def test_every_offset_from_the_log_alone(world):
    for offset in range(-1, LAST + 1):
        into, done = world.restore(Point(offset=offset))
        assert (done.offset, done.snapshot, done.replayed) == (offset, None, offset + 1)
        world.check(offset, into)


def test_times_resolve_to_the_last_event_at_or_before_them(world):
    for t, offset in [(T0 - 1, -1), (T0, 0), (T0 + 5 * SECOND + SECOND // 2, 5), (T0 + 8 * SECOND, 8),
                      (T0 + 3600 * SECOND, LAST)]:
        into, done = world.restore(Point(time_ns=t))
        assert done.offset == offset
        assert done.time_ns == (T0 + offset * SECOND if offset >= 0 else None)
        world.check(offset, into)


def test_explicit_times_and_modes_are_restored(world):
    into, _ = world.restore(Point(offset=12))
    st = os.stat(into / "docs" / "a.txt")
    assert (st.st_mode, st.st_mtime_ns) == (0o100600, T0 - 7 * SECOND)
    assert os.readlink(into / "ln") == f"{world.target}/docs/a.txt"
    into, _ = world.restore(Point(offset=LAST))
    assert os.getxattr(into / "docs" / "b.txt", "user.color") == b"blue"
    assert os.stat(into / "b-again").st_ino == os.stat(into / "docs" / "b.txt").st_ino


def run_with_snapshots(base, kind=None, target=None, expect_kind="linktree"):
    w = World(base, snapshot_at=(4, 9), kind=kind, target=target)
    try:
        assert [s.kind for s in snapshots.list_snapshots(w.snaps)] == [expect_kind] * 2
        for offset in range(-1, LAST + 1):
            into, done = w.restore(Point(offset=offset))
            base_offset = 9 if offset >= 9 else 4 if offset >= 4 else None
            assert (done.snapshot is None) == (base_offset is None)
            assert done.replayed == offset - (base_offset if base_offset is not None else -1)
            w.check(offset, into)
        # Exactly at a snapshot nothing is replayed and even the applied times are kept.
        into, done = w.restore(Point(offset=9))
        assert done.replayed == 0
        snap = snapshots.nearest(snapshots.list_snapshots(w.snaps), 9)
        assert tree_state(into) == tree_state(snap.tree)
    finally:
        w.log.close()


def test_from_linktree_snapshots(tmp_path):
    run_with_snapshots(tmp_path)


def test_from_reflink_snapshots_on_xfs(tmp_path):
    with loop_filesystem(tmp_path, "xfs", 300) as mnt:
        run_with_snapshots(mnt, expect_kind="reflink")


def test_from_btrfs_snapshots(tmp_path):
    with loop_filesystem(tmp_path, "btrfs", 150) as mnt:
        subprocess.run(["btrfs", "subvolume", "create", str(mnt / "target")], check=True, capture_output=True)
        run_with_snapshots(mnt, target=mnt / "target", expect_kind="btrfs")


def test_snapshots_reach_past_retention(tmp_path):
    w = World(tmp_path, snapshot_at=(4,))
    try:
        w.log.truncate_before(P, 5)
        for offset in (4, 5, 9, LAST):
            into, _ = w.restore(Point(offset=offset))
            w.check(offset, into)
        into, done = w.restore(Point(time_ns=T0 + 4 * SECOND + SECOND // 2))
        assert done.offset == 4
        with pytest.raises(OutsideHistory) as info:
            w.restore(Point(offset=3))
        assert "offsets from offset 4 to 14" in info.value.message
        with pytest.raises(OutsideHistory):
            w.restore(Point(time_ns=T0 + 3 * SECOND))
    finally:
        w.log.close()


def test_a_snapshot_is_neither_deleted_nor_pruned_while_a_restore_copies_it(world, tmp_path):
    big = tmp_path / "big"  # a tree that takes a while to copy
    for d in range(40):
        (big / f"d{d:02}").mkdir(parents=True)
        for f in range(500):
            (big / f"d{d:02}" / f"f{f}").write_bytes(b"x")
    copied = snapshots.take_snapshot(big, world.snaps, 9, T0 + 9 * SECOND)
    snapshots.take_snapshot(world.target, world.snaps, LAST, T0 + LAST * SECOND)
    into = tmp_path / "into"
    restoring = threading.Thread(target=world.restore, args=(Point(offset=9),), kwargs={"into": into})
    restoring.start()
    try:
        while restoring.is_alive() and not any(into.glob(f"{STAGING_PREFIX}*/d*")):
            time.sleep(0.001)
        assert restoring.is_alive(), "the copy ended before the test could delete it"
        with pytest.raises(BackendUnavailable, match="a restore is reading it"):
            snapshots.delete_snapshot(world.snaps, copied.id)
        assert snapshots.prune(world.snaps, max_count=1, max_age_s=None) == []
    finally:
        restoring.join()
    assert tree_state(into) == tree_state(big)
    assert [s.id for s in snapshots.prune(world.snaps, max_count=1, max_age_s=None)] == [copied.id]


def test_a_time_before_retention_says_how_far_back_one_can_go(world):
    world.log.truncate_before(P, 5)
    with pytest.raises(OutsideHistory) as info:
        world.restore(Point(time_ns=T0 + 2 * SECOND))
    assert "oldest retained event: offset 5 at 2026-03-01T10:00:05.000000000Z" in info.value.message
    with pytest.raises(OutsideHistory):
        world.restore(Point(offset=7))  # the records are there but nothing to replay them on


def test_an_offset_beyond_the_end(world):
    with pytest.raises(OutsideHistory, match=f"the last offset is {LAST}"):
        world.restore(Point(offset=LAST + 1))


@pytest.mark.parametrize("glob, expected", [
    ("docs", {"docs", "docs/a.txt", "docs/b.txt"}),
    ("docs/b.txt", {"docs", "docs/b.txt"}),
    ("*.txt", {"docs", "docs/a.txt", "docs/b.txt"}),
    ("ln", {"ln"}),
])
def test_a_path_glob_restores_part_of_the_tree(world, glob, expected):
    into, _ = world.restore(Point(offset=LAST), glob=glob)
    assert set(contents(into)) == expected
    full = world.states[LAST]
    got = tree_state(into, times=False)
    for rel in expected:
        assert got[rel] == {k: v for k, v in full[rel].items() if k != "links"}


def test_a_path_glob_keeps_directory_times(tmp_path):
    w = World(tmp_path, snapshot_at=(LAST,))
    try:
        into, _ = w.restore(Point(offset=LAST), glob="docs/b.txt")
        assert os.stat(into / "docs").st_mtime_ns == os.stat(w.target / "docs").st_mtime_ns
        with pytest.raises(NotFound, match="nothing matched"):
            w.restore(Point(offset=LAST), glob="nothing/here")
    finally:
        w.log.close()


def test_a_corrupt_record_on_the_way_fails_and_leaves_nothing(world):
    corrupt_embedded(world.log, P, 6)
    into = world.base / "dest"
    into.mkdir()
    with pytest.raises(RestoreFailed, match="event 6 refused: corrupt record.*nothing was written"):
        world.restore(Point(offset=LAST), into=into)
    assert list(into.iterdir()) == []
    into, _ = world.restore(Point(offset=5))  # before the damage: fine
    world.check(5, into)


def test_an_undecodable_event_or_a_gap_fails_the_restore(tmp_path):
    with EmbeddedLog(tmp_path / "log") as log:
        log.ensure_partition(P)
        append(log, P, create("f"), T0)
        log.append(P, [b"\x02\x00 sealed and intact, but not an event"], timestamp_ns=T0 + SECOND)
        append(log, P, ev.Write("f", 0, b"later"), T0 + 2 * SECOND)
        append(log, P, ev.Gap("capture restarted"), T0 + 3 * SECOND)
        kw = dict(snapshots_dir=tmp_path / "snaps", source_root=SOURCE, target_root=str(tmp_path / "t"),
                  settings=SETTINGS)
        into = tmp_path / "into"
        with pytest.raises(RestoreFailed, match="event 1 refused: corrupt record"):
            restore(log, P, Point(offset=2), into, **kw)
        assert list(into.iterdir()) == []
        target = tmp_path / "t"
        target.mkdir()
        (target / "f").write_bytes(b"later")
        snapshots.take_snapshot(target, tmp_path / "snaps", 2, T0 + 2 * SECOND)
        done = restore(log, P, Point(offset=2), tmp_path / "at-2", **kw)
        assert done.snapshot is not None and (tmp_path / "at-2" / "f").read_bytes() == b"later"
        with pytest.raises(RestoreFailed, match="gap at event 3"):
            restore(log, P, Point(offset=3), tmp_path / "at-3", **kw)


@pytest.mark.parametrize("gap_at", [500, 999])  # inside the applier's first batch, and its last event
def test_a_gap_fails_a_restore_until_a_remirror_repairs_it_wherever_a_batch_ends(tmp_path, gap_at):
    """What counts is the target data state at the point, not where the replay's batches
    of events happened to end."""
    with EmbeddedLog(tmp_path / "log") as log:
        log.ensure_partition(P)
        append(log, P, create("f"), T0)
        for n in range(1, gap_at):
            append(log, P, ev.Write("f", 0, b"%06d" % n), T0 + n)
        gap = append(log, P, ev.Gap("capture restarted"), T0 + gap_at)
        append(log, P, ev.MirrorStart("m1", "diff"), T0 + gap_at + 1)
        append(log, P, ev.MirrorEnd("m1", sent_bytes=0, skipped_bytes=6, files=1), T0 + gap_at + 2)
        last = append(log, P, ev.Write("f", 6, b"+after"), T0 + gap_at + 3)
        kw = dict(snapshots_dir=tmp_path / "snaps", source_root=SOURCE, target_root=str(tmp_path / "t"),
                  settings=SETTINGS)
        with pytest.raises(RestoreFailed, match=f"gap at event {gap}"):
            restore(log, P, Point(offset=gap), tmp_path / "at-gap", **kw)
        done = restore(log, P, Point(offset=last), tmp_path / "after", **kw)
    assert done.data_state == "OK"
    assert (tmp_path / "after" / "f").read_bytes() == b"%06d+after" % (gap_at - 1)


def test_a_name_that_is_not_utf8_is_restored(tmp_path):
    """The progress of the replay names the last file applied; its status snapshot must
    still be written when that name is not UTF-8 (the daemon's applier keeps one too)."""
    name = b"caf\xe9.txt".decode("utf-8", "surrogateescape")
    with EmbeddedLog(tmp_path / "log") as log:
        log.ensure_partition(P)
        append(log, P, create(name), T0)
        append(log, P, ev.Write(name, 0, b"latin-1"), T0 + SECOND)
        restore(log, P, Point(offset=1), tmp_path / "into", snapshots_dir=tmp_path / "snaps", source_root=SOURCE,
                target_root=str(tmp_path / "t"), settings=SETTINGS)
    assert os.listdir(tmp_path / "into") == [name]
    assert (tmp_path / "into" / name).read_bytes() == b"latin-1"
    progress = Progress(tmp_path / "progress")
    progress.sample(T0, name, 0)
    progress.close()
    assert Progress.read_snapshot(tmp_path / "progress")["last_file"] == name


def test_a_snapshot_of_a_target_already_mirror_required_is_replayed_on(tmp_path):
    with EmbeddedLog(tmp_path / "log") as log:
        log.ensure_partition(P)
        append(log, P, create("f"), T0)
        append(log, P, ev.Write("f", 0, b"after"), T0 + SECOND)
        target = tmp_path / "t"
        target.mkdir()
        (target / "f").write_bytes(b"")
        snapshots.take_snapshot(target, tmp_path / "snaps", 0, T0, data_state="Mirror Required")
        done = restore(log, P, Point(offset=1), tmp_path / "into", snapshots_dir=tmp_path / "snaps",
                       source_root=SOURCE, target_root=str(target), settings=SETTINGS)
        assert done.data_state == "Mirror Required" and (tmp_path / "into" / "f").read_bytes() == b"after"


def test_a_snapshot_after_the_damage_avoids_it(tmp_path):
    w = World(tmp_path, snapshot_at=(9,))
    try:
        corrupt_embedded(w.log, P, 6)
        into, done = w.restore(Point(offset=LAST))
        assert done.snapshot is not None
        w.check(LAST, into)
    finally:
        w.log.close()


def test_the_destination_must_be_empty(world):
    full = world.base / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        world.restore(Point(offset=3), into=full)
    assert (full / "keep.txt").read_text() == "mine" and len(list(full.iterdir())) == 1
    afile = world.base / "afile"
    afile.write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        world.restore(Point(offset=3), into=afile)


def test_restore_leaves_no_trace_in_the_log(world):
    world.log.append(P, [])  # nothing
    end, consumers = world.log.end_offset(P), world.log.consumers(P)
    world.restore(Point(offset=LAST))
    assert (world.log.end_offset(P), world.log.consumers(P)) == (end, consumers)


def test_task_commands_do_not_run_during_a_restore(tmp_path):
    with EmbeddedLog(tmp_path / "log") as log:
        log.ensure_partition(P)
        marker = tmp_path / "ran"
        append(log, P, create("f"), T0)
        append(log, P, ev.TaskCommand("t1", "touch", ["touch", str(marker)]), T0 + SECOND)
        append(log, P, ev.Write("f", 0, b"after the task"), T0 + 2 * SECOND)
        into = tmp_path / "into"
        done = restore(log, P, Point(offset=2), into, snapshots_dir=tmp_path / "snaps", source_root=SOURCE,
                       target_root=str(tmp_path / "target"), settings=SETTINGS)
        assert done.offset == 2 and (into / "f").read_bytes() == b"after the task"
        assert not marker.exists()
        assert log.end_offset(P) == 3


def test_the_root_attributes(world):
    into, _ = world.restore(Point(offset=LAST))
    assert os.stat(into).st_mode == os.stat(world.target).st_mode
    assert not any(name.startswith(".dt-restore") for name in os.listdir(into))


def test_concurrent_appends_do_not_leak_into_a_restore(world):
    stop = threading.Event()

    def writer():
        n = 0
        while not stop.is_set() and n < 200:
            append(world.log, P, ev.Write("docs/b.txt", 0, b"LATER"), T0 + 100 * SECOND + n)
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        into, done = world.restore(Point(offset=LAST))
    finally:
        stop.set()
        thread.join()
    assert done.offset == LAST
    world.check(LAST, into)


# -- the command line, on both backends ------------------------------------------------

from history_helpers import StreamWorld, backends, dt  # noqa: E402

from datatether.tools import runtime  # noqa: E402


@pytest.fixture
def stream_world(tmp_path, backend, request):
    w = StreamWorld(tmp_path, backend, request)
    for n, (op, _) in enumerate(STORY):
        w.append(op, T0 + n * SECOND)
    yield w
    w.close()


def apply_up_to(world, offset):
    """The connection's own applier (its progress where dt finds it), up to ``offset``."""
    job = runtime.Job(state=runtime.State(world.state, None, None, None, None), conn=world.conn, rset=None)
    progress = Progress(job.target_state_dir)
    view = LogView(world.log, last=offset)
    applier = Applier(view, world.partition, world.target, str(world.source), progress, SETTINGS)
    while applier.applied_offset < offset:
        applier.run_once()
    applier.close()
    progress.close()


@backends()
def test_dt_snapshot_and_restore(stream_world, tmp_path):
    w = stream_world
    apply_up_to(w, 6)
    taken = json.loads(dt("snapshot", "take", "web", "--json", state=w.state).stdout)[0]
    assert (taken["offset"], taken["time_ns"], taken["kind"]) == (6, T0 + 6 * SECOND, "linktree")
    apply_up_to(w, LAST)
    listed = json.loads(dt("snapshot", "list", "web", "--json", state=w.state).stdout)
    assert [s["id"] for s in listed] == [taken["id"]]
    for at, offset in [("3", 3), ("9", 9), ("2026-03-01T10:00:06.5Z", 6), ("2026-03-01T11:00:11+01:00", 11),
                       (str(LAST), LAST)]:
        into = tmp_path / f"r-{offset}"
        done = json.loads(dt("restore", "web", "--at", at, "--into", into, "--json", state=w.state).stdout)
        assert done["offset"] == offset
        assert done["snapshot"] == (taken["id"] if offset >= 6 else None)
        s = {k: v for k, v in STORY[offset][1].items()}
        assert contents(into) == s
        if "ln" in s:
            assert os.readlink(into / "ln") == os.readlink(w.target / "ln")
    part = tmp_path / "part"
    dt("restore", "web", "--at", str(LAST), "--into", part, "--path", "docs/b.txt", state=w.state)
    assert contents(part) == {"docs": None, "docs/b.txt": b"B" * 3000}
    dt("snapshot", "delete", "web", taken["id"], state=w.state)
    assert json.loads(dt("snapshot", "list", "web", "--json", state=w.state).stdout) == []


@backends()
def test_a_new_connection_to_the_same_target_does_not_inherit_its_snapshots(stream_world, tmp_path):
    """Snapshots live beside the target root; their offsets are those of the stream they
    were taken of. A connection made again to that target starts a stream of its own."""
    from history_helpers import make_connection

    from datatether.engine.connection import ConnectionStore
    from datatether.engine.replset import SetStore

    w = stream_world
    apply_up_to(w, 6)
    old = json.loads(dt("snapshot", "take", "web", "--json", state=w.state).stdout)[0]
    state = runtime.State(w.state, Settings.load(w.state), w.log, ConnectionStore(w.state), SetStore(w.state))
    runtime.remove_connection(state, w.conn)
    again = make_connection(w.state, tmp_path / "source2", w.target, name="again")
    w.log.ensure_partition(again.partition)
    append(w.log, again.partition, create("fresh", ev.FileKind.DIR), T0 + 100 * SECOND)
    for n in range(1, 8):
        append(w.log, again.partition, create(f"fresh/{n}"), T0 + (100 + n) * SECOND)
    try:
        assert json.loads(dt("snapshot", "list", "again", "--json", state=w.state).stdout) == []
        for at in ("6", "7"):
            done = json.loads(dt("restore", "again", "--at", at, "--into", tmp_path / at, "--json",
                                 state=w.state).stdout)
            assert done["snapshot"] is None
            assert contents(tmp_path / at) == {"fresh": None, **{f"fresh/{n}": b"" for n in range(1, int(at) + 1)}}
        assert json.loads(dt("snapshot", "prune", "again", "--json", state=w.state).stdout) == {"deleted": []}
        assert snapshots.list_snapshots(w.target.parent / "target.dt-snapshots")[0].id == old["id"]  # kept
    finally:
        if w.backend == "kafka":  # the world drops its own partition when it closes
            w.log.drop_partition(again.partition)
            w.log.ensure_partition(w.partition)


@pytest.mark.parametrize("backend", ["embedded"])
def test_a_restore_killed_midway_is_cleared_by_the_next_one(stream_world, tmp_path):
    """A restore's staging folder in DIR outlives a kill -9 or a crash; the next restore into
    DIR removes it. One that is still running is left alone: DIR is not empty then."""
    import fcntl
    import signal
    import sys

    w = stream_world
    apply_up_to(w, 6)
    for d in range(40):  # a snapshot that takes a while to copy
        (w.target / f"bulk{d:02}").mkdir()
        for f in range(500):
            (w.target / f"bulk{d:02}" / f"f{f}").write_bytes(b"x")
    dt("snapshot", "take", "web", state=w.state)
    into = tmp_path / "r"
    argv = [sys.executable, "-m", "datatether.tools.cli", "restore", "web", "--at", "6", "--into", str(into),
            "--state", str(w.state)]
    def start_and_wait_for_the_copy():
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not any(into.glob(f"{STAGING_PREFIX}*/bulk*")):
            time.sleep(0.001)
        return proc

    running = start_and_wait_for_the_copy()
    running.send_signal(signal.SIGSTOP)
    beside = dt("restore", "web", "--at", "6", "--into", into, state=w.state, check=False)
    assert beside.returncode == 2 and "is not empty" in beside.stderr
    running.send_signal(signal.SIGCONT)
    assert running.wait(timeout=120) == 0
    assert sorted(os.listdir(into)) == sorted(os.listdir(w.target))
    subprocess.run(["rm", "-rf", str(into)], check=True)

    killed = start_and_wait_for_the_copy()
    killed.kill()
    killed.wait()
    (left,) = into.iterdir()
    fd = os.open(left, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # the cp that the killed restore ran writes on until it ends
    os.close(fd)
    dt("restore", "web", "--at", "6", "--into", into, state=w.state)
    assert sorted(os.listdir(into)) == sorted(os.listdir(w.target))


@backends()
def test_dt_restore_refusals(stream_world, tmp_path):
    w = stream_world
    cases = [
        (("restore", "nope", "--at", "1", "--into", tmp_path / "a"), "connection not found: nope"),
        (("restore", "web", "--at", "99", "--into", tmp_path / "a"), f"the last offset is {LAST}"),
        (("restore", "web", "--at", "someday", "--into", tmp_path / "a"), "not a time"),
        (("restore", "web", "--at", "1", "--into", w.target / "x"), "overlaps the target"),
        (("restore", "web", "--at", "1", "--into", w.state / "r"), "overlaps the state directory"),
    ]
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    cases.append((("restore", "web", "--at", "1", "--into", full), "not empty"))
    for argv, message in cases:
        done = dt(*argv, state=w.state, check=False)
        assert done.returncode == 2 and message in done.stderr, (argv, done.stderr)
    assert not (tmp_path / "a").exists()
    w.log.truncate_before(w.partition, 4)
    done = dt("restore", "web", "--at", "2026-03-01T10:00:01Z", "--into", tmp_path / "b", state=w.state, check=False)
    assert done.returncode == 2
    assert "oldest retained event: offset 4 at 2026-03-01T10:00:04.000000000Z" in done.stderr
    assert "outside the reachable history" in done.stderr


def damage(world, request, offset):
    """Damage the stored record at ``offset`` as a failing disk would."""
    if world.backend == "kafka":
        from kafka_fixture import damage_batch

        damage_batch(request.getfixturevalue("kafka_broker"), world.log._topic(world.partition), offset)
    else:
        world.log.close()  # with nobody holding the database
        with EmbeddedLog(world.state / "log") as log:
            corrupt_embedded(log, world.partition, offset)
        world.log = runtime.open_log(world.state, Settings.load(world.state))


@backends()
def test_dt_restore_stops_at_a_corrupt_record(stream_world, tmp_path, request):
    damage(stream_world, request, 5)
    into = tmp_path / "r"
    done = dt("restore", "web", "--at", str(LAST), "--into", into, state=stream_world.state, check=False)
    assert done.returncode == 2 and "event 5 refused" in done.stderr and "corrupt record" in done.stderr
    assert not into.exists() or list(into.iterdir()) == []


@backends()
def test_dt_restore_before_a_damaged_record(stream_world, tmp_path, request):
    damage(stream_world, request, 5)
    dt("restore", "web", "--at", "4", "--into", tmp_path / "ok", state=stream_world.state)
    assert contents(tmp_path / "ok") == STORY[4][1]
