"""The Grafana dashboard and the Prometheus scrape config in deploy/ stay in step with the
metric families the services export.

Every metric name a panel's query reads must be one some service registers (built as the
services build their apps, without a lifespan: families are registered at assembly); every
function a query calls must be a PromQL one; and the dashboard must read each family the
metrics issue asked for. The scrape config scrapes each service's port with a bearer token
from a file.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import FastAPI

from slmops.auth import ensure_local_credentials
from slmops.service.metrics import ServiceMetrics
from slmops.settings import PlatformSettings, ServiceSettings

DEPLOY = Path(__file__).parents[2] / "deploy"
DASHBOARD: dict[str, Any] = json.loads((DEPLOY / "grafana" / "slmops-dashboard.json").read_text())
SCRAPE: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
SERVICES = ("registry", "optimizer", "validator", "rollout", "gateway", "telemetry")
PROMQL_FUNCTIONS = {"sum", "max", "min", "avg", "count", "rate", "irate", "increase",
                    "histogram_quantile", "topk", "clamp_min", "label_replace"}  # fmt: skip
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                   "unless", "offset", "bool"}  # fmt: skip
#: What the dashboard must show (issue 16): each family read by at least one panel.
REQUIRED = {
    "slmops_events_total",  # events/s by type, failures by outcome
    "slmops_event_handler_duration_seconds_bucket",  # handler p95
    "slmops_consumer_pending_messages",  # consumer lag
    "slmops_optimizer_jobs",
    "slmops_optimizer_job_duration_seconds_bucket",
    "slmops_validations",
    "slmops_rollouts",
    "slmops_gateways",
    "slmops_gateway_reports_received_total",
    "slmops_telemetry_reports_folded_total",  # field telemetry (issue 17)
    "slmops_telemetry_findings_total",
}


def build_app(service: str, settings_class: type[ServiceSettings], var_dir: Path) -> FastAPI:
    """The service's app as its ``main`` builds it (the optimizer without a Ray cluster)."""
    extra = {"ray_mode": "local-testing"} if service == "optimizer" else {}
    settings = settings_class(platform=PlatformSettings(var_dir=var_dir), **extra)
    app: FastAPI = importlib.import_module(f"slmops_{service}.app").create_app(settings)
    return app


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory, service_settings: dict[str, type[ServiceSettings]]
) -> dict[str, set[str]]:
    """Service -> every sample name its /metrics can carry."""
    var_dir = tmp_path_factory.mktemp("metrics-var")
    ensure_local_credentials(var_dir)  # the services' token files; no key is made up
    names = {}
    for service in SERVICES:
        metrics: ServiceMetrics = build_app(
            service, service_settings[service], var_dir
        ).state.metrics
        names[service] = metrics.sample_names()
    return names


def queries() -> list[str]:
    return [t["expr"] for panel in DASHBOARD["panels"] for t in panel.get("targets", [])]


def names_in(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, functions) a PromQL expression uses: label matchers, groupings, ranges
    and strings are cut out first, so only selectors and calls remain."""
    bare = re.sub(r'"[^"]*"', "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", bare)
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", bare)
    functions, metrics = set(), set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*(\s*\()?", bare):
        name, call = match.group(0).rstrip("( "), match.group(1)
        if call:
            functions.add(name)
        elif name not in PROMQL_KEYWORDS:
            metrics.add(name)
    return metrics, functions


def test_every_panel_queries_only_exported_metrics(exported: dict[str, set[str]]) -> None:
    everything = set().union(*exported.values())
    used: set[str] = set()
    unknown, foreign_functions = [], []
    for expr in queries():
        metrics, functions = names_in(expr)
        used |= metrics
        unknown += [f"{name} in {expr}" for name in sorted(metrics - everything)]
        foreign_functions += sorted(functions - PROMQL_FUNCTIONS)

    assert queries(), "the dashboard has no queries"
    assert unknown == []
    assert foreign_functions == []
    assert REQUIRED - used == set(), "families the dashboard must show"


def test_every_service_exports_the_generic_families(exported: dict[str, set[str]]) -> None:
    generic = {"slmops_events_total", "slmops_event_handler_duration_seconds_bucket",
               "slmops_consumer_pending_messages", "slmops_http_requests_total"}  # fmt: skip
    assert {s: generic - names for s, names in exported.items()} == {s: set() for s in SERVICES}
    assert "slmops_optimizer_jobs" in exported["optimizer"]
    assert "slmops_validations" in exported["validator"]
    assert {"slmops_rollouts", "slmops_gateways", "slmops_gateway_reports_received_total"} <= (
        exported["rollout"]
    )
    assert "slmops_gateway_generated_tokens_total" in exported["gateway"]
    assert {"slmops_telemetry_reports_folded_total", "slmops_telemetry_fold_seconds_bucket",
            "slmops_telemetry_findings_total", "slmops_telemetry_view_keys"} <= (
        exported["telemetry"]
    )  # fmt: skip


def test_the_parser_sees_through_labels_and_groupings() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, type) '
            '(rate(slmops_x_bucket{outcome=~"a|b", le!="1"}[5m])))')  # fmt: skip
    assert names_in(expr) == ({"slmops_x_bucket"}, {"histogram_quantile", "sum", "rate"})


def test_prometheus_scrapes_each_service_with_a_bearer_token_file(
    service_settings: dict[str, type[ServiceSettings]],
) -> None:
    jobs = {job["job_name"]: job for job in SCRAPE["scrape_configs"]}
    for service in SERVICES:
        job = jobs[f"slmops-{service}"]
        port = service_settings[service].model_fields["port"].default
        assert job["metrics_path"] == "/metrics"
        assert job["authorization"]["type"] == "Bearer"
        assert job["authorization"]["credentials_file"].endswith(".jwt")
        assert "credentials" not in job["authorization"]  # never a token in the file itself
        targets = [t for group in job["static_configs"] for t in group["targets"]]
        assert targets == [f"127.0.0.1:{port}"], service
