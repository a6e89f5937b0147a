"""Variants and reports stored through the registry, each with a signed manifest."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import httpx
import pytest

from slmops.auth import LocalCredentials, scopes_of_role
from slmops.events.payloads import ArtifactRef, GateResult
from slmops.manifests import SignedManifest, verify_manifest
from slmops.reports import CheckOutcome, ValidationReport
from slmops_registry.testing import (
    RECIPE,
    RegistryUnderTest,
    gguf_bytes,
    published_parent,
    variant_body,
)

pytestmark = pytest.mark.integration


async def test_variant_gets_a_signed_manifest_and_a_repeat_reuses_it(
    registry: RegistryUnderTest,
) -> None:
    parent = await published_parent(registry)
    artifact = (await registry.upload(gguf_bytes(padding=b"variant"))).json()["digest"]
    body = variant_body(parent, artifact)

    first = await registry.client.post("/v1/variants", json=body)
    again = await registry.client.post("/v1/variants", json=body)
    fetched = await registry.client.get(f"/v1/variants/{body['variant_id']}")
    pem = (await registry.client.get("/v1/keys")).json()["pem"]

    assert (first.status_code, again.status_code, fetched.status_code) == (201, 200, 200)
    signed = SignedManifest.model_validate(first.json())
    verify_manifest(signed, pem)
    assert signed.manifest.kind == "variant"
    assert signed.manifest.parent_digest == parent
    assert signed.manifest.recipe == RECIPE
    assert again.json()["digest"] == fetched.json()["digest"] == signed.digest


async def test_variant_id_must_follow_from_its_inputs(registry: RegistryUnderTest) -> None:
    parent = await published_parent(registry)
    artifact = (await registry.upload(gguf_bytes(padding=b"variant"))).json()["digest"]

    response = await registry.client.post(
        "/v1/variants", json=variant_body(parent, artifact, variant_id="v-made-up")
    )

    assert response.status_code == 422
    assert "is not the one its inputs give" in response.json()["detail"]


async def test_same_variant_with_other_content_is_a_conflict(registry: RegistryUnderTest) -> None:
    parent = await published_parent(registry)
    one = (await registry.upload(gguf_bytes(padding=b"one"))).json()["digest"]
    two = (await registry.upload(gguf_bytes(padding=b"two"))).json()["digest"]
    await registry.client.post("/v1/variants", json=variant_body(parent, one))

    response = await registry.client.post("/v1/variants", json=variant_body(parent, two))

    assert response.status_code == 409


async def test_report_is_stored_with_its_own_signed_manifest(registry: RegistryUnderTest) -> None:
    parent = await published_parent(registry)
    artifact = (await registry.upload(gguf_bytes(padding=b"variant"))).json()["digest"]
    body = variant_body(parent, artifact)
    variant = (await registry.client.post("/v1/variants", json=body)).json()
    report = json.dumps({"verdict": "passed", "gates": []}).encode()
    report_digest = (await registry.upload(report)).json()["digest"]
    judged = {"variant_manifest_digest": variant["digest"], "artifact_digest": artifact}
    other_bytes = (await registry.upload(gguf_bytes(padding=b"other"))).json()["digest"]

    response = await registry.client.post(
        f"/v1/variants/{body['variant_id']}/reports",
        json={"report_digest": report_digest, "verdict": "passed", **judged},
    )
    unknown = await registry.client.post(
        "/v1/variants/v-nope/reports",
        json={"report_digest": report_digest, "verdict": "passed", **judged},
    )
    # a report about other bytes than the variant's is not signed for it
    mismatched = await registry.client.post(
        f"/v1/variants/{body['variant_id']}/reports",
        json={"report_digest": report_digest, "verdict": "passed", **judged,
              "artifact_digest": other_bytes},
    )  # fmt: skip

    assert response.status_code == 201
    manifest = response.json()["manifest"]
    assert manifest["kind"] == "report"
    assert manifest["artifact"]["digest"] == report_digest
    assert manifest["labels"] == {"verdict": "passed", "variant_id": body["variant_id"]}
    assert manifest["subject_manifest_digest"] == variant["digest"]
    assert manifest["subject_artifact_digest"] == artifact
    assert unknown.status_code == 404
    assert mismatched.status_code == 409
    assert "the report judged manifest" in mismatched.json()["detail"]


def validation_report(variant_id: str, artifact: str, verdict: str) -> ValidationReport:
    size = GateResult(name="size_mb", value=0.1, budget=512, unit="MB", bound="max", passed=True)
    return ValidationReport.model_validate(
        {
            "model_name": "smollm2-135m",
            "version": "1.0.0",
            "variant_id": variant_id,
            "device_class": "arm64",
            "recipe_name": RECIPE.name,
            "verdict": verdict,
            "candidate": ArtifactRef(digest=artifact, size_bytes=100, uri="s3://b/x"),
            "checks": [CheckOutcome(name="size", gates=[size])],
            "started_at": datetime.now(UTC),
            "duration_s": 1.5,
        }
    )


async def test_latest_report_of_a_variant_is_served_with_its_manifest(
    registry: RegistryUnderTest,
) -> None:
    parent = await published_parent(registry)
    artifact = (await registry.upload(gguf_bytes(padding=b"variant"))).json()["digest"]
    body = variant_body(parent, artifact)
    variant_id = str(body["variant_id"])
    path = f"/v1/variants/{variant_id}/report"
    variant = (await registry.client.post("/v1/variants", json=body)).json()
    before = await registry.client.get(path)
    stored = []
    for verdict in ("failed", "passed"):
        report = validation_report(variant_id, artifact, verdict)
        digest = (await registry.upload(report.to_json())).json()["digest"]
        posted = await registry.client.post(
            f"/v1/variants/{variant_id}/reports",
            json={"report_digest": digest, "verdict": verdict,
                  "variant_manifest_digest": variant["digest"], "artifact_digest": artifact},
        )  # fmt: skip
        assert posted.status_code == 201
        stored.append((report, posted.json()["digest"]))
        fetched = await registry.client.get(path)

        assert fetched.status_code == 200, fetched.text
        signed = SignedManifest.model_validate(fetched.json()["manifest"])
        verify_manifest(signed, (await registry.client.get("/v1/keys")).json()["pem"])
        assert signed.digest == posted.json()["digest"]
        assert signed.manifest.artifact.digest == digest
        assert ValidationReport.model_validate(fetched.json()["report"]) == report

    assert before.status_code == 404
    assert before.json()["detail"] == (
        f"variant {variant_id} has no validation report yet: is the validator running?"
    )
    assert stored[0][1] != stored[1][1]


async def test_report_of_an_unknown_variant_is_not_found(registry: RegistryUnderTest) -> None:
    response = await registry.client.get("/v1/variants/v-nope/report")
    invalid = await registry.client.get("/v1/variants/not.a.token/report")

    assert response.status_code == 404
    assert response.json()["detail"] == "no variant v-nope"
    assert invalid.status_code == 422


async def test_versions_of_a_model_are_listed(registry: RegistryUnderTest) -> None:
    await published_parent(registry)

    versions = (await registry.client.get("/v1/models/smollm2-135m")).json()
    missing = await registry.client.get("/v1/models/unknown-model")

    assert [v["version"] for v in versions] == ["1.0.0"]
    assert missing.status_code == 404


async def test_a_gateway_reads_only_what_was_made_for_its_class(
    registry: RegistryUnderTest, credentials: LocalCredentials
) -> None:
    # setup: an arm64 variant with its report; gateways enrolled for arm64 and for x86
    parent = await published_parent(registry)
    artifact = (await registry.upload(gguf_bytes(padding=b"variant"))).json()["digest"]
    body = variant_body(parent, artifact)
    variant = (await registry.client.post("/v1/variants", json=body)).json()
    report_digest = (await registry.upload(b'{"verdict": "passed"}')).json()["digest"]
    await registry.client.post(f"/v1/variants/{body['variant_id']}/reports", json={
        "report_digest": report_digest, "verdict": "passed",
        "variant_manifest_digest": variant["digest"], "artifact_digest": artifact,
    })  # fmt: skip
    issuer = credentials.issuer()
    gateway = scopes_of_role("gateway")
    paths = [f"/v1/variants/{body['variant_id']}", f"/v1/variants/{body['variant_id']}/report",
             f"/v1/manifests/{variant['digest']}"]  # fmt: skip

    def as_(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    # execute
    own = as_(issuer.mint("gateway:pi-1", gateway, 60, device_class="arm64"))
    other = as_(issuer.mint("gateway:nuc-1", gateway, 60, device_class="x86-avx2"))
    transport = httpx.ASGITransport(app=registry.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://registry") as bare:
        statuses = {
            who: [(await bare.get(p, headers=headers)).status_code for p in paths]
            for who, headers in (("own class", own), ("other class", other))
        }
        refusal = await bare.get(paths[0], headers=other)

    # assert
    assert statuses == {"own class": [200, 200, 200], "other class": [403, 403, 403]}
    assert (
        "gateway:nuc-1 (class x86-avx2) may not read a variant made for arm64"
        in (refusal.json()["detail"])
    )
