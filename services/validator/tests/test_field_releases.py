"""A re-optimization's tally: a proposed release for the finding's class only, chosen by the
predicted field figure, or failed with why - and the version's own release untouched by it."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmops.bus import Bus
from slmops.events import field_release_id, release_id_for
from slmops.events.payloads import (
    ArtifactRef,
    FieldEvidence,
    OptimizationPlanned,
    PlannedJob,
    ReleaseCreated,
    ReleaseFailed,
)
from slmops.profiles import DeviceProfile, load_profiles
from slmops.testing.events import await_events, stream_count
from slmops_validator.releases import Candidate, Tally, choose, tally_key
from slmops_validator.releasing import Releases

PROFILES = Path(__file__).resolve().parents[3] / "tests" / "pipeline" / "profiles-validator"
EVIDENCE = FieldEvidence(detection_id="det-1", device_class="test-cpu", variant_id="v-old",
                         metric="latency_p95_ms", bound="max", budget=100.0,
                         field_value=150.0, host_value=20.0)  # fmt: skip
FIELD_RELEASE = field_release_id("m", "1", "det-1")


@pytest.fixture(scope="module")
def profiles() -> dict[str, DeviceProfile]:
    return load_profiles(PROFILES)  # test-cpu: fastest, measurable; test-npu: smallest


def _candidate(vid: str, cls: str = "test-cpu", *, size: int = 10, p50: float | None = None,
               predicted: float | None = None, verdict: str = "passed",
               reason: str = "") -> Candidate:  # fmt: skip
    art = ArtifactRef(digest="sha256:" + vid[-1] * 64, size_bytes=size, uri="s3://b/x")
    field = ({"field_metric": "latency_p95_ms", "field_value": predicted, "field_bound": "max"}
             if predicted is not None else {})  # fmt: skip
    return Candidate(variant_id=vid, device_class=cls, recipe_name=f"r-{vid}",
                     verdict=verdict,  # type: ignore[arg-type]
                     reason=reason, artifact=art if verdict == "passed" else None,
                     latency_p50_ms=p50, **field)  # fmt: skip


def _proposal_tally(**judged: Candidate) -> Tally:
    return Tally(model_name="m", version="1", release_id=FIELD_RELEASE, proposal=EVIDENCE,
                 planned={v: c.device_class for v, c in judged.items()}, judged=judged)  # fmt: skip


def test_a_proposal_names_only_the_finding_class_by_the_best_predicted_field_figure(
    profiles: dict[str, DeviceProfile],
) -> None:
    # v-b is slower on the host (p50) but predicted faster in the field: the field decides
    tally = _proposal_tally(
        **{"v-a": _candidate("v-a", p50=1.0, predicted=90.0, size=5),
           "v-b": _candidate("v-b", p50=3.0, predicted=60.0, size=50)},
    )  # fmt: skip
    tally.skipped = {"test-npu": "not this finding's class"}  # a plan's note: not decided here

    release = choose(tally, profiles)

    assert isinstance(release, ReleaseCreated)
    assert release.release_id == FIELD_RELEASE
    assert release.proposal == EVIDENCE
    (entry,) = release.entries
    assert (entry.device_class, entry.variant_id) == ("test-cpu", "v-b")
    assert "predicted field latency_p95_ms" in entry.reason
    assert "60" in entry.reason


def test_no_passing_candidate_is_a_failed_proposal_with_each_reason(
    profiles: dict[str, DeviceProfile],
) -> None:
    why = "field.latency_p95_ms 120 ms > 100 ms (field 150 ms x host ratio 0.800 = predicted 120)"
    tally = _proposal_tally(
        **{"v-a": _candidate("v-a", verdict="failed", reason=why),
           "v-b": _candidate("v-b", verdict="optimization_failed",
                             reason="optimization failed: OOM")},
    )  # fmt: skip

    release = choose(tally, profiles)

    assert isinstance(release, ReleaseFailed)  # the operator is told; nothing rolls out
    assert release.release_id == FIELD_RELEASE
    assert release.proposal == EVIDENCE
    (entry,) = release.entries
    assert entry.variant_id is None
    assert f"r-v-a: {why}" in entry.reason
    assert "r-v-b: optimization failed: OOM" in entry.reason


def test_an_empty_plan_fails_the_proposal_at_once_with_the_plans_reason(
    profiles: dict[str, DeviceProfile],
) -> None:
    tally = Tally(model_name="m", version="1", release_id=FIELD_RELEASE, proposal=EVIDENCE,
                  planned={}, skipped={"test-cpu": "no faster recipe left to try"})  # fmt: skip

    assert tally.complete  # nothing to wait for
    release = choose(tally, profiles)

    assert isinstance(release, ReleaseFailed)
    (entry,) = release.entries
    assert entry.reason == "no candidates: no faster recipe left to try"


def test_the_fastest_objective_prefers_predicted_field_figures_over_host_ones(
    profiles: dict[str, DeviceProfile],
) -> None:
    # a version's own release (no proposal) whose candidates were judged against the field
    tally = Tally(model_name="m", version="2", planned={"v-a": "test-cpu", "v-b": "test-cpu"})
    tally.judged = {"v-a": _candidate("v-a", p50=1.0, predicted=95.0),
                    "v-b": _candidate("v-b", p50=2.0, predicted=70.0)}  # fmt: skip
    (entry,) = choose(tally, profiles).entries
    assert entry.variant_id == "v-b"

    # without a prediction for every candidate, the host figure decides as before
    tally.judged["v-a"] = _candidate("v-a", p50=1.0)
    (entry,) = choose(tally, profiles).entries
    assert entry.variant_id == "v-a"
    assert entry.reason.startswith("fastest of 2 passed")


def test_the_proposal_tally_has_a_key_of_its_own() -> None:
    assert tally_key("m", "1", FIELD_RELEASE) != tally_key("m", "1")
    assert tally_key("m", "1").endswith(release_id_for("m", "1"))


@pytest.mark.integration
async def test_a_proposal_and_the_versions_own_release_are_decided_apart(
    bus: Bus, profiles: dict[str, DeviceProfile]
) -> None:
    # setup: the version's plan (two classes) and a proposal's plan (one job) in the same KV
    releases = Releases(await bus.key_value("slmops-jobs"), bus, profiles)
    version_plan = OptimizationPlanned(
        model_name="m", version="1", parent_digest="sha256:" + "0" * 64,
        jobs=[PlannedJob(variant_id="v-a", device_class="test-cpu", recipe_name="r-v-a"),
              PlannedJob(variant_id="v-d", device_class="test-npu", recipe_name="r-v-d")],
    )  # fmt: skip
    proposal_plan = version_plan.model_copy(update={
        "jobs": [PlannedJob(variant_id="v-f", device_class="test-cpu", recipe_name="r-v-f")],
        "release_id": FIELD_RELEASE, "field": EVIDENCE,
    })  # fmt: skip
    await releases.add_plan(version_plan)
    await releases.add_plan(proposal_plan)

    # execute: the version's first job and the proposal's only one end
    await releases.add_candidate("m", "1", None, _candidate("v-a", p50=1.0))
    await releases.add_candidate("m", "1", FIELD_RELEASE, _candidate("v-f", predicted=80.0))
    (proposed,) = await await_events(bus, "slmops.release.created.v1", count=1)

    # assert: the proposal is released alone; the version still waits for v-d
    assert proposed.data.release_id == FIELD_RELEASE
    assert proposed.data.proposal == EVIDENCE
    assert [(e.device_class, e.variant_id) for e in proposed.data.entries] == [("test-cpu", "v-f")]
    version_tally = Tally.model_validate_json(
        (await releases.kv.get(tally_key("m", "1"))).value or b"{}"
    )
    assert not version_tally.released
    assert set(version_tally.judged) == {"v-a"}  # the proposal's candidate is not in it

    # the version's last job: its own release, both classes, no proposal, unchanged by v-f
    await releases.add_candidate("m", "1", None, _candidate("v-d", "test-npu", size=3))
    created = await await_events(bus, "slmops.release.created.v1", count=2)
    (own,) = [e for e in created if e.data.release_id == release_id_for("m", "1")]
    assert own.data.proposal is None
    assert {(e.device_class, e.variant_id) for e in own.data.entries} == {
        ("test-cpu", "v-a"), ("test-npu", "v-d")}  # fmt: skip


@pytest.mark.integration
async def test_an_empty_proposal_plan_publishes_the_failure_at_once(
    bus: Bus, profiles: dict[str, DeviceProfile]
) -> None:
    releases = Releases(await bus.key_value("slmops-jobs"), bus, profiles)
    plan = OptimizationPlanned(
        model_name="m", version="1", parent_digest="sha256:" + "0" * 64, jobs=[],
        skipped={"test-cpu": "every recipe of the class was tried"},
        release_id=FIELD_RELEASE, field=EVIDENCE,
    )  # fmt: skip

    await releases.add_plan(plan)
    await releases.add_plan(plan)  # a redelivery: decided once

    (failed,) = await await_events(bus, "slmops.release.failed.v1", count=1)
    assert await stream_count(bus, "SLMOPS_PIPELINE", "slmops.release.>") == 1
    assert failed.data.release_id == FIELD_RELEASE
    assert failed.data.proposal == EVIDENCE
    (entry,) = failed.data.entries
    assert entry.reason == "no candidates: every recipe of the class was tried"
