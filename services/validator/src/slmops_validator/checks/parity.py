"""Parity: how close the variant's outputs are to its fp32 reference on the evaluation set.

Encoders: cosine of mean-pooled embeddings (mean and min). Decoders: top-1 next-token
agreement and perplexity increase. With labels (or topics): task accuracy of both models -
nearest-centroid, leave-one-out, on the embeddings for encoders; argmax for classifiers - and
the drop in points. The definitions are the SDK's (``slmops.quality``), the ones the
optimizer's search used. Runs in the service's process, in a thread: parity runs may overlap.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slmops.events.payloads import GateResult
from slmops.profiles import DeviceProfile
from slmops.quality import decoder_parity, encoder_parity, mean_pooled
from slmops.reports import CheckOutcome
from slmops_validator.checks.base import judged
from slmops_validator.evalinputs import EvalInputs, restrict


def run_outputs(path: Path, feeds: Sequence[dict[str, np.ndarray]], threads: int) -> list[Any]:
    """The first output of the model on every batch."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    first = session.get_outputs()[0].name
    return [session.run([first], restrict(feed, names))[0] for feed in feeds]


def parity_check(
    candidate: Path, reference: Path, inputs: EvalInputs, profile: DeviceProfile, threads: int
) -> CheckOutcome:
    started = time.monotonic()
    ref_out = run_outputs(reference, inputs.feeds, threads)
    cand_out = run_outputs(candidate, inputs.feeds, threads)
    outcome = CheckOutcome(name="parity")
    shapes = [(r.shape, c.shape) for r, c in zip(ref_out, cand_out, strict=True)]
    mismatched = [(r, c) for r, c in shapes if r != c]
    outcome.gates.append(
        judged(
            "parity.output_shape_mismatches",
            len(mismatched),
            0,
            bound="max",
            detail=f"{len(mismatched)} of {len(shapes)} batches: reference "
            f"{list(mismatched[0][0])} vs variant {list(mismatched[0][1])}"
            if mismatched
            else "same output shapes as the reference",
        )
    )
    non_finite = int(sum((~np.isfinite(c)).sum() for c in cand_out))
    outcome.gates.append(
        judged(
            "parity.non_finite_outputs",
            non_finite,
            0,
            bound="max",
            detail=f"NaN/Inf values over {inputs.info.examples} examples",
        )
    )
    if mismatched or non_finite:
        outcome.notes.append("parity not computed: the outputs are not comparable")
        outcome.duration_s = time.monotonic() - started
        return outcome
    masks = [feed["attention_mask"] for feed in inputs.feeds]
    floors = profile.quality
    if inputs.task == "text-generation":
        ids = [feed["input_ids"] for feed in inputs.feeds]
        dec = decoder_parity(ref_out, cand_out, ids, masks)
        outcome.gates += [
            judged(
                "parity.top1_agreement",
                dec.top1_agreement,
                floors.min_top1_agreement,
                bound="min",
                detail=f"{dec.positions} next-token positions",
            ),
            judged(
                "parity.perplexity_increase_pct",
                dec.perplexity_increase_pct,
                floors.max_perplexity_increase_pct,
                bound="max",
                unit="%",
                detail=f"perplexity {dec.perplexity_parent:.3f} -> {dec.perplexity_candidate:.3f}",
            ),
        ]
    elif ref_out[0].ndim == 3:  # hidden states: sentence embeddings
        enc = encoder_parity(ref_out, cand_out, masks)
        outcome.gates += [
            judged(
                "parity.cosine_mean",
                enc.cosine_mean,
                floors.min_cosine,
                bound="min",
                detail=f"pooled embeddings of {enc.count} texts",
            ),
            judged(
                "parity.cosine_min",
                enc.cosine_min,
                None,
                bound="min",
                detail="worst single text (reported; the floor applies to the mean)",
            ),
        ]
        if inputs.labels is not None:
            ref_emb = _embeddings(ref_out, masks)
            cand_emb = _embeddings(cand_out, masks)
            outcome.gates.append(
                _accuracy_gate(
                    centroid_accuracy(ref_emb, inputs.labels),
                    centroid_accuracy(cand_emb, inputs.labels),
                    floors.max_accuracy_drop_pct,
                    inputs.label_source,
                )
            )
    else:  # class logits
        ref_cls = np.concatenate([o.argmax(-1) for o in ref_out])
        cand_cls = np.concatenate([o.argmax(-1) for o in cand_out])
        outcome.gates.append(
            judged(
                "parity.top1_agreement",
                float((ref_cls == cand_cls).mean()),
                floors.min_top1_agreement,
                bound="min",
                detail="predicted classes",
            )
        )
        if inputs.labels is not None and all(isinstance(x, int) for x in inputs.labels):
            truth = np.asarray(inputs.labels)
            outcome.gates.append(
                _accuracy_gate(
                    float((ref_cls == truth).mean()),
                    float((cand_cls == truth).mean()),
                    floors.max_accuracy_drop_pct,
                    "label",
                )
            )
    outcome.duration_s = time.monotonic() - started
    return outcome


def _embeddings(outputs: list[Any], masks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([mean_pooled(o, m) for o, m in zip(outputs, masks, strict=True)])


def _accuracy_gate(ref: float, cand: float, budget: float | None, source: str) -> GateResult:
    how = "nearest topic centroid" if source == "topic" else "labels"
    return judged(
        "parity.accuracy_drop_pct",
        100.0 * (ref - cand),
        budget,
        bound="max",
        unit="points",
        detail=f"accuracy {ref:.3f} (fp32) -> {cand:.3f} ({how}, leave-one-out)",
    )


def centroid_accuracy(embeddings: np.ndarray, labels: Sequence[str | int]) -> float:
    """Leave-one-out nearest-centroid accuracy of the labels in embedding space."""
    unit = embeddings / np.clip(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12, None)
    classes = sorted({str(x) for x in labels})
    index = np.asarray([classes.index(str(x)) for x in labels])
    sums = np.stack([unit[index == k].sum(axis=0) for k in range(len(classes))])
    counts = np.bincount(index, minlength=len(classes)).astype(np.float64)
    correct = 0
    for i, row in enumerate(unit):
        own_sums, own_counts = sums.copy(), counts.copy()
        own_sums[index[i]] -= row  # leave the example out of its own class
        own_counts[index[i]] -= 1
        usable = own_counts > 0
        centroids = own_sums[usable] / own_counts[usable, None]
        centroids /= np.clip(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12, None)
        predicted = np.flatnonzero(usable)[int(np.argmax(centroids @ row))]
        correct += int(predicted == index[i])
    return correct / max(len(labels), 1)
