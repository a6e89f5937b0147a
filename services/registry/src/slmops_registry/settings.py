"""registry settings: env prefix ``SLMOPS_REGISTRY_`` (platform-wide ones are ``SLMOPS_*``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from slmops.settings import ServiceSettings


class RegistrySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SLMOPS_REGISTRY_", extra="ignore")

    port: int = Field(8101, ge=0, le=65535, description="Port of the registry HTTP API.")
