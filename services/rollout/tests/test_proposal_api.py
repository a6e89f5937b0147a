"""``/v1/proposals`` of the rollout service in-process (real NATS and S3, events through its
consumer): listing with the evidence, approve (idempotent), reject, and the refusals."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner, Result

from slmops.auth import BearerToken, LocalCredentials, Scope
from slmops.bus import Bus
from slmops.cli.main import app as cli
from slmops.events import GatewayReport, ReleaseCreated, ReleaseFailed, new_event
from slmops.events.payloads import ArtifactRef, FieldEvidence, ReleaseEntry
from slmops.settings import PlatformSettings
from slmops.testing.natsserver import NatsServerProcess
from slmops.testing.polling import until, until_answered
from slmops.testing.ports import free_port
from slmops.testing.s3 import TEST_ACCESS_KEY, TEST_SECRET_KEY
from slmops_rollout.app import create_app
from slmops_rollout.settings import RolloutSettings

pytestmark = [pytest.mark.integration]
EVIDENCE = FieldEvidence(
    detection_id="det-1",
    device_class="arm64",
    variant_id="v-arm-slow",
    metric="latency_p95_ms",
    bound="max",
    budget=50.0,
    field_value=91.5,
)
PROPOSED_ID = "rel-field-1"
PROPOSED = ReleaseCreated(
    release_id=PROPOSED_ID, model_name="m", version="1", proposal=EVIDENCE,
    entries=[ReleaseEntry(
        device_class="arm64", variant_id="v-arm-fast", manifest_digest="sha256:" + "b" * 64,
        artifact=ArtifactRef(digest="sha256:" + "a" * 64, size_bytes=1, uri="s3://b/x"),
        reason="int8: 41 ms p95 <= 50 ms",
    )],
)  # fmt: skip
FAILED = ReleaseFailed(
    release_id="rel-field-failed", model_name="m", version="1", proposal=EVIDENCE,
    entries=[ReleaseEntry(device_class="arm64", reason="no candidate meets p95 <= 50 ms")],
)  # fmt: skip


@dataclass
class Served:
    url: str
    var_dir: Path


@pytest.fixture
async def served(
    nats_server: NatsServerProcess, s3_server: str, tmp_path: Path, bus: Bus,
    credentials: LocalCredentials,
) -> AsyncIterator[Served]:  # fmt: skip
    """The rollout service on a real 127.0.0.1 port (the CLI speaks HTTP)."""
    platform = PlatformSettings(
        nats_url=nats_server.url, s3_endpoint_url=s3_server,
        s3_bucket=f"rollout-{uuid.uuid4().hex[:12]}", s3_access_key_id=TEST_ACCESS_KEY,
        s3_secret_access_key=TEST_SECRET_KEY, var_dir=tmp_path / "var",
    )  # fmt: skip
    app = create_app(RolloutSettings(platform=platform, tick_s=0.2))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    await until(lambda: server.started or task.done(), "the rollout service to listen")
    try:
        await app.state.runtime.wait_started(timeout_s=20)
        yield Served(f"http://127.0.0.1:{port}", tmp_path / "var")
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def api(served: Served, credentials: LocalCredentials) -> AsyncIterator[httpx.AsyncClient]:
    """An operator's client of the served rollout service."""
    credentials.mint("operator", "user:ops", frozenset({Scope.READ, Scope.OPERATE}))
    operator = BearerToken(credentials.token("operator"))
    async with httpx.AsyncClient(base_url=served.url, auth=operator) as client:
        yield client


