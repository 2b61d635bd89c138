"""The last minutes of the proxy's traffic, per route and per endpoint, for the status page.

Rules of this file:

* Nothing here runs per request. The proxy counts into plain numbers (``observe.py``); every
  ``every`` seconds ``sample`` reads those counters once, keeps the difference from the last
  reading in a small ring per route and per endpoint, and forgets the rest. What a request
  costs does not change whether the status page is open or not.
* Latency quantiles come from the histograms' bucket counts (as Prometheus'
  ``histogram_quantile`` computes them: linear within the bucket), so they are as precise as the
  buckets, which is what an operator needs to see a route slow down.
* ``now`` is passed in (wall-clock seconds); the only clock is the caller's.

Shed requests are those demand control refused (their reasons are the proxy's ``reason``
values of its 429 and 503 answers); the other reasons are the proxy's own errors.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from interknit.demand.queue import REJECT_REASONS
from interknit.plainmetrics import Family
from interknit.proxy.observe import ProxyMetrics

CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
SHED_REASONS = frozenset(REJECT_REASONS)
# The window the summary columns cover, and how long the charts reach back.
SUMMARY_SECONDS = 60.0


@dataclass(slots=True)
class Sample:
    """What happened on a route (or at an endpoint) between two readings."""

    t: float  # wall-clock seconds at the end of the interval
    span: float  # seconds the interval lasted
    codes: tuple[int, ...]  # requests answered by status class (CLASSES)
    reasons: dict[str, int]  # proxy error and shed reasons
    retries: int
    buckets: tuple[int, ...]  # latency histogram counts (not cumulative, +Inf last)
    inflight: int


@dataclass(slots=True)
class _Reading:
    """The counters' values at the last sample."""

    codes: tuple[int, ...] = (0, 0, 0, 0, 0)
    reasons: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    buckets: tuple[int, ...] = ()
    inflight: int = 0


@dataclass(slots=True)
class _Series:
    ring: deque[Sample]
    last: _Reading = field(default_factory=_Reading)
    totals: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0])


