"""How one process proves who it is to NATS: its nkey seed (and TLS), read from files.

The seed lives in a file (mode 0600) named by a setting, never in a URL or an environment
variable's value; the server knows only the public key and the permissions that go with it
(:mod:`slmops.bus.permissions`). Replies come back on the process's own inbox prefix, derived
from its public key, which is the only inbox its permissions let it subscribe to.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import nkeys

from slmops.bus.permissions import inbox_prefix
from slmops.settings import PlatformSettings

DEFAULT_INBOX_PREFIX = "_INBOX"


class BadNatsCredentialsError(ValueError):
    """A credentials file that cannot be used (missing, unreadable, not a user seed)."""


@dataclass(frozen=True)
class NatsCredentials:
    nkey_seed: str | None = None
    tls: ssl.SSLContext | None = None

    @property
    def public_key(self) -> str | None:
        if self.nkey_seed is None:
            return None
        return str(nkeys.from_seed(self.nkey_seed.encode()).public_key.decode())

    @property
    def inbox_prefix(self) -> str:
        public_key = self.public_key
        return inbox_prefix(public_key) if public_key else DEFAULT_INBOX_PREFIX

    @classmethod
    def from_seed_file(cls, path: Path, tls: ssl.SSLContext | None = None) -> NatsCredentials:
        try:
            seed = path.read_text().strip()
            nkeys.from_seed(seed.encode())
        except OSError as exc:
            raise BadNatsCredentialsError(f"cannot read the NATS nkey file {path}: {exc}") from exc
        except (nkeys.NkeysError, ValueError) as exc:  # a wrong file, not a seed
            raise BadNatsCredentialsError(f"{path} holds no NATS user nkey seed") from exc
        if not seed.startswith("SU"):
            raise BadNatsCredentialsError(f"{path} holds no NATS user nkey seed")
        return cls(seed, tls)

    @classmethod
    def from_settings(cls, platform: PlatformSettings, local_name: str) -> NatsCredentials:
        """The files the settings name; else the local stack's seed ``local_name`` under
        ``var_dir`` if `slmops up` made one; else none (a server without authentication)."""
        tls = _tls_context(platform)
        seed_file = platform.nats_nkey_file or platform.var_dir / "auth" / "nats" / (
            f"{local_name}.nk"
        )
        if platform.nats_nkey_file is None and not seed_file.exists():
            return cls(None, tls)
        return cls.from_seed_file(seed_file, tls)


def _tls_context(platform: PlatformSettings) -> ssl.SSLContext | None:
    if not (platform.nats_tls_ca_file or platform.nats_tls_cert_file):
        return None
    context = ssl.create_default_context(
        cafile=str(platform.nats_tls_ca_file) if platform.nats_tls_ca_file else None
    )
    if platform.nats_tls_cert_file:
        context.load_cert_chain(
            str(platform.nats_tls_cert_file),
            str(platform.nats_tls_key_file) if platform.nats_tls_key_file else None,
        )
    return context
