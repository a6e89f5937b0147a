"""Rollouts by cohort over simulated fleets (real NATS, moto S3, registry, rollout service): a
wave writes one signed state per cohort and no per-gateway desired state; cohort membership
holds across a restart of the rollout service; a gateway whose labels change follows its new
target set; a single-gateway rollback is the only per-gateway write; a gateway offline through
a whole rollout catches up from its cohort's state; gateways speaking only the older
per-gateway protocol still get their own desired state beside cohort gateways; a fleet
rollback also reaches gateways that installed from their cohort unplanned; a cancel withdraws
the rollout's entries; a site's batched wave reports count like its gateways' own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats.js.errors
import pytest

from slmops.bus import Bus
from slmops.bus.permissions import COHORT_BUCKET, DESIRED_STATE_BUCKET
from slmops.cohorts import COHORT_COUNT, CohortState, cohort_key, cohort_of
from slmops.events import GatewayReport, GatewayReports, new_event
from slmops.events.reports import report_event
from slmops.testing.events import await_events, stream_count
from slmops.testing.models import with_word_tokenizer
from slmops.testing.polling import until, until_answered
from slmops_gateway.relay import SiteRelay
from slmops_gateway.simulator import FleetSpec, SimulatedFleet
from slmops_gateway.sitereports import SiteReporter

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CLASS = "test-cpu"
COMPLETED = "slmops.rollout.completed.v1"


async def _bucket(bus: Bus, bucket: str) -> dict[str, bytes]:
    """Every live key of ``bucket`` and its value."""
    kv = await bus.key_value(bucket)
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return {}
    return {key: (await kv.get(key)).value or b"" for key in keys}


async def _cohorts(bus: Bus) -> dict[int, CohortState]:
    """Every cohort's state in KV, each read by its key."""
    kv = await bus.key_value(COHORT_BUCKET)

    async def read(cohort: int) -> CohortState | None:
        try:
            entry = await kv.get(cohort_key(cohort))
        except nats.js.errors.KeyNotFoundError:
            return None
        return CohortState.model_validate_json(entry.value or b"{}")

    states = await asyncio.gather(*(read(c) for c in range(COHORT_COUNT)))
    return {s.cohort: s for s in states if s is not None}


def _holding(states: dict[int, CohortState], rollout_id: str) -> set[int]:
    """The cohorts whose state has an entry of ``rollout_id``."""
    return {c for c, s in states.items() if any(e.rollout_id == rollout_id for e in s.entries)}


async def _start(api: Any, version: str, **fields: Any) -> str:
    started = await api.post("/v1/rollouts", json={"model_name": "tiny", "version": version,
                                                   **fields})  # fmt: skip
    assert started.status_code == 201, started.text
    return str(started.json()["rollout_id"])


async def _completed(bus: Bus, rollout_id: str, timeout_s: float = 60) -> Any:
    done = await await_events(bus, COMPLETED, count=1, timeout_s=timeout_s,
                              where=lambda e: e.data.rollout_id == rollout_id)  # fmt: skip
    return done[0].data


def _variant(fleet: SimulatedFleet, gateway_id: str) -> str | None:
    active = fleet.gateways[gateway_id].agent.slots.active
    return active.variant_id if active else None


async def _reregister(
    bus: Bus, fleet: SimulatedFleet, gateway_id: str, labels: dict[str, str]
) -> None:
    """The gateway comes back with new labels: it registers again and reconciles with its
    desired state (what a restarted agent with changed settings does)."""
    agent = fleet.gateways[gateway_id].agent
    agent.settings = agent.settings.model_copy(update={"labels": labels})
    caps = {"simulated": True, "ram_mb": 4096, "protocols": agent.protocols}
    await bus.publish(report_event(agent.report("registered", capabilities=caps)))
    desired, cohorts = await bus.key_value(DESIRED_STATE_BUCKET), await bus.key_value(COHORT_BUCKET)

    async def read(cohort: int) -> CohortState | None:
        try:
            entry = await cohorts.get(cohort_key(cohort))
        except nats.js.errors.KeyNotFoundError:
            return None
        return CohortState.model_validate_json(entry.value or b"{}")

    report = await agent.reconcile(desired, read)
    if report is not None:
        await bus.publish(report_event(report))


