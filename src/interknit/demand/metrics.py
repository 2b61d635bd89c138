"""Demand-control metrics, on a ``CollectorRegistry`` that the caller owns.

Counters and the wait histogram are bound per route once (``DemandMetrics.route``), so the hot
path increments a child and formats no labels. The limit, queue depth and in-flight gauges are
read from the limiters at scrape time instead of being set on every request.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from interknit.demand.limiter import Limiter
from interknit.demand.queue import REJECT_REASONS, RejectReason

_WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class RouteMetrics:
    """The metric children of one route."""

    __slots__ = ("_shed", "admitted", "queued", "wait")

    def __init__(self, parent: DemandMetrics, route: str) -> None:
        self.admitted = parent.admitted.labels(route)
        self.queued = parent.queued.labels(route)
        self.wait = parent.wait.labels(route)
        self._shed = {reason: parent.shed.labels(route, reason) for reason in REJECT_REASONS}

    def shed(self, reason: RejectReason) -> None:
        self._shed[reason].inc()


class DemandMetrics(Collector):
    """``interknit_demand_*`` metrics for every route's limiter."""

    def __init__(self, registry: CollectorRegistry, prefix: str = "interknit_demand") -> None:
        self.prefix = prefix
        self.admitted = Counter(
            f"{prefix}_admitted", "Requests admitted.", ["route"], registry=registry
        )
        self.queued = Counter(
            f"{prefix}_queued",
            "Requests that had to wait in the queue.",
            ["route"],
            registry=registry,
        )
        self.shed = Counter(
            f"{prefix}_shed",
            "Requests refused, by reason.",
            ["route", "reason"],
            registry=registry,
        )
        self.wait = Histogram(
            f"{prefix}_queue_wait_seconds",
            "Time queued requests waited before being admitted or refused.",
            ["route"],
            buckets=_WAIT_BUCKETS,
            registry=registry,
        )
        self._limiters: dict[str, Limiter] = {}
        registry.register(self)

    def route(self, name: str, limiter: Limiter | None = None) -> RouteMetrics:
        """Bind the children of route ``name``; its limiter's gauges are read at scrape time."""
        if limiter is not None:
            self._limiters[name] = limiter
        return RouteMetrics(self, name)

    def forget(self, name: str) -> None:
        """Stop reporting gauges for a route that was removed."""
        self._limiters.pop(name, None)

    def collect(self) -> Iterator[Metric]:
        p = self.prefix
        limit = GaugeMetricFamily(f"{p}_limit", "Current concurrency limit.", labels=["route"])
        depth = GaugeMetricFamily(f"{p}_queue_depth", "Requests now queued.", labels=["route"])
        inflight = GaugeMetricFamily(f"{p}_inflight", "Requests now in flight.", labels=["route"])
        for name, limiter in list(self._limiters.items()):
            limit.add_metric([name], float(min(limiter.limit, 1 << 53)))
            depth.add_metric([name], float(len(limiter.queue)))
            inflight.add_metric([name], float(limiter.inflight))
        yield limit
        yield depth
        yield inflight

    def describe(self) -> Iterator[Metric]:
        # Registering must not call collect() before any route exists; names are enough.
        p = self.prefix
        yield GaugeMetricFamily(f"{p}_limit", "Current concurrency limit.", labels=["route"])
        yield GaugeMetricFamily(f"{p}_queue_depth", "Requests now queued.", labels=["route"])
        yield GaugeMetricFamily(f"{p}_inflight", "Requests now in flight.", labels=["route"])
