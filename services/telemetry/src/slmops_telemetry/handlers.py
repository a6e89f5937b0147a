"""The telemetry service's handlers: fold a batch of reports; look for findings and publish
each once."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping, MutableSet, Sequence
from typing import Any

from slmops.events.envelope import CloudEvent
from slmops.events.payloads import FleetDriftDetected, FleetRegressionDetected, GatewayReport
from slmops.events.registry import decoder_for
from slmops_telemetry.detect import DetectionSettings, find_drifts, find_regressions
from slmops_telemetry.expectations import Expectations
from slmops_telemetry.view import FleetView

Finding = FleetRegressionDetected | FleetDriftDetected
#: (variant id, device class) -> what it is judged against; a mapping, or a function (sync or
#: async) asked per pair.
ExpectationsSource = (
    Mapping[tuple[str, str], Expectations]
    | Callable[[str, str], Awaitable[Expectations | None] | Expectations | None]
)
#: A gateway report, validated by its own model; anything else as ``decode_event`` does.
decode_report = decoder_for(GatewayReport)


def on_reports(events: Sequence[CloudEvent[Any]], view: FleetView) -> None:
    """One batch of the fleet stream folded into the view (non-health reports are skipped)."""
    view.fold(events)


async def detect_once(
    view: FleetView, expectations_source: ExpectationsSource, settings: DetectionSettings,
    publish: Callable[[Finding], Awaitable[None]], seen: MutableSet[str],
    now: float | None = None,
) -> list[Finding]:  # fmt: skip
    """Every finding of the view at ``now`` (epoch seconds; default the view's watermark) not
    in ``seen`` is published and added to it; returns those published. ``seen`` may be a set
    restored from KV: the ids are deterministic, so a restarted service does not repeat one."""
    expectations: dict[tuple[str, str], Expectations] = {}
    for pair in view.pairs():
        expected = await _expected(expectations_source, pair)
        if expected is not None:
            expectations[pair] = expected
    findings: list[Finding] = [*find_regressions(view, expectations, settings, now),
                               *find_drifts(view, expectations, settings, now)]  # fmt: skip
    published = []
    for finding in findings:
        if finding.detection_id in seen:
            continue
        await publish(finding)
        seen.add(finding.detection_id)
        published.append(finding)
    return published


async def _expected(source: ExpectationsSource, pair: tuple[str, str]) -> Expectations | None:
    if isinstance(source, Mapping):
        return source.get(pair)
    found = source(*pair)
    if inspect.isawaitable(found):
        return await found
    return found
