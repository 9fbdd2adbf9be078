"""The daemon's applier in a process of its own, fed live by the process that writes the log.

Why: in one interpreter the applier thread and the capture's threads take turns at the
interpreter lock; every system call of a captured write let the applier run its batch
first, and the writer waited. Through ``dt protect``, 4 KiB random writes ran at 14 MB/s
with the applier working and 20-30 MB/s with it paused.

``ApplierProcess(job)`` is, for engine/daemon.py, the applier (``ApplierLike``) and, as
``.progress``, the target's progress (``ProgressLike``):

- ``feed`` (engine/log_feed.Feed): the daemon's log is wrapped in a ``FeedingLog`` of it,
  so the child learns of every record of the partition as it is appended; what the feed
  does not bring (the backlog of an earlier run, records it skipped, and large records,
  which it only announces) the child reads from the log opened read-only
  (tools/runtime.open_reader_log).
- ``bind(log)``: the daemon's queue-counted view of the log. The child cannot write the
  log: its appends (the TaskResult of a task it ran) and the advisory consumer offset are
  made by the parent through that view.
- The child is spawned at once; ``bind`` waits until it has opened the target and raises
  BackendUnavailable with its reason when it cannot (another applier holds the target),
  so ``dt protect`` refuses to start rather than capture for an applier that never runs.
- ``run(stop)``, in the daemon's applier thread: serves the child until ``stop`` is set,
  then stops it: the child ends its batch, closes the applier (a checkpoint: the target
  file system is synced, apply/applier.py) and the progress record, and exits. A child
  that dies is started again, after RESTART_S[0] doubling up to RESTART_S[1] while
  children keep dying young; its durable progress record makes that exact (DT-D061).
- ``pause``/``resume``: sent to the child.
- ``applied_offset``, ``progress.status``, ``progress.data_state``: shared memory the child
  updates after every batch (so the source queue's accounting costs no system call);
  ``progress.snapshot()`` is the status the child publishes (apply/progress.py) with them.

The child dies with its parent and leaves SIGINT and SIGTERM to it
(tools/runtime.enter_applier_process); it waits up to PROGRESS_WAIT_S for the target's
progress record when a killed predecessor still holds it.

Message ids DT-D060..D065.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import queue
import threading
import time
from pathlib import Path
from typing import Sequence

from ..apply.applier import Applier
from ..apply.progress import Progress
from ..engine import logs
from ..engine.errors import BackendUnavailable, DtError
from ..engine.log import Log
from ..engine.log_feed import Feed, FedLog
from ..engine.offsets import NO_OFFSET
from ..engine.states import TargetDataState, TargetStatus
from . import runtime

log = logs.get(__name__)

RESTART_S = (1.0, 60.0)     # first and longest wait before starting a dead child again
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 600.0      # a final checkpoint syncs the target file system
PROGRESS_WAIT_S = 10.0
CONSUMER_COMMIT_S = 1.0
POLL_S = 0.2
_STATUSES = list(TargetStatus)
_DATA_STATES = list(TargetDataState)
_APPLIED, _STATUS, _DATA_STATE = range(3)


class ProgressView:
    """The target's progress as the daemon sees it while the child applies (ProgressLike)."""

    def __init__(self, state_dir: Path, shared):
        self.state_dir = state_dir
        self._shared = shared

    @property
    def applied_offset(self) -> int:
        return self._shared[_APPLIED]

    @property
    def status(self) -> TargetStatus:
        return _STATUSES[self._shared[_STATUS]]

    @property
    def data_state(self) -> TargetDataState:
        return _DATA_STATES[self._shared[_DATA_STATE]]

    def snapshot(self) -> dict:
        snap = Progress.read_snapshot(self.state_dir)
        snap.update(applied_offset=self.applied_offset, target_status=self.status.value,
                    target_data_state=self.data_state.value)
        return snap

    def close(self) -> None:
        """Nothing to release: the child closes the progress record."""


