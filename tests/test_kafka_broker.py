"""tools/kafka_broker.py: the command line and the parts of a start that need no broker;
starting, killing and restarting a real one is exercised by tests/test_log_kafka.py."""

from __future__ import annotations

import base64
import subprocess
import sys
import time

import pytest

from datatether.tools import kafka_broker as broker_tool


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "datatether.tools.kafka_broker", *args],
                          capture_output=True, text=True, timeout=60)


def test_status_and_stop_of_a_folder_without_broker(tmp_path):
    status = run_cli("status", "--dir", str(tmp_path))
    assert (status.returncode, status.stdout.strip()) == (1, "stopped")
    assert run_cli("stop", "--dir", str(tmp_path)).returncode == 0
    assert broker_tool.attach(tmp_path) is None


@pytest.mark.kafka
def test_status_finds_the_running_broker(kafka_broker):
    status = run_cli("status", "--dir", str(kafka_broker.dir))
    assert status.returncode == 0
    assert kafka_broker.bootstrap in status.stdout
    assert broker_tool.attach(kafka_broker.dir).pid == kafka_broker.pid


def test_a_stale_pid_file_is_not_a_broker(tmp_path):
    ended = subprocess.Popen(["true"])
    ended.wait()
    (tmp_path / "broker.pid").write_text(f"{ended.pid}\n")
    assert broker_tool.attach(tmp_path) is None


def test_cluster_ids_are_kafka_uuids():
    for _ in range(200):
        cluster_id = broker_tool.new_cluster_id()
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16
        assert not cluster_id.startswith("-")


def test_the_version_comes_from_the_pom():
    assert broker_tool.kafka_version().startswith("4.")
    assert broker_tool.cache_dir().name == f"kafka-{broker_tool.kafka_version()}"


@pytest.mark.kafka
def test_a_tied_broker_dies_with_the_process_that_started_it(kafka_broker, tmp_path):
    """A test run killed before its teardown (SIGKILL, a CI timeout) leaves no broker."""
    script = ("import sys, time; from datatether.tools import kafka_broker as k; "
              "b = k.start(sys.argv[1], tied=True); print(b.pid, flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "b")], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(child.stdout.readline())
        assert broker_tool.attach(tmp_path / "b").pid == pid
    finally:
        child.kill()
        child.wait()
    deadline = time.monotonic() + 30
    while broker_tool.attach(tmp_path / "b") is not None:
        assert time.monotonic() < deadline, "the broker outlived the process that started it"
        time.sleep(0.1)
