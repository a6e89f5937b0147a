"""What the console shows of the field loop, from fixture answers of the APIs (``field.json``:
MiniLM's arm64 variant 410 ms p95 in the field against a 250 ms budget, its x86 one healthy; a
regression and a drift; a pending proposal and a failed one; the lineage's field nodes):
the fleet's field health page (and in words when the telemetry service is away), the version
page's field section, proposals with buttons for operators only, and the decisions' refusals."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi import HTTPException

from slmops.auth import Principal, Scope
from slmops.events.payloads import FieldFigures, GateResult
from slmops_console.pages import field as field_page
from slmops_console.pages import proposals as proposals_page
from slmops_console.pages.fleet import VariantNames
from slmops_console.rendering import TEMPLATES
from slmops_console.session import Session
from slmops_console.settings import ConsoleSettings
from slmops_console.upstream import Upstream, UpstreamError
from slmops_console.views import field as field_view
from slmops_console.views import lineage as lineage_view
from slmops_console.views import pareto
from slmops_console.views import proposals as proposals_view
from slmops_rollout.proposals import Proposal

HERE = Path(__file__).parent
FIELD = json.loads((HERE / "field.json").read_text())
MINILM = json.loads((HERE / "minilm-lineage.json").read_text())
ARM, X86 = "arm64-pi5", "x86-avx512-vnni"
V_ARM = "v-9be682af4020fba847eb697437614e7b"
OPERATOR = Session(Principal("user:op", frozenset({Scope.READ, Scope.OPERATE})), "t-op", "csrf-op")
VIEWER = Session(Principal("user:viewer", frozenset({Scope.READ})), "t-viewer", "csrf-viewer")


class FakeUpstream:
    """The APIs' answers by (service, path); an ``UpstreamError`` in the table is raised."""

    def __init__(self, answers: dict[tuple[str, str], Any]) -> None:
        self.answers = answers
        self.posted: list[tuple[str, str, Any]] = []

    async def get(self, service: str, path: str, session: Session, **params: Any) -> Any:
        if service == "registry" and path.startswith("/v1/variants/"):
            variant_id = path.rsplit("/", 1)[-1]
            return {"manifest": {"model_name": "minilm", "version": "1", "recipe": {
                "name": f"recipe-of-{variant_id[:6]}"}}}  # fmt: skip
        answer = self.answers[(service, path)]
        if isinstance(answer, UpstreamError):
            raise answer
        return answer

    async def post(self, service: str, path: str, session: Session, body: Any) -> Any:
        self.posted.append((service, path, body))
        answer = self.answers.get((service, path), {})
        if isinstance(answer, UpstreamError):
            raise answer
        return answer


def _text(page: str) -> str:
    """The words a reader sees (tags dropped, spaces collapsed)."""
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))


def _telemetry(**overrides: Any) -> FakeUpstream:
    version = "/v1/fleet/health/minilm/1.20261203.074130"
    answers = {("telemetry", "/v1/fleet/health"): [{k: v for k, v in row.items()
                                                     if k not in ("gates", "drift")}
                                                    for row in FIELD["health"]],
               ("telemetry", version): FIELD["health"],
               ("telemetry", "/v1/fleet/findings"): FIELD["findings"]}  # fmt: skip
    answers.update({("telemetry", path): answer for path, answer in overrides.items()})
    return FakeUpstream(answers)


def test_the_fixtures_are_what_the_apis_answer() -> None:
    for row in FIELD["health"]:
        FieldFigures.model_validate(row["figures"])
        [GateResult.model_validate(g) for g in row["gates"]]
    for proposal in FIELD["proposals"]:
        Proposal.model_validate(proposal)


