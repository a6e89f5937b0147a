"""Registry upload and download against raw boto3 on the same S3 server, plus delta sizes.

One run starts a real ``nats-server``, a real ``nanio`` S3 server and the real registry service
(a subprocess, as the local stack runs it) on free 127.0.0.1 ports, then compares on the SAME
file and the SAME S3 server:

* upload: raw ``boto3 upload_file`` (8 MiB multipart parts, concurrency 4: the transfer config
  of :class:`~slmops.objectstore.ObjectStore`) vs ``POST /v1/blobs`` streamed with httpx
  (1 MiB chunks, ``Content-Length``, ``X-Expected-Digest``), which the registry spools, hashes,
  then stores with that same transfer config. The first 32 bytes change every round on both
  sides, so the registry's content dedupe never skips a store. The client computes the digest
  before the clock starts (a publisher knows it from building the artifact);
* download: raw ``boto3 download_file`` (ranged GETs, same config) vs what a gateway does:
  ``GET /v1/blobs/{digest}/url``, then one streaming GET of the presigned URL, written to a file
  while hashed and verified against the digest;
* delta: a synthetic 40-tensor model and a variant with 10% of its tensors replaced; the bytes a
  gateway holding the first fetches for the second (``chunk_file`` + ``plan_fetch``), with the
  tensor starts as forced chunk boundaries and without.

Rounds alternate raw/registry so machine noise hits both alike; the table shows medians and the
ratio slmops / raw. Nothing is asserted: targets are printed beside the figures.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from slmops.auth import BearerToken, ensure_local_credentials
from slmops.chunking import ChunkManifest, chunk_file, plan_fetch
from slmops.objectstore import ObjectStore
from slmops.settings import LOCAL_S3_ACCESS_KEY, LOCAL_S3_SECRET_KEY
from slmops.stack.binaries import venv_binary
from slmops.testing.natsserver import NatsServerProcess

MB = 1_000_000
MIB = 1024 * 1024
HOST = "127.0.0.1"
ROUNDS = 3
SIZE_BYTES = int(os.environ.get("SLMOPS_BENCH_MB", "200")) * MB
BUCKET = "slmops-bench"
REGION = "us-east-1"
TRANSFER = TransferConfig(
    multipart_threshold=8 * MIB, multipart_chunksize=8 * MIB, max_concurrency=4
)
N_TENSORS, TENSOR_BYTES, N_CHANGED = 40, 1 * MB, 4  # a ~40 MB model; 4 of 40 tensors change
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Processes:
    """Child processes started by this bench, stopped by PID in reverse start order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.log_dir / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
            )
        self.procs.append((name, proc))
        return proc

    def log_tail(self, name: str, chars: int = 2000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def wait_ready(self, name: str, url: str, ok: Callable[[int], bool]) -> None:
        proc = dict(self.procs)[name]
        deadline, last = time.monotonic() + READY_TIMEOUT_S, "no answer"
        with httpx.Client(timeout=2, trust_env=False) as client:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}"
                    )
                try:
                    status = client.get(url).status_code
                    if ok(status):
                        return
                    last = f"HTTP {status}"
                except httpx.TransportError as exc:
                    last = f"{type(exc).__name__}"
                time.sleep(0.1)
        raise TimeoutError(f"{name} not ready at {url} ({last}):\n{self.log_tail(name)}")

    def stop_all(self) -> None:
        while self.procs:
            _name, proc = self.procs.pop()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def write_random_file(path: Path, size: int) -> None:
    with path.open("wb") as f:
        left = size
        while left:
            n = min(MIB, left)
            f.write(os.urandom(n))
            left -= n


def remark(path: Path, tag: str) -> str:
    """Make the file's content new (first 32 bytes: ``tag`` + random); answer its digest."""
    head = tag.encode()[:16].ljust(16, b"\0") + os.urandom(16)
    with path.open("r+b") as f:
        f.write(head)
    return file_digest(path)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(MIB):
            yield chunk