class ApplierProcess:
    """The job's applier in a child process (see the module docstring)."""

    def __init__(self, job: runtime.Job):
        self._ctx = multiprocessing.get_context("spawn")
        self._spec = runtime.applier_spec(job)
        self.partition = job.partition
        saved = Progress.read_snapshot(job.target_state_dir)
        self._shared = self._ctx.Array("q", [saved["applied_offset"],
                                             _STATUSES.index(TargetStatus.NOT_LOADED),
                                             _DATA_STATES.index(TargetDataState(saved["target_data_state"]))],
                                       lock=False)
        self.progress = ProgressView(job.target_state_dir, self._shared)
        self.feed = Feed()
        self._log: Log | None = None
        self._conn = None
        self._send_lock = threading.Lock()
        self._proc = None
        self._started_at = 0.0
        self._failure: str | None = None  # why the child could not start, when it said
        self._restart_s = RESTART_S[0]
        self._paused = False
        self._committed = NO_OFFSET
        # The child ignores SIGTERM, which multiprocessing's exit handler sends daemonic
        # children before joining them: a process leaving without ``run`` having stopped
        # the child (an error out of the daemon's shutdown) would wait for it for ever,
        # holding the daemon's lock. Registered after that handler, this runs before it.
        atexit.register(self.close)
        self._start()  # spawning takes a moment: it overlaps the rest of the daemon's set-up

    def bind(self, log_: Log) -> ApplierProcess:
        """The log through which the child's appends and consumer offset go. Returns once
        the child has opened the target; BackendUnavailable with its reason when it
        cannot (another applier holds the target, the target is unreadable...)."""
        self._log = log_
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                if self._conn.poll(max(0.0, deadline - time.monotonic())):
                    message = self._conn.recv()
                    if message[0] == "ready":
                        return self
                    detail = message[1]
                else:
                    detail = f"not ready within {READY_TIMEOUT_S:.0f} s"
            except (EOFError, OSError):
                self._proc.join(RESTART_S[0])
                detail = f"it ended with exit code {self._proc.exitcode}"
            self.close()
            raise BackendUnavailable(backend=f"applier of {self.partition}", detail=detail)

    @property
    def applied_offset(self) -> int:
        return self.progress.applied_offset

    def pause(self) -> None:
        self._paused = True
        self._send(("pause",))

    def resume(self) -> None:
        self._paused = False
        self._send(("resume",))

    def close(self) -> None:
        """Make sure the child is gone (``run`` stops it; this covers a run never started)."""
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self.feed.close()

    # -- the parent's side ------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Start the child, serve it, start it again if it dies, stop it when ``stop`` is set."""
        next_commit = 0.0
        while not stop.is_set():
            try:
                if not self._proc.is_alive():
                    if stop.wait(self._next_restart()):
                        break
                    self._start()
                self._serve(POLL_S)
                if time.monotonic() >= next_commit:
                    next_commit = time.monotonic() + CONSUMER_COMMIT_S
                    self._commit_consumer()
            except Exception as exc:  # noqa: BLE001 - the daemon's applier thread must not end
                log.error("serving the applier process failed", msgid="DT-D065", partition=self.partition,
                          error=repr(exc), exc_info=True)
                stop.wait(RESTART_S[0])
        self._stop()

    def _start(self) -> None:
        parent_conn, child_conn = self._ctx.Pipe()
        writer, reader = Feed.pair()
        self.feed.attach(writer)  # before the child opens its view of the log (engine/log_feed.py)
        self._proc = self._ctx.Process(target=_child_main, args=(self._spec, child_conn, reader, self._shared),
                                       name=f"dt-applier-{self.partition}", daemon=True)
        self._proc.start()
        child_conn.close()
        reader.close()
        with self._send_lock:
            self._conn = parent_conn
        self._started_at = time.monotonic()
        if self._paused:
            self._send(("pause",))
        log.info("applier process started", msgid="DT-D060", partition=self.partition, pid=self._proc.pid)

    def _serve(self, timeout_s: float) -> None:
        """Answer the child's requests for up to ``timeout_s``."""
        try:
            if not self._conn.poll(timeout_s):
                return
            request = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(RESTART_S[0])  # it is ending; the run loop sees it dead
            return
        if request[0] == "append":
            try:
                answer = ("appended", self._log.append(request[1], request[2]))
            except DtError as exc:
                answer = ("failed", exc.message)
            self._send(answer)
        elif request[0] == "failed":  # a restarted child could not open the target
            self._failure = request[1]

    def _next_restart(self) -> float:
        """How long to wait before starting the dead child again: RESTART_S[0], doubling
        up to RESTART_S[1] while children keep dying young."""
        if time.monotonic() - self._started_at > RESTART_S[1]:
            self._restart_s = RESTART_S[0]
        delay, self._restart_s = self._restart_s, min(self._restart_s * 2, RESTART_S[1])
        log.error("applier process died; starting it again", msgid="DT-D061", partition=self.partition,
                  exitcode=self._proc.exitcode, reason=self._failure, restart_s=delay)
        self._failure = None
        return delay

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            if self._conn is None:
                return
            try:
                self._conn.send(message)
            except OSError:  # the child is gone; ``run`` starts another
                pass

    def _commit_consumer(self) -> None:
        """Advisory: tells retention how far the target is (apply/applier.py)."""
        applied = self.applied_offset
        if applied == self._committed or applied == NO_OFFSET:
            return
        try:
            self._log.commit(self.partition, "applier", applied)
            self._committed = applied
        except DtError as exc:
            log.warning("consumer offset not committed", msgid="DT-D062", partition=self.partition,
                        error=exc.message)

    def _stop(self) -> None:
        self._send(("stop",))
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self._proc.is_alive() and time.monotonic() < deadline:
            self._serve(POLL_S)  # it may still append a task's result
        if self._proc.is_alive():
            log.error("applier process did not stop; killing it", msgid="DT-D063", partition=self.partition)
            self._proc.kill()
        self._proc.join()
        self._commit_consumer()
        self.feed.attach(None)


