"""Constants and the records every part of the optimizer bench shares."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from slmops.profiles import DeviceProfile
from slmops_optimizer.jobspec import JobResult, JobSpec

MB = 1e6
QUICK = os.environ.get("SLMOPS_BENCH_QUICK", "") not in ("", "0")
THREADS = 2
PROFILES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "profiles"
BUCKET = "slmops-bench"
REGION = "us-east-1"
ACCESS_KEY, SECRET_KEY = "slmops-bench", "slmops-bench-secret"  # moto accepts any
SMOLLM_CLASSES = os.environ.get("SLMOPS_BENCH_SMOLLM_CLASSES", "x86-avx512-vnni,arm64-pi5")
MINILM_CLASSES = os.environ.get("SLMOPS_BENCH_MINILM_CLASSES", "x86-avx512-vnni" if QUICK else "")
HELD_OUT_TEXTS = 48  # the last 48 of the 96 built-in texts
DECODER_SPAN, DECODER_WINDOWS = 128, 24
WARMUP = 2 if QUICK else 3
SPARSE_INPUTS = ("b8",)
ROUNDS = {"feature-extraction": 10 if QUICK else 30, "text-generation": 4 if QUICK else 10}
RAY_JOBS = 4 if QUICK else 6
RAY_START_TIMEOUT_S = 180.0
RAY_PROCESS_TIMEOUT_S = 1200.0
RAY_RESULT = "RAYRUN "

# Targets of the issue.
SMOL_MAX_MB, SMOL_MIN_TOP1, SMOL_MAX_P50_RATIO = 112.0, 0.98, 0.7
MINI_MIN_SMALLER, MINI_MIN_FASTER, MINI_MIN_COSINE = 3.9, 1.6, 0.99


# ------------------------------------------------------------------------------------------------
# What is measured


@dataclass(frozen=True)
class Case:
    name: str
    fmt: str  # "hf-safetensors" | "gguf"
    task: str  # "feature-extraction" | "text-generation"
    path: Path  # the HF folder or the .gguf file
    classes: tuple[str, ...] | None  # None: every class with applicable recipes


@dataclass
class Variant:
    label: str  # "fp32", "V1", ...
    path: Path
    size_mb: float
    latency: dict[str, list[float]] = field(default_factory=dict)  # input name → ms
    quality: dict[str, float] = field(default_factory=dict)
    error: str = ""  # it did not load or run


@dataclass
class Job:
    device_class: str
    profile: DeviceProfile
    spec: JobSpec
    result: JobResult | None = None
    error: str = ""
    wall_s: float = 0.0
    variant: Variant | None = None

    @property
    def recipe(self) -> str:
        return str(self.spec.recipe.name)

    @property
    def floor_met(self) -> bool:
        return self.result is not None and self.result.metrics.get("quality_floor_met") == 1.0

    def change(self) -> str:
        """The trail entry the search kept: what differs from the recipe as planned."""
        if self.result is None:
            return ""
        trail = self.result.trail
        for entry in trail:
            if entry.recipe == self.result.effective_recipe:
                if len(trail) == 1:
                    return str(entry.change)
                return f"{entry.change} (try {entry.attempt}/{len(trail)})"
        return "as planned"