def raw_upload(s3: Any, path: Path, key: str) -> float:
    start = time.perf_counter()
    s3.upload_file(str(path), BUCKET, key, Config=TRANSFER)
    return path.stat().st_size / MB / (time.perf_counter() - start)


def registry_upload(client: httpx.Client, base: str, path: Path, digest: str) -> float:
    size = path.stat().st_size
    headers = {"Content-Length": str(size), "X-Expected-Digest": digest}
    start = time.perf_counter()
    response = client.post(f"{base}/v1/blobs", content=file_chunks(path), headers=headers)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    body = response.json()
    if body["digest"] != digest or body["size_bytes"] != size:
        raise RuntimeError(f"registry stored {body}, expected {digest} of {size} bytes")
    return size / MB / elapsed


def raw_download(s3: Any, key: str, dest: Path) -> float:
    start = time.perf_counter()
    s3.download_file(BUCKET, key, str(dest), Config=TRANSFER)
    elapsed = time.perf_counter() - start
    size = dest.stat().st_size
    dest.unlink()
    return size / MB / elapsed


def gateway_download(client: httpx.Client, base: str, digest: str, dest: Path) -> float:
    start = time.perf_counter()
    answer = client.get(f"{base}/v1/blobs/{digest}/url")
    answer.raise_for_status()
    h, size = hashlib.sha256(), 0
    with client.stream("GET", answer.json()["url"]) as response, dest.open("wb") as f:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            h.update(chunk)
            f.write(chunk)
            size += len(chunk)
    elapsed = time.perf_counter() - start
    dest.unlink()
    if (actual := "sha256:" + h.hexdigest()) != digest:
        raise RuntimeError(f"downloaded blob hashes to {actual}, not {digest}")
    return size / MB / elapsed


def delta(tmp: Path) -> dict[str, tuple[int, int]]:
    """{"boundaries" | "plain": (bytes fetched for variant B holding A, B's size)}."""
    rng = random.Random(7)
    model_a = rng.randbytes(N_TENSORS * TENSOR_BYTES)
    model_b = bytearray(model_a)
    for i in sorted(rng.sample(range(N_TENSORS), N_CHANGED)):
        model_b[i * TENSOR_BYTES : (i + 1) * TENSOR_BYTES] = rng.randbytes(TENSOR_BYTES)
    path_a, path_b = tmp / "model-a.bin", tmp / "model-b.bin"
    path_a.write_bytes(model_a)
    path_b.write_bytes(model_b)
    starts = [i * TENSOR_BYTES for i in range(N_TENSORS)]
    result = {}
    for label, boundaries in (("boundaries", starts), ("plain", [])):
        have: ChunkManifest = chunk_file(path_a, boundaries=boundaries)
        want: ChunkManifest = chunk_file(path_b, boundaries=boundaries)
        plan = plan_fetch(want, (c.digest for c in have.chunks))
        result[label] = (plan.fetch_bytes, plan.total_bytes)
    path_a.unlink()
    path_b.unlink()
    return result


def measure(tmp: Path, procs: Processes) -> dict[str, list[float]]:
    nats = NatsServerProcess(tmp / "nats")
    nats.start()
    try:
        return measure_with_nats(tmp, procs, nats.url)
    finally:
        procs.stop_all()  # the registry before the servers it talks to
        nats.stop()


