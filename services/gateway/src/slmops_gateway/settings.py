"""gateway settings: env prefix ``SLMOPS_GATEWAY_`` (platform-wide ones are ``SLMOPS_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
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
    cohort_protocol: bool = Field(
        True,
        description="Follow its cohort's desired state (slmops.cohorts) besides its own "
        "assignments; False: own assignments only, as gateways before the cohort protocol.",
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description='Labels it declares, JSON (e.g. {"site": "berlin"}).'
    )
    site: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$",
        description="The site it was enrolled at (`slmops auth enroll --site`): its wave reports "
        "go through that site's relay (slmops_gateway.relay) while one answers, and its labels "
        "name the site. Unset: it publishes every report itself.",
    )
    relay_timeout_s: float = Field(
        2.0, gt=0, description="How long it waits for its site's relay, in seconds (then it "
        "publishes the report itself).",
    )  # fmt: skip
    registry_url: str = Field(
        "http://127.0.0.1:8101", description="Registry HTTP API: manifests, reports, downloads."
    )
    models_dir: Path | None = Field(
        None, description="Verified model files (unset: <var_dir>/gateway/<gateway_id>)."
    )
    intra_op_threads: int = Field(1, ge=1, le=64, description="ONNX Runtime threads per session.")
    max_input_tokens: int = Field(
        256, ge=1,
        description="Longest encoder input served, in tokens (longer ones are cut); decoders "
        "take prompts up to their context length unless an assignment's overlay sets it.",
    )  # fmt: skip
    shadow_sample_rate: float = Field(
        0.1, ge=0, le=1,
        description="Share of requests also run on the previous model after a rollout's "
        "install, to report shadow agreement (0: never).",
    )  # fmt: skip
    shadow_tokens: int = Field(
        16, ge=1, le=256,
        description="Decoders: leading greedy tokens of the previous and the new model compared "
        "per shadowed request (agreement: identical leading tokens / this).",
    )  # fmt: skip
    max_concurrent_generations: int = Field(
        2, ge=1, le=64,
        description="Generations (and embedding requests) running at once, each in its own "
        "thread with its own KV cache; more wait for a turn.",
    )  # fmt: skip
    queue_timeout_s: float = Field(
        30.0, ge=0,
        description="How long a request waits for a turn when max_concurrent_generations are "
        "running, in seconds; then 503.",
    )  # fmt: skip
    api_key: SecretStr | None = Field(
        None,
        description="If set, the OpenAI-compatible routes (/v1/chat/completions, /v1/completions, "
        "/v1/embeddings, /v1/models) require `Authorization: Bearer <key>`; unset or empty: they "
        "answer local callers without credentials.",
    )
    health_interval_s: float = Field(
        30.0, gt=0, description="How often it reports health aggregates, in seconds."
    )
    trust_root_file: Path | None = Field(
        None,
        description="The pinned TUF root.json it was enrolled with: the only source of the keys "
        "it believes (unset: none; allowed with SLMOPS_ENV=local only, where the registry's key "
        "is then taken on first use).",
    )
    trust_refresh_s: float = Field(
        60.0, gt=0, description="How often the trust root's keys are refreshed, in seconds."
    )

    @model_validator(mode="after")
    def _site_in_labels(self) -> GatewaySettings:
        """The services take a site's batch only for gateways whose labels name the site."""
        if self.site is None:
            return self
        declared = self.labels.get("site")
        if declared not in (None, self.site):
            raise ValueError(f"SLMOPS_GATEWAY_SITE={self.site!r} but its labels name site "
                             f"{declared!r}")  # fmt: skip
        self.labels = {**self.labels, "site": self.site}
        return self

    @model_validator(mode="after")
    def _require_trust_root(self) -> GatewaySettings:
        if self.trust_root_file is None and self.platform.env != "local":
            raise ValueError(
                f"SLMOPS_GATEWAY_TRUST_ROOT_FILE is unset but SLMOPS_ENV={self.platform.env!r}: "
                "a gateway believes only keys its pinned trust root vouches for (give it the "
                "root.json of `slmops auth enroll`)"
            )
        return self

    @property
    def model_dir(self) -> Path:
        return self.models_dir or self.platform.var_dir / "gateway" / self.gateway_id
