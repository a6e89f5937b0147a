"""Health aggregates of local inference: counts, latencies and generation speed, never the data.

A generation adds two figures a request's latency hides: time to first token (request start →
first token out, queue wait and prefill included: what the user of a streaming chat feels) and
decode speed (tokens after the first per second of decoding, summed over the window so long
answers weigh by their tokens, not one vote per request).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from slmops.events.payloads import HealthAggregate


class HealthWindow:
    """Requests since the last report: how many, how many failed, how long they took; and
    running totals since the process started (its metrics), which no report resets."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._latencies_ms: list[float] = []
        self._errors = 0
        self._shadow: list[float] = []
        self._ttft_ms: list[float] = []
        self._decode_tokens = 0
        self._decode_s = 0.0
        self.total_ok = self.total_failed = self.total_tokens = 0

    def record(self, latency_ms: float, ok: bool) -> None:
        with self._lock:
            self._latencies_ms.append(latency_ms)
            self._errors += 0 if ok else 1
            if ok:
                self.total_ok += 1
            else:
                self.total_failed += 1

    def record_generation(self, ttft_ms: float | None, decode_tokens: int, decode_s: float) -> None:
        """One generation's timings (its request is counted by :meth:`record`): ``ttft_ms`` None
        when it produced no token; ``decode_tokens`` the tokens after the first."""
        with self._lock:
            if ttft_ms is not None:
                self._ttft_ms.append(ttft_ms)
                self.total_tokens += 1 + decode_tokens
            if decode_tokens > 0 and decode_s > 0:
                self._decode_tokens += decode_tokens
                self._decode_s += decode_s

    def record_shadow(self, agreement: float) -> None:
        """How far the previous model agreed with the serving one on one sampled input."""
        with self._lock:
            self._shadow.append(agreement)

    def take(self) -> HealthAggregate:
        """The aggregate of the window so far; a new window starts."""
        with self._lock:
            latencies, errors, shadow = self._latencies_ms, self._errors, self._shadow
            ttft, tokens, decode_s = self._ttft_ms, self._decode_tokens, self._decode_s
            window_s = max(time.monotonic() - self._started, 1e-3)
            self._latencies_ms, self._errors, self._shadow = [], 0, []
            self._ttft_ms, self._decode_tokens, self._decode_s = [], 0, 0.0
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
            ttft_p50_ms=float(np.percentile(ttft, 50)) if ttft else None,
            ttft_p95_ms=float(np.percentile(ttft, 95)) if ttft else None,
            decode_tokens_per_s=tokens / decode_s if decode_s > 0 else None,
        )
