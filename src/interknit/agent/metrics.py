"""The container agent's Prometheus metrics, served on ``--metrics-listen`` at ``/metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.writes = Counter(
            "interknit_agent_writes",
            "Registry writes the agent made, by kind (register, deregister) and result.",
            ["write", "result"],
            registry=self.registry,
        )
        self.events = Counter(
            "interknit_agent_engine_events",
            "Container events read from the engine, by action.",
            ["action"],
            registry=self.registry,
        )
        self.reconnects = Counter(
            "interknit_agent_engine_reconnects",
            "Times the engine's event stream was opened again after it closed or broke.",
            registry=self.registry,
        )
        self.running = Gauge(
            "interknit_agent_containers_running",
            "Running containers the engine listed or reported.",
            registry=self.registry,
        )
        self.owned = Gauge(
            "interknit_agent_registrations_owned",
            "Registrations the agent holds in the registry.",
            registry=self.registry,
        )
        self.connected = Gauge(
            "interknit_agent_engine_connected",
            "1 while the engine's event stream is open.",
            registry=self.registry,
        )

    def serve(self, host: str, port: int) -> None:
        """Serve ``/metrics`` from a thread of its own (the agent has no other HTTP server)."""
        start_http_server(port, host, registry=self.registry)
