"""The rollout rule: thresholds, soak, silent gateways, stale and foreign reports."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from slmops.events import GatewayReport
from slmops.events.payloads import ArtifactRef, DesiredModel
from slmops_rollout.plans import WavePolicy, plan_waves
from slmops_rollout.state import GatewayProgress, RolloutState, decide, record

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
ART = ArtifactRef(digest="sha256:" + "a" * 64, size_bytes=1, uri="s3://b/x")
DESIRED = DesiredModel(model_name="m", version="1", variant_id="v-1",
                       manifest_digest="sha256:" + "b" * 64, artifact=ART)  # fmt: skip


def _state(count: int = 100, **policy: float) -> RolloutState:
    gateways = [f"gw-{i}" for i in range(count)]
    pol = WavePolicy(soak_s=60, silent_timeout_s=300, **policy)  # type: ignore[arg-type]
    waves = plan_waves("ro-1", gateways, pol)
    progress = {g: GatewayProgress(wave=w, status="assigned", generation=1, assigned_at=T0)
                for w, wave in enumerate(waves) for g in wave}  # fmt: skip
    return RolloutState(rollout_id="ro-1", release_id="rel-1", model_name="m", version="1",
                        desired={"cpu": DESIRED}, policy=pol, waves=waves, gateways=progress,
                        wave_started_at=T0)  # fmt: skip


def _report(gw: str, kind: str, rollout_id: str = "ro-1", generation: int = 1) -> GatewayReport:
    return GatewayReport(
        gateway_id=gw, kind=kind, device_class="cpu",  # type: ignore[arg-type]
        rollout_id=rollout_id, generation=generation, variant_id="v-1",
    )  # fmt: skip


def test_a_wave_advances_only_when_applied_and_soaked() -> None:
    state = _state()
    canary = state.waves[0]  # 1 gateway of 100
    assert decide(state, T0).action == "wait"
    assert record(state, _report(canary[0], "applied"))
    soaking = decide(state, T0 + timedelta(seconds=10))
    assert (soaking.action, soaking.reason) == ("wait", "wave 0: soaking 10/60 s")
    assert decide(state, T0 + timedelta(seconds=61)).action == "advance"


def test_failures_over_the_error_threshold_pause() -> None:
    state = _state(error_threshold=0.05)
    state.wave_index = 1  # 9 gateways
    wave = state.waves[1]
    record(state, _report(wave[0], "failed"))
    decision = decide(state, T0)
    assert decision.action == "pause"
    assert f"1 of {len(wave)} gateways failed" in decision.reason


def test_a_silent_gateway_times_out_and_does_not_block_its_wave() -> None:
    state = _state()
    state.wave_index = 1
    wave = state.waves[1]
    for gw in wave[1:]:
        record(state, _report(gw, "applied"))
    assert decide(state, T0 + timedelta(seconds=120)).action == "wait"  # still waiting for one
    later = decide(state, T0 + timedelta(seconds=301))
    assert later.action == "advance"
    assert later.figures.silent == 1
    assert "1 silent (timed out)" in later.reason


def test_the_last_wave_completes_and_foreign_or_stale_reports_are_ignored() -> None:
    state = _state(count=3)
    state.wave_index = len(state.waves) - 1
    gw = state.waves[-1][0]
    assert not record(state, _report(gw, "applied", rollout_id="ro-other"))
    assert not record(state, _report(gw, "applied", generation=0))  # an older assignment
    assert not record(state, _report("gw-unknown", "applied"))
    assert record(state, _report(gw, "applied"))
    assert decide(state, T0 + timedelta(seconds=61)).action == "complete"


def test_a_health_gate_breach_rolls_back_only_the_breaching_gateways() -> None:
    from slmops.events.payloads import HealthAggregate

    state = _state(max_latency_ratio=1.5, health_min_requests=5)
    state.wave_index = 1
    wave = state.waves[1]
    for gw in wave:
        record(state, _report(gw, "applied"))
        state.gateways[gw].baseline_p95_ms = 4.0

    def health(p95: float, requests: int = 50, errors: float = 0.0) -> HealthAggregate:
        return HealthAggregate(window_s=30, request_count=requests, error_rate=errors,
                               latency_p95_ms=p95)  # fmt: skip

    fine = {gw: health(5.0) for gw in wave}
    assert decide(state, T0 + timedelta(seconds=61), fine).action == "advance"
    slow = {**fine, wave[0]: health(40.0), wave[1]: health(40.0, requests=2)}  # 2: too few
    decision = decide(state, T0 + timedelta(seconds=10), slow)
    assert decision.action == "rollback"
    assert decision.breached == [wave[0]]
    assert "10.00x the previous model's > 1.5x" in decision.reason
    erring = {**fine, wave[2]: health(4.0, errors=0.2)}
    assert decide(state, T0, erring).breached == [wave[2]]


def test_acknowledgements_count_and_approval_holds_the_next_wave() -> None:
    state = _state(approval_waves=[1])  # type: ignore[arg-type]
    canary = state.waves[0][0]
    assert record(state, _report(canary, "acknowledged"))
    assert state.gateways[canary].status == "acknowledged"
    assert decide(state, T0).figures.acknowledged == 1
    assert record(state, _report(canary, "applied"))
    assert not record(state, _report(canary, "acknowledged"))  # late: never undoes applied
    held = decide(state, T0 + timedelta(seconds=61))
    assert (held.action, held.reason) == ("wait", "wave 0 done: wave 1 waits for approval")
    state.approved_waves.append(1)
    assert decide(state, T0 + timedelta(seconds=61)).action == "advance"


def test_rolled_back_gateways_leave_their_wave_and_do_not_block_a_resume() -> None:
    state = _state()
    state.wave_index = 1
    wave = state.waves[1]
    state.gateways[wave[0]].status = "rolled_back"
    for gw in wave[1:]:
        record(state, _report(gw, "applied"))
    decision = decide(state, T0 + timedelta(seconds=61))
    assert decision.action == "advance"
    assert (decision.figures.rolled_back, decision.figures.counted) == (1, len(wave) - 1)


def test_approval_of_the_first_wave_or_beyond_the_last_is_refused() -> None:
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="approval_waves \\[0, 4\\] are not waves after"):
        WavePolicy(approval_waves=[0, 4])


def test_every_health_gate_is_judged_even_when_another_passes() -> None:
    from slmops.events.payloads import HealthAggregate

    state = _state(min_shadow_agreement=0.9)  # type: ignore[arg-type]
    canary = state.waves[0][0]
    record(state, _report(canary, "applied"))
    state.gateways[canary].baseline_p95_ms = 4.0
    fine_latency_bad_shadow = HealthAggregate(window_s=30, request_count=50, error_rate=0.0,
                                              latency_p95_ms=4.0, shadow_agreement=0.8)  # fmt: skip
    decision = decide(state, T0, {canary: fine_latency_bad_shadow})
    assert decision.breached == [canary]
    assert "shadow agreement 0.800 < 0.9" in decision.reason
