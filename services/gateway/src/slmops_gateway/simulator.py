"""A simulated fleet: thousands of gateway agents in one process, on one NATS connection.

Each simulated gateway is the real :class:`~slmops_gateway.agent.Agent` - registration,
reconciling with its desired state in KV, acknowledging, verifying the registry's signatures
and the validation report for its class, refusing downgrades, reporting applied or failed -
with the device part (download, ONNX Runtime session, smoke test, inference) simulated. The
fleet shares what real gateways at one site would share: one connection, one subscription to
the cohorts' notifications, one to its gateways' own assignments (as core NATS, like each real
one; a durable for the site if some are older than cohorts: :mod:`~slmops_gateway.simassignments`),
one registry cache (manifests are content addressed, so caching them changes nothing a gateway
verifies: each still checks the signatures itself) and one verdict per cohort statement.
A ``legacy`` share of the fleet speaks only the per-gateway protocol (gateways older than
cohorts). With ``site_reports`` the fleet sends its wave reports as one site's batches
(:mod:`slmops_gateway.sitereports`) instead of one message per report; with ``relay`` its
agents ask the site's relay process to carry them, as real gateways enrolled at a site do
(:mod:`slmops_gateway.relay`); either way the process is one site, and its gateways' labels
name it. ``part``/``parts`` split one fleet's gateways over several processes.

Faults are injected into exact shares of the fleet: ``download`` and ``smoke`` make installs
fail, ``latency`` and ``shadow`` make every model after the first one slower or disagree more
in the health reports, ``silent`` gateways register and then never answer again.

Health reports carry what a real gateway's do (:mod:`slmops_gateway.simfield`): histograms
around what the validator measured of the installed variant on its host, decode sums, peak
memory and a drift signature. A class can be slower in the field than on the host
(``field_slowdown``: its times multiplied) or be served shifted inputs (``input_shift``: its
drift signature moved by that many baseline standard deviations).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry.trace import SpanKind

from slmops.bus import Bus
from slmops.bus.permissions import COHORT_BUCKET, COHORT_SUBJECT
from slmops.cohorts import COHORT_COUNT, COHORT_EVENT, CohortState
from slmops.events import GatewayAssignment, GatewayReport
from slmops.events.payloads import BATCHED_REPORT_KINDS, DesiredModel, HealthAggregate
from slmops.events.reports import report_event
from slmops.tracing import extract_trace_context
from slmops_gateway.agent import DESIRED_BUCKET, Agent
from slmops_gateway.notifications import heard_cohort_state
from slmops_gateway.relay import send_via_relay
from slmops_gateway.settings import GatewaySettings
from slmops_gateway.sharing import Limiter, Shared
from slmops_gateway.simassignments import SiteAssignments
from slmops_gateway.simshared import CachingRegistry, CohortReader, FieldProfiles
from slmops_gateway.simspec import FAULTS, Fault, FleetSpec
from slmops_gateway.sitereports import SiteReporter
from slmops_gateway.slots import LoadedModel, SessionOptions
from slmops_gateway.verify import Refused, Vouched

__all__ = ["FAULTS", "CachingRegistry", "Fault", "FleetSpec", "SimulatedFleet", "SimulatedGateway"]

_BURST = 1000  # registrations / reconciles / health reports sent at once
_RELAY_TIMEOUT_S = 5.0  # a relay carrying thousands of requests at once answers in batches
_ATTEMPTS = 5  # tries to act on a cohort's state before waiting for the next one
log = logging.getLogger(__name__)


@dataclass
class SimulatedGateway:
    agent: Agent
    fault: Fault | None
    profiles: FieldProfiles
    first_variant_id: str | None = None
    jitter: float = 1.0  # this device's times against its class's
    rounds: int = 0  # health rounds reported (they cycle through the profile's templates)

    async def install(
        self, desired: DesiredModel, vouched: Vouched, options: SessionOptions
    ) -> LoadedModel:
        """The device's part, simulated: the verified manifest is what it would fetch."""
        if self.fault == "download":
            raise Refused(f"download of {desired.artifact.digest} failed: connection reset "
                          "(simulated fault)")  # fmt: skip
        if self.fault == "smoke":
            raise Refused("smoke test: 12 non-finite output values (simulated fault)")
        if self.first_variant_id is None:
            self.first_variant_id = desired.variant_id
        await self.profiles.prepare(desired.variant_id, vouched.manifest,
                                    self.agent.settings.device_class)  # fmt: skip
        return LoadedModel(desired.variant_id, desired.version, Path(vouched.manifest_digest),
                           None, "simulated", None, [], options,
                           model_name=desired.model_name)  # fmt: skip

    def health(self, window_s: float) -> HealthAggregate:
        """Aggregates as the device would report them; faults degrade models after the first."""
        active, previous = self.agent.slots.active, self.agent.slots.previous
        if active is None:
            return HealthAggregate(window_s=window_s, request_count=0, error_rate=0.0)
        later = active.variant_id != self.first_variant_id
        scale = self.jitter * (10.0 if later and self.fault == "latency" else 1.0)
        shadow = None
        if previous is not None:
            shadow = 0.80 if later and self.fault == "shadow" else 0.99
        profile = self.profiles.get(active.variant_id, self.agent.settings.device_class)
        self.rounds += 1
        return profile.health(self.rounds, scale, window_s, shadow)


