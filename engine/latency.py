"""Recovery point latency: how far the target is behind the source, in time.

The reference defines it as the period of data that would be lost if the source failed now.
Two views, both per connection:

- *current*: the age of the oldest captured event not yet applied (0 when the queue is
  empty). It keeps growing while the target is paused, which is exactly the exposure.
- *p50 / p99*: percentiles of ``applied time - capture time`` (``Event.time_ns``) over the
  events applied in the last ``window_s`` seconds (at most ``max_samples`` of them, the most
  recent kept).

``LatencyWindow`` is thread-safe: the applier adds samples while status readers ask.
Times are wall-clock nanoseconds (capture and apply run on clocks of the same host here;
across hosts the figure includes their clock offset).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

DEFAULT_WINDOW_S = 60.0
DEFAULT_MAX_SAMPLES = 100_000


@dataclass(frozen=True)
class LatencySummary:
    """Milliseconds; ``None`` when no event was applied within the window."""

    current_ms: float
    p50_ms: float | None
    p99_ms: float | None
    samples: int
    window_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(sorted_values: list[int], fraction: float) -> int:
    """Nearest-rank percentile of an ascending, non-empty list."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


class LatencyWindow:
    def __init__(self, window_s: float = DEFAULT_WINDOW_S, max_samples: int = DEFAULT_MAX_SAMPLES):
        self.window_s = window_s
        self._samples: deque[tuple[int, int]] = deque(maxlen=max_samples)  # (applied_ns, latency_ns)
        self._lock = threading.Lock()

    def add(self, captured_ns: int, applied_ns: int | None = None) -> None:
        """Record one applied event captured at ``captured_ns``."""
        applied_ns = time.time_ns() if applied_ns is None else applied_ns
        with self._lock:
            self._samples.append((applied_ns, max(0, applied_ns - captured_ns)))

    def summary(self, oldest_unapplied_ns: int | None = None, now_ns: int | None = None) -> LatencySummary:
        """Percentiles of the window; ``current`` from the oldest unapplied capture time."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        since = now_ns - int(self.window_s * 1e9)
        with self._lock:
            while self._samples and self._samples[0][0] < since:
                self._samples.popleft()
            values = sorted(latency for _, latency in self._samples)
        current = 0 if oldest_unapplied_ns is None else max(0, now_ns - oldest_unapplied_ns)
        return LatencySummary(
            current_ms=_ms(current),
            p50_ms=_ms(percentile(values, 0.50)) if values else None,
            p99_ms=_ms(percentile(values, 0.99)) if values else None,
            samples=len(values), window_s=self.window_s)


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)
