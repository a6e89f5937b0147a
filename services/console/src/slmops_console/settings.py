"""console settings: env prefix ``SLMOPS_CONSOLE_`` (platform-wide ones are ``SLMOPS_*``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from slmops.settings import ServiceSettings


class ConsoleSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SLMOPS_CONSOLE_", extra="ignore")

    port: int = Field(8106, ge=0, le=65535, description="Port of the console (HTTP).")
    registry_url: str = Field("http://127.0.0.1:8101", description="Registry HTTP API.")
    optimizer_url: str = Field("http://127.0.0.1:8102", description="Optimizer HTTP API.")
    validator_url: str = Field("http://127.0.0.1:8103", description="Validator HTTP API.")
    rollout_url: str = Field("http://127.0.0.1:8104", description="Rollout HTTP API.")
    telemetry_url: str = Field(
        "http://127.0.0.1:8107",
        description="Telemetry HTTP API (the fleet's field figures); empty: not configured, "
        "the pages say so.",
    )
    upstream_timeout_s: float = Field(
        10.0, gt=0, description="How long a page waits for one API answer, in seconds."
    )
    page_size: int = Field(100, ge=10, le=1000, description="Gateways per fleet page.")
    cookie_secure: bool = Field(
        True,
        description="Mark the session cookie Secure (browsers keep Secure cookies for "
        "http://127.0.0.1 and localhost; serve the console behind TLS anywhere else).",
    )
    live_interval_s: float = Field(
        0.25, gt=0, description="At most one live update per page this often, in seconds."
    )
    live_refresh_s: float = Field(
        5.0, gt=0, description="A live page is re-rendered at least this often, in seconds."
    )
