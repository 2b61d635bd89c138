"""The last minutes of the proxy's traffic, per route and per endpoint, for the status page.

Rules of this file:

* Nothing here runs per request. The proxy counts into plain numbers (``observe.py``); every
  ``every`` seconds ``sample`` reads those counters once and appends, per route and per
  endpoint, the counters' values and what the interval's chart points are (rates, p50, p99) to
  a small ring. What a request costs does not change whether the status page is open or not.
* A window's figures are the difference between two of the ring's readings (counters only
  grow), so summing up the last minute costs the same however many samples it spans; each chart
  point is computed once, when its sample is taken.
* Latency quantiles come from the histograms' bucket counts (as Prometheus'
  ``histogram_quantile`` computes them: linear within the bucket), so they are as precise as the
  buckets, which is what an operator needs to see a route slow down.
* ``now`` is passed in (wall-clock seconds); the only clock is the caller's.

Shed requests are those demand control refused (their reasons are the proxy's ``reason``
values of its 429 and 503 answers); the other reasons are the proxy's own errors.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from interknit.demand.queue import REJECT_REASONS
from interknit.plainmetrics import Family
from interknit.proxy.observe import ProxyMetrics

CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
_CLASS_INDEX = {name: index for index, name in enumerate(CLASSES)}
SHED_REASONS = frozenset(REJECT_REASONS)
# The window the summary columns cover.
SUMMARY_SECONDS = 60.0
# Chart points sent per endpoint (routes send the whole ring): endpoints are many.
ENDPOINT_POINTS = 20
_NO_CODES = (0, 0, 0, 0, 0)


class Sample:
    """One reading of a route's (or an endpoint's) counters, and the chart point of the
    interval that ended with it."""

    __slots__ = ("buckets", "codes", "inflight", "point", "reasons", "retries", "t")

    def __init__(
        self,
        t: float,
        codes: tuple[int, ...],
        reasons: dict[str, int],
        retries: int,
        buckets: tuple[int, ...],
        inflight: int,
        point: tuple[float, float, float, float, float | None, float | None],
    ) -> None:
        self.t = t
        self.codes = codes  # cumulative, by CLASSES
        self.reasons = reasons  # cumulative, by reason
        self.retries = retries  # cumulative
        self.buckets = buckets  # cumulative per bucket (not across buckets), +Inf last
        self.inflight = inflight
        # The interval's rate of requests, of 2xx, 4xx and 5xx a second, its p50 and p99 (ms).
        self.point = point


_EMPTY = Sample(0.0, _NO_CODES, {}, 0, (), 0, (0.0, 0.0, 0.0, 0.0, None, None))


def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """The ``q`` quantile of a histogram (``counts`` per bucket, ``bounds`` their upper
    bounds, +Inf last); None without observations. Beyond the last bound: that bound."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    lower = 0.0
    for index, count in enumerate(counts):
        upper = bounds[index] if index < len(bounds) else bounds[-1]
        if count and seen + count >= rank:
            return lower + (upper - lower) * ((rank - seen) / count)
        seen += count
        lower = upper
    return bounds[-1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


class _Reading:
    """The counters of one route or endpoint as read now."""

    __slots__ = ("buckets", "codes", "inflight", "reasons", "retries")

    def __init__(self) -> None:
        self.codes: list[int] = [0, 0, 0, 0, 0]
        self.reasons: dict[str, int] = {}
        self.retries = 0
        self.buckets: tuple[int, ...] = ()
        self.inflight = 0


def _children(family: Family) -> list[tuple[tuple[str, ...], Any]]:
    # list() copies in one step: a child the proxy adds meanwhile is no error.
    return list(family.children.items())


class TrafficHistory:
    """Rings of recent samples per (listener, route) and (listener, route, endpoint)."""

    def __init__(self, metrics: ProxyMetrics, *, every: float = 3.0, keep: int = 100) -> None:
        self.metrics = metrics
        self.every = every
        self.keep = keep
        self.bounds = metrics.duration.buckets
        self._routes: dict[tuple[str, ...], deque[Sample]] = {}
        self._endpoints: dict[tuple[str, ...], deque[Sample]] = {}

    # ------------------------------------------------------------------ sampling

    def sample(self, now: float) -> None:
        """Read every counter once and append a sample to each ring."""
        m = self.metrics
        routes: dict[tuple[str, ...], _Reading] = {}
        for labels, child in _children(m.requests):
            reading = routes.get(labels[:2])
            if reading is None:
                reading = routes[labels[:2]] = _Reading()
            index = _CLASS_INDEX.get(labels[2])
            if index is not None:
                reading.codes[index] = int(child.value)
        for labels, child in _children(m.errors):
            reading = routes.get(labels[:2])
            if reading is None:
                reading = routes[labels[:2]] = _Reading()
            reading.reasons[labels[2]] = int(child.value)
        for family, field in ((m.retries, "retries"), (m.inflight, "inflight")):
            for labels, child in _children(family):
                reading = routes.get(labels)
                if reading is None:
                    reading = routes[labels] = _Reading()
                setattr(reading, field, int(child.value))
        for labels, child in _children(m.duration):
            reading = routes.get(labels)
            if reading is None:
                reading = routes[labels] = _Reading()
            reading.buckets = tuple(child.counts)
        for key, reading in routes.items():
            self._append(self._routes, key, reading, now)

        endpoints: dict[tuple[str, ...], _Reading] = {}
        for labels, child in _children(m.endpoint_requests):
            reading = endpoints[labels] = _Reading()
            reading.codes[1] = int(child.value)  # attempts, counted where 2xx would be
        for family, field in ((m.endpoint_errors, "retries"), (m.endpoint_inflight, "inflight")):
            # An endpoint's failed attempts ride in the "retries" slot.
            for labels, child in _children(family):
                reading = endpoints.get(labels)
                if reading is not None:
                    setattr(reading, field, int(child.value))
        for labels, child in _children(m.endpoint_duration):
            reading = endpoints.get(labels)
            if reading is not None:
                reading.buckets = tuple(child.counts)
        for key, reading in endpoints.items():
            self._append(self._endpoints, key, reading, now)

    def _append(
        self,
        rings: dict[tuple[str, ...], deque[Sample]],
        key: tuple[str, ...],
        reading: _Reading,
        now: float,
    ) -> None:
        ring = rings.get(key)
        if ring is None:
            ring = rings[key] = deque(maxlen=self.keep)
        last = ring[-1] if ring else _EMPTY
        codes = tuple(reading.codes)
        buckets = reading.buckets
        if codes == last.codes and buckets == last.buckets:
            point: tuple[float, float, float, float, float | None, float | None] = (
                0.0,
                0.0,
                0.0,
                0.0,
                None,
                None,
            )
        else:
            span = max(1e-3, now - last.t) if ring else self.every
            old = last.codes
            c2, c4, c5 = codes[1] - old[1], codes[3] - old[3], codes[4] - old[4]
            total = sum(codes) - sum(old)
            if last.buckets and len(last.buckets) == len(buckets):
                delta = [a - b for a, b in zip(buckets, last.buckets, strict=True)]
            else:
                delta = list(buckets)
            point = (
                round(total / span, 2),
                round(c2 / span, 2),
                round(c4 / span, 2),
                round(c5 / span, 2),
                _ms(quantile(0.5, self.bounds, delta)),
                _ms(quantile(0.99, self.bounds, delta)),
            )
        reasons = reading.reasons if reading.reasons != last.reasons else last.reasons
        ring.append(Sample(now, codes, reasons, reading.retries, buckets, reading.inflight, point))

    # ------------------------------------------------------------------ reading

    def _summary(self, ring: deque[Sample], now: float) -> dict[str, Any]:
        """The last minute: the newest reading less the last one at least a minute old."""
        newest = ring[-1]
        base = _EMPTY
        for sample in ring:
            if sample.t > now - SUMMARY_SECONDS:
                break
            base = sample
        span = max(self.every, newest.t - base.t) if base is not _EMPTY else self.every
        if base is _EMPTY and ring:
            # Everything since the first reading (the node started less than a minute ago).
            span = max(self.every, newest.t - ring[0].t + self.every)
        codes = [a - b for a, b in zip(newest.codes, base.codes, strict=True)]
        reasons = {
            reason: count - base.reasons.get(reason, 0)
            for reason, count in newest.reasons.items()
            if count > base.reasons.get(reason, 0)
        }
        if base.buckets and len(base.buckets) == len(newest.buckets):
            buckets = [a - b for a, b in zip(newest.buckets, base.buckets, strict=True)]
        else:
            buckets = list(newest.buckets)
        requests = sum(codes)
        return {
            "requests": requests,
            "rate": round(requests / span, 2),
            "codes": dict(zip(CLASSES, codes, strict=True)),
            "reasons": reasons,
            "retries": newest.retries - base.retries,
            "p50_ms": _ms(quantile(0.5, self.bounds, buckets)),
            "p99_ms": _ms(quantile(0.99, self.bounds, buckets)),
            "inflight": newest.inflight,
        }

    def describe(self, now: float) -> dict[str, Any]:
        """Per route: the last minute's summary, totals since start, the charts' series (2xx,
        4xx and 5xx a second, p50 and p99 in ms, a point per sample, the newest last), and its
        endpoints the same way (attempts, failures, latency; their last ``ENDPOINT_POINTS``
        rates)."""
        by_route: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for key, ring in sorted(self._endpoints.items()):
            summary = self._summary(ring, now)
            points = list(ring)[-ENDPOINT_POINTS:]
            by_route.setdefault(key[:2], []).append(
                {
                    "endpoint": key[2],
                    "attempts": summary["codes"]["2xx"],
                    "rate": summary["rate"],
                    "failed": summary["retries"],
                    "p50_ms": summary["p50_ms"],
                    "p99_ms": summary["p99_ms"],
                    "inflight": summary["inflight"],
                    "history": {"rate": [s.point[0] for s in points]},
                }
            )
        routes = []
        for key, ring in sorted(self._routes.items()):
            summary = self._summary(ring, now)
            reasons = summary.pop("reasons")
            routes.append(
                {
                    "listener": key[0],
                    "route": key[1],
                    **summary,
                    "shed": {r: n for r, n in sorted(reasons.items()) if r in SHED_REASONS},
                    "errors": {r: n for r, n in sorted(reasons.items()) if r not in SHED_REASONS},
                    "totals": dict(zip(CLASSES, ring[-1].codes, strict=True)),
                    "history": {
                        "2xx": [s.point[1] for s in ring],
                        "4xx": [s.point[2] for s in ring],
                        "5xx": [s.point[3] for s in ring],
                        "p50_ms": [s.point[4] for s in ring],
                        "p99_ms": [s.point[5] for s in ring],
                    },
                    "endpoints": by_route.get(key, []),
                }
            )
        # Every series ends with the newest sample and has a point every ``every`` seconds.
        return {
            "every": self.every,
            "keep": self.keep,
            "endpoint_points": ENDPOINT_POINTS,
            "window": SUMMARY_SECONDS,
            "routes": routes,
        }
