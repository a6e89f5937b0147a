"""A site's batch of gateway reports: what it may carry, its subject, and how consumers see it
(an event per report, or the reports alone)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from slmops.events import (
    EventDecodeError,
    GatewayReport,
    GatewayReports,
    ModelPublished,
    decode_message,
    new_event,
)
from slmops.events.registry import decoder_for
from slmops.events.reports import Carried, each_report, may_carry, report_event, reports_in


def _report(gateway: str, kind: str = "applied", generation: int | None = 7) -> GatewayReport:
    return GatewayReport(gateway_id=gateway, kind=kind, device_class="cpu",  # type: ignore[arg-type]
                         rollout_id="ro-1", variant_id="v-1", generation=generation)  # fmt: skip


def test_a_batch_unfolds_into_its_reports_stamped_by_the_batch() -> None:
    reports = [_report("gw-1", "acknowledged"), _report("gw-1"), _report("gw-2", "failed")]
    batch = new_event(GatewayReports(site="berlin-1", batch="b1", reports=reports),
                      source="/slmops/site/berlin-1")  # fmt: skip
    single = report_event(_report("gw-3"))

    found = each_report([single, batch])

    assert [s.report for s in found] == [single.data, *reports]
    assert found[0].event_id == single.id
    assert [s.event_id for s in found[1:]] == [f"{batch.id}/{i}" for i in range(3)]
    assert {s.time for s in found[1:]} == {batch.time}
    assert [s.site for s in found] == [None, "berlin-1", "berlin-1", "berlin-1"]
    assert reports_in([single, batch]) == [
        Carried(single.data, None),
        *(Carried(r, "berlin-1") for r in reports),
    ]


def test_a_site_carries_only_reports_of_gateways_that_declared_it() -> None:
    report = _report("gw-1").model_copy(update={"labels": {"site": "berlin-1", "tier": "a"}})
    declared = ("cpu", {"site": "berlin-1", "tier": "a"})

    assert may_carry("berlin-1", report, declared)
    assert not may_carry("paris-1", report, declared)  # another site's gateway
    assert not may_carry("berlin-1", report, None)  # never heard from itself
    assert not may_carry("berlin-1", report, ("cpu", {"site": "paris-1", "tier": "a"}))
    relabelled = report.model_copy(update={"labels": {"site": "berlin-1", "tier": "b"}})
    assert not may_carry("berlin-1", relabelled, declared)  # labels it did not declare
    reclassed = report.model_copy(update={"device_class": "gpu"})
    assert not may_carry("berlin-1", reclassed, declared)


def test_other_events_are_left_out() -> None:
    published = new_event(ModelPublished.model_construct(), source="/x")
    assert each_report([published]) == []


def test_each_batch_has_its_own_subject() -> None:
    event = new_event(GatewayReports(site="berlin-1", batch="b2", reports=[_report("gw-1")]),
                      source="/slmops/site/berlin-1")  # fmt: skip

    decoded = decode_message("slmops.gateway.reports.v1.berlin-1.b2", event.to_json())

    assert decoded.data == event.data
    assert event.nats_subject == "slmops.gateway.reports.v1.berlin-1.b2"


@pytest.mark.parametrize("kind", ["registered", "health"])
def test_a_batch_carries_wave_reports_only(kind: str) -> None:
    with pytest.raises(ValidationError, match=f"not {kind}"):
        GatewayReports(site="s", batch="b", reports=[_report("gw-1", kind, None)])


def test_an_empty_or_oversized_batch_is_refused() -> None:
    with pytest.raises(ValidationError, match="at least 1"):
        GatewayReports(site="s", batch="b", reports=[])
    with pytest.raises(ValidationError, match="at most 2000"):
        GatewayReports(site="s", batch="b", reports=[_report(f"gw-{i}") for i in range(2001)])


def test_the_decoder_picks_each_types_own_model_and_refuses_precisely() -> None:
    decode = decoder_for(GatewayReport, GatewayReports)
    batch = new_event(GatewayReports(site="s", batch="b", reports=[_report("gw-1")]),
                      source="/slmops/site/s")  # fmt: skip
    single = report_event(_report("gw-2"))

    assert decode(batch.to_json()).data == batch.data
    assert decode(single.to_json()).data == single.data
    broken = batch.to_json().replace(b'"kind":"applied"', b'"kind":"installed"')
    with pytest.raises(EventDecodeError, match="kind"):
        decode(broken)
