"""A real gateway agent (not simulated) against a real registry, NATS and S3: it registers,
catches up with its desired state on connect, hot-swaps to a newer variant while serving
requests (none fails), refuses a variant that failed validation (the running one keeps serving)
and never sees another gateway's assignment."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import nats.errors
import nats.js.errors
import numpy as np
import pytest

from slmops.bus import Bus
from slmops.bus.topology import ConsumerSpec
from slmops.events import GatewayAssignment, new_event
from slmops.events.payloads import DesiredModel
from slmops.objectstore import blob_key
from slmops.service.registry_api import RegistryClient
from slmops.settings import PlatformSettings
from slmops.testing.events import await_events, follow_events, stream_count
from slmops.testing.models import with_word_tokenizer
from slmops.testing.polling import until
from slmops_gateway.app import create_app
from slmops_gateway.settings import GatewaySettings

pytestmark = [pytest.mark.integration]
TEXTS = ["w1 w2 w3", "w7 w8 w9 w10"]


@pytest.fixture
def registry_chunk_min_mb() -> float:
    return 1  # the 8 MB models of the delta test are stored as chunks too


@contextlib.asynccontextmanager
async def _gateway(
    pipeline: Any, tmp_path: Path, gateway_id: str, **overrides: Any
) -> AsyncIterator[Any]:
    settings = GatewaySettings(
        platform=PlatformSettings(), gateway_id=gateway_id, device_class="test-cpu",
        labels={"site": "lab"}, models_dir=tmp_path / gateway_id, health_interval_s=0.5,
        **overrides,
    )  # fmt: skip
    app = create_app(settings)
    app.state.agent.registry = RegistryClient("http://registry", client=pipeline.registry)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw", auth=pipeline.auth
        ) as api,
    ):
        # it hears its own assignment subject from here on (earlier ones: through KV)
        await asyncio.wait_for(app.state.agent_loop.registered.wait(), 60)
        yield api


def _assignment(gateway_id: str, generation: int, desired: DesiredModel) -> GatewayAssignment:
    return GatewayAssignment(gateway_id=gateway_id, generation=generation, desired=desired)


async def _report(bus: Bus, gateway_id: str, kind: str, generation: int | None = None) -> Any:
    events = await await_events(
        bus, f"slmops.gateway.report.v1.{kind}.{gateway_id}", count=1, timeout_s=60,
        where=lambda e: e.data.kind == kind
        and (generation is None or e.data.generation == generation),
    )  # fmt: skip
    return events[0].data


async def _health_after(
    bus: Bus, gateway_id: str, *, generation: int, requests: int, timeout_s: float = 60
) -> list[Any]:
    """The health reports of ``gateway_id`` after it applied ``generation`` (each install
    starts a new window), read until they count ``requests`` requests between them."""
    subject = f"slmops.gateway.report.v1.*.{gateway_id}"
    installed, health = False, []
    try:
        async for event in follow_events(bus, subject, timeout_s=timeout_s):
            report = event.data
            if report.kind == "applied" and report.generation == generation:
                installed = True
            elif installed and report.kind == "health":
                health.append(report)
            if installed and sum(h.health.request_count for h in health) >= requests:
                break
    except TimeoutError:
        raise AssertionError(
            f"waited {timeout_s:g} s for health reports of {gateway_id} counting "
            f"{requests} requests after generation {generation} was applied; "
            f"applied: {installed}, health since: {health}"
        ) from None
    return health


async def test_the_agent_catches_up_hot_swaps_under_load_and_refuses_bad_variants(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes], tmp_path: Path
) -> None:
    # setup: two validated versions and one that failed validation; gw-1 should run 1.0.0
    first = await pipeline.variant(with_word_tokenizer(tiny_onnx()), version="1.0.0")
    second = await pipeline.variant(with_word_tokenizer(tiny_onnx(seed=8)), version="1.1.0")
    failed = await pipeline.variant(
        with_word_tokenizer(tiny_onnx(seed=9)), version="1.2.0", verdict="failed"
    )
    desired = await bus.key_value("slmops-desired-state")
    await desired.put("gw-1", _assignment("gw-1", 1, first).model_dump_json().encode())

    async with _gateway(pipeline, tmp_path, "gw-1") as api:
        # execute / assert: registered, then caught up with its desired state on connect
        registered = await _report(bus, "gw-1", "registered")
        assert registered.capabilities["arch"]
        assert registered.labels == {"site": "lab"}
        applied = await _report(bus, "gw-1", "applied", generation=1)
        assert applied.variant_id == first.variant_id

        # hot swap to 1.1.0 while two clients keep sending requests
        statuses: list[int] = []
        served: list[str] = []
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                response = await api.post("/v1/infer", json={"texts": TEXTS})
                statuses.append(response.status_code)
                served.append(response.json().get("variant_id", ""))

        clients = [asyncio.create_task(client()) for _ in range(2)]
        await asyncio.sleep(0.3)
        await bus.publish(new_event(_assignment("gw-1", 2, second), source="/test"))
        await _report(bus, "gw-1", "applied", generation=2)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*clients)
        assert set(statuses) == {200}  # no failed request during the swap
        assert served[0] == first.variant_id
        assert served[-1] == second.variant_id

        # another gateway's assignment is never delivered here
        await bus.publish(new_event(_assignment("gw-2", 3, failed), source="/test"))
        # a variant that failed validation is refused; 1.1.0 keeps serving
        await bus.publish(new_event(_assignment("gw-1", 3, failed), source="/test"))
        refused = await _report(bus, "gw-1", "failed", generation=3)
        assert "failed validation for test-cpu" in refused.reason
        slots = (await api.get("/v1/slots")).json()
        assert slots["active"]["variant_id"] == second.variant_id
        assert slots["previous"]["variant_id"] == first.variant_id
        # it hears its own subject: no durable consumer of its own on the server
        with pytest.raises(nats.js.errors.NotFoundError):
            await bus.js.consumer_info("SLMOPS_ROLLOUT", "gateway-gw-1-rollout")
        assert await stream_count(bus, "SLMOPS_ROLLOUT", "slmops.gateway.assignment.v1.gw-2") == 1

        # a downgrade needs a rollback the registry signed; a forged one is refused
        await bus.publish(new_event(_assignment("gw-1", 4, first), source="/test"))
        downgrade = await _report(bus, "gw-1", "failed", generation=4)
        assert "downgrade from 1.1.0 to 1.0.0 refused" in downgrade.reason
        # ... also when the (unsigned) assignment claims a higher version for the old variant
        claimed = first.model_copy(update={"version": "99"})
        await bus.publish(new_event(_assignment("gw-1", 5, claimed), source="/test"))
        lying = await _report(bus, "gw-1", "failed", generation=5)
        assert "downgrade from 1.1.0 to 1.0.0 refused" in lying.reason
        # another model's name on this model's variant: cross-assigned
        crossed = first.model_copy(update={"model_name": "someone-else"})
        await bus.publish(new_event(_assignment("gw-1", 6, crossed), source="/test"))
        cross = await _report(bus, "gw-1", "failed", generation=6)
        assert "refused as cross-assigned" in cross.reason
        forged = _assignment("gw-1", 7, first).model_copy(update={
            "rollback": True, "rollout_id": "ro-1", "signature": "Zm9yZ2Vk",
            "signature_expires_at": int(time.time()) + 600,
        })  # fmt: skip
        await bus.publish(new_event(forged, source="/test"))
        refused_rollback = await _report(bus, "gw-1", "failed", generation=7)
        assert "without a valid registry signature" in refused_rollback.reason
        # a genuine statement replayed after it expired, or with its expiry pushed out
        short_lived = (await pipeline.registry.post(
            f"/v1/variants/{first.variant_id}/rollbacks", json={"rollout_id": "ro-1", "ttl_s": 1}
        )).json()  # fmt: skip
        await until(lambda: time.time() > short_lived["expires_at"] + 0.1, "the statement expiry")
        stale = {"rollback": True, "rollout_id": "ro-1", "signature": short_lived["signature"],
                 "signature_expires_at": short_lived["expires_at"]}  # fmt: skip
        await bus.publish(new_event(_assignment("gw-1", 8, first).model_copy(update=stale),
                                    source="/test"))  # fmt: skip
        expired = await _report(bus, "gw-1", "failed", generation=8)
        assert "rollback statement that expired" in expired.reason
        pushed = {**stale, "signature_expires_at": short_lived["expires_at"] + 86_400}
        await bus.publish(new_event(_assignment("gw-1", 9, first).model_copy(update=pushed),
                                    source="/test"))  # fmt: skip
        extended = await _report(bus, "gw-1", "failed", generation=9)
        assert "without a valid registry signature" in extended.reason
        signed = (await pipeline.registry.post(
            f"/v1/variants/{first.variant_id}/rollbacks", json={"rollout_id": "ro-1"}
        )).json()  # fmt: skip
        rollback = _assignment("gw-1", 10, first).model_copy(update={
            "rollback": True, "rollout_id": "ro-1", "signature": signed["signature"],
            "signature_expires_at": signed["expires_at"],
            "overlay": {"max_input_tokens": 2},  # this site's local limit travels along
        })  # fmt: skip
        await bus.publish(new_event(rollback, source="/test"))
        await _report(bus, "gw-1", "applied", generation=10)
        slots = (await api.get("/v1/slots")).json()
        assert slots["active"]["variant_id"] == first.variant_id
        short = (await api.post("/v1/infer", json={"ids": [[1, 2, 3, 4, 5]]})).json()
        assert short["variant_id"] == first.variant_id
        # the overlay cut the input to 2 tokens: same answer as the 2-token input
        two = (await api.post("/v1/infer", json={"ids": [[1, 2]]})).json()
        assert short["outputs"] == two["outputs"]

        # the health reports after that install count those two requests, none failed
        health = await _health_after(bus, "gw-1", generation=10, requests=2)
        assert {h.variant_id for h in health} == {first.variant_id}
        assert sum(h.health.request_count for h in health) == 2
        assert {h.health.error_rate for h in health if h.health.request_count} == {0.0}


def _retrained(data: bytes) -> bytes:
    """The same model with its last layer changed (the embedding table stays as it was)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(data)
    for i, init in enumerate(model.graph.initializer):
        if init.name == "w2":
            values = numpy_helper.to_array(init) * np.float32(0.5)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(values, "w2"))
    return bytes(model.SerializeToString())


