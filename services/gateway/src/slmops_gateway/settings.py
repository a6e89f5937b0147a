"""gateway settings: env prefix ``SLMOPS_GATEWAY_`` (platform-wide ones are ``SLMOPS_*``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from slmops.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SLMOPS_GATEWAY_", extra="ignore")

    port: int = Field(8105, ge=0, le=65535, description="Port of the gateway HTTP API.")

    gateway_id: str = Field(
        "local-gw-1",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$",
        description="This gateway's id: its assignment subject and its reports carry it.",
    )
    device_class: str = Field("x86-avx512-vnni", description="The device class it declares.")
