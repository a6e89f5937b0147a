"""telemetry settings: env prefix ``SLMOPS_TELEMETRY_`` (platform-wide ones are ``SLMOPS_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from slmops.settings import ConsumerSettings, ServiceSettings
from slmops_telemetry.detect import DetectionSettings

_REPO_PROFILES = Path(__file__).resolve().parents[4] / "deploy" / "profiles"


def _consumer() -> ConsumerSettings:
    # Health reports arrive at ~fleet size / 30 s (3,300/s at 100,000 gateways) and each is a
    # cheap fold: a batch is one pull of thousands and one handler call.
    return ConsumerSettings(fetch_batch=5000, max_concurrency=1)


class TelemetrySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SLMOPS_TELEMETRY_", extra="ignore")

    consumer: ConsumerSettings = Field(
        default_factory=_consumer,
        description="Its consumer: batches of up to 5000 health reports, folded at once.",
    )
    port: int = Field(8107, ge=0, le=65535, description="Port of the telemetry HTTP API.")
    registry_url: str = Field(
        "http://127.0.0.1:8101",
        description="Registry HTTP API: the variants and validation reports a class's field "
        "figures are compared with.",
    )
    profiles_dir: Path = Field(
        _REPO_PROFILES, description="Folder of device-class profiles (*.yaml): the budgets."
    )
    window_s: float = Field(
        30.0,
        gt=0,
        description="Length of one window of the view, in seconds: the gateways' reporting "
        "interval (their health_interval_s).",
    )
    keep_windows: int = Field(
        20, ge=2, le=10_000, description="Windows kept per variant, class and label set."
    )
    max_ack_pending: int = Field(
        50_000,
        ge=1,
        description="Reports delivered and not yet acked at most (a few fetch batches).",
    )
    measured_interval_s: float = Field(
        300.0,
        gt=0,
        description="How often the device-measured figures of each (variant, class) with "
        "reports in that span are published as fleet.measured, in seconds (10 windows of 30 s).",
    )
    # What makes a finding: slmops_telemetry.detect.DetectionSettings, field by field.
    windows_required: int = Field(
        2,
        ge=1,
        description="Consecutive complete windows a class's field figure must break its budget "
        "in for a fleet.regression.detected (default: two reporting intervals).",
    )
    min_requests_per_window: int = Field(
        20, ge=1, description="A window with fewer requests is not judged (too noisy)."
    )
    max_error_rate: float = Field(
        0.05, ge=0, le=1, description="Error rate a class may have in the field."
    )
    embedding_shift_threshold: float = Field(
        0.5,
        gt=0,
        description="Standardized mean shift of the served embeddings against the validation "
        "baseline that is drift.",
    )
    logprob_psi_threshold: float = Field(
        0.25,
        gt=0,
        description="Population stability index of the served tokens' log-probabilities "
        "against the validation baseline that is drift.",
    )
    min_drift_embeddings: int = Field(
        200, ge=2, description="Fewer embeddings served: embedding drift is not judged."
    )
    min_drift_tokens: int = Field(
        2000, ge=1, description="Fewer tokens generated: log-probability drift is not judged."
    )
    drift_windows: int = Field(
        2, ge=1, description="Newest windows merged into the signature judged for drift."
    )
    label_sets: bool = Field(
        False,
        description="Also judge each label set of a class on its own (more findings, and more "
        "chances of a false one).",
    )

    def detection(self) -> DetectionSettings:
        """The detection settings these name (each field of DetectionSettings, by name)."""
        return DetectionSettings(**{name: getattr(self, name)
                                    for name in DetectionSettings.model_fields})  # fmt: skip
