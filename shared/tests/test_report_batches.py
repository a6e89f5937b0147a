"""A site's batch of gateway reports: what it may carry, its subject, and how consumers see it
(the events its gateways would have sent)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from slmops.events import GatewayReport, GatewayReports, ModelPublished, decode_message, new_event
from slmops.events.reports import each_report, report_event


def _report(gateway: str, kind: str = "applied", generation: int | None = 7) -> GatewayReport:
    return GatewayReport(gateway_id=gateway, kind=kind, device_class="cpu",  # type: ignore[arg-type]
                         rollout_id="ro-1", variant_id="v-1", generation=generation)  # fmt: skip


def test_a_batch_unfolds_into_the_events_its_gateways_would_have_sent() -> None:
    reports = [_report("gw-1", "acknowledged"), _report("gw-1"), _report("gw-2", "failed")]
    batch = new_event(GatewayReports(site="berlin-1", batch="b1", reports=reports),
                      source="/slmops/site/berlin-1")  # fmt: skip
    single = report_event(_report("gw-3"))

    found = each_report([single, batch])

    assert [e.data for e in found] == [single.data, *reports]
    # the ids are the ones each gateway's own report carries: sent both ways, folded once
    assert [e.id for e in found[1:]] == [report_event(r).id for r in reports]
    assert {e.time for e in found[1:]} == {batch.time}
    assert found[1].nats_subject == "slmops.gateway.report.v1.acknowledged.gw-1"


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
