"""The cost of the zero-trust checks, each beside what the same step cost without it, one run.

* rollout service, per assignment: the desired state serialized (before) vs signed and
  serialized (now: the statement, Ed25519);
* gateway, per assignment: the assignment parsed (before) vs parsed and its statement checked
  against the trust root's keys (now);
* gateway, per manifest: the Ed25519 check with the one key it was given (before) vs the key
  looked up by id in the trust root's keys.json first (now);
* gateway, the trust root itself: a cold TUF refresh (first start: root chain, timestamp,
  snapshot, targets, keys.json) and a warm one (what every ``trust_refresh_s`` costs), through
  real HTTP on 127.0.0.1 (a plain file server: the registry's route only reads the same files).

Rounds alternate before/now so machine noise hits both alike; medians per operation.
"""

from __future__ import annotations

import functools
import http.server
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.assignments import AssignmentSigner, check_statement
from slmops.events.payloads import ArtifactRef, DesiredModel, GatewayAssignment
from slmops.manifests import Manifest, sign_manifest, verify_manifest
from slmops.trust import KeyRole, TrustedKey, TrustedKeys
from slmops.trust.client import TRUST_PATH, TrustClient
from slmops.trust.repository import TrustRepository

ROUNDS = 5
BATCH = 2000  # operations per round and side
DIGEST = "sha256:" + "d" * 64


def _pem(key: Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _per_op_us(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    for _ in range(BATCH):
        fn()
    return (time.perf_counter() - started) / BATCH * 1e6


def _pairs(before: Callable[[], object], now: Callable[[], object]) -> tuple[float, float]:
    b, n = [], []
    for _ in range(ROUNDS):
        b.append(_per_op_us(before))
        n.append(_per_op_us(now))
    return statistics.median(b), statistics.median(n)


def _assignment(generation: int = 1) -> GatewayAssignment:
    desired = DesiredModel(
        model_name="minilm", version="1.1.0", variant_id="v-1", manifest_digest=DIGEST,
        artifact=ArtifactRef(digest=DIGEST, size_bytes=90_000_000, uri="s3://slmops/blobs/x"),
    )  # fmt: skip
    return GatewayAssignment(gateway_id="gw-00001", generation=generation, rollout_id="r-1",
                             desired=desired)  # fmt: skip


def _manifest_signer() -> tuple[object, str]:
    from slmops_registry.signing import RegistrySigner

    key = Ed25519PrivateKey.generate()
    return RegistrySigner(key), _pem(key)


def _refresh_ms(tmp: Path) -> tuple[float, float]:
    repository = TrustRepository(tmp / "repo")
    repository.init(TrustedKeys({KeyRole.MANIFESTS: (TrustedKey.of(_pem(
        Ed25519PrivateKey.generate())),)}))  # fmt: skip

    class Handler(http.server.SimpleHTTPRequestHandler):
        def translate_path(self, path: str) -> str:
            return str(repository.root_dir / path.removeprefix(TRUST_PATH + "/"))

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    cold, warm = [], []
    try:
        for round_ in range(ROUNDS):
            client = TrustClient(repository.root_file, tmp / f"cache-{round_}", url)
            started = time.perf_counter()
            client.refresh()
            cold.append((time.perf_counter() - started) * 1e3)
            started = time.perf_counter()
            client.refresh()
            warm.append((time.perf_counter() - started) * 1e3)
    finally:
        server.shutdown()
        server.server_close()
    return statistics.median(cold), statistics.median(warm)


def main() -> None:
    signer = AssignmentSigner(Ed25519PrivateKey.generate())
    keys = TrustedKeys({KeyRole.ASSIGNMENTS: (TrustedKey.of(_pem(signer.private_key)),)})
    assignment = _assignment()
    signed_json = signer.sign(assignment).model_dump_json()
    plain_json = assignment.model_dump_json()

    sign = _pairs(assignment.model_dump_json, lambda: signer.sign(assignment).model_dump_json())
    check = _pairs(
        lambda: GatewayAssignment.model_validate_json(plain_json),
        lambda: check_statement(GatewayAssignment.model_validate_json(signed_json), keys,
                                "gw-00001"),
    )  # fmt: skip
    manifest_signer, manifest_pem = _manifest_signer()
    manifest = Manifest(
        kind="model", model_name="minilm", version="1.1.0", format="onnx",
        task="feature-extraction", artifact=assignment.desired.artifact, created_by="bench",
    )  # fmt: skip
    signed_manifest = sign_manifest(manifest, manifest_signer)  # type: ignore[arg-type]
    manifest_keys = TrustedKeys({KeyRole.MANIFESTS: (TrustedKey.of(manifest_pem),)})
    lookup = _pairs(
        lambda: verify_manifest(signed_manifest, manifest_pem),
        lambda: verify_manifest(signed_manifest, manifest_keys.key(
            KeyRole.MANIFESTS, signed_manifest.signature.key_id)),
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="slmops-bench-trust-") as name:
        cold_ms, warm_ms = _refresh_ms(Path(name))

    print(f"\nZero-trust checks: median per operation of {ROUNDS} alternating rounds of "
          f"{BATCH}, 1 thread")  # fmt: skip
    print("| step | before (µs) | now (µs) | now / before |")
    print("|---|---:|---:|---:|")
    for label, (before, now) in (
        ("rollout: an assignment serialized / signed + serialized", sign),
        ("gateway: an assignment parsed / parsed + statement checked", check),
        ("gateway: a manifest verified with its key / key looked up in keys.json", lookup),
    ):
        print(f"| {label} | {before:,.1f} | {now:,.1f} | {now / before:.2f} |")
    print(f"| gateway: TUF refresh, cold (first start) / warm (every trust_refresh_s) | "
          f"{cold_ms * 1000:,.0f} | {warm_ms * 1000:,.0f} | - |")  # fmt: skip


if __name__ == "__main__":
    main()
