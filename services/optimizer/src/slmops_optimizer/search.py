"""Accuracy-aware search: run a recipe, score it against the fp32 model, refine until the
device class's quality floor is met or the budget of tries is spent.

The quick score uses the job's sample set (eval set or built-in texts): cosine of pooled
embeddings for encoders, top-1 next-token agreement for decoders (``slmops.quality``, the same
definitions the validator's parity gate uses). An encoder is scored on the output that holds
its embeddings, chosen once per job on the fp32 model by ``slmops.embeddings`` (a publisher's
hint wins; an export whose outputs leave it open fails the job with the reason, not a numpy
broadcasting error). When a candidate misses the floor, the last pass
that offers refinements (a quantizer) is re-run with its next, more conservative config —
asymmetric, smaller blocks, sensitive nodes kept in higher precision — and the passes after it
re-run on top. Every attempt lands in the trail, which the variant manifest keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from slmops.embeddings import (
    EmbeddingChoice,
    EmbeddingChoiceError,
    choose_embedding_output,
    outputs_from_onnx,
)
from slmops.events.payloads import PassSpec, Recipe
from slmops.profiles import ALL_PRECISIONS, QualityFloors
from slmops.quality import decoder_parity, encoder_parity, mean_pooled
from slmops_optimizer.jobspec import TrailEntry
from slmops_optimizer.passes import OnnxModel, Pass, PassContext, PassError


@dataclass(frozen=True)
class Score:
    metric: str
    value: float
    extra: dict[str, float]


def embedding_choice(
    model: OnnxModel, task: str, name: str | None, pooling: str | None
) -> EmbeddingChoice | None:
    """Encoders: the output holding the embeddings, from the graph's declared outputs (no
    weights loaded) and the publisher's hints; None for other tasks. PassError if unclear."""
    if task != "feature-extraction":
        return None
    import onnx

    graph = onnx.load(str(model.path), load_external_data=False).graph
    try:
        return choose_embedding_output(outputs_from_onnx(graph.output), name=name, pooling=pooling)
    except EmbeddingChoiceError as exc:
        raise PassError(str(exc)) from exc


