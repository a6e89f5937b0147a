"""``convert`` for decoders: the source → a generation-ready fp32 graph, checked against torch.

- GGUF: dequantized by transformers' GGUF loader into a Hugging Face folder (``gguf_blocks``
  later maps the file's own blocks back into the graph exactly).
- Hugging Face folder: read as it is.
- Either way onnxruntime-genai's builder writes the graph with a KV cache
  (:mod:`slmops_optimizer.generation.build`), and the graph's logits over the job's sample
  windows (empty past: the whole window in one step) are compared with the torch model's; an
  export that drifts fails the job instead of shipping a wrong model.
- An ONNX decoder is refused with the reason: a graph without the runtime's KV-cache contract
  cannot be made generation-ready here (publish the Hugging Face folder or the GGUF file).

The folder keeps the builder's runtime config and tokenizer files beside the graph, and the
spec made from them (``generation.json``): the job stamps it into every variant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slmops_optimizer.passes.base import OnnxModel, PassContext, PassError


def convert_decoder(
    ctx: PassContext, *, max_relative_error: float, batches: int, max_context_tokens: int | None
) -> OnnxModel:
    from slmops_optimizer.generation.build import build_decoder
    from slmops_optimizer.generation.metadata import SPEC_FILE, spec_from_folder

    source = ctx.source
    if source.kind == "onnx":
        raise PassError(
            "an ONNX decoder cannot be made generation-ready here (its graph lacks the runtime's "
            "KV-cache inputs and config): publish the model as a Hugging Face folder or a GGUF "
            "file"
        )
    torch_model, tokenizer, hf_dir = _hf_folder(ctx)
    ctx.tokenizer = tokenizer
    out = ctx.output_dir("convert")
    model = build_decoder(
        hf_dir, out, ctx.work_dir / "builder-cache", max_context_tokens=max_context_tokens
    )
    spec = spec_from_folder(out)
    (out / SPEC_FILE).write_text(spec.model_dump_json())
    ctx.generation = spec
    if ctx.samples is None:
        from slmops_optimizer.samples import build_samples

        ctx.samples = build_samples(
            tokenizer, source.task, ctx.texts, origin=ctx.texts_origin, size=ctx.sample_size,
            generation=spec,
        )  # fmt: skip
    _check(torch_model, OnnxModel(model), ctx, max_relative_error, batches)
    del torch_model
    ctx.note(
        f"convert: generation-ready graph (onnxruntime-genai builder, {spec.layers} layers, "
        f"{spec.kv_heads} KV heads, context {spec.context_length}, "
        f"chat template: {'yes' if spec.chat_template else 'none'}, "
        f"stop tokens {spec.stop_token_ids})"
    )
    return OnnxModel(model)


def _hf_folder(ctx: PassContext) -> tuple[Any, Any, Path]:
    """(torch model, tokenizer, Hugging Face folder) of the source."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # air-gapped: never ask a model hub
    source = ctx.source
    if source.kind == "gguf":
        from slmops_optimizer.gguf.loader import load_gguf_causal_lm, save_hf_folder

        model, tokenizer = load_gguf_causal_lm(source.path, scratch_dir=ctx.work_dir)
        folder = save_hf_folder(model, tokenizer, ctx.work_dir / "hf")
        return model, tokenizer, folder
    import transformers

    folder = source.path
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PassError("the Hugging Face folder has no config.json at its top level")
    try:
        config = json.loads(config_path.read_text())
        if config.get("quantization_config"):
            raise PassError(
                "the Hugging Face folder holds pre-quantized weights "
                f"({config['quantization_config'].get('quant_method', 'unknown method')}): "
                "publish the unquantized checkpoint or a GGUF file"
            )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, attn_implementation="eager", dtype="float32"
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except PassError:
        raise
    except Exception as exc:  # transformers raises many types for a broken folder
        text = str(exc).strip().splitlines()
        raise PassError(f"cannot load the Hugging Face model: {(text or ['?'])[0][:300]}") from exc
    model.eval()  # type: ignore[no-untyped-call]
    return model, tokenizer, folder


def _check(
    torch_model: Any, built: OnnxModel, ctx: PassContext, limit: float, batches: int
) -> None:
    """The graph's logits over whole windows against torch's (padding positions skipped)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = ctx.intra_op_threads
    options.log_severity_level = 3
    try:  # every position's logits (the served graph computes the last one only)
        from slmops.generation.windows import window_session

        session = window_session(built.path, options, ["CPUExecutionProvider"])
    except Exception as exc:
        raise PassError(f"the built decoder does not load in ONNX Runtime: {exc}") from exc
    names = [i.name for i in session.get_inputs()]
    worst = 0.0
    for feed in ctx.samples.for_inputs(names)[:batches]:
        with torch.no_grad():
            expected = torch_model(
                input_ids=torch.from_numpy(feed["input_ids"]),
                attention_mask=torch.from_numpy(feed["attention_mask"]),
                use_cache=False,
            ).logits.numpy()
        actual = session.run(["logits"], feed)[0]
        keep = feed["attention_mask"].astype(bool)
        scale = float(np.abs(expected[keep]).max()) or 1.0
        worst = max(worst, float(np.abs(actual[keep] - expected[keep]).max()) / scale)
    ctx.metrics["convert_max_relative_error"] = worst
    if worst > limit:
        raise PassError(
            f"the generation graph does not reproduce the source: max relative error "
            f"{worst:.3g} > {limit:.3g} on the sample windows; report the model architecture"
        )
    ctx.note(f"convert: generation graph checked against torch, max relative error {worst:.2e}")
