"""Field telemetry on the local stack (`slmops up` with the registry and the telemetry service
only, each with its own identity): health reports published as gateways publish them are
folded per variant and class, the API and the CLI show the gateways' merged figures, a class
slower in the field than its budget yields one fleet.regression.detected, a healthy class
none, and a SIGKILLed service comes back with its folded windows (restored from KV).

Windows of 1 s keep the journey to seconds: the service judges time by the reports' own
timestamps, so a short window is the same code as the default 30 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from slmops.auth import BearerToken, local_credentials
from slmops.bus import Bus
from slmops.events import GatewayReport, new_event
from slmops.events.envelope import CloudEvent
from slmops.events.payloads import HealthAggregate
from slmops.stack.state import find_process, read_state, state_path
from slmops.stack.status import stack_status
from slmops.telemetry import Sketch
from slmops.testing.attacks import local_user
from slmops.testing.events import await_events, stream_count
from slmops.testing.identities import RegistryRoles
from slmops.testing.localstack import RunningStack, local_stack
from slmops.testing.models import tiny_encoder_onnx
from slmops.testing.polling import until, until_answered
from slmops.testing.registry import register_variant

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

PROFILE = Path(__file__).parents[1] / "pipeline" / "profiles" / "test-cpu.yaml"
MODEL, VERSION = "fieldy", "1.0.0"
HEALTHY, SLOW = "field-fast", "field-slow"  # both: p95 budget 50 ms
BUDGET_MS = 50.0
REGRESSION = "slmops.fleet.regression.detected.v1.>"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    folder = tmp_path_factory.mktemp("field")
    profiles = folder / "profiles"
    profiles.mkdir()
    base = yaml.safe_load(PROFILE.read_text())
    for name in (HEALTHY, SLOW):
        budgets = {**base["budgets"], "max_latency_p95_ms": BUDGET_MS}
        (profiles / f"{name}.yaml").write_text(yaml.safe_dump({**base, "name": name,
                                                               "budgets": budgets}))  # fmt: skip
    with local_stack(
        folder / "var",
        SLMOPS_STACK_SERVICES="registry,telemetry",
        SLMOPS_TELEMETRY_PROFILES_DIR=str(profiles),
        SLMOPS_TELEMETRY_WINDOW_S="1",
        SLMOPS_TELEMETRY_KEEP_WINDOWS="600",  # nothing evicted while the test runs
        SLMOPS_STACK_RESTART_BACKOFF_INITIAL_S="0.2",
    ) as running:
        yield running


@pytest.fixture(scope="module")
def variants(stack: RunningStack) -> dict[str, str]:
    """Class -> the variant of MODEL VERSION registered (and validated) for it."""

    async def register() -> dict[str, str]:
        creds = local_credentials(stack.var_dir)
        async with httpx.AsyncClient(
            base_url=stack.urls["registry"], auth=RegistryRoles(creds), timeout=30
        ) as registry:
            data = tiny_encoder_onnx()
            return {c: (await register_variant(registry, data, model_name=MODEL, version=VERSION,
                                               device_class=c)).variant_id
                    for c in (HEALTHY, SLOW)}  # fmt: skip

    return asyncio.run(register())


@pytest.fixture
async def telemetry(stack: RunningStack) -> AsyncIterator[httpx.AsyncClient]:
    token = local_credentials(stack.var_dir).token("admin")
    async with httpx.AsyncClient(base_url=stack.urls["telemetry"], auth=BearerToken(token),
                                 timeout=30) as client:  # fmt: skip
        yield client


@pytest.fixture
async def gateways(stack: RunningStack) -> AsyncIterator[Bus]:
    """The simulator's bus identity: it may publish any gateway's reports, nothing else."""
    bus = await Bus.connect(stack.urls["nats"], source="/slmops/fleetsim",
                            credentials=local_user(stack.var_dir, "simulator"))  # fmt: skip
    yield bus
    await bus.close()


@pytest.fixture
async def admin(stack: RunningStack) -> AsyncIterator[Bus]:
    bus = await Bus.connect(stack.urls["nats"], source="/test",
                            credentials=local_user(stack.var_dir, "admin"))  # fmt: skip
    yield bus
    await bus.close()


def health(latencies_ms: list[float], *, errors: int = 0) -> HealthAggregate:
    return HealthAggregate(
        window_s=1.0, request_count=len(latencies_ms), error_rate=errors / len(latencies_ms),
        latency_ms=Sketch.from_values(latencies_ms).to_wire(),
        peak_memory_mb=100.0 + len(latencies_ms),
    )  # fmt: skip


def report(
    gateway: str, device_class: str, variant_id: str, aggregate: HealthAggregate, at: float
) -> CloudEvent[GatewayReport]:
    event = new_event(
        GatewayReport(gateway_id=gateway, kind="health", device_class=device_class,
                      labels={"site": "berlin"}, variant_id=variant_id, health=aggregate,
                      model_name=MODEL, version=VERSION),
        source=f"/slmops/gateway/{gateway}",
    )  # fmt: skip
    return event.model_copy(update={"time": datetime.fromtimestamp(at, UTC)})


class Fleet:
    """Two gateways per class, each reporting once per window; the slow class's latencies are
    4x its budget, the healthy class's a fifth of it. Windows are stamped from ``t0`` on (the
    service's clock is the reports' own), so which report lands in which window is exact."""

    def __init__(self, bus: Bus, variants: dict[str, str]) -> None:
        self.bus, self.variants = bus, variants
        self.t0 = time.time() // 1 - 60
        self.sent: dict[str, list[HealthAggregate]] = {HEALTHY: [], SLOW: []}

    async def report_window(self, window: int) -> None:
        for device_class, base_ms in ((HEALTHY, 10.0), (SLOW, 4 * BUDGET_MS)):
            for g in (1, 2):
                latencies = [base_ms * (1 + 0.01 * (i + g + window)) for i in range(30)]
                aggregate = health(latencies, errors=g - 1)
                self.sent[device_class].append(aggregate)
                gateway, variant = f"{device_class}-gw-{g}", self.variants[device_class]
                at = self.t0 + window + 0.5
                await self.bus.publish(report(gateway, device_class, variant, aggregate, at))

    def expected(self, device_class: str, windows: int) -> dict[str, float]:
        """What the windows before ``windows`` hold, merged: the gateways' own figures."""
        sent = self.sent[device_class][: 2 * windows]
        merged = Sketch.of(*(a.latency_ms for a in sent))
        requests = sum(a.request_count for a in sent)
        return {
            "gateways": 2, "requests": requests,
            "latency_p50_ms": pytest.approx(merged.quantile(0.5)),
            "latency_p95_ms": pytest.approx(merged.quantile(0.95)),
            "error_rate": pytest.approx(windows / requests),  # one error per window, gateway 2
            "peak_memory_mb": 130.0,
        }  # fmt: skip


