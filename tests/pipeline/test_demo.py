"""End to end, as `make run` does it, on real parts: the local stack as processes (nats-server
with JetStream, the nanio S3 server, Ray Serve in the optimizer, ONNX Runtime in the
validator), `slmops demo --feedback` publishing the real all-MiniLM-L6-v2, rolling it out to a
simulated fleet and closing the field loop on it (one class slower in the field, the other
served shifted inputs), then the registry's lineage, the spans the processes exported and the
metrics every service serves.

One run of the demo is shared by the tests below (it takes minutes); each asserts one part.
The fleet is smaller than `make run`'s 500 gateways and runs in two processes, as `bench.e2e`
runs it (`make run` runs its fleet in the demo's process: the rest of the suite covers that)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from slmops.auth import BearerTokenFile, local_credentials, scopes_of_role
from slmops.events import field_release_id
from slmops.profiles import load_profile
from slmops.testing.localstack import local_stack
from slmops.traceview import SpanRecord, read_spans
from slmops_validator.checks.host import host_stands_for, same_architecture
from slmops_validator.settings import ValidatorSettings

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1500)]  # the shared run

GATEWAYS = 40
CLASSES = {"x86-avx512-vnni": 0.5, "arm64-pi5": 0.5}
SLOW, SHIFTED = "arm64-pi5", "x86-avx512-vnni"  # in the field: 12x slower; inputs 1.5 SD away
WINDOW_S = 6  # the telemetry service's window here (30 s by default): findings come sooner
SLMOPS = [sys.executable, "-m", "slmops.cli.main"]
SERVICES = ("registry", "optimizer", "validator", "rollout", "gateway", "telemetry")
PUBLISHED = "slmops.model.published.v1"
T = TypeVar("T")


def eventually(check: Callable[[], T], *, timeout_s: float, what: str) -> T:
    """``check()`` again every half second until it passes (its result then); past
    ``timeout_s`` its last failure, saying what was awaited."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check()
        except AssertionError as exc:
            if time.monotonic() >= deadline:
                raise AssertionError(f"{what}: not so after {timeout_s:g} s: {exc}") from exc
        time.sleep(0.5)


def settled_spans(
    trace_dir: Path, trace_id: str, *, quiet_s: float = 5.0, timeout_s: float = 120.0
) -> list[SpanRecord]:
    """The trace's spans once no new one was written for ``quiet_s`` (the processes export
    in batches, about every second)."""
    deadline = time.monotonic() + timeout_s
    spans = read_spans(trace_dir, trace_id)
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < quiet_s:
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"the spans of trace {trace_id} kept coming for {timeout_s:g} s ({len(spans)})"
            )
        time.sleep(0.5)
        now = read_spans(trace_dir, trace_id)
        if len(now) != len(spans):
            spans, quiet_since = now, time.monotonic()
    return spans


def latency_on_this_host(device_class: str) -> tuple[bool, bool]:
    """Whether the stack's validator measures ``device_class``'s latency on this host (for
    information at least), and whether it judges it (the host stands for the class)."""
    profiles_dir = Path(ValidatorSettings.model_fields["profiles_dir"].default)
    profile = load_profile(profiles_dir / f"{device_class}.yaml")
    measured = profile.latency_measurable_on_host and same_architecture(profile)
    return measured, host_stands_for(profile) == ""


