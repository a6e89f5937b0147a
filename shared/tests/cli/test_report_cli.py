"""`slmops report` against a real registry process holding a variant and its validation report."""

from __future__ import annotations

import json
import socket
import struct
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner, Result

from slmops.cli.main import app
from slmops.events import variant_id_for
from slmops.events.payloads import ArtifactRef, GateResult, PassSpec, Recipe
from slmops.reports import CheckOutcome, EvalSetInfo, ValidationReport, failed_reason

pytestmark = pytest.mark.integration
RECIPE = Recipe(name="int8-dynamic", passes=[PassSpec(name="quantize_dynamic")])


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def gguf(padding: bytes) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, 2, 0) + padding


def failed_report(variant_id: str, candidate: ArtifactRef) -> ValidationReport:
    parity = GateResult(
        name="parity.cosine_mean", value=0.912, budget=0.98, bound="min", passed=False
    )
    size = GateResult(name="size_mb", value=106.8, budget=512, unit="MB", bound="max", passed=True)
    return ValidationReport(
        model_name="smol",
        version="1.0.0",
        variant_id=variant_id,
        device_class="x86-avx2",
        recipe_name=RECIPE.name,
        verdict="failed",
        reason=failed_reason([parity, size]),
        candidate=candidate,
        eval_set=EvalSetInfo(name="built-in", examples=32, max_tokens=128),
        checks=[
            CheckOutcome(name="parity", gates=[parity], evidence={"cosine_min": 0.71}),
            CheckOutcome(name="size", gates=[size]),
        ],
        host={"cpu": "test-cpu", "threads": 4},
        started_at=datetime.now(UTC),
        duration_s=12.5,
    )


def store_variant_with_report(
    registry_url: str, tmp_path: Path, auth: httpx.Auth
) -> ValidationReport:
    model = tmp_path / "m.gguf"
    model.write_bytes(gguf(b"\0" * 64))
    published = cli(
        "publish", model, "--name", "smol", "--version", "1.0.0", "--json",
        "--registry-url", registry_url,
    )  # fmt: skip
    assert published.exit_code == 0, published.output
    parent = json.loads(published.stdout)["manifest"]["artifact"]["digest"]
    variant_id = variant_id_for(parent, RECIPE, "x86-avx2")
    with httpx.Client(base_url=registry_url, timeout=30, auth=auth) as client:
        blob = client.post("/v1/blobs", content=gguf(b"variant")).raise_for_status().json()
        variant = client.post(
            "/v1/variants",
            json={
                "model_name": "smol",
                "version": "1.0.0",
                "variant_id": variant_id,
                "device_class": "x86-avx2",
                "recipe": RECIPE.model_dump(mode="json"),
                "format": "gguf",
                "artifact_digest": blob["digest"],
            },
        ).raise_for_status()
        candidate = ArtifactRef(digest=blob["digest"], size_bytes=blob["size_bytes"], uri="s3://b")
        report = failed_report(variant_id, candidate)
        stored = client.post("/v1/blobs", content=report.to_json()).raise_for_status().json()
        client.post(
            f"/v1/variants/{variant_id}/reports",
            json={
                "report_digest": stored["digest"],
                "verdict": report.verdict,
                "variant_manifest_digest": variant.json()["digest"],
                "artifact_digest": blob["digest"],
            },
        ).raise_for_status()
    return report


def test_report_prints_the_verdict_and_each_gate_against_its_budget(
    registry_url: str, tmp_path: Path, everything_auth: httpx.Auth
) -> None:
    report = store_variant_with_report(registry_url, tmp_path, everything_auth)

    shown = cli("report", report.variant_id, "--registry-url", registry_url)
    as_json = cli("report", report.variant_id, "--json", "--registry-url", registry_url)
    missing = cli("report", "v-nope", "--registry-url", registry_url)

    assert shown.exit_code == 0, shown.output
    assert f"# Validation of `{report.variant_id}`" in shown.stdout
    assert "- Verdict: **FAILED**: parity.cosine_mean 0.912 < 0.98" in shown.stdout
    assert "| parity.cosine_mean | 0.912 | 0.98 | **FAIL** |" in shown.stdout
    assert "Signed report manifest: sha256:" in shown.stdout
    assert as_json.exit_code == 0, as_json.output
    assert ValidationReport.model_validate(json.loads(as_json.stdout)) == report
    assert missing.exit_code == 1
    assert "no variant v-nope" in missing.output


def test_report_says_what_to_do_when_the_registry_is_not_running() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"

    result = cli("report", "v-" + "c" * 32, "--registry-url", closed)

    assert result.exit_code == 1
    assert f"registry not reachable at {closed}" in result.output
    assert "SLMOPS_REGISTRY_URL" in result.output
