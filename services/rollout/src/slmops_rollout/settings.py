"""rollout settings: env prefix ``SLMOPS_ROLLOUT_`` (platform-wide ones are ``SLMOPS_*``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from slmops.settings import ConsumerSettings, ServiceSettings


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
    registry_url: str = Field(
        "http://127.0.0.1:8101", description="Registry HTTP API that signs rollbacks."
    )
    tick_s: float = Field(1.0, gt=0, description="How often running rollouts are moved on, in s.")
