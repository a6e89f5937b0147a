"""The rolling fleet view: health reports folded per (model, version, variant, device class,
label set) and reporting window, a bounded number of windows kept.

A report's window is its CloudEvent ``time`` floored to ``window_s``; the view's clock is the
newest report time it folded (the watermark), so a replayed stream is folded exactly as it
was live, and a window is *complete* once the watermark is ``settle_s`` past its end. The
newest ``open_windows`` windows remember which gateways and events they folded - a gateway
that reports twice in one window counts once, a redelivered event is not folded twice; older
windows are sealed (the id sets dropped: memory stays bounded) and reports for them are late.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

from pydantic import BaseModel, Field

from slmops.events.envelope import CloudEvent
from slmops.events.payloads import FieldFigures, GatewayReport
from slmops_telemetry.windows import MAX_IDS, StoredWindow, Window

#: variant id -> (model name, version), or None when the variant is not known (yet).
Resolve = Callable[[str], "tuple[str, str] | None"]
Labels = tuple[tuple[str, str], ...]
KV_PREFIX = "w"


class ViewKey(NamedTuple):
    model_name: str
    version: str
    variant_id: str
    device_class: str
    labels: Labels  # sorted (name, value) pairs; () = no labels


@dataclass
class FoldStats:
    folded: int = 0
    ignored: int = 0  # not a health report of a variant
    duplicates: int = 0  # redelivered: already folded
    late: int = 0  # for a sealed or evicted window
    unresolved: int = 0  # no model/version on it and the variant is unknown


class LabelFigures(BaseModel):
    labels: dict[str, str]
    figures: FieldFigures


class FieldRow(BaseModel):
    """A variant on one device class over the last windows: what the API and CLI show."""

    model_name: str
    version: str
    variant_id: str
    device_class: str
    since: datetime | None = Field(None, description="Start of the oldest window in the figures.")
    until: datetime | None = Field(None, description="End of the newest window in the figures.")
    windows: int = Field(ge=0, description="Reporting windows behind the figures.")
    figures: FieldFigures
    by_labels: list[LabelFigures] = Field(default_factory=list)


class FleetView:
    def __init__(
        self, window_s: float = 30.0, keep_windows: int = 20, *, resolve: Resolve | None = None,
        open_windows: int = 3, settle_s: float | None = None,
    ) -> None:  # fmt: skip
        """``open_windows``: how many of the newest windows still take reports (late ones
        and redeliveries come within a few intervals); ``settle_s`` (default a tenth of a
        window): how far the watermark must be past a window's end for it to be complete."""
        if keep_windows < open_windows:
            raise ValueError("keep_windows must be at least open_windows")
        self.window_s, self.keep_windows, self.open_windows = window_s, keep_windows, open_windows
        self.settle_s = window_s / 10 if settle_s is None else settle_s
        self.resolve = resolve
        self.stats = FoldStats()
        self.watermark = 0.0  # newest report time folded, epoch seconds
        self._windows: dict[ViewKey, dict[float, Window]] = {}
        self._dirty: set[tuple[ViewKey, float]] = set()
        self._resolved: dict[str, tuple[str, str]] = {}
        self._open_from = float("-inf")  # start of the oldest window still taking reports

    # --- folding -----------------------------------------------------------------------------

    def fold(self, events: Sequence[CloudEvent[GatewayReport]]) -> int:
        """Fold health reports in; returns how many were folded (see :attr:`stats`)."""
        stats, window_s, folded = self.stats, self.window_s, 0
        newest = self.watermark
        for event in events:
            data = event.data
            health = getattr(data, "health", None)
            variant_id = getattr(data, "variant_id", None)
            if health is None or variant_id is None or data.kind != "health":
                stats.ignored += 1
                continue
            model_name, version = data.model_name, data.version
            if model_name is None or version is None:
                resolved = self._resolve(variant_id)
                if resolved is None:
                    stats.unresolved += 1
                    continue
                model_name, version = resolved
            at = event.time.timestamp()
            start = at // window_s * window_s
            if start < self._open_from:
                stats.late += 1
                continue
            labels = tuple(sorted(data.labels.items())) if data.labels else ()
            key = ViewKey(model_name, version, variant_id, data.device_class, labels)
            windows = self._windows.get(key)
            if windows is None:
                windows = self._windows[key] = {}
            window = windows.get(start)
            if window is None:
                window = windows[start] = Window(start, window_s)
            seen = window.seen_ids
            if seen is None:
                stats.late += 1
                continue
            event_key = hash(event.id)
            if event_key in seen:
                stats.duplicates += 1
                continue
            if len(seen) < MAX_IDS:
                seen.add(event_key)
            window.add(data.gateway_id, health)
            self._dirty.add((key, start))
            folded += 1
            if at > newest:
                newest = at
        stats.folded += folded
        if newest > self.watermark:
            self._advance(newest)
        return folded

    def _resolve(self, variant_id: str) -> tuple[str, str] | None:
        found = self._resolved.get(variant_id)
        if found is None and self.resolve is not None:
            found = self.resolve(variant_id)
            if found is not None:  # a known variant stays known; an unknown one is asked again
                self._resolved[variant_id] = found
        return found

    def _advance(self, watermark: float) -> None:
        self.watermark = watermark
        open_from = (watermark // self.window_s - self.open_windows + 1) * self.window_s
        if open_from > self._open_from:
            self._open_from = open_from
            for windows in self._windows.values():
                for start, window in windows.items():
                    if start < open_from and not window.sealed:
                        window.seal()

    # --- queries -----------------------------------------------------------------------------

    def keys(self) -> list[ViewKey]:
        return sorted(self._windows)

    def pairs(self) -> list[tuple[str, str]]:
        """Every (variant, device class) the view holds windows of."""
        return sorted({(key.variant_id, key.device_class) for key in self._windows})

    def identity(self, variant_id: str) -> tuple[str, str] | None:
        """The (model name, version) the variant's reports were folded under."""
        for key in self._windows:
            if key.variant_id == variant_id:
                return key.model_name, key.version
        return None

    def label_sets(self, variant_id: str, device_class: str) -> list[Labels]:
        return sorted(k.labels for k in self._windows
                      if k.variant_id == variant_id and k.device_class == device_class)  # fmt: skip

    def complete(self, window: Window, now: float | None = None) -> bool:
        reference = self.watermark if now is None else now
        return window.start + window.window_s + self.settle_s <= reference

    def windows(
        self, variant_id: str, device_class: str, labels: dict[str, str] | None = None, *,
        include_open: bool = False, now: float | None = None,
    ) -> list[Window]:  # fmt: skip
        """The windows of a variant on a class, oldest first: of one label set, or merged over
        all of them (``labels=None``); complete ones only unless ``include_open``."""
        wanted = None if labels is None else tuple(sorted(labels.items()))
        merged: dict[float, Window] = {}
        for key, windows in self._windows.items():
            if key.variant_id != variant_id or key.device_class != device_class:
                continue
            if wanted is not None and key.labels != wanted:
                continue
            for start, window in windows.items():
                if include_open or self.complete(window, now):
                    merged.setdefault(start, Window(start, window.window_s)).merge(window)
        return [merged[start] for start in sorted(merged)]

    def figures(
        self, variant_id: str, device_class: str, *, labels: dict[str, str] | None = None,
        since: float | None = None, until: float | None = None, include_open: bool = False,
    ) -> FieldFigures:  # fmt: skip
        """Figures over the windows starting in ``[since, until)`` (epoch seconds)."""
        windows = self.windows(variant_id, device_class, labels, include_open=include_open)
        return span_figures(
            w for w in windows
            if (since is None or w.start >= since) and (until is None or w.start < until)
        )  # fmt: skip

    def rows(
        self, model_name: str | None = None, version: str | None = None, *, last: int = 10,
        include_open: bool = False,
    ) -> list[FieldRow]:  # fmt: skip
        """One row per (model, version, variant, class) over its ``last`` windows."""
        by_variant: dict[tuple[str, str, str, str], list[ViewKey]] = {}
        for key in self.keys():
            if model_name is not None and key.model_name != model_name:
                continue
            if version is not None and key.version != version:
                continue
            by_variant.setdefault(key[:4], []).append(key)
        rows = []
        for (model, ver, variant_id, device_class), keys in by_variant.items():
            spans = self.windows(variant_id, device_class, include_open=include_open)[-last:]
            since = spans[0].start if spans else None
            by_labels = [
                LabelFigures(labels=dict(key.labels), figures=self.figures(
                    variant_id, device_class, labels=dict(key.labels), since=since,
                    include_open=include_open))
                for key in keys
            ]  # fmt: skip
            rows.append(FieldRow(
                model_name=model, version=ver, variant_id=variant_id, device_class=device_class,
                since=spans[0].start_time if spans else None,
                until=_end_time(spans[-1]) if spans else None, windows=len(spans),
                figures=span_figures(spans), by_labels=by_labels,
            ))  # fmt: skip
        return rows

    # --- persistence -------------------------------------------------------------------------

    def dirty(self) -> dict[str, bytes]:
        """KV key -> stored window, of every window changed since the last call."""
        changed: dict[str, bytes] = {}
        for key, start in self._dirty:
            window = self._windows.get(key, {}).get(start)
            if window is None:
                continue
            stored = StoredWindow(model_name=key.model_name, version=key.version,
                                  variant_id=key.variant_id, device_class=key.device_class,
                                  labels=dict(key.labels), window=window.to_record())  # fmt: skip
            changed[kv_key(key, start)] = stored.model_dump_json(exclude_none=True).encode()
        self._dirty.clear()
        return changed

    def restore(self, key: str, value: bytes) -> None:
        """Take back a window :meth:`dirty` gave (after a restart); ValueError if not one."""
        stored = StoredWindow.model_validate_json(value)
        view_key = ViewKey(stored.model_name, stored.version, stored.variant_id,
                           stored.device_class, tuple(sorted(stored.labels.items())))  # fmt: skip
        if kv_key(view_key, stored.window.start) != key:
            raise ValueError(f"KV key {key!r} does not hold its own window")
        window = Window.from_record(stored.window)
        self._windows.setdefault(view_key, {})[window.start] = window
        if window.start > self.watermark:
            self._advance(window.start)

    def evict(self, now: float | None = None) -> list[str]:
        """Drop windows older than the newest ``keep_windows``; returns their KV keys."""
        reference = self.watermark if now is None else now
        keep_from = (reference // self.window_s - self.keep_windows + 1) * self.window_s
        dropped = []
        for key in list(self._windows):
            windows = self._windows[key]
            for start in [s for s in windows if s < keep_from]:
                del windows[start]
                self._dirty.discard((key, start))
                dropped.append(kv_key(key, start))
            if not windows:
                del self._windows[key]
        return dropped


def span_figures(windows: Iterable[Window]) -> FieldFigures:
    """Figures over a span of (merged) windows: the distinct gateways of a span are not known,
    so ``gateways`` is the most that reported in any one window."""
    windows = list(windows)
    if not windows:
        return FieldFigures(gateways=0, requests=0, error_rate=0.0)
    total = Window(windows[0].start, windows[0].window_s)
    for window in windows:
        total.merge(window)
    total.gateways = max(w.gateways for w in windows)
    return total.figures()


def kv_key(key: ViewKey, start: float) -> str:
    """``w.<variant>.<class>.<hash of model, version, labels>.<window start, ms>``: KV tokens."""
    identity = json.dumps([key.model_name, key.version, key.labels], separators=(",", ":"))
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return f"{KV_PREFIX}.{key.variant_id}.{key.device_class}.{digest}.{round(start * 1000)}"


def _end_time(window: Window) -> datetime:
    return datetime.fromtimestamp(window.start + window.window_s, UTC)
