"""Llama 3 rope scaling from a GGUF file's ``rope_freqs`` tensor (no torch model, no builder).

llama.cpp's converter writes llama3 rope scaling only as per-frequency factors, computed from
(factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) by the formula
transformers' ``llama3`` rope type uses; the loader solves for those parameters and checks that
they give the file's factors back. The factors here are computed as llama.cpp's
``LlamaModel.generate_extra_tensors`` does (``tests/archs/tiny_archs.py``, loaded by path).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slmops_optimizer.gguf.loader import (
    PUBLISHED_LLAMA3_ROPE,
    Llama3Rope,
    _config_transformers_misses,
    llama_cpp_rope_factors,
    recover_llama3_rope,
)
from slmops_optimizer.passes.base import PassError


def _tiny_archs() -> Any:
    name = "slmops_tests_tiny_archs"
    if name not in sys.modules:
        path = Path(__file__).parents[1] / "archs" / "tiny_archs.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _llama_cpp_factors(rope: Llama3Rope, theta: float, dim: int) -> np.ndarray:
    """``rope_freqs`` as llama.cpp writes it for a Hugging Face config with this scaling (the
    test's own copy of its code, not the loader's). Like llama.cpp, it takes the original
    context from the top of the config, where Llama configs have none: 8192, whatever
    ``rope.original_max_position_embeddings`` says - so the cases here are spelled with it."""
    import transformers

    tiny = _tiny_archs()
    config = transformers.LlamaConfig(
        hidden_size=dim * 4,
        num_attention_heads=4,
        head_dim=dim,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": theta,
            "factor": rope.factor,
            "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
        },
        max_position_embeddings=131072,
    )
    written = tiny.llama_cpp_extra_tensors(tiny.ARCHS["llama3"], config)
    return np.asarray(written["rope_freqs.weight"])


#: (the file's model, rope theta, rotated dimensions per head)
PUBLISHED = [
    pytest.param(PUBLISHED_LLAMA3_ROPE[1], 500000.0, 64, id="llama-3.2-1b"),
    pytest.param(PUBLISHED_LLAMA3_ROPE[1], 500000.0, 128, id="llama-3.2-3b"),
    pytest.param(PUBLISHED_LLAMA3_ROPE[0], 500000.0, 128, id="llama-3.1-8b"),
]


@pytest.mark.parametrize(("rope", "theta", "dim"), PUBLISHED)
def test_published_llama3_files_give_back_their_parameters_exactly(
    rope: Llama3Rope, theta: float, dim: int
) -> None:
    factors = _llama_cpp_factors(rope, theta, dim)
    assert np.array_equal(llama_cpp_rope_factors(rope, theta, dim), factors)  # bit for bit
    assert 1 < np.count_nonzero((factors > 1) & (factors < rope.factor)) < dim // 2
    assert recover_llama3_rope(factors, theta, dim) == rope


@pytest.mark.parametrize(
    ("rope", "theta", "dim"),
    [
        (Llama3Rope(32.0, 64.0, 512.0, 8192), 500000.0, 64),  # the tiny Llama 3 of tests/archs
        (Llama3Rope(16.0, 2.0, 8.0, 8192), 10000.0, 64),
        (Llama3Rope(6.5, 1.5, 5.0, 8192), 1e6, 128),
        (Llama3Rope(8.0, 400.0, 640.0, 8192), 10000.0, 32),  # a band of one frequency
        (Llama3Rope(4.0, 2.5, 3.0, 8192), 10000.0, 16),  # no frequency inside the band
    ],
)
def test_other_llama3_parameters_are_fitted(rope: Llama3Rope, theta: float, dim: int) -> None:
    """Parameters outside the published sets are solved for. Only the band's wavelengths
    (original / high_freq_factor .. original / low_freq_factor) are determined by the factors,
    not ``original`` itself: a set spelled with llama.cpp's 8192 comes back as it is, and any
    recovered set gives the file's factors back to float32 precision."""
    factors = _llama_cpp_factors(rope, theta, dim)
    recovered = recover_llama3_rope(factors, theta, dim)
    assert recovered is not None
    assert recovered.original_max_position_embeddings == 8192
    assert recovered.factor == rope.factor
    back = llama_cpp_rope_factors(recovered, theta, dim)
    assert np.allclose(1 / back, 1 / factors, rtol=0, atol=1e-6)
    middle = np.count_nonzero((factors > 1) & (factors < rope.factor))
    if middle >= 2:  # the band is pinned down: it comes back as written
        assert recovered == rope


