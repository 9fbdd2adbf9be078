"""Task commands in the stream (`dt task`): the target runs a task after every operation
captured before it and before any captured after it; the result is in the log.

The target is paused while the writes and the task are captured, so all of them wait in
the queue together: the order the task observes comes from the log, not from timing.
"""

from __future__ import annotations

import signal
import threading

import pytest

from datatether.engine.history import find_task_result
from datatether.engine.errors import DtError
from datatether.engine.log_embedded import EmbeddedLog
from tests.daemon_helpers import Protected, dt, wait_for

pytestmark = pytest.mark.fuse


@pytest.fixture
def daemon(tmp_path, fuse_available):
    (tmp_path / "src").mkdir()
    d = Protected(tmp_path / "src", tmp_path / "dst", tmp_path / "state")
    d.start()
    d.converged()
    yield d
    d.close()


def test_task_runs_between_the_writes_around_it(daemon, tmp_path):
    src, dst, state = daemon.src, daemon.dst, daemon.state
    seen = tmp_path / "seen.txt"
    daemon.call("pause")
    (src / "f.txt").write_text("first\n")
    # The capture queues every event of a write (data, then times) before the writer's
    # close returns, so anything queued after this count is the task.
    first_write = daemon.status()["queued_ops"]
    waited: list = []
    task = threading.Thread(target=lambda: waited.append(dt(
        "task", "observe", "--wait", "--", "sh", "-c",
        f'cat f.txt > {seen}; echo "offset $DT_APPLIED_OFFSET in $DT_TARGET"', state=state)))
    task.start()
    wait_for(lambda: daemon.status()["queued_ops"] > first_write, what="the task in the queue")
    (src / "f.txt").write_text("second\n")
    assert not seen.exists() and not (dst / "f.txt").exists()  # nothing applied yet
    daemon.call("resume")
    task.join(120)
    done = waited[0]
    assert done.returncode == 0, done.stderr
    assert seen.read_text() == "first\n"  # after the first write, before the second
    assert f"in {dst}" in done.stdout and "exit status 0" in done.stdout
    daemon.converged()
    assert (dst / "f.txt").read_text() == "second\n"


def test_a_failing_task_is_recorded_and_replication_goes_on(daemon):
    src, dst, state = daemon.src, daemon.dst, daemon.state
    failed = dt("task", "broken", "--wait", "--", "sh", "-c", "echo oops; exit 3", state=state)
    assert failed.returncode == 1 and "exit status 3" in failed.stdout and "oops" in failed.stdout
    (src / "after.txt").write_text("after a failed task\n")
    daemon.converged()
    assert (dst / "after.txt").read_text() == "after a failed task\n"
    task_id = dt("task", "quiet", "--", "true", state=state, check=True).stdout.strip()
    assert len(task_id) == 16
    daemon.converged()
    assert daemon.stop() == 0
    with EmbeddedLog.open_readonly(state / "log") as log_:
        result = find_task_result(log_, "conn-1", task_id, -1)
    assert result is not None and result.exit_status == 0
    assert result.applied_offset >= 0


def test_task_needs_a_command_and_a_daemon(daemon, tmp_path):
    state = daemon.state
    missing = dt("task", "nothing", state=state)
    assert missing.returncode == 2
    daemon.stop()
    gone = dt("task", "late", "--", "true", state=state)
    assert gone.returncode == 2 and "no daemon" in gone.stderr


@pytest.mark.parametrize("timeout", ["99999999999999999999999", "-1"])
def test_an_out_of_range_timeout_is_a_usage_error_in_dt_task_and_in_the_daemon(daemon, timeout):
    end = daemon.status()["end_offset"]
    refused = dt("task", "big", "--timeout", timeout, "--", "echo", "hi", state=daemon.state)
    assert refused.returncode == 2 and "[DT-E001]" in refused.stderr and "task timeout" in refused.stderr
    with pytest.raises(DtError) as answered:  # another client of the control API
        daemon.call("task", {"name": "big", "argv": ["echo", "hi"], "timeout_s": int(timeout)})
    assert answered.value.msgid == "DT-E001" and answered.value.exit_code == 2
    assert daemon.status()["end_offset"] == end  # nothing inserted
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.err.read_text()


def test_a_task_the_drain_runs_after_sigterm_reports_its_result(daemon, tmp_path):
    started = tmp_path / "started"
    waited: list = []
    task = threading.Thread(target=lambda: waited.append(dt(
        "task", "longone", "--wait", "--", "sh", "-c", f"touch {started}; sleep 2; echo done",
        state=daemon.state)))
    task.start()
    wait_for(started.exists, what="the task to start")
    daemon.proc.send_signal(signal.SIGTERM)  # the daemon drains: the running task ends first
    task.join(120)
    done = waited[0]
    assert done.returncode == 0 and "exit status 0" in done.stdout and "done" in done.stdout, done
    assert daemon.proc.wait(60) == 0


def test_a_task_still_queued_when_the_daemon_stops_is_reported_as_not_run(daemon):
    daemon.call("pause")  # a paused target keeps its queue through the stop
    waited: list = []
    task = threading.Thread(target=lambda: waited.append(dt(
        "task", "later", "--wait", "--", "true", state=daemon.state)))
    task.start()
    wait_for(lambda: daemon.status()["queued_ops"] > 0, what="the task in the queue")
    assert daemon.stop() == 0
    task.join(120)
    done = waited[0]
    assert done.returncode == 1 and "the daemon stopped before the task ran" in done.stdout, done
