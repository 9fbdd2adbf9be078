"""engine/daemon.py without FUSE: the real log, applier, progress and mirror, and a scripted
capture (the test changes the source itself and emits the events a capture would).

Covers the supervision logic the end-to-end tests reach only by timing: gaps and the
remirror after the queue drained, overflow, a target that diverged, the mirror control
operations and the one-daemon-per-source lock.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from datatether.apply.applier import Applier
from datatether.apply.progress import Progress
from datatether.apply.snapshot import TargetSnapshots, list_snapshots
from datatether.engine.capture import Emitter
from datatether.engine.connection import ConnectionStore
from datatether.engine.codec import decode
from datatether.engine.daemon import MAX_TASK_TIMEOUT_S, Daemon, DaemonLock, Parts, running_daemons
from datatether.engine.history import find_task_result
from datatether.engine.errors import AlreadyRunning, BackendUnavailable, UsageError
from datatether.engine.events import Create, FileKind, Write
from datatether.engine.log_embedded import EmbeddedLog
from datatether.engine.mirror import Mirror
from datatether.engine.pathlocks import PathLocks
from datatether.engine.queue import QueueLimits, free_bytes
from datatether.engine.settings import Settings
from datatether.engine.states import MirrorMode
from datatether.engine.tree import Tree
from datatether.tools.commands import status as status_command
from tests.conftest import loop_filesystem
from tests.daemon_helpers import wait_for
from tests.trees import diff_trees


class ScriptedCapture:
    """A capture whose events the test emits (``emit``) after changing the source."""

    origin = "test"

    def __init__(self, sink, on_gap):
        self.emitter = Emitter(sink, self.origin, on_gap)
        self._running = False

    def start(self):
        self._running = True

    def stop(self):
        self._running = False

    @property
    def running(self):
        return self._running

    def emit(self, *ops):
        return self.emitter.emit(ops)


@pytest.fixture
def state_dir(tmp_path):
    return tmp_path / "state"


@pytest.fixture
def world(tmp_path, state_dir):
    src, dst, state = tmp_path / "src", tmp_path / "dst", state_dir
    src.mkdir()
    conn = ConnectionStore(state).create(name="c", set_name="c", source_root=str(src), target=str(dst))
    log_ = EmbeddedLog(state / "log")
    log_.ensure_partition(conn.partition)
    made: list[Daemon] = []

    def make(limit: int = 1 << 30, min_free: int = 0, **settings) -> Daemon:
        cfg = Settings(**settings)
        locks = PathLocks()
        progress = Progress(state / "targets" / conn.partition)
        daemon = Daemon(Parts(
            conn=conn, log=log_, settings=cfg, limits=QueueLimits(limit, 0, min_free), space_path=state,
            progress=progress,
            make_applier=lambda lg: Applier(lg, conn.partition, conn.target_root, str(src), progress, cfg),
            make_capture=ScriptedCapture,
            make_mirror=lambda feed, mode, since: Mirror(Tree(src), Tree(dst), feed.log, conn.partition, cfg, locks,
                                                         mode=mode, changed_since_ns=since, room=feed.room),
            snapshots=TargetSnapshots(log_, conn, cfg)))
        made.append(daemon)
        return daemon

    make.snapshots_dir = tmp_path / "dst.dt-snapshots"
    yield make, src, dst
    for daemon in made:
        if not daemon.stop_requested.is_set():
            daemon.shutdown()
    log_.close()


def supervised(daemon: Daemon) -> threading.Thread:
    thread = threading.Thread(target=daemon.supervise, daemon=True)
    thread.start()
    return thread


def running(daemon: Daemon) -> None:
    """Started as a new connection (initial full mirror) and supervised in a thread."""
    daemon.start(restarted=False, mirror=MirrorMode.FULL)
    supervised(daemon)


def converged(daemon: Daemon) -> dict:
    def done():
        s = daemon.status()
        ok = (s["state"] == "replicating" and s["mirror_status"] == "Idle" and s["queued_ops"] == 0
              and s["target_data_state"] == "OK")
        return s if ok else None
    return wait_for(done, 60, "convergence")


def create(src, rel: str, data: bytes) -> tuple:
    """Change the source as a program would; return the events a capture would emit."""
    path = src / rel
    path.write_bytes(data)
    st = path.stat()
    return (Create(rel, FileKind.FILE, 0o644, st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns),
            Write(rel, 0, data))


def test_initial_mirror_then_captured_events(world):
    make, src, dst = world
    (src / "old.txt").write_text("before\n")
    daemon = make()
    running(daemon)
    converged(daemon)
    assert daemon.capture.emit(*create(src, "new.txt", b"captured\n"))
    converged(daemon)
    assert (dst / "old.txt").read_text() == "before\n" and (dst / "new.txt").read_bytes() == b"captured\n"
    final = daemon.shutdown()
    assert final["replication_status"] == "Stopped" and final["queued_ops"] == 0


def test_lost_events_are_a_gap_and_the_remirror_waits_for_the_queue(world):
    make, src, dst = world
    daemon = make(limit=4096)
    running(daemon)
    converged(daemon)
    daemon.operations()["pause"].handler({})
    assert daemon.capture.emit(*create(src, "a.bin", os.urandom(3000)))
    assert not daemon.capture.emit(*create(src, "b.bin", os.urandom(3000)))  # over the limit: lost
    status = daemon.status()
    assert status["queue_overflow"] and status["target_data_state"] == "Mirror Required"
    assert status["replication_status"] == "Pending"
    assert status["state"] == "waiting for the queue to drain before mirroring"
    assert not daemon.capture.emit(*create(src, "c.bin", b"c"))  # still dropped until the remirror
    daemon.operations()["resume"].handler({})
    status = converged(daemon)
    assert status["mirror_reason"].startswith("remirror after a gap")
    assert diff_trees(src, dst) == []


class TestSmallDisk:
    """The log on a file system of its own, small enough to fill."""

    @pytest.fixture
    def state_dir(self, tmp_path):
        with loop_filesystem(tmp_path, "ext4", 32) as mnt:
            yield mnt / "state"

    def test_history_gives_way_to_a_queue_short_of_free_space(self, world, state_dir):
        """The paused target's queue fills the disk down to the minimum free space; once it
        is applied, the history window (a day) must not keep that space from the remirror
        that repairs the overflow, or the remirror fails for lack of space every time."""
        make, src, dst = world
        daemon = make(min_free=free_bytes(state_dir) - (8 << 20))
        running(daemon)
        converged(daemon)
        daemon.operations()["pause"].handler({})
        count = 0
        while daemon.capture.emit(*create(src, f"f{count}", os.urandom(256 << 10))):
            count += 1
        assert 0 < count < 40 and daemon.status()["queue_overflow"].startswith("minimum free space")
        daemon.operations()["resume"].handler({})
        status = converged(daemon)
        assert status["mirror_reason"].startswith("remirror after a gap")
        assert diff_trees(src, dst) == []


def test_a_lost_change_that_keeps_size_and_mtime_is_repaired_by_the_gap_remirror(world):
    """A change lost in a gap that leaves the file's size and mtime as the target's copy has
    them (set back with utime here; a coarse clock does the same within one tick) is still
    repaired: the gap's checksum remirror compares every file changed since the gap began."""
    make, src, dst = world
    (src / "same.bin").write_bytes(b"1" * 2000)
    daemon = make(limit=4096)  # auto_remirror_mode: checksum, which skips equal size and mtime
    running(daemon)
    converged(daemon)
    before = (src / "same.bin").stat()
    daemon.operations()["pause"].handler({})
    assert daemon.capture.emit(*create(src, "a.bin", os.urandom(3000)))
    (src / "same.bin").write_bytes(b"2" * 2000)
    os.utime(src / "same.bin", ns=(before.st_atime_ns, before.st_mtime_ns))
    assert not daemon.capture.emit(Write("same.bin", 0, b"2" * 2000))  # over the limit: lost
    daemon.operations()["resume"].handler({})
    status = converged(daemon)
    assert status["mirror_reason"].startswith("remirror after a gap") and status["mirror"]["mode"] == "checksum"
    assert (dst / "same.bin").read_bytes() == b"2" * 2000
    assert diff_trees(src, dst) == []


