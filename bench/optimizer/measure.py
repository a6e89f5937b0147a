"""ONNX Runtime: sessions, held-out quality, interleaved latency."""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.optimizer.common import (
    DECODER_SPAN,
    DECODER_WINDOWS,
    HELD_OUT_TEXTS,
    SPARSE_INPUTS,
    THREADS,
    WARMUP,
    Variant,
)
from slmops.evaldata import default_texts
from slmops.quality import decoder_parity, encoder_parity
from slmops_optimizer.samples import encoder_samples


def session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess: Any, feed: dict[str, np.ndarray]) -> np.ndarray:
    names = {i.name for i in sess.get_inputs()}
    return np.asarray(sess.run(None, {k: v for k, v in feed.items() if k in names})[0])


def held_out_feeds(task: str, tokenizer: Any) -> list[dict[str, np.ndarray]]:
    texts = default_texts()[-HELD_OUT_TEXTS:]
    if task == "feature-extraction":
        feeds: list[dict[str, np.ndarray]] = encoder_samples(
            tokenizer, texts, origin="held-out"
        ).feeds
        return feeds
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
    rows = [
        ids[i * DECODER_SPAN : (i + 1) * DECODER_SPAN]
        for i in range(min(DECODER_WINDOWS, len(ids) // DECODER_SPAN))
    ]
    feeds = []
    for start in range(0, len(rows), 4):
        input_ids = np.asarray(rows[start : start + 4], dtype=np.int64)
        feeds.append({"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)})
    return feeds


def latency_inputs(task: str, tokenizer: Any) -> dict[str, dict[str, np.ndarray]]:
    texts = default_texts()[-HELD_OUT_TEXTS:]
    if task == "feature-extraction":
        longest = max(texts, key=len)  # > 128 tokens: truncated, no padding

        def encode(batch: list[str]) -> dict[str, np.ndarray]:
            enc = tokenizer(
                batch, padding="max_length", truncation=True, max_length=128, return_tensors="np"
            )
            feed = {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}
            feed.setdefault("token_type_ids", np.zeros_like(feed["input_ids"]))
            return feed

        return {"b1": encode([longest]), "b8": encode(texts[:8])}
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
    window = np.asarray([ids[:DECODER_SPAN]], dtype=np.int64)
    one = window[:, :1]
    return {
        "b1": {"input_ids": window, "attention_mask": np.ones_like(window)},
        "t1": {"input_ids": one, "attention_mask": np.ones_like(one)},
    }


def measure_quality(
    task: str, sessions: dict[str, Any], models: list[Variant], feeds: list[dict[str, np.ndarray]]
) -> None:
    reference_out = [run(sessions["fp32"], f) for f in feeds]
    masks = [f["attention_mask"] for f in feeds]
    for model in models:
        if model.label == "fp32" or model.label not in sessions:
            continue
        try:
            out = [run(sessions[model.label], f) for f in feeds]
        except Exception as exc:
            model.error = f"run failed: {str(exc).splitlines()[0][:200]}"
            sessions.pop(model.label)
            continue
        if task == "feature-extraction":
            enc = encoder_parity(reference_out, out, masks)
            model.quality = {"cosine_mean": enc.cosine_mean, "cosine_min": enc.cosine_min}
        else:
            dec = decoder_parity(reference_out, out, [f["input_ids"] for f in feeds], masks)
            model.quality = {
                "top1": dec.top1_agreement,
                "ppl_fp32": dec.perplexity_parent,
                "ppl": dec.perplexity_candidate,
                "ppl_increase_pct": dec.perplexity_increase_pct,
            }
        del out
    del reference_out


def measure_latency(
    sessions: dict[str, Any], models: list[Variant], inputs: dict[str, dict[str, Any]], rounds: int
) -> None:
    units = [(m, name) for m in models if m.label in sessions for name in inputs]
    for model, name in units:
        for _ in range(1 if name in SPARSE_INPUTS else WARMUP):
            run(sessions[model.label], inputs[name])
    rng = random.Random(1234)
    for index in range(rounds):
        rng.shuffle(units)
        for model, name in units:
            if name in SPARSE_INPUTS and index % 3:
                continue  # the slow batch-8 input: every third round only
            start = time.perf_counter()
            run(sessions[model.label], inputs[name])
            model.latency.setdefault(name, []).append(1000 * (time.perf_counter() - start))


def p50(model: Variant, name: str = "b1") -> float:
    values = model.latency.get(name)
    return statistics.median(values) if values else float("nan")


def p95(model: Variant, name: str = "b1") -> float:
    values = model.latency.get(name)
    return float(np.percentile(values, 95)) if values else float("nan")
