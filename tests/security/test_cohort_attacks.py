"""Attacks on cohort states (the local stack as processes: real nats-server permissions, the
real gateway agent with a pinned trust root). A gateway reads only its own cohort's state and
hears only its own cohort's notifications, and publishes to no cohort subject; a state written
by whoever could (the admin here: a compromised broker path) that does not prove itself -
unsigned, signed by an untrusted key, altered, relabelled from another cohort, expired - is
reported failed with the reason and installs nothing; an older genuine one is not acted on."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.assignments import AssignmentSigner
from slmops.bus.permissions import COHORT_BUCKET, COHORT_SUBJECT, REPORTS_SUBJECT
from slmops.cohorts import COHORT_COUNT, CohortEntry, CohortState, cohort_key, cohort_of
from slmops.events.payloads import ArtifactRef, DesiredModel
from slmops.testing.localstack import RunningStack
from slmops.trust.local import LOCAL_ASSIGNMENT_KEY_RELPATH

GATEWAY_ID = "local-gw-1"
GATEWAY = f"gateway-{GATEWAY_ID}"
DEVICE_CLASS = "x86-avx512-vnni"  # the stack's gateway declares the default class
DIGEST = "sha256:" + "e" * 64
OWN = cohort_of(GATEWAY_ID)
OTHER = (OWN + 1) % COHORT_COUNT


def _subject(cohort: int) -> str:
    return f"{COHORT_SUBJECT}.{cohort_key(cohort)}"


def _state(generation: int, cohort: int = OWN) -> CohortState:
    desired = DesiredModel(
        model_name="evil", version="99", variant_id="v-evil", manifest_digest=DIGEST,
        artifact=ArtifactRef(digest=DIGEST, size_bytes=1, uri="s3://slmops/blobs/evil"),
    )  # fmt: skip
    entry = CohortEntry(rollout_id="ro-evil", generation=generation, device_class=DEVICE_CLASS,
                        desired=desired)  # fmt: skip
    return CohortState(cohort=cohort, generation=generation, entries=[entry])


async def _send(admin: Any, state: CohortState, cohort: int = OWN) -> None:
    """What the rollout service does: the cohort's state into KV, then its notification."""
    kv = await admin.client.jetstream(timeout=5).key_value(COHORT_BUCKET)
    body = state.model_dump_json().encode()
    await kv.put(cohort_key(cohort), body)
    await admin.client.publish(_subject(cohort), body)
    await admin.client.flush()


async def _reports(admin: Any) -> asyncio.Queue[dict[str, Any]]:
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_report(msg: Any) -> None:
        await queue.put(json.loads(msg.data)["data"])

    await admin.client.subscribe(f"slmops.gateway.report.v1.*.{GATEWAY_ID}", cb=on_report)
    return queue


async def _outcome(queue: asyncio.Queue[dict[str, Any]], generation: int) -> dict[str, Any]:
    """The gateway's failed/applied report about ``generation`` (acknowledgements skipped)."""
    while True:
        report = await asyncio.wait_for(queue.get(), timeout=60)
        if report.get("generation") == generation and report["kind"] in ("failed", "applied"):
            return report


async def test_a_gateway_reads_its_own_cohorts_state_and_no_other(connect: Any) -> None:
    admin, gateway = await connect("admin"), await connect(GATEWAY)
    kv = await admin.client.jetstream(timeout=5).key_value(COHORT_BUCKET)
    for cohort in (OWN, OTHER):  # empty states: nothing for the stack's gateway to act on
        await kv.put(cohort_key(cohort), CohortState(cohort=cohort, generation=0).model_dump_json()
                     .encode())  # fmt: skip
    own = await gateway.client.jetstream(timeout=5).key_value(COHORT_BUCKET)
    read = CohortState.model_validate_json((await own.get(cohort_key(OWN))).value or b"")
    assert read.cohort == OWN  # the positive control: its own cohort's key
    error = await gateway.refused(own.get(cohort_key(OTHER)))
    assert f"$kv.{COHORT_BUCKET}.{cohort_key(OTHER)}" in error


