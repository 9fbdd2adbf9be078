"""The daemon's applier in its own process (tools/applier_process.py), through `dt protect`
on a real FUSE mount: killed, it is started again and the target still converges; the
daemon's status follows it; a task it runs gets its result appended by the daemon."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.daemon_helpers import REPO, Protected, wait_for, workload
from tests.trees import diff_trees

pytestmark = pytest.mark.fuse


@pytest.fixture
def daemon(tmp_path, fuse_available):
    src, dst, state = tmp_path / "src", tmp_path / "dst", tmp_path / "state"
    src.mkdir()
    real = os.open(src, os.O_PATH | os.O_DIRECTORY)  # the source beneath the mount
    daemon = Protected(src, dst, state)
    daemon.real = f"/proc/self/fd/{real}/."
    yield daemon
    daemon.close()
    os.close(real)


def applier_pid(daemon: Protected) -> int:
    """The daemon's applier process (a spawned multiprocessing child)."""
    found = subprocess.run(["pgrep", "-P", str(daemon.proc.pid), "-f", "spawn_main"], capture_output=True,
                           text=True).stdout.split()
    assert len(found) == 1, found
    return int(found[0])


def test_a_killed_applier_process_is_started_again_and_the_target_converges(daemon):
    daemon.start()
    daemon.converged()
    workload(daemon.src, seed=5, ops=150)
    first = applier_pid(daemon)
    os.kill(first, signal.SIGKILL)
    workload(daemon.src, seed=6, ops=150)
    wait_for(lambda: subprocess.run(["pgrep", "-P", str(daemon.proc.pid), "-f", "spawn_main"],
                                    capture_output=True, text=True).stdout.split() not in ([], [str(first)]),
             what="a new applier process")
    status = daemon.converged()
    assert status["applied_offset"] == status["end_offset"] - 1
    assert diff_trees(daemon.real, daemon.dst) == []
    assert daemon.stop() == 0
    assert "DT-D061" in daemon.err.read_text()


def test_status_follows_the_applier_process_and_a_task_result_is_appended(daemon):
    daemon.start()
    daemon.converged()
    (daemon.src / "f").write_bytes(b"x" * 5000)
    answer = daemon.call("task", {"name": "look", "argv": ["cat", "f"], "wait": True})
    assert answer["result"]["exit_status"] == 0 and answer["result"]["output"] == "x" * 5000
    assert daemon.converged()["target_status"] == "OK"
    # What the child publishes (at most once a second: apply/progress.py) reaches the status.
    status = wait_for(lambda: (s := daemon.status())["last_file"] is not None and s, what="the published status")
    assert status["recovery_point_latency_ms"]["samples"] > 0 and status["sent_bytes"] > 0
    daemon.call("pause")
    wait_for(lambda: daemon.status()["target_status"] == "Paused", what="the applier process to pause")
    (daemon.src / "g").write_bytes(b"queued")
    wait_for(lambda: daemon.status()["queued_ops"] > 0, what="the write to queue")
    assert not (daemon.dst / "g").exists()
    daemon.call("resume")
    daemon.converged()
    assert (daemon.dst / "g").read_bytes() == b"queued"
    assert daemon.stop() == 0


def test_protect_refuses_to_start_while_another_applier_holds_the_target(daemon):
    from datatether.apply.progress import Progress

    daemon.start()
    daemon.converged()
    partition = daemon.status()["partition"]
    assert daemon.stop() == 0
    holder = Progress(daemon.state / "targets" / partition)  # as a `dt apply` would
    try:
        daemon.start(wait=False)
        assert daemon.proc.wait(120) == 2
        assert "another applier" in daemon.err.read_text()
    finally:
        holder.close()
    assert os.stat(daemon.src).st_dev == os.stat(daemon.real).st_dev  # nothing left mounted
    daemon.start()
    daemon.converged()
    assert daemon.stop() == 0


EXITS_WITH_AN_ERROR = textwrap.dedent("""
    import sys
    from datatether.tools import runtime
    from datatether.tools.applier_process import ApplierProcess

    state = runtime.open_state(sys.argv[1])
    job = runtime.adhoc_job(state, sys.argv[2], sys.argv[3], make_target=True)
    applier = ApplierProcess(job).bind(state.log)
    print("started", flush=True)
    sys.exit(2)  # an error out of the daemon before it stopped its applier
""")


def test_a_process_that_exits_without_stopping_its_applier_process_still_exits(tmp_path):
    """The child ignores SIGTERM (its parent decides when it stops), which multiprocessing
    sends its daemonic children at exit before joining them: without a kill first, the
    exit would wait for it for ever, holding the daemon's lock."""
    (tmp_path / "src").mkdir()
    done = subprocess.run([sys.executable, "-c", EXITS_WITH_AN_ERROR, str(tmp_path / "state"), str(tmp_path / "src"),
                           str(tmp_path / "dst")], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert done.returncode == 2 and done.stdout == "started\n", done.stderr
