"""What the service asks of a compute replica, and what it gets back (plain pydantic, so the
same models cross a Ray deployment handle, the job store in JetStream KV and the HTTP API)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from slmops.events.payloads import ArtifactRef, ModelFormat, Pooling, Recipe, Task
from slmops.profiles import ALL_PRECISIONS, Precision, QualityFloors, SearchBudget


class JobSpec(BaseModel):
    """One (device class x candidate recipe) job for one published model version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = Field(description="The variant id the job produces (deterministic).")
    model_name: str
    version: str
    device_class: str
    task: Task
    format: ModelFormat
    parent: ArtifactRef = Field(description="The published artifact (the variant's parent).")
    eval_set: ArtifactRef | None = Field(None, description="JSONL texts; None: built-in set.")
    recipe: Recipe
    floors: QualityFloors
    search: SearchBudget
    precisions: list[Precision] = Field(
        default_factory=lambda: list(ALL_PRECISIONS),
        description="Weight precisions the class runs: the search keeps no weight in fp32 "
        "where fp32 is not one of them.",
    )
    embedding_output: str | None = Field(
        None, description="Encoders: the output the publisher named; None = by shape and name."
    )
    pooling: Pooling | None = Field(None, description="Encoders: the publisher's pooling hint.")
    max_source_size_mb: float = Field(gt=0, description="Larger sources fail fast.")
    intra_op_threads: int = Field(1, ge=1, description="ONNX Runtime threads per job.")


class TrailEntry(BaseModel):
    """One candidate the accuracy-aware search measured."""

    model_config = ConfigDict(extra="forbid")

    attempt: int = Field(ge=1)
    change: str = Field(description="What differs from the previous attempt.")
    recipe: Recipe = Field(description="The recipe as actually run.")
    quality_metric: str = Field(description="cosine_mean (encoders) or top1_agreement.")
    quality: float
    floor: float | None
    size_mb: float
    meets_floor: bool


class JobResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str
    artifact_digest: str
    size_bytes: int = Field(ge=0)
    duration_s: float = Field(ge=0)
    effective_recipe: Recipe = Field(description="The recipe of the chosen candidate.")
    metrics: dict[str, float] = Field(default_factory=dict)
    reference: ArtifactRef | None = Field(
        None, description="The stored fp32 conversion: the validator's baseline."
    )
    trail: list[TrailEntry] = Field(default_factory=list)
    log: list[str] = Field(default_factory=list)
    details: dict[str, Any] = Field(
        default_factory=dict,
        description="What the passes report for the manifest (gguf_blocks: tensor_map, per GGUF "
        "tensor its block type, form and max error).",
    )


JobState = Literal["queued", "running", "succeeded", "reused", "failed", "cancelled"]
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "reused", "failed", "cancelled"})


class JobRecord(BaseModel):
    """A job as the API lists it (kept in the ``slmops-jobs`` KV bucket)."""

    model_config = ConfigDict(extra="ignore")

    job_id: str
    model_name: str
    version: str
    device_class: str
    recipe_name: str
    state: JobState = "queued"
    progress: float = Field(0.0, ge=0, le=1, description="Share of the job's steps done.")
    step: str = Field("", description="What the job is doing now.")
    created_at: datetime
    updated_at: datetime
    error: str = ""
    cancel_requested: bool = False
    result_digest: str | None = None
    size_bytes: int | None = None
    duration_s: float | None = None