def test_restart_without_auto_remirror_stays_mirror_required_until_an_operator_mirrors(world):
    make, src, dst = world
    (src / "f").write_text("x\n")
    daemon = make(auto_remirror=False)
    daemon.start(restarted=True, mirror=None)
    supervised(daemon)
    wait_for(lambda: daemon.status()["target_data_state"] == "Mirror Required", what="Mirror Required")
    time.sleep(0.3)  # it does not mirror on its own
    status = daemon.status()
    assert status["state"] == "mirror required" and status["replication_status"] == "Pending"
    assert not (dst / "f").exists()
    assert daemon.operations()["mirror_start"].handler({"mode": "diff"}) == {"requested": "diff"}
    converged(daemon)
    assert diff_trees(src, dst) == []


def test_a_log_made_anew_while_stopped_is_remirrored_not_taken_as_applied(world, state_dir):
    """The log lost what the target applied (here: made anew) and offsets start again: the
    restart's gap and remirror must be applied, not skipped as already applied."""
    make, src, dst = world
    daemon = make()
    running(daemon)
    for n in range(20):
        assert daemon.capture.emit(*create(src, f"f{n}", b"first %d\n" % n))
    converged(daemon)
    daemon.shutdown()
    (src / "f3").write_bytes(b"changed while stopped\n")
    log_ = daemon.parts.log
    log_.drop_partition(daemon.conn.partition)
    log_.ensure_partition(daemon.conn.partition)
    again = make()
    again.start(restarted=True, mirror=MirrorMode.CHECKSUM)
    supervised(again)
    converged(again)
    assert diff_trees(src, dst) == []