async def _proposals(api: httpx.AsyncClient, count: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    async def listed() -> bool:
        nonlocal found
        found = (await api.get("/v1/proposals")).json()
        return len(found) == count

    await until_answered(listed, f"{count} proposals")
    return found


async def test_an_operator_approves_or_rejects_what_the_field_proposes(
    api: httpx.AsyncClient, bus: Bus, credentials: LocalCredentials
) -> None:
    # setup: two arm64 gateways running m's measured variant; a proposal, a failed one
    for gateway_id in ("a1", "a2"):
        for kind in ("registered", "applied"):
            report = GatewayReport(gateway_id=gateway_id, kind=kind, device_class="arm64",
                                   variant_id="v-arm-slow" if kind == "applied" else None,
                                   generation=1)  # fmt: skip
            await bus.publish(new_event(report, source="/test"))
    await until_answered(
        lambda: _gateway_count(api, 2), "the rollout service's fleet record of a1 and a2"
    )
    await bus.publish(new_event(PROPOSED, source="/test"))
    await bus.publish(new_event(FAILED, source="/test"))
    listed = await _proposals(api, 2)
    credentials.mint("viewer", "user:viewer", frozenset({Scope.READ}))
    viewer = BearerToken(credentials.token("viewer"))

    # execute
    by_viewer = await api.post(f"/v1/proposals/{PROPOSED_ID}/approve", json={}, auth=viewer)
    anonymous = await api.get("/v1/proposals", auth=None)
    unknown = await api.post("/v1/proposals/rel-field-nope/approve", json={})
    failed = await api.post("/v1/proposals/rel-field-failed/approve", json={})
    policy = {"percents": [50, 100], "soak_s": 0}
    first = await api.post(f"/v1/proposals/{PROPOSED_ID}/approve",
                           json={"policy": policy, "reason": "field says so"})  # fmt: skip
    second = await api.post(f"/v1/proposals/{PROPOSED_ID}/approve", json={})
    rejected_late = await api.post(f"/v1/proposals/{PROPOSED_ID}/reject",
                                   json={"reason": "changed my mind"})  # fmt: skip
    approved = (await api.get("/v1/proposals", params={"status": "approved"})).json()

    # assert: the listing carries the evidence and the proposed variant
    by_id = {p["release_id"]: p for p in listed}
    pending = by_id[PROPOSED_ID]
    assert pending["status"] == "pending"
    assert pending["evidence"]["device_class"] == "arm64"
    assert (pending["evidence"]["metric"], pending["evidence"]["field_value"],
            pending["evidence"]["budget"]) == ("latency_p95_ms", 91.5, 50.0)  # fmt: skip
    assert pending["proposed_variant_id"] == "v-arm-fast"
    assert by_id["rel-field-failed"]["status"] == "failed"
    # refusals
    assert by_viewer.status_code == 403, by_viewer.text
    assert anonymous.status_code == 401, anonymous.text
    assert unknown.status_code == 404, unknown.text
    assert failed.status_code == 422, failed.text
    assert "no candidate meets p95 <= 50 ms" in failed.json()["detail"]
    # approval: a rollout of the class's gateways, the same one twice, who decided
    assert first.status_code == 200, first.text
    decision = first.json()
    assert decision["proposal"]["decided_by"] == "user:ops"
    rollout = decision["rollout"]
    assert rollout["release_id"] == PROPOSED_ID
    assert sum(rollout["waves"]) == 2
    assert rollout["policy"]["percents"] == [50, 100]
    assert second.json()["rollout"]["rollout_id"] == rollout["rollout_id"]
    assert rejected_late.status_code == 409, rejected_late.text
    assert [p["rollout_id"] for p in approved] == [rollout["rollout_id"]]


async def _gateway_count(api: httpx.AsyncClient, count: int) -> bool:
    return len((await api.get("/v1/gateways")).json()) == count


async def test_rejection_is_recorded_with_who_and_why(api: httpx.AsyncClient, bus: Bus) -> None:
    await bus.publish(new_event(PROPOSED, source="/test"))
    await _proposals(api, 1)

    missing_reason = await api.post(f"/v1/proposals/{PROPOSED_ID}/reject", json={})
    rejected = await api.post(f"/v1/proposals/{PROPOSED_ID}/reject",
                              json={"reason": "the evening peak only"})  # fmt: skip
    approve = await api.post(f"/v1/proposals/{PROPOSED_ID}/approve", json={})
    kept = (await api.get(f"/v1/proposals/{PROPOSED_ID}")).json()

    assert missing_reason.status_code == 422
    assert rejected.status_code == 200, rejected.text
    assert (kept["status"], kept["decided_by"], kept["decision_reason"]) == (
        "rejected", "user:ops", "the evening peak only")  # fmt: skip
    assert approve.status_code == 409
    assert "rejected by user:ops" in approve.json()["detail"]
    assert (await api.get("/v1/rollouts")).json() == []


async def slmops(served: Served, *args: str) -> Result:
    """The CLI in a thread (the service keeps running on this loop), as the local admin."""
    env = {"COLUMNS": "250", "SLMOPS_VAR_DIR": str(served.var_dir)}
    argv = [*args, "--rollout-url", served.url]
    return await asyncio.to_thread(CliRunner().invoke, cli, argv, env=env)


async def test_the_cli_lists_approves_and_rejects_proposals(
    served: Served, api: httpx.AsyncClient, bus: Bus
) -> None:
    # setup: a gateway of the class running the measured variant; two proposals
    for kind in ("registered", "applied"):
        await bus.publish(new_event(GatewayReport(
            gateway_id="a1", kind=kind, device_class="arm64", generation=1,
            variant_id="v-arm-slow" if kind == "applied" else None), source="/test"))  # fmt: skip
    await until_answered(lambda: _gateway_count(api, 1), "the fleet record of a1")
    other = PROPOSED.model_copy(update={"release_id": "rel-field-2"})
    for release in (PROPOSED, other):
        await bus.publish(new_event(release, source="/test"))
    await _proposals(api, 2)

    # execute
    listed = await slmops(served, "rollout", "proposals")
    approved = await slmops(served, "rollout", "approve", PROPOSED_ID, "--reason", "ok")
    rejected = await slmops(served, "rollout", "reject", "rel-field-2", "--reason", "not now")
    no_reason = await slmops(served, "rollout", "reject", "rel-field-2")
    as_json = await slmops(served, "rollout", "proposals", "--json")

    # assert
    assert listed.exit_code == 0, listed.output
    assert "latency_p95_ms 91.5 (budget <= 50" in listed.stdout
    assert "v-arm-slow -> v-arm-fast" in listed.stdout
    assert approved.exit_code == 0, approved.output
    assert "approved by user:admin: rollout ro-" in approved.stdout
    assert rejected.exit_code == 0, rejected.output
    assert no_reason.exit_code != 0
    statuses = {p["release_id"]: p["status"] for p in json.loads(as_json.stdout)}
    assert statuses == {PROPOSED_ID: "approved", "rel-field-2": "rejected"}
