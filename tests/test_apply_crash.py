"""Crash test: an applier process killed with SIGKILL at random points (by a timer, and by
fault injection right between an effect and its commit or in the middle of a write),
restarted each time, ends with the same target as one clean run of the same stream, and
no event takes visible effect twice.

The generated stream is built so that applying something twice would show: a file is
renamed (often over another) and a new file is created and written at the old name,
directories move and are removed, and task commands append their id to a file outside
the target (each id must appear at most once, and each task has exactly one result).
Mirrored files (header, data with holes, end with its digest) come between them, with
writes to other files in the middle of their data, as live capture interleaves them.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

from apply_helpers import PARTITION, append, differences, snapshot

from datatether.apply.applier import Applier
from datatether.apply.progress import Progress
from datatether.apply.tasks import TASK_NOT_RUN
from datatether.engine import codec, digest
from datatether.engine import events as ev
from datatether.engine.events import FileKind
from datatether.engine.log_embedded import EmbeddedLog
from datatether.engine.settings import Settings
from datatether.engine.states import TargetDataState

SOURCE = "/srv/source/set"
T0 = 1_600_000_000_000_000_000
EVENTS = 1500
MAX_CRASHES = 25

CHILD = r"""
import os, random, signal, sys
from datatether.apply import fsops, progress as progress_mod
from datatether.apply.applier import Applier
from datatether.apply.progress import Progress
from datatether.apply.tasks import TASK_NOT_RUN
from datatether.engine.log_embedded import EmbeddedLog
from datatether.engine.settings import Settings

log_dir, state, target, source, seed, faults = sys.argv[1:7]
rng = random.Random(int(seed))
faulty = faults == "1"

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_commit = Progress.commit
def commit(self, offset, **kw):
    if faulty and rng.random() < 0.02:
        die()  # effects done, commit not
    real_commit(self, offset, **kw)
Progress.commit = commit