async def test_field_health_puts_each_class_beside_its_budget_and_host_with_a_verdict() -> None:
    context = await field_page.field_health(_telemetry(), OPERATOR, VariantNames())

    assert context["problem"] == ""
    (version,) = context["versions"]
    arm, x86 = version.classes
    assert (arm.device_class, arm.breaches, x86.breaches) == (ARM, 1, 0)
    p95 = {f.name: f for f in arm.figures}["latency_p95_ms"]
    assert (p95.value, p95.budget, p95.host, p95.verdict) == (
        "410 ms", "≤ 250 ms", "not measured on the host", "breach")  # fmt: skip
    x86_p95 = {f.name: f for f in x86.figures}["latency_p95_ms"]
    assert (x86_p95.host, x86_p95.word) == ("44.6 ms", "✓ pass")
    assert {f.name: f.value for f in arm.figures}["error_rate"] == "0.4 %"
    # no host figure where the validator has no gate for it; no row an encoder cannot have
    assert {f.name: f.host for f in arm.figures}["peak_memory_mb"] == ""
    assert "ttft_p95_ms" not in {f.name for f in arm.figures}
    assert (arm.drift.verdict, x86.drift.verdict) == ("drifted", "steady")
    assert [labels for labels, _ in arm.by_labels] == ["site=berlin", "site=paris"]
    page = _text(TEMPLATES.get_template("field.html").render(
        session=OPERATOR, nav="fleet", model="", **context))  # fmt: skip
    assert "✗ 1 breach" in page
    assert "✓ within budget" in page
    assert "✗ drifted — embedding shift 0.420 vs threshold 0.250" in page
    assert "✗ regression on arm64-pi5 (whole class), 2026-12-03 09:00:30 UTC" in page
    assert "latency_p95_ms 410 ms in the field > 250 ms budget" in page
    assert "≈ drift on arm64-pi5 (site=berlin)" in page
    assert "09:00:30 +30 s: 90 gateways, 5400 requests, 415" in page


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (UpstreamError("telemetry", 503, "telemetry is unreachable (ConnectError)"),
         "The telemetry service did not answer (telemetry is unreachable (ConnectError))"),
        (UpstreamError("telemetry", 503, "the fleet view is being restored: see GET /readyz"),
         "did not answer (the fleet view is being restored"),
        (UpstreamError("telemetry", 403, "no read scope"), "did not answer (no read scope)"),
    ],
)  # fmt: skip
async def test_a_telemetry_service_away_is_said_in_words(error: UpstreamError, words: str) -> None:
    upstream = _telemetry(**{"/v1/fleet/health": error})

    context = await field_page.field_health(upstream, OPERATOR, VariantNames())

    assert context["versions"] == []
    page = _text(TEMPLATES.get_template("field.html").render(
        session=OPERATOR, nav="fleet", model="", **context))  # fmt: skip
    assert words in page
    assert "field-figures" not in page


async def test_an_unconfigured_telemetry_url_is_said_and_a_signed_out_one_signs_in() -> None:
    upstream: Any = Upstream(ConsoleSettings(telemetry_url=""))
    try:
        assert not upstream.configured("telemetry")
        assert upstream.configured("rollout")
        context = await field_page.field_health(upstream, OPERATOR, VariantNames())
    finally:
        await upstream.close()
    assert "not configured to reach the telemetry service" in context["problem"]
    signed_out = _telemetry(**{"/v1/fleet/health": UpstreamError("telemetry", 401, "expired")})
    with pytest.raises(UpstreamError):
        await field_page.field_health(signed_out, OPERATOR, VariantNames())


async def test_a_version_without_budgets_shows_its_bare_figures_and_why() -> None:
    missing = UpstreamError("telemetry", 404, "no health report of minilm in the last 20 windows")
    upstream = _telemetry(**{"/v1/fleet/health/minilm/1.20261203.074130": missing})

    (version,) = (await field_page.field_health(upstream, OPERATOR, VariantNames()))["versions"]

    assert "not judged against the budgets" in version.problem
    assert [c.breaches for c in version.classes] == [0, 0]
    assert {f.verdict for c in version.classes for f in c.figures} == {""}
    assert [c.drift.word for c in version.classes] == ["? unknown"] * 2


def test_evidence_reads_as_a_sentence() -> None:
    evidence = {**FIELD["proposals"][0]["evidence"], "host_value": 80.0}
    assert field_view.evidence_text(evidence) == (
        "arm64-pi5 latency_p95_ms 410 ms in the field > 250 ms budget; host measured 80.0 ms"
    )


def _proposal_page(session: Session, proposals: list[dict[str, Any]]) -> str:
    shown = [proposals_view.shown(p) for p in proposals]
    return TEMPLATES.get_template("proposals.html").render(
        session=session, nav="proposals", proposals=shown, status="",
        statuses=proposals_page.STATUSES, error="")  # fmt: skip


def test_an_operator_sees_approve_and_reject_a_viewer_sees_none() -> None:
    pending, failed = FIELD["proposals"]

    as_operator = _proposal_page(OPERATOR, [pending, failed])
    as_viewer = _proposal_page(VIEWER, [pending, failed])

    assert as_operator.count('data-action="approve-proposal"') == 1  # the failed one has none
    assert re.search(r'name="reason" required', as_operator)  # a rejection asks why
    assert 'value="csrf-op"' in as_operator
    assert "data-action=" not in as_viewer
    assert "deciding on proposals needs an operator's token" in _text(as_viewer)
    words = _text(as_operator)
    assert "◔ pending: waits for an operator" in words
    assert "✗ failed: no candidate met the field budget" in words
    assert "Why not (arm64-pi5) no candidate meets latency_p95_ms <= 250 ms" in words
    assert "Proposed nothing: no candidate met the field budget" in words


