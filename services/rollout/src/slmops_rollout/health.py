"""Each gateway's latest health aggregate, indexed by the model it is about.

A wave's health gate reads the gateways running the variants being rolled out, every tick: kept
per variant, that costs what the rollout has reached, not the whole fleet (the ticker used to
walk every gateway's health, 100,000 entries a tick on a fleet of that size).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from slmops.events.payloads import HealthAggregate


class LatestHealth:
    """``put`` each health report's aggregate; ``on(variants)`` the latest of those running them."""

    def __init__(self) -> None:
        self._variant_of: dict[str, str | None] = {}
        self._by_variant: dict[str | None, dict[str, HealthAggregate]] = {}

    def __len__(self) -> int:
        return len(self._variant_of)

    def put(self, gateway_id: str, variant_id: str | None, aggregate: HealthAggregate) -> None:
        """The gateway's newest aggregate, about ``variant_id``; its older one (maybe about the
        model it ran before) is gone."""
        before = self._variant_of.get(gateway_id, variant_id)
        if before != variant_id:
            older = self._by_variant[before]
            del older[gateway_id]
            if not older:
                del self._by_variant[before]
        self._variant_of[gateway_id] = variant_id
        self._by_variant.setdefault(variant_id, {})[gateway_id] = aggregate

    def on(self, variant_ids: Iterable[str]) -> Iterator[tuple[str, HealthAggregate]]:
        """(gateway id, its latest aggregate) of each gateway whose latest is about one of
        ``variant_ids``."""
        for variant_id in set(variant_ids):
            yield from self._by_variant.get(variant_id, {}).items()
