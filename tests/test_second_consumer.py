"""One stream, several targets: independent appliers with their own applied and consumer
offsets (dt apply), on the embedded and the Kafka backend."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
from history_helpers import SECOND, T0, StreamWorld, backends, create, dt, files, reap

from datatether.apply.applier import Applier
from datatether.apply.progress import Progress
from datatether.engine import events as ev
from datatether.engine.log_view import LogView
from datatether.engine.retention import consumed_end
from datatether.engine.settings import Settings
from datatether.tools import runtime


@pytest.fixture
def world(tmp_path, backend, request):
    w = StreamWorld(tmp_path, backend, request)
    yield w
    w.close()


def workload(world, start: int, count: int) -> dict:
    """Append ``count`` file versions; return the expected tree."""
    expected = {"d": None}
    if start == 0:
        world.append(create("d", ev.FileKind.DIR), T0)
    for n in range(start, start + count):
        name = f"d/f{n % 4}"
        world.append(create(name), T0 + n * SECOND)
        world.append(ev.Write(name, 0, b"v%d " % n * 50), T0 + n * SECOND)
    for n in range(max(0, start + count - 4), start + count):
        expected[f"d/f{n % 4}"] = b"v%d " % n * 50
    return expected


def apply_all(log, partition, target, state_dir, consumer):
    progress = Progress(state_dir)
    applier = Applier(LogView(log), partition, target, "/src", progress, Settings(), consumer=consumer)
    try:
        while applier.run_once():
            pass
        applier.checkpoint()  # commits the consumer offset now rather than a second later
        return applier.applied_offset
    finally:
        applier.close()
        progress.close()


@backends()
def test_two_appliers_one_stream_own_offsets(world, tmp_path):
    expected = workload(world, 0, 10)
    end = world.log.end_offset(world.partition)
    first = apply_all(world.log, world.partition, tmp_path / "t1", tmp_path / "p1", "applier")
    # The second target reads through its own client, as another process would.
    other = runtime.open_log(world.state, Settings.load(world.state)) if world.backend == "kafka" else world.log
    try:
        second = apply_all(other, world.partition, tmp_path / "t2", tmp_path / "p2", "second")
        assert first == second == end - 1
        assert files(tmp_path / "t1") == files(tmp_path / "t2") == expected
        assert world.log.consumers(world.partition) == {"applier": end - 1, "second": end - 1}
        # More events: only the first target applies them; the second one's lag is kept.
        expected = workload(world, 10, 3)
        first = apply_all(world.log, world.partition, tmp_path / "t1", tmp_path / "p1", "applier")
        assert files(tmp_path / "t1") == expected and files(tmp_path / "t2") != expected
        assert consumed_end(world.log, world.partition) == end
        second = apply_all(other, world.partition, tmp_path / "t2", tmp_path / "p2", "second")
        assert first == second and files(tmp_path / "t2") == expected
        assert world.log.end_offset(world.partition) == first + 1  # nobody appended anything
    finally:
        if other is not world.log:
            other.close()


@backends()
def test_dt_apply_catches_up_and_resumes(world, tmp_path):
    expected = workload(world, 0, 6)
    to = tmp_path / "second"
    if world.backend == "embedded":
        world.log.close()  # no daemon: dt apply may open the log for writing
    done = json.loads(dt("apply", "web", "--to", to, "--consumer", "dr-site", "--json", state=world.state).stdout)
    assert done["applied_offset"] == done["end_offset"] - 1 and done["target_data_state"] == "OK"
    assert files(to) == expected
    if world.backend == "embedded":
        world.log = runtime.open_log(world.state, Settings.load(world.state))
    assert world.log.consumers(world.partition)["dr-site"] == done["applied_offset"]
    expected = workload(world, 6, 5)
    again = json.loads(dt("apply", "web", "--to", to, "--consumer", "dr-site", "--json", state=world.state).stdout)
    assert again["applied_offset"] == world.log.end_offset(world.partition) - 1
    assert files(to) == expected


def test_dt_apply_beside_a_daemon_holding_the_embedded_log(tmp_path):
    world = StreamWorld(tmp_path, "embedded")
    try:
        expected = workload(world, 0, 3)
        done = dt("apply", "web", "--to", tmp_path / "second", "--consumer", "dr", "--json", state=world.state)
        assert files(tmp_path / "second") == expected
        assert json.loads(done.stdout)["target_data_state"] == "OK"
        assert "consumer offset not recorded" in done.stderr  # read-only beside the writer
        assert "dr" not in world.log.consumers(world.partition)
    finally:
        world.close()


@backends()
def test_dt_apply_follow_until_interrupted(world, tmp_path):
    workload(world, 0, 2)
    to = tmp_path / "second"
    proc = subprocess.Popen([sys.executable, "-m", "datatether.tools.cli", "apply", "web", "--to", str(to),
                             "--consumer", "live", "--follow", "--json", "--state", str(world.state)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        expected = workload(world, 2, 6)
        deadline = time.monotonic() + 60
        while files(to) != expected if to.exists() else True:
            assert time.monotonic() < deadline, "the follower did not apply the new events"
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        reap(proc)
    assert proc.returncode == 0, err
    assert json.loads(out)["applied_offset"] == world.log.end_offset(world.partition) - 1


def test_a_follower_started_first_leaves_the_embedded_log_to_the_daemon(tmp_path):
    """dt apply --follow runs for days; the connection's daemon (dt protect, dt mirror) must
    still be able to start, and to restart, beside it: the embedded log has one writer."""
    world = StreamWorld(tmp_path, "embedded")
    workload(world, 0, 2)
    world.log.close()  # no daemon yet
    to = tmp_path / "second"
    proc = subprocess.Popen([sys.executable, "-m", "datatether.tools.cli", "apply", "web", "--to", str(to),
                             "--consumer", "dr", "--follow", "--state", str(world.state)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (to / "d").exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        world.log = runtime.open_log(world.state, Settings.load(world.state))  # the daemon starts
        expected = workload(world, 2, 3)
        while files(to) != expected:
            assert time.monotonic() < deadline and proc.poll() is None, "the follower stopped following"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        reap(proc)
        world.close()


def test_task_commands_run_only_when_asked_and_add_nothing_to_the_stream(tmp_path):
    world = StreamWorld(tmp_path, "embedded")
    try:
        marker = tmp_path / "ran"
        world.append(create("f"), T0)
        world.append(ev.TaskCommand("t1", "mark", ["touch", str(marker)]), T0 + SECOND)
        end = world.log.end_offset(world.partition)
        dt("apply", "web", "--to", tmp_path / "a", "--consumer", "a", state=world.state)
        assert not marker.exists()
        dt("apply", "web", "--to", tmp_path / "b", "--consumer", "b", "--run-tasks", state=world.state)
        assert marker.exists()
        assert world.log.end_offset(world.partition) == end
    finally:
        world.close()


def test_bad_inputs(tmp_path):
    world = StreamWorld(tmp_path, "embedded")
    try:
        workload(world, 0, 1)
        dt("apply", "web", "--to", tmp_path / "a", "--consumer", "a", state=world.state)
        cases = [
            (("apply", "web", "--to", tmp_path / "b", "--consumer", "a"), "feeds"),
            (("apply", "web", "--to", world.target, "--consumer", "x"), "overlaps the target"),
            (("apply", "web", "--to", world.source / "sub", "--consumer", "x"), "the source"),
            (("apply", "web", "--to", world.state, "--consumer", "x"), "the state directory"),
            (("apply", "web", "--to", world.state / "replica", "--consumer", "x"), "the state directory"),
            (("apply", "web", "--to", tmp_path / "target.dt-snapshots" / "r", "--consumer", "x"), "the snapshots"),
            (("apply", "web", "--to", tmp_path / "c", "--consumer", "applier"), "reserved"),
            (("apply", "web", "--to", tmp_path / "c", "--consumer", "no/slash"), "invalid name"),
            (("apply", "web", "--to", tmp_path / "c", "--consumer", "."), "invalid name"),  # not a folder of its own
            (("apply", "web", "--to", tmp_path / "c", "--consumer", ".."), "invalid name"),
            (("apply", "ghost", "--to", tmp_path / "c", "--consumer", "x"), "connection not found"),
        ]
        for argv, message in cases:
            done = dt(*argv, state=world.state, check=False)
            assert done.returncode == 2 and message in done.stderr, (argv, done.stderr)
        assert not (world.state / "d").exists() and not (world.state / "replica").exists()
        assert not (tmp_path / "c").exists()
        assert not (tmp_path / "target.dt-snapshots").exists()
    finally:
        world.close()


def test_threads_of_one_process_share_a_stream(tmp_path):
    """Two appliers following one embedded log in one process (as one daemon feeding two
    local targets would), while events are appended."""
    world = StreamWorld(tmp_path, "embedded")
    stop = threading.Event()
    try:
        appliers = []
        for name in ("one", "two"):
            progress = Progress(tmp_path / f"p-{name}")
            appliers.append((Applier(LogView(world.log), world.partition, tmp_path / name, "/src", progress,
                                     Settings(), consumer=name), progress))
        threads = [threading.Thread(target=a.run, args=(stop,)) for a, _ in appliers]
        for t in threads:
            t.start()
        expected = workload(world, 0, 20)
        last = world.log.end_offset(world.partition) - 1
        deadline = time.monotonic() + 60
        while any(a.applied_offset < last for a, _ in appliers):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
        for a, p in appliers:
            a.close()
            p.close()
        world.close()
    assert files(tmp_path / "one") == files(tmp_path / "two") == expected
