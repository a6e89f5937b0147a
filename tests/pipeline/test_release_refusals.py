"""Nothing to ship is not a release, and nothing rolled out is not a completed rollout (real
NATS, moto S3, the registry, optimizer and validator in-process, the rollout service served over
HTTP for the CLI, simulated gateways):

- a version whose every candidate failed ends in ``release.failed`` (never ``release.created``);
  the lineage shows "no release" with the reason per class; ``POST /v1/rollouts`` and ``slmops
  rollout start`` refuse it with those reasons;
- a selector that matches no registered gateway is refused with the reason, and no rollout is
  recorded (let alone completed);
- a release where one class has no variant rolls out to the other class only, and its status
  says which class got nothing and why.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from slmops.bus import Bus
from slmops.cli.main import app as cli
from slmops.cli.render import render_lineage
from slmops.events import new_event
from slmops.events.payloads import ReleaseEntry
from slmops.testing.events import await_events, stream_count
from slmops.testing.models import with_word_tokenizer
from slmops.testing.registry import release_of
from slmops_gateway.simulator import FleetSpec

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def slmops(url: str, *args: object) -> Result:
    """The CLI in a thread: the services keep running on this loop."""
    argv = [str(a) for a in args] + ["--rollout-url", url]
    return await asyncio.to_thread(CliRunner().invoke, cli, argv, env={"COLUMNS": "200"})


async def _answer_when(api: httpx.AsyncClient, body: dict[str, Any], status: int) -> Any:
    """POST /v1/rollouts until it answers ``status`` (the service takes events in a moment)."""
    answer = None
    for _ in range(100):
        answer = await api.post("/v1/rollouts", json=body)
        if answer.status_code == status:
            return answer.json()
        await asyncio.sleep(0.1)
    raise AssertionError(f"never {status}: {answer.status_code if answer else '-'} {answer}")


async def test_a_version_whose_every_candidate_failed_is_no_release_and_is_refused(
    pipeline: Any, validator: Any, bus: Bus, tiny_onnx: Callable[..., bytes]
) -> None:
    # setup: a model with an operator no runtime can run - its one planned job fails
    async with (
        pipeline.served_rollout_service() as url,
        pipeline.served_client(url) as api,
    ):
        await pipeline.publish(tiny_onnx(op_domain="com.example.custom"), model_name="broken",
                               format="onnx", task="feature-extraction")  # fmt: skip

        # execute: the validator's decision, then a rollout asked for through API and CLI
        (failed,) = await await_events(bus, "slmops.release.failed.v1", count=1, timeout_s=120)
        body = {"model_name": "broken", "version": "1.0.0"}
        refused = await _answer_when(api, body, 409)
        cli_refused = await slmops(url, "rollout", "start", "broken", "1.0.0")
        lineage = (await pipeline.registry.get("/v1/models/broken/1.0.0/lineage")).json()
        for _ in range(100):  # the registry projects the event a moment after the stream has it
            if lineage["release_failed"] is not None:
                break
            await asyncio.sleep(0.1)
            lineage = (await pipeline.registry.get("/v1/models/broken/1.0.0/lineage")).json()
        # the optimization's failure announced again (a new event id): decided once already
        again = (await await_events(bus, "slmops.optimization.failed.v1", count=1))[0]
        await bus.publish(new_event(again.data, source="/test"))
        await _consumer_idle(bus, "validator-pipeline")
        tally = (await validator.api.get("/v1/releases/broken/1.0.0")).json()
        listed = (await api.get("/v1/rollouts")).json()

    # assert: release.failed, never release.created, once
    assert await stream_count(bus, "SLMOPS_PIPELINE", "slmops.release.created.v1") == 0
    assert await stream_count(bus, "SLMOPS_PIPELINE", "slmops.release.failed.v1") == 1
    (entry,) = failed.data.entries
    assert entry.device_class == "test-cpu"
    assert entry.variant_id is None
    assert "no variant passed validation" in entry.reason
    assert "com.example.custom" in entry.reason
    assert (tally["released"], tally["outcome"]) == (True, "failed")
    # the lineage: no release, the reason per class
    assert lineage["releases"] == []
    assert lineage["release_failed"]["entries"][0]["reason"] == entry.reason
    console = Console(record=True, width=300)
    console.print(render_lineage(lineage))
    shown = console.export_text()
    assert "no release (" in shown
    assert "test-cpu: no variant passed validation (int8-dynamic: optimization failed" in shown
    # the rollout service: 409 with the reasons per class, the CLI likewise; no rollout
    assert refused["detail"]["reasons"] == {"test-cpu": entry.reason}
    assert "broken 1.0.0 has no release to roll out" in refused["detail"]["message"]
    assert cli_refused.exit_code == 1, cli_refused.output
    assert "has no release to roll out" in cli_refused.output
    assert "(HTTP 409)" in cli_refused.output
    assert "test-cpu: no variant passed validation" in cli_refused.output
    assert listed == []


async def test_no_matching_gateway_is_refused_and_a_partial_release_reaches_its_class_only(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes]
) -> None:
    # setup: a release with a variant for test-cpu and none for test-npu; 6 gateways, 3 each
    desired = await pipeline.variant(with_word_tokenizer(tiny_onnx()), device_class="test-cpu")
    release = release_of({"test-cpu": desired})
    why = "no variant passed validation (int8-static-qdq: structure.static_qdq 0 < 1)"
    release.entries.append(ReleaseEntry(device_class="test-npu", reason=why))
    spec = FleetSpec(count=6, classes={"test-cpu": 0.5, "test-npu": 0.5}, prefix="part")
    async with (
        pipeline.served_rollout_service() as url,
        pipeline.served_client(url) as api,
        pipeline.simulated_fleet(bus, spec) as fleet,
    ):
        await bus.publish(new_event(release, source="/test"))
        await pipeline.await_fleet(api, 6)

        # execute: a selector no gateway matches (API, then CLI), then the whole fleet
        body = {"model_name": "tiny", "version": "1.0.0", "selector": {"site": "mars"},
                "policy": {"percents": [100], "soak_s": 0}}  # fmt: skip
        refused = await _answer_when(api, body, 409)
        cli_refused = await slmops(url, "rollout", "start", "tiny", "1.0.0", "--selector",
                                   "site=mars", "--percents", "100", "--soak-s", "0")  # fmt: skip
        none_recorded = (await api.get("/v1/rollouts")).json()
        started = await slmops(url, "rollout", "start", "tiny", "1.0.0", "--percents", "100",
                               "--soak-s", "0")  # fmt: skip
        done = await await_events(bus, "slmops.rollout.completed.v1", count=1, timeout_s=60)
        shown = await slmops(url, "rollout", "status", "tiny", "1.0.0")
        (status,) = (await api.get("/v1/rollouts")).json()
        for _ in range(100):
            if fleet.serving() == {desired.variant_id: 3, "-": 3}:
                break
            await asyncio.sleep(0.1)
        serving = fleet.serving()

    # assert: refused with the reason per class, nothing recorded
    cpu_why = "no registered gateway of class test-cpu matches selector site=mars"
    assert refused["detail"]["reasons"] == {"test-cpu": cpu_why, "test-npu": f"no variant: {why}"}
    assert (
        "no registered gateway of test-cpu matches selector site=mars"
        in (refused["detail"]["message"])
    )
    assert cli_refused.exit_code == 1, cli_refused.output
    assert f"test-cpu: {cpu_why}" in cli_refused.output
    assert none_recorded == []
    # the whole fleet: only the test-cpu gateways, the test-npu class named with why
    assert started.exit_code == 0, started.output
    assert "waves of [3] gateways" in started.output
    assert f"test-npu: nothing rolled out - no variant: {why}" in started.output
    assert done[0].data.gateways_updated == 3
    assert status["status"] == "completed"
    assert status["skipped_classes"] == {"test-npu": f"no variant: {why}"}
    assert f"test-npu: nothing rolled out - no variant: {why}" in shown.output
    assert serving == {desired.variant_id: 3, "-": 3}


async def _consumer_idle(bus: Bus, durable: str, timeout_s: float = 60) -> None:
    """Until the durable consumer on the pipeline stream has nothing pending or unacked."""
    for _ in range(int(timeout_s * 10)):
        info = await bus.js.consumer_info("SLMOPS_PIPELINE", durable)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{durable} still busy after {timeout_s} s")
