"""Choosing a release from a complete tally: per class, by objective, or why there is none."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmops.events import release_id_for
from slmops.events.payloads import ArtifactRef, ReleaseCreated, ReleaseFailed
from slmops.profiles import DeviceProfile, load_profiles
from slmops_validator.releases import Candidate, Tally, choose

PROFILES = Path(__file__).resolve().parents[3] / "tests" / "pipeline" / "profiles-validator"


@pytest.fixture(scope="module")
def profiles() -> dict[str, DeviceProfile]:
    return load_profiles(PROFILES)  # test-cpu: fastest, measurable; test-npu: smallest


def _passed(vid: str, cls: str, size: int, p50: float | None = None) -> Candidate:
    art = ArtifactRef(digest="sha256:" + vid[-1] * 64, size_bytes=size, uri="s3://b/x")
    return Candidate(variant_id=vid, device_class=cls, recipe_name=f"r-{vid}", verdict="passed",
                     artifact=art, latency_p50_ms=p50)  # fmt: skip


def test_fastest_class_takes_the_lowest_p50_and_smallest_class_the_smallest(
    profiles: dict[str, DeviceProfile],
) -> None:
    tally = Tally(model_name="m", version="1", planned={
        "v-a": "test-cpu", "v-b": "test-cpu", "v-c": "test-npu", "v-d": "test-npu"})  # fmt: skip
    tally.judged = {
        "v-a": _passed("v-a", "test-cpu", size=10, p50=9.0),
        "v-b": _passed("v-b", "test-cpu", size=20, p50=4.0),  # bigger but faster
        "v-c": _passed("v-c", "test-npu", size=30),
        "v-d": _passed("v-d", "test-npu", size=15),
    }
    release = choose(tally, profiles)
    chosen = {e.device_class: e.variant_id for e in release.entries}
    assert isinstance(release, ReleaseCreated)
    assert chosen == {"test-cpu": "v-b", "test-npu": "v-d"}
    assert release.release_id == release_id_for("m", "1")


def test_fastest_without_host_latency_falls_back_to_smallest_and_says_so(
    profiles: dict[str, DeviceProfile],
) -> None:
    tally = Tally(model_name="m", version="1", planned={"v-a": "test-cpu", "v-b": "test-cpu"})
    tally.judged = {"v-a": _passed("v-a", "test-cpu", 10), "v-b": _passed("v-b", "test-cpu", 5)}
    (entry,) = choose(tally, profiles).entries
    assert entry.variant_id == "v-b"
    assert "latency is not measurable" in entry.reason


def test_nothing_to_ship_in_any_class_is_a_failed_release_naming_each_class_with_why(
    profiles: dict[str, DeviceProfile],
) -> None:
    tally = Tally(model_name="m", version="1", planned={"v-a": "test-cpu", "v-b": "test-cpu"},
                  skipped={"jetson": "no recipe for gguf"})  # fmt: skip
    tally.judged = {
        "v-a": Candidate(variant_id="v-a", device_class="test-cpu", recipe_name="int8",
                         verdict="failed", reason="parity.cosine_mean 0.9 < 0.98"),
        "v-b": Candidate(variant_id="v-b", device_class="test-cpu", recipe_name="int4",
                         verdict="optimization_failed", reason="optimization failed: OOM"),
    }  # fmt: skip
    release = choose(tally, profiles)
    entries = {e.device_class: e for e in release.entries}
    assert isinstance(release, ReleaseFailed)  # not a release: nothing to roll out
    assert release.release_id == release_id_for("m", "1")  # the id a release would have had
    assert entries["test-cpu"].variant_id is None
    assert "int8: parity.cosine_mean 0.9 < 0.98" in entries["test-cpu"].reason
    assert "int4: optimization failed: OOM" in entries["test-cpu"].reason
    assert entries["jetson"].variant_id is None
    assert entries["jetson"].reason == "no candidates: no recipe for gguf"


def test_a_release_with_one_class_to_ship_is_created_and_keeps_the_others_reasons(
    profiles: dict[str, DeviceProfile],
) -> None:
    tally = Tally(model_name="m", version="1", planned={"v-a": "test-cpu", "v-b": "test-npu"})
    tally.judged = {
        "v-a": _passed("v-a", "test-cpu", 10),
        "v-b": Candidate(variant_id="v-b", device_class="test-npu", recipe_name="qdq",
                         verdict="failed", reason="structure.static_qdq 0 < 1"),
    }  # fmt: skip
    release = choose(tally, profiles)
    entries = {e.device_class: e for e in release.entries}
    assert isinstance(release, ReleaseCreated)
    assert entries["test-cpu"].variant_id == "v-a"
    assert entries["test-npu"].variant_id is None
    why = "no variant passed validation (qdq: structure.static_qdq 0 < 1)"
    assert entries["test-npu"].reason == why


def test_a_tally_is_complete_only_when_every_planned_job_is_judged() -> None:
    tally = Tally(model_name="m", version="1")
    tally.judged["v-a"] = _passed("v-a", "test-cpu", 1)
    assert not tally.complete  # judged, but the plan has not arrived yet
    tally.planned = {"v-a": "test-cpu", "v-b": "test-cpu"}
    assert not tally.complete
    tally.judged["v-b"] = _passed("v-b", "test-cpu", 2)
    assert tally.complete
