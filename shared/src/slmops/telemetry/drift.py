"""Drift signatures: what a gateway may say about the inputs it served without saying any input.

- Encoders: the first two moments of the served embeddings seen through a fixed random
  projection to :data:`PROJECTION_DIMS` dimensions (Johnson-Lindenstrauss: the projection keeps
  distances, so a shift of the input distribution shows as a shift of the projected means).
  Sums and sums of squares merge by adding; 16 numbers cannot be turned back into a text.
- Decoders: the distribution of the log-probability the model gave each token it produced, in
  fixed buckets of negative log-probability (nats). Inputs the model finds unfamiliar make it
  less sure of its words: the distribution moves right.

The validator computes the same signature on the evaluation set (the baseline a variant is
judged against); the fleet view merges the gateways' and compares with two scores:
:func:`embedding_shift` (standardized mean difference, root mean square over the projected
dimensions: 0 = the same centre, 1 = moved by one baseline standard deviation) and
:func:`logprob_shift` (population stability index: < 0.1 stable, > 0.25 a shifted population,
the credit-risk world's rule of thumb).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

PROJECTION_DIMS = 16
PROJECTION_SEED = 20_261_203  # the same projection on every gateway and in the validator
NLL_BUCKET_NATS = 0.5
NLL_BUCKETS = 33  # [0, 0.5), [0.5, 1), ... [15.5, 16), then everything from 16 nats on


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class EmbeddingMoments(_Part):
    """Served embeddings (unit length) projected to ``PROJECTION_DIMS`` numbers each."""

    dims: int = Field(gt=0, description="Width of the model's embeddings (the projection's input).")
    count: int = Field(0, ge=0, description="Embeddings seen.")
    sums: list[float] = Field(max_length=PROJECTION_DIMS)
    sumsq: list[float] = Field(max_length=PROJECTION_DIMS)


class TokenLogprobs(_Part):
    """Negative log-probabilities (nats) of the tokens a decoder produced, bucketed."""

    count: int = Field(0, ge=0, description="Tokens seen.")
    sum: float = Field(0.0, ge=0)
    counts: list[int] = Field(default_factory=lambda: [0] * NLL_BUCKETS, max_length=NLL_BUCKETS)

    @property
    def mean_logprob(self) -> float | None:
        return -self.sum / self.count if self.count else None


class DriftSignature(_Part):
    embedding: EmbeddingMoments | None = None
    logprobs: TokenLogprobs | None = None

    @property
    def samples(self) -> int:
        """Embeddings or tokens behind it: a score from a handful means nothing."""
        return (self.embedding.count if self.embedding else 0) + (
            self.logprobs.count if self.logprobs else 0
        )


@functools.cache
def projection(dims: int) -> np.ndarray:
    """The fixed ``dims`` x ``PROJECTION_DIMS`` Gaussian projection (same everywhere)."""
    rng = np.random.default_rng([PROJECTION_SEED, dims])
    matrix = rng.standard_normal((dims, PROJECTION_DIMS)) / math.sqrt(PROJECTION_DIMS)
    matrix.setflags(write=False)
    return matrix


def embedding_moments(vectors: np.ndarray) -> EmbeddingMoments:
    """The signature of a batch of embeddings, shape (n, dims); normalized here to unit length
    so a model that pools without normalizing is compared on directions too."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise ValueError(f"embeddings must be (n, dims), not {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.where(norms > 0, norms, 1.0)
    projected = unit @ projection(vectors.shape[1])
    return EmbeddingMoments(dims=vectors.shape[1], count=len(vectors),
                            sums=projected.sum(axis=0).tolist(),
                            sumsq=(projected**2).sum(axis=0).tolist())  # fmt: skip


def token_logprobs(logprobs: Iterable[float]) -> TokenLogprobs:
    """The signature of the log-probabilities (<= 0) of produced tokens."""
    counts = [0] * NLL_BUCKETS
    total, n = 0.0, 0
    for logprob in logprobs:
        if not math.isfinite(logprob):
            continue
        nll = max(-logprob, 0.0)
        counts[min(int(nll / NLL_BUCKET_NATS), NLL_BUCKETS - 1)] += 1
        total += nll
        n += 1
    return TokenLogprobs(count=n, sum=total, counts=counts)


def merge_signatures(signatures: Iterable[DriftSignature | None]) -> DriftSignature | None:
    """One signature of many (embeddings of different widths cannot merge: the first width
    seen wins, the others are left out - one variant has one width)."""
    embedding: EmbeddingMoments | None = None
    logprobs: TokenLogprobs | None = None
    for signature in signatures:
        if signature is None:
            continue
        e, t = signature.embedding, signature.logprobs
        if e is not None and e.count and (embedding is None or embedding.dims == e.dims):
            embedding = e if embedding is None else EmbeddingMoments(
                dims=e.dims, count=embedding.count + e.count,
                sums=[a + b for a, b in zip(embedding.sums, e.sums, strict=True)],
                sumsq=[a + b for a, b in zip(embedding.sumsq, e.sumsq, strict=True)],
            )  # fmt: skip
        if t is not None and t.count:
            logprobs = t if logprobs is None else TokenLogprobs(
                count=logprobs.count + t.count, sum=logprobs.sum + t.sum,
                counts=[a + b for a, b in zip(logprobs.counts, t.counts, strict=True)],
            )  # fmt: skip
    if embedding is None and logprobs is None:
        return None
    return DriftSignature(embedding=embedding, logprobs=logprobs)


def embedding_shift(baseline: EmbeddingMoments, current: EmbeddingMoments) -> float:
    """How far the current centre moved from the baseline's, in baseline standard deviations
    (root mean square over the projected dimensions). ValueError when they cannot compare."""
    if baseline.dims != current.dims:
        raise ValueError(f"embeddings of width {current.dims} against a baseline of "
                         f"{baseline.dims}: not the same model")  # fmt: skip
    if baseline.count < 2 or current.count < 1:
        raise ValueError("too few embeddings to compare")
    base_mean = np.asarray(baseline.sums) / baseline.count
    base_var = np.asarray(baseline.sumsq) / baseline.count - base_mean**2
    # a floor: a baseline of near-identical texts must not turn any change into infinity
    base_sd = np.sqrt(np.maximum(base_var, 1e-4 / PROJECTION_DIMS))
    cur_mean = np.asarray(current.sums) / current.count
    return float(np.sqrt(np.mean(((cur_mean - base_mean) / base_sd) ** 2)))


def logprob_shift(baseline: TokenLogprobs, current: TokenLogprobs) -> float:
    """Population stability index of the current token log-probabilities against the
    baseline's (buckets smoothed so an empty one is not infinitely surprising)."""
    if baseline.count < 1 or current.count < 1:
        raise ValueError("too few tokens to compare")
    eps = 0.5  # a Laplace-style half count per bucket
    b = (np.asarray(baseline.counts, dtype=np.float64) + eps) / (baseline.count + eps * NLL_BUCKETS)
    c = (np.asarray(current.counts, dtype=np.float64) + eps) / (current.count + eps * NLL_BUCKETS)
    return float(np.sum((c - b) * np.log(c / b)))
