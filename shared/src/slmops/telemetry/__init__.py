"""Field telemetry: mergeable aggregates a gateway reports and a fleet view folds - latency
histograms and drift signatures, never the inputs."""

from slmops.telemetry.drift import (
    DriftSignature,
    EmbeddingMoments,
    TokenLogprobs,
    embedding_moments,
    embedding_shift,
    logprob_shift,
    merge_signatures,
    token_logprobs,
)
from slmops.telemetry.sketch import LogHistogram, Sketch

__all__ = [
    "DriftSignature",
    "EmbeddingMoments",
    "LogHistogram",
    "Sketch",
    "TokenLogprobs",
    "embedding_moments",
    "embedding_shift",
    "logprob_shift",
    "merge_signatures",
    "token_logprobs",
]