async def test_cohort_states_survive_a_restart_and_the_next_rollout_reaches_whole_cohorts(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes]
) -> None:
    # setup: 40 cohort gateways; two releases; the first rolled out by one rollout service
    spec = FleetSpec(count=40, classes={CLASS: 1.0}, prefix="rs")
    old = await pipeline.release(bus, with_word_tokenizer(tiny_onnx()), [CLASS], "1.0.0")
    new = await pipeline.release(bus, with_word_tokenizer(tiny_onnx(seed=4)), [CLASS], "1.1.0")
    policy = {"percents": [30, 100], "soak_s": 0.2}
    async with pipeline.simulated_fleet(bus, spec) as fleet:
        async with pipeline.rollout_service() as api:
            await pipeline.await_fleet(api, 40)
            first = await _start(api, "1.0.0", policy=policy)
            done = await _completed(bus, first)
            assert (done.gateways_updated, done.gateways_failed) == (40, 0)
        before = await _cohorts(bus)
        assert len(before) == COHORT_COUNT  # completed: it reached every cohort (late joiners)
        assert await _bucket(bus, DESIRED_STATE_BUCKET) == {}  # no per-gateway write

        # execute: another rollout service process-equivalent loads the table and rolls out
        # the next release; its canary wave waits for approval
        async with pipeline.rollout_service() as api:
            await pipeline.await_fleet(api, 40)
            assert await _cohorts(bus) == before  # loaded, not rewritten
            # what each runs, though the wave's outcomes were kept in the rollout's progress
            # rather than written per gateway record
            records = (await api.get("/v1/gateways")).json()
            assert {(r["running_variant_id"], r["last_rollout_id"]) for r in records} == {
                (old[CLASS].variant_id, first)}  # fmt: skip
            fleet_kv = await _bucket(bus, "slmops-gateways")
            assert all(b'"last_kind":"registered"' in value for value in fleet_kv.values())
            second = await _start(api, "1.1.0", policy={**policy, "approval_waves": [1]})
            await await_events(bus, "slmops.gateway.report.v1.applied.>", count=1,
                               where=lambda e: e.data.rollout_id == second)  # fmt: skip
            states = await _cohorts(bus)
            reached = _holding(states, second)
            members = {g: cohort_of(g) for g in fleet.gateways}
            canary = {g for g, c in members.items() if c in reached}
            await until(lambda: all(_variant(fleet, g) == new[CLASS].variant_id for g in canary),
                        "the canary's gateways to serve the new variant")  # fmt: skip

            # assert: the canary is whole cohorts, as the gateways compute them: every member
            # of a reached cohort moved, no other gateway did
            assert 12 <= len(canary) < 40
            for gateway_id, cohort in members.items():
                expected = new if cohort in reached else old
                assert _variant(fleet, gateway_id) == expected[CLASS].variant_id, gateway_id
            status = (await api.get(f"/v1/rollouts/{second}")).json()
            assert status["wave_progress"][0]["targets"] == len(canary)
            # the newer rollout's entry replaced the older one of the same reach, only there
            for cohort, state in states.items():
                expected_ids = {second} if cohort in reached else {first}
                assert {e.rollout_id for e in state.entries} == expected_ids, cohort

            assert (await api.post(f"/v1/rollouts/{second}/approve", json={})).status_code == 200
            done = await _completed(bus, second)
            assert (done.gateways_updated, done.gateways_failed) == (40, 0)
            assert fleet.serving() == {new[CLASS].variant_id: 40}
            assert await _bucket(bus, DESIRED_STATE_BUCKET) == {}


