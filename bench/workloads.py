"""Deterministic data for benchmarks: trees of files, big files, block changes."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

_CHUNK = 1 << 20


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


def same_content(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(_CHUNK), fb.read(_CHUNK)
            if x != y:
                return False
            if not x:
                return True


class Protected:
    """`dt protect` running on a fresh source/target pair for the duration of a block."""

    def __init__(self, work: Path, name: str):
        self.source, self.target, self.state = work / f"{name}-src", work / f"{name}-dst", work / f"{name}-state"

    def __enter__(self) -> "Protected":
        self.source.mkdir()
        self.proc = subprocess.Popen(["dt", "protect", str(self.source), "--to", str(self.target),
                                      "--state", str(self.state)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = self.status()
            if st.get("replication_status") == "Replicating" and st.get("target_data_state") == "OK":
                return self
            if self.proc.poll() is not None:
                raise RuntimeError("dt protect exited during start-up")
            time.sleep(0.2)
        raise RuntimeError("dt protect did not reach Replicating/OK within 60 s")

    def status(self) -> dict:
        out = subprocess.run(["dt", "status", "--json", "--state", str(self.state)], capture_output=True, text=True)
        if out.returncode != 0 or not out.stdout.strip():
            return {}
        data = json.loads(out.stdout)
        conns = data.get("connections", data) if isinstance(data, dict) else data
        return conns[0] if conns else {}

    def drain(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            if st.get("queued_ops", st.get("queued_operations", 1)) == 0:
                return
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        for d in (self.source, self.target, self.state):
            shutil.rmtree(d, ignore_errors=True)


class Lsyncd:
    """lsyncd in rsync mode with delay = 0 between a fresh source and target."""

    def __init__(self, work: Path, name: str):
        self.source, self.target, self.conf = work / f"{name}-src", work / f"{name}-dst", work / f"{name}.lua"

    def __enter__(self) -> "Lsyncd":
        self.source.mkdir()
        self.target.mkdir()
        self.conf.write_text(
            'settings { nodaemon = true, inotifyMode = "CloseWrite or Modify" }\n'
            f'sync {{ default.rsync, source = "{self.source}", target = "{self.target}", delay = 0 }}\n')
        self.proc = subprocess.Popen(["lsyncd", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)  # lsyncd's start-up rsync of the (empty) tree
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        for d in (self.source, self.target):
            shutil.rmtree(d, ignore_errors=True)
        self.conf.unlink()


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
