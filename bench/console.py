"""The console's pages beside the API call each is built from, and live updates, one run.

The local stack as processes with the registry, the rollout service and the console; 100
versions published (four models of 25 versions, the same tiny ONNX bytes), one of them with a
variant, its report and its release announced on the bus as the optimizer and the validator
would; 10,000 simulated gateways (`slmops fleet simulate`, its own process) and a rollout of
that version to them in two waves, the second waiting for approval.

* Event delay: one server-sent-event stream open on ``/rollouts/{id}/live`` (the session
  cookie, as a browser's ``EventSource`` sends it) while the canary wave waits for approval;
  the rollout is paused and resumed through the rollout API, and each time the clock runs from
  the API's answer to the first ``progress`` event showing the new status.
* Pages: after approval and completion (every gateway runs the variant), warm (a few rounds
  first), each page followed by its API call, round-robin over the pages, one request at a
  time, from this process: the time to the full answer (the same client, the same loop, the
  same machine). The ratio is the page's cost over the API's (the upstream call, the JSON
  parsed again, the template, the console's own hop). The gateways report health every 30 s
  (the simulator's default), so part of every page's samples fall while the services fold
  10,000 reports, as they would in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from slmops.auth import LocalCredentials
from slmops.events.payloads import (
    DesiredModel,
    GateResult,
    OptimizationCompleted,
    PassSpec,
    Recipe,
    ValidationPassed,
)
from slmops.testing.identities import RegistryRoles, publish_as
from slmops.testing.localstack import RunningStack, local_stack
from slmops.testing.models import tiny_encoder_onnx
from slmops.testing.polling import until_answered
from slmops.testing.registry import register_variant, release_of

QUICK = os.environ.get("SLMOPS_BENCH_QUICK", "") not in ("", "0")
GATEWAYS = 10_000
MODELS, VERSIONS_PER_MODEL = 4, 25  # 100 versions
CLASS = "x86-avx512-vnni"
RELEASED = ("bench-console-0", "1.0.0")
WARMUP = 5
ROUNDS = 20 if QUICK else 40  # per page, alternating with its API call
TOGGLES = 5 if QUICK else 10  # pause + resume pairs on an open live page
PAGE_SIZE = 100  # the console's default fleet page
TARGET_MS, EVENT_TARGET_MS = 300.0, 1000.0


@dataclass
class Pair:
    page: str
    api: str
    page_ms: list[float] = field(default_factory=list)
    api_ms: list[float] = field(default_factory=list)


@dataclass
class Result:
    pairs: list[Pair]
    event_ms: list[float]
    setup_s: dict[str, float]
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before/after the pages


def progress(what: str) -> None:
    print(f"  console bench: {what}", file=sys.stderr, flush=True)


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[18]


async def publish_versions(stack: RunningStack, creds: LocalCredentials) -> DesiredModel:
    """100 versions; the first one's variant optimized, passed and released on the bus."""
    data = tiny_encoder_onnx()
    async with httpx.AsyncClient(base_url=stack.urls["registry"], auth=RegistryRoles(creds),
                                 timeout=60) as registry:  # fmt: skip
        name, version = RELEASED
        desired = await register_variant(registry, data, model_name=name, version=version,
                                         device_class=CLASS)  # fmt: skip
        digest = desired.artifact.digest
        for m in range(MODELS):
            for v in range(VERSIONS_PER_MODEL):
                if (f"bench-console-{m}", f"1.0.{v}") == RELEASED:
                    continue  # published with its variant above
                answer = await registry.post("/v1/models", json={
                    "model_name": f"bench-console-{m}", "version": f"1.0.{v}", "format": "onnx",
                    "task": "feature-extraction", "artifact_digest": digest,
                    "device_classes": ["not-a-class"]})  # fmt: skip
                assert answer.status_code in (200, 201), answer.text
        named = {"model_name": name, "version": version, "variant_id": desired.variant_id,
                 "device_class": CLASS}  # fmt: skip
        gates = [GateResult(name="latency.p95_ms", value=12.5, budget=40.0, unit="ms",
                            bound="max", passed=True)]  # fmt: skip
        where = (stack.urls["nats"], stack.var_dir)
        await publish_as(*where, "optimizer", OptimizationCompleted(
            **named, parent_digest=digest, artifact=desired.artifact,
            recipe=Recipe(name="as-is", passes=[PassSpec(name="convert")]),
            manifest_digest=desired.manifest_digest, duration_s=0.1))  # fmt: skip
        await publish_as(*where, "validator", ValidationPassed(**named, gates=gates))
        await publish_as(*where, "validator", release_of({CLASS: desired}))

        async def in_lineage() -> bool:
            found = (await registry.get(f"/v1/models/{name}/{version}/lineage")).json()
            variants = found.get("variants") or [{}]
            return bool(found.get("releases")) and bool(variants[0].get("reports"))

        await until_answered(
            in_lineage, "the variant, its report and the release in the lineage", timeout_s=60
        )
    return desired


