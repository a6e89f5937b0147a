"""rollout settings: env prefix ``SLMOPS_ROLLOUT_`` (platform-wide ones are ``SLMOPS_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from slmops.assignments import AssignmentSigner
from slmops.secretfiles import ensure_ed25519_key
from slmops.settings import ConsumerSettings, ServiceSettings
from slmops.trust.local import LOCAL_ASSIGNMENT_KEY_RELPATH


def _consumer() -> ConsumerSettings:
    # A wave's reports arrive in bursts of thousands; each handler waits for a group commit
    # (``store.py``), so many run at once and share few KV writes.
    return ConsumerSettings(max_concurrency=1000, fetch_batch=1000)


class RolloutSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SLMOPS_ROLLOUT_", extra="ignore")

    consumer: ConsumerSettings = Field(
        default_factory=_consumer,
        description="Its consumer: 1000 handlers at once (reports share group commits).",
    )
    port: int = Field(8104, ge=0, le=65535, description="Port of the rollout HTTP API.")
    auto_models: list[str] = Field(
        default_factory=list,
        description="Models rolled out to the whole fleet as soon as a release is created, JSON "
        '(e.g. ["minilm"]; ["*"]: every model); with no gateway of its classes registered yet, '
        "the rollout waits (status waiting) and starts once one registers. Others start "
        "through the API.",
    )
    auto_field_releases: bool = Field(
        False,
        description="Releases proposed from field evidence (a re-optimization of one class "
        "after a regression) roll out at once, to that class's gateways running the model; "
        "off: they wait for an operator's approval (`slmops rollout approve RELEASE_ID`). "
        "auto_models never applies to them.",
    )
    registry_url: str = Field(
        "http://127.0.0.1:8101", description="Registry HTTP API that signs rollbacks."
    )
    tick_s: float = Field(1.0, gt=0, description="How often running rollouts are moved on, in s.")
    report_batch: int = Field(
        5000,
        ge=1,
        le=10_000,
        description="Most gateway reports folded in one batch (one write per changed record).",
    )
    assignment_key_file: Path | None = Field(
        None,
        description="Ed25519 private key (PKCS8 PEM) that signs assignment statements, the trust "
        "root's `assignments` role (unset: with SLMOPS_ENV=local, <var_dir>/rollout/"
        "assignment-key.pem, made by `slmops up`; elsewhere startup fails).",
    )
    assignment_ttl_s: float = Field(
        30 * 86_400, gt=0,
        description="How long a signed assignment statement holds, in seconds.",
    )  # fmt: skip

    def assignment_signer(self) -> AssignmentSigner:
        """The statement signer: the configured key, or the local stack's."""
        path = self.assignment_key_file
        if path is None:
            if self.platform.env != "local":
                raise ValueError(
                    f"SLMOPS_ROLLOUT_ASSIGNMENT_KEY_FILE is unset but SLMOPS_ENV="
                    f"{self.platform.env!r}: gateways accept only signed assignments"
                )
            return AssignmentSigner(
                ensure_ed25519_key(self.platform.var_dir / LOCAL_ASSIGNMENT_KEY_RELPATH),
                self.assignment_ttl_s,
            )
        return AssignmentSigner.from_file(path, self.assignment_ttl_s)