async def test_only_a_gateway_without_the_cohort_protocol_keeps_a_durable_consumer(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes], tmp_path: Path
) -> None:
    # setup: gw-up ran an older release, which left its durable consumer on the server
    variant = await pipeline.variant(with_word_tokenizer(tiny_onnx()), version="1.0.0")
    older = ConsumerSpec(stream="SLMOPS_ROLLOUT", durable="gateway-gw-up-rollout",
                         filter_subjects=("slmops.gateway.assignment.v1.gw-up",),
                         ack_wait_s=30, max_deliver=5)  # fmt: skip
    await bus.declare_consumer(older)

    async with (
        _gateway(pipeline, tmp_path, "gw-up"),
        _gateway(pipeline, tmp_path, "gw-old", cohort_protocol=False),
    ):
        await _report(bus, "gw-up", "registered")
        await _report(bus, "gw-old", "registered")

        # the upgraded gateway removed its durable; the old-protocol one pulls from its own
        with pytest.raises(nats.js.errors.NotFoundError):
            await bus.js.consumer_info("SLMOPS_ROLLOUT", "gateway-gw-up-rollout")
        await bus.js.consumer_info("SLMOPS_ROLLOUT", "gateway-gw-old-rollout")
        # both act on their own assignments
        for gateway_id in ("gw-up", "gw-old"):
            await bus.publish(new_event(_assignment(gateway_id, 1, variant), source="/test"))
            assert (await _report(bus, gateway_id, "applied", generation=1)).variant_id == (
                variant.variant_id
            )


