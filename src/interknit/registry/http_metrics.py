"""The registry API's request counts and latencies, kept by both its aiohttp application
(admin/app.py) and its fast path (registry/fastpath.py) in one pair of families.

It lives in registry/ because it counts the registry's API; the admin application imports it
from here (dependencies point down: admin -> registry).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from interknit.plainmetrics import Collector, Family, Histogram, Value


class HttpMetrics:
    """API request counts and latencies, as plain numbers folded into families at scrape time
    (prometheus-client's children cost a lock and a few calls per request)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Family(
            "counter",
            "interknit_http_requests",
            "API requests by endpoint, method and status code.",
            ["endpoint", "method", "code"],
        )
        self.latency = Family(
            "histogram",
            "interknit_http_request_duration_seconds",
            "API request latency by endpoint (blocking queries and watches excluded).",
            ["endpoint"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.refused = Family(
            "counter",
            "interknit_http_refused",
            "API requests refused before any handler saw them, by reason (headers-too-large, "
            "uri-too-long, too-many-headers, malformed, internal).",
            ["reason"],
        )
        registry.register(Collector([self.requests, self.latency, self.refused]))
        # Each (endpoint, method, status)'s two children, found with one lookup per request.
        self._children: dict[tuple[str, str, int], tuple[Value, Histogram]] = {}

    def observe(self, endpoint: str, method: str, status: int, seconds: float | None) -> None:
        """Count one request; ``seconds`` None leaves the latency out (it waited on purpose)."""
        key = (endpoint, method, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(endpoint, method, str(status)),
                self.latency.labels(endpoint),
            )
            self._children[key] = children
        children[0].inc()
        if seconds is not None:
            children[1].observe(seconds)
