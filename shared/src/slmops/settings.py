"""Settings every slmops process shares, read from ``SLMOPS_*`` environment variables.

Each service adds its own settings class (see :class:`ServiceSettings`) with its own env prefix
(``SLMOPS_REGISTRY_``, ...); the platform-wide part (where NATS and the object store are) is one
:class:`PlatformSettings` so the local stack and deployments set it once for every service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Credentials of the embedded local S3 server. Safe only because that server binds 127.0.0.1;
#: outside ``SLMOPS_ENV=local`` they are refused (see ``PlatformSettings``).
LOCAL_S3_ACCESS_KEY = "slmops-local"
LOCAL_S3_SECRET_KEY = "slmops-local-secret"  # noqa: S105 - a documented local-only default
_PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "minioadmin", "secret", LOCAL_S3_SECRET_KEY}


class AuthSettings(BaseSettings):
    """How a process proves who it is and checks who calls it. Env prefix ``SLMOPS_AUTH_``."""

    model_config = SettingsConfigDict(env_prefix="SLMOPS_AUTH_", extra="ignore")

    keys_file: Path | None = Field(
        None,
        description="JWKS file of the public keys that verify bearer tokens (unset: the local "
        "stack's <var_dir>/auth/jwks.json).",
    )
    token_file: Path | None = Field(
        None,
        description="File holding this process's own bearer token, sent to the other services "
        "(unset: the CLI uses the local stack's admin token; the local stack sets one per "
        "service).",
    )
    issuer: str = Field("slmops", description="Expected `iss` of tokens.")
    audience: str = Field("slmops", description="Expected `aud` of tokens.")

    def token_path(self, var_dir: Path, local_name: str) -> Path:
        """``token_file``, else the local stack's token ``local_name`` under ``var_dir``."""
        return self.token_file or var_dir / "auth" / "tokens" / f"{local_name}.jwt"


class PlatformSettings(BaseSettings):
    """Where the shared infrastructure is. Env prefix ``SLMOPS_``."""

    model_config = SettingsConfigDict(env_prefix="SLMOPS_", extra="ignore")

    env: Literal["local", "dev", "staging", "prod"] = Field(
        "local",
        description="Deployment environment; placeholder secrets are refused outside local.",
    )
    var_dir: Path = Field(
        Path("var"), description="Directory for local state: JetStream store, S3 data, logs, keys."
    )
    nats_url: str = Field(
        "nats://127.0.0.1:4222", description="NATS server URL(s), comma separated for a cluster."
    )
    nats_nkey_file: Path | None = Field(
        None,
        description="File holding this process's NATS user nkey seed (unset: the local "
        "stack's <var_dir>/auth/nats/<name>.nk if `slmops up` made one, else no credentials).",
    )
    nats_tls_ca_file: Path | None = Field(
        None, description="CA bundle that verifies the NATS server's TLS certificate."
    )
    nats_tls_cert_file: Path | None = Field(
        None, description="Client certificate for NATS TLS (mutual TLS), PEM."
    )
    nats_tls_key_file: Path | None = Field(None, description="Key of the client certificate.")
    nats_connect_timeout_s: float = Field(
        2.0, gt=0, description="Timeout of one connection attempt to NATS, in seconds."
    )
    nats_request_timeout_s: float = Field(
        5.0, gt=0, description="Timeout of one JetStream API request or publish ack, in seconds."
    )
    s3_endpoint_url: str | None = Field(
        "http://127.0.0.1:9000",
        description="S3 API endpoint (MinIO, local server); empty means AWS S3 itself.",
    )
    s3_region: str = Field("us-east-1", description="S3 region used to sign requests.")
    s3_bucket: str = Field("slmops", description="Bucket holding every artifact.")
    s3_access_key_id: SecretStr = Field(
        SecretStr(LOCAL_S3_ACCESS_KEY), description="S3 access key id."
    )
    s3_secret_access_key: SecretStr = Field(
        SecretStr(LOCAL_S3_SECRET_KEY), description="S3 secret access key."
    )
    trace_dir: Path | None = Field(
        None,
        description="If set, finished spans are also appended as JSON lines under this directory "
        "(the local stack sets it, so traces are kept without a tracing backend).",
    )

    auth: AuthSettings = Field(default_factory=AuthSettings)
    jetstream_replicas: int = Field(
        1, ge=1, le=5,
        description="Replicas of every stream and KV bucket (3 on a 3-node NATS cluster).",
    )  # fmt: skip
    stream_max_gb: dict[str, float] = Field(
        default_factory=dict,
        description='Size caps of streams in GiB by name, JSON (e.g. {"SLMOPS_FLEET": 32}; a KV '
        "bucket by its stream, KV_<bucket>); unset ones keep theirs (pipeline, rollout, fleet "
        "1; dead letters 0.25; desired state and gateways 0.5; other buckets 0.0625).",
    )

    def auth_keys_file(self) -> Path:
        """The token verification keys: ``auth.keys_file``, else the local stack's."""
        return self.auth.keys_file or self.var_dir / "auth" / "jwks.json"

    def auth_token_file(self, local_name: str) -> Path:
        """This process's token: ``auth.token_file``, else the local stack's ``local_name``."""
        return self.auth.token_path(self.var_dir, local_name)

    def span_files_dir(self) -> Path:
        """Where the JSON-lines span files are: ``trace_dir``, else the local stack's."""
        return self.trace_dir or self.var_dir / "traces"

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> PlatformSettings:
        if self.env != "local" and self.s3_secret_access_key.get_secret_value() in (
            _PLACEHOLDER_SECRETS
        ):
            raise ValueError(
                f"SLMOPS_S3_SECRET_ACCESS_KEY is a placeholder but SLMOPS_ENV={self.env!r}: "
                "set a real secret (placeholders are only allowed with SLMOPS_ENV=local)"
            )
        if self.s3_endpoint_url == "":
            self.s3_endpoint_url = None
        return self


