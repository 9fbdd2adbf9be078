"""Assembly of a single-server job: what commands open, and how a producer meets the applier.

``open_state(dir)`` opens a state directory: settings (``config.toml``), the Log
(embedded RocksDB at ``<state>/log`` or Kafka, per ``settings.log``), the connection and
replication set stores. ``adhoc_job(state, source, target, excludes)`` finds or creates
the set and connection of a ``dt mirror SOURCE TARGET`` pair (the same pair reuses them,
so a second run resumes or compares against what the first sent). A ``Job`` knows where
its parts live:

    <state>/targets/<partition>/     the applier's progress (apply/progress.py)
    <state>/mirrors/<partition>.json the position of a paused or interrupted mirror

``apply_while(job, produce)`` runs the applier of the job's target while
``produce(log, locks)`` appends (a mirror, a verification that remirrors), then until
every appended event is applied. The applier runs in a process of its own (spawned; it
reads the log through a read-only view, dies with its parent, and the parent commits
its advisory consumer offset at the end), because in one interpreter every system call
of either side waits for the other to release the interpreter lock;
``separate_process=False`` keeps it in a thread (cheaper to start, for small jobs or low
latency). The producer appends through the source queue (engine/queue.py), so it waits
for room rather than fill the disk holding the log. An
applier that keeps failing the same event (a full or read-only target, I/O errors) is
given up after APPLY_ATTEMPTS tries: the target data state becomes Mirror Required with
the reason, the producer is asked to pause (``on_apply_failure``) and ``ApplyFailed`` is
raised; the events stay in the log, so the next run applies them first.
The applier of a job closes without syncing the target file system (apply/applier.py:
the kernel writes it back in its own time, as after cp or rsync; a machine stop before
that leaves the target Mirror Required, never silently incomplete): syncing a 2 GB
mirror's target and log took about a second.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from ..apply.applier import Applier
from ..apply.orphans import process_orphans
from ..apply.paths import remap_link
from ..apply.progress import Progress
from ..capture.scan import ScanCapture
from ..engine import logs
from ..engine.connection import Connection, ConnectionStore, check_roots
from ..engine.errors import ApplyFailed, NotFound, UsageError
from ..engine.log import Log
from ..engine.pathlocks import PathLocks
from ..engine.queue import QueueLimits, SourceQueue
from ..engine.replset import ReplicationSet, SetStore
from ..engine.rules import is_within, parse_rule
from ..engine.settings import Settings
from ..engine.states import TargetDataState, TargetStatus
from ..engine.tree import Tree
from . import allocator

log = logs.get(__name__)

APPLY_ATTEMPTS = 3
T = TypeVar("T")


@contextmanager
def stop_signals(handler: Callable[[], None]) -> Iterator[None]:
    """While in the block, SIGINT and SIGTERM call ``handler`` instead of interrupting.

    Why: a KeyboardInterrupt raised at an arbitrary point can fall between a lock's
    acquire and the ``with`` that would release it; the log's close then waits for that
    lock forever (``dt tail --follow`` hung so on SIGINT). Long-running commands stop at a
    point of their choosing instead."""
    previous = {sig: signal.signal(sig, lambda *_: handler()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def open_log(state_dir: Path, settings: Settings) -> Log:
    if settings.log == "embedded":
        from ..engine.log_embedded import EmbeddedLog
        return EmbeddedLog(state_dir / "log")
    from ..engine.log_kafka import KafkaLog
    return KafkaLog(settings.log, topic_prefix=settings.kafka_topic_prefix, timeout_s=settings.kafka_timeout_s,
                    delivery_timeout_s=settings.kafka_delivery_timeout_s,
                    **{name: _librdkafka_value(value) for name, value in settings.kafka_properties.items()})


def _librdkafka_value(value: str | int | float | bool) -> str:
    """librdkafka takes every property as a string; TOML's true is its "true"."""
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass
class State:
    """An open state directory. Use as a context manager (closes the Log)."""

    dir: Path
    settings: Settings
    log: Log
    connections: ConnectionStore
    sets: SetStore

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_state(state_dir: str | os.PathLike, **overrides) -> State:
    path = Path(state_dir).absolute()
    path.mkdir(parents=True, exist_ok=True)
    settings = Settings.load(path, **overrides)
    return State(dir=path, settings=settings, log=open_log(path, settings),
                 connections=ConnectionStore(path), sets=SetStore(path))


