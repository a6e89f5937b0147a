"""The field in the lineage: device-measured figures, findings and proposed releases are
projected from the event log (order-free, rebuildable), and the figures are signed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from slmops.auth import BearerToken, LocalCredentials
from slmops.bus import Bus
from slmops.cli.main import app as cli
from slmops.events import (
    ArtifactRef,
    CloudEvent,
    EventPayload,
    FleetDriftDetected,
    FleetMeasured,
    FleetRegressionDetected,
    OptimizationCompleted,
    ReleaseCreated,
    ReleaseFailed,
    RolloutStarted,
    ValidationPassed,
    field_release_id,
    new_event,
)
from slmops.events.payloads import (
    FieldEvidence,
    FieldFigures,
    FieldWindow,
    GateResult,
    PassSpec,
    Recipe,
    ReleaseEntry,
    WavePlan,
)
from slmops.signatures import verify
from slmops.testing.polling import until, until_answered
from slmops.testing.ports import free_port
from slmops_registry.app import create_app
from slmops_registry.lineage import Lineage, apply_event
from slmops_registry.settings import RegistrySettings
from slmops_registry.testing import RegistryUnderTest, gguf_bytes

NAME, VERSION = "smollm2-135m", "1.0.0"
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
COMMON = {"model_name": NAME, "version": VERSION}
RECIPE = Recipe(name="int8", passes=[PassSpec(name="int8_dynamic")])
REGRESSION_ID, DRIFT_ID = "det-p95-arm64", "det-drift-arm64"
PROPOSED_ID = field_release_id(NAME, VERSION, REGRESSION_ID)
FAILED_ID = field_release_id(NAME, VERSION, DRIFT_ID)
EVIDENCE = FieldEvidence(
    detection_id=REGRESSION_ID,
    device_class="arm64",
    variant_id="v-arm",
    metric="latency_p95_ms",
    bound="max",
    budget=50.0,
    field_value=88.0,
)


def ref(seed: str) -> ArtifactRef:
    digest = "sha256:" + hashlib.sha256(seed.encode()).hexdigest()
    return ArtifactRef(digest=digest, size_bytes=100, uri=f"s3://b/{seed}")


def window(minute: int, value: float) -> FieldWindow:
    return FieldWindow(start=T0 + timedelta(minutes=minute), window_s=30, gateways=4,
                       requests=400, value=value)  # fmt: skip


def measured(p95: float, minute: int) -> FleetMeasured:
    return FleetMeasured(
        **COMMON, variant_id="v-arm", device_class="arm64", since=T0,
        until=T0 + timedelta(minutes=minute),
        figures=FieldFigures(gateways=4, requests=400 * minute, error_rate=0.01,
                             latency_p50_ms=40.0, latency_p95_ms=p95, peak_memory_mb=310.0),
        gates=[GateResult(name="latency_p95_ms", value=p95, budget=50.0, unit="ms", bound="max",
                          passed=p95 <= 50.0)],
    )  # fmt: skip


def field_story(parent: str) -> list[tuple[EventPayload, int]]:
    """The field loop after a rollout, each with the minute it was said: figures measured
    twice, a regression found (announced twice), a drift found, a proposal for the first and
    no candidate for the second, the proposed variant's rollout."""
    regression = {"detection_id": REGRESSION_ID, "variant_id": "v-arm", "device_class": "arm64",
                  "metric": "latency_p95_ms", "bound": "max", "budget": 50.0}  # fmt: skip
    return [
        (OptimizationCompleted(**COMMON, variant_id="v-arm", device_class="arm64",
                               parent_digest=parent, recipe=RECIPE, artifact=ref("arm"),
                               duration_s=1.0), 0),
        (ValidationPassed(**COMMON, variant_id="v-arm", device_class="arm64"), 0),
        (ReleaseCreated(**COMMON, release_id="rel-1", entries=[
            ReleaseEntry(device_class="arm64", variant_id="v-arm", reason="smallest")]), 0),
        (RolloutStarted(**COMMON, rollout_id="ro-1", release_id="rel-1",
                        waves=[WavePlan(index=0, percent=100, target_count=4)]), 1),
        (measured(45.0, 2), 2),
        (FleetRegressionDetected(**COMMON, **regression, windows=[window(3, 80.0)],
                                 field_value=80.0), 3),
        (FleetRegressionDetected(**COMMON, **regression,
                                 windows=[window(3, 80.0), window(4, 88.0)], field_value=88.0), 4),
        (measured(88.0, 5), 5),
        (FleetDriftDetected(**COMMON, detection_id=DRIFT_ID, variant_id="v-arm",
                            device_class="arm64", windows=[window(4, 0.4)], signal="embedding",
                            score=0.4, threshold=0.25, field_samples=4000,
                            baseline_samples=256), 5),
        (OptimizationCompleted(**COMMON, variant_id="v-arm-fast", device_class="arm64",
                               parent_digest=parent, recipe=RECIPE, artifact=ref("fast"),
                               duration_s=1.0), 6),
        (ReleaseCreated(**COMMON, release_id=PROPOSED_ID, proposal=EVIDENCE, entries=[
            ReleaseEntry(device_class="arm64", variant_id="v-arm-fast",
                         reason="4 threads: 41 ms p95 <= 50 ms")]), 7),
        (ReleaseFailed(**COMMON, release_id=FAILED_ID,
                       proposal=EVIDENCE.model_copy(update={"detection_id": DRIFT_ID}),
                       entries=[ReleaseEntry(device_class="arm64",
                                             reason="no candidate within the budget")]), 7),
        (RolloutStarted(**COMMON, rollout_id="ro-2", release_id=PROPOSED_ID,
                        waves=[WavePlan(index=0, percent=100, target_count=4)]), 8),
    ]  # fmt: skip


