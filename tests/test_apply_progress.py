"""The applied-offset record: torn writes, unclean machine stops, the status snapshot."""

from __future__ import annotations

import math
import os
import time

import blake3
import pytest

from datatether.apply import progress as progress_mod
from datatether.apply.progress import RECORD_FILE, SLOT, STATUS_FILE, Progress, latency_summary
from datatether.engine.errors import BackendUnavailable
from datatether.engine.offsets import NO_OFFSET
from datatether.engine.states import TargetDataState, TargetStatus


def test_a_new_store_is_not_ready_and_empty(tmp_path):
    p = Progress(tmp_path)
    assert (p.applied_offset, p.data_state, p.fresh, p.task_offset) == \
        (NO_OFFSET, TargetDataState.NOT_READY, True, NO_OFFSET)
    p.close()


def test_commits_survive_reopening_with_state_and_reason(tmp_path):
    p = Progress(tmp_path)
    p.set_data_state(TargetDataState.MIRROR_REQUIRED, "gap: overflow")
    p.commit(41)
    p.commit(42)
    p.close()
    p = Progress(tmp_path)
    assert (p.applied_offset, p.data_state, p.data_state_reason, p.fresh) == \
        (42, TargetDataState.MIRROR_REQUIRED, "gap: overflow", False)
    p.close()


def test_the_stamp_of_the_applied_record_survives_reopening(tmp_path):
    p = Progress(tmp_path)
    p.commit(5, stamp=1_700_000_000_123_456_789)
    p.begin_task(6)  # records written without a commit keep it too
    p.close()
    p = Progress(tmp_path)
    assert (p.applied_offset, p.applied_stamp, p.task_offset) == (5, 1_700_000_000_123_456_789, 6)
    p.close()


def test_a_version_1_record_is_read_with_an_unknown_stamp(tmp_path):
    """Written before the stamp existed: the same layout without bytes 480..487."""
    reason = b"from version 1"
    head = progress_mod._HEAD.pack(b"DTAP", 1, progress_mod.FLAG_SYNCED, 1, 33, NO_OFFSET, 0, b"\0" * 16,
                                   len(reason))
    body = (head + reason).ljust(SLOT - 16, b"\0")
    (tmp_path / RECORD_FILE).write_bytes((body + blake3.blake3(body).digest(16)).ljust(2 * SLOT, b"\0"))
    p = Progress(tmp_path)
    assert (p.applied_offset, p.applied_stamp, p.data_state, p.data_state_reason, p.fresh) == \
        (33, 0, TargetDataState.OK, "from version 1", False)
    p.close()


@pytest.mark.parametrize("damage", ['[1, 2]', '"text"', '{"target_status": 5, "pid": "1", "last_file": 3}',
                                    '{"target_status": "Bogus", "recovery_point_latency_ms": {"p50": "a"}}'])
def test_a_damaged_status_snapshot_reads_as_what_is_right_in_it(tmp_path, damage):
    p = Progress(tmp_path)
    p.commit(3)
    p.sample(time.time_ns(), "f", 10)
    p.publish(force=True)
    whole = Progress.read_snapshot(tmp_path)  # while its writer lives
    assert (whole["target_status"], whole["last_file"], whole["pid"]) == ("OK", "f", os.getpid())
    p.close()
    (tmp_path / STATUS_FILE).write_text(damage)
    snap = Progress.read_snapshot(tmp_path)
    assert snap["target_status"] == "Not Loaded" and snap["applied_offset"] == 3
    assert snap["recovery_point_latency_ms"]["samples"] == 0
    assert "pid" not in snap and "last_file" not in snap


def test_a_torn_record_falls_back_to_the_previous_one(tmp_path):
    p = Progress(tmp_path)
    p.commit(7)
    p.commit(8)  # seq 2: slot 0
    p.close()
    with open(tmp_path / RECORD_FILE, "r+b") as f:
        f.seek(100)
        f.write(b"torn")
    p = Progress(tmp_path)
    assert p.applied_offset == 7 and p.data_state is TargetDataState.NOT_READY
    p.close()


def test_an_unreadable_record_means_mirror_required(tmp_path):
    (tmp_path / RECORD_FILE).write_bytes(os.urandom(2 * SLOT))
    assert Progress.read_snapshot(tmp_path)["target_data_state"] == "Mirror Required"  # dt status, stopped
    p = Progress(tmp_path)
    assert p.fresh and p.applied_offset == NO_OFFSET and p.data_state is TargetDataState.MIRROR_REQUIRED
    p.close()


def reboot(monkeypatch) -> None:
    monkeypatch.setattr(progress_mod, "boot_id", lambda: b"another boot id!")


def test_machine_stop_while_dirty_means_mirror_required(tmp_path, monkeypatch):
    p = Progress(tmp_path)
    p.set_data_state(TargetDataState.OK)
    p.commit(3, synced=True)
    p.mark_dirty()
    p.commit(5)
    p.close()
    reboot(monkeypatch)
    snap = Progress.read_snapshot(tmp_path)  # dt status before the applier is back
    assert snap["target_data_state"] == "Mirror Required" and "machine stopped" in snap["target_data_state_reason"]
    p = Progress(tmp_path)
    assert p.applied_offset == 5 and p.data_state is TargetDataState.MIRROR_REQUIRED
    p.close()


