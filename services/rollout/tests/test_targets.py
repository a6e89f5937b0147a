"""Who gets what of a release: only classes with a variant, only matching gateways, and every
class that gets nothing named with why; nothing to ship or no one to ship to is refused."""

from __future__ import annotations

import pytest

from slmops.events import ReleaseCreated
from slmops.events.payloads import ArtifactRef, ReleaseEntry
from slmops_rollout.fleet import GatewayRecord
from slmops_rollout.plans import WavePolicy
from slmops_rollout.state import RolloutState
from slmops_rollout.targets import NoTargets, NoVariant, desired_models, plan, without_variant

ART = ArtifactRef(digest="sha256:" + "a" * 64, size_bytes=1, uri="s3://b/x")
SHIPPED = ReleaseEntry(device_class="cpu", variant_id="v-1", artifact=ART,
                       manifest_digest="sha256:" + "b" * 64, reason="smallest")  # fmt: skip
NONE_PASSED = ReleaseEntry(device_class="npu", reason="no variant passed validation (qdq: ...)")


def _release(*entries: ReleaseEntry) -> ReleaseCreated:
    return ReleaseCreated(release_id="rel-1", model_name="m", version="1", entries=list(entries))


def _state(release: ReleaseCreated, selector: dict[str, str]) -> RolloutState:
    return RolloutState(
        rollout_id="ro-1", release_id=release.release_id, model_name="m", version="1",
        desired=desired_models(release), selector=selector, policy=WavePolicy(percents=[100]),
        skipped=without_variant(release), waves=[], gateways={},
    )  # fmt: skip


def _gateway(gateway_id: str, device_class: str, **labels: str) -> GatewayRecord:
    return GatewayRecord(gateway_id=gateway_id, device_class=device_class, labels=labels)


def test_a_partial_release_targets_only_its_classes_with_a_variant_and_names_the_rest() -> None:
    state = _state(_release(SHIPPED, NONE_PASSED), {"site": "a"})
    fleet = [_gateway("c1", "cpu", site="a"), _gateway("c2", "cpu", site="b"),
             _gateway("n1", "npu", site="a")]  # fmt: skip

    assert plan(state, fleet)

    assert state.waves == [["c1"]]  # not the other site, not the class without a variant
    assert set(state.desired) == {"cpu"}
    assert state.skipped == {"npu": "no variant: no variant passed validation (qdq: ...)"}


def test_a_class_with_a_variant_but_no_matching_gateway_is_named_with_the_selector() -> None:
    other = SHIPPED.model_copy(update={"device_class": "arm", "variant_id": "v-2"})
    state = _state(_release(SHIPPED, other), {"site": "a"})

    assert plan(state, [_gateway("c1", "cpu", site="a"), _gateway("a1", "arm", site="b")])

    assert state.waves == [["c1"]]
    assert state.skipped == {"arm": "no registered gateway of class arm matches selector site=a"}


def test_no_gateway_to_ship_to_is_refused_with_the_reason_per_class() -> None:
    state = _state(_release(SHIPPED, NONE_PASSED), {"site": "mars"})

    assert not plan(state, [_gateway("c1", "cpu", site="a")])
    refusal = NoTargets(state)

    assert (state.waves, state.gateways) == ([], {})
    assert "no registered gateway of cpu matches selector site=mars" in str(refusal)
    assert refusal.reasons == {
        "cpu": "no registered gateway of class cpu matches selector site=mars",
        "npu": "no variant: no variant passed validation (qdq: ...)",
    }


def test_a_release_without_any_variant_is_refused_with_the_reason_per_class() -> None:
    with pytest.raises(NoVariant, match="m 1 has no release to roll out") as refused:
        desired_models(_release(NONE_PASSED))

    assert refused.value.reasons == {"npu": "no variant: no variant passed validation (qdq: ...)"}