def events(parent: str) -> list[CloudEvent[Any]]:
    story = []
    for i, (payload, minute) in enumerate(field_story(parent)):
        event = new_event(payload, source="/slmops/telemetry", event_id=f"e-{i:02d}")
        story.append(event.model_copy(update={"time": T0 + timedelta(minutes=minute)}))
    return story


def test_the_field_projection_is_order_free_and_idempotent() -> None:
    # setup
    story = events("sha256:" + "0" * 64)
    shuffled = [*story, *story[3:7]]  # some twice
    random.Random(7).shuffle(shuffled)

    # execute
    in_order, out_of_order = Lineage(**COMMON), Lineage(**COMMON)
    for event in story:
        apply_event(in_order, event)
    for event in shuffled:
        apply_event(out_of_order, event)

    # assert: the same lineage; the latest figures; a finding's first and latest word
    assert out_of_order == in_order
    (figures,) = in_order.field.values()
    assert (figures.figures.latency_p95_ms, figures.event_id) == (88.0, "e-07")
    finding = in_order.findings[REGRESSION_ID]
    assert (finding.event_id, finding.last_event_id, finding.field_value) == ("e-05", "e-06", 88.0)
    assert len(finding.windows) == 2
    assert in_order.findings[DRIFT_ID].kind == "drift"
    assert in_order.release_failed is None  # a failed proposal is not the version failing
    assert in_order.proposals[FAILED_ID].outcome == "failed"


def complete(lineage: dict[str, Any]) -> bool:
    return (
        len(lineage["rollouts"]) == 2
        and len(lineage["proposals"]) == 2
        and any(f["event_id"] != f["last_event_id"] for f in lineage["findings"])
        and any(m["figures"]["latency_p95_ms"] == 88.0 for m in lineage["field"])
    )


