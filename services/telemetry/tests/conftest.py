"""Health reports as gateways send them (histograms, sums, drift signatures), built from
known samples so a test can pool the samples itself and compare."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from slmops.events.envelope import CloudEvent, event_model
from slmops.events.payloads import GatewayReport, HealthAggregate
from slmops.telemetry import DriftSignature, Sketch, embedding_moments, token_logprobs

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC).timestamp()  # a window boundary (30 s)
DIMS = 32


@dataclass
class Samples:
    """What one gateway measured in one window (what never leaves the device)."""

    latency_ms: np.ndarray
    ttft_ms: np.ndarray
    embeddings: np.ndarray
    logprobs: np.ndarray
    errors: int = 0


_SAMPLE_ARGS = {"requests", "latency_ms", "ttft_ms", "shift", "nll_scale", "errors", "sigma"}


class ReportMaker:
    t0 = T0

    def __init__(self, seed: int = 7) -> None:
        self.rng = np.random.default_rng(seed)

    def at(self, window: int, second: float = 1.0) -> float:
        """Epoch seconds ``second`` into window ``window`` counted from :attr:`t0`."""
        return T0 + window * 30.0 + second

    def window(
        self, window: int, gateways: int = 20, **kwargs: Any
    ) -> list[CloudEvent[GatewayReport]]:
        """One report per gateway in window ``window``, spread over it."""
        sample_args = {k: kwargs.pop(k) for k in list(kwargs) if k in _SAMPLE_ARGS}
        return [self.report(f"gw-{g}", self.at(window, 1 + g * 28.0 / gateways),
                            self.samples(**sample_args), **kwargs)
                for g in range(gateways)]  # fmt: skip

    def samples(
        self, *, requests: int = 40, latency_ms: float = 20.0, ttft_ms: float = 80.0,
        shift: float = 0.0, nll_scale: float = 1.0, errors: int = 0, sigma: float = 0.25,
    ) -> Samples:  # fmt: skip
        rng = self.rng
        embeddings = rng.standard_normal((requests, DIMS))
        embeddings[:, 0] += shift * 3.0  # a moved input distribution moves the embeddings
        return Samples(
            latency_ms=rng.lognormal(math.log(latency_ms), sigma, requests),
            ttft_ms=rng.lognormal(math.log(ttft_ms), sigma, requests),
            embeddings=embeddings,
            logprobs=-rng.exponential(nll_scale, requests * 10),
            errors=errors,
        )

    def report(
        self, gateway: str, at: float, samples: Samples, *, variant_id: str = "v-a",
        device_class: str = "arm64-pi5", labels: dict[str, str] | None = None,
        model: str | None = "m", version: str | None = "1.0.0", event_id: str | None = None,
        peak_memory_mb: float = 300.0,
    ) -> CloudEvent[GatewayReport]:  # fmt: skip
        n = len(samples.latency_ms)
        health = HealthAggregate(
            window_s=30.0, request_count=n, error_rate=samples.errors / n if n else 0.0,
            latency_ms=Sketch.from_values(samples.latency_ms.tolist()).to_wire(),
            ttft_ms=Sketch.from_values(samples.ttft_ms.tolist()).to_wire(),
            decode_tokens=len(samples.logprobs), decode_s=len(samples.logprobs) / 25.0,
            peak_memory_mb=peak_memory_mb,
            drift=DriftSignature(embedding=embedding_moments(samples.embeddings),
                                 logprobs=token_logprobs(samples.logprobs.tolist())),
        )  # fmt: skip
        data = GatewayReport(gateway_id=gateway, kind="health", device_class=device_class,
                             labels=labels or {}, variant_id=variant_id, health=health,
                             model_name=model, version=version)  # fmt: skip
        return event_model(GatewayReport)(
            id=event_id or str(uuid.uuid4()), source="/slmops/gateway", type=data.event_type,
            time=datetime.fromtimestamp(at, UTC), data=data,
        )  # fmt: skip


@pytest.fixture
def maker() -> ReportMaker:
    return ReportMaker()
