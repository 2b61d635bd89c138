"""Metrics, shaped so that a request touches only plain Python numbers (the access log is
``accesslog.py``).

A prometheus-client child takes a lock and a few calls per ``inc`` or ``observe``, which is a
fair share of a proxied request. So the proxy's families keep their children as bare numbers
(``plainmetrics``), resolved once per (listener, route) and (listener, route,
endpoint), and one collector turns them into the same families (names, labels, buckets,
``_created``) when the registry is scraped. Everything runs on the proxy's event loop; a
scrape from another thread reads numbers that at worst miss a request in flight.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from prometheus_client import CollectorRegistry

from interknit.plainmetrics import Collector, Family

log = logging.getLogger("interknit.proxy")

_STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class ProxyMetrics:
    """The proxy's metric families on one registry; shared by every listener of a node."""

    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, ProxyMetrics] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, registry: CollectorRegistry) -> None:
        route = ["listener", "route"]
        endpoint = ["listener", "route", "endpoint"]
        self.connections = Family(
            "gauge", "interknit_proxy_connections", "Open client connections.", ["listener"]
        )
        self.rejected_connections = Family(
            "counter",
            "interknit_proxy_rejected_connections",
            "Client connections refused over max_connections.",
            ["listener"],
        )
        self.tls_handshakes = Family(
            "counter",
            "interknit_proxy_tls_handshakes",
            "TLS handshakes completed, by whether they resumed a session (ticket or id).",
            ["listener", "resumed"],
        )
        self.tls_failures = Family(
            "counter",
            "interknit_proxy_tls_handshake_failures",
            "TLS handshakes that did not complete, by OpenSSL's reason (lower case), timeout "
            "(not done in header_timeout) or closed (the client left).",
            ["listener", "reason"],
        )
        self.requests = Family(
            "counter",
            "interknit_proxy_requests",
            "Requests (HTTP) or connections (TCP) answered, by status class.",
            [*route, "code"],
        )
        self.errors = Family(
            "counter",
            "interknit_proxy_errors",
            "Requests the proxy answered itself with an error, by reason.",
            [*route, "reason"],
        )
        self.retries = Family("counter", "interknit_proxy_retries", "Retried attempts.", route)
        self.duration = Family(
            "histogram",
            "interknit_proxy_request_duration_seconds",
            "Time from request head to last response byte.",
            route,
        )
        self.inflight = Family("gauge", "interknit_proxy_inflight", "Requests in flight.", route)
        self.endpoint_requests = Family(
            "counter",
            "interknit_proxy_endpoint_requests",
            "Attempts sent to an endpoint.",
            endpoint,
        )
        self.endpoint_errors = Family(
            "counter",
            "interknit_proxy_endpoint_errors",
            "Attempts to an endpoint that failed (connect, reset, timeout, 502-504).",
            endpoint,
        )
        self.endpoint_duration = Family(
            "histogram",
            "interknit_proxy_endpoint_duration_seconds",
            "Time of one attempt against an endpoint.",
            endpoint,
        )
        self.endpoint_inflight = Family(
            "gauge",
            "interknit_proxy_endpoint_inflight",
            "Attempts in flight to an endpoint.",
            endpoint,
        )
        registry.register(
            Collector(
                [
                    self.connections,
                    self.rejected_connections,
                    self.tls_handshakes,
                    self.tls_failures,
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

    def finished(self, took: float, failed: bool) -> None:
        self.inflight.value -= 1
        self.duration.observe(took)
        if failed:
            self.errors.value += 1


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
            self.codes[index].value += 1

    def attempt(self, key: str) -> EndpointStats:
        """An attempt to endpoint ``key`` begins: its stats, counted."""
        found = self.endpoints.get(key)
        if found is None:
            found = self.endpoint(key)
        found.requests.value += 1
        found.inflight.value += 1
        return found

    def retried(self) -> None:
        self.retries.value += 1

    def finished(self, status: int, duration: float, reason: str) -> None:
        """A request was answered (or abandoned) with ``status`` in ``duration`` seconds;
        ``reason`` names the error the proxy answered or saw, if any."""
        index = status // 100 - 1
        if 0 <= index < 5:
            self.codes[index].value += 1
        self.duration.observe(duration)
        if reason:
            self.error(reason)

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

    __slots__ = ("_metrics", "_routes", "connections", "handshakes", "name", "rejected")

    def __init__(self, metrics: ProxyMetrics | None, name: str) -> None:
        self._metrics = metrics
        self.name = name
        self._routes: dict[str, RouteStats] = {}
        self.connections = None if metrics is None else metrics.connections.labels(name)
        self.rejected = None if metrics is None else metrics.rejected_connections.labels(name)
        # Full and resumed handshakes: a resumption share far below the clients' own says
        # tickets are not being reissued or keys not shared between nodes.
        self.handshakes: tuple[Any, Any] | None = (
            None
            if metrics is None
            else (
                metrics.tls_handshakes.labels(name, "no"),
                metrics.tls_handshakes.labels(name, "yes"),
            )
        )

    def handshake(self, transport: Any) -> None:
        """A client connection's TLS handshake is done (not called for plaintext ones)."""
        handshakes = self.handshakes
        if handshakes is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                handshakes[bool(ssl_object.session_reused)].value += 1

    def handshake_failed(self, reason: str) -> None:
        log.debug("TLS handshake failed on %s: %s", self.name, reason)
        if self._metrics is not None:
            self._metrics.tls_failures.labels(self.name, reason).value += 1

    def route(self, label: str) -> RouteStats | None:
        if self._metrics is None:
            return None
        found = self._routes.get(label)
        if found is None:
            found = self._routes[label] = RouteStats(self._metrics, self.name, label)
        return found
