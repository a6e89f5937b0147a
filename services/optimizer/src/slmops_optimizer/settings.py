"""optimizer settings: env prefix ``SLMOPS_OPTIMIZER_`` (platform-wide ones are ``SLMOPS_*``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from slmops.settings import ServiceSettings


class OptimizerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SLMOPS_OPTIMIZER_", extra="ignore")

    port: int = Field(8102, ge=0, le=65535, description="Port of the optimizer HTTP API.")
