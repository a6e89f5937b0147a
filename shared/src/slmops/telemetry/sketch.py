"""Mergeable latency histograms: what a gateway reports instead of percentiles.

A p95 of one gateway and a p95 of another cannot be combined into the fleet's p95; counts in
shared buckets can. The buckets are DDSketch's: logarithmic, so every quantile read back is
within ``alpha`` (2 %) of a true sample value whatever the scale (0.1 ms or 100 s), and the
bucket of a value is the same on every gateway, so merging is adding counts. A window of one
gateway spans a few dozen buckets; the whole range of plausible latencies (1 µs .. 11 days at
2 %) fits in :data:`MAX_BUCKETS`, so a report stays small however slow a device is.

:class:`LogHistogram` is the wire form (dense counts from an ``offset``); :class:`Sketch` is the
mutable accumulator a gateway fills and a fleet view merges into.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

ALPHA = 0.02  # relative accuracy of every quantile
_GAMMA = (1 + ALPHA) / (1 - ALPHA)
_LOG_GAMMA = math.log(_GAMMA)
MIN_VALUE = 1e-3  # values at or below (ms: 1 µs) count in the zero bucket
MAX_BUCKETS = 600  # 1e-3 .. ~1e9: wider spans fold their lowest buckets together


def bucket_of(value: float) -> int:
    return math.ceil(math.log(value) / _LOG_GAMMA)


def value_of(bucket: int) -> float:
    """The bucket's representative: within ``ALPHA`` of every value that falls in it."""
    return 2 * _GAMMA**bucket / (_GAMMA + 1)


class LogHistogram(BaseModel):
    """Counts per logarithmic bucket, dense from ``offset`` (bucket index of ``counts[0]``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    count: int = Field(0, ge=0)
    sum: float = Field(0.0, ge=0)
    min: float | None = Field(None, ge=0)
    max: float | None = Field(None, ge=0)
    zeros: int = Field(0, ge=0, description=f"Values <= {MIN_VALUE}.")
    offset: int = 0
    counts: list[int] = Field(default_factory=list, max_length=MAX_BUCKETS)

    def quantile(self, q: float) -> float | None:
        return Sketch.of(self).quantile(q)


class Sketch:
    """Accumulates values or merges histograms; reads quantiles back."""

    __slots__ = ("buckets", "count", "max", "min", "sum", "zeros")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = self.zeros = 0
        self.sum = 0.0
        self.min: float | None = None
        self.max: float | None = None

    @classmethod
    def of(cls, *histograms: LogHistogram | None) -> Sketch:
        sketch = cls()
        for histogram in histograms:
            if histogram is not None:
                sketch.merge(histogram)
        return sketch

    @classmethod
    def from_values(cls, values: Iterable[float]) -> Sketch:
        sketch = cls()
        for value in values:
            sketch.add(value)
        return sketch

    def add(self, value: float, n: int = 1) -> None:
        if not math.isfinite(value) or value < 0 or n <= 0:
            return  # a clock that went backwards is not a latency
        self.count += n
        self.sum += value * n
        self.min = value if self.min is None else min(self.min, value)
        self.max = value if self.max is None else max(self.max, value)
        if value <= MIN_VALUE:
            self.zeros += n
            return
        bucket = bucket_of(value)
        self.buckets[bucket] = self.buckets.get(bucket, 0) + n

    def merge(self, other: LogHistogram) -> None:
        if other.count == 0:
            return
        self.count += other.count
        self.sum += other.sum
        self.zeros += other.zeros
        if other.min is not None:
            self.min = other.min if self.min is None else min(self.min, other.min)
        if other.max is not None:
            self.max = other.max if self.max is None else max(self.max, other.max)
        buckets = self.buckets
        for i, n in enumerate(other.counts, other.offset):
            if n:
                buckets[i] = buckets.get(i, 0) + n

    def quantile(self, q: float) -> float | None:
        """The value below which a share ``q`` of the values lie (None when empty)."""
        if self.count == 0:
            return None
        rank = q * (self.count - 1)
        seen = self.zeros
        if rank < seen:
            return 0.0
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if rank < seen:
                estimate = value_of(bucket)
                # the extremes are known exactly: never report beyond them
                low = self.min if self.min is not None else estimate
                high = self.max if self.max is not None else estimate
                return min(max(estimate, low), high)
        return self.max

    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    def to_wire(self) -> LogHistogram:
        if not self.buckets:
            return LogHistogram(count=self.count, sum=self.sum, min=self.min, max=self.max,
                                zeros=self.zeros)  # fmt: skip
        low, high = min(self.buckets), max(self.buckets)
        if high - low >= MAX_BUCKETS:  # fold the lowest together: the tail that matters stays
            low = high - MAX_BUCKETS + 1
        counts = [0] * (high - low + 1)
        for bucket, n in self.buckets.items():
            counts[max(bucket, low) - low] += n
        return LogHistogram(count=self.count, sum=self.sum, min=self.min, max=self.max,
                            zeros=self.zeros, offset=low, counts=counts)  # fmt: skip