def test_machine_stop_after_a_checkpoint_keeps_the_state(tmp_path, monkeypatch):
    p = Progress(tmp_path)
    p.set_data_state(TargetDataState.OK)
    p.commit(5, synced=True)
    p.close()
    reboot(monkeypatch)
    assert Progress.read_snapshot(tmp_path)["target_data_state"] == "OK"
    p = Progress(tmp_path)
    assert p.applied_offset == 5 and p.data_state is TargetDataState.OK and p.synced
    p.mark_dirty()
    assert not p.synced
    p.close()


def test_a_task_stays_in_flight_until_its_own_offset_is_committed(tmp_path):
    p = Progress(tmp_path)
    p.commit(9)
    p.begin_task(10)
    p.commit(9)
    p.close()
    p = Progress(tmp_path)
    assert p.task_offset == 10
    p.commit(10)
    assert p.task_offset == NO_OFFSET
    p.close()


def test_one_process_at_a_time(tmp_path):
    p = Progress(tmp_path)
    with pytest.raises(BackendUnavailable):
        Progress(tmp_path)
    p.close()


def test_snapshot_for_other_processes(tmp_path):
    p = Progress(tmp_path)
    p.set_data_state(TargetDataState.OK)
    for i, latency_ms in enumerate([5, 1, 3, 2, 4]):
        p.sample(capture_ns=10**18, path=f"f{i}", nbytes=10, applied_ns=10**18 + latency_ms * 10**6)
    p.commit(4)
    p.set_status(TargetStatus.RETRYING, "event 5: [Errno 28] No space left on device")
    snap = Progress.read_snapshot(tmp_path)
    assert snap["applied_offset"] == 4 and snap["target_data_state"] == "OK"
    assert snap["target_status"] == "Retrying" and "No space" in snap["target_status_detail"]
    assert snap["last_file"] == "f4" and snap["applied_events"] == 5 and snap["applied_bytes"] == 50
    p.close()
    assert Progress.read_snapshot(tmp_path)["target_status"] == "Not Loaded"


def test_latency_summary_nearest_rank():
    assert latency_summary([])["p50"] is None
    s = latency_summary([m * 10**6 for m in [5, 1, 3, 2, 4]])
    assert (s["current"], s["p50"], s["p99"], s["samples"]) == (4.0, 3.0, 5.0, 5)
    hundred = latency_summary([m * 10**6 for m in range(1, 101)])
    assert (hundred["p50"], hundred["p99"]) == (50.0, 99.0)


def test_snapshot_of_a_target_never_loaded(tmp_path):
    snap = Progress.read_snapshot(tmp_path / "nothing")
    assert snap["target_status"] == "Not Loaded" and snap["applied_offset"] == NO_OFFSET


def test_snapshot_while_the_applier_samples_from_another_thread(tmp_path):
    import threading
    import time

    p = Progress(tmp_path)
    for _ in range(5000):  # a full latency window to copy, so a copy takes a while
        p.sample(time.time_ns(), "f", 1)
    stop = threading.Event()
    sampled = []

    def applier():
        n = 0
        while not stop.is_set():
            p.sample(0, "f", 1)
            n += 1
        sampled.append(n)

    thread = threading.Thread(target=applier)
    thread.start()
    try:
        snaps = [p.snapshot() for _ in range(200)]  # never "deque mutated during iteration"
    finally:
        stop.set()
        thread.join()
    assert sampled[0] > 0
    assert snaps[-1]["applied_events"] >= snaps[0]["applied_events"] >= 5000
    assert all(s["recovery_point_latency_ms"]["samples"] > 0 for s in snaps)
    p.close()


def test_latency_window_percentiles_within_its_precision_and_old_seconds_dropped():
    import random

    from datatether.apply.progress import LATENCY_PRECISION, LatencyWindow

    rng = random.Random(3)
    window = LatencyWindow(window_s=60)
    base = 1_700_000_000 * 10**9
    old = [rng.randrange(1, 10**9) for _ in range(1000)]  # a minute and more ago: forgotten
    for i, latency in enumerate(old):
        window.add(base + i * 10**6, latency)
    later = base + 100 * 10**9
    recent = [int(rng.lognormvariate(13, 1.5)) for _ in range(20_000)]
    for i, latency in enumerate(recent):
        window.add(later + i * 10**6, latency)
    summary = window.summary(later + 20 * 10**9)
    ordered = sorted(recent)
    assert summary["samples"] == len(recent) and summary["current"] == recent[-1] / 1e6
    for p, key in ((0.50, "p50"), (0.99, "p99")):
        exact = ordered[math.ceil(p * len(ordered)) - 1] / 1e6
        assert exact <= summary[key] <= exact * (1 + LATENCY_PRECISION)
    assert window.summary(later + 200 * 10**9)["samples"] == 0
