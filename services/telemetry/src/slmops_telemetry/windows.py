"""One reporting window of one (model, version, variant, class, label set): the fleet's health
reports merged - histograms added, sums summed, the drift signature's moments added - and its
stored form (a KV value), so a restarted service resumes where it was.

Everything here merges by addition, so a window folded from 100,000 gateways' reports is the
same whichever order they came in, and merging windows (label sets of a class, or a span of
windows) is the same operation again.
"""

from __future__ import annotations

from datetime import UTC, datetime
from operator import add

from pydantic import BaseModel, ConfigDict

from slmops.events.payloads import FieldFigures, HealthAggregate
from slmops.telemetry.drift import DriftSignature, EmbeddingMoments, TokenLogprobs
from slmops.telemetry.sketch import MAX_BUCKETS, LogHistogram, Sketch


class DriftSums:
    """A drift signature being merged (mutable: merge_signatures builds a model per call)."""

    __slots__ = ("dims", "emb_count", "lp_count", "lp_counts", "lp_sum", "sums", "sumsq")

    def __init__(self) -> None:
        self.dims = 0
        self.emb_count = self.lp_count = 0
        self.sums: list[float] = []
        self.sumsq: list[float] = []
        self.lp_sum = 0.0
        self.lp_counts: list[int] = []

    def add(self, signature: DriftSignature) -> None:
        e, t = signature.embedding, signature.logprobs
        if e is not None and e.count and (not self.dims or self.dims == e.dims):
            if not self.dims:  # the first width seen wins: one variant has one width
                self.dims, self.sums, self.sumsq = e.dims, list(e.sums), list(e.sumsq)
            else:
                self.sums = list(map(add, self.sums, e.sums))  # same dims: same lengths
                self.sumsq = list(map(add, self.sumsq, e.sumsq))
            self.emb_count += e.count
        if t is not None and t.count:
            if not self.lp_counts:
                self.lp_counts = list(t.counts)
            else:
                self.lp_counts = list(map(add, self.lp_counts, t.counts))
            self.lp_count += t.count
            self.lp_sum += t.sum

    def signature(self) -> DriftSignature | None:
        embedding = logprobs = None
        if self.emb_count:
            embedding = EmbeddingMoments(dims=self.dims, count=self.emb_count,
                                         sums=self.sums, sumsq=self.sumsq)  # fmt: skip
        if self.lp_count:
            logprobs = TokenLogprobs(count=self.lp_count, sum=self.lp_sum, counts=self.lp_counts)
        if embedding is None and logprobs is None:
            return None
        return DriftSignature(embedding=embedding, logprobs=logprobs)


class HistogramSum:
    """Log histograms added up in one dense list of counts (slices added with ``map``: a
    report's histogram merges in a microsecond or two, where a bucket dict takes ten)."""

    __slots__ = ("count", "counts", "max", "min", "offset", "sum", "zeros")

    def __init__(self) -> None:
        self.count = self.zeros = self.offset = 0
        self.sum = 0.0
        self.min: float | None = None
        self.max: float | None = None
        self.counts: list[int] = []

    def add(self, histogram: LogHistogram) -> None:
        if not histogram.count:
            return
        self.count += histogram.count
        self.sum += histogram.sum
        self.zeros += histogram.zeros
        low, high = histogram.min, histogram.max
        if low is not None and (self.min is None or low < self.min):
            self.min = low
        if high is not None and (self.max is None or high > self.max):
            self.max = high
        counts = histogram.counts
        if not counts:
            return
        offset = histogram.offset
        if not self.counts:
            self.offset, self.counts = offset, list(counts)
            return
        if offset < self.offset:
            self.counts[0:0] = [0] * (self.offset - offset)
            self.offset = offset
        missing = offset + len(counts) - self.offset - len(self.counts)
        if missing > 0:
            self.counts.extend([0] * missing)
        i = offset - self.offset
        self.counts[i : i + len(counts)] = map(add, self.counts[i : i + len(counts)], counts)

    def to_wire(self) -> LogHistogram:
        counts, offset = self.counts, self.offset
        if len(counts) > MAX_BUCKETS:  # the lowest fold together, as Sketch.to_wire does
            cut = len(counts) - MAX_BUCKETS + 1
            counts = [sum(counts[:cut]), *counts[cut:]]
            offset += cut - 1
        return LogHistogram(count=self.count, sum=self.sum, min=self.min, max=self.max,
                            zeros=self.zeros, offset=offset, counts=counts)  # fmt: skip

    def quantile(self, q: float) -> float | None:
        return Sketch.of(self.to_wire()).quantile(q) if self.count else None


#: Ids one window remembers at most (of events, and of gateways): 250,000 hashes are ~20 MB;
#: a key with more reporters in one window counts the rest without de-duplication.
MAX_IDS = 250_000