def test_status_says_why_the_target_is_retrying(world):
    make, src, dst = world
    daemon = make(retry_delay_s=0.05)
    running(daemon)
    converged(daemon)
    subprocess.run(["chattr", "+i", str(dst)], check=True)  # even root may not create in it
    try:
        assert daemon.capture.emit(*create(src, "f", b"x\n"))
        status = wait_for(lambda: (s := daemon.status())["target_status"] == "Retrying" and s, 30, "Retrying")
        assert "Operation not permitted" in status["target_status_detail"]
        assert status_command._shown("target_status", status).startswith("Retrying: event ")
    finally:
        subprocess.run(["chattr", "-i", str(dst)], check=True)
    status = converged(daemon)
    assert status["target_status"] == "OK" and status["target_status_detail"] is None
    assert (dst / "f").read_bytes() == b"x\n"


def test_status_says_so_when_the_partition_is_removed_behind_the_daemon(world):
    make, src, dst = world
    daemon = make()
    running(daemon)
    converged(daemon)
    daemon.parts.log.drop_partition(daemon.conn.partition)  # a Kafka topic deleted, say
    status = daemon.status()  # was NotFound out of supervise's status tick, ending the daemon
    assert "partition not found" in status["log_unreachable"] and status["end_offset"] >= 0
    assert status["recovery_point_latency_ms"]["current"] is None
    assert daemon.shutdown()["state"] == "stopped"  # nothing is left to drain: it stops


def test_a_target_the_applier_marks_mirror_required_is_remirrored(world):
    make, src, dst = world
    (src / "f").write_text("x\n")
    daemon = make()
    running(daemon)
    converged(daemon)
    (src / "f").write_text("y\n")
    # An event the applier must refuse (it would leave the target): Mirror Required.
    assert daemon.capture.emit(Write("../outside", 0, b"y\n"))
    wait_for(lambda: daemon.status()["mirror_reason"] != "initial mirror", what="the remirror")
    status = converged(daemon)
    assert status["mirror_reason"].startswith("remirror:")
    assert diff_trees(src, dst) == []


