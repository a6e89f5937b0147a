"""What a simulated gateway reports about the model it runs: field figures derived from what
the validator measured on its host, a class's ``field_slowdown`` and ``input_shift``.

One :class:`FieldProfile` per (variant, class) holds a few precomputed health templates - latency
and TTFT histograms of lognormal samples around the host's median, decode sums, peak memory, a
drift signature drawn from the validation baseline's distribution - and each gateway's round picks
one and scales it (its jitter, a ``latency`` fault) by moving the histograms' bucket offset: a
100,000-gateway round builds no histogram and draws no sample.

- Latency: the report's ``latency.p95_ms`` (encoders, a p95: the median is taken as p95 / 1.4)
  or ``generation.ttft_ms`` (decoders, a median), else 20 ms; times the class's slowdown. A
  variant judged against the field (a re-optimization's candidate) carries the validator's
  prediction of its field figure (``field.latency_p95_ms`` / ``field.ttft_p95_ms``): the
  simulated device behaves as predicted, the class's slowdown already in it. (A simulation has
  no device to ask; for classes the host cannot measure that prediction is the only figure.)
- Drift: embeddings with the baseline's per-dimension variance around its mean moved by
  ``shift`` baseline standard deviations; token log-probabilities from the baseline's histogram
  moved ``2 x shift`` buckets to the less likely side. Without a baseline, a fixed synthetic
  distribution stands in for it (shifted the same way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from slmops.events.payloads import HealthAggregate
from slmops.manifests import Manifest
from slmops.reports import ValidationReport
from slmops.telemetry import DriftSignature, EmbeddingMoments, LogHistogram, Sketch, TokenLogprobs
from slmops.telemetry.drift import NLL_BUCKET_NATS, NLL_BUCKETS, PROJECTION_DIMS
from slmops.telemetry.sketch import ALPHA

BASE_LATENCY_MS = 20.0  # a variant whose report measured nothing
BASE_DECODE_TOKENS_PER_S = 40.0
P95_OVER_P50 = 1.4  # the simulated spread: the p95 a gateway reports is 1.4 x its median
_SIGMA = math.log(P95_OVER_P50) / 1.6448536269514722  # lognormal with that p95 / p50
REQUESTS_PER_ROUND = 60
TOKENS_PER_ANSWER = 32
TEMPLATES = 8  # rounds of one gateway cycle through these
_LOG_GAMMA = math.log((1 + ALPHA) / (1 - ALPHA))  # the sketch's bucket width, in log space
_SYNTHETIC_DIMS = 384
_SYNTHETIC_SEED = 17


@dataclass(frozen=True)
class HostFigures:
    """What the validator measured of a variant on its host (or the simulator's defaults)."""

    decoder: bool
    latency_p50_ms: float  # encoders: a request; decoders: the time to first token
    decode_tokens_per_s: float
    model_mb: float
    baseline: DriftSignature | None
    field_latency_p50_ms: float | None = None  # predicted for the field: no slowdown on top

    @classmethod
    def default(cls) -> HostFigures:
        """An encoder nothing was measured of."""
        return cls(False, BASE_LATENCY_MS, BASE_DECODE_TOKENS_PER_S, 0.0, None)

    @classmethod
    def of(cls, manifest: Manifest, report: dict[str, Any] | None) -> HostFigures:
        """From the variant's signed manifest and its validation report (the registry's JSON;
        None or unreadable: the defaults)."""
        decoder = manifest.task == "text-generation"
        parsed = _report(report)
        latency, decode = BASE_LATENCY_MS, BASE_DECODE_TOKENS_PER_S
        if parsed is not None and decoder:
            latency = _gate(parsed, "generation.ttft_ms") or latency  # a median already
            decode = _gate(parsed, "generation.decode_tokens_per_s") or decode
        elif parsed is not None:
            p95 = _gate(parsed, "latency.p95_ms")
            latency = p95 / P95_OVER_P50 if p95 else latency
        field = None
        if parsed is not None:
            predicted = _gate(parsed, "field.ttft_p95_ms" if decoder else "field.latency_p95_ms")
            field = predicted / P95_OVER_P50 if predicted else None
        return cls(decoder, latency, decode, manifest.artifact.size_bytes / 2**20,
                   parsed.drift_baseline if parsed is not None else None, field)  # fmt: skip


def _report(body: dict[str, Any] | None) -> ValidationReport | None:
    if body is None or not isinstance(body.get("report"), dict):
        return None
    try:
        return ValidationReport.model_validate(body["report"])
    except ValueError:  # a report of another schema: measured nothing we can read
        return None


def _gate(report: ValidationReport, name: str) -> float | None:
    gate = report.gate(name)
    value = gate.value if gate is not None else None
    return value if value is not None and value > 0 else None


@dataclass(frozen=True)
class FieldProfile:
    """A variant on one class in the field: ``latency_p50_ms`` (a request) and the templates
    a gateway's rounds cycle through."""

    latency_p50_ms: float
    templates: tuple[HealthAggregate, ...]

    @classmethod
    def build(cls, host: HostFigures, slowdown: float = 1.0, shift: float = 0.0) -> FieldProfile:
        if slowdown <= 0:
            raise ValueError(f"a field slowdown must be positive, not {slowdown}")
        decode_each_ms = 0.0
        if host.decoder:  # a whole answer: first token, then the rest at the decode speed
            decode_each_ms = (TOKENS_PER_ANSWER - 1) / host.decode_tokens_per_s * 1000 * slowdown
        first_ms = host.latency_p50_ms * slowdown
        if host.field_latency_p50_ms is not None:
            first_ms = host.field_latency_p50_ms
        templates = []
        for k in range(TEMPLATES):
            rng = np.random.default_rng([_SYNTHETIC_SEED, k])
            firsts = first_ms * np.exp(_SIGMA * rng.standard_normal(REQUESTS_PER_ROUND))
            latencies = Sketch.from_values((firsts + decode_each_ms).tolist())
            fields: dict[str, Any] = {"latency_ms": latencies.to_wire()}
            if host.decoder:
                decode_tokens = REQUESTS_PER_ROUND * (TOKENS_PER_ANSWER - 1)
                fields |= {"ttft_ms": Sketch.from_values(firsts.tolist()).to_wire(),
                           "decode_tokens": decode_tokens,
                           "decode_s": REQUESTS_PER_ROUND * decode_each_ms / 1000}  # fmt: skip
            templates.append(HealthAggregate(
                window_s=30.0, request_count=REQUESTS_PER_ROUND, error_rate=0.0,
                peak_memory_mb=round(64 + 1.3 * host.model_mb, 1),
                drift=_drift(host, shift, rng), **fields,
            ))  # fmt: skip
        return cls(first_ms + decode_each_ms, tuple(templates))

    def health(
        self, round_index: int, scale: float, window_s: float, shadow: float | None
    ) -> HealthAggregate:
        """One gateway's report of one round: template ``round_index`` with every time
        multiplied by ``scale`` (a gateway's jitter, a fault)."""
        template = self.templates[round_index % len(self.templates)]
        p50 = self.latency_p50_ms * scale
        update: dict[str, Any] = {
            "window_s": window_s, "latency_p50_ms": p50, "latency_p95_ms": p50 * P95_OVER_P50,
            "shadow_agreement": shadow, "shadow_samples": 6 if shadow is not None else 0,
            "latency_ms": scaled(template.latency_ms, scale),
        }  # fmt: skip
        if template.ttft_ms is not None:
            ttft = scaled(template.ttft_ms, scale)
            update |= {"ttft_ms": ttft, "decode_s": template.decode_s * scale,
                       "ttft_p50_ms": ttft.quantile(0.5) if ttft is not None else None,
                       "ttft_p95_ms": ttft.quantile(0.95) if ttft is not None else None,
                       "decode_tokens_per_s": template.decode_tokens / (template.decode_s * scale)
                       if template.decode_s > 0 else None}  # fmt: skip
        return template.model_copy(update=update)


def scaled(histogram: LogHistogram | None, factor: float) -> LogHistogram | None:
    """``histogram`` with every value multiplied by ~``factor`` (to the nearest power of the
    bucket width, within the sketch's 2 %): its counts move by whole buckets."""
    if histogram is None or factor == 1.0:
        return histogram
    steps = round(math.log(factor) / _LOG_GAMMA)
    exact = math.exp(steps * _LOG_GAMMA)
    return histogram.model_copy(update={
        "offset": histogram.offset + steps, "sum": histogram.sum * exact,
        "min": None if histogram.min is None else histogram.min * exact,
        "max": None if histogram.max is None else histogram.max * exact,
    })  # fmt: skip


def _drift(host: HostFigures, shift: float, rng: np.random.Generator) -> DriftSignature:
    baseline = host.baseline
    if host.decoder:
        base = baseline.logprobs if baseline is not None else None
        tokens = REQUESTS_PER_ROUND * TOKENS_PER_ANSWER
        return DriftSignature(logprobs=_served_logprobs(base, shift, tokens, rng))
    moments = baseline.embedding if baseline is not None else None
    return DriftSignature(embedding=_served_embeddings(moments, shift, REQUESTS_PER_ROUND, rng))


def _served_embeddings(
    baseline: EmbeddingMoments | None, shift: float, n: int, rng: np.random.Generator
) -> EmbeddingMoments:
    """Moments of ``n`` projected embeddings around the baseline's mean moved by ``shift``
    of its standard deviations (per dimension), with its variance."""
    if baseline is not None and baseline.count >= 2:
        dims = baseline.dims
        mean = np.asarray(baseline.sums) / baseline.count
        sd = np.sqrt(np.maximum(np.asarray(baseline.sumsq) / baseline.count - mean**2, 0.0))
    else:
        synthetic = np.random.default_rng(_SYNTHETIC_SEED)
        dims = _SYNTHETIC_DIMS
        mean = synthetic.normal(0.0, 0.15, PROJECTION_DIMS)
        sd = np.full(PROJECTION_DIMS, 0.15)
    samples = rng.normal(mean + shift * sd, sd, (n, len(mean)))
    return EmbeddingMoments(dims=dims, count=n, sums=samples.sum(axis=0).tolist(),
                            sumsq=(samples**2).sum(axis=0).tolist())  # fmt: skip


def _served_logprobs(
    baseline: TokenLogprobs | None, shift: float, n: int, rng: np.random.Generator
) -> TokenLogprobs:
    """``n`` token log-probabilities from the baseline's buckets moved ``2 x shift`` buckets
    towards the unlikely (a fractional move splits the mass between two neighbours)."""
    if baseline is not None and baseline.count > 0:
        shares = np.asarray(baseline.counts, dtype=np.float64) / baseline.count
    else:
        shares = np.exp(-np.arange(NLL_BUCKETS) / 3.0)
        shares /= shares.sum()
    move = 2 * shift
    whole = math.floor(move)
    part = move - whole
    moved = (1 - part) * _moved(shares, whole) + part * _moved(shares, whole + 1)
    counts = rng.multinomial(n, moved / moved.sum())
    centres = (np.arange(NLL_BUCKETS) + 0.5) * NLL_BUCKET_NATS
    return TokenLogprobs(count=n, sum=float(counts @ centres), counts=counts.tolist())


def _moved(shares: np.ndarray, buckets: int) -> np.ndarray:
    """Shares moved ``buckets`` to the right; what passes the last bucket stays in it."""
    if buckets <= 0:
        return shares
    n = len(shares)
    buckets = min(buckets, n - 1)
    out = np.zeros_like(shares)
    out[buckets:] = shares[: n - buckets]
    out[-1] += shares[n - buckets :].sum()
    return out
