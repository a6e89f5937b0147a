"""Typed ``data`` of every core event type (v1). The SDK owns these; services only import them.

Weights never travel in events: artifacts are referenced by digest, size and URI. Fields may be
added (consumers ignore unknown ones); removing or retyping a field, or adding a required one,
is an incompatible change that needs a new ``.v2`` type (the contract test enforces this).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slmops.events.envelope import EventPayload
from slmops.telemetry.drift import DriftSignature
from slmops.telemetry.sketch import LogHistogram

Digest = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$", description="sha256:<hex>")]
#: Names that also appear in NATS subjects and object keys: no dots, slashes or spaces.
Token = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")]
ModelName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,127}$")]
Version = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")]
ModelFormat = Literal["onnx", "hf-safetensors", "gguf"]
Task = Literal["feature-extraction", "text-generation", "text-classification"]
#: How token embeddings become one vector per text: masked mean, the first token, or none (the
#: chosen output is already one vector per text).
Pooling = Literal["mean", "cls", "none"]


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ArtifactRef(_Part):
    """A blob in the object store."""

    digest: Digest
    size_bytes: int = Field(ge=0)
    uri: str = Field(description="Where to fetch it, e.g. s3://bucket/blobs/sha256/<hex>.")
    media_type: str = "application/octet-stream"


class PassSpec(_Part):
    """One optimization pass of a recipe: its registered name and its config."""

    name: str
    config: dict[str, object] = Field(default_factory=dict)


class Recipe(_Part):
    name: str
    passes: list[PassSpec]


class GateResult(_Part):
    """One judged figure of a validation report."""

    name: str
    value: float | None = Field(None, description="Measured value; null when not measurable here.")
    budget: float | None = None
    unit: str = ""
    bound: Literal["max", "min"] | None = Field(
        None, description="max: the value may not exceed the budget; min: nor fall below it."
    )
    passed: bool | None = Field(
        None, description="null = not judged on this host (left to canary)."
    )
    detail: str = ""


class HealthAggregate(_Part):
    """What a gateway reports about its local inference - aggregates only, never data."""

    window_s: float = Field(gt=0)
    request_count: int = Field(ge=0)
    error_rate: float = Field(ge=0, le=1)
    latency_p50_ms: float | None = Field(None, ge=0)
    latency_p95_ms: float | None = Field(None, ge=0)
    shadow_agreement: float | None = Field(None, ge=0, le=1)
    shadow_samples: int = Field(0, ge=0)
    ttft_p50_ms: float | None = Field(
        None, ge=0, description="Generation: time to the first streamed token, median."
    )
    ttft_p95_ms: float | None = Field(None, ge=0)
    decode_tokens_per_s: float | None = Field(
        None, ge=0, description="Generation: tokens after the first, per second of decoding."
    )
    # Mergeable forms of the figures above (percentiles of two gateways cannot be combined;
    # these can): what the fleet view folds. Older gateways send none of them.
    latency_ms: LogHistogram | None = Field(None, description="Request latencies, bucketed.")
    ttft_ms: LogHistogram | None = Field(None, description="Times to first token, bucketed.")
    decode_tokens: int = Field(0, ge=0, description="Tokens after the first, summed.")
    decode_s: float = Field(0.0, ge=0, description="Seconds spent decoding them, summed.")
    peak_memory_mb: float | None = Field(
        None, ge=0, description="Peak resident memory of the serving process so far."
    )
    drift: DriftSignature | None = Field(
        None, description="A bounded sketch of what was served (never the inputs themselves)."
    )


# --- pipeline -------------------------------------------------------------------------------


class FieldEvidence(_Part):
    """What the field measured of a variant that a re-optimization must beat: carried from a
    ``fleet.regression.detected`` through the plan, the candidates and their judgement to the
    proposed release."""

    detection_id: Token
    device_class: Token
    variant_id: Token = Field(description="The variant the field measured (to be replaced).")
    metric: str = Field(description="The figure that broke its budget, e.g. latency_p95_ms.")
    bound: Literal["max", "min"]
    budget: float
    field_value: float = Field(description="What the gateways measured over the window.")
    host_value: float | None = Field(
        None, description="What the validator measured on its host; null = not measurable there."
    )


class ModelPublished(EventPayload):
    event_type = "slmops.model.published.v1"

    model_name: ModelName
    version: Version
    format: ModelFormat
    task: Task
    artifact: ArtifactRef
    manifest_digest: Digest | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    device_classes: list[Token] = Field(default_factory=list, description="Empty = all classes.")
    eval_set: ArtifactRef | None = None
    embedding_output: str | None = Field(
        None,
        description="Encoders: the graph output holding the embeddings, as the publisher named "
        "it; null = chosen by shape and name.",
    )
    pooling: Pooling | None = Field(
        None, description="Encoders: how that output becomes one vector per text; null = by shape."
    )


class ModelRejected(EventPayload):
    """The registry could not record a published model (e.g. its blob is missing)."""

    event_type = "slmops.model.rejected.v1"

    model_name: ModelName
    version: Version
    reason: str
    rejected_event_id: str = Field(description="Id of the model.published event rejected.")
    artifact_digest: Digest | None = None


class PlannedJob(_Part):
    variant_id: Token
    device_class: Token
    recipe_name: str


class OptimizationPlanned(EventPayload):
    """The jobs the optimizer runs for a model version: one per (device class, candidate
    recipe). Each ends in exactly one ``optimization.completed`` or ``optimization.failed``,
    so a consumer knows when every candidate of a version has been accounted for."""

    event_type = "slmops.optimization.planned.v1"

    model_name: ModelName
    version: Version
    parent_digest: Digest
    jobs: list[PlannedJob]
    skipped: dict[str, str] = Field(
        default_factory=dict, description="Device classes with no job, and why."
    )
    release_id: Token | None = Field(
        None, description="The release these jobs decide; null = the version's own release."
    )
    field: FieldEvidence | None = Field(
        None, description="A re-optimization: the field evidence its candidates must beat."
    )


class OptimizationCompleted(EventPayload):
    event_type = "slmops.optimization.completed.v1"

    model_name: ModelName
    version: Version
    variant_id: Token
    device_class: Token
    parent_digest: Digest
    recipe: Recipe
    artifact: ArtifactRef
    manifest_digest: Digest | None = None
    duration_s: float = Field(ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)
    reference: ArtifactRef | None = Field(
        None,
        description="The fp32 ONNX model the variant was derived from (the converted source): "
        "the baseline the validator judges parity and latency against.",
    )
    release_id: Token | None = Field(
        None, description="The release this candidate is for; null = the version's own."
    )
    field: FieldEvidence | None = Field(
        None, description="A re-optimization candidate: judged against the field's figures too."
    )


class OptimizationFailed(EventPayload):
    event_type = "slmops.optimization.failed.v1"

    model_name: ModelName
    version: Version
    device_class: Token | None = None
    recipe_name: str | None = None
    variant_id: Token | None = None
    reason: str
    release_id: Token | None = Field(
        None, description="The release this candidate was for; null = the version's own."
    )


class _ValidationOutcome(EventPayload):
    model_name: ModelName
    version: Version
    variant_id: Token
    device_class: Token
    report: ArtifactRef | None = None
    gates: list[GateResult] = Field(default_factory=list)


class ValidationPassed(_ValidationOutcome):
    event_type = "slmops.validation.passed.v1"


class ValidationFailed(_ValidationOutcome):
    event_type = "slmops.validation.failed.v1"

    reason: str


class ReleaseEntry(_Part):
    device_class: Token
    variant_id: Token | None = Field(None, description="null: the class has no passing variant.")
    artifact: ArtifactRef | None = None
    manifest_digest: Digest | None = None
    reason: str = Field("", description="Why this variant was chosen, or why there is none.")


class ReleaseCreated(EventPayload):
    event_type = "slmops.release.created.v1"

    release_id: Token
    model_name: ModelName
    version: Version
    entries: list[ReleaseEntry]
    proposal: FieldEvidence | None = Field(
        None,
        description="A release proposed from field evidence (a re-optimization of one class): "
        "it rolls out when an operator approves it, or by policy.",
    )


class ReleaseFailed(EventPayload):
    """Every candidate of a version was judged and no device class has a variant to ship: not a
    release. ``entries`` say, per class, why there is none."""

    event_type = "slmops.release.failed.v1"

    release_id: Token
    model_name: ModelName
    version: Version
    entries: list[ReleaseEntry]
    proposal: FieldEvidence | None = Field(
        None, description="A re-optimization that found no candidate meeting the field budget."
    )


class ChannelMoved(EventPayload):
    """A channel (``stable``, ``canary`` or custom) of a model for one device class now points
    at a variant - moved by an operator through the registry API."""

    event_type = "slmops.channel.moved.v1"

    model_name: ModelName
    device_class: Token
    channel: Token
    version: Version
    variant_id: Token
    reason: str = ""
    moved_by: str = Field(description="Who moved it: 'api', a user, a service.")


# --- rollout --------------------------------------------------------------------------------


class WavePlan(_Part):
    index: int = Field(ge=0)
    percent: float = Field(gt=0, le=100)
    target_count: int = Field(ge=0)


class RolloutStarted(EventPayload):
    event_type = "slmops.rollout.started.v1"

    rollout_id: Token
    release_id: Token
    model_name: ModelName
    version: Version
    waves: list[WavePlan]
    selector: dict[str, str] = Field(default_factory=dict)


class RolloutWaveStarted(EventPayload):
    event_type = "slmops.rollout.wave.started.v1"

    rollout_id: Token
    wave_index: int = Field(ge=0)
    target_count: int = Field(ge=0)


class RolloutPaused(EventPayload):
    event_type = "slmops.rollout.paused.v1"

    rollout_id: Token
    wave_index: int = Field(ge=0)
    reason: str


class RolloutResumed(EventPayload):
    event_type = "slmops.rollout.resumed.v1"

    rollout_id: Token
    wave_index: int = Field(ge=0)


class RolloutCompleted(EventPayload):
    event_type = "slmops.rollout.completed.v1"

    rollout_id: Token
    gateways_updated: int = Field(ge=0)
    gateways_failed: int = Field(ge=0)
    gateways_silent: int = Field(0, ge=0)


class RolloutRolledBack(EventPayload):
    event_type = "slmops.rollout.rolled_back.v1"

    rollout_id: Token
    scope: Literal["gateways", "fleet"]
    reason: str
    to_variant_id: Token | None = None
    gateway_ids: list[Token] = Field(default_factory=list)


# --- gateways -------------------------------------------------------------------------------


class DesiredModel(_Part):
    model_name: ModelName
    version: Version
    variant_id: Token
    manifest_digest: Digest
    artifact: ArtifactRef


class GatewayAssignment(EventPayload):
    """The desired state of one gateway; delivered on ``...assignment.v1.<gateway_id>``."""

    event_type = "slmops.gateway.assignment.v1"

    gateway_id: Token
    generation: int = Field(ge=0, description="Monotonic per gateway; older ones are ignored.")
    rollout_id: Token | None = None
    desired: DesiredModel
    rollback: bool = False
    signature: str | None = Field(None, description="Ed25519 signature of a rollback, base64.")
    signature_expires_at: int | None = Field(
        None, description="Unix seconds after which the rollback statement is refused."
    )
    overlay: dict[str, int] = Field(
        default_factory=dict,
        description="Local configuration chosen by label selectors, applied by the agent: "
        "intra_op_threads, max_input_tokens.",
    )
    statement_signature: str | None = Field(
        None,
        description="Ed25519 signature (base64) of the assignment statement "
        "(slmops.assignments): gateway, generation, rollout, rollback, model, version, variant, "
        "digests, overlay, expiry; by the rollout service's assignments key.",
    )
    statement_key_id: str | None = Field(None, description="The key that signed the statement.")
    statement_expires_at: int | None = Field(
        None, description="Unix seconds after which the statement is refused."
    )

    def subject_suffix(self) -> str | None:
        return self.gateway_id


class GatewayReport(EventPayload):
    """From one gateway: registration, an assignment acknowledged (received, being installed),
    applied/failed, or periodic health aggregates."""

    event_type = "slmops.gateway.report.v1"

    gateway_id: Token
    kind: Literal["registered", "acknowledged", "applied", "failed", "health"]
    device_class: Token
    labels: dict[str, str] = Field(default_factory=dict)
    capabilities: dict[str, object] = Field(default_factory=dict)
    rollout_id: Token | None = None
    variant_id: Token | None = None
    generation: int | None = None
    reason: str = ""
    health: HealthAggregate | None = None
    model_name: ModelName | None = Field(
        None,
        description="What the report is about, when "
        "the gateway runs a model: its name and version.",
    )
    version: Version | None = None

    def subject_suffix(self) -> str | None:
        # ``<kind>.<gateway>``: a consumer that needs only some kinds (the registry's lineage:
        # applied and failed) filters on the server instead of decoding every report.
        return f"{self.kind}.{self.gateway_id}"


#: Report kinds a batch may carry: what a wave moves (registrations and health keep their own
#: subjects and consumers).
BATCHED_REPORT_KINDS = ("acknowledged", "applied", "failed")
MAX_BATCHED_REPORTS = 2000  # ~1 MB of reports at most: NATS's default message size limit


class GatewayReports(EventPayload):
    """Many gateways' wave reports (acknowledged, applied, failed) in one event, from a
    publisher that speaks for a site's gateways: one stored message per batch instead of one
    per report, which is what a wave to a large fleet costs most. Consumers fold each report
    as if its gateway had sent it (``slmops.events.reports.each_report``). A gateway can
    never publish one: its permission names only its own report subjects."""

    event_type = "slmops.gateway.reports.v1"

    site: Token = Field(description="Who folded these reports (a site, or a fleet simulator).")
    batch: Token = Field(description="Unique per batch of the site: its own subject.")
    reports: list[GatewayReport] = Field(min_length=1, max_length=MAX_BATCHED_REPORTS)

    @model_validator(mode="after")
    def _wave_reports_only(self) -> GatewayReports:
        others = sorted({r.kind for r in self.reports} - set(BATCHED_REPORT_KINDS))
        if others:
            raise ValueError(f"only {', '.join(BATCHED_REPORT_KINDS)} reports are batched, "
                             f"not {', '.join(others)}")  # fmt: skip
        return self

    def subject_suffix(self) -> str | None:
        # a subject per batch: the fleet stream keeps 100 messages per subject, and a site's
        # batches must not push each other out before they are folded
        return f"{self.site}.{self.batch}"


# --- the field loop -------------------------------------------------------------------------


class FieldWindow(_Part):
    """One reporting window of a (variant, class, label set) as the fleet view folded it."""

    start: datetime
    window_s: float = Field(gt=0)
    gateways: int = Field(ge=0)
    requests: int = Field(ge=0)
    value: float | None = Field(None, description="The figure judged, over this window.")


class FieldFigures(_Part):
    """A variant's figures on the devices of one class over a span, merged across gateways."""

    gateways: int = Field(ge=0)
    requests: int = Field(ge=0)
    error_rate: float = Field(ge=0, le=1)
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    decode_tokens_per_s: float | None = None
    peak_memory_mb: float | None = None