def test_mirror_pause_resume_and_stop(world):
    make, src, dst = world
    for i in range(30):
        (src / f"f{i:02d}").write_bytes(os.urandom(20_000))
    daemon = make(limit=64 << 10, auto_remirror=False)  # a new target needs a mirror: the test starts it
    ops = daemon.operations()
    daemon.start(restarted=False, mirror=None)
    supervised(daemon)
    ops["pause"].handler({})  # the mirror fills its share of the queue and waits
    ops["mirror_start"].handler({"mode": "full"})
    wait_for(lambda: daemon.status()["mirror_status"] == "Mirroring", what="the mirror")
    assert ops["mirror_pause"].handler({}) == {"mirror_status": "Paused"}
    ops["resume"].handler({})
    wait_for(lambda: daemon.status()["mirror_status"] == "Paused", what="a paused mirror")
    with pytest.raises(UsageError):
        ops["mirror_start"].handler({})
    assert ops["mirror_resume"].handler({}) == {"mirror_status": "Mirroring"}
    converged(daemon)
    assert diff_trees(src, dst) == []
    ops["pause"].handler({})
    ops["mirror_start"].handler({"mode": "full"})
    wait_for(lambda: daemon.status()["mirror_status"] == "Mirroring", what="the second mirror")
    assert ops["mirror_stop"].handler({}) == {"mirror_status": "Idle"}
    ops["resume"].handler({})
    wait_for(lambda: daemon.status()["queued_ops"] == 0, what="the queue to drain")
    status = daemon.status()
    assert status["target_data_state"] == "Mirror Required" and status["mirror_status"] == "Idle"
    assert "stopped by an operator" in status["target_data_state_reason"]


@pytest.mark.parametrize("mode", ["bogus", 5, ["full"]])
def test_mirror_start_with_an_unknown_mode_is_a_usage_error(world, mode):
    make, src, dst = world
    daemon = make()
    running(daemon)
    converged(daemon)
    with pytest.raises(UsageError, match="mirror mode"):
        daemon.operations()["mirror_start"].handler({"mode": mode})
    assert daemon.status()["state"] == "replicating"


def test_a_mirror_the_shutdown_stops_leaves_the_target_mirror_required_not_mirroring(world):
    make, src, dst = world
    for i in range(200):
        (src / f"f{i:03d}").write_bytes(os.urandom(100_000))
    daemon = make(limit=64 << 10)
    ops = daemon.operations()
    ops["pause"].handler({})  # the mirror fills its share of the queue and waits
    running(daemon)
    wait_for(lambda: daemon.status()["mirror_status"] == "Mirroring", what="the mirror")
    ops["resume"].handler({})
    final = daemon.shutdown()
    assert final["queued_ops"] == 0 and final["mirror"]["sent_objects"] < 200
    assert final["target_data_state"] == "Mirror Required"
    assert Progress.read_snapshot(daemon.parts.progress.state_dir)["target_data_state"] == "Mirror Required"


def test_task_operation(world):
    make, src, dst = world
    daemon = make()
    running(daemon)
    task = daemon.operations()["task"].handler
    with pytest.raises(UsageError):
        task({"name": "t"})
    with pytest.raises(UsageError):
        task({"name": "t", "argv": "not a list"})
    answer = task({"name": "t", "argv": ["sh", "-c", "echo hi; exit 4"], "wait": True})
    assert answer["result"]["exit_status"] == 4 and answer["result"]["output"] == "hi\n"
    found = find_task_result(daemon.queue.log(), "conn-1", answer["task_id"], answer["offset"])
    assert found is not None and found.exit_status == 4


@pytest.mark.parametrize("name, argv", [("t", ["ls", "\udcff"]), ("\ud800", ["true"])])
def test_a_task_that_is_not_utf8_text_is_refused_before_anything_is_appended(world, name, argv):
    make, src, dst = world
    daemon = make()
    running(daemon)
    end = daemon.queue.log().end_offset("conn-1")
    with pytest.raises(UsageError, match="UTF-8"):
        daemon.operations()["task"].handler({"name": name, "argv": argv})
    assert daemon.queue.log().end_offset("conn-1") == end


@pytest.mark.parametrize("timeout_s", [10**23, -1, MAX_TASK_TIMEOUT_S + 1, 1.5, True, "60", None])
def test_a_task_timeout_out_of_range_is_refused_before_anything_is_appended(world, timeout_s):
    make, src, dst = world
    daemon = make()
    running(daemon)
    end = daemon.queue.log().end_offset("conn-1")
    with pytest.raises(UsageError, match="task timeout"):
        daemon.operations()["task"].handler({"name": "t", "argv": ["true"], "timeout_s": timeout_s})
    assert daemon.queue.log().end_offset("conn-1") == end


def test_a_task_timeout_of_0_means_no_limit(world):
    make, src, dst = world
    daemon = make()
    running(daemon)
    answer = daemon.operations()["task"].handler({"name": "t", "argv": ["true"], "timeout_s": 0})
    (record,) = daemon.queue.log().read("conn-1", answer["offset"], max_records=1)
    assert decode(record.value).op.timeout_s == 0


