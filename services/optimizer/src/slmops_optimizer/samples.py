"""Sample inputs for a job: calibration data, the conversion check and the quick quality score.

Texts come from the version's evaluation set when it has one, else from the SDK's built-in
English set. They are tokenized once per job into ONNX feeds named as ``convert`` names the
graph inputs (``input_ids``, ``attention_mask``, ``token_type_ids``). An ONNX source without a
tokenizer gets synthetic token ids: enough for calibration and agreement, said in the log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from slmops_optimizer.passes.base import TaskKind

#: Tokens per text for encoders, per window for decoders: small enough for a quick score.
ENCODER_MAX_TOKENS = 128
DECODER_WINDOW_TOKENS = 64


@dataclass(frozen=True)
class SampleSet:
    """Batches of ONNX feeds (numpy int64) plus where they came from."""

    task: TaskKind
    feeds: list[dict[str, np.ndarray]]
    origin: str  # "eval-set", "built-in", "synthetic"
    truncated: int = 0  # texts cut to the maximum length
    generation: Any = None  # GenerationSpec of a generation graph: its feeds get empty pasts

    def for_inputs(self, input_names: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """The feeds restricted to the inputs a given graph declares (a generation graph's
        past keys and values empty: the whole window runs in one step)."""
        wanted = set(input_names)
        feeds = []
        for feed in self.feeds:
            full = dict(feed)
            if self.generation is not None:
                full.update(self.generation.empty_past(int(feed["input_ids"].shape[0])))
            feeds.append({k: v for k, v in full.items() if k in wanted})
        return feeds

    @property
    def count(self) -> int:
        return sum(int(next(iter(feed.values())).shape[0]) for feed in self.feeds)


def encoder_samples(
    tokenizer: Any, texts: Sequence[str], *, origin: str, batch_size: int = 8
) -> SampleSet:
    """Padded batches of single texts for an encoder (a ``transformers`` tokenizer)."""
    feeds: list[dict[str, np.ndarray]] = []
    truncated = 0
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        full = tokenizer(batch, truncation=False)["input_ids"]
        truncated += sum(1 for ids in full if len(ids) > ENCODER_MAX_TOKENS)
        encoded = tokenizer(
            batch,
            padding=True,
            truncation=True,
            max_length=ENCODER_MAX_TOKENS,
            return_tensors="np",
        )
        feed = {k: np.asarray(v, dtype=np.int64) for k, v in encoded.items()}
        feed.setdefault("token_type_ids", np.zeros_like(feed["input_ids"]))
        feeds.append(feed)
    return SampleSet("feature-extraction", feeds, origin, truncated)


def decoder_samples(
    tokenizer: Any, texts: Sequence[str], *, origin: str, windows: int, batch_size: int = 4
) -> SampleSet:
    """Fixed windows over the concatenated texts for a decoder (next-token prediction)."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
    span = DECODER_WINDOW_TOKENS
    available = max(1, len(ids) // span)
    if len(ids) < span:  # a tiny eval set: repeat it rather than fail
        ids = (ids * (span // max(1, len(ids)) + 1))[:span]
    rows = [ids[i * span : (i + 1) * span] for i in range(min(windows, available))]
    return _decoder_batches(rows, origin, batch_size)


def synthetic_samples(task: TaskKind, *, vocab_size: int, count: int, seed: int = 0) -> SampleSet:
    """Random token ids (no tokenizer): deterministic per seed."""
    rng = np.random.default_rng(seed)
    low = min(1000, vocab_size // 4)
    if task == "text-generation":
        rows = rng.integers(low, vocab_size, size=(count, DECODER_WINDOW_TOKENS)).tolist()
        return _decoder_batches(rows, "synthetic", 4)
    feeds = []
    for start in range(0, count, 8):
        n = min(8, count - start)
        input_ids = rng.integers(low, vocab_size, size=(n, 32)).astype(np.int64)
        feeds.append(
            {
                "input_ids": input_ids,
                "attention_mask": np.ones_like(input_ids),
                "token_type_ids": np.zeros_like(input_ids),
            }
        )
    return SampleSet(task, feeds, "synthetic")


def build_samples(
    tokenizer: Any,
    task: TaskKind,
    texts: Sequence[str],
    *,
    origin: str,
    size: int,
    generation: Any = None,
) -> SampleSet:
    """``size`` texts (encoders) or windows (decoders) from ``texts``; ``generation`` is the
    spec of a generation graph (its feeds then carry empty past keys and values)."""
    if task == "text-generation":
        samples = decoder_samples(tokenizer, texts, origin=origin, windows=size)
        return dataclasses.replace(samples, generation=generation)
    return encoder_samples(tokenizer, list(texts)[:size], origin=origin)


def _decoder_batches(rows: list[list[int]], origin: str, batch_size: int) -> SampleSet:
    feeds = []
    for start in range(0, len(rows), batch_size):
        input_ids = np.asarray(rows[start : start + batch_size], dtype=np.int64)
        feeds.append({"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)})
    return SampleSet("text-generation", feeds, origin)
