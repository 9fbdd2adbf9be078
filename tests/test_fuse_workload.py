"""End to end on a real FUSE mount: capture -> EmbeddedLog -> Applier, under a seeded random
workload from several processes at once plus an fio job that verifies its own data; once
the queue is drained the target equals the source, bytes and metadata (diff_trees).

Each worker process works in its own directory of the set and its own part of the
excluded subtree (so the workload stays reproducible: no two processes race for one
name), and all of them write disjoint ranges of one shared file at the same time. The
operations: creates, writes at random offsets, appends, truncates, renames within the set,
into it from the excluded part and out of it, hard links, symlinks (relative, absolute
inside the set for RemapLink, absolute outside), chmod, chown, xattrs, deletes, mkdir,
rmdir and writes through a shared mmap.

The workers' seeds are DT_WORKLOAD_SEED (default 100) plus their number: a seed sweep
runs the test again with other values (a failure message names the seed).

Run as a script (``python test_fuse_workload.py worker ROOT NAME SEED OPS``) it is one
worker process.
"""

from __future__ import annotations

import mmap
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import need
from trees import diff_trees

from datatether.apply.applier import Applier
from datatether.apply.progress import Progress
from datatether.capture.fuse import FuseCapture
from datatether.engine import codec
from datatether.engine.log_embedded import EmbeddedLog
from datatether.engine.settings import Settings

PARTITION = "workload"
WORKERS = 3
OPS_PER_WORKER = 300
SHARED = "shared.bin"
SHARED_SLICE = 64 << 10
FIO_SIZE = "8M"
TIMEOUT_S = 300
SEED = int(os.environ.get("DT_WORKLOAD_SEED", "100"))


# -- the worker (runs in its own process) --------------------------------------------------

def worker(root: str, name: str, seed: int, ops: int) -> None:
    rnd = random.Random(seed)
    root_p = Path(root)
    home, away = root_p / name, root_p / "excl" / name
    home.mkdir()
    away.mkdir(parents=True)

    def files(where: Path) -> list[Path]:
        return sorted(p for p in where.rglob("*") if p.is_file() and not p.is_symlink())

    def dirs(where: Path) -> list[Path]:
        return [where] + sorted(p for p in where.rglob("*") if p.is_dir() and not p.is_symlink())

    def fresh(where: Path, prefix: str) -> Path:
        while True:
            path = where / f"{prefix}{rnd.randrange(10**6):06d}"
            if not os.path.lexists(path):
                return path

    def single(candidates: list[Path]) -> list[Path]:
        # Hard links that cross the set's boundary are not linked on the target (by design):
        # only files with one name move in and out.
        return [p for p in candidates if os.lstat(p).st_nlink == 1]

    def step(kind: str) -> None:
        mine = files(home)
        if kind == "create" or not mine:
            fresh(rnd.choice(dirs(home)), "f").write_bytes(rnd.randbytes(rnd.randrange(1, 96 << 10)))
            return
        path = rnd.choice(mine)
        if kind == "write":
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, rnd.randbytes(rnd.randrange(1, 16 << 10)), rnd.randrange(128 << 10))
            finally:
                os.close(fd)
        elif kind == "append":
            with open(path, "ab") as f:
                f.write(rnd.randbytes(rnd.randrange(1, 4096)))
        elif kind == "truncate":
            os.truncate(path, rnd.randrange(64 << 10))
        elif kind == "mmap":
            size = os.path.getsize(path)
            if size:
                with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
                    at = rnd.randrange(size)
                    chunk = rnd.randbytes(min(rnd.randrange(1, 9000), size - at))
                    m[at:at + len(chunk)] = chunk
                    if rnd.random() < 0.5:
                        m.flush()
        elif kind == "rename":
            os.rename(path, fresh(rnd.choice(dirs(home)), "r"))
        elif kind == "rename_over":
            other = rnd.choice(mine)
            if other != path:
                os.rename(path, other)
        elif kind == "move_out":
            if single([path]):
                os.rename(path, fresh(away, "o"))
        elif kind == "move_in":
            outside = single(files(away))
            if outside:
                os.rename(rnd.choice(outside), fresh(rnd.choice(dirs(home)), "i"))
        elif kind == "link":
            os.link(path, fresh(path.parent, "h"))
        elif kind == "symlink":
            target = rnd.choice([os.path.relpath(path, path.parent), str(path), "/etc/hostname"])
            os.symlink(target, fresh(path.parent, "s"))
        elif kind == "chmod":
            os.chmod(path, rnd.choice([0o600, 0o644, 0o640, 0o755, 0o4755]))
        elif kind == "chown":
            os.chown(path, rnd.choice([0, 1000, 4321]), rnd.choice([0, 100, 4321]))
        elif kind == "xattr":
            key = f"user.k{rnd.randrange(3)}"
            if key in os.listxattr(path) and rnd.random() < 0.4:
                os.removexattr(path, key)
            else:
                os.setxattr(path, key, rnd.randbytes(rnd.randrange(1, 64)))
        elif kind == "mkdir":
            fresh(rnd.choice(dirs(home)), "d").mkdir()
        elif kind == "rmdir":
            empty = [d for d in dirs(home) if d != home and not any(d.iterdir())]
            if empty:
                rnd.choice(empty).rmdir()
        elif kind == "move_dir":
            candidates = [d for d in dirs(home) if d != home]
            if candidates and rnd.random() < 0.5:
                chosen = rnd.choice(candidates)
                if all(single([p]) for p in files(chosen)):
                    os.rename(chosen, fresh(away, "D"))
            elif any(away.iterdir()):
                moved = [d for d in dirs(away) if d != away and all(single([p]) for p in files(d))]
                if moved:
                    os.rename(rnd.choice(moved), fresh(home, "M"))
        elif kind == "unlink":
            os.unlink(path)

    kinds = (["create"] * 5 + ["write"] * 8 + ["append"] * 2 + ["truncate"] * 2 + ["mmap"] * 2
             + ["rename", "rename_over", "move_out", "move_in", "link", "symlink", "chmod", "chown",
                "xattr", "mkdir", "rmdir", "move_dir", "unlink"])
    shared = os.open(root_p / SHARED, os.O_WRONLY)
    slot = int(name[1:])
    for i in range(ops):
        step(rnd.choice(kinds))
        os.pwrite(shared, rnd.randbytes(512), slot * SHARED_SLICE + (i * 512) % SHARED_SLICE)
    os.close(shared)


