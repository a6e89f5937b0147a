"""The optimizer on a real Ray Serve (in-process Ray on 127.0.0.1): jobs go through the
autoscaling deployment's handle, and stopping the service stops Ray."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from slmops.bus import Bus
from slmops.testing.events import await_events

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def optimizer_overrides() -> Iterator[dict[str, Any]]:
    # Ray's socket paths must stay under 108 characters: a short folder, not pytest's tmp_path.
    ray_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    yield {
        "ray_mode": "cluster",
        "ray_num_cpus": 2,
        "ray_temp_dir": ray_dir,
        "min_replicas": 1,
        "max_replicas": 2,
        "replica_num_cpus": 0.5,
    }
    shutil.rmtree(ray_dir, ignore_errors=True)


async def test_jobs_run_on_the_autoscaling_serve_deployment(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes]
) -> None:
    import ray
    from ray import serve

    await pipeline.publish(
        tiny_onnx(), model_name="tiny-a", format="onnx", task="feature-extraction"
    )
    await pipeline.publish(
        tiny_onnx(hidden=32), model_name="tiny-b", format="onnx", task="feature-extraction"
    )

    events = await await_events(bus, "slmops.optimization.*.v1", count=4, timeout_s=180)

    outcomes = [e for e in events if e.type != "slmops.optimization.planned.v1"]
    assert {e.type for e in outcomes} == {"slmops.optimization.completed.v1"}, outcomes
    ready = (await pipeline.optimizer.get("/readyz")).json()
    assert ready["checks"]["ray_serve"]["ok"] is True
    status = serve.status().applications["slmops-optimizer"]
    deployment = status.deployments["optimizer-worker"]
    # Two jobs at once with one job per replica: the autoscaler may be adding the second one.
    assert deployment.status.value in ("HEALTHY", "UPSCALING"), deployment
    assert 1 <= sum(deployment.replica_states.values()) <= 2
    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:")  # Ray stays on loopback

    # A second optimizer instance under a KubeRay RayService only takes a handle to the app
    # the RayService deployed: nothing is redeployed, and it is ready.
    from slmops.settings import PlatformSettings
    from slmops_optimizer.compute import APP_NAME, Compute
    from slmops_optimizer.settings import OptimizerSettings

    deployed_at = serve.status().applications[APP_NAME].last_deployed_time_s
    attached = Compute(OptimizerSettings(
        platform=PlatformSettings(), ray_mode="rayservice", ray_address=address,
        work_dir=pipeline.settings.work_dir,
    ))  # fmt: skip
    await attached.start()
    assert await attached.wait_ready(timeout_s=60), (await attached.check()).detail
    assert serve.status().applications[APP_NAME].last_deployed_time_s == deployed_at
    handle = attached._handle  # the handle jobs are streamed through
    assert (handle.app_name, handle.deployment_name) == (APP_NAME, "optimizer-worker")
    await attached.stop()  # attached, not owning Ray: the app stays up for the other instance
    assert serve.status().applications[APP_NAME].status.value == "RUNNING"
