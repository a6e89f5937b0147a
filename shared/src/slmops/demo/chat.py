"""The demo's talking gateway: one real gateway agent process beside the simulated fleet.

The simulated gateways run the real agent code but simulate the device (no model is loaded).
This one is the gateway service itself (``python -m slmops_gateway``) on a free 127.0.0.1 port,
of the class this host stands for and labelled like the chat app's gateways, so the SmolLM2
rollout installs the variant on it through the real path (verify, download, load, smoke test,
swap). Once it serves, the demo asks it one question over its OpenAI-compatible API and prints
the answer as it streams, with the time to first token and decode tokens/s the client saw.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from slmops import hostinfo
from slmops.auth import local_credentials
from slmops.cli.common import cli_auth
from slmops.stack.identities import enroll_gateway

QUESTION = "What is the capital of France? Answer in one short sentence."


@dataclass
class ChatGateway:
    gateway_id: str
    device_class: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM by PID, then SIGKILL if it lingers (never a pattern kill)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def host_class() -> str:
    """The demo's device class this host can serve for real."""
    return "x86-avx512-vnni" if hostinfo.arch() == "x86_64" else "arm64-pi5"


async def start_chat_gateway(
    *, run_id: str, app: str, nats_url: str, registry_url: str, var_dir: Path
) -> ChatGateway:
    """The gateway process, registered and ready (its /readyz answers 200)."""
    gateway_id = f"demo-{run_id}-talker"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    enrolled = enroll_gateway(var_dir, gateway_id, host_class())
    env = {
        **os.environ,
        "SLMOPS_NATS_URL": nats_url,
        "SLMOPS_GATEWAY_GATEWAY_ID": gateway_id,
        "SLMOPS_GATEWAY_DEVICE_CLASS": host_class(),
        "SLMOPS_GATEWAY_LABELS": json.dumps({"app": app, "run": run_id}),
        "SLMOPS_GATEWAY_HOST": "127.0.0.1",
        "SLMOPS_GATEWAY_PORT": str(port),
        "SLMOPS_GATEWAY_REGISTRY_URL": registry_url,
        "SLMOPS_GATEWAY_INTRA_OP_THREADS": str(min(2, os.cpu_count() or 1)),
        "SLMOPS_GATEWAY_HEALTH_INTERVAL_S": "3",
        # Its own identity, enrolled: a gateway token for its class and its own NATS user.
        "SLMOPS_AUTH_TOKEN_FILE": str(enrolled.token_file),
        "SLMOPS_NATS_NKEY_FILE": str(enrolled.nkey_file),
        "SLMOPS_GATEWAY_TRUST_ROOT_FILE": str(enrolled.trust_root_file),
        "SLMOPS_AUTH_KEYS_FILE": str(local_credentials(var_dir).keys_file),
    }
    log_path = var_dir / "logs" / f"{gateway_id}.log"
    process = _spawn(env, log_path)  # starts at once; readiness is awaited below
    url = f"http://127.0.0.1:{port}"
    gateway = ChatGateway(gateway_id, env["SLMOPS_GATEWAY_DEVICE_CLASS"], url, process, log_path)
    deadline = time.monotonic() + 90
    async with httpx.AsyncClient(timeout=2.0) as http:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the chat gateway exited: see {log_path}")
            try:
                if (await http.get(f"{gateway.url}/readyz")).status_code == 200:
                    return gateway
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                gateway.stop()
                raise RuntimeError(f"the chat gateway did not become ready: see {log_path}")
            await asyncio.sleep(0.5)


async def until_serving(gateway: ChatGateway, variant_id: str, timeout_s: float = 120.0) -> None:
    """Until the gateway's active slot holds ``variant_id`` (installed and smoke-tested)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5.0, auth=cli_auth()) as http:
        while time.monotonic() < deadline:
            try:
                slots = (await http.get(f"{gateway.url}/v1/slots")).json()
            except (httpx.HTTPError, ValueError):
                slots = {}
            if (slots.get("active") or {}).get("variant_id") == variant_id:
                return
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{gateway.gateway_id} did not install {variant_id}: see {gateway.log_path}")


def _spawn(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "slmops_gateway"], env=env, stdout=log, stderr=log
        )


async def ask(gateway: ChatGateway, console: Console, question: str = QUESTION) -> dict[str, Any]:
    """One streamed chat (greedy), printed as it arrives; the client-side timings."""
    body = {
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 64,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    console.print(f"chat with {gateway.gateway_id} ({gateway.url}/v1/chat/completions)")
    console.print(f"> {question}", markup=False)
    started = time.perf_counter()
    first = last = None
    text: list[str] = []
    usage: dict[str, Any] = {}
    async with (
        httpx.AsyncClient(timeout=120.0) as http,
        http.stream("POST", f"{gateway.url}/v1/chat/completions", json=body) as answer,
    ):
        if answer.status_code != 200:
            raise RuntimeError(f"the gateway answered {answer.status_code}")
        async for line in answer.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece:
                    first = first or time.perf_counter()
                    last = time.perf_counter()
                    text.append(piece)
                    console.print(piece, end="", markup=False, highlight=False)
    console.print()
    tokens = int(usage.get("completion_tokens", 0))
    ttft_ms = ((first or started) - started) * 1000
    decode_s = (last - first) if first and last else 0.0
    rate = (tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else None
    console.print(
        f"time to first token {ttft_ms:.0f} ms, {tokens} tokens"
        + (f", {rate:.1f} tokens/s after the first" if rate else "")
        + " (measured by this client over HTTP)"
    )
    return {"question": question, "answer": "".join(text), "ttft_ms": ttft_ms,
            "completion_tokens": tokens, "decode_tokens_per_s": rate}  # fmt: skip