@dataclass
class Job:
    """One connection of a state directory, with its replication set."""

    state: State
    conn: Connection
    rset: ReplicationSet

    @property
    def partition(self) -> str:
        return self.conn.partition

    @property
    def target_state_dir(self) -> Path:
        return self.state.dir / "targets" / self.partition

    @property
    def position_path(self) -> Path:
        return self.state.dir / "mirrors" / f"{self.partition}.json"

    def scan(self) -> ScanCapture:
        return ScanCapture.of_set(self.rset)

    def source_view(self) -> Tree:
        return self.scan().view()

    def target_view(self) -> Tree:
        return Tree(self.conn.target_root)

    def link_map(self) -> Callable[[str], str] | None:
        """The symlink targets the applier writes (RemapLink), for comparisons."""
        if not self.state.settings.remap_link:
            return None
        return partial(remap_link, source_root=self.rset.root, target_root=self.conn.target_root)


# -- the ad-hoc job of `dt mirror SOURCE TARGET` ----------------------------------------

def adhoc_name(source: str, target: str) -> str:
    """A set and connection name derived from the source path, unique per pair."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.basename(source.rstrip("/")) or "root").strip("_")
    digest = hashlib.blake2b(f"{source}\0{target}".encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()
    return f"mirror-{base[:40] or 'root'}-{digest}"


def adhoc_rules(source: str, excludes: list[str]) -> list:
    """SOURCE included recursively; each GLOB excluded recursively (relative to SOURCE)."""
    rules = [parse_rule(source, True, True)]
    for glob in excludes:
        if not glob:
            raise UsageError(detail="an empty --exclude pattern: give a path or a wildcard such as '*.tmp'")
        path = glob if glob.startswith("/") else os.path.join(source, glob)
        if not is_within(os.path.normpath(path), source):
            raise UsageError(detail=f"--exclude {glob!r} is outside the source {source}: "
                                    "give a name relative to it, or an absolute path inside it")
        rules.append(parse_rule(path, False, True))
    return rules


def adhoc_job(state: State, source: str, target: str, excludes: list[str] | None = None, *,
              make_target: bool = False, existing_target: bool = False) -> Job:
    """The set and connection of this SOURCE/TARGET pair, created on first use.

    ``excludes``: None keeps the stored rules of an existing pair; a list (even empty)
    replaces them when they differ (a new set generation). A state directory inside
    SOURCE is excluded. ``make_target`` creates the target directory first
    (make_target_root); ``existing_target`` (commands that only read it) refuses a
    target that is not there, before anything is recorded. An empty SOURCE or TARGET is
    refused: abspath would make it the current directory.
    """
    for what, path in (("source", source), ("target", target)):
        if not path:
            raise UsageError(detail=f"the {what} is empty: give a directory")
    source, target = os.path.abspath(source), os.path.abspath(target)
    if not os.path.isdir(source):
        if os.path.lexists(source):
            raise UsageError(detail=f"the source {source} is not a directory")
        raise NotFound(what="source directory", name=source)
    rules = adhoc_rules(source, list(excludes or []))
    if existing_target and not os.path.isdir(target):
        if os.path.lexists(target):
            raise UsageError(detail=f"the target {target} is not a directory")
        raise UsageError(detail=f"the target {target} does not exist: nothing was mirrored there "
                                f"(dt mirror SOURCE TARGET makes it)")
    if make_target:
        make_target_root(source, target)
    state_dir = os.path.realpath(state.dir)
    if state_dir.startswith(os.path.realpath(source).rstrip("/") + "/"):
        # The state directory (its log above all) must never mirror itself.
        rules.append(parse_rule(str(state.dir), False, True))
    conn = next((c for c in state.connections.list()
                 if c.source_root == source and c.target_root == target and c.target_host == "local"), None)
    if conn is None:
        name = adhoc_name(source, target)
        rset = _set_with_rules(state.sets, name, rules)
        conn = state.connections.create(name=name, set_name=name, source_root=source, target=target,
                                        log_partitions=state.log.partitions())
        log.info("connection created", msgid="DT-M031", connection=conn.name, source=source, target=target)
    elif excludes is None and state.sets.exists(conn.set_name):
        rset = state.sets.get(conn.set_name)
    else:
        rset = _set_with_rules(state.sets, conn.set_name, rules)
    state.log.ensure_partition(conn.partition)
    return Job(state=state, conn=conn, rset=rset)


def make_target_root(source_root: str, target_root: str) -> list[str]:
    """Create the target directory (and its parents) before anything is recorded or runs,
    so that a target that cannot be a directory is a clear usage error, not a failure of
    the applier. The roots are checked first (check_roots): nothing is ever created
    inside the source. Returns the directories created, outermost first."""
    check_roots(source_root, target_root)
    missing, path = [], os.path.abspath(target_root)
    while not os.path.lexists(path):
        missing.insert(0, path)
        path = os.path.dirname(path)
    try:
        os.makedirs(target_root, exist_ok=True)
        return missing
    except FileExistsError:
        raise UsageError(detail=f"the target {target_root} exists and is not a directory") from None
    except OSError as exc:
        raise UsageError(detail=f"cannot create the target directory {target_root}: {exc.strerror}") from None


def remove_connection(state: State, conn: Connection) -> None:
    """Forget ``conn``: its log partition, its record, the target's progress record and a
    saved mirror position. The target's data and the replication set are kept."""
    try:
        state.log.drop_partition(conn.partition)
    except NotFound:
        pass  # never used
    state.connections.delete(conn.id)
    shutil.rmtree(state.dir / "targets" / conn.partition, ignore_errors=True)
    (state.dir / "mirrors" / f"{conn.partition}.json").unlink(missing_ok=True)
    log.info("connection removed", msgid="DT-D041", connection=conn.name, source=conn.source_root,
             target=conn.target_root)


