"""A `dt protect` process for tests, and a seeded file workload to run against its source.

``Protected(src, dst, state)`` starts the real command in a subprocess (stdout and stderr go
to files beside the state directory), waits until the capture is mounted and the control
API answers, and offers status, convergence, SIGTERM and SIGKILL. Teardown kills what is
left and removes a stale mount with ``fusermount3 -uz``.

``workload(root, seed, ops)`` performs a reproducible mix of creates, writes at random
offsets, appends, truncates, renames (also over existing files), hard links, symlinks,
chmod, mkdir, rmdir and deletes under ``root``; it tolerates failures (a capture that was
killed under it), so it can also run while a daemon dies.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from datatether.engine.api import ApiClient
from datatether.engine.daemon import DaemonLock
from datatether.engine.errors import DtError

DT = [sys.executable, "-m", "datatether.tools"]
REPO = Path(__file__).resolve().parent.parent


def dt(*args: str, state: Path | str | None = None, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run one `dt` command; ``--state`` added (right after the command name) when given."""
    argv = [*DT, args[0], *(["--state", str(state)] if state is not None else []), *args[1:]]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and done.returncode != 0:
        raise AssertionError(f"dt {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done


def wait_for(predicate, timeout: float = 60.0, what: str = "condition", poll: float = 0.05):
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


class Protected:
    """A running `dt protect SRC --to DST --state STATE [extra...]`."""

    def __init__(self, src: Path, dst: Path, state: Path, *extra: str):
        self.src, self.dst, self.state, self.extra = Path(src), Path(dst), Path(state), extra
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    # -- life cycle --------------------------------------------------------------------------

    def start(self, wait: bool = True) -> Protected:
        self.runs += 1
        self.out = self.state.parent / f"protect-{self.runs}.out"
        self.err = self.state.parent / f"protect-{self.runs}.err"
        under = os.stat(self.src).st_dev
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [*DT, "protect", str(self.src), "--to", str(self.dst), "--state", str(self.state),
                 "--status-interval", "0.5", "--log-level", "info", *self.extra],
                stdout=out, stderr=err, cwd=REPO, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        if wait:
            wait_for(lambda: self._exited() or (os.stat(self.src).st_dev != under and self._answers()),
                     60, "the capture mount and the control API")
            if self._exited():
                raise AssertionError(f"dt protect exited {self.proc.returncode}: {self.err.read_text()[-3000:]}")
        return self

    def _exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def _answers(self) -> bool:
        try:
            self.status()
            return True
        except (DtError, OSError):
            return False

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM and wait; the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, then remove the dead mount the way an operator would."""
        self.proc.kill()
        self.proc.wait(60)
        unmount(self.src)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        unmount(self.src)

    # -- asking it ---------------------------------------------------------------------------

    def client(self) -> ApiClient:
        holder = DaemonLock(self.state, os.path.realpath(self.src)).holder()
        if holder is None:
            raise AssertionError("no daemon holds the lock of the source")
        return ApiClient(holder["socket"])

    def call(self, op: str, args: dict | None = None, timeout_s: float | None = 60):
        with self.client() as client:
            return client.call(op, args, timeout_s=timeout_s)

    def status(self) -> dict:
        return self.call("status")

    def converged(self, timeout: float = 120) -> dict:
        """Wait until every mirror is done and every captured change is applied."""
        def done():
            if self._exited():
                raise AssertionError(f"dt protect exited {self.proc.returncode}: {self.err.read_text()[-3000:]}")
            s = self.status()
            ok = (s["state"] == "replicating" and s["mirror_status"] == "Idle" and s["queued_ops"] == 0
                  and s["replication_status"] == "Ready" and s["target_data_state"] == "OK")
            return s if ok else None
        return wait_for(done, timeout, "the target to converge")

    def saved_status(self) -> dict:
        done = dt("status", "--json", state=self.state, check=True)
        return json.loads(done.stdout)["connections"][0]


def unmount(path: Path) -> None:
    """Remove a capture mount left by a killed daemon (nothing when there is none)."""
    subprocess.run(["fusermount3", "-u", "-z", "-q", str(path)], capture_output=True)


# -- workload -------------------------------------------------------------------------------------

def workload(root: str | os.PathLike, seed: int, ops: int, *, max_size: int = 64 << 10) -> dict:
    """Reproducible file operations under ``root``; returns counts of done and failed ops."""
    rnd = random.Random(seed)
    root = Path(root)
    counts = {"done": 0, "failed": 0}

    def files() -> list[Path]:
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            found += [Path(dirpath, f) for f in sorted(filenames) if not os.path.islink(os.path.join(dirpath, f))]
        return found

    def dirs() -> list[Path]:
        found = [root]
        for dirpath, dirnames, _ in os.walk(root):
            dirnames.sort()
            found += [Path(dirpath, d) for d in dirnames]
        return found

    def name(where: Path, prefix: str) -> Path:
        return where / f"{prefix}{rnd.randrange(1000):03d}"

    def step(kind: str) -> None:
        existing = files()
        if kind == "create" or not existing:
            path = name(rnd.choice(dirs()), "f")
            path.write_bytes(rnd.randbytes(rnd.randrange(max_size)))
            return
        path = rnd.choice(existing)
        if kind == "write":
            with open(path, "r+b") as f:
                f.seek(rnd.randrange(max_size))
                f.write(rnd.randbytes(rnd.randrange(1, 8192)))
        elif kind == "append":
            with open(path, "ab") as f:
                f.write(rnd.randbytes(rnd.randrange(1, 4096)))
        elif kind == "truncate":
            os.truncate(path, rnd.randrange(max_size))
        elif kind == "rename":
            os.rename(path, name(rnd.choice(dirs()), "r"))
        elif kind == "rename_over":
            other = rnd.choice(existing)
            if other != path:
                os.rename(path, other)
        elif kind == "link":
            os.link(path, name(path.parent, "h"))
        elif kind == "symlink":
            os.symlink(os.path.relpath(path, path.parent), name(path.parent, "s"))
        elif kind == "chmod":
            os.chmod(path, rnd.choice([0o600, 0o644, 0o640, 0o755]))
        elif kind == "mkdir":
            os.mkdir(name(rnd.choice(dirs()), "d"))
        elif kind == "rmdir":
            empty = [d for d in dirs() if d != root and not os.listdir(d)]
            if empty:
                os.rmdir(rnd.choice(empty))
        elif kind == "unlink":
            os.unlink(path)

    kinds = (["create"] * 4 + ["write"] * 6 + ["append"] * 2 + ["truncate", "rename", "rename_over", "link",
             "symlink", "chmod", "mkdir", "rmdir", "unlink"])
    for _ in range(ops):
        kind = rnd.choice(kinds)
        try:
            step(kind)
            counts["done"] += 1
        except OSError:
            counts["failed"] += 1
    return counts


def make_tree(root: Path, seed: int = 7, files: int = 20, big: int = 0) -> None:
    """Pre-existing files for an initial mirror (and one ``big`` file, when asked)."""
    rnd = random.Random(seed)
    for i in range(files):
        path = root / f"dir{i % 4}" / f"file{i:02d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rnd.randbytes(rnd.randrange(1, 40_000)))
    if big:
        (root / "big.bin").write_bytes(rnd.randbytes(big))


if __name__ == "__main__":  # python tests/daemon_helpers.py ROOT SEED OPS: a workload process
    print(json.dumps(workload(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
