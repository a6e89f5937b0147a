"""`slmops rollout ...` against a real rollout service (served over HTTP on 127.0.0.1) and a
simulated fleet: start with an approval wave, status while it waits, approve, complete, a
refused pause, then a manual rollback that brings every gateway back to the previous version
through registry-signed rollbacks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from slmops.bus import Bus
from slmops.cli.main import app as cli
from slmops.testing.events import await_events
from slmops.testing.models import with_word_tokenizer
from slmops_gateway.simulator import FleetSpec

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def slmops(url: str, *args: object) -> Result:
    """The CLI in a thread: the services and the fleet keep running on this loop."""
    argv = [str(a) for a in args] + ["--rollout-url", url]
    return await asyncio.to_thread(CliRunner().invoke, cli, argv, env={"COLUMNS": "200"})


async def until_status(url: str, ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    for _ in range(200):
        shown = await slmops(url, "rollout", "status", "tiny", "1.1.0", "--json")
        found = json.loads(shown.stdout) if shown.exit_code == 0 else []
        if found and ready(found[0]):
            return dict(found[0])
        await asyncio.sleep(0.1)
    raise AssertionError(f"the rollout never got there: {found}")


async def test_the_rollout_cli_drives_a_rollout_and_rolls_it_back(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes]
) -> None:
    # setup: 20 simulated gateways already running 1.0.0; a release of 1.1.0
    old = await pipeline.release(bus, with_word_tokenizer(tiny_onnx()), ["test-cpu"], "1.0.0")
    new = await pipeline.release(bus, with_word_tokenizer(tiny_onnx(seed=3)), ["test-cpu"],
                                 "1.1.0")  # fmt: skip
    spec = FleetSpec(count=20, classes={"test-cpu": 1.0}, prefix="cli")
    async with (
        pipeline.served_rollout_service() as url,
        pipeline.simulated_fleet(bus, spec) as fleet,
    ):
        async with pipeline.served_client(url) as api:
            for _ in range(100):
                if len((await api.get("/v1/gateways")).json()) == 20:
                    break
                await asyncio.sleep(0.1)
        first = await slmops(url, "rollout", "start", "tiny", "1.0.0", "--percents", "100",
                             "--soak-s", "0")  # fmt: skip
        assert first.exit_code == 0, first.output
        await await_events(bus, "slmops.rollout.completed.v1", count=1, timeout_s=60)

        # execute: 1.1.0 in two waves, the second held for approval
        started = await slmops(url, "rollout", "start", "tiny", "1.1.0", "--percents", "50,100",
                               "--soak-s", "0.2", "--approval-wave", "1")  # fmt: skip
        waiting = await until_status(url, lambda r: "waits for approval" in r["gates"]["why"])
        shown = await slmops(url, "rollout", "status", "tiny", "1.1.0")
        approved = await slmops(url, "rollout", "approve", "tiny", "1.1.0", "--reason", "canary ok")
        done = await await_events(bus, "slmops.rollout.completed.v1", count=2, timeout_s=60)
        refused = await slmops(url, "rollout", "pause", "tiny", "1.1.0")
        rolled = await slmops(url, "rollout", "rollback", "tiny", "1.1.0", "--reason", "drill")
        event = await await_events(bus, "slmops.rollout.rolled_back.v1", count=1, timeout_s=30)
        for _ in range(100):
            if fleet.serving() == {old["test-cpu"].variant_id: 20}:
                break
            await asyncio.sleep(0.1)
        listed = await slmops(url, "rollout", "list", "--json")
        table = await slmops(url, "rollout", "list", "--model", "tiny")
        gateways = await slmops(url, "fleet", "list")

        # assert
        assert started.exit_code == 0, started.output
        assert "waves of [10, 10] gateways" in started.output
        assert waiting["wave_progress"][0]["gateways"] == {"applied": 10}
        assert waiting["wave_progress"][1]["gateways"] == {"pending": 10}
        assert "wave 0 done: wave 1 waits for approval" in shown.output
        assert approved.exit_code == 0, approved.output
        assert done[1].data.gateways_updated == 20
        assert refused.exit_code == 1
        assert "cannot pause a rollout that is completed" in refused.output
        assert rolled.exit_code == 0, rolled.output
        assert "rolled_back (rollback by user:admin: drill)" in rolled.output  # who and why
        assert (event[0].data.scope, len(event[0].data.gateway_ids)) == ("fleet", 20)
        assert event[0].data.to_variant_id == old["test-cpu"].variant_id
        assert fleet.serving() == {old["test-cpu"].variant_id: 20}
        assert new["test-cpu"].variant_id != old["test-cpu"].variant_id
        # the listings: both rollouts, newest first; the fleet by what it runs now
        assert [(r["version"], r["status"]) for r in json.loads(listed.output)] == [
            ("1.1.0", "rolled_back"), ("1.0.0", "completed")]  # fmt: skip
        assert "rolled_back" in table.output
        assert f"test-cpu │ {old['test-cpu'].variant_id} │ 20" in gateways.output