def _set_with_rules(sets: SetStore, name: str, rules: list) -> ReplicationSet:
    if not sets.exists(name):
        return sets.create(name, rules)
    rset = sets.get(name)
    if sorted(rset.rules, key=lambda r: r.path) == sorted(rules, key=lambda r: r.path):
        return rset
    return sets.save(replace(rset, rules=tuple(rules)))


# -- producer and applier together -------------------------------------------------------

@dataclass
class ApplyOutcome:
    applied: int
    end: int
    data_state: str
    data_state_reason: str


def _outcome(applier: Applier, progress: Progress, log_: Log, partition: str) -> ApplyOutcome:
    return ApplyOutcome(applied=applier.applied_offset, end=log_.end_offset(partition),
                        data_state=progress.data_state.value, data_state_reason=progress.data_state_reason)


def _apply_until(applier: Applier, progress: Progress, log_: Log, partition: str, settings: Settings,
                 done: Callable[[int], bool], abort, published: Callable[[int], None] = lambda a: None) -> str | None:
    """Apply until ``done(applied)`` or ``abort`` is set. An event failing APPLY_ATTEMPTS
    times in a row is given up: Mirror Required, and its failure is returned."""
    attempts = 0
    while not abort.is_set():
        applied = applier.run_once()
        published(applier.applied_offset)
        if progress.status is TargetStatus.RETRYING:
            attempts += 1
            if attempts >= APPLY_ATTEMPTS:
                detail = progress.status_detail
                progress.set_data_state(TargetDataState.MIRROR_REQUIRED, f"applying failed: {detail}"[:400])
                log.error("applier gave up", msgid="DT-M032", partition=partition, detail=detail)
                return detail
            abort.wait(settings.retry_delay_s)
            continue
        attempts = 0
        if done(applier.applied_offset):
            return None
        if applied == 0:
            log_.wait(partition, applier.applied_offset + 1, 0.2)
    return None