async def test_a_gateway_whose_labels_change_follows_its_new_target_set(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes]
) -> None:
    # setup: 20 gateways, half in berlin and half in paris; a rollout to paris only
    spec = FleetSpec(count=20, classes={CLASS: 1.0}, labels={"site": ["berlin", "paris"]},
                     prefix="lb")  # fmt: skip
    variant = (await pipeline.release(bus, with_word_tokenizer(tiny_onnx()), [CLASS]))[CLASS]
    async with pipeline.rollout_service() as api, pipeline.simulated_fleet(bus, spec) as fleet:
        await pipeline.await_fleet(api, 20)
        rollout = await _start(api, "1.0.0", selector={"site": "paris"},
                               policy={"percents": [50, 100], "soak_s": 0.2})  # fmt: skip
        done = await _completed(bus, rollout)
        assert done.gateways_updated == 10
        site = {g: s.agent.settings.labels["site"] for g, s in fleet.gateways.items()}
        for gateway_id, label in site.items():
            expected = variant.variant_id if label == "paris" else None
            assert _variant(fleet, gateway_id) == expected, gateway_id

        # execute: a berlin gateway comes back labelled paris, a paris one labelled berlin
        moved = next(g for g, label in site.items() if label == "berlin")
        await _reregister(bus, fleet, moved, {"site": "paris"})
        stays = next(g for g, label in site.items() if label == "berlin" and g != moved)
        await _reregister(bus, fleet, stays, {"site": "berlin", "rack": "2"})

        # assert: the moved gateway installed the paris rollout from its cohort's state, with
        # no per-gateway write; a gateway still in berlin did not; the fleet sees both
        assert _variant(fleet, moved) == variant.variant_id
        assert _variant(fleet, stays) is None
        assert await _bucket(bus, DESIRED_STATE_BUCKET) == {}

        async def recorded() -> bool:
            records = {r["gateway_id"]: r for r in (await api.get("/v1/gateways")).json()}
            record = records[moved]
            return bool(record["labels"] == {"site": "paris"}
                        and record["running_variant_id"] == variant.variant_id)  # fmt: skip

        await until_answered(recorded, "the fleet record of the moved gateway")

        # and newcomers follow their labels too: paris ones install, berlin ones do not
        late = FleetSpec(count=6, classes={CLASS: 1.0}, labels={"site": ["berlin", "paris"]},
                         prefix="lb-late", seed=3)  # fmt: skip
        async with pipeline.simulated_fleet(bus, late) as newcomers:
            for gateway_id, sim in newcomers.gateways.items():
                paris = sim.agent.settings.labels["site"] == "paris"
                expected = variant.variant_id if paris else None
                assert _variant(newcomers, gateway_id) == expected, gateway_id
        assert await _bucket(bus, DESIRED_STATE_BUCKET) == {}


async def test_a_single_gateway_rollback_is_the_only_per_gateway_desired_state(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes]
) -> None:
    # setup: 20 gateways run 1.0.0 with healthy baselines; on any later model two of them
    # get 10x slower
    spec = FleetSpec(count=20, classes={CLASS: 1.0}, prefix="ex", faults={"latency": 0.1})
    old = await pipeline.release(bus, with_word_tokenizer(tiny_onnx()), [CLASS], "1.0.0")
    new = await pipeline.release(bus, with_word_tokenizer(tiny_onnx(seed=4)), [CLASS], "1.1.0")
    async with pipeline.rollout_service() as api, pipeline.simulated_fleet(bus, spec) as fleet:
        await pipeline.await_fleet(api, 20)
        first = await _start(api, "1.0.0", policy={"percents": [100], "soak_s": 0})
        await _completed(bus, first)
        await fleet.report_health(30.0)
        await pipeline.await_fleet(api, 20, with_health=True)

        # execute: roll out 1.1.0 with a latency gate rolling back only breaching gateways
        policy = {"percents": [100], "soak_s": 30, "max_latency_ratio": 1.5,
                  "rollback_scope": "gateways"}  # fmt: skip
        second = await _start(api, "1.1.0", policy=policy)
        await await_events(bus, "slmops.gateway.report.v1.applied.>", count=20, timeout_s=60,
                           where=lambda e: e.data.rollout_id == second)  # fmt: skip
        await fleet.report_health(30.0)
        rolled = await await_events(bus, "slmops.rollout.rolled_back.v1", count=1, timeout_s=30)

        # assert: the slow gateways went back and are the only keys in the desired-state
        # bucket; everyone else follows its cohort's entry of the new rollout
        slow = sorted(g for g, s in fleet.gateways.items() if s.fault == "latency")
        assert sorted(rolled[0].data.gateway_ids) == slow
        await until(lambda: all(_variant(fleet, g) == old[CLASS].variant_id for g in slow),
                    "the slow gateways to serve the old variant again")  # fmt: skip
        desired = await _bucket(bus, DESIRED_STATE_BUCKET)
        assert sorted(desired) == slow
        states = await _cohorts(bus)
        for gateway_id, sim in fleet.gateways.items():
            if gateway_id in slow:
                continue
            assert _variant(fleet, gateway_id) == new[CLASS].variant_id, gateway_id
            assert sim.agent.acted_entry is not None
            assert sim.agent.acted_entry[0] == second
            assert second in {e.rollout_id for e in states[cohort_of(gateway_id)].entries}


