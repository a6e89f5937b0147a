"""What moves a rollout after it started: the ticker's step, rollbacks, and operator controls.

``tick`` asks the pure rule (``state.decide``) what each running rollout's current wave
allows and does it: advance, complete, pause, or roll gateways back. Rollbacks are signed by
the registry (a gateway refuses a lower version otherwise) and go to what each gateway ran when
the rollout was planned. Operators pause, resume, cancel, approve a wave or roll back the
whole rollout through the API.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Literal

from slmops.events import GatewayAssignment, RolloutCompleted, RolloutPaused, RolloutResumed
from slmops.events.payloads import DesiredModel, HealthAggregate, RolloutRolledBack
from slmops_rollout.engine import Engine
from slmops_rollout.state import RolloutState, decide, health_breaches

Action = Literal["pause", "resume", "cancel", "approve", "rollback"]
ACTIONS: tuple[Action, ...] = ("pause", "resume", "cancel", "approve", "rollback")
_ALLOWED: dict[str, set[str]] = {
    "pause": {"running"},
    "resume": {"paused"},
    "cancel": {"waiting", "running", "paused"},
    "approve": {"running", "paused"},
    "rollback": {"running", "paused", "completed"},
}
_REACHED = ("assigned", "acknowledged", "applied", "failed")  # got the new model's assignment


async def tick(engine: Engine) -> None:
    """Move every running rollout one step if its current wave allows; start waiting ones
    whose gateways have registered; cohort statements past half their lifetime are signed
    again."""
    if engine.cohorts is not None:
        await engine.cohorts.renew()
    for state in await engine.all():
        if state.status == "waiting":  # for gateways to register: planned once they have
            await engine.start_waiting(state)
            continue
        if state.status == "paused" and state.policy.rollback_scope == "gateways":
            await _protect(engine, state)
            continue
        if state.status != "running" or state.wave_started_at is None:
            continue
        engine.resume_sending(state)  # after a restart: the unsent rest of the wave
        now = datetime.now(UTC)
        known = engine.live[state.rollout_id].figures(now)
        decision = decide(state, now, wave_health(engine, state), known)
        if decision.action == "rollback":
            scope = state.policy.rollback_scope
            targets = (decision.breached if scope == "gateways"
                       else _reached_by_fleet_rollback(engine, state))  # fmt: skip
            await roll_back(engine, state, targets, decision.reason, scope=scope)
        elif decision.action == "advance":
            await engine.begin_wave(state.rollout_id, state.wave_index + 1)
        elif decision.action == "complete":
            await _finish(engine, state, decision.reason)
        elif decision.action == "pause":
            await _set(engine, state, "paused", decision.reason)
            await engine.announce(RolloutPaused(rollout_id=state.rollout_id,
                                                wave_index=state.wave_index,
                                                reason=decision.reason),
                                  f"paused-{state.wave_index}")  # fmt: skip


async def _protect(engine: Engine, state: RolloutState) -> None:
    """A paused rollout still protects its current wave: a gateway whose health on the new
    model breaches a gate after the pause (its report came a moment after the others', or
    an operator paused) is rolled back like the ones before it."""
    breaches = health_breaches(state, wave_health(engine, state))
    if breaches:
        why = "; ".join(f"{g}: {r}" for g, r in sorted(breaches.items()))
        reason = f"wave {state.wave_index} health gate (while paused): {why}"
        await roll_back(engine, state, sorted(breaches), reason, scope="gateways")


async def _finish(engine: Engine, state: RolloutState, reason: str) -> None:
    await engine.reach_the_rest(state)  # again after a restart: it writes only what lacks it
    await _set(engine, state, "completed", reason)
    done = list(state.gateways.values())
    await engine.announce(RolloutCompleted(
        rollout_id=state.rollout_id,
        gateways_updated=sum(p.status == "applied" for p in done),
        gateways_failed=sum(p.status == "failed" for p in done),
        gateways_silent=sum(p.status in ("assigned", "acknowledged") for p in done),
    ), "completed")  # fmt: skip


def wave_health(engine: Engine, state: RolloutState) -> dict[str, HealthAggregate | None]:
    """The latest health of the current wave's gateways on the model being rolled out."""
    wanted = {d.variant_id for d in state.desired.values()}
    health: dict[str, HealthAggregate | None] = {}
    for gateway_id, aggregate in engine.health.on(wanted):
        progress = state.gateways.get(gateway_id)
        if progress is not None and progress.wave == state.wave_index:
            health[gateway_id] = aggregate
    return health


def _reached(state: RolloutState) -> list[str]:
    return sorted(g for g, p in state.gateways.items() if p.status in _REACHED)


