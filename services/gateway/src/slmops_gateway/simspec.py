"""What a simulated fleet is (:class:`FleetSpec`): how many gateways, their classes, labels and
faults, how the field differs from the host, which part of the fleet a process simulates, and
how its wave reports travel; and the exact, reproducible layout of its gateways."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Literal

Fault = Literal["download", "smoke", "latency", "shadow", "silent"]
FAULTS: tuple[Fault, ...] = ("download", "smoke", "latency", "shadow", "silent")


@dataclass(frozen=True)
class FleetSpec:
    """What to simulate: how many gateways, their classes and labels, which faults."""

    count: int
    classes: dict[str, float] = field(default_factory=lambda: {"x86-avx512-vnni": 1.0})
    labels: dict[str, list[str]] = field(default_factory=dict)
    faults: dict[Fault, float] = field(default_factory=dict)
    prefix: str = "sim"
    seed: int = 0
    field_slowdown: dict[str, float] = field(default_factory=dict)  # class -> time factor
    input_shift: dict[str, float] = field(default_factory=dict)  # class -> baseline SDs
    legacy: float = 0.0  # share of gateways speaking only the per-gateway protocol
    part: int = 0  # this process simulates the gateways whose index % parts == part
    parts: int = 1  # processes sharing the fleet (each its own connection and consumer)
    site_reports: bool = False  # wave reports sent as one site's batches (``sitereports``)
    relay: bool = False  # wave reports through the site's relay process (``relay``)

    @property
    def site(self) -> str:
        """This process's name as a site (and its assignment consumer's)."""
        return f"fleetsim-{self.prefix}" + (f"-{self.part}" if self.parts > 1 else "")

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"count must be at least 1, not {self.count}")
        if self.parts < 1 or not 0 <= self.part < self.parts:
            raise ValueError(f"part {self.part} of {self.parts}: parts >= 1, 0 <= part < parts")
        if self.site_reports and self.relay:
            raise ValueError("a site's batches are made here (site_reports) or by its relay")
        if not 0 <= self.legacy <= 1:
            raise ValueError(f"the legacy share must be within 0..1, not {self.legacy}")
        unknown = sorted(set(self.faults) - set(FAULTS))
        if unknown:
            raise ValueError(f"unknown faults {unknown}: known are {', '.join(FAULTS)}")
        if sum(self.faults.values()) > 1 or min(self.faults.values(), default=0) < 0:
            raise ValueError(f"fault shares must be >= 0 and add up to at most 1: {self.faults}")
        if not self.classes or min(self.classes.values()) <= 0:
            raise ValueError(f"class shares must be positive: {self.classes}")
        for what, factors in (("field slowdown", self.field_slowdown),
                              ("input shift", self.input_shift)):  # fmt: skip
            if strangers := sorted(set(factors) - set(self.classes)):
                raise ValueError(f"the {what} names classes not in the fleet: {strangers}")
        if any(not (math.isfinite(v) and v > 0) for v in self.field_slowdown.values()):
            raise ValueError(f"field slowdowns must be positive factors: {self.field_slowdown}")
        if any(not (math.isfinite(v) and v >= 0) for v in self.input_shift.values()):
            raise ValueError(f"input shifts must be at least 0 (standard deviations): "
                             f"{self.input_shift}")  # fmt: skip

    def layout(self) -> list[tuple[str, str, dict[str, str], Fault | None]]:
        """(gateway id, class, labels, fault) per gateway: exact shares, spread by the seed."""
        ids = [f"{self.prefix}-{i:06d}" for i in range(self.count)]
        total = sum(self.classes.values())
        classes: list[str] = []
        for name, share in self.classes.items():
            classes += [name] * round(self.count * share / total)
        classes = (classes + [next(iter(self.classes))] * self.count)[: self.count]
        faults: list[Fault | None] = []
        for fault, share in self.faults.items():
            faults += [fault] * round(self.count * share)
        faults = (faults + [None] * self.count)[: self.count]
        rng = random.Random(self.seed)  # noqa: S311 - a reproducible layout, not crypto
        rng.shuffle(classes)
        rng.shuffle(faults)
        return [
            (gid, classes[i], {k: v[i % len(v)] for k, v in self.labels.items()}, faults[i])
            for i, gid in enumerate(ids)
        ]