class _ApplierThread:
    """The job's applier in a thread of this process (for callers that need no second
    process: draining before a comparison, or a producer that appends little)."""

    def __init__(self, job: Job, on_failure: Callable[[], None] | None):
        self.job = job
        self.progress = Progress(job.target_state_dir)
        self.applier = Applier(job.state.log, job.partition, job.conn.target_root, job.rset.root,
                               self.progress, job.state.settings)
        self._produced = threading.Event()
        self._abort = threading.Event()
        self._error: str | None = None
        self._on_failure = on_failure
        self._thread = threading.Thread(target=self._run, name=f"applier-{job.partition}", daemon=True)

    @property
    def applied(self) -> int:
        return self.applier.applied_offset

    def _until(self, done: Callable[[int], bool]) -> None:
        log_ = self.job.state.log
        self._error = _apply_until(self.applier, self.progress, log_, self.job.partition,
                                   self.job.state.settings, done, self._abort)
        if self._error is not None and self._on_failure is not None:
            self._on_failure()

    def drain(self) -> None:
        """Apply what earlier runs left in the log, before anything compares the target."""
        end = self.job.state.log.end_offset(self.job.partition)
        self._until(lambda applied: applied >= end - 1)
        self._raise()
        self._thread.start()

    def _run(self) -> None:
        log_ = self.job.state.log
        self._until(lambda applied: self._produced.is_set() and applied >= log_.end_offset(self.job.partition) - 1)

    def _raise(self) -> None:
        if self._error is not None:
            raise ApplyFailed(detail=self._error)

    def finish(self) -> ApplyOutcome:
        self._produced.set()
        self._thread.join()
        self._raise()
        return self.outcome()

    def outcome(self) -> ApplyOutcome:
        return _outcome(self.applier, self.progress, self.job.state.log, self.job.partition)

    def close(self) -> None:
        self._abort.set()
        if self._thread.is_alive():
            self._thread.join()
        self.applier.close(sync=False)
        self.progress.close()


class _ReaderLog:
    """The Log as the applier process sees it: it reads; the consumer offset, advisory,
    is committed by the parent (which holds the log for writing) when the run ends."""

    def __init__(self, inner: Log):
        self._inner = inner

    def commit(self, partition: str, consumer: str, offset: int) -> None:
        pass

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def open_reader_log(state_dir: Path, settings: Settings) -> Log:
    """The job's Log opened for reading beside the process that writes it."""
    if settings.log == "embedded":
        from ..engine.log_embedded import EmbeddedLog
        return EmbeddedLog.open_readonly(state_dir / "log")
    return open_log(state_dir, settings)


def _die_with_parent() -> None:
    """The applier process must not outlive its parent (a SIGKILLed `dt mirror` would
    leave it holding the target's progress lock)."""
    import ctypes
    import signal
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os._exit(1)


def applier_spec(job: Job) -> dict:
    """What an applier process needs to open the job's target and log, and to log like this
    process (picklable: the process is spawned)."""
    config = logs.current()
    return {"settings": job.state.settings, "partition": job.partition, "state_dir": str(job.state.dir),
            "target_state_dir": str(job.target_state_dir), "target_root": job.conn.target_root,
            "source_root": job.rset.root,
            "log_json": config.json, "log_level": config.level}


def enter_applier_process(spec: dict) -> None:
    """First steps of an applier process: die with the parent; leave SIGINT and SIGTERM,
    which a terminal or a service manager sends to the whole process group, to the
    parent (it decides when to stop); log like it."""
    import signal
    allocator.keep_freed_buffers()
    _die_with_parent()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logs.configure(json=spec["log_json"], level=spec["log_level"])


def _applier_process(spec: dict, conn, applied, final_end, abort) -> None:
    """Body of the applier process (see ``_ApplierProcess``)."""
    enter_applier_process(spec)
    settings, partition = spec["settings"], spec["partition"]
    reader = progress = applier = None
    try:
        reader = _ReaderLog(open_reader_log(Path(spec["state_dir"]), settings))
        progress = Progress(spec["target_state_dir"])
        applier = Applier(reader, partition, spec["target_root"], spec["source_root"], progress, settings)

        def publish(offset: int) -> None:
            applied.value = offset

        end = reader.end_offset(partition)
        for phase, done in (("drained", lambda a: a >= end - 1),
                            ("done", lambda a: final_end.value >= 0 and a >= final_end.value - 1)):
            error = _apply_until(applier, progress, reader, partition, settings, done, abort, publish)
            outcome = _outcome(applier, progress, reader, partition).__dict__
            if error is not None:
                conn.send(("gave_up", error, outcome))
                return
            if abort.is_set():
                return
            conn.send((phase, None, outcome))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed", f"{type(exc).__name__}: {exc}", None))
    finally:
        if applier is not None:
            applier.close(sync=False)
        for part in (progress, reader):
            if part is not None:
                part.close()