async def test_a_gateway_offline_through_a_whole_rollout_catches_up_from_its_cohort(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes]
) -> None:
    # setup: 16 gateways online, 4 that registered and then went offline
    online = FleetSpec(count=16, classes={CLASS: 1.0}, prefix="on")
    offline = FleetSpec(count=4, classes={CLASS: 1.0}, prefix="off")
    variant = (await pipeline.release(bus, with_word_tokenizer(tiny_onnx()), [CLASS]))[CLASS]
    async with pipeline.rollout_service() as api, pipeline.simulated_fleet(bus, online) as fleet:
        async with pipeline.simulated_fleet(bus, offline):
            await pipeline.await_fleet(api, 20)

        # execute: the whole rollout runs while they are away; then they come back
        policy = {"percents": [25, 100], "soak_s": 0.2, "silent_timeout_s": 2,
                  "success_threshold": 0.75}  # fmt: skip
        rollout = await _start(api, "1.0.0", policy=policy)
        done = await _completed(bus, rollout)
        assert (done.gateways_updated, done.gateways_silent) == (16, 4)
        assert fleet.serving() == {variant.variant_id: 16}
        async with pipeline.simulated_fleet(bus, offline) as back:
            # assert: on connect each read its cohort's state and installed the rollout's
            # variant; nothing was written for it alone, then or now
            assert back.serving() == {variant.variant_id: 4}
            for sim in back.gateways.values():
                assert sim.agent.acted_entry is not None
                assert sim.agent.acted_entry[0] == rollout
            assert await _bucket(bus, DESIRED_STATE_BUCKET) == {}

            async def recorded() -> bool:
                records = {r["gateway_id"]: r for r in (await api.get("/v1/gateways")).json()}
                return all(records[g]["running_variant_id"] == variant.variant_id
                           for g in back.gateways)  # fmt: skip

            await until_answered(recorded, "the fleet records of the returning gateways")


async def test_gateways_on_the_older_protocol_keep_working_beside_cohort_gateways(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes]
) -> None:
    # setup: 30 gateways, 9 of which speak only the per-gateway protocol (an upgrade)
    spec = FleetSpec(count=30, classes={CLASS: 1.0}, prefix="mx", legacy=0.3)
    variant = (await pipeline.release(bus, with_word_tokenizer(tiny_onnx()), [CLASS]))[CLASS]
    async with pipeline.rollout_service() as api, pipeline.simulated_fleet(bus, spec) as fleet:
        await pipeline.await_fleet(api, 30)
        legacy = sorted(g for g, s in fleet.gateways.items()
                        if not s.agent.settings.cohort_protocol)  # fmt: skip
        assert len(legacy) == 9

        # execute
        rollout = await _start(api, "1.0.0", policy={"percents": [30, 100], "soak_s": 0.2})
        done = await _completed(bus, rollout)

        # assert: everyone serves the new variant; only the older gateways have their own
        # desired state; the counts are the whole fleet's
        assert (done.gateways_updated, done.gateways_failed, done.gateways_silent) == (30, 0, 0)
        assert fleet.serving() == {variant.variant_id: 30}
        assert sorted(await _bucket(bus, DESIRED_STATE_BUCKET)) == legacy
        for gateway_id, sim in fleet.gateways.items():
            followed_cohort = sim.agent.acted_entry is not None
            assert followed_cohort == (gateway_id not in legacy), gateway_id
        status = (await api.get(f"/v1/rollouts/{rollout}")).json()
        assert status["gateways"] == {"applied": 30}
        # the site keeps a durable for its older gateways (each real one has its own)
        assert (await bus.js.consumer_info("SLMOPS_ROLLOUT", fleet.site)).name == fleet.site
    with pytest.raises(nats.js.errors.NotFoundError):  # and removes it when it stops
        await bus.js.consumer_info("SLMOPS_ROLLOUT", fleet.site)