async def test_a_new_chunked_variant_downloads_only_what_changed(
    pipeline: Any, bus: Bus, tmp_path: Path
) -> None:
    # setup: an 8 MB model (its embedding table is most of it) and a retrained last layer
    from slmops.testing.models import tiny_encoder_onnx

    base = with_word_tokenizer(tiny_encoder_onnx(vocab=32768))
    first = await pipeline.variant(base, version="1.0.0")
    second = await pipeline.variant(_retrained(base), version="1.1.0")
    manifest = (await pipeline.registry.get(f"/v1/manifests/{second.manifest_digest}")).json()
    assert manifest["manifest"]["chunks_digest"] is not None  # stored as chunks

    async with _gateway(pipeline, tmp_path, "gw-delta") as api:
        await bus.publish(new_event(_assignment("gw-delta", 1, first), source="/test"))
        await _report(bus, "gw-delta", "applied", generation=1)
        agent = api._transport.app.state.agent  # the in-process app behind the client
        assert agent.last_fetch_bytes == first.artifact.size_bytes  # nothing held yet

        # execute
        await bus.publish(new_event(_assignment("gw-delta", 2, second), source="/test"))
        await _report(bus, "gw-delta", "applied", generation=2)

        # assert: serving the new variant, fetched a fraction of it
        assert (await api.get("/v1/slots")).json()["active"]["variant_id"] == second.variant_id
        assert 0 < agent.last_fetch_bytes < 0.25 * second.artifact.size_bytes


