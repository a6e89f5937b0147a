"""Gateway reports folded into the lineage a batch at a time.

A wave to thousands of gateways brings thousands of ``applied``/``failed`` reports. Handled one
by one, each costs a handler call, a lookup of its rollout's model version and a read-then-write
of its gateway's key. Folded as a batch: the newest state per gateway key is kept (older ones
and repeats never reach KV), each rollout or variant is resolved to its model version once - and
remembered, since that never changes once known - and the writes go out pipelined
(``LineageStore.put_gateways``).

A report whose rollout and variant are not known yet (it overtook its ``rollout.started``, on
another stream) cannot be placed. The batch's known reports are written first, then the fold
raises :class:`PartlyHandled` naming the events that carried the others: only those are
redelivered (a site's batch whole: rewriting its known reports is a no-op, newest-wins by event
time and id), the rest of the batch is acked.

A report a site's batch carried counts only for a gateway that declared that site itself
(``declared.py``); others are dropped and logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from slmops.events import CloudEvent, GatewayReport, GatewayReports, PartlyHandled
from slmops.events.registry import decoder_for
from slmops.events.reports import StampedReport, each_report, may_carry
from slmops_registry.declared import Declarations
from slmops_registry.lineage import GatewayState, gateway_state
from slmops_registry.projection import LineageStore

#: The gateway reports lineage keeps: which variant each gateway runs (registrations,
#: acknowledgements and health are not lineage).
REPORT_SUBJECTS = (
    # registrations: what each gateway declares (whether a site may carry its reports)
    *(f"{GatewayReport.event_type}.{kind}.>" for kind in ("registered", "applied", "failed")),
    f"{GatewayReports.event_type}.>",  # sites' batches (their acknowledgements left out here)
)
_MAX_REMEMBERED = 100_000  # rollout/variant locations kept in memory (a few MB at most)
log = logging.getLogger(__name__)

Where = tuple[str, str]  # (model name, version)
GatewayKey = tuple[str, str, str]  # (model name, version, gateway id)


class ReportFolder:
    """Folds batches of gateway reports into one lineage store."""

    def __init__(self, store: LineageStore, declarations: Declarations) -> None:
        self.store, self.declarations = store, declarations
        self._located: dict[tuple[str, str], Where] = {}  # ("rollout"|"variant", id) -> where

    async def fold(self, events: list[CloudEvent[Any]]) -> None:
        """Write the newest state per gateway of ``events``; raise :class:`PartlyHandled`
        (after writing the rest) naming the events with reports about a rollout or variant
        not projected yet."""
        reports = await self._vouched(each_report(events))
        states = [(seen.report, state) for seen in reports
                  if (state := gateway_state(seen))]  # fmt: skip
        await self._resolve(report for report, _ in states)
        newest: dict[GatewayKey, GatewayState] = {}
        unplaced: list[str] = []
        for report, state in states:
            where = self.where(report)
            if where is None:
                unplaced.append(state.event_id)
                continue
            key = (*where, state.gateway_id)
            current = newest.get(key)
            if current is None or state.key() > current.key():
                newest[key] = state
        writes = [(name, version, state) for (name, version, _), state in newest.items()]
        await self.store.put_gateways(writes)
        if unplaced:
            shown = ", ".join(unplaced[:3]) + (" ..." if len(unplaced) > 3 else "")
            raise PartlyHandled(
                f"{len(unplaced)} gateway report(s) name an unknown rollout/variant: {shown}",
                _carriers(events, set(unplaced)),
            )

    async def _vouched(self, reports: list[StampedReport]) -> list[StampedReport]:
        """Learn registrations; leave out what a site carried for gateways not its own."""
        for seen in reports:
            if seen.site is None and seen.report.kind == "registered":
                self.declarations.heard(seen.report)
        carried = [seen.report.gateway_id for seen in reports if seen.site is not None]
        if not carried:
            return reports
        await self.declarations.resolve(carried)
        kept, refused = [], []
        for seen in reports:
            declared = self.declarations.of(seen.report.gateway_id)
            if seen.site is None or may_carry(seen.site, seen.report, declared):
                kept.append(seen)
            else:
                refused.append(f"{seen.report.gateway_id} via {seen.site}")
        if refused:
            log.warning(
                "ignored %d report(s) a site carried for gateways that did not declare "
                "it (or other labels): %s",
                len(refused),
                ", ".join(refused[:3]),
            )
        return kept

    def where(self, report: GatewayReport) -> Where | None:
        """The model version a report is about, if its rollout or variant is known."""
        for ref in _refs(report):
            where = self._located.get(ref)
            if where is not None:
                return where
        return None

    async def _resolve(self, reports: Iterable[GatewayReport]) -> None:
        """Look up, once each, the rollouts and then the variants not known yet (a variant only
        for a report whose rollout is unknown, as a single report is placed)."""
        pending = list(reports)
        for kind in ("rollout", "variant"):
            pending = [r for r in pending if self.where(r) is None]
            wanted = list({ref for r in pending for ref in _refs(r)
                           if ref[0] == kind and ref not in self._located})  # fmt: skip
            found = await asyncio.gather(*(self.store.locate(*ref) for ref in wanted))
            if len(self._located) + len(wanted) > _MAX_REMEMBERED:
                self._located.clear()  # rare: as many rollouts as that; looked up again
            self._located.update((ref, w) for ref, w in zip(wanted, found, strict=True) if w)


#: A message of the report consumer: validated by the report's own model; anything else as
#: ``decode_event`` decodes it, or its precise refusal.
decode_report = decoder_for(GatewayReport, GatewayReports)


def _carriers(events: list[CloudEvent[Any]], report_ids: set[str]) -> set[str]:
    """The ids of the events that carried the reports stamped with ``report_ids``."""
    return {event.id for event in events
            if any(seen.event_id in report_ids for seen in each_report([event]))}  # fmt: skip


def _refs(report: GatewayReport) -> list[tuple[str, str]]:
    """What may place a report, in order: its rollout, then its variant."""
    refs = [("rollout", report.rollout_id), ("variant", report.variant_id)]
    return [(kind, ident) for kind, ident in refs if ident]