class _ApplierProcess:
    """The job's applier in a process of its own: the target's role. Applying then never
    competes with the producer for one interpreter lock (in one process, every system
    call of one side waits for the other to yield the lock: about 3x slower)."""

    def __init__(self, job: Job, on_failure: Callable[[], None] | None):
        import multiprocessing
        import queue
        ctx = multiprocessing.get_context("spawn")
        self.job = job
        self._conn, child = ctx.Pipe()
        self._applied = ctx.Value("q", -1, lock=False)
        self._final_end = ctx.Value("q", -1, lock=False)
        self._abort = ctx.Event()
        self._proc = ctx.Process(target=_applier_process, args=(applier_spec(job), child, self._applied, self._final_end,
                                                                self._abort), name=f"dt-applier-{job.partition}")
        self._proc.start()
        child.close()
        self._messages: queue.Queue = queue.Queue()
        self._undrained = False  # its "drained" message is still to be read
        self._on_failure = on_failure
        self._listener = threading.Thread(target=self._listen, daemon=True)
        self._listener.start()

    @property
    def applied(self) -> int:
        return self._applied.value

    def _listen(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                self._messages.put(("failed", "the applier process ended unexpectedly", None))
                return
            if message[0] == "gave_up" and self._on_failure is not None:
                self._on_failure()
            self._messages.put(message)

    def _expect(self, phase: str) -> ApplyOutcome:
        kind, detail, outcome = self._messages.get()
        if kind == phase:
            return ApplyOutcome(**outcome)
        if kind == "gave_up":
            raise ApplyFailed(detail=detail)
        raise ApplyFailed(detail=detail or f"unexpected {kind}")

    def drain(self) -> None:
        """Wait until what earlier runs left in the log is applied; when the target's
        record says nothing is left, return at once: the process then starts up (about
        0.2 s) while the producer already works."""
        applied = Progress.read_snapshot(self.job.target_state_dir)["applied_offset"]
        if applied >= self.job.state.log.end_offset(self.job.partition) - 1:
            self._undrained = True
            return
        self._expect("drained")

    def finish(self) -> ApplyOutcome:
        self._final_end.value = self.job.state.log.end_offset(self.job.partition)
        if self._undrained:
            self._expect("drained")
        outcome = self._expect("done")
        if outcome.applied >= 0:
            self.job.state.log.commit(self.job.partition, "applier", outcome.applied)
        return outcome

    def close(self) -> None:
        self._abort.set()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()


def source_queue(job: Job, applied: Callable[[], int]) -> SourceQueue:
    return SourceQueue(job.state.log, job.partition, QueueLimits.from_settings(job.state.settings),
                       applied, job.state.dir)


def apply_while(job: Job, produce: Callable[[Log, PathLocks], T], *,
                on_apply_failure: Callable[[], None] | None = None,
                separate_process: bool = True) -> tuple[T, ApplyOutcome]:
    """Drain the job's log, run ``produce(log, locks)`` with the applier applying beside
    it (in a process of its own unless ``separate_process`` is False), and return its
    result once everything it appended is applied."""
    runner = (_ApplierProcess if separate_process else _ApplierThread)(job, on_apply_failure)
    try:
        runner.drain()
        queue = source_queue(job, lambda: runner.applied)
        try:
            result = produce(queue.throttled(), PathLocks())
        finally:
            queue.close()
        return result, runner.finish()
    finally:
        runner.close()


def auto_orphans(job: Job):
    """Orphans handled as the settings ask after a mirror or verification
    (``orphans_action`` delete or move; None when off)."""
    settings = job.state.settings
    if settings.orphans_action == "off":
        return None
    return process_orphans(job.conn.target_root, job.rset, job.scan().exists, action=settings.orphans_action,
                           move_to=settings.orphans_move_to, older_than_s=settings.orphans_older_than_s)


def drained(job: Job) -> ApplyOutcome:
    """Apply whatever the log still holds for the job (before comparing or cleaning up)."""
    runner = _ApplierThread(job, None)
    try:
        runner.drain()
        return runner.outcome()
    finally:
        runner.close()


# -- terminal progress ---------------------------------------------------------------------

class ProgressBar:
    """A tqdm bar of a mirror's processed bytes, on a terminal only (never with --json)."""

    def __init__(self, enabled: bool, desc: str):
        self._bar = None
        self._enabled = enabled
        self._desc = desc

    @classmethod
    def for_args(cls, args, desc: str) -> "ProgressBar":
        import sys
        return cls(not getattr(args, "json", False) and sys.stderr.isatty(), desc)

    def __call__(self, stats) -> None:
        if not self._enabled:
            return
        if self._bar is None:
            from tqdm import tqdm
            self._bar = tqdm(total=stats.total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=self._desc, leave=False)
        self._bar.update(stats.processed_bytes - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
