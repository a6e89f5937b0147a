"""Releases proposed from field evidence wait for a decision (real NATS, the handlers and the
engine): never rolled out by ``auto_models``; approved, they reach only the gateways of their
class running the model; ``auto_field_releases`` rolls them at once; a failed one is kept
with its reasons."""

from __future__ import annotations

from typing import Any

import pytest

from slmops.bus import Bus
from slmops.events import (
    GatewayReport,
    ReleaseCreated,
    ReleaseFailed,
    field_release_id,
    new_event,
)
from slmops.events.payloads import ArtifactRef, FieldEvidence, ReleaseEntry
from slmops.service.registry_api import RegistryClient
from slmops.testing.events import await_events, stream_count
from slmops_rollout import proposals
from slmops_rollout.engine import Engine
from slmops_rollout.handlers import (
    AUTO_FIELD_RELEASES,
    on_gateway_reports,
    on_release,
    on_release_failed,
)
from slmops_rollout.proposals import Undecidable
from slmops_rollout.settings import RolloutSettings

pytestmark = [pytest.mark.integration]
ART = ArtifactRef(digest="sha256:" + "a" * 64, size_bytes=1, uri="s3://b/x")
MANIFEST = "sha256:" + "b" * 64
EVIDENCE = FieldEvidence(detection_id="det-1", device_class="arm64", variant_id="v-arm-slow",
                         metric="latency_p95_ms", bound="max", budget=50.0, field_value=91.5,
                         host_value=None)  # fmt: skip
PROPOSED_ID = field_release_id("m", "1", "det-1")
PROPOSED = ReleaseCreated(
    release_id=PROPOSED_ID, model_name="m", version="1", proposal=EVIDENCE,
    entries=[ReleaseEntry(device_class="arm64", variant_id="v-arm-fast", artifact=ART,
                          manifest_digest=MANIFEST, reason="int8, 4 threads: 41 ms p95 <= 50")],
)  # fmt: skip


async def _engine(bus: Bus) -> Engine:
    buckets = [await bus.key_value(b) for b in
               ("slmops-rollouts", "slmops-desired-state", "slmops-gateways")]  # fmt: skip
    return Engine(bus, *buckets, RegistryClient("http://registry.invalid"))


def _engines(engine: Engine) -> Any:
    async def engines() -> Engine:
        return engine

    return engines


async def _fleet(engine: Engine) -> None:
    """arm64 gateways running m's measured variant (a1, a2) or another model (a3, named by its
    report; a4, by a variant no rollout of m installed); an x86 gateway running m (c1)."""
    running = {"a1": ("arm64", "v-arm-slow", None), "a2": ("arm64", "v-arm-slow", "m"),
               "a3": ("arm64", "w-arm", "other"), "a4": ("arm64", "w-arm-2", None),
               "c1": ("x86", "v-x86", "m")}  # fmt: skip
    for gateway_id, (device_class, variant_id, model) in running.items():
        for kind in ("registered", "applied"):
            report = GatewayReport(
                gateway_id=gateway_id, kind=kind, device_class=device_class,
                variant_id=variant_id if kind == "applied" else None,
                model_name=model if kind == "applied" else None,
                version="1" if model and kind == "applied" else None, generation=1,
            )  # fmt: skip
            await on_gateway_reports([new_event(report, source="/test")], _engines(engine))


async def test_a_proposal_waits_for_an_operator_even_with_auto_models(bus: Bus) -> None:
    # setup: every model's releases roll out automatically; a fleet of both classes
    engine = await _engine(bus)
    await _fleet(engine)
    settings = RolloutSettings(auto_models=["*"])

    # execute: the proposal arrives (twice: redelivered)
    for _ in range(2):
        await on_release(new_event(PROPOSED, source="/test"), _engines(engine), settings)

    # assert: held as pending with its evidence, no rollout, nothing announced
    (held,) = await proposals.every(engine.rollouts)
    assert (held.status, held.release_id) == ("pending", PROPOSED_ID)
    assert held.proposed_variant_id == "v-arm-fast"
    assert held.why == "int8, 4 threads: 41 ms p95 <= 50"
    assert held.evidence == EVIDENCE
    assert await engine.all() == []
    assert await stream_count(bus, "SLMOPS_ROLLOUT") == 0


