"""End to end, as `make run` does it, on real parts: the local stack as processes (nats-server
with JetStream, the nanio S3 server, Ray Serve in the optimizer, ONNX Runtime in the
validator), `slmops demo` publishing the real all-MiniLM-L6-v2 and rolling it out to a
simulated fleet, then the registry's lineage and the spans the processes exported.

One run of the demo is shared by the tests below (it takes minutes); each asserts one part.
The fleet is smaller than `make run`'s 500 gateways."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops.testing.localstack import local_stack
from slmops.traceview import read_spans

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1500)]  # the shared run

GATEWAYS = 40
CLASSES = {"x86-avx512-vnni": 0.5, "arm64-pi5": 0.5}
SLMOPS = [sys.executable, "-m", "slmops.cli.main"]


@dataclass
class DemoRun:
    env: dict[str, str]
    output: str
    exit_code: int
    report: dict[str, Any]
    urls: dict[str, str]

    @property
    def model(self) -> dict[str, Any]:
        (model,) = self.report["models"]
        return dict(model)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    # setup: a stack of its own (ports, state), started as `make run` would
    tmp = tmp_path_factory.mktemp("demo")
    with local_stack(tmp / "var") as stack:
        # execute: the demo on the running stack (it leaves a stack it did not start up)
        report_file = tmp / "report.json"
        classes = ",".join(f"{c}={s}" for c, s in CLASSES.items())
        run = subprocess.run(
            [*SLMOPS, "demo", "--models", "minilm", "--gateways", str(GATEWAYS), "--classes",
             classes, "--soak-s", "1", "--no-wait", "--json-report", str(report_file),
             "--timeout-s", "900"],
            env=stack.env, capture_output=True, text=True, timeout=1200, check=False,
        )  # fmt: skip
        report = json.loads(report_file.read_text()) if report_file.exists() else {}
        yield DemoRun(stack.env, run.stdout + run.stderr, run.returncode, report, stack.urls)


def test_the_demo_reaches_its_final_report(demo: DemoRun) -> None:
    assert demo.exit_code == 0, demo.output[-3000:]
    model = demo.model
    # each class got a variant smaller than fp32 and close to it in quality
    assert {row["device_class"] for row in model["classes"]} == set(CLASSES)
    for row in model["classes"]:
        assert row["variant_id"], row
        assert row["size_mb"] < row["fp32_size_mb"], row
        assert row["quality"]["parity.cosine_mean"] > 0.95, row
        if row["device_class"] == "x86-avx512-vnni":  # this host's CPU: latency measured
            assert row["p50_ms"] > 0, row
        else:  # another CPU's class: not faked, its canary wave decides
            assert row["p50_ms"] is None, row
    # the whole fleet (every gateway runs the embedding app here) was updated
    rollout = model["rollout"]
    assert rollout["outcome"] == "completed", rollout
    assert rollout["targets"] == rollout["acknowledged"] == rollout["applied"] == GATEWAYS
    assert rollout["failed"] == 0
    # the report as the user sees it: per class, the rollout line and the trace to look at
    assert f"rollout {rollout['rollout_id']}: completed - {GATEWAYS} applied" in demo.output
    assert f"slmops trace show {model['trace_id']}" in demo.output


def test_lineage_shows_which_gateways_run_which_variant(demo: DemoRun) -> None:
    model = demo.model
    chosen = {row["device_class"]: row["variant_id"] for row in model["classes"]}
    lineage = httpx.get(f"{demo.urls['registry']}/v1/models/{model['model_name']}/"
                        f"{model['version']}/lineage").json()  # fmt: skip
    fleet = httpx.get(f"{demo.urls['rollout']}/v1/gateways",
                      params={"selector": [f"run={demo.report['run']}"]}).json()  # fmt: skip
    classes = {g["gateway_id"]: g["device_class"] for g in fleet}

    # every gateway of the run runs its own class's variant, as the registry records it
    assert len(classes) == GATEWAYS
    assert {gid: g["variant_id"] for gid, g in lineage["gateways"].items()} == {
        gid: chosen[cls] for gid, cls in classes.items()
    }
    assert {g["state"] for g in lineage["gateways"].values()} == {"applied"}
    assert Counter(classes.values()) == {c: GATEWAYS * s for c, s in CLASSES.items()}
    assert [r["state"] for r in lineage["rollouts"]] == ["completed"]


def test_one_trace_spans_the_journey_from_publish_to_the_last_acknowledgement(
    demo: DemoRun,
) -> None:
    trace_id = demo.model["trace_id"]
    spans = read_spans(Path(demo.env["SLMOPS_VAR_DIR"]) / "traces", trace_id)
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
    assert names[("rollout", "publish gateway.assignment.v1")] == GATEWAYS
    assert names[("fleetsim", "process gateway.assignment.v1")] == GATEWAYS
    assert names[("fleetsim", "publish gateway.report.v1")] == 2 * GATEWAYS  # ack + applied
    assert names[("rollout", "publish rollout.completed.v1")] == 1

    # and `slmops trace show` draws it
    shown = subprocess.run([*SLMOPS, "trace", "show", trace_id], env=demo.env,
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert f"trace {trace_id} · {len(spans)} spans" in shown.stdout
    assert "process gateway.assignment.v1" in shown.stdout
