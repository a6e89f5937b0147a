"""``convert``: the source artifact → an fp32 ONNX model, checked against the source.

- Hugging Face safetensors folder: loaded with transformers on the CPU, exported with torch's
  TorchScript exporter (``dynamo=False``: it handles these models at fp32 with 1e-7 error and
  needs no onnxscript), then run in ONNX Runtime on the job's sample inputs and compared with
  the torch outputs; an export that drifts fails the job instead of shipping a wrong model.
- Decoders (a GGUF file or a Hugging Face folder): a generation-ready graph with a KV cache
  from onnxruntime-genai's builder (``slmops_optimizer.generation.convert``); ``gguf_blocks``
  later maps a GGUF file's own blocks back into it exactly.
- ONNX: passes through after a load + shape-inference check (external data is followed).

The tokenizer found here is kept in the context: the job stamps it into the final model's
metadata so the validator and the gateways can feed text without the source folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from slmops_optimizer.passes import register
from slmops_optimizer.passes.base import OnnxModel, Pass, PassConfig, PassContext, PassError

#: Above this the protobuf limit forces external data (ONNX files are capped at 2 GB).
_PROTOBUF_LIMIT_BYTES = 2_000_000_000


class ConvertConfig(PassConfig):
    opset: int = Field(17, ge=14, le=21, description="ONNX opset of the exported graph.")
    max_relative_error: float = Field(
        1e-4,
        ge=0,
        description="Largest |onnx - torch| / max|torch| accepted on the sample inputs.",
    )
    external_data: Literal["auto", "always", "never"] = Field(
        "auto", description="Store weights beside the graph: 'auto' only past 2 GB."
    )
    check_batches: int = Field(2, ge=1, le=64, description="Sample batches the check runs.")
    max_context_tokens: int | None = Field(
        8192,
        ge=16,
        description="Decoders: longest context the generation graph supports (rotary caches "
        "are sized by it); None = the model's own. Edge devices allocate far less.",
    )
    decoder_max_relative_error: float = Field(
        1e-3,
        ge=0,
        description="The same bound for a decoder's generation graph: its fused attention "
        "kernels sum in another order than torch's eager attention.",
    )


@register
class Convert(Pass[ConvertConfig]):
    name = "convert"
    config_class = ConvertConfig
    reads_source = True

    def run(self, model: OnnxModel | None, ctx: PassContext) -> OnnxModel:
        source = ctx.source
        if source.task == "text-generation":
            from slmops_optimizer.generation.convert import convert_decoder

            return convert_decoder(
                ctx,
                max_relative_error=self.config.decoder_max_relative_error,
                batches=self.config.check_batches,
                max_context_tokens=self.config.max_context_tokens,
            )
        if source.kind == "onnx":
            return self._pass_through(ctx)
        torch_model, tokenizer = _load_torch(source.kind, source.path, source.task, ctx.work_dir)
        ctx.tokenizer = tokenizer
        if ctx.samples is None:
            from slmops_optimizer.samples import build_samples

            ctx.samples = build_samples(
                tokenizer, source.task, ctx.texts, origin=ctx.texts_origin, size=ctx.sample_size
            )
        out = ctx.output_dir("convert") / "model.onnx"
        _export(torch_model, source.task, out, self.config.opset)
        if self._needs_external(out):
            _save_external(out)
        self._check(torch_model, OnnxModel(out), ctx)
        del torch_model
        return OnnxModel(out)

    def _needs_external(self, path: Path) -> bool:
        if self.config.external_data == "never":
            return False
        return self.config.external_data == "always" or path.stat().st_size > _PROTOBUF_LIMIT_BYTES

    def _pass_through(self, ctx: PassContext) -> OnnxModel:
        import onnx

        src = ctx.source.path
        try:
            loaded = onnx.load(str(src), load_external_data=True)
            onnx.checker.check_model(loaded, full_check=False)
            onnx.shape_inference.infer_shapes(loaded, strict_mode=False)
        except Exception as exc:
            raise PassError(f"the source is not a valid ONNX model: {_short(exc)}") from exc
        out = ctx.output_dir("convert") / "model.onnx"
        has_external = any(
            t.data_location == onnx.TensorProto.EXTERNAL for t in _initializers_raw(src)
        )
        if has_external or self.config.external_data == "always":
            onnx.save(loaded, str(out), save_as_external_data=True, location="model.onnx.data")
        else:
            shutil.copyfile(src, out)
        ctx.note(f"convert: ONNX source passed through (opset {_opset(loaded)})")
        return OnnxModel(out)

    def _check(self, torch_model: Any, exported: OnnxModel, ctx: PassContext) -> None:
        import numpy as np
        import onnxruntime as ort
        import torch

        options = ort.SessionOptions()
        options.intra_op_num_threads = ctx.intra_op_threads
        try:
            session = ort.InferenceSession(
                str(exported.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise PassError(f"the exported model does not load in ONNX Runtime: {exc}") from exc
        names = [i.name for i in session.get_inputs()]
        worst = 0.0
        for feed in ctx.samples.for_inputs(names)[: self.config.check_batches]:
            with torch.no_grad():
                expected = torch_model(**{k: torch.from_numpy(v) for k, v in feed.items()})[0]
            expected_np = expected.numpy()
            actual = session.run(None, feed)[0]
            # Outputs at padding positions are undefined (implementations differ): skip them.
            if "attention_mask" in feed and expected_np.ndim == 3:
                keep = feed["attention_mask"].astype(bool)
                expected_np, actual = expected_np[keep], actual[keep]
            scale = float(np.abs(expected_np).max()) or 1.0
            worst = max(worst, float(np.abs(actual - expected_np).max()) / scale)
        ctx.metrics["convert_max_relative_error"] = worst
        if worst > self.config.max_relative_error:
            raise PassError(
                f"the exported ONNX model does not reproduce the source: max relative error "
                f"{worst:.3g} > {self.config.max_relative_error:.3g} on the sample inputs; try "
                "another opset (convert.opset) or report the model architecture"
            )
        ctx.note(f"convert: export checked against torch, max relative error {worst:.2e}")


def _load_torch(kind: str, path: Path, task: str, scratch: Path) -> tuple[Any, Any]:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # air-gapped: never ask a model hub
    if kind == "gguf":  # decoders take convert_decoder's path
        raise PassError(f"a GGUF source must be a text-generation model, not {task}")
    import transformers

    if not (path / "config.json").is_file():
        raise PassError("the Hugging Face folder has no config.json at its top level")
    classes = {
        "feature-extraction": transformers.AutoModel,
        "text-classification": transformers.AutoModelForSequenceClassification,
    }
    try:
        model = classes[task].from_pretrained(
            path, local_files_only=True, attn_implementation="eager", dtype="float32"
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises many types for a broken folder
        raise PassError(f"cannot load the Hugging Face model: {_short(exc)}") from exc
    model.eval()
    return model, tokenizer


def _export(model: Any, task: str, out: Path, opset: int) -> None:
    import torch

    class ByName(torch.nn.Module):
        """Positional graph inputs → keyword arguments (forward signatures differ by version)."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )[0]

    ids = torch.ones((2, 16), dtype=torch.int64)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # with padding: an all-ones mask lets transformers trace a no-mask path
    args = (ids, mask, torch.zeros_like(ids))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    output = "last_hidden_state" if task == "feature-extraction" else "logits"
    dynamic = {n: {0: "batch", 1: "sequence"} for n in names}
    dynamic[output] = {0: "batch", 1: "sequence"} if output == "last_hidden_state" else {0: "batch"}
    try:
        with torch.no_grad():
            torch.onnx.export(
                ByName(model).eval(),  # export restores the wrapper's mode onto the model
                args,
                str(out),
                dynamo=False,
                opset_version=opset,
                input_names=names,
                output_names=[output],
                dynamic_axes=dynamic,
            )
    except Exception as exc:
        raise PassError(f"torch could not export the model to ONNX: {_short(exc)}") from exc


def _save_external(path: Path) -> None:
    import onnx

    loaded = onnx.load(str(path))
    onnx.save(loaded, str(path), save_as_external_data=True, location=f"{path.name}.data")


def _initializers_raw(path: Path) -> list[Any]:
    import onnx

    return list(onnx.load(str(path), load_external_data=False).graph.initializer)


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
