"""Rollouts doing their work: plan from the fleet, assign wave by wave, follow the reports.

Each step is durable before it is announced: the rollout state is written to KV, every
gateway's desired state is written to KV (the source of truth a reconnecting gateway reads),
then the assignment is published as the notification. A restarted service finds the state in
KV and its ticker carries on from the wave it was in.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from datetime import UTC, datetime
from typing import Any

import nats.js.errors
from nats.js.kv import KeyValue

from slmops.bus import Bus
from slmops.bus.kvstate import update_model
from slmops.events import (
    GatewayAssignment,
    GatewayReport,
    ReleaseCreated,
    RolloutCompleted,
    RolloutPaused,
    RolloutResumed,
    RolloutRolledBack,
    RolloutStarted,
    RolloutWaveStarted,
    derive_event_id,
    new_event,
)
from slmops.events.payloads import DesiredModel
from slmops.service.registry_api import RegistryClient
from slmops_rollout.fleet import GatewayRecord
from slmops_rollout.plans import WavePolicy, matches, plan_waves, wave_plans
from slmops_rollout.state import GatewayProgress, RolloutState, decide, record

log = logging.getLogger(__name__)
SOURCE = "/slmops/rollout"


def rollout_id_for(release_id: str, selector: dict[str, str]) -> str:
    key = json.dumps([release_id, sorted(selector.items())])
    return "ro-" + hashlib.sha256(key.encode()).hexdigest()[:20]


class Engine:
    def __init__(
        self, bus: Bus, rollouts: KeyValue, desired: KeyValue, gateways: KeyValue,
        registry: RegistryClient,
    ) -> None:  # fmt: skip
        self.bus, self.rollouts, self.desired, self.gateways = bus, rollouts, desired, gateways
        self.registry = registry

    async def start(
        self, release: ReleaseCreated, selector: dict[str, str], policy: WavePolicy
    ) -> RolloutState:
        """Plan and begin a rollout of ``release`` (the same release and selector: the same
        rollout, returned as it is)."""
        rollout_id = rollout_id_for(release.release_id, selector)
        existing = await self.get(rollout_id)
        if existing is not None:
            return existing
        desired = {
            e.device_class: DesiredModel(
                model_name=release.model_name,
                version=release.version,
                variant_id=e.variant_id,
                manifest_digest=e.manifest_digest,
                artifact=e.artifact,
            )
            for e in release.entries
            if e.variant_id and e.manifest_digest and e.artifact
        }
        fleet = [r for r in await self.fleet() if r.device_class in desired]
        targets = [r.gateway_id for r in fleet if matches(r.labels, selector)]
        waves = plan_waves(rollout_id, targets, policy)
        state = RolloutState(
            rollout_id=rollout_id, release_id=release.release_id,
            model_name=release.model_name, version=release.version, desired=desired,
            selector=selector, policy=policy, waves=waves,
            gateways={g: GatewayProgress(wave=i) for i, wave in enumerate(waves) for g in wave},
            status="running" if waves else "completed",
            reason="" if waves else "no registered gateway matches the release and selector",
        )  # fmt: skip
        await self.rollouts.create(_key(rollout_id), state.model_dump_json().encode())
        started = RolloutStarted(rollout_id=rollout_id, release_id=release.release_id,
                                 model_name=release.model_name, version=release.version,
                                 waves=wave_plans(waves, policy), selector=selector)  # fmt: skip
        await self._announce(started, "started")
        if waves:
            await self.assign_wave(rollout_id, 0)
        return state

    async def assign_wave(self, rollout_id: str, index: int) -> None:
        """Write each gateway's desired state, then notify it (pipelined)."""
        state = await self.get(rollout_id)
        if state is None or index >= len(state.waves):
            return
        now = datetime.now(UTC)
        assigned: dict[str, tuple[int, DesiredModel | None, float | None]] = {}
        for gateway_id in state.waves[index]:
            record_ = await self._record(gateway_id)
            previous = await self._current(gateway_id)
            health = record_.health
            same = record_.health_variant_id == record_.running_variant_id
            baseline = health.latency_p95_ms if health and same else None
            assignment = GatewayAssignment(
                gateway_id=gateway_id,
                generation=previous[0] + 1 if previous else 1,
                rollout_id=rollout_id, desired=state.desired[record_.device_class],
            )  # fmt: skip
            await self.desired.put(gateway_id, assignment.model_dump_json().encode())
            assigned[gateway_id] = (assignment.generation,
                                    previous[1] if previous else None, baseline)  # fmt: skip
            await self.bus.publish(new_event(assignment, source=SOURCE))

        def mark(s: RolloutState) -> None:
            s.wave_index, s.wave_started_at = index, now
            for gateway_id, (generation, before, baseline) in assigned.items():
                progress = s.gateways[gateway_id]
                progress.status, progress.generation, progress.assigned_at = (
                    "assigned", generation, now)  # fmt: skip
                progress.previous, progress.baseline_p95_ms = before, baseline

        await update_model(self.rollouts, _key(rollout_id), RolloutState, mark, _missing)
        wave = RolloutWaveStarted(rollout_id=rollout_id, wave_index=index,
                                  target_count=len(assigned))  # fmt: skip
        await self._announce(wave, f"wave-{index}")

    async def on_report(self, report: GatewayReport) -> None:
        if report.rollout_id is None or await self.get(report.rollout_id) is None:
            return

        def fold(state: RolloutState) -> None:
            record(state, report)

        await update_model(self.rollouts, _key(report.rollout_id), RolloutState, fold, _missing)

    async def tick(self) -> None:
        """Move every running rollout one step if its current wave allows."""
        running = [s for s in await self.all() if s.status == "running" and s.wave_started_at]
        for state in running:
            # Only the current wave's records: a tick must not read the whole fleet.
            wave = state.waves[state.wave_index] if state.wave_index < len(state.waves) else []
            records = await asyncio.gather(*(self._record(g) for g in wave))
            wanted = {d.variant_id for d in state.desired.values()}
            health = {r.gateway_id: r.health for r in records if r.health_variant_id in wanted}
            decision = decide(state, datetime.now(UTC), health)
            if decision.action == "rollback":
                await self._roll_back(state, decision.breached, decision.reason)
            elif decision.action == "advance":
                await self.assign_wave(state.rollout_id, state.wave_index + 1)
            elif decision.action in ("complete", "pause"):
                status = "completed" if decision.action == "complete" else "paused"
                await self._set_status(state.rollout_id, status, decision.reason)
                if status == "completed":
                    done = list(state.gateways.values())  # never answered: silent
                    await self._announce(RolloutCompleted(
                        rollout_id=state.rollout_id,
                        gateways_updated=sum(p.status == "applied" for p in done),
                        gateways_failed=sum(p.status == "failed" for p in done),
                        gateways_silent=sum(p.status == "assigned" for p in done),
                    ), "completed")  # fmt: skip
                else:
                    await self._announce(RolloutPaused(rollout_id=state.rollout_id,
                        wave_index=state.wave_index, reason=decision.reason),
                        f"paused-{state.wave_index}")  # fmt: skip

    async def _roll_back(self, state: RolloutState, gateway_ids: list[str], reason: str) -> None:
        """Signed rollbacks of the breached gateways to what they ran; the rollout pauses."""
        signatures: dict[str, str] = {}
        rolled: list[str] = []
        target = None
        for gateway_id in gateway_ids:
            previous = state.gateways[gateway_id].previous
            if previous is None:
                continue  # it ran nothing before: there is nothing to go back to
            if previous.variant_id not in signatures:
                signed = await self.registry.sign_rollback(previous.variant_id, state.rollout_id)
                signatures[previous.variant_id] = signed
            current = await self._current(gateway_id)
            assignment = GatewayAssignment(
                gateway_id=gateway_id, generation=(current[0] if current else 0) + 1,
                rollout_id=state.rollout_id, desired=previous, rollback=True,
                signature=signatures[previous.variant_id],
            )  # fmt: skip
            await self.desired.put(gateway_id, assignment.model_dump_json().encode())
            await self.bus.publish(new_event(assignment, source=SOURCE))
            rolled.append(gateway_id)
            target = previous.variant_id

        def mark(s: RolloutState) -> None:
            s.status, s.reason = "paused", reason
            for gateway_id in rolled:
                s.gateways[gateway_id].status = "rolled_back"

        await update_model(self.rollouts, _key(state.rollout_id), RolloutState, mark, _missing)
        event = RolloutRolledBack(rollout_id=state.rollout_id, scope="gateways", reason=reason,
                                  to_variant_id=target, gateway_ids=rolled)  # fmt: skip
        await self._announce(event, f"rolled-back-{state.wave_index}")

    async def control(self, rollout_id: str, action: str, reason: str) -> RolloutState:
        """pause, resume or cancel on request; raises LookupError / ValueError with the why."""
        state = await self.get(rollout_id)
        if state is None:
            raise LookupError(f"no rollout {rollout_id}")
        allowed = {"pause": {"running"}, "resume": {"paused"}, "cancel": {"running", "paused"}}
        if state.status not in allowed[action]:
            raise ValueError(f"cannot {action} a rollout that is {state.status}")
        status = {"pause": "paused", "resume": "running", "cancel": "cancelled"}[action]

        def change(s: RolloutState) -> None:
            s.status, s.reason = status, reason or f"{action} requested"  # type: ignore[assignment]
            s.controls += 1

        state = await update_model(self.rollouts, _key(rollout_id), RolloutState, change, _missing)
        what = f"{action}-{state.controls}"  # one event per request, even a repeated one
        if action == "pause":
            await self._announce(RolloutPaused(rollout_id=rollout_id, wave_index=state.wave_index,
                                               reason=state.reason), what)  # fmt: skip
        elif action == "resume":
            await self._announce(
                RolloutResumed(rollout_id=rollout_id, wave_index=state.wave_index), what
            )
        return state

    async def _set_status(self, rollout_id: str, status: str, reason: str) -> None:
        def change(s: RolloutState) -> None:
            s.status, s.reason = status, reason  # type: ignore[assignment]

        await update_model(self.rollouts, _key(rollout_id), RolloutState, change, _missing)

    async def _announce(self, payload: Any, what: str) -> None:
        rollout_id = payload.rollout_id
        event_id = derive_event_id("rollout", f"{rollout_id}/{what}")
        await self.bus.publish(new_event(payload, source=SOURCE, event_id=event_id))

    async def get(self, rollout_id: str) -> RolloutState | None:
        try:
            entry = await self.rollouts.get(_key(rollout_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        return RolloutState.model_validate_json(entry.value or b"{}")

    async def all(self) -> list[RolloutState]:
        try:
            keys = await self.rollouts.keys()
        except nats.js.errors.NoKeysError:
            return []
        ids = [k.removeprefix("rollout.") for k in keys if k.startswith("rollout.")]
        found = await asyncio.gather(*(self.get(i) for i in ids))
        return [s for s in found if s is not None]

    async def fleet(self) -> list[GatewayRecord]:
        try:
            keys = await self.gateways.keys()
        except nats.js.errors.NoKeysError:
            return []
        entries = await asyncio.gather(*(self.gateways.get(k) for k in keys))
        return [GatewayRecord.model_validate_json(e.value or b"{}") for e in entries]

    async def _record(self, gateway_id: str) -> GatewayRecord:
        entry = await self.gateways.get(gateway_id)
        return GatewayRecord.model_validate_json(entry.value or b"{}")

    async def _current(self, gateway_id: str) -> tuple[int, DesiredModel] | None:
        """(generation, desired model) of the gateway's current assignment, if any."""
        try:
            entry = await self.desired.get(gateway_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        assignment = GatewayAssignment.model_validate_json(entry.value or b"{}")
        return assignment.generation, assignment.desired


def _key(rollout_id: str) -> str:
    return f"rollout.{rollout_id}"


def _missing() -> RolloutState:
    raise LookupError("the rollout state vanished from the KV bucket")