def measure_with_nats(tmp: Path, procs: Processes, nats_url: str) -> dict[str, list[float]]:
    s3_port, registry_port = free_port(), free_port()
    s3_url, base = f"http://{HOST}:{s3_port}", f"http://{HOST}:{registry_port}"
    procs.start(
        "nanio",
        [
            str(venv_binary("nanio")),
            *("serve", "--host", HOST, "--port", str(s3_port)),
            *("--data-dir", str(tmp / "s3"), "--region", REGION),
            *("--log-level", "warning", "--no-access-log"),
        ],
        {"NANIO_ACCESS_KEY": LOCAL_S3_ACCESS_KEY, "NANIO_SECRET_KEY": LOCAL_S3_SECRET_KEY},
    )
    procs.wait_ready("nanio", f"{s3_url}/", lambda _status: True)  # 403 unsigned is an answer
    store = ObjectStore(s3_url, REGION, BUCKET, LOCAL_S3_ACCESS_KEY, LOCAL_S3_SECRET_KEY)
    store.ensure_bucket()
    store.close()
    creds = ensure_local_credentials(tmp / "var")  # the registry verifies with its keys
    procs.start(
        "registry",
        [sys.executable, "-m", "slmops_registry"],
        {
            "SLMOPS_ENV": "local",
            "SLMOPS_NATS_URL": nats_url,
            "SLMOPS_S3_ENDPOINT_URL": s3_url,
            "SLMOPS_S3_ACCESS_KEY_ID": LOCAL_S3_ACCESS_KEY,
            "SLMOPS_S3_SECRET_ACCESS_KEY": LOCAL_S3_SECRET_KEY,
            "SLMOPS_S3_BUCKET": BUCKET,
            "SLMOPS_VAR_DIR": str(tmp / "var"),
            "SLMOPS_REGISTRY_HOST": HOST,
            "SLMOPS_REGISTRY_PORT": str(registry_port),
        },
    )
    procs.wait_ready("registry", f"{base}/readyz", lambda status: status == 200)

    session = boto3.session.Session(
        aws_access_key_id=LOCAL_S3_ACCESS_KEY,
        aws_secret_access_key=LOCAL_S3_SECRET_KEY,
        region_name=REGION,
    )
    s3 = session.client(
        "s3",
        endpoint_url=s3_url,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    path, dest = tmp / "payload.bin", tmp / "download.bin"
    write_random_file(path, SIZE_BYTES)
    results: dict[str, list[float]] = {k: [] for k in ("raw_up", "reg_up", "raw_down", "reg_down")}
    raw_key, digest = "", ""
    timeout = httpx.Timeout(300.0, connect=10.0)
    auth = BearerToken(creds.token("admin"))
    with httpx.Client(timeout=timeout, trust_env=False, auth=auth) as client:
        for i in range(ROUNDS):
            remark(path, f"raw-{i}")  # same preparation as the registry side
            raw_key = f"raw/{i}"
            results["raw_up"].append(raw_upload(s3, path, raw_key))
            digest = remark(path, f"registry-{i}")
            results["reg_up"].append(registry_upload(client, base, path, digest))
        path.unlink()
        for _ in range(ROUNDS):  # the last upload of each side, same size and server
            results["raw_down"].append(raw_download(s3, raw_key, dest))
            results["reg_down"].append(gateway_download(client, base, digest, dest))
    s3.close()
    return results


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="slmops-bench-") as name:
        tmp = Path(name)
        deltas = delta(tmp)
        results = measure(tmp, Processes(tmp))  # stops every process it started
    med = {k: statistics.median(v) for k, v in results.items()}
    print(
        f"\nRegistry throughput: {SIZE_BYTES // MB} MB file, one nanio S3 server, "
        f"median of {ROUNDS} alternating rounds"
    )
    print("| measurement | raw boto3 | slmops | ratio / figure | target |")
    print("|---|---:|---:|---:|---|")
    for label, raw, ours in (
        ("upload MB/s (POST /v1/blobs vs upload_file)", med["raw_up"], med["reg_up"]),
        (
            "download MB/s (presigned URL + sha256 vs download_file)",
            med["raw_down"],
            med["reg_down"],
        ),
    ):
        target = ">= 0.8" if label.startswith("upload") else "-"
        print(f"| {label} | {raw:,.0f} | {ours:,.0f} | {ours / raw:.2f} | {target} |")
    for label, key, target in (
        (f"delta bytes, {N_CHANGED}/{N_TENSORS} tensors changed (fetched / full)", "boundaries",
         "<= 15 %"),
        ("delta without tensor boundaries", "plain", "-"),
    ):  # fmt: skip
        fetched, full = deltas[key]
        print(
            f"| {label} | {full / MB:.1f} MB | {fetched / MB:.1f} MB "
            f"| {100 * fetched / full:.1f} % | {target} |"
        )


if __name__ == "__main__":
    main()
