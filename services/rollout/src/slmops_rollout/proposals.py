"""Releases proposed from field evidence, held until an operator decides (or policy does).

A re-optimization's release (``release.created`` with a ``proposal``: a new variant for the one
class whose field figures broke its budget) is not rolled out like a version's release: it
waits as a *pending* proposal under ``proposal.<release id>`` in ``slmops-rollouts`` until an
operator approves it (a rollout of it starts, to that class's gateways running that model) or
rejects it; with ``auto_field_releases`` policy approves it at once. A re-optimization that found
no candidate meeting the field budget (``release.failed`` with a ``proposal``) is kept as
*failed* with the reasons, so the operator is told and nothing rolls out.

Decisions are compare-and-set on the proposal's key: two operators deciding at once get one
outcome; approving twice gives the same rollout (its id derives from the release id).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from slmops.events import ReleaseCreated, ReleaseFailed
from slmops.events.payloads import FieldEvidence, ReleaseEntry
from slmops_rollout.engine import Engine, rollout_id_for
from slmops_rollout.plans import WavePolicy
from slmops_rollout.releases import by_id
from slmops_rollout.state import RolloutState
from slmops_rollout.targets import NotRollable

ProposalStatus = Literal["pending", "approved", "rejected", "failed"]
_ATTEMPTS = 20


class Proposal(BaseModel):
    """A release proposed from field evidence, and what became of it."""

    release_id: str
    model_name: str
    version: str
    status: ProposalStatus
    evidence: FieldEvidence = Field(
        description="What the field measured: class, variant replaced, metric, field value, "
        "budget, bound, and what the validator's host measured (null: not measurable there)."
    )
    proposed_variant_id: str | None = Field(
        None, description="The new variant for the evidence's class (null: a failed proposal)."
    )
    why: str = Field("", description="Why the validator chose it, or why there is none.")
    entries: list[ReleaseEntry] = Field(default_factory=list, description="As released.")
    reasons: dict[str, str] = Field(
        default_factory=dict, description="A failed proposal: per class, why no candidate."
    )
    received_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    decided_by: str | None = Field(None, description="Who approved or rejected it.")
    decided_at: datetime | None = None
    decision_reason: str = ""
    rollout_id: str | None = Field(None, description="The rollout an approval started.")


class UnknownProposal(LookupError):
    pass


class Undecidable(Exception):
    """The proposal cannot take this decision; ``status`` says what it is (HTTP 409 / 422)."""

    def __init__(self, proposal: Proposal, message: str) -> None:
        super().__init__(message)
        self.proposal = proposal


def _key(release_id: str) -> str:
    return f"proposal.{release_id}"


def proposal_of(release: ReleaseCreated | ReleaseFailed) -> Proposal | None:
    """The proposal a release carries (None: a version's own release)."""
    evidence = release.proposal
    if evidence is None:
        return None
    chosen = next((e for e in release.entries if e.device_class == evidence.device_class), None)
    failed = isinstance(release, ReleaseFailed)
    return Proposal(
        release_id=release.release_id, model_name=release.model_name, version=release.version,
        status="failed" if failed else "pending", evidence=evidence,
        proposed_variant_id=chosen.variant_id if chosen else None,
        why=chosen.reason if chosen else "", entries=release.entries,
        reasons={e.device_class: e.reason for e in release.entries} if failed else {},
    )  # fmt: skip


async def remember(kv: KeyValue, proposal: Proposal) -> Proposal:
    """Keep a new proposal; a redelivered release never undoes a decision (the first kept
    wins). Returns the proposal as stored."""
    try:
        await kv.create(_key(proposal.release_id), proposal.model_dump_json().encode())
        return proposal
    except nats.js.errors.KeyWrongLastSequenceError:
        return await get(kv, proposal.release_id)


async def get(kv: KeyValue, release_id: str) -> Proposal:
    try:
        entry = await kv.get(_key(release_id))
    except nats.js.errors.KeyNotFoundError:
        raise UnknownProposal(f"no proposed release {release_id}") from None
    return Proposal.model_validate_json(entry.value or b"{}")


async def every(kv: KeyValue) -> list[Proposal]:
    try:
        keys = [k for k in await kv.keys() if k.startswith("proposal.")]
    except nats.js.errors.NoKeysError:
        return []
    found = []
    for key in keys:
        entry = await kv.get(key)
        found.append(Proposal.model_validate_json(entry.value or b"{}"))
    return found


async def _decide(
    kv: KeyValue, release_id: str, status: ProposalStatus, by: str, reason: str,
    rollout_id: str | None = None,
) -> tuple[Proposal, bool]:  # fmt: skip
    """Move a pending proposal to ``status`` (compare-and-set); also whether this call moved
    it. An approval of an approved one returns it as it is; any other decision of a decided
    one raises ``Undecidable``."""
    for _ in range(_ATTEMPTS):
        try:
            entry = await kv.get(_key(release_id))
        except nats.js.errors.KeyNotFoundError:
            raise UnknownProposal(f"no proposed release {release_id}") from None
        current = Proposal.model_validate_json(entry.value or b"{}")
        if current.status != "pending":
            if current.status == status == "approved":
                return current, False
            raise Undecidable(current, _already(current))
        decided = current.model_copy(update={
            "status": status, "decided_by": by, "decided_at": datetime.now(UTC),
            "decision_reason": reason, "rollout_id": rollout_id,
        })  # fmt: skip
        try:
            await kv.update(_key(release_id), decided.model_dump_json().encode(), entry.revision)
            return decided, True
        except nats.js.errors.KeyWrongLastSequenceError:
            continue
    raise RuntimeError(f"proposal {release_id} kept changing")


def _already(proposal: Proposal) -> str:
    if proposal.status == "failed":
        why = "; ".join(f"{c}: {r}" for c, r in sorted(proposal.reasons.items()))
        return f"{proposal.release_id} proposes nothing to roll out: {why}"
    by = f" by {proposal.decided_by}" if proposal.decided_by else ""
    return f"{proposal.release_id} was {proposal.status}{by} already"


async def approve(
    engine: Engine, release_id: str, by: str, policy: WavePolicy | None = None,
    reason: str = "", *, wait: bool = False,
) -> tuple[Proposal, RolloutState]:  # fmt: skip
    """Record who approved a proposed release, then start its rollout (``policy``: the normal
    one if None). The decision first, naming the rollout it makes (the id derives from the
    release): a rejection racing it loses, and an approval that died before its rollout
    started is completed by the next approve. Raises ``UnknownProposal``, ``Undecidable``
    (failed, rejected) and the engine's ``NotRollable`` (then it is pending again)."""
    proposal = await get(engine.rollouts, release_id)
    if proposal.status not in ("pending", "approved"):
        raise Undecidable(proposal, _already(proposal))
    release, traceparent = await by_id(engine.rollouts, release_id)
    if release is None:
        raise UnknownProposal(f"the release of proposal {release_id} is not kept")
    rollout_id = rollout_id_for(release_id, {})
    decided, moved = await _decide(engine.rollouts, release_id, "approved", by, reason, rollout_id)
    try:
        state = await engine.start(
            release, {}, policy or WavePolicy(), traceparent=traceparent, wait=wait
        )
    except NotRollable:
        if moved:  # this call decided it: undone, it can be tried again
            await _reopen(engine.rollouts, release_id)
        raise
    return decided, state


async def _reopen(kv: KeyValue, release_id: str) -> None:
    entry = await kv.get(_key(release_id))
    current = Proposal.model_validate_json(entry.value or b"{}")
    pending = current.model_copy(update={
        "status": "pending", "decided_by": None, "decided_at": None, "decision_reason": "",
        "rollout_id": None,
    })  # fmt: skip
    await kv.update(_key(release_id), pending.model_dump_json().encode(), entry.revision)


async def reject(engine: Engine, release_id: str, by: str, reason: str) -> Proposal:
    decided, _ = await _decide(engine.rollouts, release_id, "rejected", by, reason)
    return decided