def cli(stack: RunningStack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **stack.env, "SLMOPS_TELEMETRY_URL": stack.urls["telemetry"],
           "COLUMNS": "250"}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "slmops.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


async def test_reports_fold_into_figures_a_slow_class_is_detected_and_a_restart_keeps_them(
    stack: RunningStack, variants: dict[str, str], telemetry: httpx.AsyncClient, gateways: Bus,
    admin: Bus,
) -> None:  # fmt: skip
    # setup / execute: 4 windows of reports, and a fifth that completes the fourth
    fleet = Fleet(gateways, variants)
    for window in range(5):
        await fleet.report_window(window)

    # assert: one regression for the slow class, none for the healthy one, even after the
    # service judged the view twice more
    [found] = await await_events(admin, REGRESSION, count=1, timeout_s=30)
    await _judged(telemetry, times=2, since=await _judgements(telemetry))
    findings = await _fleet_events(admin)
    assert [(e.data.device_class, e.data.metric) for e in findings] == [
        (SLOW, "latency_p95_ms")]  # fmt: skip
    assert found.data.variant_id == variants[SLOW]
    assert found.data.budget == BUDGET_MS
    assert found.data.field_value > BUDGET_MS
    evidence = found.data.windows  # the two windows over budget that made it a regression
    assert len(evidence) == 2
    assert all(w.value is not None and w.value > BUDGET_MS for w in evidence)
    assert all(w.gateways == 2 for w in evidence)

    # assert: the API's figures are the gateways' reports of the complete windows, merged
    rows = await _rows(telemetry)
    for device_class in (HEALTHY, SLOW):
        assert rows[device_class]["windows"] == 4
        assert _figures(rows[device_class]) == fleet.expected(device_class, windows=4)
    verdicts = {c: {g["name"]: g["passed"] for g in r["gates"]} for c, r in rows.items()}
    assert verdicts[SLOW]["field.latency_p95_ms"] is False
    assert verdicts[HEALTHY]["field.latency_p95_ms"] is True
    listed = (await telemetry.get("/v1/fleet/findings", params={"model": MODEL})).json()
    assert [f["detection_id"] for f in listed] == [found.data.detection_id]

    # assert: the CLI prints them
    shown = cli(stack, "fleet", "health", MODEL, VERSION)
    assert shown.returncode == 0, shown.stderr
    slow_p95 = rows[SLOW]["figures"]["latency_p95_ms"]
    assert f"field.latency_p95_ms FAIL ({slow_p95:.1f} > 50)" in shown.stdout
    assert f"field.latency_p95_ms ok ({rows[HEALTHY]['figures']['latency_p95_ms']:.1f} <= 50)" in (
        shown.stdout
    )
    as_json = json.loads(cli(stack, "fleet", "health", MODEL, VERSION, "--json").stdout)
    assert sorted(r["device_class"] for r in as_json) == sorted((HEALTHY, SLOW))

    # execute: SIGKILL the service; the supervisor starts it again; one more window
    await _kill_and_await_restart(stack, "telemetry")
    await fleet.report_window(5)

    # assert: the windows folded before came back from KV, the new one is added to them, and
    # the finding is not published again
    await until_answered(lambda: _has_windows(telemetry, 5), "the fifth window complete")
    rows = await _rows(telemetry)
    for device_class in (HEALTHY, SLOW):
        assert _figures(rows[device_class]) == fleet.expected(device_class, windows=5)
    await _judged(telemetry, times=2, since=0)
    assert [e.data.detection_id for e in await _fleet_events(admin)] == [
        found.data.detection_id]  # fmt: skip
    # ... all of it within the service's own bus permissions
    refused = [line for line in (stack.var_dir / "logs" / "nats.log").read_text().splitlines()
               if "Violation" in line and "/slmops/telemetry" in line]  # fmt: skip
    assert refused == []


