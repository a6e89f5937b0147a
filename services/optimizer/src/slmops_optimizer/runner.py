"""One optimization job, start to finish, on a compute replica (plain synchronous code).

fetch the source → convert (cached per source) → the recipe's passes with the accuracy-aware
search → stamp the model's metadata → store the blob. The service registers the variant and
emits the event; this module only produces the artifact and its account (metrics, trail, log).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmops.embeddings import EmbeddingChoice
from slmops.evaldata import default_texts, parse_eval_jsonl
from slmops.events.payloads import ArtifactRef, Recipe
from slmops.objectstore import BlobRef, ObjectStore
from slmops_optimizer.jobspec import JobResult, JobSpec
from slmops_optimizer.passes import OnnxModel, Pass, PassContext, PassError, create_pass
from slmops_optimizer.samples import build_samples, synthetic_samples
from slmops_optimizer.search import embedding_choice, search
from slmops_optimizer.workspace import Workspace, load_converted, save_converted

Progress = Callable[[float, str], None]
_SINGLE_FILE_LIMIT_BYTES = 2_000_000_000


class JobRunner:
    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace

    @property
    def store(self) -> ObjectStore:
        return self.workspace.store

    def run(self, spec: JobSpec, progress: Progress, is_cancelled: Callable[[], bool]) -> JobResult:
        started = time.monotonic()
        passes = _plan(spec.recipe)
        steps = len(passes) + 3
        done = 0

        def step(what: str) -> None:
            nonlocal done
            done += 1
            progress(min(0.95, done / steps), what)

        step("fetching the source")
        source = self.workspace.source(spec)
        texts, origin = self._texts(spec)
        with self.workspace.job_dir(spec.job_id) as work:
            ctx = PassContext(
                work_dir=work,
                source=source,
                texts=texts,
                texts_origin=origin,
                sample_size=spec.search.sample_size,
                intra_op_threads=spec.intra_op_threads,
                is_cancelled=is_cancelled,
            )
            step(f"pass 1/{len(passes)}: convert")
            converted = self._convert(passes[0], spec, ctx)
            choice = embedding_choice(converted, spec.task, spec.embedding_output, spec.pooling)
            if choice is not None:
                ctx.note(f"embeddings: output {choice.output!r}, pooling {choice.pooling} "
                         f"({choice.reason})")  # fmt: skip
            best, trail = search(
                passes, spec.recipe, converted, ctx, spec.floors, spec.search.max_tries, step,
                allowed_precisions=spec.precisions, choice=choice,
            )  # fmt: skip
            ctx.check_cancelled()
            final = _finalize(best.model, ctx, spec, work, choice)
            step("storing the variant")
            blob = self.store.put_file(final)
        metrics = {k: float(v) for k, v in ctx.metrics.items()}
        metrics.update(
            size_mb=blob.size_bytes / 1e6,
            parent_size_mb=spec.parent.size_bytes / 1e6,
            fp32_size_mb=converted.size_bytes / 1e6,
            search_tries=float(len(trail)),
            quality_floor_met=float(best.meets_floor),
            sample_count=float(ctx.samples.count if ctx.samples else 0),
        )
        if best.score.metric not in ("identity", "nan"):
            metrics[f"quick_{best.score.metric}"] = best.score.value
            metrics.update({f"quick_{k}": v for k, v in best.score.extra.items()})
        return JobResult(
            job_id=spec.job_id,
            artifact_digest=blob.digest,
            size_bytes=blob.size_bytes,
            duration_s=time.monotonic() - started,
            effective_recipe=best.recipe,
            metrics=metrics,
            reference=_artifact(ctx.reference) if ctx.reference else None,
            trail=trail,
            log=[*ctx.log, f"samples: {ctx.samples.count} from {ctx.samples.origin}"],
            details=dict(ctx.details),
        )

    def _texts(self, spec: JobSpec) -> tuple[list[str], str]:
        if spec.eval_set is None:
            return default_texts(), "built-in"
        raw = self.store.get_bytes(f"blobs/sha256/{spec.eval_set.digest.removeprefix('sha256:')}")
        try:
            return [r.text for r in parse_eval_jsonl(raw)], "eval-set"
        except ValueError as exc:
            raise PassError(f"the model's evaluation set is unusable: {exc}") from exc

    def _convert(self, convert: Pass[Any], spec: JobSpec, ctx: PassContext) -> OnnxModel:
        """Convert once per source and config; later jobs reuse the kept result."""
        with self.workspace.converted(ctx.source, convert.config.model_dump(mode="json")) as keep:
            kept = load_converted(keep)
            if kept is not None:
                model_path, ctx.tokenizer, convert_metrics = kept
                ctx.metrics.update(convert_metrics)
                ctx.generation = load_generation_spec(model_path.parent)
                ctx.note("convert: reused this replica's earlier conversion of the source")
                model = OnnxModel(model_path)
            else:
                model = convert.run(None, ctx)
                save_converted(keep, model.path, ctx.tokenizer, dict(ctx.metrics))
                model = OnnxModel(keep / "model" / model.path.name)
            ctx.reference = self._reference(model, keep, ctx)
        if ctx.samples is None:
            ctx.samples = self._samples(model, ctx, spec)
        return model

    def _reference(self, model: OnnxModel, keep: Path, ctx: PassContext) -> BlobRef | None:
        """Store the fp32 conversion once per source: the baseline a validator judges the
        variant against (it runs the same graph the variant was derived from). A decoder's
        reference is generation-ready like its variants (the same spec and tokenizer)."""
        marker = keep / "reference.json"
        if marker.is_file():
            return BlobRef.model_validate_json(marker.read_text())
        single = model.path
        external = any(
            p.name != model.path.name and p.suffix == ".data" for p in model.path.parent.iterdir()
        )
        if external or ctx.generation is not None:
            import onnx  # the reference travels as one self-contained file

            proto = onnx.load(str(model.path), load_external_data=True)
            if ctx.generation is not None:
                stamp_generation(proto, ctx)
            if proto.ByteSize() > _SINGLE_FILE_LIMIT_BYTES:
                return None  # over the protobuf limit: the validator says it has no baseline
            single = keep / "reference.onnx"
            onnx.save(proto, str(single))
        ref = self.store.put_file(single)
        marker.write_text(ref.model_dump_json())
        return ref

    def _samples(self, model: OnnxModel, ctx: PassContext, spec: JobSpec) -> Any:
        if ctx.tokenizer is not None:
            return build_samples(
                ctx.tokenizer, spec.task, ctx.texts, origin=ctx.texts_origin,
                size=ctx.sample_size, generation=ctx.generation,
            )  # fmt: skip
        ctx.note("samples: the ONNX source has no tokenizer; quality scored on random token ids")
        return synthetic_samples(spec.task, vocab_size=_vocab_size(model.path), count=16)


def _plan(recipe: Recipe) -> list[Pass[Any]]:
    """Instantiate every pass first: a bad config fails before any work is done."""
    passes = [create_pass(p.name, dict(p.config)) for p in recipe.passes]
    if not passes or not passes[0].reads_source:
        raise PassError(f"recipe {recipe.name!r} must start with 'convert'")
    if any(p.reads_source for p in passes[1:]):
        raise PassError(f"recipe {recipe.name!r}: only its first pass may read the source")
    return passes


def _finalize(
    model: OnnxModel, ctx: PassContext, spec: JobSpec, work: Path, choice: EmbeddingChoice | None
) -> Path:
    """One self-describing ONNX file: task, tokenizer, lineage and (encoders) the embedding
    output and its pooling in its metadata, so validators and gateways pool as scored here."""
    import onnx

    proto = onnx.load(str(model.path), load_external_data=True)
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(
        {
            "slmops.task": spec.task,
            "slmops.parent_digest": spec.parent.digest,
            "slmops.recipe": spec.recipe.name,
            "slmops.device_class": spec.device_class,
        }
    )
    if choice is not None:
        props.update(choice.metadata())
    tokenizer = getattr(ctx.tokenizer, "backend_tokenizer", None)
    if tokenizer is not None:
        props["slmops.tokenizer"] = tokenizer.to_str()
    max_length = getattr(ctx.tokenizer, "model_max_length", None)
    if isinstance(max_length, int) and 0 < max_length < 1_000_000:  # else "unbounded" sentinel
        props["slmops.max_length"] = str(max_length)
    del proto.metadata_props[:]
    for key, value in sorted(props.items()):
        proto.metadata_props.add(key=key, value=value)
    if ctx.generation is not None:
        stamp_generation(proto, ctx)
    if proto.ByteSize() > _SINGLE_FILE_LIMIT_BYTES:
        raise PassError("the variant is over 2 GB; variants with external data are not supported")
    out = work / "variant.onnx"
    onnx.save(proto, str(out))
    return out


def stamp_generation(proto: Any, ctx: PassContext) -> None:
    """A decoder's generation spec and tokenizer into ``proto``'s metadata."""
    from slmops_optimizer.generation.metadata import stamp

    tokenizer = getattr(ctx.tokenizer, "backend_tokenizer", None)
    if tokenizer is None:
        raise PassError("a generation-ready variant needs the source's tokenizer")
    stamp(proto, ctx.generation, tokenizer.to_str())


def load_generation_spec(folder: Path) -> Any:
    """The spec a decoder's conversion kept beside its graph (None for other models)."""
    from slmops_optimizer.generation.metadata import SPEC_FILE

    path = folder / SPEC_FILE
    if not path.is_file():
        return None
    from slmops.generation import GenerationSpec

    return GenerationSpec.model_validate_json(path.read_text())


def _artifact(blob: BlobRef) -> ArtifactRef:
    return ArtifactRef(digest=blob.digest, size_bytes=blob.size_bytes, uri=blob.uri)


def _vocab_size(path: Path) -> int:
    """Rows of the embedding table (the initializer a Gather on input_ids reads)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {i.name: list(i.dims) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in dims and node.input[1] == "input_ids":
            return int(dims[node.input[0]][0])
    return 1000
