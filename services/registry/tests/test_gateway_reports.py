"""Gateway reports folded into the lineage in batches: newest state per gateway, none lost."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest

from slmops.bus import Bus
from slmops.events import (
    CloudEvent,
    GatewayReport,
    GatewayReports,
    PartlyHandled,
    RolloutStarted,
    new_event,
)
from slmops.events.payloads import WavePlan
from slmops.testing.polling import until, until_answered
from slmops_registry.declared import Declaration, Declarations
from slmops_registry.projection import LineageStore
from slmops_registry.reports import ReportFolder
from slmops_registry.testing import RegistryUnderTest

pytestmark = pytest.mark.integration
NAME, VERSION = "smollm2-135m", "1.0.0"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


Kind = Literal["registered", "applied", "failed", "health"]


def payload(gateway: str, kind: Kind, rollout: str = "ro-1", site: str = "") -> GatewayReport:
    return GatewayReport(gateway_id=gateway, kind=kind, device_class="x86-vnni",
                         rollout_id=None if kind == "registered" else rollout,
                         variant_id=None if kind == "registered" else "v-x86",
                         labels={"site": site} if site else {},
                         reason="smoke test failed" if kind == "failed" else "")  # fmt: skip


def report(gateway: str, kind: Kind, seconds: int, rollout: str = "ro-1") -> CloudEvent[Any]:
    event = new_event(payload(gateway, kind, rollout), source=f"/slmops/gateway/{gateway}")
    return event.model_copy(update={"time": T0 + timedelta(seconds=seconds)})


async def nobody(_gateway_id: str) -> Declaration | None:
    return None


def folder_of(store: LineageStore) -> ReportFolder:
    return ReportFolder(store, Declarations(nobody))


def started(rollout: str) -> CloudEvent[RolloutStarted]:
    payload = RolloutStarted(model_name=NAME, version=VERSION, rollout_id=rollout,
                             release_id="rel-1", waves=[WavePlan(index=0, percent=100,
                                                                 target_count=3)])  # fmt: skip
    return new_event(payload, source="/slmops/rollout")


async def states(store: LineageStore) -> dict[str, tuple[str, datetime]]:
    return {s.gateway_id: (s.state, s.time) for s in await store.gateways(NAME, VERSION)}


async def test_a_batch_out_of_order_ends_as_the_newest_state_per_gateway(
    registry: RegistryUnderTest,
) -> None:
    store = await registry.context.lineage()
    assert store is not None
    await store.remember("rollout", "ro-1", NAME, VERSION)
    folder = folder_of(store)
    await folder.fold([report("gw-1", "applied", 5)])  # in the lineage from an earlier batch

    await folder.fold([
        report("gw-2", "applied", 9),  # gw-2 newest first, its older failure after it
        report("gw-3", "applied", 3),
        report("gw-2", "failed", 2),
        report("gw-1", "failed", 1),  # older than what the lineage holds: no change
        report("gw-2", "health", 10),  # not lineage
        report("gw-3", "failed", 4),
    ])  # fmt: skip

    assert await states(store) == {
        "gw-1": ("applied", T0 + timedelta(seconds=5)),
        "gw-2": ("applied", T0 + timedelta(seconds=9)),
        "gw-3": ("failed", T0 + timedelta(seconds=4)),
    }


async def test_reports_of_an_unknown_rollout_are_named_for_retry_after_the_known_ones_written(
    registry: RegistryUnderTest,
) -> None:
    store = await registry.context.lineage()
    assert store is not None
    await store.remember("rollout", "ro-1", NAME, VERSION)
    folder = folder_of(store)
    later = report("gw-9", "applied", 2, rollout="ro-later")
    declared = [new_event(payload(g, "registered", site="site-a"), source=f"/slmops/gateway/{g}")
                for g in ("gw-5", "gw-6")]  # fmt: skip
    site_batch = new_event(GatewayReports(site="site-a", batch="b1", reports=[
        payload("gw-5", "applied", site="site-a"),
        payload("gw-6", "applied", rollout="ro-later", site="site-a"),
    ]), source="/slmops/site/site-a")  # fmt: skip
    batch = [*declared, report("gw-1", "applied", 1), later, report("gw-2", "applied", 3),
             site_batch]  # fmt: skip

    with pytest.raises(PartlyHandled, match="unknown rollout") as refused:
        await folder.fold(batch)
    assert refused.value.event_ids == {later.id, site_batch.id}  # what carried them: again
    assert set(await states(store)) == {"gw-1", "gw-2", "gw-5"}

    await store.remember("rollout", "ro-later", NAME, VERSION)  # its rollout.started arrives
    await folder.fold([later, site_batch])  # the redelivery of those alone
    assert set(await states(store)) == {"gw-1", "gw-2", "gw-5", "gw-6", "gw-9"}


async def test_a_report_that_overtakes_its_rollout_is_retried_not_lost(
    registry: RegistryUnderTest, bus: Bus
) -> None:
    reports = registry.app.state.reports
    await until(lambda: reports.consumer is not None and reports.consumer.running,
                "the report consumer running")  # fmt: skip
    store = await registry.context.lineage()
    assert store is not None

    await bus.publish(report("gw-7", "applied", 1, rollout="ro-2"))
    await until(lambda: reports.consumer.stats.retried >= 1, "the report retried")
    await bus.publish(started("ro-2"))

    async def placed() -> bool:
        return "gw-7" in await states(store)

    await until_answered(placed, "the report in the lineage once its rollout is known")
    await until(lambda: reports.consumer.stats.handled == 1, "the report acked")
    assert reports.consumer.stats.dead_lettered == 0
    ready = (await registry.client.get("/readyz")).json()
    assert ready["checks"]["gateway_reports"]["ok"] is True


async def test_a_site_batch_places_only_reports_of_gateways_that_declared_the_site(
    registry: RegistryUnderTest,
) -> None:
    store = await registry.context.lineage()
    assert store is not None
    await store.remember("rollout", "ro-1", NAME, VERSION)
    looked_up: list[str] = []

    async def fleet_record(gateway_id: str) -> Declaration | None:  # registered earlier
        looked_up.append(gateway_id)
        return ("x86-vnni", {"site": "berlin"}) if gateway_id == "gw-old" else None

    folder = ReportFolder(store, Declarations(fleet_record))
    own = [new_event(payload(g, "registered", site=s), source=f"/slmops/gateway/{g}")
           for g, s in (("gw-b", "berlin"), ("gw-p", "paris"))]  # fmt: skip
    batch = GatewayReports(site="berlin", batch="b1", reports=[
        payload("gw-b", "applied", site="berlin"),  # its own site: placed
        payload("gw-old", "applied", site="berlin"),  # declared before this process: looked up
        payload("gw-p", "applied", site="berlin"),  # a paris gateway: a berlin relay lies
        payload("gw-x", "applied", site="berlin"),  # never heard of
    ])  # fmt: skip

    await folder.fold([*own, new_event(batch, source="/slmops/site/berlin")])

    assert set(await states(store)) == {"gw-b", "gw-old"}
    assert sorted(looked_up) == ["gw-old", "gw-x"]  # registered ones are not looked up
