"""Helpers shared by the history, tail, snapshot, restore and export tests: a log holding
known events at known times, written directly with the codec (no capture needed)."""

from __future__ import annotations

from datatether.engine import codec
from datatether.engine import events as ev
from datatether.engine.history import parse_time

T0 = parse_time("2026-03-01T10:00:00Z")
SECOND = 1_000_000_000
FILE_MODE = 0o100644
DIR_MODE = 0o040755


def append(log, partition: str, op, time_ns: int) -> int:
    """Append one event recorded at ``time_ns``; return its offset."""
    return log.append(partition, [codec.encode(ev.Event(op, time_ns, "test"))], timestamp_ns=time_ns)


def create(path: str, kind=ev.FileKind.FILE, time_ns: int = T0) -> ev.Create:
    mode = DIR_MODE if kind == ev.FileKind.DIR else FILE_MODE
    return ev.Create(path, kind, mode, 0, 0, time_ns, time_ns)


def corrupt_embedded(log, partition: str, offset: int) -> None:
    """Flip one stored byte of a record of an EmbeddedLog so that its checksum fails."""
    records = log._cf["records"]
    key = log._part(partition).key(offset)
    damaged = bytearray(records[key])
    damaged[-1] ^= 0x01
    records[key] = bytes(damaged)


def tree_state(root, times: bool = True) -> dict:
    """Everything restore and snapshots must keep, per relative path ('' is the root): type,
    mode, owner, content or link target, extended attributes, which paths share an inode,
    and (``times``) modification times. Times of objects an event did not set are the times
    they were applied at, which a replay at another moment cannot reproduce."""
    import os
    import stat
    from pathlib import Path

    root = Path(root)
    state, inodes = {}, {}
    paths = [root]
    for folder, dirs, names in os.walk(root):
        paths += [Path(folder, name) for name in dirs + names]
    for path in paths:
        rel = "" if path == root else str(path.relative_to(root))
        st = path.lstat()
        entry = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid}
        if times and not stat.S_ISLNK(st.st_mode):
            entry["mtime"] = st.st_mtime_ns
        if stat.S_ISREG(st.st_mode):
            entry["data"] = path.read_bytes()
            inodes.setdefault(st.st_ino, []).append(rel)
            entry["inode"] = st.st_ino
        elif stat.S_ISLNK(st.st_mode):
            entry["target"] = os.readlink(path)
        if not stat.S_ISLNK(st.st_mode):
            entry["xattrs"] = {n: os.getxattr(path, n) for n in sorted(os.listxattr(path))}
        state[rel] = entry
    for entry in state.values():  # hard links inside the tree (not to other trees) count
        group = inodes.get(entry.pop("inode", None), [])
        if len(group) > 1:
            entry["links"] = min(group)
    return state


def files(root) -> dict[str, bytes]:
    """Relative path -> content of each regular file (directories as None)."""
    import os
    from pathlib import Path

    out = {}
    for folder, dirs, names in os.walk(root):
        for d in dirs:
            out[str(Path(folder, d).relative_to(root))] = None
        for n in names:
            p = Path(folder, n)
            out[str(p.relative_to(root))] = p.read_bytes() if not p.is_symlink() else ("->", os.readlink(p))
    return out


def reap(proc) -> None:
    """Kill ``proc`` if a failed test left it running, and wait for it."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def make_connection(state, source, target, name: str = "web"):
    """A replication set over ``source`` and a connection from it to ``target`` in the state
    directory ``state`` (as dt protect would make them); returns the connection."""
    from datatether.engine.connection import ConnectionStore
    from datatether.engine.replset import SetStore
    from datatether.engine.rules import parse_rule

    source.mkdir(parents=True, exist_ok=True)
    SetStore(state).create(name, [parse_rule(str(source), True, True)])
    return ConnectionStore(state).create(name=name, set_name=name, source_root=str(source), target=str(target))


def dt(*argv, state, check: bool = True, **kw):
    """Run the dt command line in a child process; returns the CompletedProcess."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "datatether.tools.cli", *map(str, argv), "--state", str(state)],
                          capture_output=True, text=True, timeout=120, **kw)
    if check and done.returncode != 0:
        raise AssertionError(f"dt {' '.join(map(str, argv))} exited {done.returncode}: {done.stderr}")
    return done


class StreamWorld:
    """A state directory as a running daemon leaves it: settings (log backend), one
    connection "web" and its partition, and the log held open for writing by this process
    (the embedded one exclusively, as a daemon holds it). Partitions get a random
    connection id so tests sharing one Kafka broker never meet."""

    def __init__(self, base, backend: str, request=None):
        import random

        from datatether.engine.durable import write_atomic
        from datatether.engine.settings import Settings
        from datatether.tools import runtime

        self.backend = backend
        self.state = base / "state"
        self.state.mkdir()
        if backend == "kafka":
            broker = request.getfixturevalue("kafka_broker")
            (self.state / "config.toml").write_text(f'log = "{broker.bootstrap}"\n')
        write_atomic(self.state / "connections" / "last_id", str(random.randrange(10**6, 10**9)).encode())
        self.source, self.target = base / "source", base / "target"
        self.conn = make_connection(self.state, self.source, self.target)
        self.partition = self.conn.partition
        self.log = runtime.open_log(self.state, Settings.load(self.state))
        self.log.ensure_partition(self.partition)

    def append(self, op, time_ns: int) -> int:
        return append(self.log, self.partition, op, time_ns)

    def close(self) -> None:
        if self.backend == "kafka":
            self.log.drop_partition(self.partition)
        self.log.close()


def backends():
    """Parametrisation of the stream tests over both Log backends."""
    import pytest

    return pytest.mark.parametrize("backend", ["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
