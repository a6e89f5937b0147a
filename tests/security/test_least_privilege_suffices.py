"""Least privilege that still lets the services work: maintenance that touches the bus the
most (a lineage rebuild: replays, an aside bucket created, filled, listed, swapped, deleted)
runs under the registry's own NATS permissions, and the server refuses it nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest

from slmops.auth import BearerTokenFile, local_credentials
from slmops.testing.localstack import RunningStack


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    attack_target: Callable[[Path], AbstractContextManager[RunningStack]],
) -> Iterator[RunningStack]:
    """A stack of its own: the rebuild replays every stream, and the attack modules' shared
    stack holds their forged assignments and reports."""
    with attack_target(tmp_path_factory.mktemp("least-privilege")) as running:
        yield running


async def test_a_lineage_rebuild_and_a_gc_run_within_the_registrys_permissions(
    stack: RunningStack,
) -> None:
    admin = BearerTokenFile(local_credentials(stack.var_dir).token_file("admin"))
    async with httpx.AsyncClient(base_url=stack.urls["registry"], auth=admin, timeout=120) as api:
        rebuilt = await api.post("/v1/admin/lineage/rebuild")
        collected = await api.post("/v1/admin/gc", params={"dry_run": "true"})
    assert rebuilt.status_code == 200, rebuilt.text
    assert set(rebuilt.json()["replayed"]) == {"SLMOPS_PIPELINE", "SLMOPS_ROLLOUT", "SLMOPS_FLEET"}
    assert collected.status_code == 200, collected.text
    refused = [line for line in (stack.var_dir / "logs" / "nats.log").read_text().splitlines()
               if "Violation" in line and "/slmops/registry" in line]  # fmt: skip
    assert refused == []
