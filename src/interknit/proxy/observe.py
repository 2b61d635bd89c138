"""Metrics and the access log, shaped so that a request touches only plain Python numbers.

A prometheus-client child takes a lock and a few calls per ``inc`` or ``observe``, which is a
fair share of a proxied request. So the proxy's families keep their children as bare numbers
(``_Value``, ``_Histogram``), resolved once per (listener, route) and (listener, route,
endpoint), and one collector turns them into the same families (names, labels, buckets,
``_created``) when the registry is scraped. Everything runs on the proxy's event loop; a
scrape from another thread reads numbers that at worst miss a request in flight.
"""

from __future__ import annotations

import logging
import time
import weakref
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

access_log = logging.getLogger("interknit.access")

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# As prometheus-client writes ``le`` (its floatToGoString gives str() for bounds like these).
_BUCKET_LABELS = (*(str(b) for b in BUCKETS), "+Inf")
_STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class _Value:
    """A counter's or a gauge's child: one number."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class _Histogram:
    """A histogram's child: a count per bucket (not cumulative; the last is +Inf) and a sum.

    The proxy's hot path does what ``observe`` does inline (``http.Exchange.finish``)."""

    __slots__ = ("counts", "created", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # The first bound >= amount: Prometheus buckets are "less than or equal".
        self.counts[bisect_left(BUCKETS, amount)] += 1
        self.sum += amount


class _Family:
    """One metric family: its children by label values, made on first use."""

    __slots__ = ("children", "doc", "kind", "labelnames", "name")

    def __init__(self, kind: str, name: str, doc: str, labelnames: list[str]) -> None:
        self.kind = kind
        self.name = name
        self.doc = doc
        self.labelnames = labelnames
        self.children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = _Histogram() if self.kind == "histogram" else _Value()
            self.children[values] = child
        return child

    def empty(self) -> Metric:
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        if self.kind == "gauge":
            return GaugeMetricFamily(self.name, self.doc, labels=self.labelnames)
        return HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)

    def collect(self) -> Metric:
        family = self.empty()
        # list() copies in one step under the GIL, so a child added meanwhile is no error.
        for values, child in list(self.children.items()):
            if isinstance(family, CounterMetricFamily):
                family.add_metric(values, child.value, created=child.created)
            elif isinstance(family, GaugeMetricFamily):
                family.add_metric(values, child.value)
            elif isinstance(family, HistogramMetricFamily):
                buckets = []
                total = 0
                for label, count in zip(_BUCKET_LABELS, list(child.counts), strict=True):
                    total += count
                    buckets.append((label, float(total)))
                family.add_metric(values, buckets, child.sum)
                family.add_sample(
                    self.name + "_created",
                    dict(zip(self.labelnames, values, strict=True)),
                    child.created,
                )
        return family


class _Collector:
    def __init__(self, families: list[_Family]) -> None:
        self._families = families

    def describe(self) -> Iterator[Metric]:
        for family in self._families:
            yield family.empty()

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            yield family.collect()