async def test_after_gc_a_late_joining_gateway_still_installs_the_release_from_chunks(
    pipeline: Any, bus: Bus, tmp_path: Path
) -> None:
    # setup: a released, chunked variant with its signed report; an orphan upload
    from slmops.testing.models import tiny_encoder_onnx
    from slmops_registry.retention import MIN_AGE_FLOOR_S

    released = await pipeline.variant(with_word_tokenizer(tiny_encoder_onnx(vocab=32768)))
    manifest = (await pipeline.registry.get(f"/v1/manifests/{released.manifest_digest}")).json()
    assert manifest["manifest"]["chunks_digest"] is not None  # gateways fetch it by chunks
    orphan = (await pipeline.registry.post("/v1/blobs", content=b"nobody's")).json()["digest"]

    # execute: GC with the smallest age callers may ask for, run two days from now (every
    # object is old enough; the API itself has no clock to turn)
    report = await pipeline.registry_context.collect_garbage(
        min_age_s=MIN_AGE_FLOOR_S, dry_run=False,
        now=datetime.now(UTC) + timedelta(days=2),
    )  # fmt: skip

    # assert: only the orphan went; a gateway joining now installs from chunks and verifies
    assert [c.key for c in report.candidates] == [blob_key(orphan)]
    async with _gateway(pipeline, tmp_path, "gw-late") as api:
        await bus.publish(new_event(_assignment("gw-late", 1, released), source="/test"))
        await _report(bus, "gw-late", "applied", generation=1)
        agent = api._transport.app.state.agent
        assert agent.last_fetch_bytes == released.artifact.size_bytes  # every chunk fetched
        assert (await api.get("/v1/slots")).json()["active"]["variant_id"] == released.variant_id


async def test_after_a_rollout_install_sampled_requests_measure_shadow_agreement(
    pipeline: Any, bus: Bus, tiny_onnx: Callable[..., bytes], tmp_path: Path
) -> None:
    # setup: gw-3 serves 1.0.0; its embeddings of TEXTS are the reference
    base = with_word_tokenizer(tiny_onnx())
    first = await pipeline.variant(base, version="1.0.0")
    second = await pipeline.variant(_nudged(base), version="1.1.0")
    desired = await bus.key_value("slmops-desired-state")
    await desired.put("gw-3", _assignment("gw-3", 1, first).model_dump_json().encode())
    async with _gateway(pipeline, tmp_path, "gw-3", shadow_sample_rate=1.0) as api:
        await _report(bus, "gw-3", "applied", generation=1)
        before = (await api.post("/v1/infer", json={"texts": TEXTS})).json()["outputs"]

        # execute: a rollout installs 1.1.0; three requests are served (and shadowed)
        assignment = GatewayAssignment(gateway_id="gw-3", generation=2, desired=second,
                                       rollout_id="ro-shadow")  # fmt: skip
        await bus.publish(new_event(assignment, source="/test"))
        await _report(bus, "gw-3", "applied", generation=2)
        after = []
        for _ in range(3):
            after = (await api.post("/v1/infer", json={"texts": TEXTS})).json()["outputs"]
        health = await await_events(
            bus, "slmops.gateway.report.v1.health.gw-3", count=1, timeout_s=30,
            where=lambda e: e.data.kind == "health" and e.data.health.shadow_samples > 0,
        )  # fmt: skip

        # assert: the agreement is the cosine of old and new embeddings of the same inputs
        cosines = [
            float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
            for a, b in zip(after, before, strict=True)
        ]
        aggregate = health[0].data.health
        assert health[0].data.variant_id == second.variant_id
        assert aggregate.shadow_agreement == pytest.approx(float(np.mean(cosines)), abs=1e-5)
        assert 0.5 < aggregate.shadow_agreement < 0.9999  # close, and not trivially equal


def _nudged(data: bytes) -> bytes:
    """The same model with noise on its last layer: outputs close to, not equal to, before."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(data)
    noise = np.random.default_rng(0)
    for i, init in enumerate(model.graph.initializer):
        if init.name == "w2":
            values = numpy_helper.to_array(init)
            values = values + noise.normal(0, 0.3 * values.std(), values.shape).astype(np.float32)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(values, "w2"))
    return bytes(model.SerializeToString())
