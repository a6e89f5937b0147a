"""The gateway's OpenAI-compatible API as a benchmark runtime: a real gateway app served by
uvicorn on 127.0.0.1 in this process, the variant loaded into its active slot (the agent's
NATS side is not needed to serve), requests streamed by an HTTP client in this process.

What it adds over the in-process runtime is the API's cost: prompt handling, the worker thread
and queue, server-sent events, HTTP on loopback. TTFT is measured to the first streamed chunk
with text; decode tokens/s from the usage the last chunk reports and the chunks' arrival.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any


class HttpRuntime:
    def __init__(self, model: str, threads: int, scratch: str) -> None:
        import httpx
        import uvicorn

        from slmops.settings import PlatformSettings
        from slmops_gateway.app import create_app
        from slmops_gateway.settings import GatewaySettings
        from slmops_gateway.slots import SessionOptions, load

        port = _free_port()
        # No NATS here: the agent's background connection retries quietly; serving needs none.
        platform = PlatformSettings(nats_url="nats://127.0.0.1:1", var_dir=Path(scratch))
        settings = GatewaySettings(
            platform=platform, host="127.0.0.1", port=port, intra_op_threads=threads,
            models_dir=Path(scratch), log_level="warning",
        )  # fmt: skip
        app = create_app(settings)
        options = SessionOptions(intra_op_threads=threads)
        loaded = load(Path(model), "bench", "1", options, model_name="bench",
                      runtime_dir=Path(scratch) / "runtime")  # fmt: skip
        app.state.agent.slots.swap_in(loaded)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        threading.Thread(target=self.server.run, daemon=True).start()
        self.url = f"http://127.0.0.1:{port}/v1/completions"
        self.client = httpx.Client(timeout=120.0)
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway app did not start")
            time.sleep(0.05)

    def generate(self, prompt: list[int], max_new_tokens: int) -> dict[str, Any]:
        body = {"prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        started = time.perf_counter()
        first = last = None
        usage: dict[str, Any] = {}
        text: list[str] = []
        with self.client.stream("POST", self.url, json=body) as answer:
            answer.raise_for_status()
            for line in answer.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    if choice.get("text"):
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        text.append(choice["text"])
        tokens = int(usage.get("completion_tokens", 0))
        decode_s = (last - first) if first and last else 0.0
        return {
            "tokens": [],  # the API streams text; agreement is measured in process
            "text": "".join(text),
            "ttft_ms": ((first or started) - started) * 1000,
            "decode_tokens_per_s": (tokens - 1) / decode_s if decode_s > 0 else None,
        }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