def test_factors_that_fit_no_llama3_parameters_are_not_given_any() -> None:
    theta, dim = 500000.0, 64
    published = _llama_cpp_factors(PUBLISHED_LLAMA3_ROPE[1], theta, dim)
    nudged = published.copy()
    nudged[4] *= 1 + 1e-4  # one interpolated factor off by 1e-4
    falling = published[::-1].copy()
    for factors in (np.linspace(1, 32, 32), np.geomspace(1, 32, 32), nudged, falling):
        assert recover_llama3_rope(factors.astype(np.float32), theta, dim) is None
    assert recover_llama3_rope(published[:-1], theta, dim) is None  # not one per frequency
    assert recover_llama3_rope(published, theta, 128) is None
    assert recover_llama3_rope(np.full(32, np.nan, np.float32), theta, dim) is None


# -- the loader's reading of a file --------------------------------------------------------------


def _write(path: Path, factors: np.ndarray | None, **metadata: Any) -> Path:
    """A llama GGUF header with a weight before ``rope_freqs`` (offsets and alignment count)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_embedding_length(256)
    writer.add_head_count(4)
    writer.add_rope_dimension_count(64)
    writer.add_rope_freq_base(500000.0)
    for key, value in metadata.items():
        writer.add_float32(f"llama.{key}", value)
    writer.add_tensor("token_embd.weight", np.ones((3, 256), dtype=np.float32))
    if factors is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(factors, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_loader_passes_the_recovered_parameters_to_transformers(tmp_path: Path) -> None:
    factors = _llama_cpp_factors(PUBLISHED_LLAMA3_ROPE[1], 500000.0, 64)
    path = _write(tmp_path / "llama-3.2.gguf", factors)
    assert _config_transformers_misses(path, "llama") == {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    }
    # factors of 1 are plain rope: nothing to pass on
    assert _config_transformers_misses(_write(tmp_path / "ones.gguf", np.ones(32)), "llama") == {}
    assert _config_transformers_misses(_write(tmp_path / "none.gguf", None), "llama") == {}


def test_a_scaling_factor_key_is_a_hint(tmp_path: Path) -> None:
    """llama.cpp writes no ``llama.rope.scaling.*`` key for llama3 scaling; if another
    converter did, its factor is tried first (and still checked against the tensor)."""
    rope = Llama3Rope(16.0, 1.0, 4.0, 8192)
    factors = _llama_cpp_factors(rope, 500000.0, 64)
    path = _write(tmp_path / "hinted.gguf", factors, **{"rope.scaling.factor": 16.0})
    assert _config_transformers_misses(path, "llama")["rope_parameters"]["factor"] == 16.0
    wrong = _write(tmp_path / "wrong-hint.gguf", factors, **{"rope.scaling.factor": 8.0})
    assert _config_transformers_misses(wrong, "llama")["rope_parameters"]["factor"] == 16.0


def test_rope_freqs_that_fit_nothing_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "ramp.gguf", np.linspace(1, 32, 32))
    with pytest.raises(PassError, match=r"rope_freqs\) whose factors fit no llama3"):
        _config_transformers_misses(path, "llama")
    llama3 = _write(tmp_path / "other.gguf", _llama_cpp_factors(PUBLISHED_LLAMA3_ROPE[1], 5e5, 64))
    with pytest.raises(PassError, match="fit no llama3"):  # only llama files carry llama3 rope
        _config_transformers_misses(llama3, "qwen2")