class SimulatedFleet:
    """Start, run health rounds, stop; ``gateways`` holds every simulated agent by id."""

    def __init__(
        self, bus: Bus, registry: CachingRegistry, spec: FleetSpec, base: GatewaySettings
    ) -> None:
        self.bus, self.spec, self.registry = bus, spec, registry
        self.gateways: dict[str, SimulatedGateway] = {}
        self._vouched: Shared[tuple[str, str, str], Vouched] = Shared()
        self.profiles = FieldProfiles(registry, spec)
        self._verdicts: Shared[int, tuple[CohortState, str | None]] = Shared()
        self.cohorts: dict[int, list[SimulatedGateway]] = {}  # members speaking cohorts
        jitter = random.Random(spec.seed + 1)  # noqa: S311
        layout = spec.layout()
        legacy = set(random.Random(spec.seed + 2).sample(  # noqa: S311
            range(len(layout)), round(spec.count * spec.legacy)))  # fmt: skip
        self.site = spec.site  # the site its gateways' labels name (and its durable's name)
        # the services take a site's batch only for gateways naming that site
        site = {"site": spec.site} if spec.site_reports or spec.relay else {}
        for index, (gateway_id, device_class, labels, fault) in enumerate(layout):
            device_jitter = jitter.uniform(0.9, 1.1)  # drawn for all: the same in any part
            if index % spec.parts != spec.part:
                continue  # another process's gateway
            identity = {"gateway_id": gateway_id, "device_class": device_class,
                        "labels": {**labels, **site},
                        "cohort_protocol": index not in legacy}  # fmt: skip
            settings = base.model_copy(update=identity)
            agent = Agent(settings, self.registry, publish=self._publish, vouched=self._vouched,
                          cohort_verdicts=self._verdicts)  # fmt: skip
            sim = SimulatedGateway(
                agent, fault, self.profiles, jitter=device_jitter, rounds=index
            )  # the fleet's rounds spread over the templates
            agent.installer = sim.install
            self.gateways[gateway_id] = sim
            if settings.cohort_protocol:
                self.cohorts.setdefault(agent.cohort, []).append(sim)
        self._cohort_sub: Subscription | None = None
        # a durable for the site only if some of its gateways are older than cohorts
        older = any(not sim.agent.settings.cohort_protocol for sim in self.gateways.values())
        self.assignments = SiteAssignments(bus, self.site, self.gateways, self._apply_assignment,
                                           self._publish, durable=older)  # fmt: skip
        self._tasks: set[asyncio.Task[None]] = set()
        self._acting = Limiter(_BURST)
        self._site = SiteReporter(bus, self.site) if spec.site_reports else None
        self.sent_themselves = 0  # wave reports the relay did not carry

    async def _publish(self, report: GatewayReport) -> None:
        if self._site is not None and report.kind in BATCHED_REPORT_KINDS:
            await self._site.send(report)
            return
        if self.spec.relay and report.kind in BATCHED_REPORT_KINDS:
            why_not = await send_via_relay(self.bus.nc, self.site, report, _RELAY_TIMEOUT_S)
            if why_not is None:
                return
            self.sent_themselves += 1
            log.debug("%s: sent itself: %s", report.gateway_id, why_not)
        await self.bus.publish(report_event(report))

    async def start(self) -> None:
        """Listen for assignments, register every gateway, then reconcile each with KV."""
        await self.assignments.start()
        self._cohort_sub = await self.bus.nc.subscribe(
            f"{COHORT_SUBJECT}.*", cb=self._on_cohort, pending_msgs_limit=10 * COHORT_COUNT
        )
        await self._each(self._register)
        kv = await self.bus.key_value(DESIRED_BUCKET)
        reader = CohortReader(await self.bus.key_value(COHORT_BUCKET))
        await self._each(lambda sim: self._reconcile(sim, kv, reader))

    async def _register(self, sim: SimulatedGateway) -> None:
        caps = {"simulated": True, "ram_mb": 4096, "protocols": sim.agent.protocols}
        await self._publish(sim.agent.report("registered", capabilities=caps))

    async def _reconcile(self, sim: SimulatedGateway, kv: Any, reader: CohortReader) -> None:
        if sim.fault == "silent":
            return
        for attempt in range(_ATTEMPTS):  # a busy broker times a read out: again, later
            try:
                report = await sim.agent.reconcile(kv, reader.read)
                if report is not None:
                    await self._publish(report)
                return
            except nats.errors.TimeoutError:
                await asyncio.sleep(0.5 * 2**attempt)
        log.warning("%s: reconcile timed out %d times", sim.agent.settings.gateway_id, _ATTEMPTS)

    async def _on_cohort(self, msg: Msg) -> None:
        """A cohort's new state: each of its members acts on it (verified once for all)."""
        token = msg.subject.rpartition(".")[2]
        if token.isdigit() and int(token) not in self.cohorts:
            return  # none of this site's gateways is in it: not even parsed (a burst of 1,024)
        if (state := heard_cohort_state(msg)) is None:
            return
        members = [s for s in self.cohorts.get(state.cohort, []) if s.fault != "silent"]
        if not members:
            return  # none of this site's gateways is in it (a real gateway never hears it)

        async def act(sim: SimulatedGateway) -> None:
            for attempt in range(_ATTEMPTS):  # NATS or the registry away: again, later
                async with self._acting:  # as many installs at once as a site's uplink allows
                    try:
                        report = await sim.agent.apply_cohort(state)
                        if report is not None:
                            await self._publish(report)
                        return
                    except Exception as exc:
                        sim.agent.forget_entry()  # its report did not go out: act again
                        error = exc
                await asyncio.sleep(0.5 * 2**attempt)
            log.warning("%s: acting on cohort %d failed %d times: %r",
                        sim.agent.settings.gateway_id, state.cohort, _ATTEMPTS, error)  # fmt: skip

        async def act_all() -> None:  # one span for the site's gateways of this cohort
            parent = extract_trace_context(dict(msg.headers or {}))
            with self.bus.tracer.start_as_current_span(
                f"process {COHORT_EVENT}", context=parent, kind=SpanKind.CONSUMER
            ):
                await self._each(act, members)

        # In the background: the next cohort's notification need not wait for this one's.
        task = asyncio.create_task(act_all())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply_assignment(self, assignment: GatewayAssignment) -> GatewayReport | None:
        sim = self.gateways.get(assignment.gateway_id)
        if sim is None or sim.fault == "silent":
            return None  # not one of ours, or gone quiet: the rollout times it out
        return await sim.agent.apply(assignment)

    async def report_health(self, window_s: float) -> int:
        """One round of health reports from every answering gateway with a model."""
        live = [s for s in self.gateways.values()
                if s.fault != "silent" and s.agent.slots.active is not None]  # fmt: skip

        async def one(sim: SimulatedGateway) -> None:
            active = sim.agent.slots.active
            assert active is not None
            await self._publish(sim.agent.report("health", variant_id=active.variant_id,
                                                 health=sim.health(window_s)))  # fmt: skip

        await self._each(one, live)
        return len(live)

    def serving(self) -> dict[str, int]:
        """How many gateways run each variant (``"-"``: none yet)."""
        counts: dict[str, int] = {}
        for sim in self.gateways.values():
            active = sim.agent.slots.active
            key = active.variant_id if active else "-"
            counts[key] = counts.get(key, 0) + 1
        return counts

    async def stop(self) -> None:
        if self._cohort_sub is not None:
            await self._cohort_sub.unsubscribe()
            self._cohort_sub = None
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.assignments.stop()
        if self._site is not None:
            await self._site.close()

    async def _each(
        self, work: Callable[[SimulatedGateway], Awaitable[None]],
        sims: list[SimulatedGateway] | None = None,
    ) -> None:  # fmt: skip
        todo = list(self.gateways.values()) if sims is None else sims
        for start in range(0, len(todo), _BURST):
            await asyncio.gather(*(work(s) for s in todo[start : start + _BURST]))