def _reached_by_fleet_rollback(engine: Engine, state: RolloutState) -> list[str]:
    """The rollout's reached gateways, and those that installed its model without being in
    its plan (registered later, or changed labels, and read it from their cohort's state):
    the fleet records say so (their applied report named the rollout)."""
    variants = {desired.variant_id for desired in state.desired.values()}
    unplanned = [
        gateway_id for gateway_id, record in engine.gateways.records.items()
        if gateway_id not in state.gateways and record.last_rollout_id == state.rollout_id
        and record.running_variant_id in variants
    ]  # fmt: skip
    return _reached(state) + sorted(unplanned)


async def roll_back(
    engine: Engine, state: RolloutState, gateway_ids: list[str], reason: str,
    *, scope: Literal["gateways", "fleet"],
) -> list[str]:  # fmt: skip
    """Signed rollbacks of ``gateway_ids`` to what each ran before; returns those sent.
    Gateways scope pauses the rollout; fleet scope ends it as rolled back."""
    targets: dict[str, tuple[DesiredModel, str, int] | None] = {}
    assignments = []
    generation = await engine.next_generation()
    for gateway_id in gateway_ids:
        progress = state.gateways.get(gateway_id)
        if progress is not None:
            previous = progress.previous_variant_id
        else:  # installed from its cohort unplanned: its record says what it ran before
            previous = engine.gateways.records[gateway_id].previous_variant_id
        if previous is None:
            continue  # it ran nothing before: there is nothing to go back to
        if previous not in targets:
            model = await engine.desired_model(previous)
            signature, expires_at = await engine.registry.sign_rollback(previous, state.rollout_id)
            targets[previous] = (model, signature, expires_at) if model else None
        target = targets[previous]
        if target is None:
            continue  # the registry no longer knows it
        assignments.append(GatewayAssignment(
            gateway_id=gateway_id, generation=generation, rollout_id=state.rollout_id,
            desired=target[0], rollback=True, signature=target[1],
            signature_expires_at=target[2],
        ))  # fmt: skip
    await engine.deliver(assignments)
    if scope == "fleet" and engine.cohorts is not None:  # no late joiner installs it either
        await engine.cohorts.withdraw(state.rollout_id, generation)
    rolled = [a.gateway_id for a in assignments]
    planned = [g for g in rolled if g in state.gateways]
    for gateway_id in planned:
        progress = state.gateways[gateway_id]
        progress.status, progress.generation = "rolled_back", generation
    await _set(engine, state, "paused" if scope == "gateways" else "rolled_back", reason, planned)
    to_variants = {a.desired.variant_id for a in assignments}
    event = RolloutRolledBack(
        rollout_id=state.rollout_id, scope=scope, reason=reason, gateway_ids=rolled,
        to_variant_id=to_variants.pop() if len(to_variants) == 1 else None,
    )  # fmt: skip
    back = sum(p.status == "rolled_back" for p in state.gateways.values())  # one event each
    await engine.announce(event, f"rolled-back-{state.wave_index}-{state.controls}-{back}")
    return rolled


async def control(engine: Engine, rollout_id: str, action: Action, reason: str) -> RolloutState:
    """An operator's request; raises LookupError / ValueError with the why."""
    state = await engine.get(rollout_id)
    if state is None:
        raise LookupError(f"no rollout {rollout_id}")
    if state.status not in _ALLOWED[action]:
        raise ValueError(f"cannot {action} a rollout that is {state.status}")
    state.controls += 1
    what = f"{action}-{state.controls}"  # one event per request, even a repeated one
    if action == "approve":
        following = state.wave_index + 1
        waiting = [w for w in state.policy.approval_waves if w not in state.approved_waves]
        if following not in waiting:
            state.controls -= 1
            raise ValueError(f"nothing to approve: wave {following} needs no approval"
                             if following < len(state.waves) else "nothing to approve")  # fmt: skip
        state.approved_waves.append(following)
        await _set(engine, state, state.status, reason or f"wave {following} approved")
    elif action == "rollback":
        why = reason or "rollback requested"
        await roll_back(engine, state, _reached_by_fleet_rollback(engine, state), why,
                        scope="fleet")  # fmt: skip
    else:
        status = {"pause": "paused", "resume": "running", "cancel": "cancelled"}[action]
        await _set(engine, state, status, reason or f"{action} requested")
        if action == "cancel" and engine.cohorts is not None:
            # no gateway starts installing it from now on (those that did keep it, as with
            # per-gateway assignments already sent): its entries leave the cohorts reached
            await engine.cohorts.withdraw(rollout_id, await engine.next_generation())
        if action == "pause":
            await engine.announce(RolloutPaused(rollout_id=rollout_id,
                                                wave_index=state.wave_index,
                                                reason=state.reason), what)  # fmt: skip
        elif action == "resume":
            engine.resume_sending(state)
            await engine.announce(
                RolloutResumed(rollout_id=rollout_id, wave_index=state.wave_index), what
            )
    return state


async def _set(
    engine: Engine, state: RolloutState, status: str, reason: str, gateways: Iterable[str] = ()
) -> None:
    state.status, state.reason = status, reason  # type: ignore[assignment]
    await engine.live[state.rollout_id].commit(gateways)
