"""The agent's side of a cohort state: a refused state moves nothing, the newest verified
generation survives a restart, and agents sharing verdicts share them per state object."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.assignments import AssignmentSigner
from slmops.cohorts import CohortEntry, CohortState, cohort_of
from slmops.events.payloads import ArtifactRef, DesiredModel
from slmops.service.registry_api import RegistryClient
from slmops.settings import PlatformSettings
from slmops.trust import KeyRole, TrustedKey, TrustedKeys
from slmops_gateway.agent import Agent
from slmops_gateway.settings import GatewaySettings
from slmops_gateway.sharing import Shared

GATEWAY = "gw-cohort-1"
CLASS = "x86-avx512-vnni"


class _PinnedRoot:
    """Stands in for the TUF client: the keys a pinned root vouches for."""

    def __init__(self, keys: TrustedKeys) -> None:
        self._keys = keys

    async def keys(self) -> TrustedKeys:
        return self._keys


def _pem(signer: AssignmentSigner) -> str:
    public = signer.private_key.public_key()
    raw = public.public_bytes(serialization.Encoding.PEM,
                              serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
    return raw.decode()


def _agent(signer: AssignmentSigner, tmp_path: Path, **fields: Any) -> Agent:
    settings = GatewaySettings(platform=PlatformSettings(), gateway_id=GATEWAY, device_class=CLASS)
    agent = Agent(settings, RegistryClient("http://127.0.0.1:9"),
                  generation_file=tmp_path / "generation", **fields)  # fmt: skip
    keys = TrustedKeys({KeyRole.ASSIGNMENTS: (TrustedKey.of(_pem(signer)),)})
    agent.trust = _PinnedRoot(keys)  # type: ignore[assignment]
    return agent


def _entry(device_class: str, generation: int = 3) -> CohortEntry:
    desired = DesiredModel(
        model_name="minilm", version="1.0.0", variant_id="v-1",
        manifest_digest="sha256:" + "a" * 64,
        artifact=ArtifactRef(digest="sha256:" + "b" * 64, size_bytes=10, uri="s3://b/x"),
    )  # fmt: skip
    return CohortEntry(rollout_id="ro-1", generation=generation, device_class=device_class,
                       desired=desired)  # fmt: skip


@pytest.fixture
def signer() -> AssignmentSigner:
    return AssignmentSigner(Ed25519PrivateKey.generate(), ttl_s=3600)


async def test_a_forged_high_generation_does_not_blind_the_gateway(
    signer: AssignmentSigner, tmp_path: Path
) -> None:
    agent = _agent(signer, tmp_path)
    cohort = cohort_of(GATEWAY)
    forged = CohortState(cohort=cohort, generation=10**18, entries=[])  # unsigned
    other_key = AssignmentSigner(Ed25519PrivateKey.generate()).sign_cohort(
        CohortState(cohort=cohort, generation=10**18 + 1, entries=[])
    )

    assert await agent.apply_cohort(forged) is None  # nothing for it: no report either
    assert await agent.apply_cohort(other_key) is None
    genuine = signer.sign_cohort(CohortState(cohort=cohort, generation=5,
                                             entries=[_entry("arm64-pi5")]))  # fmt: skip
    await agent.apply_cohort(genuine)

    # the refused states moved nothing; the genuine one counts, and outlives a restart
    assert agent.cohort_generation == 5
    assert _agent(signer, tmp_path).remembered_cohort_generation() == 5


async def test_shared_verdicts_are_per_state_not_per_generation_or_signature(
    signer: AssignmentSigner, tmp_path: Path
) -> None:
    verdicts: Shared[int, tuple[CohortState, str | None]] = Shared()
    first = _agent(signer, tmp_path / "a", cohort_verdicts=verdicts)
    second = _agent(signer, tmp_path / "b", cohort_verdicts=verdicts)
    cohort = cohort_of(GATEWAY)
    genuine = signer.sign_cohort(CohortState(cohort=cohort, generation=7,
                                             entries=[_entry("arm64-pi5")]))  # fmt: skip
    assert await first.apply_cohort(genuine) is None  # verified, nothing for its class

    # the same cohort, generation and signature, but an entry for this class slipped in
    altered = genuine.model_copy(update={"entries": [_entry(CLASS)]})
    report = await second.apply_cohort(altered)

    assert report is not None
    assert report.kind == "failed"
    assert "does not verify" in report.reason
    assert second.cohort_generation == -1
