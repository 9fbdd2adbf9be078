"""engine/logs.py: lines go to the stderr of the moment, message ids and transitions."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from datatether.engine import logs


@pytest.fixture
def configured():
    yield logs.configure
    logs.configure(level="warning")  # as get() leaves it for the rest of the session


def test_lines_follow_sys_stderr_even_after_the_old_one_closed(configured, monkeypatch):
    configured(level="info")
    log = logs.get("test")
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    log.info("to the first", msgid="DT-T001")
    assert "to the first" in first.getvalue() and "DT-T001" in first.getvalue()
    first.close()  # as pytest closes the stream it captured an in-process dt run with
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    log.warning("to the second", msgid="DT-T002")
    assert "to the second" in second.getvalue()


def test_a_given_stream_and_json_lines(configured, monkeypatch):
    stream = io.StringIO()
    configured(json=True, level="warning", stream=stream)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    log = logs.get("test")
    log.info("below the level", msgid="DT-T003")
    logs.transition(log, "target_status", "OK", "Paused")  # info: below the level too
    log.error("kept", msgid="DT-T004", n=1)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["event"], line["msgid"], line["level"], line["n"]) for line in lines] == [("kept", "DT-T004", "error", 1)]
    assert sys.stderr.getvalue() == ""


def test_structlog_is_imported_only_by_a_line_that_passes_the_level():
    # A child interpreter: this one has imported structlog already (structlog.testing).
    code = ("import sys\n"
            "from datatether.engine import logs\n"
            "logs.configure(level='warning')\n"
            "log = logs.get('t')\n"
            "log.info('dropped', msgid='DT-T005')\n"
            "before = 'structlog' in sys.modules\n"
            "log.warning('kept', msgid='DT-T006')\n"
            "print(before, 'structlog' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]
    assert "kept" in done.stderr and "DT-T006" in done.stderr and "dropped" not in done.stderr
