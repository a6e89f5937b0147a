"""Prometheus metrics of one service process, served at ``/metrics`` (scope ``metrics``).

Each service app has its own :class:`ServiceMetrics` with its own ``CollectorRegistry`` (never
the process-global default one): tests build several apps in one process, and each must count
only its own work. Every service exports the generic families: events consumed per type,
consumer and outcome, handler durations, consumer lag, HTTP requests. A service adds its domain
families (jobs, validations, rollouts, the fleet) in its own ``metrics.py``, as collectors that
read the state the service keeps anyway.

Labels stay bounded: event types, consumer names without a gateway's id, route templates,
states, verdicts, device classes, model versions; never a gateway id or a variant id.

What needs I/O to be known (a consumer's pending count, the job store) is read by *refreshers*:
async functions run before a scrape renders, each bounded by a timeout and by a minimum
interval between runs, so a slow store or frequent scrapers cannot make ``/metrics`` hang or
hammer NATS; a refresher that fails leaves the last values in place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slmops import __version__

log = logging.getLogger(__name__)

#: What ``/metrics`` answers with: the text format every Prometheus reads.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# From a few ms (a KV write) to half an hour (an optimization job runs inside its handler).
HANDLER_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                     600, 1800)  # fmt: skip
HTTP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
UNMATCHED_ROUTE = "unmatched"  # a request no route took (404): its path is not a label

Refresh = Callable[[], Awaitable[None]]


@dataclass
class _Refresher:
    name: str
    refresh: Refresh
    min_interval_s: float
    last_run: float = float("-inf")


class ServiceMetrics:
    """The metric families of one service and the registry they are exported from."""

    def __init__(self, service: str, *, refresh_timeout_s: float = 2.0) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        self.refresh_timeout_s = refresh_timeout_s
        self._refreshers: list[_Refresher] = []
        self._refreshing = asyncio.Lock()
        self._event_counters: dict[tuple[str, str, str], Counter] = {}
        self._handler_times: dict[str, Histogram] = {}
        registry = self.registry
        info = Gauge("slmops_service_info", "The service and its version (always 1).",
                     ["service", "version"], registry=registry)  # fmt: skip
        info.labels(service, __version__).set(1)
        self.events = Counter(
            "slmops_events",
            "Events a consumer took, by type and outcome: handled (acked), ignored (no handler "
            "here), retried (failed, sent back with backoff), dead_lettered, failed (could not "
            "be settled).",
            ["type", "consumer", "outcome"],
            registry=registry,
        )
        self.handler_duration = Histogram(
            "slmops_event_handler_duration_seconds",
            "How long a handler ran, with the publishing of its output events, per event type.",
            ["type"],
            buckets=HANDLER_BUCKETS_S,
            registry=registry,
        )
        self.consumer_pending = Gauge(
            "slmops_consumer_pending_messages",
            "Messages in the stream not yet delivered to the consumer (its lag), at scrape time.",
            ["consumer"],
            registry=registry,
        )
        self.consumer_ack_pending = Gauge(
            "slmops_consumer_ack_pending_messages",
            "Messages delivered to the consumer and not acked yet, at scrape time.",
            ["consumer"],
            registry=registry,
        )
        self.http_requests = Counter(
            "slmops_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.http_duration = Histogram(
            "slmops_http_request_duration_seconds",
            "Time to the response's start (a stream's first bytes), by route template.",
            ["route", "method"],
            buckets=HTTP_BUCKETS_S,
            registry=registry,
        )

    # --- what the consumer loop reports (its EventObserver) ---------------------------------

    def count(self, consumer: str, event_type: str, outcome: str) -> None:
        key = (event_type, consumer, outcome)
        counter = self._event_counters.get(key)
        if counter is None:  # labels() locks and builds a key each call: once per series
            counter = self._event_counters[key] = self.events.labels(*key)
        counter.inc()

    def time(self, event_type: str, duration_s: float) -> None:
        histogram = self._handler_times.get(event_type)
        if histogram is None:
            histogram = self._handler_times[event_type] = self.handler_duration.labels(event_type)
        histogram.observe(duration_s)

    # --- refreshers and rendering ----------------------------------------------------------

    def add_refresher(self, name: str, refresh: Refresh, *, min_interval_s: float = 0.0) -> None:
        """Run ``refresh`` before a scrape renders, at most every ``min_interval_s``."""
        self._refreshers.append(_Refresher(name, refresh, min_interval_s))

    async def refresh(self) -> None:
        async with self._refreshing:  # concurrent scrapes share one round of refreshing
            now = time.monotonic()
            due = [r for r in self._refreshers if now - r.last_run >= r.min_interval_s]
            await asyncio.gather(*(self._run(r, now) for r in due))

    async def _run(self, refresher: _Refresher, now: float) -> None:
        try:
            await asyncio.wait_for(refresher.refresh(), self.refresh_timeout_s)
            refresher.last_run = now
        except Exception as exc:  # the last values stay: a scrape never fails on a refresh
            log.warning("%s: metrics refresh %s failed: %r", self.service, refresher.name, exc)

    async def render(self) -> bytes:
        """The text exposition of every family, after the due refreshers ran."""
        await self.refresh()
        return generate_latest(self.registry)

    def sample_names(self) -> set[str]:
        """Every sample name this registry can export (a counter's ``_total``, a histogram's
        ``_bucket``/``_sum``/``_count``...), samples present or not: what a query may use."""
        return sample_names(self.registry.collect())


def sample_names(families: Iterable[Metric]) -> set[str]:
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    return {
        f"{family.name}{suffix}"
        for family in families
        for suffix in suffixes.get(family.type, ("",))
    }


class HttpMetricsMiddleware:
    """Counts every HTTP request by its route template (``/v1/rollouts/{rollout_id}``: bounded,
    never an id), method and status, and times it to the response's start."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception before any response is what the client sees as one

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                self.metrics.http_duration.labels(_route(scope), scope["method"]).observe(
                    time.perf_counter() - started
                )
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.http_requests.labels(_route(scope), scope["method"], str(status)).inc()


def _route(scope: Scope) -> str:
    route = scope.get("route")  # set by the router once a route matched
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE
