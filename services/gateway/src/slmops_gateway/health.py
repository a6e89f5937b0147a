"""Health aggregates of local inference: counts, latencies and generation speed, never the data.

A generation adds two figures a request's latency hides: time to first token (request start →
first token out, queue wait and prefill included: what the user of a streaming chat feels) and
decode speed (tokens after the first per second of decoding, summed over the window so long
answers weigh by their tokens, not one vote per request).

Beside the window's percentiles (what the rollout's gates read) a report carries their
mergeable forms, what the fleet view folds across gateways: latency and TTFT histograms
(:class:`~slmops.telemetry.Sketch`, O(buckets) whatever the traffic), the decode sums, the
process's peak memory and a drift signature of what was served - the projected moments of the
embeddings an encoder returned, the bucketed log-probabilities of the tokens a decoder produced.
Neither keeps a vector, a text or a token id: 16 sums and 33 counts cannot be read back.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence

import numpy as np

from slmops.events.payloads import HealthAggregate
from slmops.telemetry import (
    DriftSignature,
    EmbeddingMoments,
    Sketch,
    TokenLogprobs,
    embedding_moments,
    merge_signatures,
    token_logprobs,
)


def bucketed(logprobs: Sequence[float]) -> TokenLogprobs | None:
    """A generation's token log-probabilities as the signature keeps them (None: no token);
    a worker thread's call, not the event loop's (a Python loop over the tokens)."""
    return token_logprobs(logprobs) if len(logprobs) else None


def peak_memory_mb() -> float | None:
    """The serving process's peak resident memory so far (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux counts kilobytes, macOS bytes
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class HealthWindow:
    """Requests since the last report: how many, how many failed, how long they took; and
    running totals since the process started (its metrics), which no report resets."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latencies_ms: list[float]
        self._shadow: list[float]
        self._ttft_ms: list[float]
        self._embedding: EmbeddingMoments | None
        self._logprobs: TokenLogprobs | None
        self._restart()
        self.total_ok = self.total_failed = self.total_tokens = 0

    def record(self, latency_ms: float, ok: bool) -> None:
        with self._lock:
            self._latencies_ms.append(latency_ms)
            self._latency_sketch.add(latency_ms)
            self._errors += 0 if ok else 1
            if ok:
                self.total_ok += 1
            else:
                self.total_failed += 1

    def record_generation(
        self, ttft_ms: float | None, decode_tokens: int, decode_s: float,
        logprobs: TokenLogprobs | None = None,
    ) -> None:  # fmt: skip
        """One generation's timings (its request is counted by :meth:`record`): ``ttft_ms`` None
        when it produced no token; ``decode_tokens`` the tokens after the first; ``logprobs``
        the model's log-probabilities of the tokens it produced, bucketed (:func:`bucketed`)."""
        with self._lock:
            if ttft_ms is not None:
                self._ttft_ms.append(ttft_ms)
                self._ttft_sketch.add(ttft_ms)
                self.total_tokens += 1 + decode_tokens
            if decode_tokens > 0 and decode_s > 0:
                self._decode_tokens += decode_tokens
                self._decode_s += decode_s
            if logprobs is not None and logprobs.count:
                self._logprobs = _merged(self._logprobs, logprobs).logprobs

    def record_embeddings(self, vectors: np.ndarray) -> None:
        """The embeddings one request was answered with, folded into the window's moments
        (the vectors themselves are not kept). A worker thread's call: the projection is
        numpy work the event loop should not wait for."""
        if len(vectors) == 0:
            return
        moments = embedding_moments(vectors)
        with self._lock:
            current = self._embedding
            # A request that finished on the model just swapped out must not make the new
            # model's embeddings unmergeable for the rest of the window: the newest width wins.
            if current is not None and current.dims != moments.dims:
                current = None
            self._embedding = _merged(current, moments).embedding

    def record_shadow(self, agreement: float) -> None:
        """How far the previous model agreed with the serving one on one sampled input."""
        with self._lock:
            self._shadow.append(agreement)

    def restart(self) -> None:
        """A new window starts; the old one is dropped (a new model: the next report is
        about it alone). Cheaper than ``take``: a fleet of agents swaps models at once."""
        with self._lock:
            self._restart()

    def _restart(self) -> None:
        self._latencies_ms, self._errors, self._shadow = [], 0, []
        self._ttft_ms, self._decode_tokens, self._decode_s = [], 0, 0.0
        self._latency_sketch, self._ttft_sketch = Sketch(), Sketch()
        self._embedding = self._logprobs = None
        self._started = time.monotonic()

    def take(self) -> HealthAggregate:
        """The aggregate of the window so far; a new window starts."""
        with self._lock:
            latencies, errors, shadow = self._latencies_ms, self._errors, self._shadow
            ttft, tokens, decode_s = self._ttft_ms, self._decode_tokens, self._decode_s
            latency_sketch, ttft_sketch = self._latency_sketch, self._ttft_sketch
            embedding, logprobs = self._embedding, self._logprobs
            window_s = max(time.monotonic() - self._started, 1e-3)
            self._restart()
        count = len(latencies)
        drift = None
        if embedding is not None or logprobs is not None:
            drift = DriftSignature(embedding=embedding, logprobs=logprobs)
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
            latency_ms=latency_sketch.to_wire() if latency_sketch.count else None,
            ttft_ms=ttft_sketch.to_wire() if ttft_sketch.count else None,
            decode_tokens=tokens,
            decode_s=decode_s,
            peak_memory_mb=peak_memory_mb(),
            drift=drift,
        )


def _merged(
    current: EmbeddingMoments | TokenLogprobs | None, more: EmbeddingMoments | TokenLogprobs
) -> DriftSignature:
    """``current`` and ``more`` as one signature (the SDK's merge: sums and counts added)."""

    def signature(part: EmbeddingMoments | TokenLogprobs | None) -> DriftSignature | None:
        if isinstance(part, EmbeddingMoments):
            return DriftSignature(embedding=part)
        return None if part is None else DriftSignature(logprobs=part)

    merged = merge_signatures([signature(current), signature(more)])
    assert merged is not None  # ``more`` is not empty
    return merged
