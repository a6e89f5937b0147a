"""The console in a real browser (headless Chromium from Debian, driven by Playwright) against
the local stack as processes: sign in, the pages show the platform's numbers, a rollout's
progress moves on an open page without a reload, and an operator's Pause button pauses it; a
viewer sees no buttons and is refused if they post anyway. A release proposed from field
evidence shows its evidence on the version page, an operator approves it there and its
rollout's link appears; a viewer sees it without buttons. The telemetry service is not in this
stack: the fleet's field health page says so. Screenshots land in the test's temp folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from slmops.auth import LocalCredentials, scopes_of_role
from slmops.events import field_release_id
from slmops.events.payloads import (
    DesiredModel,
    FieldEvidence,
    GateResult,
    OptimizationCompleted,
    PassSpec,
    Recipe,
    ReleaseCreated,
    ReleaseEntry,
    ValidationPassed,
)
from slmops.testing.identities import RegistryRoles, publish_as
from slmops.testing.localstack import RunningStack, local_stack
from slmops.testing.models import tiny_encoder_onnx
from slmops.testing.polling import until_answered
from slmops.testing.ports import free_port
from slmops.testing.registry import register_variant, release_of

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

GATEWAYS = 20
CLASS = "test-cpu"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    folder = tmp_path_factory.mktemp("console")
    # no telemetry service: the console is pointed at a port nothing listens on
    nowhere = f"http://127.0.0.1:{free_port()}"
    with local_stack(folder, SLMOPS_STACK_SERVICES="registry,rollout,console",
                     SLMOPS_CONSOLE_TELEMETRY_URL=nowhere) as running:  # fmt: skip
        yield running


GATES = [
    GateResult(name="latency.p95_ms", value=12.5, budget=40.0, unit="ms", bound="max", passed=True),
    GateResult(name="parity.cosine_mean", value=0.995, budget=0.98, bound="min", passed=True),
    GateResult(name="size.size_mb", value=0.16, budget=512.0, unit="MB", bound="max", passed=True),
]


async def _released(stack: RunningStack, creds: LocalCredentials) -> DesiredModel:
    """A variant made by hand, announced as the optimizer and the validator would (optimized,
    passed with its gates, released), once the registry's lineage shows all three."""
    async with httpx.AsyncClient(base_url=stack.urls["registry"], auth=RegistryRoles(creds),
                                 timeout=60) as registry:  # fmt: skip
        desired = await register_variant(registry, tiny_encoder_onnx(), model_name="console-demo",
                                         version="1.0.0", device_class=CLASS)  # fmt: skip
        named = {"model_name": "console-demo", "version": "1.0.0",
                 "variant_id": desired.variant_id, "device_class": CLASS}  # fmt: skip
        where = (stack.urls["nats"], stack.var_dir)
        await publish_as(*where, "optimizer", OptimizationCompleted(
            **named, parent_digest=desired.artifact.digest, artifact=desired.artifact,
            recipe=Recipe(name="as-is", passes=[PassSpec(name="convert")]),
            manifest_digest=desired.manifest_digest, duration_s=0.1,
        ))  # fmt: skip
        await publish_as(*where, "validator", ValidationPassed(**named, gates=GATES))
        await publish_as(*where, "validator", release_of({CLASS: desired}))

        async def in_lineage() -> bool:  # the registry folds the events in the background
            found = (await registry.get("/v1/models/console-demo/1.0.0/lineage")).json()
            variants = found.get("variants") or [{}]
            return bool(found.get("releases")) and bool(variants[0].get("reports"))

        await until_answered(in_lineage, "the variant, its report and the release in the lineage")
    return desired