async def test_a_malformed_report_is_dead_lettered_and_calls_need_a_token(
    stack: RunningStack, telemetry: httpx.AsyncClient, gateways: Bus, admin: Bus
) -> None:
    # execute: a gateway's health subject carrying something that is not a report
    await gateways.js.publish("slmops.gateway.report.v1.health.gw-broken", b'{"not": "an event"')

    # assert: dead-lettered by the telemetry consumer with the reason; the service still up
    [dead] = await await_events(admin, "slmops.deadletter.v1.telemetry-fleet", count=1,
                                timeout_s=30)  # fmt: skip
    assert dead.data.consumer == "telemetry-fleet"
    assert dead.data.reason
    assert (await telemetry.get("/readyz")).status_code == 200
    assert (await telemetry.get("/v1/fleet/health", auth=None)).status_code == 401


async def _judgements(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    found = re.search(r"^slmops_telemetry_detections_run_total ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def _judged(client: httpx.AsyncClient, *, times: int, since: float) -> None:
    async def enough() -> bool:
        return await _judgements(client) >= since + times

    await until_answered(enough, f"{times} more judgements of the view", timeout_s=30)


async def _fleet_events(bus: Bus) -> list[CloudEvent[Any]]:
    """Every finding on the pipeline stream (fleet.measured left out)."""
    count = await stream_count(bus, "SLMOPS_PIPELINE", "slmops.fleet.*.detected.v1.>")
    return await await_events(bus, "slmops.fleet.*.detected.v1.>", count=count, timeout_s=10)


async def _rows(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    answer = await client.get(f"/v1/fleet/health/{MODEL}/{VERSION}", params={"last": 600})
    assert answer.status_code == 200, answer.text
    return {row["device_class"]: row for row in answer.json()}


async def _has_windows(client: httpx.AsyncClient, windows: int) -> bool:
    answer = await client.get(f"/v1/fleet/health/{MODEL}/{VERSION}", params={"last": 600})
    return answer.status_code == 200 and all(r["windows"] >= windows for r in answer.json())


def _figures(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("gateways", "requests", "latency_p50_ms", "latency_p95_ms", "error_rate",
            "peak_memory_mb")  # fmt: skip
    return {key: row["figures"][key] for key in keys}


async def _kill_and_await_restart(stack: RunningStack, name: str) -> None:
    state = read_state(state_path(stack.var_dir))
    assert state is not None
    record = next(r for r in state.components if r.name == name)
    process = find_process(record)
    assert process is not None, f"{name} is not running before it is killed"
    process.send_signal(signal.SIGKILL)

    def back() -> bool:
        components = stack_status(stack.var_dir, timeout_s=1.0) or []
        item = next(c for c in components if c.name == name)
        return item.pid != record.pid and item.ready

    await until(back, f"{name} restarted and ready", timeout_s=60, every_s=0.2)
