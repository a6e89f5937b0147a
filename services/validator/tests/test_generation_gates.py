"""A decoder's generation gates from the probe's figures: the whole request is judged against
the fp32 reference with its interval; the first token alone against the class's budget."""

from __future__ import annotations

import platform
from typing import Any

import numpy as np

from slmops.profiles import DeviceProfile
from slmops_validator.checks.generation import generation_outcome

_ARCH = platform.machine()


def _profile(**budgets: float) -> DeviceProfile:
    return DeviceProfile.model_validate({
        "name": "gen-class", "description": "a class this host stands for",
        "cpu": {"arch": _ARCH if _ARCH in ("x86_64", "aarch64") else "x86_64",
                "isa_features": []},
        "execution_providers": ["CPUExecutionProvider"], "latency_measurable_on_host": True,
        "ram_mb": 4096, "storage_mb": 4096, "precisions": ["fp32", "int4"],
        "opset_min": 13, "opset_max": 22,
        "budgets": {"max_size_mb": 100, "max_peak_memory_mb": 100, **budgets},
        "quality": {"min_greedy_identical_share": 0.9},
        "recipes": [{"name": "r", "passes": [{"name": "convert"}]}],
    })  # fmt: skip


def _speed(ttft: float, tpot: float, *, noise: float = 0.01, pairs: int = 16) -> dict[str, Any]:
    rng = np.random.default_rng(1)

    def runs(value: float) -> list[float]:
        return list(value * (1 + noise * rng.standard_normal(pairs)))

    return {
        "candidate_ttft_ms": runs(ttft), "reference_ttft_ms": runs(100.0),
        "candidate_tpot_ms": runs(tpot), "reference_tpot_ms": runs(30.0),
        "rounds": 1, "prompt_tokens": 64, "new_tokens": 32,
    }  # fmt: skip


def _gates(raw: dict[str, Any], **budgets: float) -> dict[str, Any]:
    outcome = generation_outcome(raw, _profile(**budgets))
    return {g.name: g for g in outcome.gates}


def test_a_slower_prefill_and_faster_decode_is_judged_on_the_whole_request() -> None:
    # 10 % slower first token, 1.5x faster per token: the request is faster than fp32
    gates = _gates({"speed": _speed(110.0, 20.0)}, max_latency_ratio=1.0, max_ttft_ms=500)

    assert gates["generation.request_ratio"].passed is True
    assert gates["generation.request_ratio"].value < 0.8
    assert gates["generation.ttft_ratio"].passed is None  # reported, not judged
    assert gates["generation.ttft_ratio"].value > 1.05
    assert gates["generation.ttft_ms"].passed is True
    assert abs(gates["generation.decode_tokens_per_s"].value - 50.0) < 2.0


def test_a_confidently_slower_request_fails_and_one_within_noise_passes_saying_so() -> None:
    slower = _gates({"speed": _speed(130.0, 40.0)}, max_latency_ratio=1.0)
    noisy = _gates({"speed": _speed(100.0, 30.5, noise=0.3)}, max_latency_ratio=1.0)

    assert slower["generation.request_ratio"].passed is False
    assert "confident fail" in slower["generation.request_ratio"].detail
    assert noisy["generation.request_ratio"].passed is True
    assert "within noise" in noisy["generation.request_ratio"].detail


def test_the_first_token_budget_and_greedy_agreement_are_judged() -> None:
    agreement = {"identical_tokens": [32, 32, 32, 5], "agreement_tokens": 32}

    gates = _gates({"speed": _speed(600.0, 20.0), "agreement": agreement}, max_ttft_ms=500)

    assert gates["generation.ttft_ms"].passed is False
    assert gates["generation.greedy_identical_share"].value == 0.75
    assert gates["generation.greedy_identical_share"].passed is False
    assert gates["generation.greedy_identical_tokens_mean"].value == (3 * 32 + 5) / 4
