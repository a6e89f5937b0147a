"""Cohorts: a gateway's cohort is a stable, well spread hash of its id; a cohort's state picks
the newest entry meant for a gateway, keeps one entry per slot, and proves itself only signed,
for its own cohort, by a trusted key, before it expires."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.assignments import AssignmentSigner, StatementRefused, check_cohort_statement
from slmops.cohorts import (
    COHORT_COUNT,
    MAX_ENTRIES,
    CohortEntry,
    CohortState,
    LabelOverlay,
    cohort_of,
)
from slmops.events.payloads import ArtifactRef, DesiredModel
from slmops.trust import KeyRole, TrustedKey, TrustedKeys

DIGEST = "sha256:" + "a" * 64


def _desired(variant_id: str = "v-1", model_name: str = "minilm") -> DesiredModel:
    return DesiredModel(
        model_name=model_name, version="1.1.0", variant_id=variant_id, manifest_digest=DIGEST,
        artifact=ArtifactRef(digest="sha256:" + "b" * 64, size_bytes=10, uri="s3://b/blobs/x"),
    )  # fmt: skip


def _entry(rollout_id: str = "r-1", generation: int = 1, **fields: object) -> CohortEntry:
    values: dict[str, Any] = {"device_class": "cpu", "desired": _desired(), **fields}
    return CohortEntry(rollout_id=rollout_id, generation=generation, **values)


def _trusting(signer: AssignmentSigner) -> TrustedKeys:
    pem = (
        signer.private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return TrustedKeys({KeyRole.ASSIGNMENTS: (TrustedKey.of(pem),)})


@pytest.fixture
def signer() -> AssignmentSigner:
    return AssignmentSigner(Ed25519PrivateKey.generate(), ttl_s=3600)


# --- membership ---------------------------------------------------------------------------


def test_a_gateways_cohort_is_stable_and_in_range() -> None:
    ids = [f"gw-{i}" for i in range(200)]
    first = [cohort_of(g) for g in ids]
    assert first == [cohort_of(g) for g in ids]
    assert all(0 <= c < COHORT_COUNT for c in first)
    assert len(set(first)) > 150  # 200 ids do not pile into a few cohorts


def test_ten_thousand_gateways_spread_over_the_cohorts() -> None:
    counts = Counter(cohort_of(f"site-{i % 7}-gw-{i}") for i in range(10_000))
    mean = 10_000 / COHORT_COUNT  # ~9.8
    # a uniform hash leaves ~e^-9.8 of the cohorts empty (none, in expectation)
    assert len(counts) >= 0.99 * COHORT_COUNT
    assert max(counts.values()) <= 3 * mean


# --- choosing and replacing entries -------------------------------------------------------


def test_the_newest_entry_for_the_class_and_labels_is_chosen() -> None:
    state = CohortState(cohort=3, generation=9, entries=[
        _entry("r-old", 1, desired=_desired("v-old")),
        _entry("r-new", 5, desired=_desired("v-new")),
        _entry("r-arm", 7, device_class="arm", desired=_desired("v-arm")),
        _entry("r-paris", 8, selector={"site": "paris"}, desired=_desired("v-paris")),
    ])  # fmt: skip
    chosen = state.choose("cpu", {"site": "berlin"}, None, None)
    assert (chosen.desired.variant_id if chosen else None) == "v-new"
    paris = state.choose("cpu", {"site": "paris"}, None, None)
    assert (paris.desired.variant_id if paris else None) == "v-paris"
    arm = state.choose("arm", {}, None, None)
    assert (arm.rollout_id if arm else None) == "r-arm"
    assert state.choose("gpu", {"site": "paris"}, None, None) is None


def test_a_model_limited_entry_reaches_only_gateways_running_that_model() -> None:
    limited = _entry("r-field", 4, only_model="minilm", only_variants=["v-legacy"])
    state = CohortState(cohort=3, generation=4, entries=[limited])
    assert state.choose("cpu", {}, None, None) is None  # runs nothing
    assert state.choose("cpu", {}, "other-model", "v-other") is None
    assert state.choose("cpu", {}, "minilm", "v-1") == limited
    assert state.choose("cpu", {}, "renamed", "v-legacy") == limited  # one of its variants


def test_a_new_entry_replaces_its_slot_and_its_rollouts_class() -> None:
    state = CohortState(cohort=1, generation=1, entries=[
        _entry("r-1", 1), _entry("r-2", 2, selector={"site": "paris"}),
        _entry("r-3", 3, device_class="arm"),
    ])  # fmt: skip
    same_slot = state.with_entry(_entry("r-4", 10), generation=10)
    assert sorted(e.rollout_id for e in same_slot.entries) == ["r-2", "r-3", "r-4"]
    assert (same_slot.generation, same_slot.cohort) == (10, 1)
    assert same_slot.statement_signature is None  # the writer signs it
    # the same rollout and class again (another selector): replaces, never two of one rollout
    again = same_slot.with_entry(_entry("r-2", 11, selector={"site": "lyon"}), generation=11)
    assert [e.rollout_id for e in again.entries].count("r-2") == 1
    assert again.choose("cpu", {"site": "paris"}, None, None).rollout_id == "r-4"  # type: ignore[union-attr]
    without = again.without_rollout("r-4", generation=12)
    assert sorted(e.rollout_id for e in without.entries) == ["r-2", "r-3"]


def test_a_cohort_keeps_at_most_max_entries_the_newest() -> None:
    state = CohortState(cohort=0, generation=0)
    for generation in range(1, MAX_ENTRIES + 6):
        entry = _entry(f"r-{generation}", generation, selector={"n": str(generation)})
        state = state.with_entry(entry, generation)
    assert len(state.entries) == MAX_ENTRIES
    assert min(e.generation for e in state.entries) == 6  # the five oldest went


# --- signed statements --------------------------------------------------------------------


def _state() -> CohortState:
    overlay = LabelOverlay(selector={"site": "paris"}, settings={"intra_op_threads": 2})
    return CohortState(cohort=17, generation=5, entries=[
        _entry("r-1", 5, selector={"site": "paris"}, overlays=[overlay]),
    ])  # fmt: skip


def test_a_signed_cohort_state_verifies(signer: AssignmentSigner) -> None:
    signed = signer.sign_cohort(_state())
    check_cohort_statement(signed, _trusting(signer), 17)
    assert signed.statement_key_id == signer.key_id
    roundtrip = CohortState.model_validate_json(signed.model_dump_json())  # as read from KV
    check_cohort_statement(roundtrip, _trusting(signer), 17)


@pytest.mark.parametrize(
    "alter",
    [
        lambda e: e.model_copy(update={"desired": _desired("v-evil")}),
        lambda e: e.model_copy(update={"selector": {}}),
        lambda e: e.model_copy(update={"overlays": []}),
        lambda e: e.model_copy(update={"generation": 6}),
        lambda e: e.model_copy(update={"device_class": "arm"}),
        lambda e: e.model_copy(update={"only_model": "minilm"}),
    ],
)
def test_an_altered_entry_breaks_the_statement(signer: AssignmentSigner, alter: object) -> None:
    signed = signer.sign_cohort(_state())
    altered = signed.model_copy(update={"entries": [alter(signed.entries[0])]})  # type: ignore[operator]
    with pytest.raises(StatementRefused, match="does not verify"):
        check_cohort_statement(altered, _trusting(signer), 17)


def test_added_entries_a_new_generation_or_expiry_break_it(signer: AssignmentSigner) -> None:
    signed = signer.sign_cohort(_state())
    keys = _trusting(signer)
    changes: tuple[dict[str, Any], ...] = (
        {"entries": [*signed.entries, _entry("r-evil", 6)]},
        {"entries": []},
        {"generation": 6},
        {"statement_expires_at": int(time.time()) + 10 * 86_400},
    )
    for change in changes:
        with pytest.raises(StatementRefused, match="does not verify"):
            check_cohort_statement(signed.model_copy(update=change), keys, 17)


def test_unsigned_other_cohorts_untrusted_and_expired_states_are_refused(
    signer: AssignmentSigner,
) -> None:
    keys = _trusting(signer)
    with pytest.raises(StatementRefused, match="without a signed statement"):
        check_cohort_statement(_state(), keys, 17)
    with pytest.raises(StatementRefused, match="for cohort 17, not this gateway's 18"):
        check_cohort_statement(signer.sign_cohort(_state()), keys, 18)
    # another cohort's genuine state relabelled as ours: the cohort is in the signed bytes
    relabelled = signer.sign_cohort(_state()).model_copy(update={"cohort": 18})
    with pytest.raises(StatementRefused, match="does not verify"):
        check_cohort_statement(relabelled, keys, 18)
    rogue = AssignmentSigner(Ed25519PrivateKey.generate())
    with pytest.raises(StatementRefused, match="untrusted key"):
        check_cohort_statement(rogue.sign_cohort(_state()), keys, 17)
    old = signer.sign_cohort(_state(), now=time.time() - 7200)  # expired an hour ago
    with pytest.raises(StatementRefused, match="expired"):
        check_cohort_statement(old, keys, 17)
