"""Parity: how close the variant's outputs are to its fp32 reference on the evaluation set.

Encoders: cosine of pooled embeddings (mean and min), on the output that holds them: the one
the optimizer stamped into the variant (``slmops.embedding_output``, ``slmops.pooling``), else
chosen on the reference by ``slmops.embeddings`` - never blindly output 0, which for a
sentence-transformers export is already pooled. A model whose outputs leave the choice open
fails the ``parity.embedding_output`` gate with the reason. Decoders: top-1 next-token
agreement and perplexity increase. With labels (or topics): task accuracy of both models -
nearest-centroid, leave-one-out, on the embeddings for encoders; argmax for classifiers - and
the drop in points. The definitions are the SDK's (``slmops.quality``), the ones the
optimizer's search used. Runs in the service's process, in a thread: parity runs may overlap.

An encoder's pooled embeddings of the evaluation texts are also the report's drift baseline
(``slmops.telemetry.drift.embedding_moments``): what the embeddings a gateway serves are compared
with, from the run parity makes anyway.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slmops.embeddings import (
    EmbeddingChoice,
    EmbeddingChoiceError,
    choose_embedding_output,
    hints_from_metadata,
    outputs_from_ort,
)
from slmops.events.payloads import GateResult
from slmops.profiles import DeviceProfile
from slmops.quality import decoder_parity, encoder_parity
from slmops.reports import CheckOutcome
from slmops.telemetry.drift import DriftSignature, embedding_moments
from slmops_validator.checks.base import judged, verdict_gate
from slmops_validator.evalinputs import EvalInputs, restrict


def open_session(path: Path, threads: int, *, windows: bool = False) -> Any:
    """A session of ``path``; ``windows``: a generation graph scoring every position (its
    served form computes the last position's logits only, see ``slmops.generation.windows``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if windows:
        from slmops.generation.windows import window_session

        return window_session(path, options, providers)
    return ort.InferenceSession(str(path), options, providers=providers)


def run_outputs(
    session: Any, feeds: Sequence[dict[str, np.ndarray]], output: str | None = None
) -> list[Any]:
    """The output named ``output`` (default: the first) on every batch."""
    names = [i.name for i in session.get_inputs()]
    wanted = output or session.get_outputs()[0].name
    return [session.run([wanted], restrict(feed, names))[0] for feed in feeds]


def embedding_choice(reference: Any, metadata: dict[str, str]) -> EmbeddingChoice:
    """The variant's stamped choice, checked against the reference's outputs; without a stamp
    (a hand-made variant, an older optimizer) chosen on the reference as the optimizer does."""
    name, pooling = hints_from_metadata(metadata)
    outputs = outputs_from_ort(reference.get_outputs())
    return choose_embedding_output(outputs, name=name, pooling=pooling)


def parity_check(
    candidate: Path,
    reference: Path,
    inputs: EvalInputs,
    profile: DeviceProfile,
    threads: int,
    metadata: dict[str, str] | None = None,
) -> tuple[CheckOutcome, DriftSignature | None]:
    """``metadata``: the variant's ONNX metadata (its embedding output and pooling). With the
    outcome, an encoder's drift baseline: the signature of its pooled embeddings."""
    started = time.monotonic()
    outcome = CheckOutcome(name="parity")
    windows = inputs.generation is not None
    ref_session = open_session(reference, threads, windows=windows)
    cand_session = open_session(candidate, threads, windows=windows)
    choice = None
    if inputs.task == "feature-extraction":
        try:
            choice = embedding_choice(ref_session, metadata or {})
        except EmbeddingChoiceError as exc:
            outcome.gates.append(
                verdict_gate("parity.embedding_output", False, value=0, detail=str(exc))
            )
            return _not_comparable(outcome, started), None
        present = [o.name for o in cand_session.get_outputs()]
        if choice.output not in present:
            outcome.gates.append(
                verdict_gate(
                    "parity.embedding_output",
                    False,
                    value=0,
                    detail=f"the variant has no output {choice.output!r} (the reference's "
                    f"embeddings); its outputs: {', '.join(present)}",
                )
            )
            return _not_comparable(outcome, started), None
    output = choice.output if choice else None
    ref_out = run_outputs(ref_session, inputs.feeds, output)
    cand_out = run_outputs(cand_session, inputs.feeds, output)
    del ref_session, cand_session
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
        return _not_comparable(outcome, started), None
    masks = [feed["attention_mask"] for feed in inputs.feeds]
    floors = profile.quality
    baseline: DriftSignature | None = None
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
    elif choice is not None:  # an encoder: its pooled embeddings
        try:
            enc = encoder_parity(ref_out, cand_out, masks, pool=choice.pooled)
        except EmbeddingChoiceError as exc:  # another shape at run time than declared
            outcome.gates.append(
                verdict_gate("parity.embedding_output", False, value=0, detail=str(exc))
            )
            return _not_comparable(outcome, started), None
        cand_emb = _embeddings(cand_out, masks, choice)
        baseline = DriftSignature(embedding=embedding_moments(cand_emb))
        outcome.gates += [
            judged(
                "parity.cosine_mean",
                enc.cosine_mean,
                floors.min_cosine,
                bound="min",
                detail=f"{_pooled(choice)} of {enc.count} texts",
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
            ref_emb = _embeddings(ref_out, masks, choice)
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
    return outcome, baseline


def _not_comparable(outcome: CheckOutcome, started: float) -> CheckOutcome:
    outcome.notes.append("parity not computed: the outputs are not comparable")
    outcome.duration_s = time.monotonic() - started
    return outcome


def _pooled(choice: EmbeddingChoice) -> str:
    how = {"mean": "mean-pooled", "cls": "first-token", "none": "the model's own"}[choice.pooling]
    return f"{how} embeddings ({choice.output!r})"


def _embeddings(outputs: list[Any], masks: list[np.ndarray], choice: EmbeddingChoice) -> np.ndarray:
    return np.concatenate([choice.pooled(o, m) for o, m in zip(outputs, masks, strict=True)])


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
