"""Recovery point latency window (engine/latency.py)."""

from __future__ import annotations

import threading

from datatether.engine.latency import LatencyWindow, percentile

S = 1_000_000_000
MS = 1_000_000


def test_percentiles_over_the_window():
    window = LatencyWindow(window_s=60)
    now = 1_000 * S
    for i in range(1, 101):  # latencies 1..100 ms, applied within the last 10 s
        window.add(captured_ns=now - 10 * S - i * MS + i * MS // 10, applied_ns=now - 10 * S + i * MS // 10)
    summary = window.summary(now_ns=now)
    assert summary.samples == 100
    assert (summary.p50_ms, summary.p99_ms) == (50.0, 99.0)
    assert summary.current_ms == 0  # nothing left unapplied


def test_old_samples_leave_the_window():
    window = LatencyWindow(window_s=60)
    now = 1_000 * S
    window.add(captured_ns=now - 120 * S - 500 * MS, applied_ns=now - 120 * S)  # 500 ms, too old
    window.add(captured_ns=now - 7 * MS, applied_ns=now)
    summary = window.summary(now_ns=now)
    assert (summary.samples, summary.p50_ms, summary.p99_ms) == (1, 7.0, 7.0)
    assert window.summary(now_ns=now + 61 * S).p50_ms is None


def test_current_is_the_age_of_the_oldest_unapplied_event():
    now = 1_000 * S
    assert LatencyWindow().summary(oldest_unapplied_ns=now - 250 * MS, now_ns=now).current_ms == 250.0


def test_sample_count_is_bounded():
    window = LatencyWindow(max_samples=10)
    for i in range(100):
        window.add(captured_ns=0, applied_ns=i)
    assert window.summary(now_ns=100).samples == 10


def test_concurrent_adds_are_all_counted():
    window = LatencyWindow()

    def add_many():
        for _ in range(1000):
            window.add(captured_ns=0, applied_ns=1)

    threads = [threading.Thread(target=add_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert window.summary(now_ns=2).samples == 4000


def test_nearest_rank_percentile():
    assert percentile([5], 0.99) == 5
    assert percentile([1, 2, 3, 4], 0.5) == 2
    assert percentile(list(range(1, 201)), 0.99) == 198
