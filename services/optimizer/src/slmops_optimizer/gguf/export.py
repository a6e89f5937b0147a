"""Export a causal LM to ONNX with the TorchScript exporter: ``input_ids``, ``attention_mask`` →
``logits``, batch and sequence dynamic, no KV cache.

The TorchScript exporter (``dynamo=False``) writes MatMul weights transposed (``[in, out]``)
under generated names (``onnx::MatMul_1234``) and duplicates a tied embedding (a Gather table
plus the LM head's MatMul weight); ``gguf_blocks`` matches them to GGUF tensors by content.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmops_optimizer.passes.base import PassError

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"


def export_causal_lm_onnx(model: Any, out_path: Path, opset: int = 17) -> Path:
    """Write ``model`` (a transformers ``*ForCausalLM``) to ``out_path``; returns the path.

    One file: a model over 2 GB must be re-saved with external data by the caller. Raises
    :class:`PassError` when torch cannot export the model.
    """
    import torch

    class _Logits(torch.nn.Module):
        """Only the logits: the exported graph then has exactly one output."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits

    model.config.use_cache = False
    model.eval()
    ids = torch.ones((1, 8), dtype=torch.int64)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    out_path = Path(out_path)
    try:
        with torch.no_grad():
            torch.onnx.export(
                _Logits(model),
                (ids, torch.ones_like(ids)),
                str(out_path),
                dynamo=False,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic,
            )
    except Exception as exc:  # torch raises many types for an untraceable model
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PassError(f"torch could not export the model to ONNX: {message[:300]}") from exc
    return out_path