def model_outputs(model: OnnxModel, ctx: PassContext, output: str | None = None) -> list[Any]:
    """The output named ``output`` (default: the first) on every sample batch (ORT, CPU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = ctx.intra_op_threads
    providers = ["CPUExecutionProvider"]
    try:
        if ctx.generation is not None:  # score every position, not only the served last one
            from slmops.generation.windows import window_session

            session = window_session(model.path, options, providers)
        else:
            session = ort.InferenceSession(str(model.path), options, providers=providers)
    except Exception as exc:
        raise PassError(f"the candidate does not load in ONNX Runtime: {exc}") from exc
    names = [i.name for i in session.get_inputs()]
    declared = [o.name for o in session.get_outputs()]
    if output is not None and output not in declared:
        raise PassError(
            f"the candidate has no output {output!r} (the fp32 model's embeddings), only "
            f"{', '.join(declared)}: a pass dropped or renamed it"
        )
    wanted = [output or declared[0]]
    return [session.run(wanted, feed)[0] for feed in ctx.samples.for_inputs(names)]


def score(
    reference: list[Any],
    candidate: list[Any],
    ctx: PassContext,
    choice: EmbeddingChoice | None = None,
) -> Score:
    import numpy as np

    feeds = ctx.samples.feeds
    masks = [f["attention_mask"] for f in feeds]
    if not all(np.isfinite(c).all() for c in candidate):
        return Score("nan", 0.0, {})
    if ctx.source.task == "text-generation":
        ids = [f["input_ids"] for f in feeds]
        parity = decoder_parity(reference, candidate, ids, masks)
        return Score(
            "top1_agreement",
            parity.top1_agreement,
            {"perplexity_increase_pct": parity.perplexity_increase_pct},
        )
    if ctx.source.task == "text-classification":
        agree = sum(
            int((r.argmax(-1) == c.argmax(-1)).sum())
            for r, c in zip(reference, candidate, strict=True)
        )
        total = sum(int(r.shape[0]) for r in reference)
        return Score("label_agreement", agree / max(total, 1), {})
    try:
        enc = encoder_parity(
            reference, candidate, masks, pool=choice.pooled if choice else mean_pooled
        )
    except EmbeddingChoiceError as exc:  # the graph returned another shape than it declared
        raise PassError(str(exc)) from exc
    return Score("cosine_mean", enc.cosine_mean, {"cosine_min": enc.cosine_min})


def floor_for(metric: str, floors: QualityFloors) -> float | None:
    return {
        "cosine_mean": floors.min_cosine,
        "top1_agreement": floors.min_top1_agreement,
        "label_agreement": floors.min_top1_agreement,
    }.get(metric)


@dataclass
class Candidate:
    model: OnnxModel
    recipe: Recipe
    score: Score
    meets_floor: bool


def search(
    passes: list[Pass[Any]],
    recipe: Recipe,
    converted: OnnxModel,
    ctx: PassContext,
    floors: QualityFloors,
    max_tries: int,
    progress: Callable[[str], None],
    allowed_precisions: Sequence[str] = ALL_PRECISIONS,
    choice: EmbeddingChoice | None = None,
) -> tuple[Candidate, list[TrailEntry]]:
    """Run ``passes[1:]`` (the first, convert, already gave ``converted``) and refine.

    ``choice``: an encoder's embedding output (:func:`embedding_choice`); None scores the
    first output (decoders, classifiers)."""
    output = choice.output if choice else None
    reference = model_outputs(converted, ctx, output) if len(passes) > 1 else []
    inputs: list[OnnxModel] = [converted]
    for index, step in enumerate(passes[1:], start=1):
        ctx.check_cancelled()
        progress(f"pass {index + 1}/{len(passes)}: {step.name}")
        inputs.append(step.run(inputs[-1], ctx))
    specs = list(recipe.passes)
    trail: list[TrailEntry] = []

    def judge(model: OnnxModel, run_recipe: Recipe, change: str) -> Candidate:
        if not reference:  # convert only: the fp32 model is its own reference
            result = Score("identity", 1.0, {})
        else:
            progress(f"quick quality score ({ctx.samples.count} samples)")
            result = score(reference, model_outputs(model, ctx, output), ctx, choice)
        floor = floor_for(result.metric, floors)
        meets = result.metric != "nan" and (floor is None or result.value >= floor)
        trail.append(
            TrailEntry(
                attempt=len(trail) + 1,
                change=change,
                recipe=run_recipe,
                quality_metric=result.metric,
                quality=round(result.value, 6),
                floor=floor,
                size_mb=round(model.size_bytes / 1e6, 3),
                meets_floor=meets,
            )
        )
        return Candidate(model, run_recipe, result, meets)

    best = judge(inputs[-1], recipe, "as planned")
    if best.meets_floor:
        return best, trail
    # The last pass that offers refinements (a quantizer) is the one to make more conservative.
    refine_at, ladder = next(
        (
            (i, ladder)
            for i in range(len(passes) - 1, 0, -1)
            if (ladder := passes[i].refinements(inputs[i - 1], ctx))
        ),
        (None, []),
    )
    if refine_at is None:
        return best, trail
    if "fp32" not in allowed_precisions:
        kept = [r for r in ladder if not r.keeps_fp32]
        if len(kept) < len(ladder):
            ctx.note(f"search: {len(ladder) - len(kept)} refinement(s) keeping weights in fp32 "
                     f"skipped: the class runs {', '.join(allowed_precisions)} only")  # fmt: skip
        ladder = kept
    for refinement in ladder[: max_tries - 1]:
        ctx.check_cancelled()
        progress(f"refining {passes[refine_at].name}: {refinement.description}")
        step = type(passes[refine_at])(refinement.config)
        model = step.run(inputs[refine_at - 1], ctx)
        for later in passes[refine_at + 1 :]:
            model = later.run(model, ctx)
        specs[refine_at] = PassSpec(
            name=step.name, config=refinement.config.model_dump(mode="json")
        )
        candidate = judge(
            model, Recipe(name=recipe.name, passes=list(specs)), refinement.description
        )
        if candidate.meets_floor or candidate.score.value > best.score.value:
            best = candidate
        if candidate.meets_floor:
            break
    return best, trail
