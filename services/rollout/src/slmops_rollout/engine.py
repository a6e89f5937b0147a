"""Rollouts doing their work: plan from the fleet, assign wave by wave, follow the reports.

The engine holds every rollout in memory and makes each change durable in KV before it
answers (``store.py``: header plus shards, group commits). A wave is sent as a background
task, in chunks, at most ``max_rate_per_min``: for each chunk, the cohorts of its gateways that
speak the cohort protocol get one signed state each (``cohorts.py``: KV, then one notification
per cohort), and older gateways their own desired state in KV and an assignment (pipelined).
A completing rollout also reaches every other cohort, so a gateway registering later finds
its model in its cohort's state. A restarted service loads its rollouts from
KV; its ticker re-sends whatever of the current wave was never sent and carries on. A rollout
that would reach no gateway is refused (``targets.NoTargets``), or, started automatically,
waits for gateways (``start_waiting``) - it is never "completed" having reached none.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import nats.js.errors
from nats.js.kv import KeyValue

from slmops.assignments import AssignmentSigner
from slmops.bus import Bus
from slmops.bus.kvstate import put_all
from slmops.cohorts import CohortEntry, cohort_of, speaks_cohorts
from slmops.events import (
    GatewayAssignment,
    ReleaseCreated,
    RolloutStarted,
    RolloutWaveStarted,
    derive_event_id,
    new_event,
)
from slmops.events.payloads import DesiredModel
from slmops.service.registry_api import RegistryClient
from slmops.tracing import current_traceparent, extract_trace_context
from slmops_rollout.cohorts import CohortTable
from slmops_rollout.fleet import Fleet, GatewayRecord, overlay_for
from slmops_rollout.health import LatestHealth
from slmops_rollout.plans import Overlay, WavePolicy, matches, wave_plans
from slmops_rollout.state import RolloutState
from slmops_rollout.store import LiveRollout, RolloutStore
from slmops_rollout.targets import NoTargets, desired_models, plan, waiting_reason, without_variant

log = logging.getLogger(__name__)
SOURCE = "/slmops/rollout"
CHUNK = 1000  # gateways per pipelined burst of KV puts and publishes
_GENERATION_KEY = "generation"


def cohort_chunks(gateway_ids: list[str], size: int) -> Iterator[list[str]]:
    """``gateway_ids`` (a wave: whole cohorts side by side) in bursts of about ``size`` that
    never split a cohort: each cohort's state is written once per wave."""
    batch: list[str] = []
    previous = None
    for gateway_id in gateway_ids:
        cohort = cohort_of(gateway_id)
        if len(batch) >= size and cohort != previous:
            yield batch
            batch = []
        batch.append(gateway_id)
        previous = cohort
    if batch:
        yield batch


def rollout_id_for(release_id: str, selector: dict[str, str]) -> str:
    key = json.dumps([release_id, sorted(selector.items())])
    return "ro-" + hashlib.sha256(key.encode()).hexdigest()[:20]


