"""Assembly of a single-server job: what commands open, and how a producer meets the applier.

``open_state(dir)`` opens a state directory: settings (``config.toml``), the Log
(embedded RocksDB at ``<state>/log`` or Kafka, per ``settings.log``), the connection and
replication set stores. ``adhoc_job(state, source, target, excludes)`` finds or creates
the set and connection of a ``dt mirror SOURCE TARGET`` pair (the same pair reuses them,
so a second run resumes or compares against what the first sent). A ``Job`` knows where
its parts live:

    <state>/targets/<partition>/     the applier's progress (apply/progress.py)
    <state>/mirrors/<partition>.json the position of a paused or interrupted mirror

``apply_while(job, produce)`` runs the applier of the job's target in a thread while
``produce(log)`` appends (a mirror, a verification that remirrors), then until every
appended event is applied. The producer appends through the source queue
(engine/queue.py), so it waits for room rather than fill the disk holding the log. An
applier that keeps failing the same event (a full or read-only target, I/O errors) is
given up after APPLY_ATTEMPTS tries: the target data state becomes Mirror Required with
the reason, the producer is asked to pause (``on_apply_failure``) and ``ApplyFailed`` is
raised; the events stay in the log, so the next run applies them first.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, TypeVar

from ..apply.applier import Applier
from ..apply.paths import remap_link
from ..apply.progress import Progress
from ..capture.scan import ScanCapture
from ..engine import logs
from ..engine.connection import Connection, ConnectionStore
from ..engine.errors import ApplyFailed, NotFound, UsageError
from ..engine.log import Log
from ..engine.pathlocks import PathLocks
from ..engine.queue import QueueLimits, SourceQueue
from ..engine.replset import ReplicationSet, SetStore
from ..engine.rules import parse_rule
from ..engine.settings import Settings
from ..engine.states import TargetDataState, TargetStatus
from ..engine.tree import Tree

log = logs.get(__name__)

APPLY_ATTEMPTS = 3
T = TypeVar("T")


def open_log(state_dir: Path, settings: Settings) -> Log:
    if settings.log == "embedded":
        from ..engine.log_embedded import EmbeddedLog
        return EmbeddedLog(state_dir / "log")
    from ..engine.log_kafka import KafkaLog
    return KafkaLog(settings.log)


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
        rules.append(parse_rule(glob if glob.startswith("/") else os.path.join(source, glob), False, True))
    return rules


def adhoc_job(state: State, source: str, target: str, excludes: list[str] | None = None) -> Job:
    """The set and connection of this SOURCE/TARGET pair, created on first use.

    Excludes given now replace the stored ones when they differ (a new set generation).
    """
    source, target = os.path.abspath(source), os.path.abspath(target)
    if not os.path.isdir(source):
        if os.path.lexists(source):
            raise UsageError(detail=f"the source {source} is not a directory")
        raise NotFound(what="source directory", name=source)
    rules = adhoc_rules(source, list(excludes or []))
    conn = next((c for c in state.connections.list()
                 if c.source_root == source and c.target_root == target and c.target_host == "local"), None)
    if conn is None:
        name = adhoc_name(source, target)
        rset = _set_with_rules(state.sets, name, rules)
        conn = state.connections.create(name=name, set_name=name, source_root=source, target=target)
        log.info("connection created", msgid="DT-M031", connection=conn.name, source=source, target=target)
    else:
        rset = _set_with_rules(state.sets, conn.set_name, rules)
    state.log.ensure_partition(conn.partition)
    return Job(state=state, conn=conn, rset=rset)


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


class _ApplierThread:
    """The job's applier, applying in a thread until told the producer is done."""

    def __init__(self, job: Job, on_failure: Callable[[], None] | None):
        self.job = job
        self.progress = Progress(job.target_state_dir)
        self.applier = Applier(job.state.log, job.partition, job.conn.target_root, job.rset.root,
                               self.progress, job.state.settings)
        self.produced = threading.Event()   # the producer appended its last event
        self.abort = threading.Event()
        self.error: str | None = None
        self._on_failure = on_failure
        self._thread = threading.Thread(target=self._loop, name=f"applier-{job.partition}", daemon=True)

    def drain(self) -> None:
        """Apply what earlier runs left in the log, before anything compares the target."""
        self.produced.set()
        self._loop()
        self.produced.clear()
        self._raise()

    def start(self) -> None:
        self._thread.start()

    def _caught_up(self) -> bool:
        return self.applier.applied_offset >= self.job.state.log.end_offset(self.job.partition) - 1

    def _loop(self) -> None:
        settings, attempts = self.job.state.settings, 0
        log_ = self.job.state.log
        while not self.abort.is_set():
            applied = self.applier.run_once()
            if self.progress.status is TargetStatus.RETRYING:
                attempts += 1
                if attempts >= APPLY_ATTEMPTS:
                    self._give_up(self.progress.status_detail)
                    return
                self.abort.wait(settings.retry_delay_s)
                continue
            attempts = 0
            if self.produced.is_set() and self._caught_up():
                return
            if applied == 0:
                log_.wait(self.job.partition, self.applier.applied_offset + 1, 0.2)

    def _give_up(self, detail: str) -> None:
        self.error = detail
        self.progress.set_data_state(TargetDataState.MIRROR_REQUIRED, f"applying failed: {detail}"[:400])
        log.error("applier gave up", msgid="DT-M032", partition=self.job.partition, detail=detail)
        if self._on_failure is not None:
            self._on_failure()

    def _raise(self) -> None:
        if self.error is not None:
            raise ApplyFailed(detail=self.error)

    def finish(self) -> ApplyOutcome:
        self.produced.set()
        if self._thread.is_alive():
            self._thread.join()
        self._raise()
        return self.outcome()

    def outcome(self) -> ApplyOutcome:
        return ApplyOutcome(applied=self.applier.applied_offset,
                            end=self.job.state.log.end_offset(self.job.partition),
                            data_state=self.progress.data_state.value,
                            data_state_reason=self.progress.data_state_reason)

    def close(self) -> None:
        self.abort.set()
        if self._thread.is_alive():
            self._thread.join()
        self.applier.close()
        self.progress.close()


def source_queue(job: Job, applied: Callable[[], int]) -> SourceQueue:
    return SourceQueue(job.state.log, job.partition, QueueLimits.from_settings(job.state.settings),
                       applied, job.state.dir)


def apply_while(job: Job, produce: Callable[[Log, PathLocks], T], *,
                on_apply_failure: Callable[[], None] | None = None) -> tuple[T, ApplyOutcome]:
    """Drain the job's log, run ``produce(log, locks)`` with the applier applying beside
    it, and return its result once everything it appended is applied."""
    runner = _ApplierThread(job, on_apply_failure)
    try:
        runner.drain()
        queue = source_queue(job, lambda: runner.applier.applied_offset)
        runner.start()
        try:
            result = produce(queue.throttled(), PathLocks())
        finally:
            queue.close()
        return result, runner.finish()
    finally:
        runner.close()


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