@pytest.fixture
def fleet(stack: RunningStack) -> Iterator[subprocess.Popen[bytes]]:
    """Simulated gateways in their own process, as `slmops fleet simulate` runs them."""
    env = {
        **os.environ,
        **stack.env,
        "SLMOPS_NATS_URL": stack.urls["nats"],
        "SLMOPS_REGISTRY_URL": stack.urls["registry"],
    }  # its own identity: var/auth
    process = subprocess.Popen(
        [sys.executable, "-m", "slmops.cli.main", "fleet", "simulate", "--count", str(GATEWAYS),
         "--classes", f"{CLASS}=1", "--label", "site=berlin,paris", "--prefix", "ui",
         "--health-interval-s", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    yield process
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is not installed: `make test` installs it (apt)"
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable,
                                                    args=["--no-sandbox"])  # fmt: skip
        yield launched
        await launched.close()


async def _sign_in(browser: Browser, base: str, token: str) -> Page:
    context = await browser.new_context(base_url=base, viewport={"width": 1300, "height": 900})
    page = await context.new_page()
    await page.goto("/models")
    await expect(page).to_have_url(f"{base}/login?next=%2Fmodels&reason=sign+in+to+continue")
    await page.fill("#token", token)
    await page.click("form.login button[type=submit]")
    await expect(page).to_have_url(f"{base}/models")
    return page


async def _rollout(rollout_api: httpx.AsyncClient, rollout_id: str) -> dict[str, Any]:
    answer = await rollout_api.get(f"/v1/rollouts/{rollout_id}")
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


async def test_an_operator_watches_a_rollout_live_and_pauses_it_a_viewer_only_looks(
    stack: RunningStack, fleet: subprocess.Popen[bytes], browser: Browser, tmp_path: Path
) -> None:
    # setup: a released variant, the simulated fleet registered, a viewer's token
    creds = LocalCredentials(stack.var_dir / "auth")
    creds.mint("viewer", "user:viewer", scopes_of_role("viewer"))
    base = stack.urls["console"]
    admin = {"Authorization": f"Bearer {creds.token('admin')}"}
    desired = await _released(stack, creds)
    async with httpx.AsyncClient(base_url=stack.urls["rollout"], headers=admin,
                                 timeout=30) as rollout_api:  # fmt: skip

        async def registered() -> bool:
            if fleet.poll() is not None:
                stderr = fleet.stderr.read().decode() if fleet.stderr else ""
                raise AssertionError(f"the simulated fleet exited: {stderr[-2000:]}")
            page = (await rollout_api.get("/v1/fleet", params={"limit": 1})).json()
            return bool(page.get("total") == GATEWAYS)

        await until_answered(registered, f"{GATEWAYS} gateways registered", timeout_s=60)

        # execute: the operator opens the pages
        page = await _sign_in(browser, base, creds.token("admin"))
        await expect(page.locator("main")).to_contain_text("console-demo")
        await page.screenshot(path=tmp_path / "models.png", full_page=True)
        await page.click("text=1.0.0")
        table = page.locator(f'table.variants[data-class="{CLASS}"]')
        await expect(table.locator("td.verdict")).to_have_text(["passed"])
        size_mb = desired.artifact.size_bytes / 1e6
        await expect(table).to_contain_text(f"{size_mb:.1f}")
        await expect(page.locator("svg.lineage")).to_contain_text("report: passed")
        await page.screenshot(path=tmp_path / "version.png", full_page=True)
        await page.click(f'tr[data-variant="{desired.variant_id}"] a')
        await expect(page.locator("p.verdict")).to_contain_text("passed")

        # a rollout in three waves, the second and third waiting for approval
        started = await rollout_api.post("/v1/rollouts", json={
            "model_name": "console-demo", "version": "1.0.0",
            "policy": {"percents": [20, 60, 100], "approval_waves": [1, 2], "soak_s": 0.5,
                       "health_min_requests": 1},
        })  # fmt: skip
        assert started.status_code == 201, started.text
        rollout_id = started.json()["rollout_id"]
        await page.goto(f"/rollouts/{rollout_id}")
        await page.evaluate("window.__sameDocument = true")
        second = page.locator('tr[data-wave="1"] td.applied')
        await expect(second).to_have_text("0")
        await until_answered(
            lambda: _first_wave_done(rollout_api, rollout_id), "wave 1 applied", timeout_s=60
        )
        approved = await rollout_api.post(f"/v1/rollouts/{rollout_id}/approve", json={})
        assert approved.status_code == 200, approved.text

        # assert: the second wave's progress arrives through the open page, no reload
        await expect(second).to_have_text("8", timeout=30_000)
        assert await page.evaluate("window.__sameDocument === true")
        await page.screenshot(path=tmp_path / "rollout-live.png", full_page=True)

        # the operator pauses it with the button
        await page.click('button[data-action="pause"]')
        await expect(page.locator("#rollout-status")).to_have_text("paused")
        assert (await _rollout(rollout_api, rollout_id))["status"] == "paused"
        await page.screenshot(path=tmp_path / "rollout-paused.png", full_page=True)

        # the fleet page counts every gateway and filters by label
        await page.goto("/fleet")
        await expect(page.locator("#fleet-count")).to_contain_text(f"{GATEWAYS} gateways match")
        await page.fill('input[name="selector"]', "site=berlin")
        await page.click(".filters button")
        await expect(page.locator("#fleet-count")).to_contain_text(f"{GATEWAYS // 2} gateways")
        await page.screenshot(path=tmp_path / "fleet.png", full_page=True)

        # a viewer sees the rollout but no buttons, and a forged post is refused
        viewer = await _sign_in(browser, base, creds.token("viewer"))
        await viewer.goto(f"/rollouts/{rollout_id}")
        await expect(viewer.locator("#rollout-status")).to_have_text("paused")
        await expect(viewer.locator("button[data-action]")).to_have_count(0)
        csrf = await viewer.evaluate(
            "JSON.parse(document.body.getAttribute('hx-headers'))['X-CSRF-Token']"
        )
        refused = await viewer.request.post(f"/rollouts/{rollout_id}/resume",
                                            form={"csrf_token": csrf})  # fmt: skip
        assert refused.status == 403
        assert (await _rollout(rollout_api, rollout_id))["status"] == "paused"

        # the fleet's field health, without a telemetry service: said in words
        await page.goto("/fleet/field")
        await expect(page.locator("#field-problem")).to_contain_text(
            "The telemetry service did not answer"
        )

        # a release proposed from field evidence: the viewer sees it without buttons and is
        # refused a forged approval; the operator approves it on the version page
        proposal = await _proposed(stack, rollout_api, desired)
        await viewer.goto("/proposals")
        await expect(viewer.locator(f'article[data-proposal="{proposal}"]')).to_contain_text(
            "pending"
        )
        await expect(viewer.locator("button[data-action]")).to_have_count(0)
        forged = await viewer.request.post(f"/proposals/{proposal}/approve",
                                           form={"csrf_token": csrf})  # fmt: skip
        assert forged.status == 403
        await page.goto("/models/console-demo/1.0.0")
        await expect(page.locator("#pending-count")).to_have_text("(1 pending)")
        card = page.locator(f'article[data-proposal="{proposal}"]')
        await expect(card.locator(".evidence")).to_have_text(
            f"{CLASS} latency_p95_ms 61.0 ms in the field > 40.0 ms budget; host measured 12.5 ms"
        )
        await card.locator('button[data-action="approve-proposal"]').click()
        link = card.locator("a.rollout-link")
        await expect(link).to_be_visible()
        await expect(card.locator(".status")).to_have_text("✓ approved")
        await page.screenshot(path=tmp_path / "proposal-approved.png", full_page=True)
        decided = (await rollout_api.get(f"/v1/proposals/{proposal}")).json()
        assert (decided["status"], decided["decided_by"]) == ("approved", "user:admin")
        await link.click()
        await expect(page).to_have_url(f"{base}/rollouts/{decided['rollout_id']}")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "fleet.png",
        "models.png",
        "proposal-approved.png",
        "rollout-live.png",
        "rollout-paused.png",
        "version.png",
    ]


