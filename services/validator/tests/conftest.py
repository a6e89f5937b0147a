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

import pytest

from slmops.events.payloads import ArtifactRef
from slmops.objectstore import ObjectStore
from slmops.profiles import DeviceProfile
from slmops.settings import PlatformSettings
from slmops.testing.models import write_tiny_llama_gguf
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


HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 1, 2, 1, 64


def _tiny_gguf(path: Path) -> Path:
    return write_tiny_llama_gguf(
        path, hidden=HIDDEN, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS, ffn=FFN, seed=5
    )


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generation-ready decoder file (a few seconds, once per session)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from slmops_optimizer.generation.metadata import write_generation_file
    from slmops_optimizer.gguf.loader import save_gguf_as_hf

    work = tmp_path_factory.mktemp("tiny-decoder")
    hf_dir = save_gguf_as_hf(_tiny_gguf(work / "tiny.gguf"), work / "hf", scratch_dir=work)
    return write_generation_file(hf_dir, work / "model.onnx", work / "build")