def test_an_approved_proposal_links_to_its_rollout() -> None:
    approved = {**FIELD["proposals"][0], "status": "approved", "decided_by": "user:op",
                "decided_at": "2026-12-03T09:20:00Z", "rollout_id": "ro-field-1"}  # fmt: skip

    page = _proposal_page(OPERATOR, [approved])

    assert '<a class="rollout-link" href="/rollouts/ro-field-1">' in page
    assert "approve-proposal" not in page
    assert "approved by user:op at 2026-12-03 09:20:00 UTC" in _text(page)


def test_the_version_page_shows_recorded_field_figures_findings_and_proposals() -> None:
    lineage = {**MINILM, **FIELD["lineage"]}
    section = field_view.of_lineage(lineage)

    arm, x86 = section.recorded
    assert (arm.device_class, arm.recipe, arm.breaches) == (ARM, "int8-dynamic-per-channel", 1)
    # the host figures come from the variant's own validation report
    host = {f.name: f.host for f in x86.figures}
    assert host["latency_p95_ms"] == "44.6 ms"
    assert {f.name: f.host for f in arm.figures}["latency_p95_ms"] == "not measured on the host"
    assert [f.kind for f in section.findings] == ["regression"]
    only = field_view.lineage_only(lineage, FIELD["proposals"])
    assert len(only) == 1
    assert only[0].startswith("rel-field-other (failed)")
    page = _text(TEMPLATES.get_template("version.html").render(
        session=VIEWER, nav="models", lineage=lineage, picture=lineage_view.build(lineage),
        charts=pareto.charts(lineage), trace_id=None, field=section, error="",
        proposals=[proposals_view.shown(p) for p in FIELD["proposals"]], unrecorded=only,
        proposals_problem="", here="/models/minilm/1",
    ))  # fmt: skip
    assert "In the field" in page
    # beside the charts: the field's p95 of each measured variant, next to the host's
    assert "Field p95" in page
    assert "410 ms ✗ breach" in page
    assert "38.2 ms ✓ pass" in page
    assert "✗ 1 breach" in page
    assert "410 ms in the field > 250 ms budget; not measured on the host" in page
    assert "Approve" not in page


async def test_decisions_are_refused_to_viewers_need_a_reason_to_reject_and_say_why_not() -> None:
    conflict = UpstreamError("rollout", 409, "no registered gateway of class arm64-pi5 runs it")
    upstream: Any = FakeUpstream({("rollout", "/v1/proposals/rel-2/approve"): conflict})

    with pytest.raises(HTTPException) as refused:
        await proposals_page.decide("rel-2", "approve", VIEWER, upstream, {})
    decide = proposals_page.decide
    unreasoned = await decide("rel-2", "reject", OPERATOR, upstream,
                              {"back": "/models/minilm/1", "reason": " "})  # fmt: skip
    not_rollable = await decide("rel-2", "approve", OPERATOR, upstream,
                                {"back": "https://evil.example/x"})  # fmt: skip
    rejected = await decide("rel-2", "reject", OPERATOR, upstream,
                            {"back": "/proposals", "reason": "too risky"})  # fmt: skip

    assert refused.value.status_code == 403
    assert unreasoned.headers["location"] == "/models/minilm/1?error=a+rejection+needs+a+reason"
    assert not_rollable.headers["location"].startswith("/proposals?error=no+registered+gateway")
    assert rejected.headers["location"] == "/proposals"
    assert upstream.posted == [
        ("rollout", "/v1/proposals/rel-2/approve", {"reason": "approved from the console"}),
        ("rollout", "/v1/proposals/rel-2/reject", {"reason": "too risky"}),
    ]


async def test_the_navigation_counts_pending_proposals_and_stays_quiet_when_it_cannot() -> None:
    pending = [p for p in FIELD["proposals"] if p["status"] == "pending"]
    answering: Any = FakeUpstream({("rollout", "/v1/proposals"): pending})
    away: Any = FakeUpstream({("rollout", "/v1/proposals"): UpstreamError("rollout", 503, "x")})

    assert await proposals_page.pending_count(VIEWER, answering) == "(1 pending)"
    assert await proposals_page.pending_count(VIEWER, away) == ""


def test_a_release_proposed_from_the_field_is_named_so_in_the_lineage_picture() -> None:
    evidence = FIELD["proposals"][0]["evidence"]
    proposed = {"release_id": "rel-field-arm-2", "proposal": evidence,
                "entries": [{"device_class": ARM, "variant_id": "v-new"}]}  # fmt: skip
    lineage = {**MINILM, "releases": [*MINILM["releases"], proposed]}

    (node,) = [n for n in lineage_view.build(lineage).nodes if n.key == "rel:rel-field-arm-2"]

    assert (node.title, node.detail) == ("proposed from the field", f"{ARM}: latency_p95_ms")