async def test_a_gateway_hears_only_its_own_cohort_and_publishes_to_none(connect: Any) -> None:
    admin, gateway = await connect("admin"), await connect(GATEWAY)
    heard: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_msg(msg: Any) -> None:
        await heard.put(msg.data)

    await gateway.client.subscribe(_subject(OWN), cb=on_msg)
    await gateway.client.flush()
    await admin.client.publish(_subject(OWN), b"ping")
    assert await asyncio.wait_for(heard.get(), timeout=10) == b"ping"  # the positive control
    for subject in (_subject(OTHER), f"{COHORT_SUBJECT}.*", f"{COHORT_SUBJECT}.>"):
        error = await gateway.refused(gateway.client.subscribe(subject))
        assert f'subscription to "{subject.lower()}"' in error
    for cohort in (OWN, OTHER):
        subject = _subject(cohort)
        error = await gateway.refused(gateway.client.publish(subject, b"{}"))
        assert f'publish to "{subject.lower()}"' in error


async def test_forged_altered_and_expired_cohort_states_are_refused(
    stack: RunningStack, connect: Any, generation_base: int
) -> None:
    admin = await connect("admin")
    reports = await _reports(admin)
    real = AssignmentSigner.from_file(stack.var_dir / LOCAL_ASSIGNMENT_KEY_RELPATH)
    rogue = AssignmentSigner(Ed25519PrivateKey.generate())
    base = generation_base
    signed = real.sign_cohort(_state(base + 4))
    entry = signed.entries[0]
    swapped = entry.model_copy(update={"desired": entry.desired.model_copy(
        update={"variant_id": "v-other"})})  # another variant than the one signed  # fmt: skip
    relabelled = real.sign_cohort(_state(base + 5, cohort=OTHER)).model_copy(
        update={"cohort": OWN})  # another cohort's genuine state, as if ours  # fmt: skip
    attacks = [
        (_state(base + 1), "without a signed statement"),
        (rogue.sign_cohort(_state(base + 2)), "untrusted key"),
        (real.sign_cohort(_state(base + 3), now=time.time() - 40 * 86_400), "expired"),
        (signed.model_copy(update={"entries": [swapped]}), "does not verify"),
        (relabelled, "does not verify"),
    ]
    for state, reason in attacks:
        await _send(admin, state)
        report = await _outcome(reports, state.generation)
        assert report["kind"] == "failed", report
        assert reason in report["reason"], report["reason"]
        assert report["rollout_id"] == "ro-evil"

    # A genuine state passes its check (its model does not exist: refused later, and for
    # that reason, not for its statement) ...
    genuine = real.sign_cohort(_state(base + 10))
    await _send(admin, genuine)
    report = await _outcome(reports, base + 10)
    assert report["kind"] == "failed"
    assert "statement" not in report["reason"], report["reason"]
    # ... and once acted on, an older (replayed) genuine state and another cohort's genuine
    # state are ignored: the next report is about the state sent after them.
    await _send(admin, real.sign_cohort(_state(base + 6)))
    await admin.client.publish(_subject(OWN), real.sign_cohort(
        _state(base + 12, cohort=OTHER)).model_dump_json().encode())  # fmt: skip
    await _send(admin, _state(base + 11))
    generations = []
    while (report := await asyncio.wait_for(reports.get(), timeout=60))["generation"] != base + 11:
        generations.append(report["generation"])
    assert base + 6 not in generations  # neither acknowledged nor reported
    assert base + 12 not in generations
    assert report["kind"] == "failed"
    assert "without a signed statement" in report["reason"]


async def test_a_gateway_cannot_publish_a_sites_batch_of_reports(connect: Any) -> None:
    # a batch speaks for many gateways: a gateway (even one named like a site) may not send one
    gateway = await connect(GATEWAY)
    for subject in (f"{REPORTS_SUBJECT}.{GATEWAY_ID}.b1", f"{REPORTS_SUBJECT}.site-1.b1"):
        error = await gateway.refused(gateway.client.publish(subject, b"{}"))
        assert f'publish to "{subject.lower()}"' in error
