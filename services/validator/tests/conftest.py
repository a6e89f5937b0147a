"""Fixtures of the validator's tests: a validation's parts over a real object store, and a tiny
generation-ready decoder made as the optimizer makes one (GGUF → Hugging Face folder →
onnxruntime-genai's builder → one ONNX file with its tokenizer and generation spec)."""

from __future__ import annotations

import asyncio
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from slmops.events.payloads import ArtifactRef
from slmops.objectstore import ObjectStore
from slmops.profiles import DeviceProfile
from slmops.settings import PlatformSettings
from slmops.testing.models import byte_level_symbols
from slmops_validator.models import ModelCache
from slmops_validator.settings import ValidatorSettings

_ARCH = platform.machine() if platform.machine() in ("x86_64", "aarch64") else "x86_64"


@dataclass
class Judge:
    """What ``validate`` needs: settings, a model cache over a real (moto) store."""

    settings: ValidatorSettings
    cache: ModelCache

    async def put(self, data: bytes) -> ArtifactRef:
        path = self.settings.scratch_dir / "upload.onnx"
        path.write_bytes(data)
        blob = await asyncio.to_thread(self.cache.store.put_file, path)
        return ArtifactRef(digest=blob.digest, size_bytes=blob.size_bytes, uri=blob.uri)


@pytest.fixture
def judge(object_store: ObjectStore, tmp_path: Path) -> Judge:
    settings = ValidatorSettings(
        platform=PlatformSettings(env="local", var_dir=tmp_path / "var"),
        work_dir=tmp_path / "validator", latency_runs=5, latency_warmup_runs=1,
        latency_max_rounds=1, generation_runs=2, eval_max_examples=8,
    )  # fmt: skip
    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    return Judge(settings, ModelCache(settings.scratch_dir / "models", object_store, 1024))


@pytest.fixture(scope="session")
def cpu_profile() -> Callable[..., DeviceProfile]:
    """Makes a CPU class of this host (see :func:`make_cpu_profile`)."""
    return make_cpu_profile


def make_cpu_profile(*, measurable: bool = True, **budgets: float) -> DeviceProfile:
    """A CPU class of this host's architecture (latency measured here when ``measurable``),
    with small generation loads."""
    return DeviceProfile.model_validate({
        "name": "test-cpu", "description": "a class this host stands for",
        "cpu": {"arch": _ARCH, "isa_features": []},
        "execution_providers": ["CPUExecutionProvider"],
        "latency_measurable_on_host": measurable, "ram_mb": 4096, "storage_mb": 4096,
        "precisions": ["fp32", "int8", "int4"], "opset_min": 13, "opset_max": 22,
        "budgets": {"max_size_mb": 512, "max_peak_memory_mb": 4096, **budgets},
        "quality": {"min_cosine": 0.98, "min_greedy_identical_share": 0.5},
        "generation": {"prompt_tokens": 16, "new_tokens": 4, "context_tokens": 64,
                       "agreement_tokens": 6, "agreement_prompts": 3},
        "objective": "fastest",
        "recipes": [{"name": "r", "passes": [{"name": "convert"}]}],
    })  # fmt: skip


VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 256, 32, 1, 2, 1, 64


def _tiny_gguf(path: Path) -> Path:
    """A tiny llama (byte-level vocabulary, context 128, F32 weights, untied head)."""
    import gguf

    rng = np.random.default_rng(5)
    writer = gguf.GGUFWriter(str(path), "llama")
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
    symbols = byte_level_symbols()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([symbols[b] for b in range(VOCAB - 1)] + [symbols[116] + symbols[104]])
    writer.add_token_types([1] * VOCAB)
    writer.add_token_merges([f"{symbols[116]} {symbols[104]}"])  # "t h" -> the last token
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    head = HIDDEN // HEADS
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (VOCAB, HIDDEN),
                                          "output_norm.weight": (HIDDEN,),
                                          "output.weight": (VOCAB, HIDDEN)}  # fmt: skip
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.attn_k.weight": (KV_HEADS * head, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV_HEADS * head, HIDDEN),
            f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN), f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        }  # fmt: skip
    for name, shape in shapes.items():
        scale = 1.0 if name == "token_embd.weight" else 0.3
        values = np.ones(shape) if len(shape) == 1 else scale * rng.standard_normal(shape)
        writer.add_tensor(name, values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generation-ready decoder file (a few seconds, once per session)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from slmops_optimizer.generation.metadata import write_generation_file
    from slmops_optimizer.gguf.loader import save_gguf_as_hf

    work = tmp_path_factory.mktemp("tiny-decoder")
    hf_dir = save_gguf_as_hf(_tiny_gguf(work / "tiny.gguf"), work / "hf", scratch_dir=work)
    return write_generation_file(hf_dir, work / "model.onnx", work / "build")