async def test_a_planned_gateway_that_registers_again_mid_rollout_waits_for_its_wave(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes]
) -> None:
    # setup: 20 gateways running nothing; a rollout whose second wave waits for approval
    spec = FleetSpec(count=20, classes={CLASS: 1.0}, prefix="rg")
    variant = (await pipeline.release(bus, with_word_tokenizer(tiny_onnx()), [CLASS]))[CLASS]
    async with pipeline.rollout_service() as api, pipeline.simulated_fleet(bus, spec) as fleet:
        await pipeline.await_fleet(api, 20)
        policy = {"percents": [30, 100], "soak_s": 0.2, "approval_waves": [1]}
        rollout = await _start(api, "1.0.0", policy=policy)
        await await_events(bus, "slmops.gateway.report.v1.applied.>", count=1,
                           where=lambda e: e.data.rollout_id == rollout)  # fmt: skip
        reached = _holding(await _cohorts(bus), rollout)
        waiting = sorted(g for g in fleet.gateways if cohort_of(g) not in reached)
        assert waiting  # the second wave's gateways

        # execute: one of the second wave's gateways restarts (registers again) while the
        # canary waits for approval
        restarted = waiting[0]
        await _reregister(bus, fleet, restarted, {})

        # then a true late joiner (in no wave) registers: once it is welcomed with its own
        # assignment, the registration before it has been handled too
        prefix = next(f"rg-late{n}" for n in range(100)
                      if cohort_of(f"rg-late{n}-000000") not in reached)  # fmt: skip
        late = FleetSpec(count=1, classes={CLASS: 1.0}, prefix=prefix)
        async with pipeline.simulated_fleet(bus, late) as newcomer:
            await until(lambda: newcomer.serving() == {variant.variant_id: 1},
                        "the late joiner to be welcomed")  # fmt: skip

        # assert: it is not a late joiner - its wave (not yet approved) reaches it, so it gets
        # no assignment of its own and installs nothing before then
        status = (await api.get(f"/v1/rollouts/{rollout}")).json()
        assert status["wave_index"] == 0
        assert sorted(await _bucket(bus, DESIRED_STATE_BUCKET)) == [f"{prefix}-000000"]
        assert _variant(fleet, restarted) is None
        assert all(_variant(fleet, g) is None for g in waiting)


