"""The current wave's figures kept as counts (``tally.py``) always equal a count afresh
(``state.figures``), whatever order gateways change in, as time passes, and across waves
and plans."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from slmops.events.payloads import ArtifactRef, DesiredModel
from slmops_rollout.plans import WavePolicy, plan_waves
from slmops_rollout.state import GatewayProgress, GatewayStatus, RolloutState, figures
from slmops_rollout.tally import WaveTally

ART = ArtifactRef(digest="sha256:" + "a" * 64, size_bytes=1, uri="s3://b/x")
DESIRED = DesiredModel(model_name="m", version="1", variant_id="v-1",
                       manifest_digest="sha256:" + "b" * 64, artifact=ART)  # fmt: skip
STATUSES: list[GatewayStatus] = ["pending", "assigned", "acknowledged", "applied", "failed",
                                 "rolled_back"]  # fmt: skip
T0 = datetime(2026, 12, 4, 12, tzinfo=UTC)
TIMEOUT_S = 60


def _state(count: int) -> RolloutState:
    gateways = [f"gw-{i:04d}" for i in range(count)]
    policy = WavePolicy(percents=[10, 50, 100], silent_timeout_s=TIMEOUT_S)
    waves = plan_waves("ro-t", gateways, policy)
    progress = {g: GatewayProgress(wave=w, device_class="cpu")
                for w, wave in enumerate(waves) for g in wave}  # fmt: skip
    return RolloutState(rollout_id="ro-t", release_id="rel-1", model_name="m", version="1",
                        desired={"cpu": DESIRED}, policy=policy, waves=waves,
                        gateways=progress)  # fmt: skip


def _change(state: RolloutState, rng: random.Random, count: int) -> list[str]:
    """``count`` gateways of any wave to any status, some assigned at one of a few moments."""
    changed = rng.sample(sorted(state.gateways), count)
    for gateway_id in changed:
        progress = state.gateways[gateway_id]
        progress.status = rng.choice(STATUSES)
        if rng.random() < 0.7:
            progress.assigned_at = T0 + timedelta(seconds=rng.choice([0, 10, 30, 45]))
    return changed


def _assert_same_at_several_moments(tally: WaveTally, state: RolloutState) -> None:
    for later_s in (0, 50, 65, 70, 90, 200):  # before, at, across and after turning silent
        now = T0 + timedelta(seconds=later_s)
        assert tally.figures(state, now) == figures(state, now), later_s


def test_counts_follow_every_change_like_a_count_afresh() -> None:
    rng = random.Random(7)
    state, tally = _state(400), WaveTally()
    _assert_same_at_several_moments(tally, state)
    for step in range(60):
        tally.moved(state, _change(state, rng, rng.randint(1, 25)))
        _assert_same_at_several_moments(tally, state)
        if step in (20, 40):  # the next wave: counted afresh, then followed again
            state.wave_index += 1
            _assert_same_at_several_moments(tally, state)
    found = tally.figures(state, T0 + timedelta(seconds=70))
    assert found.targets == len(state.waves[2])
    assert found.silent > 0  # a real mix


def test_an_undone_change_and_an_unnamed_gateway_count_right() -> None:
    state, tally = _state(100), WaveTally()
    wave = state.waves[0]
    tally.figures(state, T0)
    for gateway_id in wave:  # sent, then taken back before the commit (NATS was away)
        state.gateways[gateway_id].status, state.gateways[gateway_id].assigned_at = "assigned", T0
    tally.moved(state, wave)
    for gateway_id in wave:
        state.gateways[gateway_id].status = "pending"
    tally.moved(state, [*wave, "gw-not-in-this-rollout"])
    later = T0 + timedelta(seconds=TIMEOUT_S + 1)
    found = tally.figures(state, later)
    assert (found.silent, found.waiting) == (0, len(wave))
    assert found == figures(state, later)


def test_a_rollout_planned_anew_is_counted_anew() -> None:
    state, tally = _state(50), WaveTally()
    tally.figures(state, T0)
    replanned = _state(80)  # a waiting rollout planned again once more gateways registered
    for progress in replanned.gateways.values():
        progress.status, progress.assigned_at = "applied", T0
    state.waves, state.gateways = replanned.waves, replanned.gateways
    found = tally.figures(state, T0)
    assert found.targets == len(replanned.waves[0]) == found.applied
    assert found == figures(state, T0)
