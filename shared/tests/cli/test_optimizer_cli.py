"""`slmops variants` against a real registry process whose lineage learned of a variant from an
``optimization.completed`` event, and `slmops jobs` error handling."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner, Result

from slmops.bus import Bus
from slmops.cli.main import app
from slmops.events import OptimizationCompleted, OptimizationFailed, new_event
from slmops.events.payloads import ArtifactRef, PassSpec, Recipe
from slmops.testing.factories import sample_digest

pytestmark = pytest.mark.integration


def cli(*args: str | Path) -> Result:
    # wide enough that rich does not wrap the table's cells
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


async def _lineage_has_variant(registry_url: str, path: str, auth: httpx.Auth) -> None:
    async with httpx.AsyncClient(base_url=registry_url, auth=auth) as client:
        for _ in range(100):
            doc = (await client.get(path)).json()
            if doc.get("variants") and doc.get("optimization_failures"):
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"lineage never showed the variant: {doc}")


async def test_variants_lists_class_recipe_size_and_quality(
    registry_url: str, bus: Bus, tmp_path: Path, everything_auth: httpx.Auth
) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2, 0) + b"\0" * 64)
    published = await asyncio.to_thread(
        cli, "publish", model, "--name", "smol", "--version", "1.0.0",
        "--registry-url", registry_url,
    )  # fmt: skip
    assert published.exit_code == 0, published.output
    recipe = Recipe(name="gguf-exact-blocks", passes=[PassSpec(name="gguf_blocks")])
    completed = OptimizationCompleted(
        model_name="smol",
        version="1.0.0",
        variant_id="v-" + "a" * 32,
        device_class="x86-avx512-vnni",
        parent_digest=sample_digest("parent"),
        recipe=recipe,
        artifact=ArtifactRef(digest=sample_digest("variant"), size_bytes=106_800_000, uri="s3://b"),
        duration_s=31.5,
        metrics={"quick_top1_agreement": 0.9987, "size_mb": 106.8},
    )
    failed = OptimizationFailed(
        model_name="smol",
        version="1.0.0",
        device_class="arm64-pi5",
        recipe_name="int8-weight-only",
        reason="the job crashed: out of disk",
    )
    for payload in (completed, failed):
        await bus.publish(new_event(payload, source="/slmops/optimizer"))
    await _lineage_has_variant(registry_url, "/v1/models/smol/1.0.0/lineage", everything_auth)

    table = await asyncio.to_thread(
        cli, "variants", "smol", "1.0.0", "--registry-url", registry_url
    )
    as_json = await asyncio.to_thread(
        cli, "variants", "smol", "1.0.0", "--json", "--registry-url", registry_url
    )
    missing = await asyncio.to_thread(
        cli, "variants", "smol", "9.9.9", "--registry-url", registry_url
    )

    assert table.exit_code == 0, table.output
    for text in ("x86-avx512-vnni", "gguf-exact-blocks", "101.9 MiB", "top-1 0.9987"):
        assert text in table.output
    assert "failed: arm64-pi5 / int8-weight-only: the job crashed: out of disk" in table.output
    variants = json.loads(as_json.output)
    assert [(v["variant_id"], v["metrics"]["size_mb"]) for v in variants] == [
        ("v-" + "a" * 32, 106.8)
    ]
    assert missing.exit_code == 1
    assert "no model smol 9.9.9" in missing.output


def test_jobs_says_what_to_do_when_the_optimizer_is_not_running() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"

    listed = cli("jobs", "list", "--optimizer-url", closed)
    cancelled = cli("jobs", "cancel", "v-" + "b" * 32, "--optimizer-url", closed)

    for result in (listed, cancelled):
        assert result.exit_code == 1
        assert f"optimizer not reachable at {closed}" in result.output
        assert "SLMOPS_OPTIMIZER_URL" in result.output
