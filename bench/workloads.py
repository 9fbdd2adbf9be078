"""Deterministic data for benchmarks: trees of files, big files, block changes."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

_CHUNK = 1 << 20


def _dt_script() -> str:
    """The ``dt`` console script beside this interpreter when it is a Python script: the
    ``dt`` on PATH may be a version manager's shell shim (pyenv's costs ~0.1 s a call),
    which rsync and cp, run directly, do not pay."""
    script = Path(sys.executable).parent / "dt"
    try:
        with script.open("rb") as f:
            first = f.readline()
    except OSError:
        return "dt"
    return str(script) if first.startswith(b"#!") and b"python" in first else "dt"


DT = _dt_script()  # what every benchmark runs as `dt`


def _payload(rng: random.Random, n: int) -> bytes:
    # Half random, half repeated text: compresses a little, like real data.
    half = n // 2
    return rng.randbytes(half) + (b"datatether benchmark line\n" * (n // 26 + 1))[: n - half]


def make_file(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(_CHUNK, left)
            f.write(_payload(rng, n))
            left -= n


def make_tree(root: Path, files: int, total_bytes: int, seed: int) -> None:
    """``files`` files spread over nested directories, sizes log-normally distributed
    around the mean so that a few large files hold much of the data."""
    rng = random.Random(seed)
    mean = max(1, total_bytes // max(1, files))
    sizes = [max(0, int(rng.lognormvariate(0, 1.0) * mean / 1.65)) for _ in range(files)]
    for i, size in enumerate(sizes):
        d = root / f"d{i % 50:02d}" / f"e{(i // 50) % 20:02d}"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"file-{i:06d}.dat", "wb") as f:
            f.write(_payload(rng, size))


def change_blocks(path: Path, fraction: float, block: int, seed: int) -> int:
    """Overwrite ``fraction`` of the file's blocks (at random places) with new bytes."""
    rng = random.Random(seed)
    size = os.path.getsize(path)
    blocks = max(1, size // block)
    chosen = rng.sample(range(blocks), max(1, int(blocks * fraction)))
    with open(path, "r+b") as f:
        for b in chosen:
            f.seek(b * block + rng.randrange(block // 2))
            f.write(rng.randbytes(64))
    return len(chosen)


def same_tree(a: Path, b: Path) -> bool:
    """The same relative names, and every regular file with the same bytes."""
    def names(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    if names(a) != names(b):
        return False
    return all(same_content(p, b / p.relative_to(a)) for p in a.rglob("*") if p.is_file())


def same_content(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(_CHUNK), fb.read(_CHUNK)
            if x != y:
                return False
            if not x:
                return True


class Protected:
    """`dt protect` running on a fresh source/target pair for the duration of a block.

    Entering returns once the initial mirror (of the empty source) is applied and live
    replication runs (``dt status --json``: state "replicating", mirror Idle, target data
    state OK, capture running). ``drain`` waits until the target applied everything
    captured; leaving stops the daemon with SIGTERM (it unmounts and drains) and removes
    the directories. The daemon's stderr goes to ``<name>-protect.err`` in the work dir.
    """

    START_S = 60.0

    def __init__(self, work: Path, name: str, *extra: str):
        self.source, self.target, self.state = work / f"{name}-src", work / f"{name}-dst", work / f"{name}-state"
        self.err = work / f"{name}-protect.err"
        self.extra = extra

    def __enter__(self) -> "Protected":
        self.source.mkdir()
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen([DT, "protect", str(self.source), "--to", str(self.target),
                                          "--state", str(self.state), "--status-interval", "3600", *self.extra],
                                         stdout=subprocess.DEVNULL, stderr=err)
        try:
            self._await(_live, self.START_S, "live replication after the initial mirror")
        except BaseException:
            self.__exit__()
            raise
        return self

    def status(self) -> dict:
        """This connection's entry of `dt status --json` ({} while the daemon does not answer)."""
        out = subprocess.run([DT, "status", "--json", "--state", str(self.state)], capture_output=True, text=True)
        if out.returncode != 0 or not out.stdout.strip():
            return {}
        conns = json.loads(out.stdout).get("connections") or [{}]
        return conns[0]

    def drain(self, timeout: float = 300) -> dict:
        """Wait until every captured event is applied; the final status."""
        return self._await(_drained, timeout, "the queue to drain")

    def _await(self, done, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dt protect exited {self.proc.returncode} waiting for {what}: "
                                   f"{self.err.read_text()[-2000:]}")
            st = self.status()
            if done(st):
                return st
            time.sleep(0.2)
        raise RuntimeError(f"dt protect: no {what} within {timeout} s (last status {self.status()})")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=300)
        finally:
            subprocess.run(["fusermount3", "-u", "-z", "-q", str(self.source)], capture_output=True)
            for d in (self.source, self.target, self.state):
                shutil.rmtree(d, ignore_errors=True)


def _live(st: dict) -> bool:
    return (st.get("state") == "replicating" and st.get("mirror_status") == "Idle"
            and st.get("target_data_state") == "OK" and st.get("capture") == "running")


def _drained(st: dict) -> bool:
    return bool(st) and st["queued_ops"] == 0 and st["applied_offset"] == st["end_offset"] - 1


class Passthrough:
    """The capture's FUSE mount over a fresh directory with nothing in its set: every
    operation passes through the same filesystem code as under `dt protect`, and nothing
    is captured (no event, no log). Served by threads of this process, as the daemon's
    mount is served by threads of its own. It shows what the FUSE layer costs by itself."""

    def __init__(self, work: Path, name: str):
        self.path = work / name

    def __enter__(self) -> Path:
        from datatether.capture.fuse import FuseCapture
        self.path.mkdir()
        self.capture = FuseCapture(self.path, lambda events: None, matches=lambda rel, is_dir: False)
        self.capture.start()
        return self.path

    def __exit__(self, *exc) -> None:
        self.capture.stop()
        shutil.rmtree(self.path)


class CPassthrough:
    """bench/fuse_passthrough.c, built with gcc against libfuse 3 and mounted over a fresh
    directory: the least any FUSE filesystem costs on this machine (C handlers, nothing
    captured), the yardstick for what the capture's own mount leaves. Entering returns
    the mounted directory once the kernel shows the mount; leaving unmounts it and removes
    the directory."""

    SOURCE = Path(__file__).with_name("fuse_passthrough.c")
    MOUNT_S = 10.0

    def __init__(self, work: Path, name: str):
        self.path, self.binary = work / name, work / "fuse_passthrough"

    def __enter__(self) -> Path:
        if not self.binary.exists():
            flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], check=True,
                                   capture_output=True, text=True).stdout.split()
            subprocess.run(["gcc", "-O2", "-o", str(self.binary), str(self.SOURCE), *flags], check=True)
        self.path.mkdir()
        self.proc = subprocess.Popen([str(self.binary), "-f", "-o", "max_threads=4", str(self.path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.MOUNT_S
        while not os.path.ismount(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"{self.binary} did not mount {self.path}")
            time.sleep(0.05)
        return self.path

    def __exit__(self, *exc) -> None:
        subprocess.run(["fusermount3", "-u", "-z", "-q", str(self.path)], capture_output=True)
        try:
            self.proc.wait(timeout=30)
        finally:
            shutil.rmtree(self.path, ignore_errors=True)


class Lsyncd:
    """lsyncd in rsync mode with delay = 0 between a fresh source and target.

    Its default inotify mode (CloseWrite): a file still open for writing, like a
    benchmark's load file, is synced once closed; new small files are synced at once.
    Entering returns once lsyncd's start-up sync is done (a marker file made before it
    started is on the target) and its inotify watches are set."""

    def __init__(self, work: Path, name: str):
        self.source, self.target = work / f"{name}-src", work / f"{name}-dst"
        self.conf, self.log = work / f"{name}.lua", work / f"{name}.log"

    def __enter__(self) -> "Lsyncd":
        self.source.mkdir()
        self.target.mkdir()
        (self.source / ".started").write_bytes(b"")
        self.conf.write_text(
            f'settings {{ nodaemon = true, logfile = "{self.log}" }}\n'
            f'sync {{ default.rsync, source = "{self.source}/", target = "{self.target}/", delay = 0 }}\n')
        self.proc = subprocess.Popen(["lsyncd", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not (self.target / ".started").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"lsyncd did not start: {self.log.read_text()[-2000:] if self.log.exists() else ''}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=30)
        for d in (self.source, self.target):
            shutil.rmtree(d, ignore_errors=True)
        self.conf.unlink(missing_ok=True)


class Probe:
    """Writes a small new file every 20 ms and measures when each appears, complete, on
    the target: the same measurement for every replicator."""

    INTERVAL = 0.02

    def __init__(self, source: Path, target: Path):
        self.source, self.target = source / "probe", target / "probe"
        self.latencies: list[float] = []

    def __enter__(self) -> "Probe":
        self.source.mkdir(exist_ok=True)
        self.stop = threading.Event()
        self.pending: dict[str, float] = {}
        self.lock = threading.Lock()
        self.writer = threading.Thread(target=self._write, daemon=True)
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.writer.start()
        self.watcher.start()
        return self

    def _write(self) -> None:
        i = 0
        while not self.stop.is_set():
            name = f"p-{i:06d}"
            t = time.perf_counter()
            (self.source / name).write_bytes(b"x" * 100)
            with self.lock:
                self.pending[name] = t
            i += 1
            time.sleep(self.INTERVAL)

    def _watch(self) -> None:
        while not self.stop.is_set() or self.pending:
            with self.lock:
                names = list(self.pending.items())
            for name, t in names:
                try:
                    if os.stat(self.target / name).st_size == 100:
                        self.latencies.append((time.perf_counter() - t) * 1000)
                        with self.lock:
                            del self.pending[name]
                except FileNotFoundError:
                    pass
            time.sleep(0.0005)
            if self.stop.is_set() and time.perf_counter() > self.deadline:
                break

    def __exit__(self, *exc) -> None:
        self.deadline = time.perf_counter() + 10  # probes not replicated by then count as lost
        self.stop.set()
        self.writer.join()
        self.watcher.join()

    def percentiles(self) -> dict[int, float]:
        data = sorted(self.latencies)
        if not data:
            return {50: float("nan"), 99: float("nan")}
        return {p: data[min(len(data) - 1, int(len(data) * p / 100))] for p in (50, 99)}
