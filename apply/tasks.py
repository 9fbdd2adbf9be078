"""Task commands: a program the target runs at one point of the stream.

Contract:
- A TaskCommand at offset N runs when every event before N is applied (and their effects
  are visible to it: writes are in the page cache, every namespace operation is done) and
  before any event after N: the applier calls ``TaskRunner.run`` in order and waits.
- It runs with cwd = the target root, stdin from /dev/null, stdout and stderr captured
  together (the first OUTPUT_LIMIT bytes kept), and the environment of the applier plus
  DT_TASK_ID, DT_TASK_NAME, DT_APPLIED_OFFSET (N - 1: the last event applied before it)
  and DT_TARGET (the target root). After ``timeout_s`` seconds (0: no limit) its whole
  process group is killed.
- Its outcome is appended to the connection's partition as a TaskResult event (which the
  applier later reads and treats as a no-op). A failing task is recorded, never an error:
  replication goes on.
- At most once: the applier notes N durably before starting it (Progress.begin_task). If
  the applier dies while the task runs, the restarted applier does not run it again: it
  looks for the TaskResult in the partition (the death came after the result was
  recorded) and otherwise records a result with exit status TASK_NOT_RUN saying the task
  was interrupted. Running a task twice could do visible harm (a backup taken twice, a
  counter bumped twice); not running it is visible in its result.
- With task commands disabled on the target, nothing runs and the result says so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

from datatether.engine import codec, logs
from datatether.engine.events import Event, TaskCommand, TaskResult
from datatether.engine.history import find_task_result
from datatether.engine.log import Log

from .progress import Progress

log = logs.get(__name__)

OUTPUT_LIMIT = 64 * 1024
TASK_NOT_RUN = 255  # exit status of a task that was not run (disabled, or interrupted)
_EXIT_CANNOT_EXECUTE = 126
_EXIT_NOT_FOUND = 127
_DRAIN_WAIT_S = 5.0  # how long to wait for output still held open by a task's children


def run_task(cmd: TaskCommand, *, offset: int, target_root: str) -> TaskResult:
    """Run one task command to completion (or timeout) and say what it did."""
    if not cmd.argv:
        return TaskResult(cmd.task_id, _EXIT_NOT_FOUND, "empty command", offset)
    env = dict(os.environ, DT_TASK_ID=cmd.task_id, DT_TASK_NAME=cmd.name,
               DT_APPLIED_OFFSET=str(offset - 1), DT_TARGET=target_root)
    try:
        proc = subprocess.Popen(cmd.argv, cwd=target_root, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte, which no exec can take
        status = _EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else _EXIT_CANNOT_EXECUTE
        return TaskResult(cmd.task_id, status, f"cannot run {cmd.argv[0]!r}: {getattr(exc, 'strerror', None) or exc}",
                          offset)
    output = _Output(proc.stdout)
    note = ""
    try:
        proc.wait(timeout=cmd.timeout_s if cmd.timeout_s > 0 else None)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        note = f"\n[killed after {cmd.timeout_s} s]"
    return TaskResult(cmd.task_id, proc.returncode, output.text(note), offset)


class _Output:
    """Reads a pipe to its end in a thread, keeping the first OUTPUT_LIMIT bytes."""

    def __init__(self, pipe):
        self._pipe = pipe
        self._kept = bytearray()
        self._truncated = False
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        with self._pipe:
            while chunk := self._pipe.read1(65536):
                room = OUTPUT_LIMIT - len(self._kept)
                self._kept += chunk[:room]
                self._truncated |= len(chunk) > room

    def text(self, note: str = "") -> str:
        self._thread.join(_DRAIN_WAIT_S)
        if self._truncated:
            note = "\n[output truncated]" + note
        room = OUTPUT_LIMIT - len(note.encode())
        return bytes(self._kept[:room]).decode("utf-8", "replace") + note


class TaskRunner:
    """Runs the task commands of one connection's stream and records their results."""

    def __init__(self, log_: Log, partition: str, target_root: str, enabled: bool):
        self._log = log_
        self._partition = partition
        self._target_root = target_root
        self._enabled = enabled

    def run(self, offset: int, cmd: TaskCommand, progress: Progress) -> TaskResult:
        if not self._enabled:
            log.warning("task commands are disabled on this target", msgid="DT-A011",
                        task_id=cmd.task_id, name=cmd.name, offset=offset)
            result = TaskResult(cmd.task_id, TASK_NOT_RUN, "not run: task commands are disabled on the target", offset)
        elif progress.task_offset == offset:
            recorded = find_task_result(self._log, self._partition, cmd.task_id, offset)
            if recorded is not None:
                return recorded
            log.warning("task interrupted by a restart of the applier; not run again", msgid="DT-A010",
                        task_id=cmd.task_id, name=cmd.name, offset=offset)
            result = TaskResult(cmd.task_id, TASK_NOT_RUN,
                                "interrupted: the applier stopped while the task ran; not run again", offset)
        else:
            progress.begin_task(offset)
            result = run_task(cmd, offset=offset, target_root=self._target_root)
            log.info("task ran", msgid="DT-A009", task_id=cmd.task_id, name=cmd.name, offset=offset,
                     exit_status=result.exit_status)
        self._log.append(self._partition, [codec.encode(Event(result, time.time_ns(), origin="applier"))])
        return result