class ProxyMetrics:
    """The proxy's metric families on one registry; shared by every listener of a node."""

    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, ProxyMetrics] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, registry: CollectorRegistry) -> None:
        route = ["listener", "route"]
        endpoint = ["listener", "route", "endpoint"]
        self.connections = _Family(
            "gauge", "interknit_proxy_connections", "Open client connections.", ["listener"]
        )
        self.rejected_connections = _Family(
            "counter",
            "interknit_proxy_rejected_connections",
            "Client connections refused over max_connections.",
            ["listener"],
        )
        self.requests = _Family(
            "counter",
            "interknit_proxy_requests",
            "Requests (HTTP) or connections (TCP) answered, by status class.",
            [*route, "code"],
        )
        self.errors = _Family(
            "counter",
            "interknit_proxy_errors",
            "Requests the proxy answered itself with an error, by reason.",
            [*route, "reason"],
        )
        self.retries = _Family("counter", "interknit_proxy_retries", "Retried attempts.", route)
        self.duration = _Family(
            "histogram",
            "interknit_proxy_request_duration_seconds",
            "Time from request head to last response byte.",
            route,
        )
        self.inflight = _Family("gauge", "interknit_proxy_inflight", "Requests in flight.", route)
        self.endpoint_requests = _Family(
            "counter",
            "interknit_proxy_endpoint_requests",
            "Attempts sent to an endpoint.",
            endpoint,
        )
        self.endpoint_errors = _Family(
            "counter",
            "interknit_proxy_endpoint_errors",
            "Attempts to an endpoint that failed (connect, reset, timeout, 502-504).",
            endpoint,
        )
        self.endpoint_duration = _Family(
            "histogram",
            "interknit_proxy_endpoint_duration_seconds",
            "Time of one attempt against an endpoint.",
            endpoint,
        )
        self.endpoint_inflight = _Family(
            "gauge",
            "interknit_proxy_endpoint_inflight",
            "Attempts in flight to an endpoint.",
            endpoint,
        )
        registry.register(
            _Collector(
                [
                    self.connections,
                    self.rejected_connections,
                    self.requests,
                    self.errors,
                    self.retries,
                    self.duration,
                    self.inflight,
                    self.endpoint_requests,
                    self.endpoint_errors,
                    self.endpoint_duration,
                    self.endpoint_inflight,
                ]
            )
        )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> ProxyMetrics:
        """One instance per registry: families may be registered only once."""
        found = cls._by_registry.get(registry)
        if found is None:
            found = cls._by_registry[registry] = cls(registry)
        return found


class EndpointStats:
    __slots__ = ("duration", "errors", "inflight", "requests")

    def __init__(self, metrics: ProxyMetrics, labels: tuple[str, str, str]) -> None:
        self.requests = metrics.endpoint_requests.labels(*labels)
        self.errors = metrics.endpoint_errors.labels(*labels)
        self.duration = metrics.endpoint_duration.labels(*labels)
        self.inflight = metrics.endpoint_inflight.labels(*labels)


class RouteStats:
    """Pre-resolved metric children of one route on one listener."""

    __slots__ = (
        "_errors",
        "_labels",
        "_metrics",
        "codes",
        "duration",
        "endpoints",
        "inflight",
        "retries",
    )

    def __init__(self, metrics: ProxyMetrics, listener: str, route: str) -> None:
        self._metrics = metrics
        self._labels = (listener, route)
        self.codes: tuple[Any, ...] = tuple(
            metrics.requests.labels(listener, route, c) for c in _STATUS_CLASSES
        )
        self.duration = metrics.duration.labels(listener, route)
        self.inflight = metrics.inflight.labels(listener, route)
        self.retries = metrics.retries.labels(listener, route)
        self._errors: dict[str, Any] = {}
        # Read directly on the hot path (endpoint() makes a missing one).
        self.endpoints: dict[str, EndpointStats] = {}

    def count(self, status: int) -> None:
        index = status // 100 - 1
        if 0 <= index < 5:
            self.codes[index].inc()

    def error(self, reason: str) -> None:
        child = self._errors.get(reason)
        if child is None:
            child = self._errors[reason] = self._metrics.errors.labels(*self._labels, reason)
        child.inc()

    def endpoint(self, key: str) -> EndpointStats:
        found = self.endpoints.get(key)
        if found is None:
            found = self.endpoints[key] = EndpointStats(self._metrics, (*self._labels, key))
        return found


class ListenerStats:
    """A listener's view of the metrics: its route children, made on first use."""

    __slots__ = ("_metrics", "_routes", "connections", "name", "rejected")

    def __init__(self, metrics: ProxyMetrics | None, name: str) -> None:
        self._metrics = metrics
        self.name = name
        self._routes: dict[str, RouteStats] = {}
        self.connections = None if metrics is None else metrics.connections.labels(name)
        self.rejected = None if metrics is None else metrics.rejected_connections.labels(name)

    def route(self, label: str) -> RouteStats | None:
        if self._metrics is None:
            return None
        found = self._routes.get(label)
        if found is None:
            found = self._routes[label] = RouteStats(self._metrics, self.name, label)
        return found