@contextlib.contextmanager
def simulated_fleet(stack: RunningStack) -> Iterator[subprocess.Popen[bytes]]:
    """`slmops fleet simulate` as its own process (its own identity from var/auth)."""
    env = {**os.environ, **stack.env, "SLMOPS_NATS_URL": stack.urls["nats"],
           "SLMOPS_REGISTRY_URL": stack.urls["registry"]}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "slmops.cli.main", "fleet", "simulate", "--count", str(GATEWAYS),
         "--classes", f"{CLASS}=1", "--label", "site=berlin,paris", "--prefix", "bc",
         "--health-interval-s", "30"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


async def sign_in(console: str, token: str) -> str:
    """The session cookie (Secure, so httpx over http keeps it only if we send it ourselves)."""
    async with httpx.AsyncClient(base_url=console, timeout=30) as client:
        answer = await client.post("/login", data={"token": token, "next": "/models"})
    assert answer.status_code == 303, answer.text
    cookie = next(c for c in answer.headers.get_list("set-cookie")
                  if c.startswith("slmops_session="))  # fmt: skip
    return cookie.split(";", 1)[0]


async def timed_get(client: httpx.AsyncClient, path: str) -> float:
    started = time.perf_counter()
    answer = await client.get(path)
    elapsed_ms = (time.perf_counter() - started) * 1e3
    assert answer.status_code == 200, f"{path}: {answer.status_code} {answer.text[:300]}"
    return elapsed_ms


async def measure_pages(
    pages: httpx.AsyncClient, apis: dict[str, httpx.AsyncClient], rollout_id: str,
    variant_id: str,
) -> list[Pair]:  # fmt: skip
    name, version = RELEASED
    cases: list[tuple[Pair, str, Any]] = [
        (Pair("/models", "registry GET /v1/models"), "registry", lambda i: ("/models",
                                                                           "/v1/models")),
        (Pair(f"/models/{name}/{version}", "registry GET …/lineage?gateways=false"), "registry",
         lambda i: (f"/models/{name}/{version}",
                    f"/v1/models/{name}/{version}/lineage?gateways=false")),
        (Pair("/variants/{id}/report", "registry GET /v1/variants/{id}/report"), "registry",
         lambda i: (f"/variants/{variant_id}/report", f"/v1/variants/{variant_id}/report")),
        (Pair("/rollouts", "rollout GET /v1/rollouts"), "rollout",
         lambda i: ("/rollouts", "/v1/rollouts")),
        (Pair("/rollouts/{id}", "rollout GET /v1/rollouts/{id}"), "rollout",
         lambda i: (f"/rollouts/{rollout_id}", f"/v1/rollouts/{rollout_id}")),
        # a different page of the 10,000 each round, the same one for the page and the API
        (Pair("/fleet?offset=N", f"rollout GET /v1/fleet?limit={PAGE_SIZE}&offset=N"),
         "rollout", lambda i: (f"/fleet?offset={_offset(i)}",
                               f"/v1/fleet?limit={PAGE_SIZE}&offset={_offset(i)}")),
    ]  # fmt: skip
    # Round-robin over the pages: the simulated fleet's health reports (10,000 every 30 s)
    # keep the services busy part of the time, and every page should see the same mix.
    for i in range(WARMUP + ROUNDS):
        for pair, service, paths in cases:
            page, api = paths(i)
            page_ms = await timed_get(pages, page)
            api_ms = await timed_get(apis[service], api)
            if i >= WARMUP:
                pair.page_ms.append(page_ms)
                pair.api_ms.append(api_ms)
    return [pair for pair, _, _ in cases]


