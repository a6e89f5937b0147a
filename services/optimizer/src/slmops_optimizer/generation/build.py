"""A generation-ready decoder graph from a Hugging Face folder, with onnxruntime-genai's builder.

Why the builder and not our own torch export (or optimum's ``text-generation-with-past``): it
writes the graph ONNX Runtime's CPU kernels are fastest on - GroupQueryAttention with the
rotary embedding inside, a KV cache whose past and present share one buffer, fused
SkipSimplifiedLayerNormalization - for every architecture small models ship in (llama,
mistral, qwen2/3, gemma/2/3, phi3, smollm3, granite, olmo...), with their quirks (sliding
windows and two rope bases in gemma3, q/k norms in qwen3, logit soft-capping in gemma2). A
torch trace gives plain MatMul/Softmax attention and concatenates the cache on every token.

We build in fp32 only: quantization is the passes' job (``gguf_blocks`` maps a GGUF file's own
blocks into this graph; ``weight_only`` quantizes from fp32), because the builder's own int4
requantizes (RTN), and a GGUF model's greedy text then departs from the file's after a few
tokens.

The builder is a library of the ``onnxruntime-genai`` wheel (it needs torch and transformers,
which the optimizer has). Fixes for the versions pinned here are applied around it, not to the
library: transformers 5 nests gemma3's rope parameters per layer type (the builder reads the
flat form); the builder rounds gemma's embedding scale sqrt(hidden) to two decimals (25.3 for
640 where transformers and llama.cpp use 25.2982) and declares wrong shapes for some constants
(see :func:`_tidy`).

The LM head computes the last position's logits only (``prune_lm_head``): generating needs no
more, and over a whole prompt it dominated time to first token and memory (gemma-3-270m: 64 x
262,144 logits); scoring windows bypasses the selection (``slmops.generation.windows``).

Sliding-window layers (gemma2/3) get full-length KV buffers (``windowed_kv_cache=false``): with
window-sized ring buffers the graph cannot run a window in one step from an empty cache, which
is how the optimizer scores and the validator judges every candidate against its reference.
The window still bounds what each layer attends to; the cost is memory at long contexts
(gemma-3-270m: 2 KB per token per sliding layer).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path
from typing import Any

from slmops_optimizer.passes.base import PassError

#: The model file the builder writes (its weights in ``model.onnx.data`` beside it).
MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"


def build_decoder(
    hf_dir: Path, out_dir: Path, cache_dir: Path, *, max_context_tokens: int | None = None
) -> Path:
    """Write the fp32 generation graph of the causal LM in ``hf_dir`` into ``out_dir`` (plus
    ``genai_config.json`` and the tokenizer files); returns the model file.

    ``max_context_tokens`` caps the context the graph supports (None: the model's own). The
    builder sizes its rotary caches by it: gemma-3-270m's 32k context costs 67 MB of fp32
    caches, more than a quarter of its 4-bit weights, for contexts no edge device allocates.

    Raises :class:`PassError` with the builder's reason when the architecture is not one it
    knows or the folder cannot be built.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # air-gapped: never ask a model hub
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    log = io.StringIO()
    try:
        # The builder prints progress; keep it out of the service's log unless it fails.
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            options = parse_extra_options(
                None, str(hf_dir), str(out_dir), "fp32", "cpu", str(cache_dir),
                ["hf_token=false", "windowed_kv_cache=false", "prune_lm_head=true"],
            )  # fmt: skip
            _fix_config(options["hf_details"]["hf_config"], max_context_tokens)
            create_model(None, str(hf_dir), str(out_dir), "fp32", "cpu", str(cache_dir), **options)
    except Exception as exc:  # the builder raises bare Exception, NotImplementedError...
        architecture = _architecture(hf_dir)
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise PassError(
            f"onnxruntime-genai's model builder cannot build {architecture}: {detail[:300]}"
        ) from exc
    model = out_dir / MODEL_FILE
    if not model.is_file() or not (out_dir / GENAI_CONFIG).is_file():
        raise PassError(f"the model builder wrote no {MODEL_FILE}: {log.getvalue()[-300:]}")
    _tidy(model)
    shutil.rmtree(cache_dir, ignore_errors=True)
    return model


#: Rope types whose frequencies do not depend on the context length, so capping it changes
#: nothing but the size of the builder's rotary caches. llama3 reads its own
#: ``original_max_position_embeddings`` (the builder lifts it out of ``rope_parameters``); the
#: others (linear, yarn, longrope...) size their factors or pick their caches by the context.
_CONTEXT_FREE_ROPE = frozenset({"default", "llama3"})


def _fix_config(config: Any, max_context_tokens: int | None = None) -> None:
    """The context cap (only for ropes that do not depend on the context: plain and llama3;
    other scaled ropes pick their factors by it), and two config shapes the builder misreads:

    - gemma3 under transformers 5: ``rope_parameters`` is nested per layer type, the builder
      reads a flat dict plus ``rope_local_base_freq`` for the sliding layers.
    - phi3 without rope scaling whose ``original_max_position_embeddings`` differs from
      ``max_position_embeddings``: the builder picks its LongRoPE model by that difference alone
      and fails on the missing factors (``'multi_cache'``). transformers' GGUF loader leaves
      ``original_max_position_embeddings`` at Phi3Config's default 4096 (it does not read
      ``phi3.rope.scaling.original_context_length``), so every phi3 GGUF whose context is not
      4096 hit this. With plain rope the value means nothing: set it to the context length.
    """
    rope = getattr(config, "rope_parameters", None)
    context = getattr(config, "max_position_embeddings", None)
    context_free = all(
        (r or {}).get("rope_type", "default") in _CONTEXT_FREE_ROPE
        for r in ((rope or {}).values() if "full_attention" in (rope or {}) else [rope])
    )
    capped = max_context_tokens and isinstance(context, int) and context > max_context_tokens
    if capped and context_free:
        config.max_position_embeddings = max_context_tokens
    if (
        getattr(config, "model_type", "") == "phi3"
        and (rope or {}).get("rope_type", "default") == "default"
        and getattr(config, "original_max_position_embeddings", None)
        != getattr(config, "max_position_embeddings", None)
    ):
        config.original_max_position_embeddings = config.max_position_embeddings
    if (
        isinstance(rope, dict)
        and "full_attention" in rope
        and "rope_type" not in rope
        and getattr(config, "model_type", "").startswith("gemma3")
    ):
        config.rope_parameters = dict(rope["full_attention"])
        if "sliding_attention" in rope:
            config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]