async def lineage_when(client: httpx.AsyncClient, predicate: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def there() -> bool:
        nonlocal found
        response = await client.get(f"/v1/models/{NAME}/{VERSION}/lineage")
        found = response.json() if response.status_code == 200 else {}
        return bool(found) and bool(predicate(found))

    await until_answered(there, "the field loop in the lineage")
    return found


@pytest.mark.integration
async def test_field_nodes_are_projected_rebuilt_and_their_figures_signed(
    registry: RegistryUnderTest, bus: Bus
) -> None:
    # setup: a published version; the field loop's events on the bus
    digest = (await registry.upload(gguf_bytes())).json()["digest"]
    assert (await registry.publish(digest)).status_code == 201
    for event in events(digest):
        await bus.publish(event)

    # execute
    live = await lineage_when(registry.client, complete)
    lean = (await registry.client.get(f"/v1/models/{NAME}/{VERSION}/lineage",
                                      params={"gateways": "false"})).json()  # fmt: skip
    replayed = (await registry.client.post("/v1/admin/lineage/rebuild")).json()["replayed"]
    rebuilt = await lineage_when(registry.client, complete)
    field = await registry.client.get("/v1/variants/v-arm/field")
    unmeasured = await registry.client.get("/v1/variants/v-arm-fast/field")
    unknown = await registry.client.get("/v1/variants/v-nope/field")
    anonymous = await registry.client.get("/v1/variants/v-arm/field", auth=None)
    pem = (await registry.client.get("/v1/keys")).json()["pem"]

    # assert: the chain finding -> proposed release -> new variant -> its rollout
    assert rebuilt == live
    # published, 2 variants' events, 3 releases, 5 fleet findings/figures; 2 rollouts
    assert (replayed["SLMOPS_PIPELINE"], replayed["SLMOPS_ROLLOUT"]) == (12, 2)
    assert lean == {**live, "gateways": {}}  # the field nodes are in the lean one too
    (proposed,) = [p for p in live["proposals"] if p["outcome"] == "proposed"]
    assert (
        proposed["release_id"],
        proposed["detection_id"],
        proposed["replaces"],
        proposed["variant_id"],
    ) == (PROPOSED_ID, REGRESSION_ID, "v-arm", "v-arm-fast")
    assert {f["detection_id"]: f["kind"] for f in live["findings"]} == {
        REGRESSION_ID: "regression", DRIFT_ID: "drift"}  # fmt: skip
    release = next(r for r in live["releases"] if r["release_id"] == PROPOSED_ID)
    assert release["proposal"]["detection_id"] == REGRESSION_ID
    assert any(r["release_id"] == PROPOSED_ID for r in live["rollouts"])
    assert live["release_failed"] is None
    # the figures, signed
    assert field.status_code == 200, field.text
    (signed,) = field.json()["classes"]
    statement = json.loads(signed["statement"])
    assert (statement["kind"], statement["variant_id"], statement["device_class"]) == (
        "slmops.field-figures.v1", "v-arm", "arm64")  # fmt: skip
    assert statement["figures"]["latency_p95_ms"] == 88.0
    assert statement["gates"][0]["passed"] is False
    assert verify(pem, signed["statement"].encode(), signed["signature"])
    tampered = signed["statement"].replace('"latency_p95_ms":88.0', '"latency_p95_ms":44.0')
    assert tampered != signed["statement"]
    assert not verify(pem, tampered.encode(), signed["signature"])
    assert unmeasured.json()["classes"] == []
    assert unknown.status_code == 404
    assert anonymous.status_code == 401


@pytest.mark.integration
async def test_the_cli_shows_the_figures_with_their_signature_checked(
    registry_settings: RegistrySettings, bus: Bus, credentials: LocalCredentials
) -> None:
    # setup: the registry on a real port (the CLI speaks HTTP); figures of v-arm measured
    app = create_app(registry_settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        await until(lambda: server.started or task.done(), "the registry to listen")
        url = f"http://127.0.0.1:{port}"
        for event in events("sha256:" + "0" * 64)[:8]:
            await bus.publish(event)
        admin = BearerToken(credentials.token("admin"))
        async with httpx.AsyncClient(base_url=url, auth=admin) as client:

            async def measured_twice() -> bool:
                found = (await client.get("/v1/variants/v-arm/field")).json()
                return any(c["measured"]["figures"]["latency_p95_ms"] == 88.0
                           for c in found.get("classes", []))  # fmt: skip

            await until_answered(measured_twice, "the latest figures of v-arm")

        # execute
        env = {"COLUMNS": "250", "SLMOPS_VAR_DIR": str(registry_settings.platform.var_dir)}
        argv = ["field", "v-arm", "--registry-url", url]
        shown = await asyncio.to_thread(CliRunner().invoke, cli, argv, env=env)
    finally:
        server.should_exit = True
        await task

    # assert: the class's figures, the broken gate, a valid signature
    assert shown.exit_code == 0, shown.output
    assert "v-arm of smollm2-135m 1.0.0" in shown.stdout
    row = next(line for line in shown.stdout.splitlines() if "arm64" in line)
    assert "88.0" in row
    assert "latency_p95_ms" in row
    assert "valid (" in row
