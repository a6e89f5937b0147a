"""optimizer settings: env prefix ``SLMOPS_OPTIMIZER_`` (platform-wide ones are ``SLMOPS_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from slmops.settings import ServiceSettings

_REPO_PROFILES = Path(__file__).resolve().parents[4] / "deploy" / "profiles"


class OptimizerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SLMOPS_OPTIMIZER_", extra="ignore")

    port: int = Field(8102, ge=0, le=65535, description="Port of the optimizer HTTP API.")
    profiles_dir: Path = Field(
        _REPO_PROFILES, description="Folder of device-class profiles (*.yaml) to plan jobs from."
    )
    registry_url: str = Field(
        "http://127.0.0.1:8101", description="Registry HTTP API that stores the variants."
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster to attach to (e.g. ray://head:10001); unset: start Ray "
        "in-process on 127.0.0.1.",
    )
    ray_mode: Literal["cluster", "rayservice", "local-testing"] = Field(
        "cluster",
        description="'cluster': real Ray Serve (in-process, or attached at ray_address), "
        "deployed by this service; 'rayservice': attach at ray_address to the app a KubeRay "
        "RayService deployed (import path slmops_optimizer.compute:build_app); "
        "'local-testing': Serve's in-process testing mode, no Ray processes (quick tests only).",
    )
    ray_num_cpus: float | None = Field(
        None, gt=0, description="CPUs the in-process Ray may use (unset: all of them)."
    )
    replica_num_cpus: float = Field(
        0.5, gt=0, description="CPUs reserved per Serve replica: fractional so 2 cores scale."
    )
    min_replicas: int = Field(1, ge=0, description="Fewest compute replicas (0: scale to zero).")
    max_replicas: int = Field(2, ge=1, description="Most compute replicas the autoscaler runs.")
    jobs_per_replica: int = Field(
        1, ge=1, le=8, description="Jobs one replica runs at once (max_ongoing_requests)."
    )
    max_concurrent_jobs: int = Field(
        2, ge=1, description="Jobs in flight from this service (bounds the fan-out)."
    )
    job_threads: int = Field(2, ge=1, le=64, description="ONNX Runtime threads within one job.")
    job_timeout_s: float = Field(3600, gt=0, description="A job running longer fails.")
    replica_silence_s: float = Field(
        60, ge=5, description="A replica silent this long once a job runs on it is lost: the job "
        "is retried (a running job sends a heartbeat every 2 s; a queued one: job_timeout_s)."
    )  # fmt: skip
    max_source_size_mb: float = Field(
        4096, gt=0, description="Published models larger than this fail at once."
    )
    work_dir: Path | None = Field(
        None, description="Replica scratch and caches (unset: <var_dir>/optimizer)."
    )
    ray_temp_dir: Path | None = Field(
        None,
        description="Session files of an in-process Ray (unset: <var_dir>/ray); keep the path "
        "short, Ray's socket paths must stay under 108 characters.",
    )
    ray_start_timeout_s: float = Field(120, gt=0, description="Wait for Ray Serve at start-up.")
    reoptimize_max_candidates: int = Field(
        3, ge=1, le=16,
        description="Most candidate recipes a field regression's re-optimization runs.",
    )  # fmt: skip
    reoptimize_cooldown_s: float = Field(
        3600, ge=0,
        description="After a re-optimization of a model for a device class is decided (its "
        "proposal released or failed), findings for that class wait this long.",
    )  # fmt: skip
    reoptimize_open_max_s: float = Field(
        86400, gt=0,
        description="An open re-optimization nothing closed (its proposal lost) is given up "
        "after this long, so the next finding for the class is not ignored forever.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _replicas(self) -> OptimizerSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})"
            )
        if self.ray_mode == "rayservice" and not self.ray_address:
            raise ValueError(
                "ray_mode 'rayservice' attaches to the RayService's cluster: set "
                "SLMOPS_OPTIMIZER_RAY_ADDRESS (e.g. ray://slmops-ray-head-svc:10001)"
            )
        return self

    @property
    def scratch_dir(self) -> Path:
        return self.work_dir or self.platform.var_dir / "optimizer"