async def _proposed(
    stack: RunningStack, rollout_api: httpx.AsyncClient, desired: DesiredModel
) -> str:
    """A release proposed from field evidence, announced as the validator would after a
    re-optimization (its variant: the one the fleet runs, which is enough for the console),
    once the rollout service holds it as a pending proposal."""
    evidence = FieldEvidence(
        detection_id="det-console", device_class=CLASS, variant_id=desired.variant_id,
        metric="latency_p95_ms", bound="max", budget=40.0, field_value=61.0, host_value=12.5,
    )  # fmt: skip
    release_id = field_release_id("console-demo", "1.0.0", evidence.detection_id)
    await publish_as(stack.urls["nats"], stack.var_dir, "validator", ReleaseCreated(
        release_id=release_id, model_name="console-demo", version="1.0.0", proposal=evidence,
        entries=[ReleaseEntry(device_class=CLASS, variant_id=desired.variant_id,
                              artifact=desired.artifact, manifest_digest=desired.manifest_digest,
                              reason="as-is: 38 ms p95 in the field <= 40 ms")],
    ))  # fmt: skip

    async def pending() -> bool:
        answer = await rollout_api.get(f"/v1/proposals/{release_id}")
        return answer.status_code == 200 and answer.json()["status"] == "pending"

    await until_answered(pending, "the proposal held by the rollout service")
    return release_id


async def _first_wave_done(rollout_api: httpx.AsyncClient, rollout_id: str) -> bool:
    status = await _rollout(rollout_api, rollout_id)
    wave = status["wave_progress"][0]
    return bool(wave["gateways"].get("applied", 0) == wave["targets"])