def test_one_daemon_per_source(tmp_path):
    first = DaemonLock(tmp_path, "/data")
    first.acquire(socket="/x.sock")
    assert running_daemons(tmp_path) == [{"pid": os.getpid(), "source": "/data", "socket": "/x.sock"}]
    with pytest.raises(AlreadyRunning) as refused:
        DaemonLock(tmp_path, "/data").acquire()
    assert str(os.getpid()) in refused.value.message
    DaemonLock(tmp_path, "/other").acquire()  # another source: another lock
    first.release()
    assert DaemonLock(tmp_path, "/data").holder() is None


def test_snapshot_take_holds_the_applied_offset_and_keeps_an_operator_pause(world):
    make, src, dst = world
    (src / "old.txt").write_text("before\n")
    daemon = make()
    ops = daemon.operations()
    running(daemon)
    applied = converged(daemon)["applied_offset"]
    ops["pause"].handler({})
    assert daemon.capture.emit(*create(src, "queued.txt", b"queued while paused\n"))
    snap = ops["snapshot_take"].handler({})
    assert (snap["offset"], snap["reason"], snap["data_state"]) == (applied, "manual", "OK")
    assert diff_trees(snap["folder"] + "/tree", dst) == [] and not (dst / "queued.txt").exists()
    status = daemon.status()  # the operator's pause outlives the snapshot
    assert status["transmit_mode"] == "Paused" and status["target_status"] == "Paused" and status["queued_ops"] > 0
    with pytest.raises(UsageError):
        ops["snapshot_take"].handler({"kind": "zfs"})
    ops["resume"].handler({})
    converged(daemon)
    assert (dst / "queued.txt").read_bytes() == b"queued while paused\n"
    second = ops["snapshot_take"].handler({"kind": "linktree"})
    assert second["offset"] > snap["offset"] and second["kind"] == "linktree"
    assert daemon.capture.emit(*create(src, "after.txt", b"the applier resumed\n"))
    converged(daemon)  # it resumed after the snapshot: nobody paused the target
    assert (dst / "after.txt").read_bytes() == b"the applier resumed\n"
    assert [s.id for s in list_snapshots(make.snapshots_dir)] == [snap["id"], second["id"]]
    daemon.shutdown()
    with pytest.raises(BackendUnavailable):
        ops["snapshot_take"].handler({})


def test_scheduled_snapshots_are_taken_on_their_interval_and_pruned(world):
    make, src, dst = world
    (src / "f").write_text("x\n")
    daemon = make(snapshot_interval_s=1, snapshot_max_count=2)
    running(daemon)
    seen: set[str] = set()

    def three_taken():
        listed = list_snapshots(make.snapshots_dir)
        seen.update(s.id for s in listed)
        return listed if len(seen) >= 3 else None

    listed = wait_for(three_taken, 60, "three scheduled snapshots")
    assert len(listed) <= 2 and {s.reason for s in listed} <= {"scheduled", "deferred"}
    newest = listed[-1]
    assert newest.data_state == "OK" and (newest.tree / "f").read_text() == "x\n"
    assert daemon.capture.emit(*create(src, "g", b"applied between snapshots\n"))
    converged(daemon)  # every snapshot resumed the applier
    assert (dst / "g").read_bytes() == b"applied between snapshots\n"


def test_the_history_window_is_enforced_on_the_log(world, monkeypatch):
    import datatether.engine.daemon as daemon_module
    monkeypatch.setattr(daemon_module, "RETENTION_CHECK_S", 0.2)
    make, src, dst = world
    daemon = make(history_window_s=0)
    running(daemon)
    converged(daemon)
    for i in range(5):
        assert daemon.capture.emit(*create(src, f"f{i}", b"x" * 100))
    converged(daemon)
    log_, part = daemon.parts.log, daemon.conn.partition
    # Everything is applied and outside a zero window: retention moves the start, but
    # only up to what every consumer has committed.
    wait_for(lambda: log_.start_offset(part) > 0, 30, "retention to drop applied events")
    consumed = min(log_.consumers(part).values())
    assert log_.start_offset(part) <= consumed + 1
    daemon.shutdown()
