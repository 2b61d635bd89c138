"""Metric families whose children are bare Python numbers, turned into Prometheus families only
when the registry is scraped.

A prometheus-client child takes a lock and a few calls per ``inc`` or ``observe``, which is a
fair share of a proxied request or an API write. These families keep the same names, labels,
buckets and ``_created`` samples, so a scrape cannot tell them apart. Everything runs on one
event loop; a scrape from another thread reads numbers that at worst miss a request in flight.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

Kind = Literal["counter", "gauge", "histogram"]
DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Value:
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


class Histogram:
    """A histogram's child: a count per bucket (not cumulative; the last is +Inf) and a sum."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # The first bound >= amount: Prometheus buckets are "less than or equal". Most
        # observations fall in the first bucket, which needs no search.
        bounds = self.bounds
        self.counts[0 if amount <= bounds[0] else bisect_left(bounds, amount)] += 1
        self.sum += amount


class Family:
    """One metric family: its children by label values, made on first use."""

    __slots__ = ("bucket_labels", "buckets", "children", "doc", "kind", "labelnames", "name")

    def __init__(
        self,
        kind: Kind,
        name: str,
        doc: str,
        labelnames: Sequence[str] = (),
        buckets: tuple[float, ...] = DEFAULT_BUCKETS,
    ) -> None:
        self.kind = kind
        self.name = name
        self.doc = doc
        self.labelnames = list(labelnames)
        self.buckets = buckets
        # As prometheus-client writes ``le`` (its floatToGoString gives str() for such bounds).
        self.bucket_labels = (*(str(b) for b in buckets), "+Inf")
        self.children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = Histogram(self.buckets) if self.kind == "histogram" else Value()
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
                for label, count in zip(self.bucket_labels, list(child.counts), strict=True):
                    total += count
                    buckets.append((label, float(total)))
                family.add_metric(values, buckets, child.sum)
                family.add_sample(
                    self.name + "_created",
                    dict(zip(self.labelnames, values, strict=True)),
                    child.created,
                )
        return family


class Collector:
    """Registers a list of families with a prometheus-client registry."""

    def __init__(self, families: Sequence[Family]) -> None:
        self._families = list(families)

    def describe(self) -> Iterator[Metric]:
        for family in self._families:
            yield family.empty()

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            yield family.collect()
