"""The status page's traffic history: counters read every few seconds into rings, windows by
differences, quantiles from buckets. Time is passed in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from interknit.plainmetrics import DEFAULT_BUCKETS
from interknit.proxy.observe import ListenerStats, ProxyMetrics
from interknit.proxy.traffic import TrafficHistory, quantile


def test_quantile_interpolates_within_the_bucket() -> None:
    bounds = (0.01, 0.1, 1.0)
    assert quantile(0.5, bounds, [0, 0, 0, 0]) is None
    assert quantile(0.5, bounds, [10, 0, 0, 0]) == pytest.approx(0.005)
    assert quantile(0.5, bounds, [0, 10, 0, 0]) == pytest.approx(0.055)
    assert quantile(0.99, bounds, [90, 0, 10, 0]) == pytest.approx(0.1 + 0.9 * 0.9)
    assert quantile(0.99, bounds, [0, 0, 0, 5]) == 1.0  # beyond the last bound: that bound


@given(st.lists(st.integers(0, 50), min_size=len(DEFAULT_BUCKETS) + 1, max_size=14))
def test_quantiles_are_ordered_and_bounded(counts: list[int]) -> None:
    p50 = quantile(0.5, DEFAULT_BUCKETS, counts)
    p99 = quantile(0.99, DEFAULT_BUCKETS, counts)
    if sum(counts) == 0:
        assert p50 is None and p99 is None
    else:
        assert p50 is not None and p99 is not None
        assert 0.0 <= p50 <= p99 <= DEFAULT_BUCKETS[-1]


def test_routes_and_endpoints_over_the_last_minute() -> None:
    metrics = ProxyMetrics(CollectorRegistry())
    history = TrafficHistory(metrics, every=2.0, keep=100)
    route = ListenerStats(metrics, "web").route("search")
    assert route is not None
    history.sample(1000.0)
    # An old minute: 100 answers, then nothing for a while.
    for _ in range(100):
        route.finished(200, 0.002, "")
    history.sample(1002.0)
    for t in range(1004, 1070, 2):
        history.sample(float(t))
    # The last minute: 10 ok, 3 rate-limited, 2 failed upstream, a retry, slow answers.
    for _ in range(10):
        route.finished(200, 0.3, "")
        ep = route.attempt("search/a")
        ep.finished(0.3, False)
    for _ in range(3):
        route.finished(429, 0.0001, "rate")
    for _ in range(2):
        route.finished(502, 0.01, "connect-failed")
        route.attempt("search/b").finished(0.01, True)
    route.retried()
    history.sample(1070.0)
    [row] = history.describe(1070.0)["routes"]
    assert row["requests"] == 15 and row["codes"]["2xx"] == 10 and row["codes"]["4xx"] == 3
    assert row["codes"]["5xx"] == 2 and row["retries"] == 1
    assert row["shed"] == {"rate": 3} and row["errors"] == {"connect-failed": 2}
    assert row["totals"]["2xx"] == 110  # since start
    assert row["rate"] == pytest.approx(15 / 60, rel=0.1)
    assert 250 <= row["p99_ms"] <= 500
    # The chart's last point is the last interval (2 s); the first points the old burst.
    assert row["history"]["2xx"][-1] == 5.0 and row["history"]["4xx"][-1] == 1.5
    assert row["history"]["2xx"][1] == 50.0
    endpoints = {e["endpoint"]: e for e in row["endpoints"]}
    assert endpoints["search/a"]["attempts"] == 10 and endpoints["search/a"]["failed"] == 0
    assert endpoints["search/b"]["failed"] == 2


def test_a_quiet_route_costs_no_quantiles_and_reads_zero() -> None:
    metrics = ProxyMetrics(CollectorRegistry())
    history = TrafficHistory(metrics)
    route = ListenerStats(metrics, "web").route("idle")
    assert route is not None
    route.finished(200, 0.001, "")
    for t in range(0, 300, 3):
        history.sample(float(t))
    [row] = history.describe(300.0)["routes"]
    assert row["requests"] == 0 and row["p50_ms"] is None and row["totals"]["2xx"] == 1
    assert len(row["history"]["2xx"]) == 100  # the ring keeps its size
