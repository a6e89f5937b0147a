"""A tiny synthetic llama GGUF (written with gguf.GGUFWriter), its torch model, its fp32
TorchScript export and its onnxruntime-genai builder graph.

vocab 256, hidden 256, 2 layers, 4 heads / 2 KV heads (head 64), FFN 512, tied embeddings:
256-wide rows so that every K-quant (256-element super-blocks along K) fits. Its tensors cover
every block type the pass maps - Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K -
plus an F16 weight that falls back; q/k/v mix types like a Q4_K_M file (the builder packs them
into one qkv weight: a run of mixed forms in layer 0, one form in layer 1). gguf-py has no
quantizer for the K-quants: their raw blocks are built here (random codes and sub-block scales,
float16 super-block scales sized for weights of ~0.08). Built once per session (~3 s with the
export, ~10 s with the builder).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slmops.testing.models import byte_level_symbols

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 256, 256, 2, 4, 2, 512

#: Block type of every 2-D tensor of the tiny model.
TYPES = {
    "token_embd.weight": "Q6_K",  # the tied embedding: split4 / int8 tables with 16-blocks
    "blk.0.attn_q.weight": "Q4_K",
    "blk.0.attn_k.weight": "Q4_K",
    "blk.0.attn_v.weight": "Q6_K",
    "blk.0.attn_output.weight": "Q4_0",
    "blk.0.ffn_gate.weight": "Q5_K",
    "blk.0.ffn_up.weight": "Q4_1",
    "blk.0.ffn_down.weight": "Q3_K",
    "blk.1.attn_q.weight": "Q5_0",
    "blk.1.attn_k.weight": "Q5_0",
    "blk.1.attn_v.weight": "Q8_0",
    "blk.1.attn_output.weight": "Q5_1",
    "blk.1.ffn_gate.weight": "Q2_K",
    "blk.1.ffn_up.weight": "F16",  # no block mapping: requantized, or kept fp32
    "blk.1.ffn_down.weight": "Q4_K",
}
MAPPED = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}

#: Byte offsets of the float16 fields of a K-quant super-block: (d, dmin or None).
_K_FIELDS = {
    "Q2_K": (80, 82),
    "Q3_K": (108, None),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208, None),
}
#: dmin / d that centres a K-quant's values (mean code x mean scale over mean minimum).
_K_CENTRE = {"Q2_K": 1.5, "Q4_K": 7.5, "Q5_K": 15.5}


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


def random_blocks(
    kind: str, rows: int, cols: int, rng: np.random.Generator, std: float = 0.08
) -> np.ndarray:
    """Valid raw GGUF bytes ``[rows, bytes_per_row]`` of ``kind`` with values of about ``std``.

    The legacy types and F16 through gguf-py's quantizer; the K-quants (gguf-py has none) as
    random codes and sub-block scales under float16 super-block scales, among them a block with
    ``d = 0`` and one with a negative ``d``.
    """
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    if kind not in _K_FIELDS:
        dense = (std * rng.standard_normal((rows, cols))).astype(np.float32)
        dense[0, :32] = 0.0  # an all-zero block
        return np.asarray(gguf.quants.quantize(dense, qtype))
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * cols // block_size
    raw = rng.integers(0, 256, (n, type_size), dtype=np.uint8)
    if kind == "Q6_K":  # int8 sub-block scales of a realistic size
        raw[:, 192:208] = rng.integers(-40, 41, (n, 16)).astype(np.int8).view(np.uint8)
    d_at, dmin_at = _K_FIELDS[kind]
    centre = _K_CENTRE.get(kind, 0.0)

    def put(d: np.ndarray) -> None:
        raw[:, d_at : d_at + 2] = d.astype(np.float16).reshape(n, 1).view(np.uint8)
        if dmin_at is not None:
            dmin = (np.abs(d) * centre).astype(np.float16).reshape(n, 1).view(np.uint8)
            raw[:, dmin_at : dmin_at + 2] = dmin

    put(np.ones(n, dtype=np.float32))
    spread = float(np.std(gguf.quants.dequantize(raw, qtype)))
    d = np.full(n, std / spread, dtype=np.float32) * rng.uniform(0.5, 1.5, n).astype(np.float32)
    d[0] = 0.0
    d[min(1, n - 1)] *= -1.0
    put(d)
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
    byte_symbols = byte_level_symbols()
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
        kind = TYPES[name]
        std = 0.5 if name == "token_embd.weight" else 0.08
        raw = random_blocks(kind, shape[0], shape[1], rng, std)
        if kind == "F16":
            writer.add_tensor(name, raw)
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(name, raw, raw_dtype=qtype)  # shape: from the byte rows
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@dataclass(frozen=True)
class TinyGGUF:
    gguf: Path
    fp32_onnx: Path  # the fp32 TorchScript export (never modified by a test)
    model: Any  # the torch model it was exported from
    tokenizer: Any


@dataclass(frozen=True)
class Layout:
    """The tiny model's constants and helpers, for the tests (pytest cannot import this
    conftest)."""

    vocab: int = VOCAB
    hidden: int = HIDDEN
    layers: int = LAYERS
    heads: int = HEADS
    kv_heads: int = KV_HEADS
    ffn: int = FFN
    mapped: frozenset[str] = frozenset(MAPPED)

    @property
    def types(self) -> dict[str, str]:
        """GGUF block type of every 2-D tensor."""
        return dict(TYPES)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return tensor_shapes()

    @staticmethod
    def write(path: Path, architecture: str = "llama") -> Path:
        return write_tiny_gguf(path, architecture=architecture)

    @property
    def random_blocks(self) -> Callable[..., np.ndarray]:
        return random_blocks


@pytest.fixture(scope="session")
def layout() -> Layout:
    return Layout()


@pytest.fixture(scope="session")
def tiny_gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GGUF, beside a neighbour (``config.json``) the loader must ignore."""
    folder = tmp_path_factory.mktemp("tiny-gguf")
    (folder / "config.json").write_text("{}")
    return write_tiny_gguf(folder / "tiny-llama.Q4_K_M.gguf")


@pytest.fixture(scope="session")
def tiny_gguf(tiny_gguf_file: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyGGUF:
    """Loaded into torch and exported to fp32 ONNX (TorchScript), as ``convert`` did."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from slmops_optimizer.gguf.export import export_causal_lm_onnx
    from slmops_optimizer.gguf.loader import load_gguf_causal_lm

    model, tokenizer = load_gguf_causal_lm(tiny_gguf_file)
    onnx_path = tmp_path_factory.mktemp("tiny-fp32") / "model.onnx"
    export_causal_lm_onnx(model, onnx_path, 17)
    return TinyGGUF(tiny_gguf_file, onnx_path, model, tokenizer)


@pytest.fixture(scope="session")
def tiny_builder(tiny_gguf_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """onnxruntime-genai's fp32 generation graph of the tiny GGUF (packed qkv, KV cache,
    ``Gather(Transpose(lm_head))`` for the tied embedding); its folder holds genai_config.json.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    from slmops_optimizer.generation.build import build_decoder
    from slmops_optimizer.gguf.loader import save_gguf_as_hf

    root = tmp_path_factory.mktemp("tiny-builder")
    hf_dir = save_gguf_as_hf(tiny_gguf_file, root / "hf", scratch_dir=root)
    return build_decoder(hf_dir, root / "fp32", root / "cache")