class Engine:
    def __init__(
        self, bus: Bus, rollouts: KeyValue, desired: KeyValue, gateways: KeyValue,
        registry: RegistryClient, signer: AssignmentSigner | None = None,
        cohorts: KeyValue | None = None,
    ) -> None:  # fmt: skip
        """``signer`` signs every assignment's and cohort's statement (None: unsigned, for
        tests of the engine alone; gateways with a trust root refuse them). ``cohorts``: the
        cohort bucket (None: every gateway gets its own assignment, the older protocol)."""
        self.bus, self.rollouts, self.desired = bus, rollouts, desired
        self.signer = signer
        self.cohorts = CohortTable(cohorts, bus, signer) if cohorts is not None else None
        self.gateways = Fleet(gateways, rollouts=self.all)  # outcomes restored from them
        self.registry = registry
        self.store = RolloutStore(rollouts)
        self.live: dict[str, LiveRollout] = {}
        self.health = LatestHealth()
        self._sending: dict[str, asyncio.Task[None]] = {}
        self._sent: dict[str, int] = {}  # rollout id -> its wave sent in full
        self._loaded = asyncio.Lock()
        self._is_loaded = False

    # --- reading --------------------------------------------------------------------------

    async def get(self, rollout_id: str) -> RolloutState | None:
        await self._load()
        live = self.live.get(rollout_id)
        return live.state if live else None

    async def all(self) -> list[RolloutState]:
        await self._load()
        return [live.state for live in self.live.values()]

    async def _load(self) -> None:
        """Once per process: every rollout from KV (a restarted service resumes them)."""
        if self._is_loaded:
            return
        async with self._loaded:
            if self._is_loaded:
                return
            for rollout_id in await self.store.ids():
                state = await self.store.load(rollout_id)
                if state is not None:
                    self.live[rollout_id] = LiveRollout(self.store, state)
            self._is_loaded = True

    # --- starting and sending --------------------------------------------------------------

    async def start(
        self, release: ReleaseCreated, selector: dict[str, str], policy: WavePolicy,
        overlays: Iterable[Overlay] = (), traceparent: str | None = None, *, wait: bool = False,
    ) -> RolloutState:  # fmt: skip
        """Plan and begin a rollout of ``release`` (the same release and selector: the same
        rollout, returned as it is). ``traceparent`` is the release's trace (default: the
        current span's): the rollout's work joins it, whoever asked for the rollout.

        Raises ``NoVariant`` when no class has a variant, and ``NoTargets`` when no registered
        gateway of a class with one matches ``selector`` - unless ``wait``: then the rollout is
        ``waiting`` and the ticker starts it once such gateways register (an automatic
        rollout's release may come before the fleet). A release proposed from field evidence
        targets only gateways of its classes that run its model (``targets.runs_wanted_model``):
        it replaces what the field measured, never another model on the same class."""
        rollout_id = rollout_id_for(release.release_id, selector)
        existing = await self.get(rollout_id)
        if existing is not None:
            return existing
        state = RolloutState(
            rollout_id=rollout_id, release_id=release.release_id,
            model_name=release.model_name, version=release.version,
            desired=desired_models(release), selector=selector, policy=policy,
            overlays=list(overlays), skipped=without_variant(release), waves=[], gateways={},
            traceparent=traceparent or current_traceparent(),
        )  # fmt: skip
        if release.proposal is not None:  # it replaces what the field measured, nothing else
            state.only_model = release.model_name
            state.only_variants = await self.variants_of(release)
        if not plan(state, await self.gateways.all()):
            if not wait:
                raise NoTargets(state)
            state.status, state.reason = "waiting", waiting_reason(state)
        try:
            await self.store.create(state)
        except nats.js.errors.KeyWrongLastSequenceError:  # a concurrent start won
            self._is_loaded = False
            return await self.get(rollout_id) or state
        self.live[rollout_id] = LiveRollout(self.store, state)
        if state.status == "waiting":
            log.warning("rollout %s of %s %s %s", rollout_id, state.model_name, state.version,
                        state.reason)  # fmt: skip
        else:
            await self._launch(state)
        return state

    async def variants_of(self, release: ReleaseCreated) -> list[str]:
        """The variants of ``release``'s model this service knows of (what its rollouts
        installed, and the one a proposal's evidence measured): gateways running one run it."""
        known = {
            desired.variant_id
            for state in await self.all() if state.model_name == release.model_name
            for desired in state.desired.values()
        }  # fmt: skip
        if release.proposal is not None:
            known.add(release.proposal.variant_id)
        return sorted(known)

    async def start_waiting(self, state: RolloutState) -> None:
        """A waiting rollout, once gateways it targets have registered: planned over the fleet
        as it is now and started (gateways registering later are welcomed as late joiners)."""
        if not plan(state, await self.gateways.all()):
            return
        await self.store.replace(state)  # still waiting: a crash here plans it again
        if state.status == "waiting":  # not cancelled meanwhile
            log.info("rollout %s found %d gateways: starting", state.rollout_id,
                     len(state.gateways))  # fmt: skip
            await self._launch(state)

    async def _launch(self, state: RolloutState) -> None:
        started = RolloutStarted(rollout_id=state.rollout_id, release_id=state.release_id,
                                 model_name=state.model_name, version=state.version,
                                 waves=wave_plans(state.waves, state.policy),
                                 selector=state.selector)  # fmt: skip
        await self.announce(started, "started")
        state.status, state.reason = "running", ""
        await self.begin_wave(state.rollout_id, 0)

    @contextlib.contextmanager
    def journey(self, rollout_id: str, what: str) -> Iterator[None]:
        """A span in the trace of the rollout's release, whoever acts (the ticker, an
        operator's request, a restarted process): the model's journey stays one trace."""
        live = self.live.get(rollout_id)
        traceparent = live.state.traceparent if live else None
        parent = extract_trace_context({"traceparent": traceparent}) if traceparent else None
        attributes = {"slmops.rollout_id": rollout_id}
        with self.bus.tracer.start_as_current_span(what, context=parent, attributes=attributes):
            yield

    async def begin_wave(self, rollout_id: str, index: int) -> None:
        """Make ``index`` the current wave (durably) and send it in the background."""
        live = self.live[rollout_id]
        state = live.state
        state.wave_index, state.wave_started_at = index, datetime.now(UTC)
        await live.commit()
        wave = RolloutWaveStarted(rollout_id=rollout_id, wave_index=index,
                                  target_count=len(state.waves[index]))  # fmt: skip
        await self.announce(wave, f"wave-{index}")
        self.resume_sending(state)

    def resume_sending(self, state: RolloutState) -> None:
        """Send the current wave's unsent (pending) gateways, unless that is under way."""
        task = self._sending.get(state.rollout_id)
        if task is not None and not task.done():
            return
        if self._sent.get(state.rollout_id) == state.wave_index:
            return  # all of it went out (the scan below is over the whole wave)
        wave = state.waves[state.wave_index] if state.wave_index < len(state.waves) else []
        pending = [g for g in wave if state.gateways[g].status == "pending"]
        if pending:
            self._sending[state.rollout_id] = asyncio.create_task(
                self._send(state.rollout_id, state.wave_index, pending),
                name=f"send {state.rollout_id}",
            )
        else:  # all sent (a restart after the last chunk)
            self._sent[state.rollout_id] = state.wave_index

    async def _send(self, rollout_id: str, wave_index: int, gateway_ids: list[str]) -> None:
        live = self.live[rollout_id]
        state = live.state
        per_s = state.policy.max_rate_per_min / 60.0
        chunk = max(1, min(CHUNK, int(per_s)))
        loop = asyncio.get_running_loop()
        began = loop.time()
        offset = 0
        if self.cohorts is not None:
            await self.cohorts.load()
        for batch in cohort_chunks(gateway_ids, chunk):
            if state.status != "running":
                return  # paused or cancelled: the rest waits (resume sends it)
            wait_s = began + offset / per_s - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            offset += len(batch)
            generation = await self.next_generation()
            now = datetime.now(UTC)
            for gateway_id in batch:
                progress = state.gateways[gateway_id]
                # A cohort that holds the entry already (sent before a restart) is announced
                # again, unchanged: its gateways report the entry's generation.
                held = self._held_generation(state, gateway_id)
                progress.status, progress.generation, progress.assigned_at = (
                    "assigned", held if held is not None else generation, now)  # fmt: skip
            try:
                await self.deliver(self._assignments(state, batch, generation))
                if self.cohorts is not None:
                    entries = self._entries(state, batch, generation)
                    with self.journey(rollout_id, f"reach {len(entries)} cohorts"):
                        await self.cohorts.reach(entries, generation)
            except Exception as exc:  # NATS away or overloaded: pending again, the ticker re-sends
                log.warning("sending %d assignments of %s failed (%r): pending again, sent on a "
                            "later tick", len(batch), rollout_id, exc)  # fmt: skip
                for gateway_id in batch:
                    state.gateways[gateway_id].status = "pending"
                live.undone(batch)
                return
            await live.commit(batch)
        self._sent[rollout_id] = wave_index

    async def reach_the_rest(self, state: RolloutState) -> int:
        """A completing rollout's entries into every cohort that lacks them, so gateways not
        in its plan (registered since, or relabelled) find it; returns how many were written.
        Once its last wave passed its gates, not as that wave is sent: signing the up to 1,024
        states takes this process ~0.2 s, which that wave's own reports waited behind."""
        if self.cohorts is None:
            return 0
        generation = await self.next_generation()
        rest = [self._entry(state, c, generation) for c in sorted(state.desired)]
        with self.journey(state.rollout_id, "reach the remaining cohorts"):
            written = await self.cohorts.reach_rest(rest, generation)
        log.info("%s: completing, it reached %d more cohorts", state.rollout_id, written)
        return written

    def _held_generation(self, state: RolloutState, gateway_id: str) -> int | None:
        """The generation of the entry for this gateway its cohort holds already, if any."""
        if self.cohorts is None or not self._speaks_cohorts(gateway_id):
            return None
        device_class = state.gateways[gateway_id].device_class
        entry = self.cohorts.entry_of(cohort_of(gateway_id), state.rollout_id, device_class)
        return entry.generation if entry is not None else None

    def _speaks_cohorts(self, gateway_id: str) -> bool:
        record_ = self.gateways.records.get(gateway_id)
        return (self.cohorts is not None and record_ is not None
                and speaks_cohorts(record_.capabilities))  # fmt: skip

    def _assignments(
        self, state: RolloutState, gateway_ids: list[str], generation: int
    ) -> list[GatewayAssignment]:
        """Own assignments for the gateways that speak only the per-gateway protocol."""
        return [
            GatewayAssignment(
                gateway_id=g, generation=generation, rollout_id=state.rollout_id,
                desired=state.desired[state.gateways[g].device_class],
                overlay=state.gateways[g].overlay,
            )
            for g in gateway_ids if not self._speaks_cohorts(g)
        ]  # fmt: skip

    def _entries(
        self, state: RolloutState, gateway_ids: list[str], generation: int
    ) -> dict[int, list[CohortEntry]]:
        """Per cohort of the gateways speaking the cohort protocol: an entry per class. The
        entries are the same for every cohort of a wave, so each class's is built once (a
        wave reaches up to 1,024 cohorts; building them per cohort was ~6 % of this service's
        CPU in bench.fleet)."""
        classes: dict[int, set[str]] = {}
        for gateway_id in gateway_ids:
            if self._speaks_cohorts(gateway_id):
                cohort = cohort_of(gateway_id)
                classes.setdefault(cohort, set()).add(state.gateways[gateway_id].device_class)
        built = {c: self._entry(state, c, generation) for c in set().union(*classes.values())}
        return {cohort: [built[c] for c in sorted(names)] for cohort, names in classes.items()}

    @staticmethod
    def _entry(state: RolloutState, device_class: str, generation: int) -> CohortEntry:
        return CohortEntry(
            rollout_id=state.rollout_id, generation=generation, device_class=device_class,
            desired=state.desired[device_class], selector=state.selector,
            overlays=list(state.overlays), only_model=state.only_model,
            only_variants=state.only_variants,
        )  # fmt: skip

    async def deliver(self, assignments: list[GatewayAssignment]) -> None:
        """Desired states into KV, then the notifications: each pipelined (in the trace of
        the rollout's release)."""
        if not assignments:
            return
        if self.signer is not None:
            assignments = [self.signer.sign(a) for a in assignments]
        with self.journey(
            assignments[0].rollout_id or "", f"deliver {len(assignments)} assignments"
        ):
            await put_all(self.desired, [(a.gateway_id, a.model_dump_json().encode())
                                         for a in assignments])  # fmt: skip
            acks = [await self.bus.publish_nowait(new_event(a, source=SOURCE))
                    for a in assignments]  # fmt: skip
            await asyncio.gather(*acks)

    async def next_generation(self) -> int:
        """A bucket-wide counter: every gateway sees its assignments' generations rise."""
        while True:
            try:
                entry = await self.rollouts.get(_GENERATION_KEY)
                value, revision = int(entry.value or b"0") + 1, entry.revision
                await self.rollouts.update(_GENERATION_KEY, str(value).encode(), last=revision)
                return value
            except nats.js.errors.KeyNotFoundError:
                try:
                    await self.rollouts.create(_GENERATION_KEY, b"1")
                    return 1
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError):
                continue

    # --- late joiners and statements ------------------------------------------------------

    async def welcome(self, record_: GatewayRecord) -> None:
        """A gateway that registered running nothing gets what the newest running or
        completed rollout for its class and labels installs (its waves are long gone, or it
        has nothing to regress from) - unless the newest is waiting for gateways: the ticker
        plans that one with it in its waves. One with a desired state reconciles itself."""
        await self.renew_statement(record_.gateway_id)
        if record_.running_variant_id is not None:
            return
        await self._load()
        candidates = [
            live.state for live in self.live.values()
            if live.state.status in ("waiting", "running", "completed")
            and record_.device_class in live.state.desired
            and matches(record_.labels, live.state.selector)
        ]  # fmt: skip
        newest = max(candidates, key=lambda s: s.started_at, default=None)
        if newest is None or newest.status == "waiting":
            return
        if record_.gateway_id in newest.gateways:
            return  # planned: its wave reaches it (or did: its desired state says what)
        if self.cohorts is not None and speaks_cohorts(record_.capabilities):
            await self.cohorts.load()
            if self.cohorts.holds(cohort_of(record_.gateway_id), newest.rollout_id,
                                  record_.device_class):  # fmt: skip
                return  # its cohort's state has it: the gateway reads it on connect
        try:
            await self.desired.get(record_.gateway_id)
            return  # it has a desired state: reconciling on connect installs it
        except nats.js.errors.KeyNotFoundError:
            pass
        log.info("late joiner %s gets %s", record_.gateway_id, newest.rollout_id)
        await self.deliver([GatewayAssignment(
            gateway_id=record_.gateway_id, generation=await self.next_generation(),
            rollout_id=newest.rollout_id, desired=newest.desired[record_.device_class],
            overlay=overlay_for(record_.labels, newest.overlays),  # as its waves would
        )])  # fmt: skip

    async def renew_statement(self, gateway_id: str) -> None:
        """A gateway back after a long time finds its desired state's statement signed again
        (same generation, a new expiry) once half its lifetime has passed."""
        if self.signer is None:
            return
        try:
            entry = await self.desired.get(gateway_id)
        except nats.js.errors.KeyNotFoundError:
            return
        current = GatewayAssignment.model_validate_json(entry.value or b"{}")
        left_s = (current.statement_expires_at or 0) - time.time()
        if left_s > self.signer.ttl_s / 2:
            return
        log.info("signing the desired state of %s again (%.0f s left)", gateway_id, left_s)
        await self.deliver([current])

    async def announce(self, payload: Any, what: str) -> None:
        rollout_id = payload.rollout_id
        event_id = derive_event_id("rollout", f"{rollout_id}/{what}")
        with self.journey(rollout_id, f"rollout {what}"):
            await self.bus.publish(new_event(payload, source=SOURCE, event_id=event_id))

    async def desired_model(self, variant_id: str) -> DesiredModel | None:
        """What to install to run ``variant_id`` again, from its signed manifest."""
        signed = await self.registry.variant(variant_id)
        if signed is None:
            return None
        manifest = signed["manifest"]
        return DesiredModel(
            model_name=manifest["model_name"], version=manifest["version"],
            variant_id=variant_id, manifest_digest=signed["digest"],
            artifact=manifest["artifact"],
        )  # fmt: skip
