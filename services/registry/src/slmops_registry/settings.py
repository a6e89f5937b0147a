"""registry settings: env prefix ``SLMOPS_REGISTRY_`` (platform-wide ones are ``SLMOPS_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from slmops.settings import ServiceSettings


class RegistrySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SLMOPS_REGISTRY_", extra="ignore")

    port: int = Field(8101, ge=0, le=65535, description="Port of the registry HTTP API.")
    signing_key: SecretStr | None = Field(
        None,
        description="Ed25519 private key that signs manifests: PEM, PKCS8, unencrypted. "
        "Wins over signing_key_file. Without either, a key is generated only with "
        "SLMOPS_ENV=local (under <var_dir>/registry/signing-key.pem); elsewhere startup fails.",
    )
    signing_key_file: Path | None = Field(
        None,
        description="File holding the Ed25519 signing key (PEM, PKCS8, unencrypted), e.g. a "
        "mounted secret; read when signing_key is unset. A missing file is an error.",
    )
    max_upload_mb: int = Field(
        20_000, ge=1, description="Largest accepted upload (artifact or evaluation set), in MiB."
    )
    download_url_ttl_s: int = Field(
        900, ge=1, le=7 * 86_400, description="Lifetime of presigned download URLs, in seconds."
    )

    chunk_min_mb: float = Field(
        8,
        ge=0,
        description="Artifacts at least this large (MiB) are also stored as content-defined "
        "chunks cut at tensor starts, so gateways can fetch only what changed.",
    )
    rollback_ttl_s: float = Field(
        7 * 86_400,
        gt=0,
        description="How long a signed rollback statement holds, in seconds: a gateway offline "
        "longer needs a new one (a statement replayed later is refused).",
    )
    gc_min_age_s: float = Field(
        7 * 86_400,
        ge=86_400,
        description="Garbage collection deletes unreferenced blobs only when older than this, "
        "in seconds (protects uploads whose version is being published); at least a day.",
    )

    trust_dir: Path | None = Field(
        None,
        description="The trust root's TUF repository whose metadata/ and targets/ the registry "
        "serves to gateways (unset: the local stack's <var_dir>/auth/tuf).",
    )

    def trust_root_dir(self) -> Path:
        return self.trust_dir or self.platform.var_dir / "auth" / "tuf"

    @property
    def spool_dir(self) -> Path:
        """Where uploads are received before they are checked and stored."""
        return self.platform.var_dir / "registry" / "spool"
