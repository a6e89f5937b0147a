"""prune: achieved sparsity, zlib size and the quality it costs on MiniLM; what stays dense."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from slmops_optimizer.passes import OnnxModel, PassContext, PassError
from slmops_optimizer.passes.prune import Prune

from .conftest import Encoder


def zero_fraction(model: OnnxModel, name: str) -> float:
    init = next(i for i in onnx.load(str(model.path)).graph.initializer if i.name == name)
    values = numpy_helper.to_array(init)
    return float((values == 0).mean())


def test_half_sparsity_on_minilm(
    minilm: Encoder, make_ctx: Callable[..., PassContext], clean_cwd: Path
) -> None:
    ctx = make_ctx(minilm.samples)
    out = Prune.from_config({"sparsity": 0.5}).run(minilm.model, ctx)

    assert ctx.metrics["sparsity"] == pytest.approx(0.5, abs=0.01)
    # Dense file, smaller archive: 90 MB -> ~68 MB zlib (the fp32 embeddings stay dense).
    assert out.size_bytes == pytest.approx(minilm.model.size_bytes, rel=0.01)
    assert ctx.metrics["compressed_size_mb"] < 0.8 * minilm.model.size_bytes / 1e6
    assert "word_embeddings" not in " ".join(ctx.log)
    assert zero_fraction(out, "model.embeddings.word_embeddings.weight") < 0.01
    parity = minilm.parity(out)
    assert parity.cosine_mean < 0.9, parity  # no fine-tuning: 50% costs real accuracy
    assert any("sparsity 0.500" in line for line in ctx.log)


def test_excludes_lm_head_tied_and_small_weights(
    tiny_decoder: OnnxModel, make_ctx: Callable[..., PassContext]
) -> None:
    ctx = make_ctx(task="text-generation")
    out = Prune.from_config({"sparsity": 0.9, "min_elements": 8192}).run(tiny_decoder, ctx)

    assert zero_fraction(out, "layers.0.up") == pytest.approx(0.9, abs=0.01)
    assert zero_fraction(out, "lm_head.weight") == 0.0  # excluded by name (*lm_head*)
    assert zero_fraction(out, "embed.weight") == 0.0  # a Gather table, never a candidate
    assert ctx.metrics["sparsity"] == pytest.approx(0.9, abs=0.01)


def test_ladder_and_bad_config(
    tiny_decoder: OnnxModel, make_ctx: Callable[..., PassContext]
) -> None:
    ladder = Prune.from_config({"sparsity": 0.6}).refinements(tiny_decoder, make_ctx())
    assert [(r.description, r.config.sparsity) for r in ladder] == [
        ("sparsity 0.3", 0.3),
        ("sparsity 0.15", 0.15),
    ]
    with pytest.raises(PassError, match="sparsity"):
        Prune.from_config({"sparsity": 1.0})
    assert np.isfinite(ladder[-1].config.sparsity)
