"""dt tail on both Log backends, beside a process holding the log as a daemon does:
lines and JSON lines, --from/--since/--path, --follow until SIGINT, and bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from history_helpers import SECOND, T0, StreamWorld, backends, create, dt, reap

from datatether.engine import events as ev
from datatether.engine.history import format_time

RAW_NAME = b"caf\xe9.txt".decode("utf-8", "surrogateescape")


@pytest.fixture
def world(tmp_path, backend, request):
    w = StreamWorld(tmp_path, backend, request)
    w.append(create("docs", ev.FileKind.DIR), T0)
    w.append(create("docs/a.txt"), T0 + SECOND)
    w.append(ev.Write("docs/a.txt", 0, b"hello world"), T0 + 2 * SECOND)
    w.append(ev.Rename("docs/a.txt", "b.txt"), T0 + 3 * SECOND)
    w.append(create(RAW_NAME), T0 + 4 * SECOND)
    yield w
    w.close()


def lines(done) -> list[dict]:
    return [json.loads(line) for line in done.stdout.splitlines()]


@backends()
def test_json_lines_from_an_offset(world):
    got = lines(dt("tail", "web", "--from", "1", "--json", state=world.state))
    assert [g["offset"] for g in got] == [1, 2, 3, 4]
    assert [g["op"] for g in got] == ["Create", "Write", "Rename", "Create"]
    assert got[1]["time"] == "2026-03-01T10:00:02.000000000Z" and got[1]["time_ns"] == T0 + 2 * SECOND
    assert got[1]["bytes"] == 11 and got[1]["fields"] == {"path": "docs/a.txt", "offset": 0}
    assert got[2]["paths"] == ["docs/a.txt", "b.txt"]
    assert got[3]["paths"][0].encode("utf-8", "surrogateescape") == b"caf\xe9.txt"


@backends()
def test_human_lines_by_id_since_a_time_and_by_path(world):
    out = dt("tail", str(world.conn.id), "--since", "2026-03-01T12:00:02+02:00", state=world.state).stdout
    rows = out.splitlines()
    assert len(rows) == 3
    assert rows[0].split() == ["2", format_time(T0 + 2 * SECOND), "Write", "docs/a.txt", "@0", "11", "B"]
    assert rows[1].split()[2:] == ["Rename", "docs/a.txt", "->", "b.txt", "-"]
    assert rows[2].split()[3] == "caf\\xe9.txt"
    docs = lines(dt("tail", "web", "--from", "0", "--path", "docs", "--json", state=world.state))
    assert [g["offset"] for g in docs] == [0, 1, 2, 3]
    last = lines(dt("tail", "web", "-n", "2", "--json", state=world.state))
    assert [g["offset"] for g in last] == [3, 4]


@backends()
def test_follow_prints_appends_until_interrupted(world):
    # --from the end: the events appended while the command starts are printed too.
    proc = subprocess.Popen([sys.executable, "-m", "datatether.tools.cli", "tail", "web", "--follow", "--json",
                             "--from", "5", "--path", "logs", "--state", str(world.state)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def produce():
            for n in range(5):
                world.append(ev.Write(f"logs/{n}.log", 0, b"x" * n), T0 + (10 + n) * SECOND)
                world.append(ev.Write("elsewhere", 0, b"y"), T0 + (10 + n) * SECOND)

        threading.Thread(target=produce).start()
        got = [json.loads(proc.stdout.readline()) for _ in range(5)]
        assert [g["paths"] for g in got] == [[f"logs/{n}.log"] for n in range(5)]
        assert [g["offset"] for g in got] == [5, 7, 9, 11, 13]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        reap(proc)
    assert proc.stderr.read() == ""


@backends()
def test_follow_passes_over_what_retention_dropped_before_it_was_shown(world):
    proc = subprocess.Popen([sys.executable, "-m", "datatether.tools.cli", "tail", "web", "--follow", "--json",
                             "--from", "0", "--state", str(world.state)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert [json.loads(proc.stdout.readline())["offset"] for _ in range(5)] == [0, 1, 2, 3, 4]
        proc.send_signal(signal.SIGSTOP)  # a slow reader: retention goes past it meanwhile
        for n in range(5, 9):
            world.append(create(f"f{n}"), T0 + n * SECOND)
        world.log.truncate_before(world.partition, 8)
        proc.send_signal(signal.SIGCONT)
        assert json.loads(proc.stdout.readline())["offset"] == 8
        world.append(create("f9"), T0 + 9 * SECOND)
        assert json.loads(proc.stdout.readline())["offset"] == 9
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        reap(proc)
    warning = json.loads(proc.stderr.read())
    assert (warning["msgid"], warning["first"], warning["last"]) == ("DT-H030", 5, 7)


@backends()
def test_bad_inputs(world):
    unknown = dt("tail", "nope", state=world.state, check=False)
    assert unknown.returncode == 2 and "connection not found: nope" in unknown.stderr
    beyond = dt("tail", "web", "--from", "99", state=world.state, check=False)
    assert beyond.returncode == 2 and "the last offset is 4" in beyond.stderr
    for digits in ("\u00b2", "\u0663"):  # Unicode digits other than 0-9 are no offset
        bad_offset = dt("tail", "web", "--from", digits, state=world.state, check=False)
        assert bad_offset.returncode == 2 and "not an offset" in bad_offset.stderr
    bad_time = dt("tail", "web", "--since", "last tuesday", state=world.state, check=False)
    assert bad_time.returncode == 2 and "not a time" in bad_time.stderr
    both = dt("tail", "web", "--from", "1", "--since", "2026-03-01T10:00:00Z", state=world.state, check=False)
    assert both.returncode == 2
    world.log.truncate_before(world.partition, 3)
    old = dt("tail", "web", "--since", "2026-03-01T10:00:00Z", "--json", state=world.state, check=False)
    assert old.returncode == 2
    error = json.loads(old.stderr)
    assert error["error"] == "DT-E018" and "oldest retained event: offset 3" in error["message"]
    assert [g["offset"] for g in lines(dt("tail", "web", "--from", "3", "--json", state=world.state))] == [3, 4]


def test_a_state_directory_without_a_log(tmp_path):
    from history_helpers import make_connection

    make_connection(tmp_path / "state", tmp_path / "src", tmp_path / "dst")
    done = dt("tail", "web", state=tmp_path / "state", check=False)
    assert done.returncode == 2 and "change log" in done.stderr
    assert not os.path.exists(tmp_path / "state" / "log")


@pytest.mark.kafka
def test_follow_rides_out_a_broker_away_longer_than_the_log_timeout(tmp_path, kafka_broker, request):
    """--follow prints until interrupted: a cluster away past kafka_timeout_s is waited
    for with a warning, not the end of the command."""
    w = StreamWorld(tmp_path, "kafka", request)
    with open(w.state / "config.toml", "a") as out:
        out.write("kafka_timeout_s = 2\n")
    w.append(create("before"), T0)
    proc = subprocess.Popen([sys.executable, "-m", "datatether.tools.cli", "tail", "web", "--follow", "--json",
                             "--from", "0", "--state", str(w.state)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(proc.stdout.readline())["offset"] == 0
        kafka_broker.kill()
        time.sleep(6)  # several of the follower's timeouts
        kafka_broker.restart()
        w.append(create("after"), T0 + SECOND)
        assert json.loads(proc.stdout.readline())["paths"] == ["after"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        w.close()
    warnings = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    assert "DT-H031" in {warning["msgid"] for warning in warnings}
