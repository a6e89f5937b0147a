"""The validator's family: variants judged, by verdict and device class, from its KV records."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from slmops.service.metrics import ServiceMetrics
from slmops_validator.metrics import register


@dataclass
class Entry:
    value: bytes


class FakeKv:
    def __init__(self, records: dict[str, Any]) -> None:
        self.records = records

    async def keys(self) -> list[str]:
        return [*self.records, "optimizer.job-1", "validator.tally.m.1"]  # not verdicts

    async def get(self, key: str) -> Entry:
        return Entry(json.dumps(self.records[key]).encode())


@dataclass
class FakeContext:
    kv: FakeKv

    async def state(self) -> FakeKv:
        return self.kv


def _verdict(verdict: str, device_class: str) -> dict[str, Any]:
    return {"verdict": verdict, "outcome": {"device_class": device_class, "variant_id": "v"}}


async def test_verdicts_are_counted_per_variant_by_verdict_and_class() -> None:
    kv = FakeKv({
        "validator.variant.v-1": _verdict("passed", "cpu"),
        "validator.variant.v-2": _verdict("passed", "cpu"),
        "validator.variant.v-3": _verdict("failed", "cpu"),
        "validator.variant.v-4": _verdict("passed", "npu"),
    })  # fmt: skip
    metrics = ServiceMetrics("validator")
    context: Any = FakeContext(kv)
    register(metrics, context)
    text = (await metrics.render()).decode()
    value = metrics.registry.get_sample_value

    assert value("slmops_validations", {"verdict": "passed", "device_class": "cpu"}) == 2
    assert value("slmops_validations", {"verdict": "failed", "device_class": "cpu"}) == 1
    assert value("slmops_validations", {"verdict": "passed", "device_class": "npu"}) == 1
    assert "v-1" not in text
