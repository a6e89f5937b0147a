"""A tiny synthetic llama GGUF (written with gguf.GGUFWriter), its torch model and fp32 export.

vocab 256, hidden 64, 2 layers, 4 heads / 2 KV heads, FFN 256, tied embeddings. Block types
cover every path of ``gguf_blocks``: Q4_1 (embedding + tied head, most weights), Q4_0, Q8_0 map
exactly; Q5_1 and a hand-made Q6_K (no quantizer in gguf-py) fall back. Built once per session
(~3 s with the export).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 256, 64, 2, 4, 2, 256

#: Block type of every 2-D tensor of the tiny model (the rest: Q4_1).
TYPES = {
    "token_embd.weight": "Q4_1",
    "blk.0.attn_output.weight": "Q4_0",
    "blk.0.attn_v.weight": "Q8_0",
    "blk.1.ffn_up.weight": "Q5_1",
    "blk.1.ffn_down.weight": "Q6_K",
}
EXACT = {"Q4_0", "Q4_1", "Q8_0"}


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    """numpy-order shapes ([out, in] for a linear weight)."""
    head_dim = HIDDEN // HEADS
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (VOCAB, HIDDEN),
        "output_norm.weight": (HIDDEN,),
    }
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (HIDDEN,),
            f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        }
    return shapes


def q6_k_blocks(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random but sane Q6_K bytes ``[rows, cols / 256 * 210]``: ql, qh, int8 scales, f16 d."""
    blocks = rows * cols // 256
    ql = rng.integers(0, 256, (blocks, 128), dtype=np.uint8)
    qh = rng.integers(0, 256, (blocks, 64), dtype=np.uint8)
    scales = rng.integers(-20, 21, (blocks, 16)).astype(np.int8).view(np.uint8)
    d = np.full((blocks, 1), 2e-4, dtype=np.float16).view(np.uint8)
    raw = np.concatenate([ql, qh, scales, d], axis=1)
    return raw.reshape(rows, -1)


def write_tiny_gguf(path: Path, *, architecture: str = "llama", seed: int = 0) -> Path:
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(VOCAB)
    # A byte-level BPE vocabulary: 255 byte symbols and one merge ("th" replaces byte 0xff).
    byte_symbols = _bytes_to_unicode()
    tokens = [byte_symbols[b] for b in range(VOCAB - 1)]
    tokens.append(byte_symbols[ord("t")] + byte_symbols[ord("h")])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * VOCAB)
    writer.add_token_merges([f"{byte_symbols[ord('t')]} {byte_symbols[ord('h')]}"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, shape in tensor_shapes().items():
        if len(shape) == 1:
            writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            continue
        kind = TYPES.get(name, "Q4_1")
        qtype = gguf.GGMLQuantizationType[kind]
        if kind == "Q6_K":
            raw = q6_k_blocks(*shape, rng)
        else:
            scale = 0.5 if name == "token_embd.weight" else 0.08
            dense = (scale * rng.standard_normal(shape)).astype(np.float32)
            raw = gguf.quants.quantize(dense, qtype)
        writer.add_tensor(name, raw, raw_dtype=qtype)  # shape: from the byte rows
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _bytes_to_unicode() -> dict[int, str]:
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@dataclass(frozen=True)
class TinyGGUF:
    gguf: Path
    fp32_onnx: Path  # the fp32 export (never modified by a test)
    model: Any  # the torch model it was exported from
    tokenizer: Any


@dataclass(frozen=True)
class Layout:
    """The tiny model's constants, for the tests (pytest cannot import this conftest)."""

    vocab: int = VOCAB
    hidden: int = HIDDEN
    layers: int = LAYERS
    heads: int = HEADS
    kv_heads: int = KV_HEADS
    ffn: int = FFN

    @property
    def types(self) -> dict[str, str]:
        """GGUF block type of every 2-D tensor."""
        return {
            name: TYPES.get(name, "Q4_1")
            for name, shape in tensor_shapes().items()
            if len(shape) == 2
        }

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return tensor_shapes()

    @staticmethod
    def write(path: Path, architecture: str = "llama") -> Path:
        return write_tiny_gguf(path, architecture=architecture)


@pytest.fixture(scope="session")
def layout() -> Layout:
    return Layout()


@pytest.fixture(scope="session")
def tiny_gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GGUF, beside a neighbour (``config.json``) the loader must ignore."""
    folder = tmp_path_factory.mktemp("tiny-gguf")
    (folder / "config.json").write_text("{}")
    return write_tiny_gguf(folder / "tiny-llama.Q4_1.gguf")


@pytest.fixture(scope="session")
def tiny_gguf(tiny_gguf_file: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyGGUF:
    """Loaded into torch and exported to fp32 ONNX, as ``convert`` does."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from slmops_optimizer.gguf.export import export_causal_lm_onnx
    from slmops_optimizer.gguf.loader import load_gguf_causal_lm

    model, tokenizer = load_gguf_causal_lm(tiny_gguf_file)
    onnx_path = tmp_path_factory.mktemp("tiny-fp32") / "model.onnx"
    export_causal_lm_onnx(model, onnx_path, 17)
    return TinyGGUF(tiny_gguf_file, onnx_path, model, tokenizer)