class Window:
    """The merged reports of one key over ``[start, start + window_s)`` (epoch seconds)."""

    __slots__ = ("decode_s", "decode_tokens", "drift", "errors", "gateway_ids", "gateways",
                 "latency", "peak_memory_mb", "requests", "seen_ids", "start", "ttft",
                 "window_s")  # fmt: skip

    def __init__(self, start: float, window_s: float) -> None:
        self.start, self.window_s = start, window_s
        self.latency, self.ttft = HistogramSum(), HistogramSum()
        self.requests = 0
        self.errors = 0.0  # error_rate x request_count, summed
        self.decode_tokens = 0
        self.decode_s = 0.0
        self.peak_memory_mb: float | None = None
        self.drift = DriftSums()
        self.gateways = 0
        # While a window may still receive reports: who reported (a gateway counts once) and
        # which events were folded (a redelivery is not folded twice), as the ids' hashes (64
        # bits: an int costs less than half of an id string). Dropped when sealed.
        self.gateway_ids: set[int] | None = set()
        self.seen_ids: set[int] | None = set()

    @property
    def sealed(self) -> bool:
        return self.seen_ids is None

    def seal(self) -> None:
        self.gateway_ids = self.seen_ids = None

    def add(self, gateway_id: str, health: HealthAggregate) -> None:
        reporters = self.gateway_ids
        if reporters is None or len(reporters) >= MAX_IDS:
            self.gateways += 1  # full: a repeat counts again
        elif (reporter := hash(gateway_id)) not in reporters:
            reporters.add(reporter)
            self.gateways += 1
        n = health.request_count
        self.requests += n
        self.errors += health.error_rate * n
        if health.latency_ms is not None:
            self.latency.add(health.latency_ms)
        if health.ttft_ms is not None:
            self.ttft.add(health.ttft_ms)
        self.decode_tokens += health.decode_tokens
        self.decode_s += health.decode_s
        peak = health.peak_memory_mb
        if peak is not None and (self.peak_memory_mb is None or peak > self.peak_memory_mb):
            self.peak_memory_mb = peak
        if health.drift is not None:
            self.drift.add(health.drift)

    def merge(self, other: Window) -> None:
        """Add ``other`` (another label set's, or another window's) into this one."""
        self.requests += other.requests
        self.errors += other.errors
        self.latency.add(other.latency.to_wire())
        self.ttft.add(other.ttft.to_wire())
        self.decode_tokens += other.decode_tokens
        self.decode_s += other.decode_s
        if other.peak_memory_mb is not None:
            self.peak_memory_mb = max(self.peak_memory_mb or 0.0, other.peak_memory_mb)
        signature = other.drift.signature()
        if signature is not None:
            self.drift.add(signature)
        self.gateways += other.gateways  # label sets are disjoint gateways

    @property
    def start_time(self) -> datetime:
        return datetime.fromtimestamp(self.start, UTC)

    def figures(self) -> FieldFigures:
        return FieldFigures(
            gateways=self.gateways,
            requests=self.requests,
            error_rate=min(1.0, self.errors / self.requests) if self.requests else 0.0,
            latency_p50_ms=self.latency.quantile(0.5),
            latency_p95_ms=self.latency.quantile(0.95),
            ttft_p50_ms=self.ttft.quantile(0.5),
            ttft_p95_ms=self.ttft.quantile(0.95),
            decode_tokens_per_s=self.decode_tokens / self.decode_s if self.decode_s > 0 else None,
            peak_memory_mb=self.peak_memory_mb,
        )

    def to_record(self) -> WindowRecord:
        return WindowRecord(start=self.start, window_s=self.window_s, gateways=self.gateways,
                            requests=self.requests, errors=self.errors,
                            latency_ms=self.latency.to_wire(), ttft_ms=self.ttft.to_wire(),
                            decode_tokens=self.decode_tokens, decode_s=self.decode_s,
                            peak_memory_mb=self.peak_memory_mb,
                            drift=self.drift.signature())  # fmt: skip

    @classmethod
    def from_record(cls, record: WindowRecord) -> Window:
        window = cls(record.start, record.window_s)
        window.gateways, window.requests, window.errors = (
            record.gateways, record.requests, record.errors)  # fmt: skip
        for histogram, stored in ((window.latency, record.latency_ms),
                                  (window.ttft, record.ttft_ms)):  # fmt: skip
            if stored is not None:
                histogram.add(stored)
        window.decode_tokens, window.decode_s = record.decode_tokens, record.decode_s
        window.peak_memory_mb = record.peak_memory_mb
        if record.drift is not None:
            window.drift.add(record.drift)
        # Who reported is not stored (100,000 ids would not fit a KV value): a report of a
        # restored window that is redelivered after the restart counts again (at most the
        # batch that was folded and stored but not acked when the service stopped), and so
        # does a gateway that reports again in it (``gateways`` may overcount that window).
        return window


class WindowRecord(BaseModel):
    """A window as stored in KV, with the key it belongs to (:class:`StoredWindow`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    start: float
    window_s: float
    gateways: int
    requests: int
    errors: float
    latency_ms: LogHistogram | None = None
    ttft_ms: LogHistogram | None = None
    decode_tokens: int = 0
    decode_s: float = 0.0
    peak_memory_mb: float | None = None
    drift: DriftSignature | None = None


class StoredWindow(BaseModel):
    """One KV value: whose window it is, and the window."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model_name: str
    version: str
    variant_id: str
    device_class: str
    labels: dict[str, str]
    window: WindowRecord
