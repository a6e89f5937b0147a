"""Reading GGUF files and splitting / packing their blocks (numpy and gguf only, no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slmops_optimizer.gguf.mapping import pack_exact, pack_rtn
from slmops_optimizer.gguf.reader import (
    SUPPORTED_ARCHITECTURES,
    read_architecture,
    read_gguf,
    split_blocks,
)
from slmops_optimizer.passes import PassError

EXACT_TYPES = ["Q4_0", "Q4_1", "Q8_0"]


def _quantized(kind: str, rows: int = 48, cols: int = 96, seed: int = 1) -> np.ndarray:
    import gguf

    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((rows, cols)).astype(np.float32) * 0.3
    dense[3, :32] = 0.0  # an all-zero block (d = 0)
    dense[5, 32:64] = 0.7  # a constant block
    return np.asarray(gguf.quants.quantize(dense, gguf.GGMLQuantizationType[kind]))


@pytest.mark.parametrize("kind", EXACT_TYPES)
def test_split_blocks_reproduce_the_gguf_dequantization_bit_for_bit(kind: str) -> None:
    import gguf

    raw = _quantized(kind)
    blocks = split_blocks(raw, kind)
    assert blocks.codes.shape == (48, 3, 32)
    assert blocks.scales.shape == (48, 3)
    assert (blocks.mins is not None) == (kind == "Q4_1")
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])
    assert np.array_equal(blocks.dequantize(), expected)


@pytest.mark.parametrize("kind", EXACT_TYPES)
def test_exact_packs_hold_the_same_values(kind: str) -> None:
    import gguf

    raw = _quantized(kind)
    pack = pack_exact(split_blocks(raw, kind))
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])
    assert pack.exact
    assert pack.bits == (8 if kind == "Q8_0" else 4)
    assert pack.codes.shape == (48, 3, 32 * pack.bits // 8)
    assert pack.zero_points is None  # ONNX Runtime's default zero point: prepacked kernels
    np.testing.assert_allclose(pack.dequantize(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_round_to_nearest_fallback_stays_within_half_a_step(bits: int) -> None:
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((16, 80)).astype(np.float32)  # 80: a padded last block
    pack = pack_rtn(weight, bits, 32, "Q6_K")
    assert not pack.exact
    assert pack.zero_points is not None
    step = np.repeat(pack.scales, 32, axis=1)[:, :80]
    assert np.all(np.abs(pack.dequantize() - weight) <= step / 2 + 1e-6)


def test_read_gguf_gives_numpy_order_shapes_types_and_metadata(
    tiny_gguf_file: Path, layout: Any
) -> None:
    file = read_gguf(tiny_gguf_file)
    assert file.architecture == "llama"
    assert file.meta_int("block_count") == layout.layers
    assert file.meta_int("attention.head_count_kv") == layout.kv_heads
    assert "tokenizer.ggml.tokens" not in file.metadata  # long arrays are left to the tokenizer
    assert {name: t.shape for name, t in file.tensors.items()} == layout.shapes
    embedding = file.tensors["token_embd.weight"]
    assert embedding.ggml_type == "Q4_1"
    assert embedding.shape == (layout.vocab, layout.hidden)
    assert embedding.exact
    down = file.tensors["blk.1.ffn_down.weight"]
    assert (down.ggml_type, down.shape, down.exact) == ("Q6_K", (layout.hidden, layout.ffn), False)
    assert down.dequantize().shape == (layout.hidden, layout.ffn)
    for name, kind in layout.types.items():
        assert file.tensors[name].ggml_type == kind
    blocks = file.tensors["blk.0.attn_v.weight"].blocks()
    assert blocks.ggml_type == "Q8_0"
    assert np.array_equal(blocks.dequantize(), file.tensors["blk.0.attn_v.weight"].dequantize())
    with pytest.raises(ValueError, match="do not map"):
        down.blocks()


def test_unsupported_architecture_is_a_clear_error(tmp_path: Path, layout: Any) -> None:
    path = layout.write(tmp_path / "odd.gguf", architecture="rwkv6")
    assert read_architecture(path) == "rwkv6"
    expected = (
        f"GGUF architecture 'rwkv6' is not supported: supported are {SUPPORTED_ARCHITECTURES[0]}"
    )
    with pytest.raises(PassError, match=expected):
        read_gguf(path)
    assert read_gguf(path, check_architecture=False).architecture == "rwkv6"


def test_missing_and_foreign_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(PassError, match="GGUF file not found"):
        read_gguf(tmp_path / "absent.gguf")
    foreign = tmp_path / "model.gguf"
    foreign.write_bytes(b"PK\x03\x04 not a gguf file at all")
    with pytest.raises(PassError, match="not a readable GGUF file"):
        read_architecture(foreign)
    with pytest.raises(PassError, match="not a readable GGUF file"):
        read_gguf(foreign)
