"""Wiring of the telemetry service: the only module that touches NATS, FastAPI and tracing.

One :class:`FieldLoop` per process: it restores the fleet view from KV, then folds batches of
health reports into it - each batch's changed windows written to KV before the batch is acked,
so a restart resumes from KV and loses nothing it acked - and once per window evicts old
windows, runs detection (each finding published once, kept in KV) and, on its cadence,
publishes the device-measured figures of each (variant, class).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from fastapi import FastAPI
from nats.js.kv import KeyValue

from slmops.bus.batches import BatchConsumer
from slmops.bus.handlers import durable_name
from slmops.bus.kvstate import entries_matching
from slmops.bus.topology import FIELD_TELEMETRY_KV, FLEET, ConsumerSpec
from slmops.events import CloudEvent, derive_event_id, new_event
from slmops.events.payloads import FleetMeasured, FleetRegressionDetected
from slmops.profiles import load_profiles
from slmops.service import BackgroundTask, Check, ServiceRuntime, create_service_app, serve
from slmops.service.registry_api import RegistryClient
from slmops.telemetry import embedding_shift, logprob_shift
from slmops_telemetry.api import ClassHealth, DriftScore, router
from slmops_telemetry.detect import FieldGates
from slmops_telemetry.expectations import Expectations, expectations_for
from slmops_telemetry.handlers import Finding, decode_report, detect_once, on_reports
from slmops_telemetry.metrics import TelemetryMetrics
from slmops_telemetry.settings import TelemetrySettings
from slmops_telemetry.view import FieldRow, FleetView
from slmops_telemetry.windows import Window

log = logging.getLogger(__name__)
BUCKET = FIELD_TELEMETRY_KV.bucket
FINDING_PREFIX = "finding."  # KV keys of the findings published (the view's start with "w.")
MEASURED_KEY = "state.measured-until"  # where the last fleet.measured span ended
HEALTH_SUBJECT = "slmops.gateway.report.v1.health.>"
_PUT_CHUNK = 256  # KV puts in flight at once


def consumer_spec(settings: TelemetrySettings) -> ConsumerSpec:
    """Its durable on the fleet stream: health reports only, many in flight at once."""
    return ConsumerSpec(
        stream=FLEET.name, durable=durable_name("telemetry", FLEET.name),
        filter_subjects=(HEALTH_SUBJECT,), ack_wait_s=settings.consumer.ack_wait_s,
        max_deliver=settings.consumer.max_deliver, max_ack_pending=settings.max_ack_pending,
        description=f"telemetry: {HEALTH_SUBJECT} (folded in batches)",
    )  # fmt: skip


class FieldLoop(BackgroundTask):
    """The fleet view of this process and what keeps it: restore, fold, persist, detect."""

    task_name = "field telemetry"

    def __init__(
        self, runtime: ServiceRuntime, settings: TelemetrySettings, registry: RegistryClient
    ) -> None:
        super().__init__()
        self.runtime, self.settings, self.registry = runtime, settings, registry
        self.view = FleetView(settings.window_s, settings.keep_windows)
        self.profiles = load_profiles(settings.profiles_dir)  # a typo fails at start-up
        self.detection = settings.detection()
        self.gates = FieldGates(self.detection)
        self.findings: dict[str, dict[str, Any]] = {}  # detection id -> the event's data
        self.seen: set[str] = set()
        self.metrics = TelemetryMetrics(runtime.metrics, lambda: len(self.view.keys()))
        self.consumer: BatchConsumer | None = None
        self.kv: KeyValue | None = None
        self.restored = False
        self.last_error = ""
        self._measured_until: float | None = None  # end of the last fleet.measured span
        self._lock = asyncio.Lock()  # a fold and a tick never interleave on the view
        self._stopping = asyncio.Event()
        runtime.metrics.add_refresher("field consumer lag", self._lag, min_interval_s=1.0)

    async def check(self) -> Check:
        """Ready once the view is restored and reports are folded; a window whose judgement
        failed (the registry away) is named, but folding goes on, so it stays ready."""
        if self.consumer is None or not self.consumer.running:
            waiting = "not consuming yet" if self.restored else "restoring the view"
            return Check(False, f"{waiting}: {self.last_error}" if self.last_error else waiting)
        stats = self.consumer.stats
        detail = f"{stats.handled} reports folded in {stats.batches} batches"
        if self.last_error:
            detail += f"; last judgement failed: {self.last_error}"
        return Check(True, detail)

    async def run(self) -> None:
        while True:  # NATS away at start: try again (readiness says why meanwhile)
            try:
                await self._start_folding()
                self.last_error = ""
                break
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("telemetry: could not start folding: %s", self.last_error)
                if await self._stopped_within(1.0):
                    return
        window_s = self.settings.window_s
        while True:  # once per window, just after it ended
            if await self._stopped_within(window_s - time.time() % window_s + self.view.settle_s):
                return
            try:
                await self.tick()
                self.last_error = ""
            except Exception as exc:  # NATS or the registry away: the next window retries
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("telemetry tick failed: %s", self.last_error)

    async def _start_folding(self) -> None:
        """Restore the view from KV, then run the consumer into it."""
        self.kv = await self._bucket()
        await self._restore(self.kv)
        bus = self.runtime.bus
        assert bus is not None  # the bucket is there: connected
        spec = consumer_spec(self.settings)
        await bus.declare_consumer(spec)
        self.consumer = BatchConsumer(
            bus, spec, self._fold, self.settings.consumer, observer=self.runtime.metrics,
            decode=decode_report,
        )  # fmt: skip
        await self.consumer.start()

    async def _stopped_within(self, pause_s: float) -> bool:
        """Wait ``pause_s``; True at once when stopping. (The task is also cancelled, but a
        cancel arriving as a NATS request completes can be lost inside nats-py's wait_for
        on Python 3.11: the loop must not wait for the next window then.)"""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), pause_s)
        return self._stopping.is_set()

    async def stop(self) -> None:
        self._stopping.set()
        await super().stop()
        if self.consumer is not None:  # before the runtime closes the bus
            await self.consumer.stop()

    async def _lag(self) -> None:
        """Its consumer's lag (the runtime reports only the consumers it runs itself)."""
        await self.runtime.report_lag(self.consumer.spec if self.consumer else None)

    async def _bucket(self) -> KeyValue:
        """The view's bucket, once the runtime connected and declared the topology."""
        while True:
            kv = await self.runtime.key_value(BUCKET)
            if kv is not None:
                return kv
            await asyncio.sleep(0.2)

    async def _restore(self, kv: KeyValue) -> None:
        entries = await entries_matching(kv, ">")
        for key, value in entries.items():
            if key == MEASURED_KEY:
                self._measured_until = float(value)
            elif key.startswith(FINDING_PREFIX):
                finding = json.loads(value)
                self.findings[finding["detection_id"]] = finding
            else:
                try:
                    self.view.restore(key, value)
                except ValueError as exc:  # another release's form: dropped, not fatal
                    log.warning("telemetry: KV entry %s not restored: %s", key, exc)
        self.seen.update(self.findings)
        self.restored = True
        log.info("telemetry: restored %d series and %d findings",
                 len(self.view.keys()), len(self.findings))  # fmt: skip

    async def _fold(self, events: list[CloudEvent[Any]]) -> None:
        """One batch: folded, its changed windows written to KV; acked after this returns."""
        # A report stamped far ahead (a gateway's clock) would move the view's clock and seal
        # every window the rest of the fleet still reports into: left out, and counted.
        horizon = time.time() + 2 * self.settings.window_s
        timely = [e for e in events if e.time.timestamp() <= horizon]
        if len(timely) < len(events):
            self.metrics.refused.labels("future").inc(len(events) - len(timely))
        began = time.perf_counter()
        async with self._lock:
            on_reports(timely, self.view)
            dirty = self.view.dirty()
        self.metrics.folded(len(timely), time.perf_counter() - began)
        await self._write(dirty)

    async def _write(self, entries: dict[str, bytes], deleted: list[str] | None = None) -> None:
        kv = self.kv
        assert kv is not None
        calls = [kv.put(k, v) for k, v in entries.items()] + [kv.delete(k) for k in deleted or ()]
        for i in range(0, len(calls), _PUT_CHUNK):  # pipelined: a chunk in flight at once
            await asyncio.gather(*calls[i : i + _PUT_CHUNK])

    async def tick(self) -> None:
        """After a window ended: old windows dropped, findings looked for, device-measured
        figures on their cadence. Time is the reports' own (the view's watermark), so a
        replayed stream is judged as it was live."""
        async with self._lock:
            dropped = self.view.evict()
            dirty = self.view.dirty()
        await self._write(dirty, dropped)
        await detect_once(self.view, self._expectations, self.detection, self._publish,
                          self.seen)  # fmt: skip
        self.metrics.detections_run.inc()
        await self._measure()

    async def _measure(self) -> None:
        """fleet.measured over the complete windows since the last span, once it is long
        enough (the span's end kept in KV: a restarted service goes on from it)."""
        window_s, view = self.settings.window_s, self.view
        until = (view.watermark - view.settle_s) // window_s * window_s  # windows before: complete
        since = self._measured_until
        if since is None:  # the first span starts at the oldest window the view holds
            starts = [w[0].start for pair in view.pairs() if (w := view.windows(*pair))]
            if not starts:
                return
            since = self._measured_until = min(starts)
        if until - since < self.settings.measured_interval_s:
            return
        await self._publish_measured(since, until)
        self._measured_until = until
        assert self.kv is not None
        await self.kv.put(MEASURED_KEY, repr(until).encode())

    async def _expectations(self, variant_id: str, device_class: str) -> Expectations | None:
        return await expectations_for(self.registry, self.profiles, variant_id, device_class)

    async def _publish(self, finding: Finding) -> None:
        """A finding on the bus (its id deterministic: JetStream drops a repeat), then in KV:
        a restarted service knows it was published."""
        bus, kv = self.runtime.bus, self.kv
        assert bus is not None
        assert kv is not None
        await bus.publish(new_event(finding, source=self.runtime.source,
                                    event_id=derive_event_id(finding.detection_id)))  # fmt: skip
        data = {"type": finding.event_type, **finding.model_dump(mode="json")}
        await kv.put(f"{FINDING_PREFIX}{finding.detection_id}", json.dumps(data).encode())
        self.findings[finding.detection_id] = data
        kind = "regression" if isinstance(finding, FleetRegressionDetected) else "drift"
        self.metrics.findings.labels(kind, finding.device_class).inc()

    async def _publish_measured(self, since: float, until: float) -> None:
        bus = self.runtime.bus
        assert bus is not None
        for variant_id, device_class in self.view.pairs():
            expected = await self._expectations(variant_id, device_class)
            measured = self.gates.measured(self.view, expected, variant_id, device_class,
                                           since, until)  # fmt: skip
            if measured is None:
                continue
            event_id = derive_event_id("fleet.measured", variant_id, device_class, str(since))
            await bus.publish(new_event(measured, source=self.runtime.source, event_id=event_id))
            self.metrics.measured.labels(device_class).inc()

    # --- what the API shows ------------------------------------------------------------------

    def rows(self, model: str | None, version: str | None, last: int) -> list[FieldRow]:
        return self.view.rows(model, version, last=last)

    async def health(self, model: str, version: str, last: int) -> list[ClassHealth]:
        """Each class's row with its gates (the figures against its budgets) and drift."""
        answer = []
        for row in self.view.rows(model, version, last=last):
            error, expected = "", None
            try:
                expected = await self._expectations(row.variant_id, row.device_class)
            except Exception as exc:  # the registry away: the figures still show
                error = f"budgets unknown: {exc}"
            measured: FleetMeasured | None = None
            if row.since is not None and row.until is not None:
                measured = self.gates.measured(self.view, expected, row.variant_id,
                                               row.device_class, row.since.timestamp(),
                                               row.until.timestamp())  # fmt: skip
            if expected is None and not error:
                error = f"no profile for class {row.device_class}"
            answer.append(ClassHealth(
                **row.model_dump(), gates=measured.gates if measured else [],
                drift=self._drift(row, expected), expectations_error=error,
            ))  # fmt: skip
        return answer

    def _drift(self, row: FieldRow, expected: Expectations | None) -> DriftScore | None:
        baseline = expected.drift_baseline if expected is not None else None
        if baseline is None:
            return None
        span = self.detection.drift_windows
        windows = self.view.windows(row.variant_id, row.device_class)[-span:]
        merged = Window(windows[0].start, windows[0].window_s) if windows else None
        for window in windows:
            assert merged is not None
            merged.merge(window)
        current = merged.drift.signature() if merged is not None else None
        settings = self.detection
        try:
            if current and current.embedding and baseline.embedding:
                return DriftScore(signal="embedding",
                                  score=embedding_shift(baseline.embedding, current.embedding),
                                  threshold=settings.embedding_shift_threshold,
                                  field_samples=current.embedding.count,
                                  baseline_samples=baseline.embedding.count)  # fmt: skip
            if current and current.logprobs and baseline.logprobs:
                return DriftScore(signal="logprobs",
                                  score=logprob_shift(baseline.logprobs, current.logprobs),
                                  threshold=settings.logprob_psi_threshold,
                                  field_samples=current.logprobs.count,
                                  baseline_samples=baseline.logprobs.count)  # fmt: skip
        except ValueError:  # another width, or too few samples: not comparable
            return None
        return None


def create_app(settings: TelemetrySettings | None = None) -> FastAPI:
    settings = settings or TelemetrySettings()
    runtime = ServiceRuntime("telemetry", settings, uses_object_store=False)
    runtime.add_batch_consumer(consumer_spec(settings))
    registry = RegistryClient.with_identity(
        settings.registry_url, settings.platform, "service-telemetry"
    )
    loop = FieldLoop(runtime, settings, registry)
    runtime.add_dependency("field_telemetry", loop)
    app = create_service_app(runtime, router, title="slmops telemetry")
    app.state.field = loop
    return app


def main() -> None:
    settings = TelemetrySettings()
    serve(create_app(settings), settings)
