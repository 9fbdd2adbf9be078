#!/usr/bin/env python3
"""Benchmarks: datatether measured side by side with rsync, cp, lsyncd and raw Kafka.

Every comparison runs both tools in the same run, on the same data, with a warm page
cache for all, and prints one table of ratios against the targets in the issues:

  mirror-full      full mirror of a ~2 GB / 20,000-file tree      vs rsync -a, cp -a    (<= 1.0 x rsync)
  mirror-checksum  1 GB file with 1 % of its blocks changed        vs rsync -I --no-whole-file --inplace (<= 0.5 x)
  mirror-memory    peak RSS of a mirror of 100,000 small files                          (< 300 MB)
  capture-seq      1 MiB sequential writes through the FUSE capture vs the same disk    (>= 0.5 x)
                   (and, shown, through the capture's mount capturing nothing and through
                   a C passthrough FUSE mount, bench/fuse_passthrough.c: what FUSE costs alone)
  rpo-latency      p50/p99 write-to-applied latency, 4 KiB random writes at 20 MB/s
                   vs lsyncd (rsync mode, delay = 0) on the same workload               (p99 < 20 ms)
  kafka-e2e        replication throughput through Kafka vs raw produce+consume          (ratio shown)
  restore          restore-at-offset of a 1 GB tree                                      (time shown)

Usage: bench/run.py [--scale full|small] [--only NAME ...] [--workdir DIR]
`--scale small` divides sizes by 10 for a quick look; the targets are judged on `full`.

Deleting many files skews the next runs on ext4 without a journal (this machine's root
file system): for a minute after an inode is freed, and for six while its inode table
block is dirty (new inodes written beside it make it dirty again), every file created in
its block group scans past it (the kernel's recently_deleted()). After `rm -rf` of a
20,000-file tree, rsync -a of the tree took 6-8 s instead of 2.4-2.6 s, and dt 6-9 s
instead of 4.1-4.3 s. So no tree is removed between timed tools; trees are removed at
the end of a benchmark (and written back); between two runs, wait six minutes.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workloads  # noqa: E402  (bench/workloads.py, beside this file)
import kafka  # noqa: E402  (bench/kafka.py)


@dataclass
class Row:
    name: str
    ours: float
    theirs: float | None
    ref_tool: str
    unit: str
    target: str
    ok: bool | None

    @property
    def ratio(self) -> str:
        return f"{self.ours / self.theirs:.2f}" if self.theirs else "-"


def timed(cmd: list[str], **kw) -> float:
    os.sync()  # every tool starts with no dirty pages of the one before (write-back throttling)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - start


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak resident set size in MB) of a child process, from wait4's rusage."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[0]} failed with {os.waitstatus_to_exitcode(status)}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def dt(state: Path, *args: str) -> list[str]:
    return [workloads.DT, *args, "--state", str(state)]


def bench_mirror_full(work: Path, scale: float) -> list[Row]:
    src = work / "full-src"
    workloads.make_tree(src, files=int(20_000 * scale), total_bytes=int(2e9 * scale), seed=1)
    t_rsync = timed(["rsync", "-a", f"{src}/", str(work / "full-rsync")])
    t_cp = timed(["cp", "-a", str(src), str(work / "full-cp")])
    t_dt = timed(dt(work / "state-full", "mirror", str(src), str(work / "full-dt")))
    same = workloads.same_tree(src, work / "full-dt")
    for d in ("full-rsync", "full-cp", "full-dt", "state-full"):
        shutil.rmtree(work / d)
    os.sync()  # freed inodes' table blocks written back (see the module docstring)
    return [Row("mirror-full (s)", t_dt, t_rsync, "rsync -a", "s", "<= 1.0 x rsync", same and t_dt <= t_rsync),
            Row("mirror-full vs cp (s)", t_dt, t_cp, "cp -a", "s", "shown", None)]


def bench_mirror_checksum(work: Path, scale: float) -> list[Row]:
    size = int((1 << 30) * scale)
    src_dir, a, b = work / "ck-src", work / "ck-rsync", work / "ck-dt"
    for d in (src_dir, a, b):
        d.mkdir()
    workloads.make_file(src_dir / "big", size, seed=2)
    shutil.copy2(src_dir / "big", a / "big")
    shutil.copy2(src_dir / "big", b / "big")
    workloads.change_blocks(src_dir / "big", fraction=0.01, block=65536, seed=3)
    # -I (--ignore-times): rsync's quick check must not skip the file when only a
    # sub-second mtime differs; it has to compare blocks, as dt --checksum does.
    t_rsync = timed(["rsync", "-I", "--no-whole-file", "--inplace", str(src_dir / "big"), str(a / "big")])
    t_dt = timed(dt(work / "state-ck", "mirror", "--checksum", str(src_dir), str(b)))
    same = workloads.same_content(src_dir / "big", b / "big")
    for d in (src_dir, a, b, work / "state-ck"):
        shutil.rmtree(d)
    return [Row("mirror-checksum (s)", t_dt, t_rsync, "rsync -I --no-whole-file --inplace", "s",
                "<= 0.5 x rsync", same and t_dt <= 0.5 * t_rsync)]


def bench_mirror_memory(work: Path, scale: float) -> list[Row]:
    src = work / "mem-src"
    workloads.make_tree(src, files=int(100_000 * scale), total_bytes=int(100_000 * scale) * 512, seed=4)
    _, rss_rsync = peak_rss_mb(["rsync", "-a", f"{src}/", str(work / "mem-rsync")])
    secs, rss = peak_rss_mb(dt(work / "state-mem", "mirror", str(src), str(work / "mem-dt")))
    for d in (src, work / "mem-rsync", work / "mem-dt", work / "state-mem"):
        shutil.rmtree(d)
    return [Row("mirror-memory 100k files (MB)", rss, rss_rsync, "rsync -a (peak RSS)", "MB", "< 300 MB", rss < 300)]


def fio_json(args: list[str]) -> dict:
    out = subprocess.run(["fio", "--output-format=json", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])


def fio_write_mbps(directory: Path, size: str) -> float:
    job = fio_json(["--name=seq", f"--directory={directory}", "--rw=write", "--bs=1M", f"--size={size}",
                    "--end_fsync=1", "--ioengine=psync"])
    return _fio_mbps(job)


def bench_capture_seq(work: Path, scale: float, rounds: int = 3) -> list[Row]:
    """Median of ``rounds`` alternating runs: without the capture, through a C passthrough
    FUSE mount (bench/fuse_passthrough.c: what FUSE itself costs), through the capture's
    mount capturing nothing, and through the capture. The disk's speed swings with the
    writeback of earlier runs (the log and the target are written too), so every run
    starts after a sync. A first round is run and not counted: on this VM memory new to
    the guest is dear, and the first round's files take all of theirs from it (every
    kind measured 2-8x slower in it than in the rounds after)."""
    size = f"{max(64, int(1024 * scale))}M"
    plain = work / "seq-plain"
    plain.mkdir()
    base, c_fuse, passed, captured, same = [], [], [], [], True
    with workloads.Protected(work, "seq") as prot, workloads.Passthrough(work, "seq-pass") as through, \
            workloads.CPassthrough(work, "seq-c") as c_through:
        for round_ in range(rounds + 1):
            for directory, results in ((plain, base), (c_through, c_fuse), (through, passed), (prot.source, captured)):
                (directory / "seq.0.0").unlink(missing_ok=True)
                prot.drain()
                os.sync()
                mbps = fio_write_mbps(directory, size)
                if round_:  # round 0 is the warm-up
                    results.append(mbps)
            prot.drain()
            same = same and workloads.same_content(prot.source / "seq.0.0", prot.target / "seq.0.0")
    shutil.rmtree(plain)
    ours, c_only, fuse_only, theirs = (statistics.median(x) for x in (captured, c_fuse, passed, base))
    print(f"capture-seq MB/s: captured {[round(x) for x in captured]}, FUSE only {[round(x) for x in passed]}, "
          f"C passthrough {[round(x) for x in c_fuse]}, uncaptured {[round(x) for x in base]}", file=sys.stderr)
    return [Row("capture-seq 1MiB writes (MB/s)", ours, theirs, "same disk, no capture", "MB/s",
                ">= 0.5 x uncaptured", same and ours >= 0.5 * theirs),
            Row("capture-seq FUSE mount, nothing captured (MB/s)", fuse_only, theirs, "same disk, no capture",
                "MB/s", "shown", None),
            Row("capture-seq C passthrough FUSE, nothing captured (MB/s)", c_only, theirs, "same disk, no capture",
                "MB/s", "shown", None)]


def bench_rpo_latency(work: Path, scale: float) -> list[Row]:
    """Probe files (new-file latency, measured alike for both tools) during 4 KiB random
    writes at 20 MB/s; for datatether also the latency of every event from `dt status`."""
    seconds = max(5, int(20 * scale))
    fio_args = ["--name=rand", "--rw=randwrite", "--bs=4k", "--rate=20m", "--size=256M", "--time_based",
                f"--runtime={seconds}", "--ioengine=psync", "--filename=load.dat"]
    with workloads.Protected(work, "rpo") as prot:
        with workloads.Probe(prot.source, prot.target) as probe:
            load = fio_json([f"--directory={prot.source}", *fio_args])
        status = prot.drain()
        same = workloads.same_content(prot.source / "load.dat", prot.target / "load.dat")
    ours = probe.percentiles()
    lat = status.get("recovery_point_latency_ms") or {}
    p50, p99 = (float("nan") if lat.get(k) is None else float(lat[k]) for k in ("p50", "p99"))
    with workloads.Lsyncd(work, "rpo-lsyncd") as ls:
        with workloads.Probe(ls.source, ls.target) as lprobe:
            their_load = fio_json([f"--directory={ls.source}", *fio_args])
    theirs = lprobe.percentiles()
    kept = _fio_mbps(load) >= 19  # a capture too slow for the load would hide its latency by throttling it
    return [
        Row("rpo new-file p50 (ms)", ours[50], theirs[50], "lsyncd delay=0", "ms", "shown", None),
        Row("rpo new-file p99 (ms)", ours[99], theirs[99], "lsyncd delay=0", "ms", "p99 < 20 ms", ours[99] < 20),
        Row("rpo every-write p50 (ms, dt status)", p50, None, "-", "ms", "shown", None),
        Row("rpo every-write p99 (ms, dt status)", p99, None, "-", "ms", "p99 < 20 ms", same and kept and p99 < 20),
        Row("rpo load written (MB/s)", _fio_mbps(load), _fio_mbps(their_load), "under lsyncd", "MB/s",
            "20 MB/s kept", kept),
    ]


def _fio_mbps(job: dict) -> float:
    return job["jobs"][0]["write"]["bw_bytes"] / 1e6


BENCHES = {
    "capture-seq": bench_capture_seq,
    "rpo-latency": bench_rpo_latency,
    "mirror-full": bench_mirror_full,
    "mirror-checksum": bench_mirror_checksum,
    "mirror-memory": bench_mirror_memory,
    "kafka-e2e": kafka.bench_e2e,
    "restore": kafka.bench_restore,
}


def print_table(rows: list[Row]) -> None:
    headers = ["benchmark", "datatether", "reference", "ref tool", "ratio", "target", "met"]
    cells = [[r.name, f"{r.ours:.3f}", "-" if r.theirs is None else f"{r.theirs:.3f}", r.ref_tool, r.ratio,
              r.target, {True: "yes", False: "NO", None: "-"}[r.ok]] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def compile_datatether() -> None:
    """Byte-compile datatether's modules once, as installing a package does. An editable
    install run with PYTHONDONTWRITEBYTECODE=1 (this machine's environment) would compile
    every module from source in each dt process (the command and its applier process),
    every run: about 0.07 s of each timed dt call that an installed dt does not pay."""
    for name in ("engine", "apply", "capture", "tools", "schemas"):
        spec = importlib.util.find_spec(f"datatether.{name}")
        for folder in spec.submodule_search_locations if spec else ():
            compileall.compile_dir(folder, quiet=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["full", "small"], default="full")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHES), default=None)
    parser.add_argument("--workdir", default=None, help="where data is generated (default: a temp dir under /var/tmp)")
    args = parser.parse_args()
    scale = 1.0 if args.scale == "full" else 0.1
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dt-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    random.seed(0)
    compile_datatether()
    rows: list[Row] = []
    try:
        for name in args.only or BENCHES:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            rows += BENCHES[name](work, scale)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
            os.sync()  # freed inodes' table blocks written back (see the module docstring)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
