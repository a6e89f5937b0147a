"""Wave planning: cumulative shares, at least one gateway per wave, a stable spread order."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from slmops_rollout.plans import WavePolicy, matches, order, plan_waves, wave_plans

GATEWAYS = [f"gw-{i:04d}" for i in range(1000)]


def test_default_waves_are_1_10_50_100_percent_of_the_targets() -> None:
    waves = plan_waves("ro-1", GATEWAYS, WavePolicy())
    assert [len(w) for w in waves] == [10, 90, 400, 500]
    assert sorted(g for w in waves for g in w) == sorted(GATEWAYS)  # each gateway once
    plans = wave_plans(waves, WavePolicy())
    assert [p.percent for p in plans] == [1.0, 10.0, 50.0, 100.0]


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
