"""Device-class profiles: what a class of edge device can run, and how good a variant must be.

One YAML file per class under ``deploy/profiles/``. The optimizer plans recipes from them, the
validator judges against their budgets and floors, the rollout service targets gateways by
class, and a gateway declares its class. Loaded once and validated with readable errors (file,
field and reason), so a typo fails at start-up, not in the middle of a rollout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from slmops.events.payloads import ModelFormat, PassSpec, Recipe, Task, Token

Precision = Literal["fp32", "fp16", "int8", "int4"]
ALL_PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8", "int4")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Cpu(_Strict):
    arch: Literal["x86_64", "aarch64"] = Field(description="Instruction set architecture.")
    isa_features: list[str] = Field(
        default_factory=list, description="e.g. avx512_vnni, neon, dotprod (lower case)."
    )


class Budgets(_Strict):
    max_size_mb: float = Field(gt=0, description="Largest artifact the device can hold, in MB.")
    max_peak_memory_mb: float = Field(gt=0, description="RSS growth allowed while running, MB.")
    max_latency_p95_ms: float | None = Field(
        None, gt=0, description="p95 latency budget for one inference, in ms (null: none)."
    )
    max_latency_ratio: float | None = Field(
        None,
        gt=0,
        description="p95 latency relative to the fp32 parent on the same host (decoders: time "
        "to first token, and time per decoded token).",
    )
    max_ttft_ms: float | None = Field(
        None, gt=0, description="Decoders: time to first token at the class's prompt length, ms."
    )
    min_decode_tokens_per_s: float | None = Field(
        None, gt=0, description="Decoders: tokens per second after the first (greedy), lowest."
    )


class QualityFloors(_Strict):
    min_cosine: float | None = Field(
        None, ge=-1, le=1, description="Encoders: lowest mean cosine to the parent's embeddings."
    )
    min_top1_agreement: float | None = Field(
        None, ge=0, le=1, description="Decoders: lowest share of equal next-token predictions."
    )
    max_perplexity_increase_pct: float | None = Field(
        None, ge=0, description="Decoders: highest perplexity increase over the parent, in %."
    )
    max_accuracy_drop_pct: float | None = Field(
        None, ge=0, description="Labelled sets: highest task accuracy drop, in points."
    )
    min_greedy_identical_share: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Decoders: lowest share of evaluation prompts whose first "
        "generation.agreement_tokens greedy tokens equal the fp32 reference's.",
    )


class GenerationLoad(_Strict):
    """How a decoder is exercised when it is judged: the shape of a typical request here."""

    prompt_tokens: int = Field(64, ge=1, description="Prompt length of the TTFT measurement.")
    new_tokens: int = Field(64, ge=2, description="Tokens decoded per speed measurement.")
    context_tokens: int = Field(
        2048, ge=16, description="Context the peak memory is measured at (KV cache included)."
    )
    agreement_tokens: int = Field(
        32, ge=1, description="Greedy tokens compared with the fp32 reference per prompt."
    )
    agreement_prompts: int = Field(16, ge=1, description="Evaluation prompts compared.")


class SearchBudget(_Strict):
    max_tries: int = Field(4, ge=1, le=32, description="Candidates tried per recipe refinement.")
    sample_size: int = Field(32, ge=4, le=4096, description="Texts in the quick quality score.")


class CandidateRecipe(_Strict):
    """A recipe the optimizer tries for this class, and which sources it applies to."""

    name: Token = Field(description="Recipe name, unique within the profile.")
    passes: list[PassSpec] = Field(min_length=1, description="Ordered passes with configs.")
    formats: list[ModelFormat] = Field(
        default_factory=list, description="Source formats it applies to; empty = every format."
    )
    tasks: list[Task] = Field(
        default_factory=list, description="Model tasks it applies to; empty = every task."
    )

    def applies_to(self, fmt: str, task: str) -> bool:
        return (not self.formats or fmt in self.formats) and (not self.tasks or task in self.tasks)

    def recipe(self) -> Recipe:
        """The recipe as events and variant ids carry it (without the planning filters)."""
        return Recipe(name=self.name, passes=self.passes)


class DeviceProfile(_Strict):
    name: Token = Field(description="The device class, e.g. x86-avx512-vnni.")
    description: str
    cpu: Cpu
    execution_providers: list[str] = Field(min_length=1, description="ONNX Runtime EPs, in order.")
    latency_measurable_on_host: bool = Field(
        description="True only for host-like CPU classes; others are judged by canary gates."
    )
    ram_mb: int = Field(gt=0, description="Device memory, in MB.")
    storage_mb: int = Field(gt=0, description="Space for models, in MB.")
    precisions: list[Precision] = Field(min_length=1, description="Weight precisions it runs.")
    opset_min: int = Field(ge=7, description="Lowest ONNX opset its runtime supports.")
    opset_max: int = Field(ge=7, description="Highest ONNX opset its runtime supports.")
    unsupported_operators: list[str] = Field(
        default_factory=list, description="ONNX op types its EP cannot run (e.g. MatMulNBits)."
    )
    requires_static_qdq: bool = Field(
        False, description="NPU-style: only static QDQ INT8 graphs run on the accelerator."
    )
    budgets: Budgets
    quality: QualityFloors
    objective: Literal["smallest", "fastest"] = Field(
        "smallest", description="How the release picks among passing variants."
    )
    search: SearchBudget = Field(default_factory=SearchBudget)
    generation: GenerationLoad = Field(default_factory=GenerationLoad)
    recipes: Annotated[list[CandidateRecipe], Field(min_length=1)] = Field(
        description="Candidate recipes, in order of preference."
    )

    @model_validator(mode="after")
    def _consistent(self) -> DeviceProfile:
        problems = []
        if self.opset_min > self.opset_max:
            problems.append(f"opset_min {self.opset_min} > opset_max {self.opset_max}")
        if self.budgets.max_size_mb > self.storage_mb:
            problems.append(
                f"budgets.max_size_mb {self.budgets.max_size_mb} exceeds storage_mb "
                f"{self.storage_mb}"
            )
        if self.budgets.max_peak_memory_mb > self.ram_mb:
            problems.append(
                f"budgets.max_peak_memory_mb {self.budgets.max_peak_memory_mb} exceeds ram_mb "
                f"{self.ram_mb}"
            )
        names = [r.name for r in self.recipes]
        if duplicates := sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"recipe names repeat: {', '.join(duplicates)}")
        if self.requires_static_qdq and "int8" not in self.precisions:
            problems.append("requires_static_qdq needs int8 among precisions")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def candidates(self, fmt: str, task: str) -> list[CandidateRecipe]:
        """The recipes to try on a source of this format and task, in order of preference."""
        return [r for r in self.recipes if r.applies_to(fmt, task)]


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and every problem."""


def load_profile(path: Path) -> DeviceProfile:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ProfileError(f"{path}: cannot read YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: expected a mapping at the top level")
    try:
        profile = DeviceProfile.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<profile>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ProfileError(f"{path}: {problems}") from exc
    if profile.name != path.stem:
        raise ProfileError(f"{path}: name {profile.name!r} must match the file name")
    return profile


def load_profiles(directory: Path) -> dict[str, DeviceProfile]:
    """Every ``*.yaml`` profile in ``directory``, by class name; all errors reported at once."""
    profiles: dict[str, DeviceProfile] = {}
    errors: list[str] = []
    for path in sorted(directory.glob("*.yaml")):
        try:
            profile = load_profile(path)
        except ProfileError as exc:
            errors.append(str(exc))
            continue
        profiles[profile.name] = profile
    if errors:
        raise ProfileError("invalid device profiles:\n" + "\n".join(errors))
    if not profiles:
        raise ProfileError(f"no device profiles (*.yaml) in {directory}")
    return profiles