async def test_a_fleet_rollback_reaches_unplanned_installs_and_a_cancel_withdraws_entries(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes]
) -> None:
    # setup: 20 gateways (berlin/paris) all run 1.0.0; 1.1.0 rolls out to paris only
    spec = FleetSpec(count=20, classes={CLASS: 1.0}, labels={"site": ["berlin", "paris"]},
                     prefix="fr")  # fmt: skip
    model = with_word_tokenizer(tiny_onnx())
    old = await pipeline.release(bus, model, [CLASS], "1.0.0")
    new = await pipeline.release(bus, with_word_tokenizer(tiny_onnx(seed=4)), [CLASS], "1.1.0")
    third = await pipeline.release(bus, with_word_tokenizer(tiny_onnx(seed=5)), [CLASS], "1.2.0")
    async with pipeline.rollout_service() as api, pipeline.simulated_fleet(bus, spec) as fleet:
        await pipeline.await_fleet(api, 20)
        await _completed(bus, await _start(api, "1.0.0", policy={"percents": [100],
                                                                 "soak_s": 0}))  # fmt: skip
        paris = await _start(api, "1.1.0", selector={"site": "paris"},
                             policy={"percents": [100], "soak_s": 0})  # fmt: skip
        await _completed(bus, paris)
        # a berlin gateway comes back labelled paris: it installs 1.1.0 from its cohort's
        # state without being in the rollout's plan
        moved = next(g for g, s in fleet.gateways.items()
                     if s.agent.settings.labels["site"] == "berlin")  # fmt: skip
        await _reregister(bus, fleet, moved, {"site": "paris"})
        assert _variant(fleet, moved) == new[CLASS].variant_id

        async def known_as_installed() -> bool:
            records = {r["gateway_id"]: r for r in (await api.get("/v1/gateways")).json()}
            return bool(records[moved]["last_rollout_id"] == paris)

        await until_answered(known_as_installed, "the fleet record of the moved gateway")

        # execute: roll the paris rollout back fleet-wide
        answer = await api.post(f"/v1/rollouts/{paris}/rollback", json={"reason": "test"})
        assert answer.status_code == 200, answer.text

        # assert: the unplanned install went back to 1.0.0 with the planned ones
        rolled = await await_events(bus, "slmops.rollout.rolled_back.v1", count=1,
                                    where=lambda e: e.data.rollout_id == paris)  # fmt: skip
        assert moved in rolled[0].data.gateway_ids
        assert len(rolled[0].data.gateway_ids) == 11
        await until(lambda: _variant(fleet, moved) == old[CLASS].variant_id,
                    "the moved gateway to serve 1.0.0 again")  # fmt: skip

        # and: a cancelled rollout's entries leave the cohorts its first wave reached (what a
        # gateway registering there later reads); those that installed it keep it
        policy = {"percents": [30, 100], "soak_s": 0, "approval_waves": [1]}
        cancelled = await _start(api, "1.2.0", policy=policy)
        await await_events(bus, "slmops.gateway.report.v1.applied.>", count=1,
                           where=lambda e: e.data.rollout_id == cancelled)  # fmt: skip
        reached = _holding(await _cohorts(bus), cancelled)
        assert reached
        answer = await api.post(f"/v1/rollouts/{cancelled}/cancel", json={"reason": "test"})
        assert answer.status_code == 200, answer.text
        await until_answered(lambda: _no_entries_of(bus, cancelled),
                             "the cancelled rollout's entries to leave the cohorts")  # fmt: skip
        installed = {g for g in fleet.gateways if _variant(fleet, g) == third[CLASS].variant_id}
        assert installed
        assert {cohort_of(g) for g in installed} <= reached


async def _no_entries_of(bus: Bus, rollout_id: str) -> bool:
    return not _holding(await _cohorts(bus), rollout_id)


@contextlib.asynccontextmanager
async def _site_relay(bus: Bus, site: str) -> AsyncIterator[SiteRelay]:
    relay = SiteRelay(bus.nc, SiteReporter(bus, site))
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()