def _tidy(model: Path) -> None:
    """Two fixes to the builder's graph (its weights in the external file are untouched):

    - its gemma embedding scale ``round(sqrt(hidden), 2)`` → ``sqrt(hidden)`` in float32;
    - the value_info it declares for its shared Constant nodes says rank 0 where a constant is
      1-D (``/model/constants/INT64/[1]``): ONNX's strict shape inference, which the
      validator's structure check runs, rejects the contradiction. Declared shapes of
      constants are set to the constants' own.
    """
    import json

    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    config = json.loads((model.parent / GENAI_CONFIG).read_text())
    changed = _fix_embedding_scale(proto, int(config["model"]["decoder"]["hidden_size"]))
    changed |= _fix_constant_shapes(proto)
    if changed:
        onnx.save(proto, str(model))  # external data untouched: its references are kept


def _fix_embedding_scale(proto: Any, hidden: int) -> bool:
    import numpy as np
    from onnx import numpy_helper

    scale_node = next(
        (n for n in proto.graph.node if n.name == "/model/embed_tokens/Mul" and n.op_type == "Mul"),
        None,
    )
    if scale_node is None:
        return False
    exact = np.float32(np.sqrt(np.float32(hidden)))
    changed = False
    for init in proto.graph.initializer:
        if init.name in scale_node.input and not init.dims and init.data_type == 1:
            value = numpy_helper.to_array(init)
            if abs(float(value) - float(exact)) < 0.01 and value != exact:
                init.CopyFrom(numpy_helper.from_array(np.asarray(exact), init.name))
                changed = True
    return changed


def _fix_constant_shapes(proto: Any) -> bool:
    constants = {
        n.output[0]: list(n.attribute[0].t.dims)
        for n in proto.graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    }
    changed = False
    for info in proto.graph.value_info:
        dims = constants.get(info.name)
        shape = info.type.tensor_type.shape
        if dims is None or [d.dim_value for d in shape.dim] == dims:
            continue
        del shape.dim[:]
        for size in dims:
            shape.dim.add().dim_value = size
        changed = True
    return changed


def _architecture(hf_dir: Path) -> str:
    import json

    try:
        config = json.loads((hf_dir / "config.json").read_text())
        return str((config.get("architectures") or [config.get("model_type", "?")])[0])
    except (OSError, ValueError):
        return "this model"