# -- the test --------------------------------------------------------------------------

@pytest.fixture
def rig(fuse_available, tmp_path):
    need(shutil.which("fio") is not None, "fio", "tools/install.sh --test (Debian package fio)")
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "excl").mkdir(parents=True)
    dst.mkdir()
    (src / SHARED).write_bytes(b"\0" * (WORKERS * SHARED_SLICE))
    return src, dst, tmp_path


def in_set(rel: str, is_dir: bool) -> bool:
    return rel != "excl" and not rel.startswith("excl/")


def test_random_workload_and_fio_end_with_an_identical_target(rig):
    src, dst, tmp = rig
    settings = Settings(max_write_buffer=64 << 10)
    log = EmbeddedLog(tmp / "log")
    log.ensure_partition(PARTITION)
    # The target starts as the source did (the initial mirror is not what this test is about).
    shutil.copyfile(src / SHARED, dst / SHARED)
    for rel in (SHARED, ""):
        st = os.stat(src / rel)
        os.utime(dst / rel, ns=(st.st_atime_ns, st.st_mtime_ns))
    gaps: list[str] = []

    def sink(events):
        log.append(PARTITION, [codec.encode(e) for e in events])

    applier = Applier(log, PARTITION, dst, str(src), Progress(tmp / "target-state"), settings)
    stop = threading.Event()
    applying = threading.Thread(target=applier.run, args=(stop,), daemon=True)
    applying.start()
    capture = FuseCapture(src, sink, settings, matches=in_set, on_gap=gaps.append)
    capture.start()
    try:
        workers = [subprocess.Popen([sys.executable, __file__, "worker", str(src), f"w{i}", str(SEED + i),
                                     str(OPS_PER_WORKER)], stderr=subprocess.PIPE, text=True)
                   for i in range(WORKERS)]
        fio = subprocess.run(["fio", "--name=verify", f"--filename={src / 'fio.dat'}", f"--size={FIO_SIZE}",
                              "--rw=randwrite", "--bs=4k", "--ioengine=psync", "--verify=crc32c",
                              "--do_verify=1", "--fsync=64", "--randseed=7", "--output-format=terse",
                              "--verify_state_save=0"],  # else fio leaves a state file in the cwd
                             capture_output=True, text=True, timeout=TIMEOUT_S)
        assert fio.returncode == 0, fio.stderr
        for w in workers:
            _, err = w.communicate(timeout=TIMEOUT_S)
            assert w.returncode == 0, f"seed {SEED}: worker {w.args[4]} exited {w.returncode}: {err[-3000:]}"
    finally:
        capture.stop()  # every event is in the log once it returns
    try:
        end = log.end_offset(PARTITION)
        deadline = time.monotonic() + TIMEOUT_S
        while applier.applied_offset < end - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert applier.applied_offset == end - 1
    finally:
        stop.set()
        applying.join()
        applier.close()
        log.close()
    assert not gaps, f"seed {SEED}"
    ignored = lambda rel: rel == "excl"  # noqa: E731 - excluded by the set's rules
    remap = lambda target: str(dst) + target[len(str(src)):] if target.startswith(str(src) + "/") else target  # noqa: E731
    assert diff_trees(src, dst, ignore=ignored, link_map=remap) == [], f"seed {SEED}"


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
