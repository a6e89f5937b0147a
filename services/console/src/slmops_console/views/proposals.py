"""Proposals (releases proposed from field evidence) as a page shows them: the evidence in one
sentence, what is replaced by what, and the decision so far (a word for every status)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slmops_console.views.field import evidence_text

#: Status -> the word shown (with a shape: the status is never only a colour).
WORDS = {
    "pending": "◔ pending: waits for an operator",
    "approved": "✓ approved",
    "rejected": "✗ rejected",
    "failed": "✗ failed: no candidate met the field budget",
}


@dataclass(frozen=True)
class Shown:
    release_id: str
    model_name: str
    version: str
    status: str
    word: str
    device_class: str
    evidence: str
    replaces: str
    replaces_name: str
    proposed: str | None
    proposed_name: str
    why: str
    reasons: list[tuple[str, str]]
    received: str
    decided_by: str | None
    decided: str
    decision_reason: str
    rollout_id: str | None


def _at(stamp: Any) -> str:
    return str(stamp or "")[:19].replace("T", " ")


def shown(proposal: dict[str, Any], names: dict[str, str] | None = None) -> Shown:
    """A rollout service ``Proposal`` as shown; ``names``: variant id -> readable name."""
    names = names or {}
    evidence = proposal["evidence"]
    proposed = proposal.get("proposed_variant_id")
    return Shown(
        release_id=proposal["release_id"], model_name=proposal["model_name"],
        version=proposal["version"], status=proposal["status"],
        word=WORDS.get(proposal["status"], proposal["status"]),
        device_class=evidence["device_class"], evidence=evidence_text(evidence),
        replaces=evidence["variant_id"],
        replaces_name=names.get(evidence["variant_id"], evidence["variant_id"]),
        proposed=proposed, proposed_name=names.get(proposed or "", proposed or ""),
        why=proposal.get("why") or "", reasons=sorted((proposal.get("reasons") or {}).items()),
        received=_at(proposal.get("received_at")), decided_by=proposal.get("decided_by"),
        decided=_at(proposal.get("decided_at")),
        decision_reason=proposal.get("decision_reason") or "",
        rollout_id=proposal.get("rollout_id"),
    )  # fmt: skip


def variant_ids(proposals: list[dict[str, Any]]) -> list[str]:
    """Every variant the proposals name (to look their names up once)."""
    found = {p["evidence"]["variant_id"] for p in proposals}
    found |= {p["proposed_variant_id"] for p in proposals if p.get("proposed_variant_id")}
    return sorted(found)
