"""Quality of a model against its parent, computed from their outputs on the same inputs.

One definition for every service: the optimizer's quick score during its search, the
validator's parity gate and the benchmarks all call these, so "cosine 0.99" means the same
thing in a search trail, a report and a table. Pure numpy; no runtime is loaded here.

- Encoders: sentence embeddings are the attention-masked mean of the last hidden states (as
  sentence-transformers pools all-MiniLM-L6-v2), or whatever the model's embedding output and
  pooling are (``slmops.embeddings`` chooses them); quality is their cosine to the parent's.
- Decoders: top-1 next-token agreement over every non-padding position, and perplexity of the
  window's own next tokens under each model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating]
IntArray = npt.NDArray[np.integer]
#: One model output on one batch + its attention mask → one vector per text.
Pool = Callable[[FloatArray, IntArray], npt.NDArray[np.float64]]


def mean_pooled(hidden: FloatArray, attention_mask: IntArray) -> npt.NDArray[np.float64]:
    """[batch, seq, dim] hidden states → [batch, dim] masked means."""
    mask = attention_mask.astype(np.float64)[..., None]
    summed = (hidden.astype(np.float64) * mask).sum(axis=1)
    return np.asarray(summed / np.clip(mask.sum(axis=1), 1e-9, None), dtype=np.float64)


def cosine_rows(a: FloatArray, b: FloatArray) -> npt.NDArray[np.float64]:
    """Row-wise cosine similarity of two [n, dim] arrays."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return np.asarray((a64 * b64).sum(axis=1) / np.clip(norms, 1e-12, None))


@dataclass(frozen=True)
class EncoderParity:
    cosine_mean: float
    cosine_min: float
    count: int


@dataclass(frozen=True)
class DecoderParity:
    top1_agreement: float
    perplexity_parent: float
    perplexity_candidate: float
    positions: int

    @property
    def perplexity_increase_pct(self) -> float:
        return 100.0 * (self.perplexity_candidate / self.perplexity_parent - 1.0)


def encoder_parity(
    parent: Sequence[FloatArray],
    candidate: Sequence[FloatArray],
    masks: Sequence[IntArray],
    *,
    pool: Pool = mean_pooled,
) -> EncoderParity:
    """Cosine of pooled embeddings, batch by batch.

    ``pool`` turns one output into one vector per text: the masked mean of last hidden states
    by default; ``EmbeddingChoice.pooled`` for the output ``slmops.embeddings`` chose (a
    pooled output is used as is, so its cosine is the model's own sentence vectors').
    """
    cosines = [
        cosine_rows(pool(p, m), pool(c, m))
        for p, c, m in zip(parent, candidate, masks, strict=True)
    ]
    flat = np.concatenate(cosines)
    return EncoderParity(float(flat.mean()), float(flat.min()), int(flat.size))


def _log_softmax(logits: FloatArray) -> npt.NDArray[np.float64]:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return np.asarray(x - np.log(np.exp(x).sum(axis=-1, keepdims=True)))


def decoder_parity(
    parent: Sequence[FloatArray],
    candidate: Sequence[FloatArray],
    input_ids: Sequence[IntArray],
    masks: Sequence[IntArray],
) -> DecoderParity:
    """Top-1 agreement and perplexity from [batch, seq, vocab] logits of both models."""
    agree = positions = pairs = 0
    nll = {"parent": 0.0, "candidate": 0.0}
    for p, c, ids, mask in zip(parent, candidate, input_ids, masks, strict=True):
        valid = mask.astype(bool)
        agree += int(((p.argmax(-1) == c.argmax(-1)) & valid).sum())
        positions += int(valid.sum())
        # Position t predicts token t+1: score only pairs where both are real tokens.
        pair = valid[:, :-1] & valid[:, 1:]
        pairs += int(pair.sum())
        targets = ids[:, 1:][..., None]
        for name, logits in (("parent", p), ("candidate", c)):
            logp = np.take_along_axis(_log_softmax(logits[:, :-1]), targets, axis=-1)[..., 0]
            nll[name] += float(-(logp * pair).sum())
    pairs = max(pairs, 1)
    return DecoderParity(
        top1_agreement=agree / max(positions, 1),
        perplexity_parent=float(np.exp(nll["parent"] / pairs)),
        perplexity_candidate=float(np.exp(nll["candidate"] / pairs)),
        positions=positions,
    )
