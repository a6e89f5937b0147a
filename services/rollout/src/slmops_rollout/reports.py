"""Gateway reports folded a batch at a time: the fleet record and the rollouts move in memory,
then one group commit each makes the batch durable before it is acked.

A wave of 100,000 gateways sends 200,000 reports (acknowledged, then applied or failed): one
handler call, one KV write and one ack round trip each cost more than the fold. Here a batch of
thousands costs a write per changed progress shard (``store.py``), a write per changed fleet
record that the progress does not hold (registrations, unplanned installs, rollbacks), and
acks without round trips (``slmops.bus.batches``). Health reports only refresh the latest
aggregates in memory (they come again every interval; persisting each would cost a write per
gateway per interval): the wave's health gates read them from there.

A report a site's batch carried counts only if its gateway declared that site itself (its
fleet record, from its own registration, says so: ``slmops.events.reports.may_carry``); others
are dropped and logged - a relay cannot speak for another site's gateways.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime

from slmops.events import GatewayReport
from slmops.events.reports import Carried, may_carry
from slmops_rollout.engine import Engine
from slmops_rollout.fleet import GatewayRecord
from slmops_rollout.state import RolloutState, record

_WELCOME_BURST = 256  # registrations welcomed at once
log = logging.getLogger(__name__)


def _held_by_progress(state: RolloutState, report: GatewayReport) -> bool:
    """Whether the rollout's progress, written anyway, says what this outcome does to the
    gateway's fleet record: then the record is not written per gateway (a wave's biggest
    per-gateway write) - ``Fleet`` rebuilds it from the progress when it loads after a restart."""
    progress = state.gateways[report.gateway_id]
    return report.kind in ("applied", "failed") and progress.status == report.kind


async def fold_reports(engine: Engine, reports: Sequence[Carried]) -> None:
    """Fold one batch of reports; return once what it changed is durable. Idempotent: a batch
    delivered again folds to the same records and progress (generations order them)."""
    await engine.all()  # rollouts loaded (a restarted service resumes them)
    await engine.gateways.load()
    seen = datetime.now(UTC)
    durable: set[str] = set()  # fleet records to write
    moved: dict[str, set[str]] = {}  # rollout id -> gateways whose progress changed
    registered: list[GatewayRecord] = []
    refused: list[Carried] = []
    for report, site in reports:
        if site is not None and not may_carry(site, report, engine.gateways.declared(report)):
            refused.append(Carried(report, site))
            continue
        if report.kind == "health":
            if report.health is not None:
                engine.health.put(report.gateway_id, report.variant_id, report.health)
            await engine.gateways.fold(report, seen)  # in memory: it comes again next interval
            continue
        if report.kind != "acknowledged":  # the hot path of a wave: only its rollout cares
            fleet_record = await engine.gateways.fold(report, seen)
            if report.kind == "registered":
                registered.append(fleet_record)
        live = engine.live.get(report.rollout_id) if report.rollout_id else None
        if live is not None and record(live.state, report):
            moved.setdefault(live.state.rollout_id, set()).add(report.gateway_id)
            if report.kind != "acknowledged" and not _held_by_progress(live.state, report):
                durable.add(report.gateway_id)
        elif report.kind != "acknowledged":
            durable.add(report.gateway_id)
    await asyncio.gather(
        engine.gateways.commit(durable),
        *(engine.live[rollout_id].commit(ids) for rollout_id, ids in moved.items()),
    )
    # after their records are durable: late joiners get a model (a fleet starting at once
    # registers thousands per batch: welcomed side by side, not one KV read after another)
    for start in range(0, len(registered), _WELCOME_BURST):
        burst = registered[start : start + _WELCOME_BURST]
        await asyncio.gather(*(engine.welcome(r) for r in burst))
    if refused:
        shown = ", ".join(f"{c.report.gateway_id} via {c.site}" for c in refused[:3])
        log.warning("ignored %d report(s) a site carried for gateways that did not declare it "
                    "(or other labels): %s", len(refused), shown)  # fmt: skip