def scrape(url: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{url}/metrics", headers=headers, timeout=30)


def samples(answer: httpx.Response) -> list[Sample]:
    assert answer.status_code == 200, answer.text
    return [s for f in text_string_to_metric_families(answer.text) for s in f.samples]


def total(found: list[Sample], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples carrying ``labels`` (0 when none)."""
    return sum(s.value for s in found if s.name == name and labels.items() <= s.labels.items())


def metrics_token(env: dict[str, str]) -> str:
    """The local stack's scraper token (scope ``metrics`` only), minted by `slmops up`."""
    return local_credentials(Path(env["SLMOPS_VAR_DIR"])).token("metrics")


@dataclass
class DemoRun:
    env: dict[str, str]
    output: str
    exit_code: int
    report: dict[str, Any]
    urls: dict[str, str]
    registry_metrics_before: list[Sample]  # scraped once the stack ran, before the demo

    @property
    def auth(self) -> httpx.Auth:
        """The local stack's admin credentials, as the CLI uses them."""
        return BearerTokenFile(
            local_credentials(Path(self.env["SLMOPS_VAR_DIR"])).token_file("admin")
        )

    @property
    def model(self) -> dict[str, Any]:
        (model,) = self.report["models"]
        return dict(model)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    # setup: a stack of its own (ports, state), started as `make run` would
    tmp = tmp_path_factory.mktemp("demo")
    with local_stack(tmp / "var", SLMOPS_TELEMETRY_WINDOW_S=str(WINDOW_S)) as stack:
        before = samples(scrape(stack.urls["registry"], metrics_token(stack.env)))
        # execute: the demo on the running stack (it leaves a stack it did not start up)
        report_file = tmp / "report.json"
        classes = ",".join(f"{c}={s}" for c, s in CLASSES.items())
        run = subprocess.run(
            [*SLMOPS, "demo", "--models", "minilm", "--gateways", str(GATEWAYS),
             "--fleet-processes", "2", "--classes", classes, "--soak-s", "1", "--no-wait",
             "--json-report", str(report_file),
             "--timeout-s", "900", "--feedback", "--field-slowdown", f"{SLOW}=12",
             "--input-shift", f"{SHIFTED}=1.5"],
            env=stack.env, capture_output=True, text=True, timeout=1200, check=False,
        )  # fmt: skip
        report = json.loads(report_file.read_text()) if report_file.exists() else {}
        yield DemoRun(stack.env, run.stdout + run.stderr, run.returncode, report, stack.urls,
                      before)  # fmt: skip


def test_the_demo_reaches_its_final_report(demo: DemoRun) -> None:
    assert demo.exit_code == 0, demo.output[-3000:]
    model = demo.model
    # each class got a variant smaller than fp32 and close to it in quality
    assert {row["device_class"] for row in model["classes"]} == set(CLASSES)
    for row in model["classes"]:
        assert row["variant_id"], row
        assert row["size_mb"] < row["fp32_size_mb"], row
        assert row["quality"]["parity.cosine_mean"] > 0.95, row
        # latency is measured only where the host has the class's architecture, and judged
        # only where it also has the class's ISA features (x86-avx512-vnni on an AVX-512 VNNI
        # host); otherwise not faked: the class's canary wave decides
        measured, judged = latency_on_this_host(row["device_class"])
        if measured:
            assert row["p50_ms"] > 0, row
        else:
            assert row["p50_ms"] is None, row
        if judged:
            assert row["latency_note"] == "", row
        else:
            assert "not measurable on this host" in row["latency_note"], row
    # the whole fleet (every gateway runs the embedding app here) was updated
    rollout = model["rollout"]
    assert rollout["outcome"] == "completed", rollout
    assert rollout["targets"] == rollout["acknowledged"] == rollout["applied"] == GATEWAYS
    assert rollout["failed"] == 0
    # the report as the user sees it: per class, the rollout line and the trace to look at
    assert f"rollout {rollout['rollout_id']}: completed - {GATEWAYS} applied" in demo.output
    assert f"slmops trace show {model['trace_id']}" in demo.output
    # and the console to look at it in a browser, with where the admin token is
    token_file = local_credentials(Path(demo.env["SLMOPS_VAR_DIR"])).token_file("admin")
    console = f"the console: {demo.urls['console']}/models (sign in with the admin token in "
    assert f"{console}{token_file})" in demo.output
    assert httpx.get(f"{demo.urls['console']}/login").status_code == 200


def test_lineage_shows_which_gateways_run_which_variant(demo: DemoRun) -> None:
    model = demo.model
    chosen = {row["device_class"]: row["variant_id"] for row in model["classes"]}

    def lineage_complete() -> None:
        # the registry projects the gateways' reports into the lineage as they come: read
        # until it holds every gateway of the run
        lineage = httpx.get(f"{demo.urls['registry']}/v1/models/{model['model_name']}/"
                            f"{model['version']}/lineage", auth=demo.auth).json()  # fmt: skip
        fleet = httpx.get(f"{demo.urls['rollout']}/v1/gateways",
                          params={"selector": [f"run={demo.report['run']}"]},
                          auth=demo.auth).json()  # fmt: skip
        classes = {g["gateway_id"]: g["device_class"] for g in fleet}

        # every gateway of the run runs its own class's variant, as the registry records it
        assert len(classes) == GATEWAYS
        assert {gid: g["variant_id"] for gid, g in lineage["gateways"].items()} == {
            gid: chosen[cls] for gid, cls in classes.items()
        }
        assert {g["state"] for g in lineage["gateways"].values()} == {"applied"}
        assert Counter(classes.values()) == {c: GATEWAYS * s for c, s in CLASSES.items()}
        assert [r["state"] for r in lineage["rollouts"]] == ["completed"]

    eventually(lineage_complete, timeout_s=60, what="the lineage shows the whole run")


def test_one_trace_spans_the_journey_from_publish_to_the_last_acknowledgement(
    demo: DemoRun,
) -> None:
    trace_id = demo.model["trace_id"]
    # the processes may still be writing the journey's last spans: read them once they stop
    spans = settled_spans(Path(demo.env["SLMOPS_VAR_DIR"]) / "traces", trace_id)
    names = Counter((s.service, s.name) for s in spans)

    # every service took part in the one trace, from the publish request on
    assert {s.service for s in spans} >= {"registry", "optimizer", "validator", "rollout",
                                          "fleetsim"}  # fmt: skip
    assert names[("registry", "POST /v1/models")] == 1
    assert names[("optimizer", "process model.published.v1")] == 1
    assert names[("validator", "publish release.created.v1")] == 1
    assert names[("rollout", "process release.created.v1")] == 1
    # every wave, every assignment and every gateway's acknowledgement are in it
    assert names[("rollout", "publish rollout.wave.started.v1")] == len(
        demo.model["rollout"]["waves"]
    )
    # a wave reaches whole cohorts: a notification per cohort, acted on by its gateways
    assert names[("rollout", "publish cohort.v1")] >= len(demo.model["rollout"]["waves"])
    # (a cohort is notified again when a later write adds another class's entry)
    assert names[("fleetsim", "process cohort.v1")] >= 1
    assert names[("fleetsim", "publish gateway.report.v1")] == 2 * GATEWAYS  # ack + applied
    # each publish names where it went (the benchmark tells reports apart by it)
    kinds = Counter(s.subject.split(".")[4] for s in spans
                    if s.name == "publish gateway.report.v1")  # fmt: skip
    assert kinds == {"acknowledged": GATEWAYS, "applied": GATEWAYS}
    assert names[("rollout", "publish rollout.completed.v1")] == 1

    # and `slmops trace show` draws it
    shown = subprocess.run([*SLMOPS, "trace", "show", trace_id], env=demo.env,
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert f"trace {trace_id} · {len(spans)} spans" in shown.stdout
    assert "process cohort.v1" in shown.stdout


def test_every_service_serves_metrics_of_the_journey_to_a_scraper_only(demo: DemoRun) -> None:
    viewer = (
        local_credentials(Path(demo.env["SLMOPS_VAR_DIR"]))
        .issuer()
        .mint("user:viewer", scopes_of_role("viewer"), ttl_s=60)
    )
    token = metrics_token(demo.env)
    found: dict[str, list[Sample]] = {}
    for service in SERVICES:
        url = demo.urls[service]
        assert scrape(url, None).status_code == 401, service
        assert scrape(url, viewer).status_code == 403, service
        answer = scrape(url, token)
        assert answer.headers["content-type"].startswith("text/plain; version=0.0.4"), service
        found[service] = samples(answer)
        names = {s.name for s in found[service]}
        assert {"slmops_service_info", "slmops_http_requests_total"} <= names, service

    # The registry handled the demo's publish: its counter went up from what it was before.
    handled = {"type": PUBLISHED, "consumer": "registry-pipeline", "outcome": "handled"}
    before = total(demo.registry_metrics_before, "slmops_events_total", **handled)
    assert total(found["registry"], "slmops_events_total", **handled) >= before + 1
    assert total(found["optimizer"], "slmops_events_total", type=PUBLISHED, outcome="handled")
    assert total(found["optimizer"], "slmops_event_handler_duration_seconds_count",
                 type=PUBLISHED) >= 1  # fmt: skip
    assert "slmops_consumer_pending_messages" in {s.name for s in found["validator"]}
    # Each class's job ended, was judged and shipped; the run's gateways run the version.
    model = demo.model
    assert total(found["optimizer"], "slmops_optimizer_jobs", state="succeeded") >= len(CLASSES)
    assert total(found["validator"], "slmops_validations", verdict="passed") >= len(CLASSES)
    assert total(found["rollout"], "slmops_rollouts", state="completed") == 1
    assert total(found["rollout"], "slmops_gateways", model=model["model_name"],
                 version=model["version"]) == GATEWAYS  # fmt: skip
    applied = total(found["rollout"], "slmops_gateway_reports_received_total", kind="applied")
    assert applied >= GATEWAYS
    assert not any("gateway_id" in s.labels or "variant_id" in s.labels
                   for rows in found.values() for s in rows)  # fmt: skip


def test_the_field_loop_finds_the_slow_class_and_judges_candidates_against_it(
    demo: DemoRun,
) -> None:
    model = demo.model
    name, version = model["model_name"], model["version"]
    loop = demo.report["feedback"][name]
    budget = load_profile(Path(ValidatorSettings.model_fields["profiles_dir"].default)
                          / f"{SLOW}.yaml").budgets.max_latency_p95_ms  # fmt: skip

    # the slow class broke its p95 budget in the field for the configured two windows; the
    # healthy class broke nothing over the same span (no false positive)
    (finding,) = loop["regressions"]
    assert (finding["device_class"], finding["metric"]) == (SLOW, "latency_p95_ms")
    assert finding["budget"] == budget
    assert finding["field_value"] > budget
    assert finding["host_value"] is None  # an ARM class: nothing to measure on this host
    assert len(finding["windows"]) >= 2
    assert all(w["value"] > budget and w["window_s"] == WINDOW_S for w in finding["windows"])
    # the shifted class's inputs drifted (from aggregates only); the other's did not
    assert [(d["device_class"], d["signal"]) for d in loop["drifts"]] == [(SHIFTED, "embedding")]
    assert loop["drifts"][0]["score"] > loop["drifts"][0]["threshold"]

    # the optimizer planned candidates for that class only, for a release of its own
    (plan,) = loop["plans"].values()
    release_id = field_release_id(name, version, finding["detection_id"])
    assert plan["release_id"] == release_id
    assert plan["field"]["detection_id"] == finding["detection_id"]
    assert {j["device_class"] for j in plan["jobs"]} <= {SLOW}
    # every candidate judged against the field: predicted = field value x its host ratio
    for variant_id, candidate in loop["candidates"].items():
        gate = candidate["field_gate"]
        assert gate["name"] == "field.latency_p95_ms", variant_id
        assert f"field {finding['field_value']:.4g} ms x host ratio" in gate["detail"]
        assert gate["passed"] == (gate["value"] <= budget)
        assert candidate["verdict"] == "failed" or gate["passed"]
    # the decision: a proposal if a candidate meets the budget, else the reasons, nothing rolled
    proposal = loop["proposals"][release_id]
    passed = [v for v, c in loop["candidates"].items() if c["verdict"] == "passed"]
    if passed:
        assert proposal["outcome"] == "proposed"
        assert loop["rollouts"][release_id]["outcome"] == "completed"
    else:  # with the shipped profiles the chosen variant is already this class's fastest
        assert proposal["outcome"] == "failed"
        assert "field.latency_p95_ms" in proposal["entries"][0]["reason"] or not plan["jobs"]
        assert loop["rollouts"] == {}
        assert "nothing rolls out" in demo.output
    assert "regression detected" in demo.output

    # the lineage keeps the findings and the decision; telemetry's view judges the classes
    lineage = httpx.get(f"{demo.urls['registry']}/v1/models/{name}/{version}/lineage",
                        params={"gateways": "false"}, auth=demo.auth).json()  # fmt: skip
    assert {f["detection_id"] for f in lineage["findings"]} == {
        finding["detection_id"], loop["drifts"][0]["detection_id"]}  # fmt: skip
    assert [p["release_id"] for p in lineage["proposals"]] == [release_id]
    rows = httpx.get(f"{demo.urls['telemetry']}/v1/fleet/health/{name}/{version}",
                     auth=demo.auth).json()  # fmt: skip
    verdicts = {(r["variant_id"], g["name"]): g["passed"] for r in rows for g in r["gates"]}
    chosen = {row["device_class"]: row["variant_id"] for row in model["classes"]}
    assert verdicts[(chosen[SLOW], "field.latency_p95_ms")] is False
    # the shifted class is within its budgets (a gate not judged in the field is None)
    assert [gate for (variant, gate), ok in verdicts.items()
            if variant == chosen[SHIFTED] and ok is False] == []  # fmt: skip
