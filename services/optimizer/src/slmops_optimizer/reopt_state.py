"""The bound on re-optimization: one open per (model, device class), then a cooldown.

One JSON document per (model, class) in the job bucket (``slmops-jobs``, key
``reoptimize.<model>.<class>``: not under ``optimizer.``, which holds job records only),
written with compare-and-set so two findings racing for one class open it once. It records
the finding being worked on and the plan made for it: a redelivered finding replays that very
plan (the registry may know more by then, and a second plan would be a second proposal). The
proposal's ``release.created``/``release.failed`` closes it; from then the next finding for the
class waits out the cooldown. An entry nothing closes (a lost proposal) is given up after
``reoptimize_open_max_s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from slmops.bus.kvstate import update_model
from slmops.events.payloads import FieldEvidence, Recipe

PREFIX = "reoptimize."
Decision = Literal["open", "replay", "busy", "cooling", "decided"]


class Reoptimization(BaseModel):
    """The last re-optimization of one model for one device class."""

    model_name: str = ""
    device_class: str = ""
    detection_id: str = ""
    version: str = ""
    release_id: str = ""
    opened_at: datetime | None = None
    closed_at: datetime | None = None
    outcome: Literal["open", "created", "failed"] = "open"
    recipes: list[Recipe] = Field(default_factory=list, description="The plan's candidates.")
    skipped_reason: str | None = Field(None, description="Why the plan has no candidate.")


@dataclass(frozen=True)
class Bounds:
    cooldown_s: float
    open_max_s: float


def decide(
    current: Reoptimization | None, detection_id: str, now: datetime, bounds: Bounds
) -> Decision:
    """What a finding may do, given the class's last re-optimization."""
    if current is None or current.opened_at is None:
        return "open"
    if current.detection_id == detection_id:
        return "replay" if current.closed_at is None else "decided"
    if current.closed_at is None:
        stale = (now - current.opened_at).total_seconds() > bounds.open_max_s
        return "open" if stale else "busy"
    cooled = (now - current.closed_at).total_seconds() >= bounds.cooldown_s
    return "open" if cooled else "cooling"


def key_of(model_name: str, device_class: str) -> str:
    return f"{PREFIX}{model_name}.{device_class}"


class ReoptimizationLoop:
    def __init__(self, kv: KeyValue, bounds: Bounds) -> None:
        self.kv = kv
        self.bounds = bounds

    async def get(self, model_name: str, device_class: str) -> Reoptimization | None:
        try:
            entry = await self.kv.get(key_of(model_name, device_class))
        except nats.js.errors.KeyNotFoundError:
            return None
        return Reoptimization.model_validate_json(entry.value) if entry.value else None

    async def begin(
        self, opening: Reoptimization, now: datetime
    ) -> tuple[Decision, Reoptimization]:
        """Open ``opening`` (its finding, version, release and plan) unless the bound says
        otherwise; returns the decision and the entry as it now stands (on a replay, with the
        plan first made for that finding)."""
        decision: Decision = "open"

        def change(current: Reoptimization) -> None:
            nonlocal decision
            decision = decide(
                current if current.opened_at else None, opening.detection_id, now, self.bounds
            )
            if decision == "open":
                for name, value in opening.model_copy(
                    update={"opened_at": now, "closed_at": None, "outcome": "open"}
                ):
                    setattr(current, name, value)

        stored = await update_model(
            self.kv, key_of(opening.model_name, opening.device_class), Reoptimization, change,
            Reoptimization,
        )  # fmt: skip
        return decision, stored

    async def close(
        self, model_name: str, proposal: FieldEvidence, outcome: Literal["created", "failed"],
        now: datetime,
    ) -> bool:  # fmt: skip
        """Close the class's open re-optimization if it is the one ``proposal`` answers."""
        closed = False

        def change(current: Reoptimization) -> None:
            nonlocal closed
            closed = current.detection_id == proposal.detection_id and current.closed_at is None
            if closed:
                current.closed_at, current.outcome = now, outcome

        if await self.get(model_name, proposal.device_class) is None:
            return False  # not ours (another optimizer deployment's, or long purged)
        await update_model(self.kv, key_of(model_name, proposal.device_class), Reoptimization,
                           change, Reoptimization)  # fmt: skip
        return closed


def utc_now() -> datetime:
    return datetime.now(UTC)