async def test_approval_rolls_out_to_the_class_gateways_running_the_model(bus: Bus) -> None:
    # setup: a pending proposal, a fleet
    engine = await _engine(bus)
    await _fleet(engine)
    await on_release(new_event(PROPOSED, source="/test"), _engines(engine), RolloutSettings())

    # execute: approved twice
    first, state = await proposals.approve(engine, PROPOSED_ID, "user:ops", reason="looks right")
    again, same = await proposals.approve(engine, PROPOSED_ID, "user:someone-else")
    assigned = await await_events(bus, "slmops.gateway.assignment.v1.>", count=1)

    # assert: only the arm64 gateways running m (by variant or by named model); x86 untouched
    targets = sorted(g for wave in state.waves for g in wave)
    assert targets == ["a1", "a2"]
    assert set(state.desired) == {"arm64"}
    assert state.desired["arm64"].variant_id == "v-arm-fast"
    assert (state.only_model, state.only_variants) == ("m", ["v-arm-slow"])
    assert {a.data.gateway_id for a in assigned} <= {"a1", "a2"}
    assert same.rollout_id == state.rollout_id == first.rollout_id == again.rollout_id
    assert (again.status, again.decided_by, again.decision_reason) == (
        "approved", "user:ops", "looks right")  # fmt: skip
    assert len(await engine.all()) == 1
    with pytest.raises(Undecidable, match="was approved by user:ops already"):
        await proposals.reject(engine, PROPOSED_ID, "user:late", "too late")


async def test_auto_field_releases_rolls_a_proposal_out_at_once(bus: Bus) -> None:
    # setup
    engine = await _engine(bus)
    await _fleet(engine)

    # execute
    settings = RolloutSettings(auto_field_releases=True)
    await on_release(new_event(PROPOSED, source="/test"), _engines(engine), settings)
    started = await await_events(bus, "slmops.rollout.started.v1", count=1)

    # assert: approved by policy, its rollout started (the class's gateways running m only)
    held = await proposals.get(engine.rollouts, PROPOSED_ID)
    assert (held.status, held.decided_by) == ("approved", AUTO_FIELD_RELEASES)
    (state,) = await engine.all()
    assert started[0].data.rollout_id == state.rollout_id == held.rollout_id
    assert sorted(g for wave in state.waves for g in wave) == ["a1", "a2"]


async def test_a_rejected_proposal_is_never_rolled_out(bus: Bus) -> None:
    engine = await _engine(bus)
    await _fleet(engine)
    await on_release(new_event(PROPOSED, source="/test"), _engines(engine), RolloutSettings())

    rejected = await proposals.reject(engine, PROPOSED_ID, "user:ops", "p95 is fine off-peak")
    with pytest.raises(Undecidable, match="was rejected by user:ops already"):
        await proposals.approve(engine, PROPOSED_ID, "user:ops")
    # a redelivery with the policy on does not undo the decision
    settings = RolloutSettings(auto_field_releases=True)
    await on_release(new_event(PROPOSED, source="/test"), _engines(engine), settings)

    assert (rejected.status, rejected.decision_reason) == ("rejected", "p95 is fine off-peak")
    assert (await proposals.get(engine.rollouts, PROPOSED_ID)).status == "rejected"
    assert await engine.all() == []


async def test_a_failed_proposal_keeps_its_reasons_and_cannot_be_approved(bus: Bus) -> None:
    engine = await _engine(bus)
    failed = ReleaseFailed(
        release_id=PROPOSED_ID, model_name="m", version="1", proposal=EVIDENCE,
        entries=[ReleaseEntry(device_class="arm64",
                              reason="no candidate meets latency_p95_ms <= 50 (best 63 ms)")],
    )  # fmt: skip
    await on_release_failed(new_event(failed, source="/test"), _engines(engine))

    with pytest.raises(Undecidable, match="proposes nothing to roll out: arm64: no candidate"):
        await proposals.approve(engine, PROPOSED_ID, "user:ops")
    kept = await proposals.get(engine.rollouts, PROPOSED_ID)
    assert (kept.status, kept.proposed_variant_id) == ("failed", None)
    assert kept.reasons == {"arm64": "no candidate meets latency_p95_ms <= 50 (best 63 ms)"}
