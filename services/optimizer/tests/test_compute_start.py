"""Starting Ray Serve is retried: a failed start (a Ray node timing out on a busy host, a
RayService not deployed yet) leaves the service unready with the reason, then ready."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from slmops.settings import PlatformSettings
from slmops_optimizer import compute
from slmops_optimizer.compute import Compute
from slmops_optimizer.settings import OptimizerSettings


async def test_a_failed_start_is_retried_until_ray_serve_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # setup: the first two attempts fail as Ray does when its node times out
    attempts: list[int] = []
    shutdowns: list[int] = []

    def start_sync(self: Compute) -> Any:
        attempts.append(1)
        if len(attempts) < 3:
            raise RuntimeError("The current node timed out during startup.")
        return "handle"

    monkeypatch.setattr(Compute, "_start_sync", start_sync)
    monkeypatch.setattr(compute, "_shutdown_ray", lambda: shutdowns.append(1))
    settings = OptimizerSettings(platform=PlatformSettings(), work_dir=tmp_path)
    service = Compute(settings)
    service.first_retry_s = 0.05

    # execute
    await service.start()
    ready = await service.wait_ready(timeout_s=10)

    # assert: ready on the third attempt, each failure cleaned up (no half-started Ray left)
    assert ready
    assert (len(attempts), len(shutdowns)) == (3, 2)
    assert (await service.check()).ok
    await service.stop()


async def test_stopping_ends_the_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def start_sync(self: Compute) -> Any:
        raise RuntimeError("no Ray head at ray://nowhere:10001")

    monkeypatch.setattr(Compute, "_start_sync", start_sync)
    monkeypatch.setattr(compute, "_shutdown_ray", lambda: None)
    service = Compute(OptimizerSettings(platform=PlatformSettings(), work_dir=tmp_path))
    service.first_retry_s = 0.05

    await service.start()
    assert not await service.wait_ready(timeout_s=0.3)
    check = await service.check()
    await service.stop()

    assert not check.ok
    assert "no Ray head at ray://nowhere:10001" in check.detail
    assert "retrying in" in check.detail
    assert service._starter is not None
    assert service._starter.done()