class _FleetFinding(EventPayload):
    detection_id: Token = Field(description="Deterministic: one per finding, however often seen.")
    model_name: ModelName
    version: Version
    variant_id: Token
    device_class: Token
    labels: dict[str, str] = Field(
        default_factory=dict, description="The label set it was found in; {} = the whole class."
    )
    windows: list[FieldWindow] = Field(description="The evidence, oldest first.")

    def subject_suffix(self) -> str | None:
        return self.device_class


class FleetRegressionDetected(_FleetFinding):
    """A class's field figure broke its budget for the configured number of windows."""

    event_type = "slmops.fleet.regression.detected.v1"

    metric: str = Field(description="latency_p95_ms, ttft_p95_ms, decode_tokens_per_s, ...")
    bound: Literal["max", "min"]
    budget: float
    field_value: float = Field(description="The figure over the whole evidence span.")
    host_value: float | None = Field(
        None, description="The validator's figure on its host; null = not measurable there."
    )

    def evidence(self) -> FieldEvidence:
        return FieldEvidence(detection_id=self.detection_id, device_class=self.device_class,
                             variant_id=self.variant_id, metric=self.metric, bound=self.bound,
                             budget=self.budget, field_value=self.field_value,
                             host_value=self.host_value)  # fmt: skip


class FleetDriftDetected(_FleetFinding):
    """What the gateways served moved away from what the variant was validated on."""

    event_type = "slmops.fleet.drift.detected.v1"

    signal: Literal["embedding", "logprobs"]
    score: float = Field(ge=0, description="embedding: standardized mean shift; logprobs: PSI.")
    threshold: float = Field(ge=0)
    field_samples: int = Field(ge=0, description="Embeddings or tokens behind the score.")
    baseline_samples: int = Field(ge=0)
    baseline_report: Digest | None = Field(
        None, description="The validation report the baseline signature comes from."
    )