def _offset(i: int) -> int:
    return (i * 37 % (GATEWAYS // PAGE_SIZE)) * PAGE_SIZE


async def _progress_events(stream: httpx.Response) -> AsyncIterator[tuple[float, str, str]]:
    """(arrival time, event name, data) of each server-sent event."""
    name, data = "", list[str]()
    async for line in stream.aiter_lines():
        if line == "":
            if name or data:
                yield time.perf_counter(), name, "\n".join(data)
            name, data = "", list[str]()
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


async def measure_events(console: str, cookie: str, rollout: httpx.AsyncClient,
                         rollout_id: str) -> list[float]:  # fmt: skip
    """From the pause/resume API answer to the page's event showing the new status."""
    arrived: asyncio.Queue[tuple[float, str]] = asyncio.Queue()
    headers = {"Cookie": cookie, "Accept": "text/event-stream"}
    delays: list[float] = []
    async with (
        httpx.AsyncClient(base_url=console, headers=headers, timeout=None) as client,
        client.stream("GET", f"/rollouts/{rollout_id}/live") as stream,
    ):
        assert stream.status_code == 200, stream.status_code

        async def read() -> None:
            async for at, name, data in _progress_events(stream):
                if name == "progress":
                    await arrived.put((at, data))

        reader = asyncio.create_task(read())
        try:
            await asyncio.sleep(1.0)  # the stream is subscribed
            for action, status in [("pause", "paused"), ("resume", "running")] * TOGGLES:
                while not arrived.empty():
                    arrived.get_nowait()
                sent = time.perf_counter()
                answer = await rollout.post(f"/v1/rollouts/{rollout_id}/{action}", json={})
                answered = time.perf_counter()
                assert answer.status_code == 200, answer.text
                while True:
                    at, data = await asyncio.wait_for(arrived.get(), 30)
                    if at >= sent and f'data-status="{status}"' in data:
                        break
                # an event that beat the API's answer counts as no delay
                delays.append(max(0.0, at - answered) * 1e3)
                await asyncio.sleep(0.5)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    return delays


async def run() -> Result:
    setup: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="slmops-bench-console-") as tmp:
        began = time.perf_counter()
        with local_stack(Path(tmp) / "var", SLMOPS_STACK_SERVICES="registry,rollout,console",
                         SLMOPS_ROLLOUT_TICK_S="0.2") as stack:  # fmt: skip
            setup["stack up"] = time.perf_counter() - began
            creds = LocalCredentials(stack.var_dir / "auth")
            admin = creds.token("admin")
            bearer = {"Authorization": f"Bearer {admin}"}
            began = time.perf_counter()
            desired = await publish_versions(stack, creds)
            setup["100 versions published, one released"] = time.perf_counter() - began
            with simulated_fleet(stack) as fleet:
                async with (
                    httpx.AsyncClient(base_url=stack.urls["registry"], headers=bearer,
                                      timeout=60) as registry,
                    httpx.AsyncClient(base_url=stack.urls["rollout"], headers=bearer,
                                      timeout=60) as rollout,
                ):  # fmt: skip
                    return await _measure(stack, fleet, registry, rollout, admin, desired, setup)


async def _measure(
    stack: RunningStack, fleet: subprocess.Popen[bytes], registry: httpx.AsyncClient,
    rollout: httpx.AsyncClient, admin: str, desired: DesiredModel, setup: dict[str, float],
) -> Result:  # fmt: skip
    began = time.perf_counter()

    async def registered() -> bool:
        if fleet.poll() is not None:
            stderr = fleet.stderr.read().decode() if fleet.stderr else ""
            raise RuntimeError(f"the simulated fleet exited: {stderr[-2000:]}")
        page = (await rollout.get("/v1/fleet", params={"limit": 1})).json()
        return bool(page.get("total") == GATEWAYS)

    progress(f"waiting for {GATEWAYS:,} simulated gateways to register")
    await until_answered(registered, f"{GATEWAYS} gateways registered", timeout_s=900, every_s=2)
    setup[f"{GATEWAYS:,} gateways registered"] = time.perf_counter() - began
    name, version = RELEASED
    policy = {"percents": [50, 100], "approval_waves": [1], "soak_s": 0,
              "success_threshold": 1.0, "max_rate_per_min": 100_000_000,
              "silent_timeout_s": 3600}  # fmt: skip
    began = time.perf_counter()
    started = await rollout.post("/v1/rollouts", json={"model_name": name, "version": version,
                                                       "policy": policy})  # fmt: skip
    assert started.status_code == 201, started.text
    rollout_id = started.json()["rollout_id"]

    async def canary_done() -> bool:
        wave = (await rollout.get(f"/v1/rollouts/{rollout_id}")).json()["wave_progress"][0]
        return bool(wave["gateways"].get("applied", 0) == wave["targets"])

    await until_answered(canary_done, "the first wave applied", timeout_s=900, every_s=1)
    setup["wave 0 (5,000 gateways) applied"] = time.perf_counter() - began
    progress("canary wave applied; pausing and resuming on an open live page")
    cookie = await sign_in(stack.urls["console"], admin)
    event_ms = await measure_events(stack.urls["console"], cookie, rollout, rollout_id)
    approved = await rollout.post(f"/v1/rollouts/{rollout_id}/approve", json={})
    assert approved.status_code == 200, approved.text
    began = time.perf_counter()

    async def completed() -> bool:
        return bool((await rollout.get(f"/v1/rollouts/{rollout_id}")).json()["status"]
                    == "completed")  # fmt: skip

    await until_answered(completed, "the rollout completed", timeout_s=900, every_s=1)
    setup["wave 1 approved until completed"] = time.perf_counter() - began
    progress("rollout completed; timing the pages")
    load_before = os.getloadavg()[0]
    async with httpx.AsyncClient(base_url=stack.urls["console"], headers={"Cookie": cookie},
                                 timeout=60) as pages:  # fmt: skip
        pairs = await measure_pages(pages, {"registry": registry, "rollout": rollout},
                                    rollout_id, desired.variant_id)  # fmt: skip
    return Result(pairs, event_ms, setup, (load_before, os.getloadavg()[0]))


def table(result: Result) -> str:
    lines = [
        f"| page (its API call) | page p50 ms | page p95 ms | API p50 ms | API p95 ms "
        f"| p50 page / API | p95 page / API | p95 < {TARGET_MS:.0f} ms |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for pair in result.pairs:
        page50, api50 = statistics.median(pair.page_ms), statistics.median(pair.api_ms)
        page95, api95 = p95(pair.page_ms), p95(pair.api_ms)
        lines.append(
            f"| `{pair.page}` ({pair.api}) | {page50:.1f} | {page95:.1f} | {api50:.1f} "
            f"| {api95:.1f} | {page50 / api50:.2f} | {page95 / api95:.2f} "
            f"| {'yes' if page95 < TARGET_MS else 'NO'} |"
        )
    events = result.event_ms
    lines += [
        "",
        f"| live page: rollout API answer → `progress` event with the new status | p50 ms "
        f"| p95 ms | max ms | < {EVENT_TARGET_MS:.0f} ms |",
        "|---|---:|---:|---:|---|",
        f"| pause / resume, {len(events)} times | {statistics.median(events):.0f} "
        f"| {p95(events):.0f} | {max(events):.0f} "
        f"| {'yes' if max(events) < EVENT_TARGET_MS else 'NO'} |",
        "",
        "Setup: "
        + "; ".join(f"{k} {v:.0f} s" for k, v in result.setup_s.items())
        + f". Load average (1 min, {os.cpu_count()} cores) before / after the pages: "
        f"{result.load[0]:.1f} / {result.load[1]:.1f}.",
    ]
    return "\n".join(lines)


def main() -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result = asyncio.run(run())
    quick = " (quick)" if QUICK else ""
    print(f"\n## Console pages ({GATEWAYS:,} gateways, {MODELS * VERSIONS_PER_MODEL} versions, "
          f"warm, {ROUNDS} rounds of page then API, round-robin){quick}\n")  # fmt: skip
    print(table(result))


if __name__ == "__main__":
    main()
