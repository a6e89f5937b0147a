"""validator settings: env prefix ``SLMOPS_VALIDATOR_`` (platform-wide ones are ``SLMOPS_*``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from slmops.settings import ServiceSettings


class ValidatorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SLMOPS_VALIDATOR_", extra="ignore")

    port: int = Field(8103, ge=0, le=65535, description="Port of the validator HTTP API.")