class FleetMeasured(EventPayload):
    """Device-measured figures of a variant in one class, recorded against it in the lineage
    (the registry keeps them signed), so the next release for that class is chosen on them."""

    event_type = "slmops.fleet.measured.v1"

    model_name: ModelName
    version: Version
    variant_id: Token
    device_class: Token
    since: datetime
    until: datetime
    figures: FieldFigures
    gates: list[GateResult] = Field(
        default_factory=list, description="The figures against the class's budgets."
    )

    def subject_suffix(self) -> str | None:
        return self.device_class


# --- runtime --------------------------------------------------------------------------------


class DeadLetter(EventPayload):
    """A message a consumer could not handle, kept with the reason and the original bytes."""

    event_type = "slmops.deadletter.v1"

    consumer: str
    stream: str
    stream_seq: int = Field(ge=0)
    subject: str
    num_delivered: int = Field(ge=0)
    reason: str
    error_type: str
    original_headers: dict[str, str] = Field(default_factory=dict)
    original_data: str = Field(description="The original body: UTF-8 text, or base64.")
    original_encoding: Literal["utf-8", "base64"] = "utf-8"

    def subject_suffix(self) -> str | None:
        return self.consumer


CORE_EVENT_TYPES: tuple[type[EventPayload], ...] = (
    ModelPublished,
    ModelRejected,
    OptimizationPlanned,
    OptimizationCompleted,
    OptimizationFailed,
    ValidationPassed,
    ValidationFailed,
    ReleaseCreated,
    ReleaseFailed,
    ChannelMoved,
    RolloutStarted,
    RolloutWaveStarted,
    RolloutPaused,
    RolloutResumed,
    RolloutCompleted,
    RolloutRolledBack,
    GatewayAssignment,
    GatewayReport,
    GatewayReports,
    FleetRegressionDetected,
    FleetDriftDetected,
    FleetMeasured,
    DeadLetter,
)
