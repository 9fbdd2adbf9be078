"""Crash test: `dt mirror` killed with SIGKILL at random points, restarted, converges.

Each kill lands somewhere in walking, reading, appending, applying or saving the position;
the next run drains what the log holds, resumes the mirror from its saved position and
must end with a replica identical to the source (bytes and metadata) and a clean
`dt verify --checksum`.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

from trees import diff_trees, make_odd_tree

KILLS = 4


def make_busy_tree(root, rnd):
    for d in range(8):
        for f in range(25):
            path = root / f"dir{d}" / f"file{f:02d}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rnd.randbytes(rnd.randint(0, 200_000)))
    for name in ("large-1", "large-2"):
        (root / name).write_bytes(rnd.randbytes(6 << 20))


def dt(state, *args):
    return [sys.executable, "-m", "datatether.tools", *args, "--state", str(state)]


def test_sigkill_at_random_points_then_restart_converges(tmp_path):
    seed = int(os.environ.get("DT_CRASH_SEED", time.time_ns() % 100_000))
    rnd = random.Random(seed)
    src, dst, state = tmp_path / "src", tmp_path / "dst", tmp_path / "state"
    make_odd_tree(src, outside=tmp_path / "outside")
    make_busy_tree(src / "busy", rnd)
    kills = []
    for _ in range(KILLS):
        proc = subprocess.Popen(dt(state, "mirror", str(src), str(dst)), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        delay = rnd.uniform(0.3, 1.3)
        try:
            proc.wait(timeout=delay)
            kills.append(f"finished before {delay:.2f}s")
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills.append(f"killed at {delay:.2f}s")
    final = subprocess.run(dt(state, "mirror", str(src), str(dst)), capture_output=True, text=True, timeout=300)
    context = f"seed={seed} {kills}: {final.stdout} {final.stderr}"
    assert final.returncode == 0, context
    assert diff_trees(src, dst, holes=True) == [], context
    verify = subprocess.run(dt(state, "verify", "--checksum", str(src), str(dst)), capture_output=True,
                            text=True, timeout=300)
    assert verify.returncode == 0, context + verify.stdout
