"""Health aggregates of local inference: counts and latency percentiles, never the data."""

from __future__ import annotations

import threading
import time

import numpy as np

from slmops.events.payloads import HealthAggregate


class HealthWindow:
    """Requests since the last report: how many, how many failed, how long they took."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._latencies_ms: list[float] = []
        self._errors = 0
        self._shadow: list[float] = []

    def record(self, latency_ms: float, ok: bool) -> None:
        with self._lock:
            self._latencies_ms.append(latency_ms)
            self._errors += 0 if ok else 1

    def record_shadow(self, agreement: float) -> None:
        """How far the previous model agreed with the serving one on one sampled input."""
        with self._lock:
            self._shadow.append(agreement)

    def take(self) -> HealthAggregate:
        """The aggregate of the window so far; a new window starts."""
        with self._lock:
            latencies, errors, shadow = self._latencies_ms, self._errors, self._shadow
            window_s = max(time.monotonic() - self._started, 1e-3)
            self._latencies_ms, self._errors, self._shadow = [], 0, []
            self._started = time.monotonic()
        count = len(latencies)
        return HealthAggregate(
            window_s=window_s,
            request_count=count,
            error_rate=errors / count if count else 0.0,
            latency_p50_ms=float(np.percentile(latencies, 50)) if count else None,
            latency_p95_ms=float(np.percentile(latencies, 95)) if count else None,
            shadow_agreement=float(np.mean(shadow)) if shadow else None,
            shadow_samples=len(shadow),
        )
