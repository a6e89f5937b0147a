"""A gateway's side of the trust root: python-tuf's ngclient, through the registry's API.

The gateway is given ``root.json`` when enrolled (``SLMOPS_GATEWAY_TRUST_ROOT_FILE``); the first
refresh starts from it, later ones from the newest root it has verified since (kept in its
cache folder), so a rotated root is followed and an older one is never believed again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from tuf.api.exceptions import DownloadError, DownloadHTTPError, RepositoryError
from tuf.ngclient import FetcherInterface, Updater

from slmops.trust.keys import KEYS_TARGET, TrustedKeys

#: Where the registry serves the repository (metadata/ and targets/ below it).
TRUST_PATH = "/v1/trust"


class TrustError(Exception):
    """The trust root could not be refreshed or does not verify: nothing new is believed."""


class _AuthenticatedFetcher(FetcherInterface):
    """ngclient's downloads, with this process's credentials (the registry's routes all need
    them) and without proxies from the environment."""

    def __init__(self, auth: httpx.Auth | None, timeout_s: float) -> None:
        self._client = httpx.Client(auth=auth, timeout=timeout_s, trust_env=False)

    def _fetch(self, url: str) -> Iterator[bytes]:
        response = self._client.get(url)
        if response.status_code != 200:
            raise DownloadHTTPError(f"GET {url}: HTTP {response.status_code}",
                                    response.status_code)  # fmt: skip
        return iter([response.content])

    def close(self) -> None:
        self._client.close()


class TrustClient:
    """The keys the pinned root vouches for, refreshed at most every ``refresh_interval_s``."""

    def __init__(
        self, pinned_root: Path, cache_dir: Path, registry_url: str, *,
        auth: httpx.Auth | None = None, refresh_interval_s: float = 60.0, timeout_s: float = 10.0,
    ) -> None:  # fmt: skip
        self.pinned_root = pinned_root
        self.cache_dir = cache_dir
        self.base_url = registry_url.rstrip("/") + TRUST_PATH
        self.auth = auth
        self.refresh_interval_s = refresh_interval_s
        self.timeout_s = timeout_s
        self._keys: TrustedKeys | None = None
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    async def keys(self) -> TrustedKeys:
        """The current keys (refreshed when older than the interval)."""
        async with self._lock:
            if self._keys is None or time.monotonic() - self._fetched_at > self.refresh_interval_s:
                self._keys = await asyncio.to_thread(self.refresh)
                self._fetched_at = time.monotonic()
            return self._keys

    def refresh(self) -> TrustedKeys:
        """One TUF refresh (blocking): root chain, timestamp, snapshot, targets, keys.json."""
        metadata_dir, targets_dir = self.cache_dir / "metadata", self.cache_dir / "targets"
        metadata_dir.mkdir(parents=True, exist_ok=True)
        targets_dir.mkdir(parents=True, exist_ok=True)
        bootstrap = None
        if not (metadata_dir / "root.json").exists():
            try:
                bootstrap = self.pinned_root.read_bytes()
            except OSError as exc:
                raise TrustError(f"no pinned trust root at {self.pinned_root}: {exc}") from exc
        fetcher = _AuthenticatedFetcher(self.auth, self.timeout_s)
        try:
            updater = Updater(
                str(metadata_dir), f"{self.base_url}/metadata/", str(targets_dir),
                f"{self.base_url}/targets/", fetcher=fetcher, bootstrap=bootstrap,
            )  # fmt: skip
            updater.refresh()
            info = updater.get_targetinfo(KEYS_TARGET)
            if info is None:
                raise TrustError(f"the trust root lists no {KEYS_TARGET}")
            path = updater.find_cached_target(info) or updater.download_target(info)
            return TrustedKeys.from_bytes(Path(path).read_bytes())
        except (RepositoryError, DownloadError, ValueError) as exc:
            raise TrustError(
                f"the trust root does not verify: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            fetcher.close()
