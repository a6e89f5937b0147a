"""The cohort table on a real NATS: a rollout withdrawn fleet-wide never comes back (a chunk
still in flight included), a cohort state's generation only rises, and a write of every
cohort leaves the event loop to others between chunks."""

from __future__ import annotations

import asyncio
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.msg import Msg

from slmops.assignments import AssignmentSigner, check_cohort_statement
from slmops.bus import Bus
from slmops.bus.permissions import COHORT_SUBJECT
from slmops.cohorts import COHORT_COUNT, CohortEntry, CohortState, cohort_key
from slmops.events.payloads import ArtifactRef, DesiredModel
from slmops.trust import KeyRole, TrustedKey, TrustedKeys
from slmops_rollout.cohorts import CohortTable

pytestmark = [pytest.mark.integration]


def _entry(rollout_id: str, generation: int, device_class: str = "cpu") -> CohortEntry:
    desired = DesiredModel(
        model_name="m", version="2.0.0", variant_id="v-2", manifest_digest="sha256:" + "a" * 64,
        artifact=ArtifactRef(digest="sha256:" + "b" * 64, size_bytes=1, uri="s3://b/x"),
    )  # fmt: skip
    return CohortEntry(rollout_id=rollout_id, generation=generation, device_class=device_class,
                       desired=desired)  # fmt: skip


async def test_a_withdrawn_rollout_stays_out_and_generations_only_rise(bus: Bus) -> None:
    kv = await bus.key_value("slmops-cohorts")
    table = CohortTable(kv, bus, None)
    await table.reach({7: [_entry("ro-kept", 3, "gpu")], 8: [_entry("ro-back", 10)]}, 10)
    await table.reach({7: [_entry("ro-back", 10)]}, 10)

    # execute: a fleet rollback (its generation drawn before a later write landed), then a
    # chunk of the same rollout that was still in flight, then its completion's rest
    await table.withdraw("ro-back", 9)
    await table.reach({8: [_entry("ro-back", 11)]}, 11)
    await table.reach_rest([_entry("ro-back", 12)], 12)

    # assert: gone from every cohort, in memory and in KV; the other rollout's entry stays;
    # each state's generation rose past what its gateways saw
    reloaded = CohortTable(kv, bus, None)
    await reloaded.load()
    for view in (table, reloaded):
        assert not any(view.holds(c, "ro-back", "cpu") for c in range(1024))
        assert view.holds(7, "ro-kept", "gpu")  # another class's entry: kept
        assert view.state(7).generation > 10
        assert view.state(8).generation > 10


async def test_every_cohort_is_signed_stored_and_announced_a_chunk_at_a_time(bus: Bus) -> None:
    """A completing rollout reaches all 1,024 cohorts (~0.1 ms of signing each): reports
    must be folded meanwhile, so other tasks run between chunks."""
    # setup: a signer its gateways trust, a listener on every cohort's subject, and a task
    # that samples how many cohorts hold the entry each time it gets a turn
    kv = await bus.key_value("slmops-cohorts")
    signer = AssignmentSigner(Ed25519PrivateKey.generate())
    pem = (
        signer.private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    keys = TrustedKeys({KeyRole.ASSIGNMENTS: (TrustedKey.of(pem),)})
    table = CohortTable(kv, bus, signer)
    heard: list[CohortState] = []

    async def on_state(msg: Msg) -> None:
        heard.append(CohortState.model_validate_json(msg.data))

    sub = await bus.nc.subscribe(f"{COHORT_SUBJECT}.>", cb=on_state)
    seen: set[int] = set()
    writing = True

    async def sample() -> None:
        while writing:
            seen.add(sum(table.holds(c, "ro-all", "cpu") for c in range(COHORT_COUNT)))
            await asyncio.sleep(0)

    # execute: the rest of the cohorts, beside the sampler
    sampler = asyncio.create_task(sample())
    written = await table.reach_rest([_entry("ro-all", 20)], 20)
    writing = False
    await sampler

    # assert: every cohort written, stored signed and announced once; the sampler ran while
    # some but not all were written
    assert written == COHORT_COUNT
    assert any(0 < n < COHORT_COUNT for n in seen), sorted(seen)
    for cohort in (0, 511, COHORT_COUNT - 1):
        stored = CohortState.model_validate_json((await kv.get(cohort_key(cohort))).value or b"")
        check_cohort_statement(stored, keys, cohort, now=time.time())
    deadline = asyncio.get_running_loop().time() + 10
    while len(heard) < COHORT_COUNT and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    await sub.unsubscribe()
    assert sorted(s.cohort for s in heard) == list(range(COHORT_COUNT))
