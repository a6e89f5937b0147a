"""Drift signatures: a shifted input distribution moves the score, the same one does not."""

from __future__ import annotations

import numpy as np
import pytest

from slmops.telemetry.drift import (
    PROJECTION_DIMS,
    DriftSignature,
    embedding_moments,
    embedding_shift,
    logprob_shift,
    merge_signatures,
    token_logprobs,
)


def _embeddings(rng: np.random.Generator, centre: np.ndarray, n: int) -> np.ndarray:
    return centre + rng.normal(0, 0.05, (n, len(centre)))


def test_the_same_distribution_scores_low_and_a_shifted_one_high() -> None:
    rng = np.random.default_rng(0)
    centre = rng.normal(0, 0.05, 384)
    other = rng.normal(0, 0.05, 384)
    baseline = embedding_moments(_embeddings(rng, centre, 500))

    same = embedding_shift(baseline, embedding_moments(_embeddings(rng, centre, 300)))
    shifted = embedding_shift(
        baseline, embedding_moments(_embeddings(rng, 0.5 * centre + 0.5 * other, 300))
    )

    assert same < 0.25 < 0.5 < shifted


def test_moments_merge_by_adding_and_hold_no_vectors() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 384)), rng.normal(size=(7, 384))

    merged = merge_signatures([DriftSignature(embedding=embedding_moments(a)),
                               DriftSignature(embedding=embedding_moments(b))])  # fmt: skip
    whole = embedding_moments(np.concatenate([a, b]))

    assert merged is not None
    assert merged.embedding is not None
    assert merged.embedding.count == 17
    assert np.allclose(merged.embedding.sums, whole.sums)
    assert len(whole.sums) == PROJECTION_DIMS  # 16 numbers whatever the width: not the texts


def test_logprobs_of_an_unsure_model_shift_and_of_the_same_do_not() -> None:
    rng = np.random.default_rng(2)
    baseline = token_logprobs(-rng.exponential(0.8, 5_000))

    same = logprob_shift(baseline, token_logprobs(-rng.exponential(0.8, 3_000)))
    unsure = logprob_shift(baseline, token_logprobs(-rng.exponential(2.0, 3_000)))

    assert same < 0.05
    assert unsure > 0.25
    assert baseline.mean_logprob == pytest.approx(-0.8, rel=0.05)


def test_signatures_that_cannot_compare_say_why() -> None:
    small = embedding_moments(np.ones((3, 8)))
    with pytest.raises(ValueError, match="not the same model"):
        embedding_shift(small, embedding_moments(np.ones((3, 16))))
    with pytest.raises(ValueError, match="\\(n, dims\\)"):
        embedding_moments(np.ones(8))
    assert merge_signatures([None, DriftSignature()]) is None