class ConsumerSettings(BaseSettings):
    """How a service consumes its durable pull consumer. Env prefix ``SLMOPS_CONSUMER_``."""

    model_config = SettingsConfigDict(env_prefix="SLMOPS_CONSUMER_", extra="ignore")

    max_concurrency: int = Field(
        16, ge=1, le=4096, description="Handlers running at once in one process."
    )
    fetch_batch: int = Field(
        256, ge=1, le=10_000, description="Most messages asked for in one pull request."
    )
    fetch_timeout_s: float = Field(
        1.0, gt=0, description="How long one pull request waits for messages, in seconds."
    )
    ack_wait_s: float = Field(
        30.0, gt=0, description="Redelivery timeout of an unacked message, in seconds."
    )
    max_deliver: int = Field(
        10,
        ge=1,
        description="Deliveries of one message before it goes to the dead-letter stream. With "
        "the backoff (0.5 s doubling to 30 s) 10 retry a transient failure for about 2 min: "
        "longer than a dependency takes to be restarted by the local stack's supervisor.",
    )
    nak_backoff_base_s: float = Field(
        0.5, ge=0, description="First redelivery delay after a transient error, in seconds."
    )
    nak_backoff_max_s: float = Field(
        30.0, ge=0, description="Cap on the redelivery delay after transient errors, in seconds."
    )
    drain_timeout_s: float = Field(
        20.0, gt=0, description="On shutdown, how long running handlers may finish, in seconds."
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> ConsumerSettings:
        if self.nak_backoff_max_s < self.nak_backoff_base_s:
            raise ValueError(
                f"nak_backoff_max_s ({self.nak_backoff_max_s}) must be >= "
                f"nak_backoff_base_s ({self.nak_backoff_base_s})"
            )
        if self.fetch_timeout_s >= self.ack_wait_s:
            raise ValueError(
                f"fetch_timeout_s ({self.fetch_timeout_s}) must be < ack_wait_s "
                f"({self.ack_wait_s}), or fetched messages would time out before handling"
            )
        return self


class ServiceSettings(BaseSettings):
    """Base of every service's settings; subclasses set ``env_prefix`` (``SLMOPS_<NAME>_``)."""

    model_config = SettingsConfigDict(extra="ignore")

    host: str = Field("127.0.0.1", description="Address the HTTP API binds to.")
    port: int = Field(8100, ge=0, le=65535, description="Port of the HTTP API (0 = any free).")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log verbosity."
    )
    platform: PlatformSettings = Field(default_factory=PlatformSettings)
    consumer: ConsumerSettings = Field(default_factory=ConsumerSettings)
