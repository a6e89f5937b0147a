"""Wave planning: cumulative shares, at least one gateway per wave, a stable spread order,
whole cohorts per wave."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from slmops.cohorts import cohort_of
from slmops_rollout.plans import WavePolicy, matches, order, plan_waves, wave_plans

GATEWAYS = [f"gw-{i:04d}" for i in range(1000)]


def test_default_waves_are_1_10_50_100_percent_of_the_targets_in_whole_cohorts() -> None:
    waves = plan_waves("ro-1", GATEWAYS, WavePolicy())
    assert sorted(g for w in waves for g in w) == sorted(GATEWAYS)  # each gateway once
    cohorts = [{cohort_of(g) for g in wave} for wave in waves]
    for a in range(len(cohorts)):  # a cohort's gateways are never split over two waves
        for b in range(a + 1, len(cohorts)):
            assert not cohorts[a] & cohorts[b]
    # each wave reaches its share, overshooting by at most the last cohort's other members
    largest = max(sum(cohort_of(g) == c for g in GATEWAYS) for c in set().union(*cohorts))
    cumulative = 0
    for wave, share in zip(waves, (10, 100, 500, 1000), strict=True):
        cumulative += len(wave)
        assert share <= cumulative < share + largest
    plans = wave_plans(waves, WavePolicy())
    assert plans[-1].percent == 100.0
    assert [round(p.percent) for p in plans[:-1]] != [100] * 3


def test_gateways_of_one_cohort_are_side_by_side_in_the_order() -> None:
    cohorts = [cohort_of(g) for g in order("ro-1", GATEWAYS)]
    runs = [c for i, c in enumerate(cohorts) if i == 0 or c != cohorts[i - 1]]
    assert len(runs) == len(set(cohorts))  # each cohort one contiguous run


def test_a_small_fleet_still_gets_a_canary_of_one_and_no_empty_wave() -> None:
    waves = plan_waves("ro-1", ["a", "b", "c"], WavePolicy())
    assert [len(w) for w in waves] == [1, 1, 1]
    assert plan_waves("ro-1", [], WavePolicy()) == []


def test_the_order_is_stable_per_rollout_and_differs_between_rollouts() -> None:
    assert order("ro-1", GATEWAYS) == order("ro-1", list(reversed(GATEWAYS)))
    assert order("ro-1", GATEWAYS)[:10] != order("ro-2", GATEWAYS)[:10]
    assert order("ro-1", GATEWAYS)[:10] != GATEWAYS[:10]  # not clustered by name


def test_selectors_match_every_key() -> None:
    assert matches({"site": "berlin", "tier": "edge"}, {"site": "berlin"})
    assert not matches({"site": "paris"}, {"site": "berlin"})
    assert matches({}, {})


def test_a_policy_must_rise_to_100() -> None:
    with pytest.raises(ValidationError, match="rise wave by wave"):
        WavePolicy(percents=[10, 5, 100])
    with pytest.raises(ValidationError, match="end at 100"):
        WavePolicy(percents=[1, 50])