real_pwrite = fsops.pwrite_all
def pwrite_all(fd, data, offset):
    if faulty and len(data) > 1 and rng.random() < 0.01:
        real_pwrite(fd, data[:len(data) // 2], offset)
        die()  # half a write
    real_pwrite(fd, data, offset)
fsops.pwrite_all = pwrite_all

log = EmbeddedLog(log_dir)
p = Progress(state)
a = Applier(log, "conn-1", target, source, p, Settings(retry_delay_s=0.01))
while a.run_once(max_events=int(rng.choice([1, 7, 50, 1000]))) or p.status.value != "OK":
    pass
a.close()
p.close()
log.close()
"""


class Stream:
    """A seeded random stream of replication events over a model of the source tree."""

    def __init__(self, seed: int, outside: str):
        self.rng = random.Random(seed)
        self.outside = outside
        self.dirs: list[str] = [""]
        self.files: list[str] = []
        self.others: list[str] = []
        self.n = 0
        self.tasks = 0
        self.ops: list = []

    def name(self, parent: str | None = None) -> str:
        self.n += 1
        parent = self.rng.choice(self.dirs) if parent is None else parent
        leaf = self.rng.choice(["f", "file ", "-x", "é", "\n"]) + str(self.n)
        return f"{parent}/{leaf}" if parent else leaf

    def data(self) -> bytes:
        return self.rng.randbytes(self.rng.choice([1, 3, 100, 4096, 9000]))

    def _moved(self, old: str, new: str) -> None:
        def move(p: str) -> str:
            return new + p[len(old):] if p == old or p.startswith(old + "/") else p
        self.dirs = [move(d) for d in self.dirs]
        self.files = [move(f) for f in self.files]
        self.others = [move(o) for o in self.others]

    def _removed(self, path: str) -> None:
        def keep(p: str) -> bool:
            return not (p == path or p.startswith(path + "/"))
        self.dirs = [d for d in self.dirs if keep(d)]
        self.files = [f for f in self.files if keep(f)]
        self.others = [o for o in self.others if keep(o)]

    def create(self) -> None:
        path = self.name()
        self.ops += [ev.Create(path, FileKind.FILE, 0o644, 0, 0, T0, T0), ev.Write(path, 0, self.data())]
        self.files.append(path)

    def step(self) -> None:
        r = self.rng
        kind = r.choices(["create", "write", "truncate", "punch", "attr", "xattr", "swap", "rename",
                          "link", "symlink", "unlink", "mkdir", "mvdir", "rmdir", "task", "barrier", "mirror"],
                         [8, 30, 5, 3, 4, 4, 8, 3, 3, 3, 4, 4, 2, 1, 2, 2, 4])[0]
        if kind in ("create",) or not self.files:
            self.create()
            return
        f = r.choice(self.files)
        if kind == "mirror":
            self.mirror(f if r.random() < 0.5 else self.name())
        elif kind == "write":
            self.ops.append(ev.Write(f, r.randrange(0, 70000), self.data()))
        elif kind == "truncate":
            self.ops.append(ev.Truncate(f, r.randrange(0, 70000)))
        elif kind == "punch":
            self.ops.append(ev.Fallocate(f, 0x3, r.randrange(0, 60000), r.randrange(1, 20000)))
        elif kind == "attr":
            self.ops.append(ev.SetAttr(f, mode=r.choice([0o600, 0o644, 0o755, 0o4755]), uid=r.randrange(3)))
        elif kind == "xattr":
            name = f"user.k{r.randrange(3)}"
            self.ops.append(ev.SetXattr(f, name, self.data()[:100]) if r.random() < 0.7 else ev.RemoveXattr(f, name))
        elif kind == "swap":  # the old name gets a new file: a replayed rename would clobber it
            dst = r.choice(self.files) if r.random() < 0.5 else self.name()
            if dst == f:
                return
            self.ops += [ev.Rename(f, dst), ev.Create(f, FileKind.FILE, 0o640, 0, 0, T0, T0),
                         ev.Write(f, 0, b"new at the old name " + self.data())]
            self._removed(dst)
            self.files += [dst, f]
        elif kind == "rename":
            dst = self.name()
            self.ops.append(ev.Rename(f, dst))
            self._moved(f, dst)
        elif kind == "link":
            dst = self.name()
            self.ops.append(ev.Link(f, dst))
            self.files.append(dst)
        elif kind == "symlink":
            dst = self.name()
            self.ops.append(ev.Symlink(dst, r.choice([SOURCE + "/" + f, "../rel", "/outside"]), 0, 0, T0))
            self.others.append(dst)
        elif kind == "unlink":
            victim = r.choice(self.files + self.others)
            self.ops.append(ev.Unlink(victim))
            self._removed(victim)
        elif kind == "mkdir":
            d = self.name()
            self.ops.append(ev.Create(d, FileKind.DIR, 0o755, 0, 0, T0, T0))
            self.dirs.append(d)
        elif kind in ("mvdir", "rmdir") and len(self.dirs) > 1:
            d = r.choice(self.dirs[1:])
            if kind == "rmdir":
                self.ops.append(ev.Rmdir(d, recursive=True))
                self._removed(d)
                return
            parent = r.choice([p for p in self.dirs if not (p == d or p.startswith(d + "/"))])
            dst = self.name(parent)
            self.ops.append(ev.Rename(d, dst))
            self._moved(d, dst)
        elif kind == "task":
            self.tasks += 1
            self.ops.append(ev.TaskCommand(f"task-{self.tasks}", "count",
                                           ["sh", "-c", f'echo "$DT_TASK_ID" >> {self.outside}']))
        elif kind == "barrier":
            self.ops.append(ev.Barrier(f))

    def mirror(self, path: str) -> None:
        """A whole file mirrored at ``path`` (replacing what is there), its data in pieces
        with holes between them and writes to other files in between."""
        r = self.rng
        size = r.choice([0, 5, 70000, 200000])
        content = bytearray(size)
        data = []
        position = 0
        while True:
            position += r.choice([0, 4096, 65536])  # a hole
            if position >= size:
                break
            piece = r.randbytes(min(size - position, r.choice([1, 5000, 65536, 100000])))
            content[position:position + len(piece)] = piece
            data.append(ev.MirrorData(path, position, piece))
            others = [f for f in self.files if f != path]
            if others and r.random() < 0.3:
                data.append(ev.Write(r.choice(others), r.randrange(0, 70000), self.data()))
            position += len(piece)
        blocks = [digest.block_digest(bytes(content[i:i + digest.DIGEST_BLOCK]))
                  for i in range(0, size, digest.DIGEST_BLOCK)]
        self.ops += [ev.MirrorStart(f"m{self.n}", "full"),
                     ev.MirrorFile(path, FileKind.FILE, 0o644, 0, 0, T0, T0, size), *data,
                     ev.MirrorFileEnd(path, size, digest.combine(blocks, size), T0 + 1),
                     ev.MirrorEnd(f"m{self.n}", size, 0, 1)]
        if path not in self.files:
            self.files.append(path)

    def build(self, count: int) -> list:
        while len(self.ops) < count:
            self.step()
        return self.ops


def clean_apply(tmp_path, ops) -> None:
    log = EmbeddedLog(tmp_path / "clean-log")
    log.ensure_partition(PARTITION)
    append(log, *ops)
    p = Progress(tmp_path / "clean-state")
    a = Applier(log, PARTITION, tmp_path / "clean", SOURCE, p, Settings(retry_delay_s=0.01))
    while a.run_once():
        pass
    assert p.data_state is TargetDataState.OK and p.status.value == "OK"
    a.close()
    p.close()
    log.close()


def crashing_apply(tmp_path, ops, rng: random.Random) -> int:
    """Apply in child processes killed again and again; return how many were killed."""
    log = EmbeddedLog(tmp_path / "log")
    log.ensure_partition(PARTITION)
    append(log, *ops)
    log.close()
    kills = 0
    for attempt in range(MAX_CRASHES + 1):
        last = attempt == MAX_CRASHES  # no faults, no timer: it must finish
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "log"), str(tmp_path / "state"),
                                  str(tmp_path / "crashed"), SOURCE, str(rng.randrange(1 << 30)),
                                  "0" if last else "1"])
        try:
            child.wait(timeout=120 if last else rng.uniform(0.3, 1.5))
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait()
        if child.returncode == 0:
            return kills
        assert child.returncode == -signal.SIGKILL, f"applier process failed: {child.returncode}"
        kills += 1
    raise AssertionError("the applier never finished")


def test_killed_and_restarted_applier_ends_like_a_clean_run(tmp_path):
    seed = int(os.environ.get("DT_CRASH_SEED", time.time_ns() % 100000))
    print(f"DT_CRASH_SEED={seed}")
    clean_tasks, crash_tasks = tmp_path / "clean-tasks.txt", tmp_path / "crash-tasks.txt"
    ops = Stream(seed, str(clean_tasks)).build(EVENTS)
    crash_ops = Stream(seed, str(crash_tasks)).build(EVENTS)
    clean_apply(tmp_path, ops)
    kills = crashing_apply(tmp_path, crash_ops, random.Random(seed))
    print("kills", kills)
    assert kills > 0

    assert differences(snapshot(tmp_path / "crashed", file_mtimes=False, dir_mtimes=False),
                       snapshot(tmp_path / "clean", file_mtimes=False, dir_mtimes=False)) == []

    ran = crash_tasks.read_text().split() if crash_tasks.exists() else []
    assert len(ran) == len(set(ran)), "a task command ran twice"
    log = EmbeddedLog(tmp_path / "log")
    results = [op for op in (codec.decode(r.value).op for r in log.read(PARTITION, 0, max_records=10**6))
               if isinstance(op, ev.TaskResult)]
    log.close()
    assert sorted(r.task_id for r in results) == sorted(clean_tasks.read_text().split()), \
        "each task has exactly one result"
    for result in results:  # a task that did not run says so (it was interrupted by a kill)
        assert result.task_id in ran or result.exit_status == TASK_NOT_RUN
    p = Progress(tmp_path / "state")
    assert p.data_state is TargetDataState.OK and p.applied_offset == len(crash_ops) + len(results) - 1
    p.close()