@pytest.mark.parametrize("batched_by", ["fleet", "relay"])
async def test_a_sites_batched_reports_move_the_wave_and_the_lineage_like_single_ones(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes], batched_by: str
) -> None:
    # setup: 40 gateways whose wave reports go out as their site's batches (made by the fleet's
    # process, or by the site's relay the agents ask); 2 fail to install
    spec = FleetSpec(count=40, classes={CLASS: 1.0}, prefix="st", faults={"download": 0.05},
                     site_reports=batched_by == "fleet", relay=batched_by == "relay")  # fmt: skip
    variant = (await pipeline.release(bus, with_word_tokenizer(tiny_onnx()), [CLASS]))[CLASS]
    async with contextlib.AsyncExitStack() as running:
        api = await running.enter_async_context(pipeline.rollout_service())
        fleet = await running.enter_async_context(pipeline.simulated_fleet(bus, spec))
        relay = await running.enter_async_context(_site_relay(bus, fleet.site))
        await pipeline.await_fleet(api, 40)

        # execute
        rollout = await _start(api, "1.0.0", policy={"percents": [50, 100], "soak_s": 0.2,
                                                     "success_threshold": 0.9})  # fmt: skip
        done = await _completed(bus, rollout)

        # assert: the waves counted every gateway's outcome from the batches; the registry's
        # lineage holds each gateway's state; no gateway sent a wave report of its own
        assert (done.gateways_updated, done.gateways_failed) == (38, 2)
        assert fleet.serving() == {variant.variant_id: 38, "-": 2}
        status = (await api.get(f"/v1/rollouts/{rollout}")).json()
        assert status["gateways"] == {"applied": 38, "failed": 2}

        async def lineage_complete() -> bool:
            found = (await pipeline.registry.get("/v1/models/tiny/1.0.0/lineage")).json()
            states = {g["state"] for g in found.get("gateways", {}).values()}
            return len(found.get("gateways", {})) == 40 and states == {"applied", "failed"}

        await until_answered(lineage_complete, "every gateway's state in the lineage")
        # counted in the stream (an ephemeral consumer made at the start could be reaped as
        # inactive before this line on a busy host: once seen, a 503 on its fetch)
        sent = await stream_count(bus, "SLMOPS_FLEET", "slmops.gateway.reports.v1.>")
        assert 2 <= sent < 80  # at least one per wave, far fewer than 2 reports each
        own = "slmops.gateway.report.v1.>"
        singles = await bus.js.stream_info("SLMOPS_FLEET", subjects_filter=own)
        kinds = {subject.split(".")[4] for subject in singles.state.subjects or {}}
        assert kinds == {"registered"}  # registrations are their own; wave reports batched
        assert relay.carried == (80 if batched_by == "relay" else 0)  # 40 acks, 40 outcomes
        assert fleet.sent_themselves == 0

        # a site's batch speaks only for gateways that declared that site, as they declared it
        victim = next(g for g in sorted(fleet.gateways) if _variant(fleet, g) is not None)
        await _forge_batches(bus, fleet, victim, rollout)
        late = GatewayReport(gateway_id="st-late", kind="registered", device_class=CLASS)
        await bus.publish(report_event(late))  # folded after the forged batches
        await pipeline.await_fleet(api, 41)
        status = (await api.get(f"/v1/rollouts/{rollout}")).json()
        assert status["gateways"] == {"applied": 38, "failed": 2}
        records = {g["gateway_id"]: g for g in (await api.get("/v1/gateways")).json()}
        assert records[victim]["labels"] == {"site": fleet.site}
        assert records[victim]["running_variant_id"] == variant.variant_id
        assert "st-stranger" not in records


async def _forge_batches(bus: Bus, fleet: SimulatedFleet, victim: str, rollout: str) -> None:
    """What a relay taken over might send: its own gateway relabelled and failed, another
    site's gateway failed, a gateway nobody registered applied."""
    generation = 1_000_000  # newer than anything the rollout sent

    def failed(gateway_id: str, labels: dict[str, str]) -> GatewayReport:
        return GatewayReport(gateway_id=gateway_id, kind="failed", device_class=CLASS,
                             labels=labels, rollout_id=rollout, generation=generation,
                             reason="forged")  # fmt: skip

    relabelled = failed(victim, {"site": fleet.site, "tier": "evil"})
    stranger = failed("st-stranger", {"site": fleet.site})
    own_site = GatewayReports(site=fleet.site, batch="forged-1",
                              reports=[relabelled, stranger])  # fmt: skip
    other_site = GatewayReports(site="elsewhere", batch="forged-2",
                                reports=[failed(victim, {"site": fleet.site})])  # fmt: skip
    for batch in (own_site, other_site):
        await bus.publish(new_event(batch, source=f"/slmops/site/{batch.site}"))
