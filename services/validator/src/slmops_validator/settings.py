"""validator settings: env prefix ``SLMOPS_VALIDATOR_`` (platform-wide ones are ``SLMOPS_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from slmops.settings import ServiceSettings

_REPO_PROFILES = Path(__file__).resolve().parents[4] / "deploy" / "profiles"


class ValidatorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SLMOPS_VALIDATOR_", extra="ignore")

    port: int = Field(8103, ge=0, le=65535, description="Port of the validator HTTP API.")
    profiles_dir: Path = Field(
        _REPO_PROFILES, description="Folder of device-class profiles (*.yaml) to judge against."
    )
    registry_url: str = Field(
        "http://127.0.0.1:8101", description="Registry HTTP API that stores the reports."
    )
    work_dir: Path | None = Field(
        None, description="Downloaded models and the latency lock (unset: <var_dir>/validator)."
    )
    trust_root_file: Path | None = Field(
        None,
        description="The pinned TUF root.json whose keys verify variant manifests before they "
        "are judged (`slmops up` sets the local stack's; unset: the registry's key is taken on "
        "first use, allowed with SLMOPS_ENV=local only).",
    )

    @model_validator(mode="after")
    def _require_trust_root(self) -> ValidatorSettings:
        if self.trust_root_file is None and self.platform.env != "local":
            raise ValueError(
                f"SLMOPS_VALIDATOR_TRUST_ROOT_FILE is unset but SLMOPS_ENV={self.platform.env!r}:"
                " variant manifests are verified only with keys a pinned trust root vouches for"
            )
        return self

    max_concurrent_validations: int = Field(
        2, ge=1, description="Variants judged at once (their parity runs overlap; latency never)."
    )
    threads: int = Field(
        1, ge=1, le=64, description="ONNX Runtime intra-op threads, fixed for every measurement."
    )
    eval_max_examples: int = Field(
        96, ge=4, le=100_000, description="Texts (encoders) or windows (decoders) per parity run."
    )
    eval_max_tokens: int = Field(
        256, ge=8, le=8192, description="Longest encoder input, in tokens (longer: truncated)."
    )
    decoder_window_tokens: int = Field(
        64, ge=8, le=8192, description="Tokens per next-token window for decoder parity."
    )
    latency_warmup_runs: int = Field(5, ge=0, description="Runs per model before timing starts.")
    latency_runs: int = Field(
        40, ge=5, description="Timed runs per model (candidate and baseline interleaved)."
    )
    latency_max_rounds: int = Field(
        3,
        ge=1,
        le=10,
        description="Rounds of timed runs while a ratio to the fp32 reference is within noise of "
        "its budget (each round adds latency_runs, or generation_runs, pairs).",
    )
    generation_runs: int = Field(
        8, ge=2, description="Timed generations per model per round (decoders, interleaved)."
    )
    latency_tokens: int = Field(
        128, ge=1, le=8192, description="Input length of a latency run, in tokens (batch 1)."
    )
    probe_timeout_s: float = Field(
        900, gt=0, description="A load/memory/latency probe running longer fails the variant."
    )
    cache_max_mb: float = Field(
        8192, gt=0, description="Downloaded models kept on disk before the oldest are removed."
    )

    @model_validator(mode="after")
    def _windows_fit(self) -> ValidatorSettings:
        if self.decoder_window_tokens > self.eval_max_tokens:
            raise ValueError(
                f"decoder_window_tokens ({self.decoder_window_tokens}) exceeds eval_max_tokens "
                f"({self.eval_max_tokens}): a window must fit the longest input"
            )
        return self

    @property
    def scratch_dir(self) -> Path:
        return self.work_dir or self.platform.var_dir / "validator"
