"""Cohorts: desired state written once per stable hash range of gateway ids, not per gateway.

A gateway's cohort is a hash of its id (``cohort_of``): fixed for its lifetime, known to the
gateway, to the rollout service and to whoever enrolls it (its bus permissions name its cohort,
so it reads only its own cohort's state). A rollout's wave is a set of cohorts: the rollout
service writes one :class:`CohortState` per cohort it reaches - a signed statement (cohort,
generation, entries, expiry) by its assignments key - into KV and publishes it once on the
cohort's core NATS subject. Each entry says what gateways of one device class whose labels match
a selector run (and the local settings overlays choose by label); every gateway picks the newest
entry meant for it, so a label selector, an overlay or a label change needs no per-gateway write.
Per-gateway assignments (``slmops.assignments``) remain for exceptions: rollbacks of single
gateways and gateways that speak only the older per-gateway protocol.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

from slmops.events.payloads import DesiredModel

#: Cohorts per fleet; a gateway's cohort never changes. 1,024 keeps a 1 % canary a set of ~10
#: cohorts, and each cohort's statement small (its entries, not its members).
COHORT_COUNT = 1024
#: The protocol name a gateway announces in its registration's ``capabilities["protocols"]``.
COHORT_PROTOCOL = "cohort-v1"
#: The per-gateway protocol every gateway speaks (exceptions, and older gateways).
ASSIGNMENT_PROTOCOL = "assignment-v1"
#: What a cohort notification's spans are named after ("publish ...", "process ...").
COHORT_EVENT = "slmops.cohort.v1"
MAX_ENTRIES = 32  # per cohort: the newest per (class, selector, model limit) are kept


# Remembered: the rollout service asks it several times per gateway and wave (plan order,
# held entries, the cohorts a wave reaches): a hash each time was ~5 % of its CPU at 100,000
# gateways. 2**18 ids take some 40 MB at most.
@functools.lru_cache(maxsize=1 << 18)
def cohort_of(gateway_id: str) -> int:
    """The gateway's cohort: the first 4 bytes of SHA-256 of its id, mod ``COHORT_COUNT``."""
    digest = hashlib.sha256(gateway_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") % COHORT_COUNT


def cohort_key(cohort: int) -> str:
    """The cohort's KV key and subject token (fixed width: the keys sort by cohort)."""
    return f"{cohort:04d}"


def speaks_cohorts(capabilities: dict[str, object]) -> bool:
    """Whether a gateway registered with the cohort protocol (older ones did not)."""
    protocols = capabilities.get("protocols")
    return isinstance(protocols, list) and COHORT_PROTOCOL in protocols


def matches(labels: dict[str, str], selector: dict[str, str]) -> bool:
    """Every selector key present with the same value (an empty selector matches all)."""
    return all(labels.get(key) == value for key, value in selector.items())


class LabelOverlay(BaseModel):
    """Local settings for the gateways whose labels match (one variant, many sites)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    selector: dict[str, str] = Field(description="Labels a gateway must have (empty: all).")
    settings: dict[str, int] = Field(
        description="Agent settings it overrides: intra_op_threads, max_input_tokens."
    )


def overlay_for(labels: dict[str, str], overlays: Iterable[LabelOverlay]) -> dict[str, int]:
    """The settings of every overlay whose selector matches, later ones winning."""
    merged: dict[str, int] = {}
    for overlay in overlays:
        if matches(labels, overlay.selector):
            merged.update(overlay.settings)
    return merged


class CohortEntry(BaseModel):
    """What one rollout installs on one device class's matching gateways of a cohort."""

    model_config = ConfigDict(extra="forbid")

    rollout_id: str
    generation: int = Field(ge=0, description="When the rollout reached this cohort.")
    device_class: str
    desired: DesiredModel
    selector: dict[str, str] = Field(default_factory=dict)
    overlays: list[LabelOverlay] = Field(default_factory=list)
    only_model: str | None = Field(
        None, description="Only gateways running this model (a field proposal replaces it)."
    )
    only_variants: list[str] = Field(default_factory=list)

    def applies_to(
        self, device_class: str, labels: dict[str, str], running_model: str | None,
        running_variant: str | None,
    ) -> bool:  # fmt: skip
        if self.device_class != device_class or not matches(labels, self.selector):
            return False
        if self.only_model is None:
            return True
        return running_model == self.only_model or running_variant in self.only_variants

    def slot(self) -> tuple[str, str, str | None]:
        """Entries with the same slot replace each other (a newer rollout of the same reach)."""
        return (self.device_class, json.dumps(sorted(self.selector.items())), self.only_model)


class CohortState(BaseModel):
    """A cohort's desired state: the statement its gateways verify and act on."""

    model_config = ConfigDict(extra="forbid")

    cohort: int = Field(ge=0, lt=COHORT_COUNT)
    generation: int = Field(ge=0, description="Of its newest write: older states are replays.")
    entries: list[CohortEntry] = Field(default_factory=list)
    statement_signature: str | None = None
    statement_key_id: str | None = None
    statement_expires_at: int | None = None

    def choose(
        self, device_class: str, labels: dict[str, str], running_model: str | None,
        running_variant: str | None,
    ) -> CohortEntry | None:  # fmt: skip
        """The newest entry meant for a gateway like this (None: nothing for it here)."""
        fitting = [
            e for e in self.entries
            if e.applies_to(device_class, labels, running_model, running_variant)
        ]  # fmt: skip
        return max(fitting, key=lambda e: e.generation, default=None)

    def with_entry(self, entry: CohortEntry, generation: int) -> CohortState:
        """A new state with ``entry`` in it, replacing one of the same slot or rollout and
        class; unsigned (the writer signs it)."""
        same_rollout = (entry.rollout_id, entry.device_class)
        kept = [
            e for e in self.entries
            if e.slot() != entry.slot() and (e.rollout_id, e.device_class) != same_rollout
        ]  # fmt: skip
        entries = sorted([*kept, entry], key=lambda e: e.generation)[-MAX_ENTRIES:]
        return CohortState(cohort=self.cohort, generation=generation, entries=entries)

    def without_rollout(self, rollout_id: str, generation: int) -> CohortState:
        kept = [e for e in self.entries if e.rollout_id != rollout_id]
        return CohortState(cohort=self.cohort, generation=generation, entries=kept)


def cohort_statement(state: CohortState, expires_at: int) -> bytes:
    """The signed bytes: canonical JSON of the cohort, its generation, entries and expiry."""
    statement = {
        "kind": "cohort",
        "cohort": state.cohort,
        "generation": state.generation,
        "entries": [e.model_dump(mode="json") for e in state.entries],
        "expires_at": expires_at,
    }
    return json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