# -- the child's side ------------------------------------------------------------------------

class _ChildLog(FedLog):
    """The child's log: fed reads; appends made by the parent; the consumer offset too."""

    def __init__(self, inner: Log, partition: str, sock, conn, replies: queue.Queue):
        super().__init__(inner, partition, sock)
        self._conn = conn
        self._replies = replies

    def append(self, partition: str, values: Sequence[bytes], timestamp_ns: int | None = None) -> int:
        self._conn.send(("append", partition, list(values)))
        kind, answer = self._replies.get()
        if kind != "appended":
            raise BackendUnavailable(backend="log (through the daemon)", detail=answer)
        return answer

    def commit(self, partition: str, consumer: str, offset: int) -> None:
        pass  # the parent commits the consumer offset it reads from the shared applied offset


def _open_progress(state_dir: str) -> Progress:
    deadline = time.monotonic() + PROGRESS_WAIT_S
    while True:
        try:
            return Progress(state_dir)
        except BackendUnavailable:  # a killed predecessor's lock, released as it ends
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _child_main(spec: dict, conn, sock, shared) -> None:
    """Body of the applier process (see the module docstring)."""
    runtime.enter_applier_process(spec)
    settings, partition = spec["settings"], spec["partition"]
    stop = threading.Event()
    replies: queue.Queue = queue.Queue()
    try:
        reader = _ChildLog(runtime.open_reader_log(Path(spec["state_dir"]), settings), partition, sock, conn,
                           replies)
        progress = _open_progress(spec["target_state_dir"])
        applier = Applier(reader, partition, spec["target_root"], spec["source_root"], progress, settings)
    except Exception as exc:  # noqa: BLE001 - the parent reports it (a DtError says it best)
        conn.send(("failed", getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"))
        raise

    def publish() -> None:
        shared[_APPLIED] = progress.applied_offset
        shared[_STATUS] = _STATUSES.index(progress.status)
        shared[_DATA_STATE] = _DATA_STATES.index(progress.data_state)

    def control() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = ("stop",)
            kind = message[0]
            if kind == "pause":
                applier.pause()
            elif kind == "resume":
                applier.resume()
            elif kind == "stop":
                stop.set()
                reader.wake()
                return
            else:
                replies.put(message)

    publish()
    conn.send(("ready",))
    threading.Thread(target=control, name="control", daemon=True).start()
    try:
        applier.run(stop, after_batch=publish)
    finally:
        applier.close()
        publish()
        progress.close()
        reader.close()
        log.info("applier process stopped", msgid="DT-D064", partition=partition, applied=progress.applied_offset,
                 pid=os.getpid())
