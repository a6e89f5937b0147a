"""Reading GGUF files and splitting / packing their blocks (numpy and gguf only, no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slmops_optimizer.gguf.blocks import TYPE_SIZES, split_blocks
from slmops_optimizer.gguf.mapping import pack_rtn
from slmops_optimizer.gguf.reader import (
    EXACT_TYPES,
    SUPPORTED_ARCHITECTURES,
    read_architecture,
    read_gguf,
)
from slmops_optimizer.passes import PassError

ALL_TYPES = sorted(TYPE_SIZES)
#: Elements per (sub-)block, code width and zero of every type (blocks.py's table).
LAYOUTS = {
    "Q4_0": (32, 4, 8),
    "Q4_1": (32, 4, 0),
    "Q5_0": (32, 5, 16),
    "Q5_1": (32, 5, 0),
    "Q8_0": (32, 8, 128),
    "Q2_K": (16, 2, 0),
    "Q3_K": (16, 3, 4),
    "Q4_K": (32, 4, 0),
    "Q5_K": (32, 5, 0),
    "Q6_K": (16, 6, 32),
}


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_split_blocks_reproduce_the_gguf_dequantization_bit_for_bit(kind: str, layout: Any) -> None:
    import gguf

    rows, cols = 24, 512
    raw = layout.random_blocks(kind, rows, cols, np.random.default_rng(1))
    blocks = split_blocks(raw, kind)
    block_size, bits, zero = LAYOUTS[kind]
    assert blocks.codes.shape == (rows, cols // block_size, block_size)
    assert (blocks.bits, blocks.zero, blocks.block_size) == (bits, zero, block_size)
    assert int(blocks.codes.max()) < 2**bits
    assert blocks.scales.values().shape == (rows, cols // block_size)
    assert (blocks.offsets is not None) == (kind in {"Q4_1", "Q5_1", "Q2_K", "Q4_K", "Q5_K"})
    # kept as the file stores them: float16 d (per super-block for K-quants) x small integers
    assert blocks.scales.base.dtype == np.float16
    assert blocks.scales.group == (
        1 if kind in {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"} else 256 // block_size
    )
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])
    assert np.array_equal(blocks.dequantize(), expected)
    order = np.random.default_rng(2).permutation(rows)
    assert np.array_equal(blocks.permute_rows(order).dequantize(), expected[order])
    assert np.array_equal(blocks.dequantize(slice(3, 9)), expected[3:9])


@pytest.mark.parametrize("bits", [4, 8])
def test_round_to_nearest_fallback_stays_within_half_a_step(bits: int) -> None:
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((16, 80)).astype(np.float32)  # 80: a padded last block
    pack = pack_rtn(weight, bits, 32, "IQ4_XS")
    assert not pack.exact
    assert pack.zero_points is not None
    assert pack.form == ("int4" if bits == 4 else "int8")
    step = np.repeat(pack.scales.values(), 32, axis=1)[:, :80]
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
    assert embedding.ggml_type == "Q6_K"
    assert embedding.shape == (layout.vocab, layout.hidden)
    assert embedding.exact
    down = file.tensors["blk.1.ffn_down.weight"]
    assert (down.ggml_type, down.shape, down.exact) == ("Q4_K", (layout.hidden, layout.ffn), True)
    assert down.dequantize().shape == (layout.hidden, layout.ffn)
    assert np.array_equal(down.dequantize(slice(5, 7)), down.dequantize()[5:7])
    for name, kind in layout.types.items():
        assert file.tensors[name].ggml_type == kind
        assert file.tensors[name].exact == (kind in EXACT_TYPES)
    blocks = file.tensors["blk.0.ffn_down.weight"].blocks()
    assert blocks.ggml_type == "Q3_K"
    assert np.array_equal(blocks.dequantize(), file.tensors["blk.0.ffn_down.weight"].dequantize())
    up = file.tensors["blk.1.ffn_up.weight"]
    assert (up.ggml_type, up.exact) == ("F16", False)
    with pytest.raises(ValueError, match="do not map"):
        up.blocks()


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
