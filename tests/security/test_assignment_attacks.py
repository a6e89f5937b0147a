"""Assignments that do not prove themselves, sent to the stack's real gateway agent (pinned
trust root) the way an attacker with write access to the bus would: straight into its desired
state and its notification subject. Each is reported failed with the reason and installs
nothing; a replayed older statement is not even acted on."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.assignments import AssignmentSigner
from slmops.auth import BearerToken, Scope, local_credentials
from slmops.events import new_event
from slmops.events.payloads import ArtifactRef, DesiredModel, GatewayAssignment
from slmops.testing.localstack import RunningStack
from slmops.testing.models import tiny_encoder_onnx, with_word_tokenizer
from slmops.testing.registry import register_variant
from slmops.trust.local import LOCAL_ASSIGNMENT_KEY_RELPATH

GATEWAY_ID = "local-gw-1"
DIGEST = "sha256:" + "e" * 64


def _assignment(generation: int) -> GatewayAssignment:
    desired = DesiredModel(
        model_name="evil", version="99", variant_id="v-evil", manifest_digest=DIGEST,
        artifact=ArtifactRef(digest=DIGEST, size_bytes=1, uri="s3://slmops/blobs/evil"),
    )  # fmt: skip
    return GatewayAssignment(gateway_id=GATEWAY_ID, generation=generation, desired=desired)


async def _send(admin: Any, assignment: GatewayAssignment) -> None:
    """What the rollout service does: the desired state, then the notification."""
    js = admin.client.jetstream(timeout=5)
    desired = await js.key_value("slmops-desired-state")
    await desired.put(GATEWAY_ID, assignment.model_dump_json().encode())
    event = new_event(assignment, source="/attacker")
    await js.publish(event.nats_subject, event.to_json())


async def _reports(admin: Any) -> asyncio.Queue[dict[str, Any]]:
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_report(msg: Any) -> None:
        await queue.put(json.loads(msg.data)["data"])

    await admin.client.subscribe(f"slmops.gateway.report.v1.*.{GATEWAY_ID}", cb=on_report)
    return queue


async def _outcome(queue: asyncio.Queue[dict[str, Any]], generation: int) -> dict[str, Any]:
    """The gateway's failed/applied report about ``generation`` (acknowledgements skipped)."""
    while True:
        report = await asyncio.wait_for(queue.get(), timeout=60)
        if report.get("generation") == generation and report["kind"] in ("failed", "applied"):
            return report


async def test_forged_untrusted_and_expired_assignments_are_refused(
    stack: RunningStack, connect: Any, generation_base: int
) -> None:
    admin = await connect("admin")
    reports = await _reports(admin)
    real = AssignmentSigner.from_file(stack.var_dir / LOCAL_ASSIGNMENT_KEY_RELPATH)
    rogue = AssignmentSigner(Ed25519PrivateKey.generate())
    base = generation_base
    attacks = [
        (_assignment(base + 1), "without a signed statement"),
        (rogue.sign(_assignment(base + 2)), "untrusted key"),
        (real.sign(_assignment(base + 3), now=time.time() - 40 * 86_400), "expired"),
        (real.sign(_assignment(base + 4)).model_copy(update={"rollback": True}), "does not verify"),
    ]
    for assignment, reason in attacks:
        await _send(admin, assignment)
        report = await _outcome(reports, assignment.generation)
        assert report["kind"] == "failed"
        assert reason in report["reason"]
    # A genuine statement passes its check (its model does not exist: refused later, and
    # for that reason, not for its statement) ...
    genuine = real.sign(_assignment(base + 10))
    await _send(admin, genuine)
    report = await _outcome(reports, base + 10)
    assert report["kind"] == "failed"
    assert "statement" not in report["reason"]
    # ... and once acted on, an older (replayed) genuine statement is ignored: the next report
    # is about the assignment sent after it.
    await _send(admin, real.sign(_assignment(base + 5)))
    await _send(admin, _assignment(base + 11))
    generations = []
    while (report := await asyncio.wait_for(reports.get(), timeout=60))["generation"] != base + 11:
        generations.append(report["generation"])
    assert base + 5 not in generations  # neither acknowledged nor reported


async def test_a_genuine_statement_for_a_validated_variant_is_installed(
    stack: RunningStack, connect: Any, generation_base: int
) -> None:
    """The same path with everything genuine: the gateway's pinned root vouches for the
    registry's and the rollout service's keys, so it installs and serves the variant."""
    admin = await connect("admin")
    reports = await _reports(admin)
    issuer = local_credentials(stack.var_dir).issuer()  # this test plays the trusted services
    token = BearerToken(issuer.mint("test:services", frozenset(Scope), 600))
    async with httpx.AsyncClient(base_url=stack.urls["registry"], auth=token, timeout=60) as api:
        desired = await register_variant(api, with_word_tokenizer(tiny_encoder_onnx()),
                                         device_class="x86-avx512-vnni")  # fmt: skip
    real = AssignmentSigner.from_file(stack.var_dir / LOCAL_ASSIGNMENT_KEY_RELPATH)
    generation = generation_base
    await _send(admin, real.sign(GatewayAssignment(
        gateway_id=GATEWAY_ID, generation=generation, desired=desired)))  # fmt: skip
    report = await _outcome(reports, generation)
    assert report["kind"] == "applied", report.get("reason")
    assert report["variant_id"] == desired.variant_id
