"""Retention policy (engine/retention.py) against a real EmbeddedLog."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from datatether.engine.log_embedded import EmbeddedLog
from datatether.engine.retention import apply_retention, consumed_end

SECOND = 1_000_000_000
NOW = 1_000 * SECOND
RECORD = 100  # payload bytes of every record below


@pytest.fixture
def log(tmp_path):
    with EmbeddedLog(tmp_path / "log") as opened:
        opened.ensure_partition("p")
        yield opened


def fill(log, ages_s: list[int]) -> None:
    """One record per age (seconds before NOW), oldest first."""
    for age in ages_s:
        log.append("p", [b"%d" % age + b"." * (RECORD - len(b"%d" % age))], timestamp_ns=NOW - age * SECOND)


def retain(log, window_s: float, max_bytes: int | None = None) -> int:
    return apply_retention(log, "p", window_s=window_s, max_bytes=max_bytes, now_ns=NOW)


def test_without_consumers_nothing_is_consumed_or_dropped(log):
    fill(log, [500, 400, 300])
    assert consumed_end(log, "p") == 0
    assert retain(log, window_s=0, max_bytes=0) == 0
    assert log.size("p") == (3 * RECORD, 3)


def test_consumed_records_older_than_the_window_go(log):
    fill(log, [500, 400, 300, 200, 100])
    log.commit("p", "applier", 3)
    assert retain(log, window_s=250) == 3  # offsets 0-2 are older than 250 s
    assert log.start_offset("p") == 3
    assert [r.offset for r in log.read("p", 3)] == [3, 4]


def test_unconsumed_records_stay_however_old(log):
    fill(log, [500, 400, 300, 200])
    log.commit("p", "applier", 0)
    assert retain(log, window_s=0) == 1
    assert log.size("p")[1] == 3


def test_the_slowest_consumer_decides(log):
    fill(log, [500, 400, 300, 200])
    log.commit("p", "transmitter", 3)
    log.commit("p", "applier", 1)
    assert consumed_end(log, "p") == 2
    assert retain(log, window_s=0) == 2


def test_a_consumer_that_processed_nothing_keeps_everything(log):
    fill(log, [500, 400])
    log.commit("p", "transmitter", 1)
    log.commit("p", "applier", -1)
    assert retain(log, window_s=0, max_bytes=0) == 0


def test_the_window_keeps_consumed_history(log):
    fill(log, [500, 400, 300, 200])
    log.commit("p", "applier", 3)
    assert retain(log, window_s=1_000) == 0
    assert log.size("p")[1] == 4


def test_the_byte_bound_drops_inside_the_window_oldest_first(log):
    fill(log, [50, 40, 30, 20, 10])
    log.commit("p", "applier", 4)
    assert retain(log, window_s=1_000, max_bytes=2 * RECORD + RECORD // 2) == 3
    assert log.size("p") == (2 * RECORD, 2)


def test_the_byte_bound_never_drops_the_queue(log):
    fill(log, [50, 40, 30, 20, 10])
    log.commit("p", "applier", 1)
    with capture_logs() as captured:
        assert retain(log, window_s=1_000, max_bytes=RECORD) == 2
    assert log.size("p") == (3 * RECORD, 3)
    warnings = [entry for entry in captured if entry.get("msgid") == "DT-L101"]
    assert len(warnings) == 1 and warnings[0]["retained"] == 3 * RECORD


def test_time_and_bytes_together(log):
    fill(log, [500, 400, 30, 20, 10])
    log.commit("p", "applier", 3)
    # time drops 0-1; the bound then drops 2 (consumed); 4 is unconsumed and 3 fits
    assert retain(log, window_s=100, max_bytes=2 * RECORD) == 3
    assert log.size("p") == (2 * RECORD, 2)


def test_running_again_changes_nothing(log):
    fill(log, [500, 400, 300, 200])
    log.commit("p", "applier", 2)
    first = retain(log, window_s=350, max_bytes=2 * RECORD)
    assert retain(log, window_s=350, max_bytes=2 * RECORD) == first == 2
    assert log.end_offset("p") == 4


def test_a_damaged_consumed_record_stops_the_byte_bound_not_retention(log):
    fill(log, [50, 40, 30, 20])
    log.commit("p", "applier", 3)
    records = log._cf["records"]
    key = log._part("p").key(1)
    records[key] = records[key][:-1] + b"?"
    with capture_logs() as captured:
        assert retain(log, window_s=45, max_bytes=RECORD) == 1
    assert [entry["offset"] for entry in captured if entry.get("msgid") == "DT-L102"] == [1]
    assert log.end_offset("p") == 4
