"""The fleet view: merging equals pooling, windows by event time, de-duplication, persistence."""

from __future__ import annotations

import re

import numpy as np
import pytest

from slmops.telemetry import Sketch, embedding_moments, token_logprobs
from slmops_telemetry.view import FleetView

KV_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")


def test_merging_gateways_equals_pooling_their_samples(maker) -> None:
    samples = [maker.samples(requests=n, latency_ms=ms, errors=e)
               for n, ms, e in ((30, 10.0, 0), (50, 40.0, 5), (20, 200.0, 2))]  # fmt: skip
    view = FleetView()
    reports = [maker.report(f"gw-{i}", maker.at(0, 5 + i), s, peak_memory_mb=100.0 * (i + 1))
               for i, s in enumerate(samples)]  # fmt: skip
    assert view.fold(reports) == 3

    figures = view.figures("v-a", "arm64-pi5", include_open=True)
    pooled_latency = Sketch.from_values(np.concatenate([s.latency_ms for s in samples]).tolist())
    pooled_ttft = Sketch.from_values(np.concatenate([s.ttft_ms for s in samples]).tolist())
    assert figures.gateways == 3
    assert figures.requests == 100
    assert figures.error_rate == pytest.approx(7 / 100)
    assert figures.latency_p95_ms == pooled_latency.quantile(0.95)
    assert figures.latency_p50_ms == pooled_latency.quantile(0.5)
    assert figures.ttft_p95_ms == pooled_ttft.quantile(0.95)
    tokens = sum(len(s.logprobs) for s in samples)
    assert figures.decode_tokens_per_s == pytest.approx(tokens / (tokens / 25.0))
    assert figures.peak_memory_mb == 300.0
    (window,) = view.windows("v-a", "arm64-pi5", include_open=True)
    drift = window.drift.signature()
    assert drift is not None
    assert drift.embedding is not None
    assert drift.logprobs is not None
    pooled = embedding_moments(np.concatenate([s.embeddings for s in samples]))
    assert drift.embedding.count == pooled.count
    assert drift.embedding.sums == pytest.approx(pooled.sums)
    assert drift.embedding.sumsq == pytest.approx(pooled.sumsq)
    pooled_lp = token_logprobs(np.concatenate([s.logprobs for s in samples]).tolist())
    assert drift.logprobs.counts == pooled_lp.counts


def test_windows_follow_event_time_and_only_complete_ones_are_judged(maker) -> None:
    view = FleetView(window_s=30.0, settle_s=3.0)
    view.fold(maker.window(0, gateways=4, labels={"site": "a"}))
    view.fold(maker.window(1, gateways=4, labels={"site": "b"}))
    view.fold([maker.report("gw-x", maker.at(2, 2.0), maker.samples())])  # watermark: 2 s in

    complete = view.windows("v-a", "arm64-pi5")
    assert [w.start for w in complete] == [maker.t0]  # window 1 ended 2 s ago, not settled
    assert len(view.windows("v-a", "arm64-pi5", include_open=True)) == 3
    assert [w.start for w in view.windows("v-a", "arm64-pi5", now=maker.at(2, 4.0))] == [
        maker.t0, maker.t0 + 30.0]  # fmt: skip
    only_b = view.windows("v-a", "arm64-pi5", {"site": "b"}, include_open=True)
    assert [(w.start, w.gateways) for w in only_b] == [(maker.t0 + 30.0, 4)]
    assert view.figures("v-a", "arm64-pi5", since=maker.t0 + 30.0, include_open=True).requests \
        == 5 * 40  # fmt: skip


def test_a_gateway_counts_once_and_a_redelivery_is_not_folded_twice(maker) -> None:
    view = FleetView()
    first = maker.report("gw-1", maker.at(0, 1), maker.samples(requests=10))
    second = maker.report("gw-1", maker.at(0, 20), maker.samples(requests=10))

    assert view.fold([first, second, first]) == 2
    assert view.fold([second]) == 0

    (window,) = view.windows("v-a", "arm64-pi5", include_open=True)
    assert window.gateways == 1
    assert window.requests == 20
    assert view.stats.duplicates == 2


def test_old_windows_are_sealed_and_evicted(maker) -> None:
    view = FleetView(keep_windows=4, open_windows=2)
    for i in range(6):
        view.fold(maker.window(i, gateways=2))
    late = maker.report("gw-late", maker.at(1), maker.samples())

    assert view.fold([late]) == 0
    assert view.stats.late == 1
    dropped = view.evict()
    assert len(dropped) == 2  # windows 0 and 1 of the one key
    assert [w.start for w in view.windows("v-a", "arm64-pi5", include_open=True)] == [
        maker.t0 + 30.0 * i for i in range(2, 6)]  # fmt: skip


def test_a_restarted_view_resumes_from_what_dirty_gave(maker) -> None:
    view = FleetView()
    for i in range(3):
        view.fold(maker.window(i, gateways=5, labels={"site": f"s{i % 2}"}))
    stored = view.dirty()

    assert len(stored) == 3
    assert all(KV_KEY.match(key) for key in stored)
    assert view.dirty() == {}  # nothing changed since
    restarted = FleetView()
    for key, value in stored.items():
        restarted.restore(key, value)
    for labels in (None, {"site": "s0"}):
        assert restarted.figures("v-a", "arm64-pi5", labels=labels, include_open=True) == \
            view.figures("v-a", "arm64-pi5", labels=labels, include_open=True)  # fmt: skip
    assert restarted.keys() == view.keys()
    restarted.fold(maker.window(2, gateways=2, labels={"site": "s0"}))  # the open window grows
    assert restarted.figures("v-a", "arm64-pi5", include_open=True).requests == 17 * 40
    with pytest.raises(ValueError, match="does not hold its own window"):
        restarted.restore("w.other.key", next(iter(stored.values())))


def test_reports_without_model_are_resolved_or_counted(maker) -> None:
    known = {"v-a": ("m", "2.0.0")}
    view = FleetView(resolve=known.get)
    reports = [maker.report("gw-1", maker.at(0), maker.samples(), model=None, version=None),
               maker.report("gw-2", maker.at(0), maker.samples(), model=None, version=None,
                            variant_id="v-unknown")]  # fmt: skip

    assert view.fold(reports) == 1
    assert view.stats.unresolved == 1
    keys = view.keys()
    assert [(k.model_name, k.version) for k in keys] == [("m", "2.0.0")]


def test_rows_show_each_variant_and_class_with_its_label_sets(maker) -> None:
    view = FleetView()
    for i in range(3):
        view.fold(maker.window(i, gateways=4, labels={"site": "a"}))
        view.fold(maker.window(i, gateways=2, labels={"site": "b"}, device_class="jetson-orin-gpu",
                               variant_id="v-b"))  # fmt: skip
    rows = view.rows("m", "1.0.0")

    assert [(r.variant_id, r.device_class, r.windows) for r in rows] == [
        ("v-a", "arm64-pi5", 2), ("v-b", "jetson-orin-gpu", 2)]  # fmt: skip
    assert rows[0].figures.requests == 2 * 4 * 40
    assert [b.labels for b in rows[0].by_labels] == [{"site": "a"}]
    assert rows[0].by_labels[0].figures == rows[0].figures
    assert view.rows("other") == []
