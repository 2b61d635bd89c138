"""The registry's Prometheus metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from interknit.registry.model import HEALTH_STATES, Event
from interknit.registry.state import RegistryState


class RegistryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registrations = Counter(
            "interknit_registry_registrations",
            "Instances registered (new registrations and changed re-registrations).",
            ["kind"],
            registry=registry,
        )
        self.deregistrations = Counter(
            "interknit_registry_deregistrations",
            "Instances removed, by reason (deregister: by request; expire: deregister_after).",
            ["reason"],
            registry=registry,
        )
        self.lease_expiries = Counter(
            "interknit_registry_lease_expiries",
            "TTL leases that ran out without a heartbeat.",
            registry=registry,
        )
        self.health_changes = Counter(
            "interknit_registry_health_changes",
            "Health changes recorded by the registry, by new health.",
            ["health"],
            registry=registry,
        )
        self.watchers = Gauge(
            "interknit_registry_watchers",
            "Open watch streams and blocking queries.",
            ["kind"],
            registry=registry,
        )
        self.commits = Counter(
            "interknit_registry_commits",
            "Store commits (each may carry the writes of many concurrent requests).",
            registry=registry,
        )
        self.committed_events = Counter(
            "interknit_registry_committed_events",
            "Events made durable by store commits.",
            registry=registry,
        )
        for kind in ("watch", "blocking"):
            self.watchers.labels(kind)
        for reason in ("deregister", "expire"):
            self.deregistrations.labels(reason)
        for kind in ("new", "update"):
            self.registrations.labels(kind)
        self._new = self.registrations.labels("new")
        self._update = self.registrations.labels("update")
        self._children: dict[tuple[str, str], Any] = {}

    def observe(self, events: Sequence[Event]) -> None:
        # Children looked up once: .labels() takes a lock and hashes on every call.
        children = self._children
        for event in events:
            if event.type == "delete":
                child = children.get(("del", event.reason))
                if child is None:
                    child = children[("del", event.reason)] = self.deregistrations.labels(
                        event.reason
                    )
                child.inc()
            elif event.reason == "register":
                self._new.inc()
            elif event.reason == "update":
                self._update.inc()
            elif event.reason in ("health", "lease"):
                health = event.instance.health
                child = children.get(("health", health))
                if child is None:
                    child = children[("health", health)] = self.health_changes.labels(health)
                child.inc()
                if event.reason == "lease":
                    self.lease_expiries.inc()


class StateCollector(Collector):
    """Reads the registry's size and revision at scrape time instead of tracking every change."""

    def __init__(self, state: Callable[[], RegistryState], stale: Callable[[], bool]) -> None:
        self._state = state
        self._stale = stale

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self._state()
        revision = GaugeMetricFamily(
            "interknit_registry_revision", "The registry's current revision."
        )
        revision.add_metric([], state.revision)
        yield revision
        services = GaugeMetricFamily("interknit_registry_services", "Registered services.")
        services.add_metric([], len(state.service_names()))
        yield services
        counts = dict.fromkeys(HEALTH_STATES, 0)
        for inst in state.all_instances():
            counts[inst.health] += 1
        instances = GaugeMetricFamily(
            "interknit_registry_instances", "Registered instances by health.", labels=["health"]
        )
        for health, n in counts.items():
            instances.add_metric([health], n)
        yield instances
        stale = GaugeMetricFamily(
            "interknit_registry_stale", "1 while the node serves a copy it cannot refresh."
        )
        stale.add_metric([], 1 if self._stale() else 0)
        yield stale