def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """The ``q`` quantile of a histogram (``counts`` per bucket, ``bounds`` their upper
    bounds, +Inf last); None without observations. Beyond the last bound: that bound."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    lower = 0.0
    for upper, count in zip((*bounds, bounds[-1]), counts, strict=True):
        if count and seen + count >= rank:
            return lower + (upper - lower) * ((rank - seen) / count)
        seen += count
        lower = upper
    return bounds[-1]


def _children(family: Family) -> list[tuple[tuple[str, ...], Any]]:
    # list() copies in one step: a child the proxy adds meanwhile is no error.
    return list(family.children.items())


class TrafficHistory:
    """Rings of recent samples per (listener, route) and (listener, route, endpoint)."""

    def __init__(self, metrics: ProxyMetrics, *, every: float = 2.0, keep: int = 150) -> None:
        self.metrics = metrics
        self.every = every
        self.keep = keep
        self.bounds = metrics.duration.buckets
        self._routes: dict[tuple[str, str], _Series] = {}
        self._endpoints: dict[tuple[str, str, str], _Series] = {}
        self._previous: float | None = None

    # ------------------------------------------------------------------ sampling

    def sample(self, now: float) -> None:
        """Read every counter once and append what changed since the last reading."""
        span = self.every if self._previous is None else max(1e-3, now - self._previous)
        self._previous = now
        m = self.metrics
        routes: dict[tuple[str, str], _Reading] = {}

        def route(labels: tuple[str, ...]) -> _Reading:
            key = (labels[0], labels[1])
            found = routes.get(key)
            if found is None:
                found = routes[key] = _Reading(codes=(0, 0, 0, 0, 0), reasons={})
            return found

        for labels, child in _children(m.requests):
            reading = route(labels)
            index = CLASSES.index(labels[2]) if labels[2] in CLASSES else -1
            if index >= 0:
                codes = list(reading.codes)
                codes[index] = int(child.value)
                reading.codes = tuple(codes)
        for labels, child in _children(m.errors):
            route(labels).reasons[labels[2]] = int(child.value)
        for labels, child in _children(m.retries):
            route(labels).retries = int(child.value)
        for labels, child in _children(m.duration):
            route(labels).buckets = tuple(child.counts)
        for labels, child in _children(m.inflight):
            route(labels).inflight = int(child.value)
        for key, reading in routes.items():
            self._append(self._routes, key, reading, now, span)

        endpoints: dict[tuple[str, str, str], _Reading] = {}

        def endpoint(labels: tuple[str, ...]) -> _Reading:
            key = (labels[0], labels[1], labels[2])
            found = endpoints.get(key)
            if found is None:
                found = endpoints[key] = _Reading(codes=(0, 0, 0, 0, 0), reasons={})
            return found

        for labels, child in _children(m.endpoint_requests):
            endpoint(labels).codes = (0, int(child.value), 0, 0, 0)  # attempts, as "2xx" slot
        for labels, child in _children(m.endpoint_errors):
            endpoint(labels).reasons["failed"] = int(child.value)
        for labels, child in _children(m.endpoint_duration):
            endpoint(labels).buckets = tuple(child.counts)
        for labels, child in _children(m.endpoint_inflight):
            endpoint(labels).inflight = int(child.value)
        for ekey, reading in endpoints.items():
            self._append(self._endpoints, ekey, reading, now, span)

    def _append(
        self,
        series: dict[Any, _Series],
        key: Any,
        reading: _Reading,
        now: float,
        span: float,
    ) -> None:
        found = series.get(key)
        if found is None:
            # First seen now: what it counted before this reading happened in this interval.
            found = series[key] = _Series(deque(maxlen=self.keep))
        last = found.last
        codes = tuple(max(0, a - b) for a, b in zip(reading.codes, last.codes, strict=True))
        reasons = {
            reason: count - last.reasons.get(reason, 0)
            for reason, count in reading.reasons.items()
            if count > last.reasons.get(reason, 0)
        }
        old = last.buckets or (0,) * len(reading.buckets)
        buckets = tuple(max(0, a - b) for a, b in zip(reading.buckets, old, strict=True))
        found.ring.append(
            Sample(
                now,
                span,
                codes,
                reasons,
                max(0, reading.retries - last.retries),
                buckets,
                reading.inflight,
            )
        )
        found.last = reading
        found.totals = list(reading.codes)

    # ------------------------------------------------------------------ reading

    def _summary(self, ring: Iterable[Sample], now: float) -> dict[str, Any]:
        recent = [s for s in ring if s.t > now - SUMMARY_SECONDS]
        span = sum(s.span for s in recent) or self.every
        codes = [sum(s.codes[i] for s in recent) for i in range(len(CLASSES))]
        reasons: dict[str, int] = {}
        for s in recent:
            for reason, count in s.reasons.items():
                reasons[reason] = reasons.get(reason, 0) + count
        width = len(self.bounds) + 1
        merged = [sum(s.buckets[i] for s in recent if s.buckets) for i in range(width)]
        p50 = quantile(0.5, self.bounds, merged)
        p99 = quantile(0.99, self.bounds, merged)
        last = recent[-1] if recent else None
        return {
            "requests": sum(codes),
            "rate": round(sum(codes) / span, 2),
            "codes": dict(zip(CLASSES, codes, strict=True)),
            "shed": {r: n for r, n in sorted(reasons.items()) if r in SHED_REASONS},
            "errors": {r: n for r, n in sorted(reasons.items()) if r not in SHED_REASONS},
            "retries": sum(s.retries for s in recent),
            "p50_ms": None if p50 is None else round(p50 * 1000, 2),
            "p99_ms": None if p99 is None else round(p99 * 1000, 2),
            "inflight": 0 if last is None else last.inflight,
        }

    def _history(self, ring: Iterable[Sample]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {
            "t": [],
            "rate": [],
            "2xx": [],
            "4xx": [],
            "5xx": [],
            "p50_ms": [],
            "p99_ms": [],
        }
        for s in ring:
            out["t"].append(round(s.t, 3))
            out["rate"].append(round(sum(s.codes) / s.span, 2))
            for name in ("2xx", "4xx", "5xx"):
                out[name].append(round(s.codes[CLASSES.index(name)] / s.span, 2))
            p50 = quantile(0.5, self.bounds, s.buckets) if s.buckets else None
            p99 = quantile(0.99, self.bounds, s.buckets) if s.buckets else None
            out["p50_ms"].append(None if p50 is None else round(p50 * 1000, 2))
            out["p99_ms"].append(None if p99 is None else round(p99 * 1000, 2))
        return out

    def describe(self, now: float) -> dict[str, Any]:
        """Per route: the last minute's summary, totals since start, the charts' series, and
        its endpoints the same way (attempts, failures, latency)."""
        by_route: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for (listener, route, key), series in sorted(self._endpoints.items()):
            summary = self._summary(series.ring, now)
            history = self._history(series.ring)
            by_route.setdefault((listener, route), []).append(
                {
                    "endpoint": key,
                    "attempts": summary["requests"],
                    "rate": summary["rate"],
                    "failed": summary["errors"].get("failed", 0),
                    "p50_ms": summary["p50_ms"],
                    "p99_ms": summary["p99_ms"],
                    "inflight": summary["inflight"],
                    "history": {"t": history["t"], "rate": history["rate"]},
                }
            )
        routes = []
        for (listener, route), series in sorted(self._routes.items()):
            routes.append(
                {
                    "listener": listener,
                    "route": route,
                    **self._summary(series.ring, now),
                    "totals": dict(zip(CLASSES, series.totals, strict=True)),
                    "history": self._history(series.ring),
                    "endpoints": by_route.get((listener, route), []),
                }
            )
        return {"every": self.every, "keep": self.keep, "window": SUMMARY_SECONDS, "routes": routes}
