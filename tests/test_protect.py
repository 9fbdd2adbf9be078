"""`dt protect`, `dt status`, `dt unprotect` end to end: real FUSE mounts, real processes.

Each test starts the real command in a subprocess over a source in tmp_path, changes the
source through the mount (the capture) or behind it (while stopped), and compares the
target with the source byte for byte and attribute by attribute (tests/trees.py).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from datatether.apply.restore import restore
from datatether.engine.history import Point
from datatether.engine.log_embedded import EmbeddedLog
from datatether.engine.settings import Settings
from tests.daemon_helpers import DT, REPO, Protected, dt, make_tree, wait_for, workload
from tests.history_helpers import tree_state
from tests.trees import diff_trees

pytestmark = pytest.mark.fuse


@pytest.fixture
def dirs(tmp_path, fuse_available):
    src, dst, state = tmp_path / "src", tmp_path / "dst", tmp_path / "state"
    src.mkdir()
    state.mkdir()
    # What is deleted while no daemon runs is an orphan on the target after the remirror.
    (state / "config.toml").write_text('orphans_action = "delete"\n')
    return src, dst, state


@pytest.fixture
def real(dirs):
    """The source directory itself, beneath any capture mount (opened before one exists):
    comparisons read the files themselves, and a test can change them behind the capture."""
    fd = os.open(dirs[0], os.O_PATH | os.O_DIRECTORY)
    yield f"/proc/self/fd/{fd}/."
    os.close(fd)


@pytest.fixture
def protected(dirs):
    daemons: list[Protected] = []

    def start(*extra: str) -> Protected:
        daemon = Protected(*dirs, *extra)
        daemons.append(daemon)
        return daemon.start()

    yield start
    for daemon in daemons:
        daemon.close()


def same(src, dst, *, mtimes: bool = True) -> list[str]:
    """Differences between source and target. ``mtimes=False`` leaves modification times
    out: live replication does not carry them yet (a captured Write has no mtime and the
    times of parent directories are not sent, capture/fuse.py), so after live changes only
    a mirror makes them equal."""
    found = diff_trees(src, dst)
    return found if mtimes else [line for line in found if ": mtime " not in line]


def test_initial_mirror_with_live_changes_then_clean_stop(dirs, real, protected):
    src, dst, state = dirs
    make_tree(src, files=40, big=24 << 20)
    daemon = protected()
    # Changes while the initial mirror runs: they must reach the target too.
    during = workload(src, seed=1, ops=150)
    daemon.converged()
    assert same(real, dst, mtimes=False) == []
    after = workload(src, seed=2, ops=150)
    assert during["done"] > 100 and after["done"] > 100
    daemon.converged()
    assert same(real, dst, mtimes=False) == []
    started = [line for line in daemon.err.read_text().splitlines() if "DT-D029" in line]
    assert "mode=full" in started[0] and "reason='initial mirror'" in started[0]
    assert daemon.stop() == 0
    assert same(real, dst, mtimes=False) == []
    assert os.stat(src).st_dev == os.stat(src.parent).st_dev  # unmounted
    assert "stopped: applied offset" in daemon.out.read_text()


def test_restart_resumes_and_remirrors_what_changed_while_stopped(dirs, real, protected):
    src, dst, state = dirs
    make_tree(src, files=10)
    daemon = protected()
    daemon.converged()
    first = daemon.status()
    assert daemon.stop() == 0
    # Not captured: nobody protects the directory now.
    workload(src, seed=3, ops=80)
    (src / "made-while-stopped.txt").write_text("made while stopped\n")
    assert same(real, dst) != []
    again = protected()
    status = again.converged()
    assert same(real, dst) == []
    assert (status["connection"], status["partition"]) == (first["connection"], first["partition"])
    assert status["mirror_reason"] == "remirror after a restart"
    assert status["mirror"]["mode"] == "checksum"  # settings.auto_remirror_mode
    assert status["applied_offset"] > first["applied_offset"]
    assert "changes made while stopped are repaired by a checksum remirror" in again.out.read_text()
    listed = json.loads(dt("status", "--json", state=state, check=True).stdout)["connections"]
    assert len(listed) == 1


def test_a_change_made_while_stopped_that_keeps_size_and_mtime_is_repaired_by_the_restart(dirs, real, protected):
    """The restart's checksum remirror would skip a file of unchanged size and mtime; one
    whose ctime says it changed after the last record in the log is compared anyway."""
    src, dst, state = dirs
    (src / "same.bin").write_bytes(b"1" * 5000)
    daemon = protected()
    daemon.converged()
    assert daemon.stop() == 0
    before = (src / "same.bin").stat()
    (src / "same.bin").write_bytes(b"2" * 5000)
    os.utime(src / "same.bin", ns=(before.st_atime_ns, before.st_mtime_ns))
    again = protected()
    status = again.converged()
    assert status["mirror_reason"] == "remirror after a restart" and status["mirror"]["mode"] == "checksum"
    assert (dst / "same.bin").read_bytes() == b"2" * 5000
    assert same(real, dst) == []


def test_a_chown_through_the_capture_leaves_the_target_with_the_sources_mode(dirs, real, protected):
    """A chown clears set-id bits, even one that keeps the owner; the target's own chown
    may be skipped (same owner) or clear more, so the captured event carries the mode."""
    src, dst, state = dirs
    for name in ("same-owner", "new-owner"):
        (src / name).write_text("#!/bin/sh\n")
        os.chmod(src / name, 0o6755)
    daemon = protected()
    daemon.converged()
    assert os.stat(dst / "same-owner").st_mode & 0o7777 == 0o6755
    os.chown(src / "same-owner", 0, 0)
    os.chown(src / "new-owner", 4321, 4321)
    os.chmod(src / "new-owner", 0o4755)
    daemon.converged()
    assert os.stat(src / "same-owner").st_mode & 0o7777 == 0o755  # the kernel's rule
    assert {n: os.stat(dst / n).st_mode & 0o7777 for n in ("same-owner", "new-owner")} == {
        "same-owner": 0o755, "new-owner": 0o4755}
    assert same(real, dst, mtimes=False) == []


def test_rules_saved_while_running_take_over_at_once(dirs, real, protected):
    """A new generation of the set is in force for the running daemon: what it excludes
    is no longer captured, and what it takes in is mirrored (a difference mirror)."""
    src, dst, state = dirs
    (src / "cache").mkdir()
    (src / "logs").mkdir()
    (src / "logs" / "old.log").write_text("there before\n")
    daemon = protected()
    status = daemon.converged()
    name = status["replication_set"]
    dt("set", "add-rule", name, str(src / "logs"), "--exclude", "--state", str(state), check=True)
    wait_for(lambda: "DT-D067" in daemon.err.read_text(), what="the daemon taking the new rules")
    (src / "logs" / "new.log").write_text("not replicated now\n")
    (src / "cache" / "c1").write_text("replicated\n")
    daemon.converged()
    assert (dst / "cache" / "c1").read_text() == "replicated\n"
    assert not (dst / "logs" / "new.log").exists()
    dt("set", "remove-rule", name, str(src / "logs"), "--state", str(state), check=True)
    wait_for(lambda: (dst / "logs" / "new.log").exists(), what="the difference mirror of what came in")
    daemon.converged()
    assert same(real, dst, mtimes=False) == []


def test_status_fields_while_running_and_when_stopped(dirs, protected):
    src, dst, state = dirs
    make_tree(src, files=5)
    daemon = protected()
    daemon.converged()
    (src / "last.txt").write_text("the last file touched\n")
    wait_for(lambda: daemon.status()["last_file"] == "last.txt", what="last file")
    live = json.loads(dt("status", "--json", state=state, check=True).stdout)["connections"][0]
    for key in ("state", "mirror_status", "replication_status", "transmit_mode", "target_data_state",
                "queued_bytes", "queued_ops", "sent_bytes", "applied_offset", "end_offset",
                "recovery_point_latency_ms", "last_file"):
        assert key in live, key
    assert live["replication_status"] in ("Ready", "Replicating") and live["transmit_mode"] == "Started"
    assert live["daemon"] == "running" and live["pid"] == daemon.proc.pid
    assert live["sent_bytes"] > 0 and 0 <= live["applied_offset"] < live["end_offset"]
    latency = live["recovery_point_latency_ms"]
    assert latency["samples"] > 0 and 0 <= latency["p50"] <= latency["p99"]
    human = dt("status", state=state, check=True).stdout
    assert "replication status" in human and "recovery point latency ms" in human

    assert daemon.stop() == 0
    saved = daemon.saved_status()
    assert saved["replication_status"] == "Stopped" and saved["daemon"] == "stopped"
    assert saved["applied_offset"] == saved["end_offset"] - 1 and saved["queued_ops"] == 0
    assert saved["target_data_state"] == "OK" and saved["last_file"] == "last.txt"
    assert saved["recovery_point_latency_ms"]["current"] == 0.0


def test_paused_target_queues_and_resume_applies(dirs, real, protected):
    src, dst, state = dirs
    daemon = protected()
    daemon.converged()
    assert daemon.call("pause") == {"transmit_mode": "Paused"}
    (src / "queued.bin").write_bytes(os.urandom(50_000))
    status = daemon.status()
    assert status["transmit_mode"] == "Paused" and status["queued_ops"] >= 2
    assert status["queued_bytes"] >= 50_000 and not (dst / "queued.bin").exists()
    assert status["recovery_point_latency_ms"]["current"] > 0
    daemon.call("resume")
    daemon.converged()
    assert same(real, dst, mtimes=False) == []


def test_queue_overflow_marks_mirror_required_and_remirrors(dirs, real, protected):
    src, dst, state = dirs
    make_tree(src, files=5)
    daemon = protected("--queue-limit-bytes", str(256 << 10))
    daemon.converged()
    daemon.call("pause")  # nothing drains: the queue must overflow
    for i in range(6):
        (src / f"burst{i}.bin").write_bytes(os.urandom(100_000))
    status = daemon.status()
    assert status["queue_overflow"] and "queue limit" in status["queue_overflow"]
    assert status["target_data_state"] == "Mirror Required" and status["replication_status"] == "Pending"
    assert status["queued_bytes"] <= 256 << 10
    daemon.call("resume")
    status = daemon.converged()
    assert status["mirror_reason"].startswith("remirror after a gap")
    assert status["queue_overflow"] is None
    assert same(real, dst) == []
    assert "DT-D026" in daemon.err.read_text()  # the gap is logged, never silent


def test_a_mirror_waiting_for_room_does_not_hold_up_writes_to_its_file(dirs, real, protected):
    # The mirror reads a chunk and appends it under the file's path lock (so a captured
    # write cannot slip in between). It used to wait for room in the queue with that lock
    # held: while the target was paused, a write to the file it was on hung until resume.
    src, dst, state = dirs
    daemon = protected("--queue-limit-bytes", str(16 << 20))
    daemon.converged()
    daemon.call("pause")
    (Path(real) / "big.bin").write_bytes(os.urandom(32 << 20))  # behind the capture: no events
    daemon.call("mirror_start", {"mode": "full"})
    wait_for(lambda: (lambda s: s["mirror_status"] == "Mirroring" and s["queued_bytes"] >= 4 << 20
                      and s["mirror"]["processed_bytes"] >= 4 << 20)(daemon.status()),
             what="the mirror in big.bin, waiting for room")
    done = threading.Event()

    def write():
        with open(src / "big.bin", "r+b") as f:
            f.seek(1 << 20)
            f.write(b"written while the mirror waits")
        done.set()

    threading.Thread(target=write, daemon=True).start()
    assert done.wait(10), "a write to the file being mirrored waited for the paused target"
    daemon.call("resume")
    daemon.converged()
    assert same(real, dst) == []


def test_unprotect_stops_the_daemon_and_keeps_the_target(dirs, real, protected):
    src, dst, state = dirs
    make_tree(src, files=3)
    daemon = protected()
    daemon.converged()
    (src / "late.txt").write_text("captured just before unprotect\n")
    done = dt("unprotect", str(src), state=state, check=True)
    assert daemon.proc.wait(60) == 0
    assert "is kept" in done.stdout
    assert (dst / "late.txt").read_text() == "captured just before unprotect\n"
    assert same(real, dst, mtimes=False) == []
    assert json.loads(dt("status", "--json", state=state, check=True).stdout)["connections"] == []


def test_unprotect_says_why_it_waits_while_the_target_keeps_failing(dirs, real, protected):
    src, dst, state = dirs
    (state / "config.toml").write_text("retry_delay_s = 0.2\n")
    daemon = protected()
    daemon.converged()
    subprocess.run(["chattr", "+i", str(dst)], check=True)  # even root may not create in it
    try:
        (src / "held.txt").write_text("waits for the target\n")
        wait_for(lambda: daemon.status()["target_status"] == "Retrying", 30, "Retrying")
        unprotect = subprocess.Popen([*DT, "unprotect", str(src), "--state", str(state)], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        readable, _, _ = select.select([unprotect.stderr], [], [], 30)  # the first note: after WAIT_NOTE_S
        assert readable, "dt unprotect waited without saying why"
        note = unprotect.stderr.readline()
        assert re.match(r"dt unprotect: waiting for the daemon to apply [1-9]\d* queued operations", note), note
        assert "the target keeps failing: event" in note and "Operation not permitted" in note
    finally:
        subprocess.run(["chattr", "-i", str(dst)], check=True)
    assert unprotect.wait(60) == 0 and daemon.proc.wait(60) == 0
    assert (dst / "held.txt").read_text() == "waits for the target\n"


def test_bad_input_is_refused_with_exit_2(dirs, protected, tmp_path):
    src, dst, state = dirs
    missing = dt("protect", str(tmp_path / "absent"), "--to", str(dst), state=state)
    assert missing.returncode == 2 and "not found" in missing.stderr
    inside = dt("protect", str(src), "--to", str(src / "replica"), state=state)
    assert inside.returncode == 2 and "inside the source" in inside.stderr
    assert not (src / "replica").exists()
    (tmp_path / "file").write_text("x")
    not_dir = dt("protect", str(src), "--to", str(tmp_path / "file"), state=state)
    assert not_dir.returncode == 2 and "exists and is not a directory" in not_dir.stderr
    state_inside = dt("protect", str(src), "--to", str(dst), state=src / ".dt")
    assert state_inside.returncode == 2 and "state directory" in state_inside.stderr
    protected()
    second = dt("protect", str(src), "--to", str(tmp_path / "other"), state=state)
    assert second.returncode == 2 and "already running" in second.stderr
    other_src = tmp_path / "src2"
    other_src.mkdir()
    same_state = dt("protect", str(other_src), "--to", str(tmp_path / "dst2"), state=state)
    assert same_state.returncode == 2 and "own --state" in same_state.stderr
    no_daemon = dt("task", "t", "--connection", "nope", "--", "true", state=state)
    assert no_daemon.returncode == 2


def test_a_name_taken_by_another_pair_is_refused_before_anything_is_created(dirs, tmp_path):
    src, dst, state = dirs
    (src / "a").write_text("a\n")
    dt("mirror", str(src), str(dst), state=state, check=True)
    (name,) = [c["connection"] for c in json.loads(dt("status", "--json", state=state, check=True).stdout)["connections"]]
    taken = dt("protect", str(src), "--to", str(tmp_path / "elsewhere"), "--name", name, state=state)
    assert taken.returncode == 2 and "choose another --name" in taken.stderr
    assert not (tmp_path / "elsewhere").exists()


def test_live_changes_race_the_mirror_from_several_threads(dirs, real, protected):
    src, dst, state = dirs
    make_tree(src, files=60, big=16 << 20)
    daemon = protected()
    results: list[dict] = []
    threads = [threading.Thread(target=lambda s=seed: results.append(workload(src / f"w{s}", s, 100)))
               for seed in range(3)]
    for seed in range(3):
        (src / f"w{seed}").mkdir()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r["failed"] < 10 for r in results)
    daemon.converged()
    assert same(real, dst, mtimes=False) == []


def test_sigint_with_a_paused_target_keeps_the_queue_for_the_next_start(dirs, real, protected):
    src, dst, state = dirs
    daemon = protected()
    daemon.converged()
    daemon.call("pause")
    (src / "queued.txt").write_text("captured while the target was paused\n")
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.proc.wait(120) == 0
    assert "DT-D023" in daemon.err.read_text()  # not drained: the target was paused
    saved = daemon.saved_status()
    assert saved["queued_ops"] >= 2 and saved["recovery_point_latency_ms"]["current"] > 0
    assert not (dst / "queued.txt").exists()
    again = protected()
    again.converged()
    assert (dst / "queued.txt").read_text() == "captured while the target was paused\n"
    assert same(real, dst) == []


def test_snapshot_through_the_daemon_holds_its_offset_and_restores_exactly(dirs, real, protected, tmp_path):
    src, dst, state = dirs
    make_tree(src, files=10)
    daemon = protected()
    first = daemon.converged()
    name, partition = first["connection"], first["partition"]
    taking = threading.Event()

    def changes():  # they keep arriving while the snapshot is taken
        seed = 100
        while not taking.is_set():
            workload(src, seed, 20)
            seed += 1

    busy = threading.Thread(target=changes)
    busy.start()
    try:
        snap = json.loads(dt("snapshot", "take", name, "--json", "--state", str(state), check=True).stdout)[0]
    finally:
        taking.set()
        busy.join()
    assert snap["reason"] == "manual" and snap["data_state"] == "OK"
    taken = tree_state(snap["folder"] + "/tree")
    workload(src, seed=5, ops=100)
    daemon.converged()
    assert same(real, dst, mtimes=False) == []
    assert daemon.stop() == 0
    restored = tmp_path / "restored"
    dt("restore", name, "--at", str(snap["offset"]), "--into", str(restored), state=state, check=True)
    assert diff_trees(snap["folder"] + "/tree", restored) == []
    assert tree_state(restored) == taken
    # The snapshot is the state at its offset: a replay of the log alone up to there agrees.
    settings = Settings.load(state)
    with EmbeddedLog(state / "log") as log:
        replayed = tmp_path / "replayed"
        restore(log, partition, Point(offset=snap["offset"]), replayed, snapshots_dir=tmp_path / "no-snapshots",
                source_root=str(src), target_root=str(dst), settings=settings)
    assert tree_state(replayed, times=False) == tree_state(restored, times=False)


def test_scheduled_snapshots_appear_and_are_pruned(dirs, protected):
    src, dst, state = dirs
    with open(state / "config.toml", "a") as config:
        config.write("snapshot_interval_s = 1\nsnapshot_max_count = 2\n")
    make_tree(src, files=3)
    daemon = protected()
    daemon.converged()
    wait_for(lambda: daemon.err.read_text().count("DT-H001") >= 3, 60, "three scheduled snapshots")
    listed = json.loads(dt("snapshot", "list", daemon.status()["connection"], "--json", "--state", str(state),
                           check=True).stdout)
    assert 1 <= len(listed) <= 2 and {s["reason"] for s in listed} <= {"scheduled", "deferred"}
    (src / "after.txt").write_text("applied: the snapshots resumed the applier\n")
    daemon.converged()
    assert (dst / "after.txt").exists()
    assert daemon.stop() == 0


@pytest.mark.parametrize("interval", ["0", "-1", "nan", "inf"])
def test_a_status_interval_that_is_not_a_positive_number_is_refused(dirs, interval):
    src, dst, state = dirs
    refused = dt("protect", str(src), "--to", str(dst), "--status-interval", interval, state=state)
    assert refused.returncode == 2 and "[DT-E001]" in refused.stderr and "--status-interval" in refused.stderr
    assert not dst.exists() and os.stat(src).st_dev == os.stat(src.parent).st_dev  # nothing made, nothing mounted


def _recorded(state) -> tuple[list, list]:
    """(connection names, set names) of a state directory."""
    conns = json.loads(dt("status", "--json", state=state, check=True).stdout)["connections"]
    sets = json.loads(dt("set", "list", "--json", "--state", str(state), check=True).stdout)
    return [c["connection"] for c in conns], [s["name"] for s in sets]


def test_a_refused_protect_creates_nothing(dirs, tmp_path):
    src, dst, state = dirs
    (src / "a").write_text("a\n")
    dt("mirror", str(src), str(dst), state=state, check=True)
    before = _recorded(state)
    overlap = dt("protect", str(src), "--to", str(tmp_path / "t1"), state=state)
    assert overlap.returncode == 2 and "[DT-E011]" in overlap.stderr
    dt("set", "create", "elsewhere", "--include", str(tmp_path / "other"), "--state", str(state), check=True)
    before = before[0], sorted(before[1] + ["elsewhere"])
    wrong_root = dt("protect", str(src), "--to", str(tmp_path / "t2"), "--name", "elsewhere", state=state)
    assert wrong_root.returncode == 2 and "has its root at" in wrong_root.stderr
    src2 = tmp_path / "src2"
    src2.mkdir()
    taken_target = dt("protect", str(src2), "--to", str(dst), state=state)
    assert taken_target.returncode == 2 and "already sends to" in taken_target.stderr
    assert _recorded(state) == before
    assert not (tmp_path / "t1").exists() and not (tmp_path / "t2").exists()


def test_a_protect_whose_mount_is_refused_undoes_what_it_made(dirs, protected, tmp_path):
    src, dst, state = dirs
    protected()  # another state directory's capture is mounted on SOURCE
    other_state, target = tmp_path / "state5", tmp_path / "new" / "t5"
    refused = dt("protect", str(src), "--to", str(target), state=other_state)
    assert refused.returncode == 2 and "[DT-E019]" in refused.stderr and "already mounted" in refused.stderr
    assert _recorded(other_state) == ([], [])
    assert not (tmp_path / "new").exists()
    assert list((other_state / "targets").iterdir()) == []
    with EmbeddedLog.open_readonly(other_state / "log") as log_:
        assert log_.partitions() == []
    src2 = tmp_path / "src2"
    src2.mkdir()
    dt("mirror", str(src2), str(target), state=other_state, check=True)  # the target is free
