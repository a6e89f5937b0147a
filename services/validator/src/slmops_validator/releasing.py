"""Tallies to decisions: each plan and each candidate's end lands in its release's tally, and
the change that completes a tally publishes the decision.

A tally is the version's own (``release_id`` null on the events) or a re-optimization's (the
``release_id`` the optimizer named it by, ``slmops.events.field_release_id``): the two never
share a key, so a proposal for one class neither waits for nor completes the version's release.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from nats.js.kv import KeyValue

from slmops.bus import Bus
from slmops.events import ReleaseCreated, derive_event_id, new_event
from slmops.events.payloads import OptimizationPlanned
from slmops.profiles import DeviceProfile
from slmops_validator.releases import Candidate, Tally, choose, update_tally

log = logging.getLogger(__name__)
SOURCE = "/slmops/validator"


@dataclass(frozen=True)
class Releases:
    """The tallies in ``kv``; decisions published on ``bus``, judged by ``profiles``."""

    kv: KeyValue
    bus: Bus
    profiles: dict[str, DeviceProfile]

    async def add_plan(self, plan: OptimizationPlanned) -> None:
        """The jobs a plan names (none: the plan says per class why, and the tally is complete
        at once - a re-optimization that could try nothing is failed with the reason)."""

        def add(tally: Tally) -> None:
            tally.planned = {job.variant_id: job.device_class for job in plan.jobs}
            tally.skipped = dict(plan.skipped)
            if plan.release_id is not None and plan.field is not None:
                tally.proposal = plan.field

        await self._update(plan.model_name, plan.version, plan.release_id, add)

    async def add_candidate(
        self, model_name: str, version: str, release_id: str | None, candidate: Candidate
    ) -> None:
        """One planned job's end: its validation, or its optimization failing."""

        def add(tally: Tally) -> None:
            tally.judged[candidate.variant_id] = candidate

        await self._update(model_name, version, release_id, add)

    async def _update(
        self,
        model_name: str,
        version: str,
        release_id: str | None,
        change: Callable[[Tally], None],
    ) -> None:
        """Apply a change to the tally; the change that completes it releases."""
        tally = await update_tally(self.kv, model_name, version, change, release_id)
        if not tally.complete or tally.released:
            return
        release = choose(tally, self.profiles)
        created = isinstance(release, ReleaseCreated)
        outcome: Literal["created", "failed"] = "created" if created else "failed"
        if not created:
            why = "; ".join(f"{e.device_class}: {e.reason}" for e in release.entries)
            what = "proposal" if tally.proposal else "no release"
            log.warning("%s %s (%s): %s, no class has a variant (%s)",
                        model_name, version, release.release_id, what, why)  # fmt: skip
        # Published before the tally says "released": a crash in between re-sends it on
        # redelivery under the same id, which JetStream de-duplicates. One decision per
        # release, so one id whichever way it went.
        event_id = derive_event_id("release", release.release_id)
        await self.bus.publish(new_event(release, source=SOURCE, event_id=event_id))

        def mark(t: Tally) -> None:
            t.released, t.outcome = True, outcome

        await update_tally(self.kv, model_name, version, mark, release_id)
