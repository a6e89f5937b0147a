"""The gateway agent: registers, reconciles with its desired state, installs, reports.

The desired state is its cohort's signed state (``slmops.cohorts``: JetStream KV
``slmops-cohorts``, key = its cohort) and, for exceptions (a rollback of this gateway, or a
platform speaking only the older protocol), its own assignment (KV ``slmops-desired-state``,
key = gateway id); the newer of the two by generation wins. On connect the agent reads both, so
a gateway that was offline catches up; a notification on its cohort's subject, or an assignment
event on its own subject, is the notification to reconcile now. Installing is verify → download
→ load beside the serving model → smoke test → swap; any refusal leaves the running model
serving and is reported as ``failed`` with the reason.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.js.errors

from slmops import hostinfo
from slmops.assignments import StatementRefused, check_cohort_statement, check_statement
from slmops.cohorts import (
    ASSIGNMENT_PROTOCOL,
    COHORT_PROTOCOL,
    CohortEntry,
    CohortState,
    cohort_of,
    overlay_for,
)
from slmops.events import GatewayAssignment, GatewayReport
from slmops.events.payloads import DesiredModel
from slmops.service import Check
from slmops.service.registry_api import RegistryClient
from slmops.trust import KeyRole, TrustedKeys
from slmops.trust.client import TrustClient, TrustError
from slmops_gateway.health import HealthWindow
from slmops_gateway.install import check_signed_rollback, fetch_load_and_smoke_test
from slmops_gateway.settings import GatewaySettings
from slmops_gateway.sharing import Shared
from slmops_gateway.slots import LoadedModel, SessionOptions, Slots
from slmops_gateway.verify import Refused, Vouched, check_assignment, check_version, vouch

log = logging.getLogger(__name__)
DESIRED_BUCKET = "slmops-desired-state"
Publish = Callable[[GatewayReport], Awaitable[None]]
Installer = Callable[[DesiredModel, "Vouched", SessionOptions], Awaitable["LoadedModel"]]
CohortReader = Callable[[int], Awaitable[CohortState | None]]


@functools.cache
def _warn_first_use() -> None:
    """Once per process: a simulated fleet runs thousands of agents in one."""
    log.warning("no pinned trust root: trusting the registry's key on first use "
                "(SLMOPS_ENV=local only; set SLMOPS_GATEWAY_TRUST_ROOT_FILE)")  # fmt: skip


@dataclass
class Agent:
    settings: GatewaySettings
    registry: RegistryClient
    slots: Slots = field(default_factory=Slots)
    health: HealthWindow = field(default_factory=HealthWindow)
    generation: int = -1  # the newest assignment handled
    last_fetch_bytes: int = 0  # what the newest install downloaded
    # The pinned trust root's keys (None: the local stack without one, where the registry's
    # key is taken on first use and a warning says so; settings refuse that elsewhere).
    trust: TrustClient | None = None
    generation_file: Path | None = None  # where the newest generation is kept (None: memory)
    _first_use_keys: TrustedKeys | None = None
    shadowing: bool = False  # sampled requests also run on the previous model
    publish: Publish | None = None  # sends a report at once (acknowledgements)
    installer: Installer | None = None  # None: fetch, load and smoke-test (a simulator swaps it)
    # Verdicts of vouch() shared by agents in one process (a simulated fleet): one signature
    # check per (manifest, variant, class), not one per simulated gateway. None: no sharing.
    vouched: Shared[tuple[str, str, str], Vouched] | None = None
    # Verdicts on cohort states shared likewise, per state object (as parsed from one
    # notification; the entry keeps it alive, so its id is not reused): None (verified) or
    # the refusal.
    cohort_verdicts: Shared[int, tuple[CohortState, str | None]] | None = None
    cohort_generation: int = -1  # the newest cohort state seen (older ones are replays)
    acted_entry: tuple[str, int] | None = None  # (rollout, generation) of the cohort entry
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _cohort: tuple[str, int] | None = None  # (gateway id, its cohort)

    @property
    def cohort(self) -> int:
        gateway_id = self.settings.gateway_id
        if self._cohort is None or self._cohort[0] != gateway_id:  # a hash, asked often
            self._cohort = (gateway_id, cohort_of(gateway_id))
        return self._cohort[1]

    @property
    def protocols(self) -> list[str]:
        if self.settings.cohort_protocol:
            return [ASSIGNMENT_PROTOCOL, COHORT_PROTOCOL]
        return [ASSIGNMENT_PROTOCOL]

    def report(self, kind: str, **fields: Any) -> GatewayReport:
        """A report; one about the variant being served also names its model and version
        (what the fleet view folds by)."""
        active = self.slots.active
        if active is not None and fields.get("variant_id") == active.variant_id:
            fields.setdefault("model_name", active.model_name)
            fields.setdefault("version", active.version)
        return GatewayReport(
            gateway_id=self.settings.gateway_id, kind=kind,
            device_class=self.settings.device_class, labels=self.settings.labels, **fields,
        )  # fmt: skip

    def health_report(self) -> GatewayReport | None:
        """The health window's aggregate about the active model (a new window starts); None
        while nothing is installed."""
        active = self.slots.active
        if active is None:
            return None
        return self.report("health", variant_id=active.variant_id, health=self.health.take())

    def registration(self) -> GatewayReport:
        import onnxruntime as ort

        return self.report("registered", capabilities={
            "arch": hostinfo.arch(), "isa_features": sorted(hostinfo.isa_features()),
            "execution_providers": ort.get_available_providers(), "ram_mb": hostinfo.ram_mb(),
            "protocols": self.protocols,
        })  # fmt: skip

    async def reconcile(self, kv: Any, cohorts: CohortReader | None = None) -> GatewayReport | None:
        """Read the desired state - its own assignment and, with ``cohorts``, its cohort's
        state - and apply the newer (None: nothing desired yet)."""
        own = None
        try:
            entry = await kv.get(self.settings.gateway_id)
            own = GatewayAssignment.model_validate_json(entry.value or b"{}")
        except nats.js.errors.KeyNotFoundError:
            pass
        state = None
        if cohorts is not None and self.settings.cohort_protocol:
            state = await cohorts(self.cohort)
        chosen = self._choose(state) if state is not None else None
        if own is not None and (chosen is None or own.generation >= chosen.generation):
            return await self.apply(own)
        return await self.apply_cohort(state) if state is not None else None

    def _choose(self, state: CohortState) -> CohortEntry | None:
        active = self.slots.active
        return state.choose(
            self.settings.device_class, self.settings.labels,
            active.model_name if active else None, active.variant_id if active else None,
        )  # fmt: skip

    async def apply(self, assignment: GatewayAssignment) -> GatewayReport | None:
        """Install what the assignment asks for; the report says applied or failed, and why."""
        if assignment.gateway_id != self.settings.gateway_id:
            return None  # not ours (never delivered here; a bad producer would be ignored)
        async with self._lock:
            followed = self.acted_entry[1] if self.acted_entry else -1
            if assignment.generation < max(self.generation, followed + 1):
                return None  # older than what it follows: late, or replayed
            common = {"rollout_id": assignment.rollout_id,
                      "variant_id": assignment.desired.variant_id,
                      "generation": assignment.generation}  # fmt: skip
            try:
                # Before its generation counts: a forged statement must not make the gateway
                # ignore the real ones that follow.
                await self._check_statement(assignment)
            except Refused as exc:
                log.warning("refused assignment %s: %s", assignment.generation, exc)
                return self.report("failed", reason=str(exc), **common)
            self._remember_generation(assignment.generation)
            return await self._act(assignment, common)

    async def apply_cohort(self, state: CohortState) -> GatewayReport | None:
        """Act on the entry of its cohort's state meant for it (by class, labels and what it
        runs), unless its own assignment is newer or it follows that entry already."""
        if state.cohort != self.cohort:
            return None  # another cohort's (never delivered here)
        async with self._lock:
            if state.generation < self.cohort_generation:
                return None  # an older state arriving late, or replayed
            entry = self._choose(state)
            acting = (
                entry is not None
                and entry.generation > self.generation  # else its own assignment is newer
                and self.acted_entry != (entry.rollout_id, entry.generation)  # not followed yet
            )
            try:
                # Before its generation counts: a forged "generation 10^18" must not make the
                # gateway ignore the genuine states that follow.
                await self._check_cohort(state)
            except Refused as exc:
                log.warning("refused cohort state %s: %s", state.generation, exc)
                if entry is None or not acting:
                    return None  # nothing here it would act on: no report about nothing
                return self.report("failed", reason=str(exc), rollout_id=entry.rollout_id,
                                   variant_id=entry.desired.variant_id,
                                   generation=entry.generation)  # fmt: skip
            self._remember_cohort_generation(state.generation)
            if entry is None or not acting:
                return None
            common = {"rollout_id": entry.rollout_id, "variant_id": entry.desired.variant_id,
                      "generation": entry.generation}  # fmt: skip
            self.acted_entry = (entry.rollout_id, entry.generation)
            assignment = GatewayAssignment(
                gateway_id=self.settings.gateway_id, generation=entry.generation,
                rollout_id=entry.rollout_id, desired=entry.desired,
                overlay=overlay_for(self.settings.labels, entry.overlays),
            )  # fmt: skip
            try:
                return await self._act(assignment, common)
            except Exception:  # NATS or the registry away: the same state acts again later
                self.forget_entry()
                raise

    def forget_entry(self) -> None:
        """Its outcome report about the cohort entry it follows was not sent: the next time
        it sees that entry it acts (and reports) again."""
        self.acted_entry = None

    async def _act(self, assignment: GatewayAssignment, common: dict[str, Any]) -> GatewayReport:
        """Acknowledge, install unless it serves it already, report the outcome."""
        if self.publish is not None:  # received: the rollout knows at once, the outcome follows
            await self.publish(self.report("acknowledged", **common))
        try:
            if not self._serving(assignment):  # already serving it: applied, idempotently
                await self._install(assignment)
        except Refused as exc:
            log.warning("refused %s: %s", assignment.desired.variant_id, exc)
            return self.report("failed", reason=str(exc), **common)
        return self.report("applied", **common)

    async def _check_cohort(self, state: CohortState) -> None:
        """With a trust root that names assignment keys, only a cohort state signed by one,
        for this gateway's cohort and not expired, is acted on (one signature check per
        statement per notification when agents share their verdicts)."""
        if self.cohort_verdicts is None:
            refusal = await self._verify_cohort(state)
        else:
            checked, refusal = await self.cohort_verdicts.get(
                id(state), lambda: self._verify_cohort_of(state)
            )
            if checked is not state:  # cannot happen while the verdict holds it; never trust it
                refusal = await self._verify_cohort(state)
            expires_at = state.statement_expires_at or 0
            if refusal is None and time.time() > expires_at and await self._checks_cohorts():
                refusal = f"a cohort state whose statement expired at {expires_at}"
        if refusal is not None:
            raise Refused(refusal)

    async def _verify_cohort(self, state: CohortState) -> str | None:
        """None when ``state`` is signed by a trusted key for this cohort; else why not."""
        keys = await self.trusted_keys()
        if keys.roles.get(KeyRole.ASSIGNMENTS):
            try:
                check_cohort_statement(state, keys, self.cohort)
            except StatementRefused as exc:
                return str(exc)
        return None

    async def _verify_cohort_of(self, state: CohortState) -> tuple[CohortState, str | None]:
        return state, await self._verify_cohort(state)

    async def _checks_cohorts(self) -> bool:
        return bool((await self.trusted_keys()).roles.get(KeyRole.ASSIGNMENTS))

    def _remember_cohort_generation(self, generation: int) -> None:
        """The newest cohort state verified, kept across restarts beside the generation."""
        if generation == self.cohort_generation:
            return
        self.cohort_generation = generation
        if self.generation_file is not None:
            path = self._cohort_generation_file(self.generation_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(str(generation))
            tmp.replace(path)

    def remembered_cohort_generation(self) -> int:
        if self.generation_file is None:
            return -1
        path = self._cohort_generation_file(self.generation_file)
        return int(path.read_text().strip() or -1) if path.exists() else -1

    @staticmethod
    def _cohort_generation_file(generation_file: Path) -> Path:
        return generation_file.with_name(f"{generation_file.name}.cohort")

    async def _check_statement(self, assignment: GatewayAssignment) -> None:
        """With a trust root that names assignment keys, only a statement signed by one, for
        this gateway and not expired, is acted on."""
        keys = await self.trusted_keys()
        if not keys.roles.get(KeyRole.ASSIGNMENTS):
            return  # the local stack without a pinned root: nothing to check against
        try:
            check_statement(assignment, keys, self.settings.gateway_id)
        except StatementRefused as exc:
            raise Refused(str(exc)) from None

    def _remember_generation(self, generation: int) -> None:
        """The newest generation acted on, kept across restarts (replays stay refused)."""
        if generation == self.generation:
            return
        self.generation = generation
        if self.generation_file is not None:
            self.generation_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.generation_file.with_name(f".{self.generation_file.name}.tmp")
            tmp.write_text(str(generation))
            tmp.replace(self.generation_file)

    def remembered_generation(self) -> int:
        if self.generation_file is None or not self.generation_file.exists():
            return -1
        return int(self.generation_file.read_text().strip() or -1)

    def _serving(self, assignment: GatewayAssignment) -> bool:
        active = self.slots.active
        return (
            active is not None
            and active.variant_id == assignment.desired.variant_id
            and active.options == self._options(assignment)
        )

    async def _install(self, assignment: GatewayAssignment) -> None:
        desired = assignment.desired
        keys = await self.trusted_keys()
        active = self.slots.active
        running = (active.signed_version or active.version) if active else None
        if assignment.rollback:
            check_signed_rollback(assignment, keys)
        signed_rollback = assignment.rollback
        key = (desired.manifest_digest, desired.variant_id, self.settings.device_class)

        def vouching() -> Awaitable[Vouched]:
            return vouch(desired, registry=self.registry, keys=keys,
                         device_class=self.settings.device_class)  # fmt: skip

        if self.vouched is not None:
            vouched = await self.vouched.get(key, vouching)
        else:
            vouched = await vouching()
        # Judged on what is signed: the assignment's own version is nobody's word.
        check_assignment(desired, vouched.manifest)
        check_version(vouched.manifest.version, running, rollback=signed_rollback)
        options = self._options(assignment)
        model = await (self.installer or self.fetch_load_and_smoke_test)(desired, vouched, options)
        model.signed_version = vouched.manifest.version
        self.slots.swap_in(model)
        # A rollout's new model is compared with the one it replaced on sampled requests
        # (shadow agreement); a rollback's is not on trial.
        self.shadowing = assignment.rollout_id is not None and not assignment.rollback
        self.health.restart()  # a new window: the next health report is about this model only
        log.info("now serving %s (%s)", desired.variant_id, desired.version)

    async def trusted_keys(self) -> TrustedKeys:
        """The manifest keys the pinned trust root vouches for now."""
        if self.trust is not None:
            try:
                return await self.trust.keys()
            except TrustError as exc:
                raise Refused(str(exc)) from None
        if self._first_use_keys is None:
            _warn_first_use()
            pem = await self.registry.public_key_pem()
            self._first_use_keys = TrustedKeys.single(KeyRole.MANIFESTS, pem)
        return self._first_use_keys

    async def fetch_load_and_smoke_test(
        self, desired: DesiredModel, vouched: Vouched, options: SessionOptions
    ) -> LoadedModel:
        """The device's part of an install (``install.py``)."""
        model, self.last_fetch_bytes = await fetch_load_and_smoke_test(
            desired, vouched, options, self.registry, self.settings.model_dir, self.slots.active
        )
        return model

    def _options(self, assignment: GatewayAssignment) -> SessionOptions:
        """This site's session options: the gateway's settings, then the assignment's overlay."""
        base = {"intra_op_threads": self.settings.intra_op_threads,
                "max_input_tokens": self.settings.max_input_tokens}  # fmt: skip
        unknown = sorted(set(assignment.overlay) - set(base))
        if unknown:
            raise Refused(f"unknown overlay settings {unknown}: known are {sorted(base)}")
        values = {**base, **assignment.overlay}
        if min(values.values()) < 1:
            raise Refused(f"overlay values must be at least 1: {assignment.overlay}")
        # A decoder's prompt is limited by its context, and by max_input_tokens only when the
        # overlay sets it for this site (see SessionOptions.max_prompt_tokens).
        explicit = assignment.overlay.get("max_input_tokens")
        return SessionOptions(**values, max_prompt_tokens=explicit)

    async def check(self) -> Check:
        active = self.slots.active
        detail = f"serving {active.variant_id}" if active else "no model assigned yet"
        return Check(ok=True, detail=detail)
