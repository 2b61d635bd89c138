"""Every key of a route takes effect on reload: the part of the proxy that acts on it is rebuilt.

The table names each key of ``[[listeners.routes]]`` (nested tables by their dotted path) with
another valid value; a test checks that the table covers every key the config model has, so a
new key cannot be added without saying how a reload carries it. For each key, the proxy is
started with the base route and reloaded with that one key changed: the route's state on the
listener (its spec, pool and admission) must differ in what the key feeds, and a reload that
changes nothing must keep all three (rate-limit buckets, ejections and limits survive it).
``test_reload_node.py`` watches the same through a real node's proxy, key by key.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from interknit.config import parse_config
from interknit.demand.config import DemandSection
from interknit.proxy.component import ProxyComponent
from interknit.proxy.config import ListenerSection, RouteSection
from interknit.proxy.exchange import RouteState
from interknit.registry.state import RegistryState

BASE_ROUTE: dict[str, Any] = {
    "service": "search",
    "demand": {"concurrency": "adaptive", "rate": "100/s", "client_rate": "10/s"},
}

# key path -> (what it feeds: "spec", "pool" or "admission", the changed value)
CHANGES: dict[str, tuple[str, Any]] = {
    "name": ("spec", "renamed"),
    "match.host": ("spec", "example.com"),
    "match.path": ("spec", "/exact"),
    "match.path_prefix": ("spec", "/prefix"),
    "match.path_regex": ("spec", "^/re"),
    "match.method": ("spec", "POST"),
    "match.headers": ("spec", {"x-a": "1"}),
    "service": ("spec", "other"),
    "servers": ("spec", ["127.0.0.1:9"]),
    "balance": ("spec", "least_requests"),
    "hash_on": ("spec", "header:x-user"),
    "sticky.cookie": ("spec", "ik"),
    "retries.attempts": ("spec", 0),
    "retries.budget": ("spec", 0.5),
    "retries.min": ("spec", 9),
    "retries.backoff": ("spec", "25ms"),
    "timeout": ("spec", "3s"),
    "connect_timeout": ("spec", "1s"),
    "response_timeout": ("spec", "5s"),
    "idle_timeout": ("spec", "5s"),
    "slow_start": ("pool", "30s"),
    "panic_threshold": ("pool", 0.9),
    "outlier.enabled": ("pool", False),
    "outlier.consecutive_failures": ("pool", 2),
    "outlier.base_ejection_time": ("pool", "5s"),
    "outlier.max_ejection_time": ("pool", "60s"),
    "outlier.max_ejection_percent": ("pool", 10.0),
    "outlier.interval": ("pool", "3s"),
    "demand.concurrency": ("admission", 8),
    "demand.limit": ("admission", "aimd"),
    "demand.queue": ("admission", 0),
    "demand.queue_timeout": ("admission", "1s"),
    "demand.rate": ("admission", "1000/s"),
    "demand.burst": ("admission", 7),
    "demand.rate_key": ("admission", "header:x-key"),
    "demand.client_rate": ("admission", "5/s"),
    "demand.client_burst": ("admission", 3),
    "demand.client_key": ("admission", "header:x-api-key"),
    "demand.priority": ("admission", "sheddable"),
    "demand.reserve": ("admission", 0.3),
    # TLS (docs/tls.md). Files are made when first needed (see tls_file).
    "match.sni": ("spec", "db.example.com"),  # on a tcp listener (see sections)
    "upstream_tls.ca": ("spec", "CA"),
    "upstream_tls.cert": ("spec", "CLIENT_CERT"),
    "upstream_tls.key": ("spec", "CLIENT_KEY"),
    "upstream_tls.sni": ("spec", "backend.example.com"),
    "upstream_tls.verify": ("spec", False),
    "upstream_tls.min_version": ("spec", "1.3"),
    "redirect_https": ("spec", True),
    "https_port": ("spec", 8443),
    "hsts.max_age": ("spec", 600),
    "hsts.include_subdomains": ("spec", True),
    "hsts.preload": ("spec", True),
}
_FILES: dict[str, str] = {}


def tls_file(name: str) -> str:
    """A CA file, or a client certificate or its key, made with openssl once."""
    if not _FILES:
        import tempfile
        from pathlib import Path

        from tests.tlscerts import TestCA

        ca = TestCA(Path(tempfile.mkdtemp(prefix="ik-reload-keys-")))
        client = ca.issue("client", ips=(), usage="clientAuth")
        _FILES.update(CA=str(ca.cert), CLIENT_CERT=str(client.cert), CLIENT_KEY=str(client.key))
    return _FILES[name]


def leaf_keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every key of a section, nested sections by their dotted path."""
    for name, field in model.model_fields.items():
        inner = [
            t
            for t in (getattr(field.annotation, "__args__", None) or (field.annotation,))
            if isinstance(t, type) and issubclass(t, BaseModel)
        ]
        if inner and name != "demand":
            yield from leaf_keys(inner[0], f"{prefix}{name}.")
        elif name == "demand":
            yield from leaf_keys(DemandSection, f"{prefix}{name}.")
        else:
            yield prefix + name


def test_the_table_covers_every_route_key() -> None:
    assert set(leaf_keys(RouteSection)) == set(CHANGES)


def changed_route(path: str, value: Any) -> dict[str, Any]:
    route = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE_ROUTE.items()}
    if path == "servers":
        route.pop("service")
    if path == "demand.rate_key":
        route["demand"].pop("client_rate")
    if path == "redirect_https":
        route.pop("service")  # a redirecting route sends nowhere
    if path in ("upstream_tls.cert", "upstream_tls.key"):
        route["upstream_tls"] = {"cert": tls_file("CLIENT_CERT"), "key": tls_file("CLIENT_KEY")}
        return route
    if value in ("CA", "CLIENT_CERT", "CLIENT_KEY"):
        value = tls_file(value)
    *parents, leaf = path.split(".")
    table = route
    for parent in parents:
        table = table.setdefault(parent, {})
    table[leaf] = value
    return route


def sections(route: dict[str, Any]) -> list[ListenerSection]:
    # Routes match by SNI on tcp listeners only: that one reloads into a tcp listener.
    protocol = "tcp" if "sni" in route.get("match", {}) else "http"
    listener = {"name": "web", "listen": "127.0.0.1:0", "protocol": protocol, "routes": [route]}
    return parse_config({"listeners": [listener]}).listeners


def route_state(proxy: ProxyComponent) -> tuple[RouteState, Any, Any]:
    state = proxy.listeners["web"].routing[1][0]
    return state, proxy.pools.pool(state.spec), state.admission


async def _noop(service: str, instance_id: str, until: float | None) -> None:
    return None


@pytest.fixture
async def proxy() -> Any:
    component = ProxyComponent(
        sections(BASE_ROUTE),
        state=RegistryState,
        set_ejected=_noop,
        metrics=CollectorRegistry(),
        secret=b"s" * 32,
    )
    await component.start()
    yield component
    await component.stop()


async def test_a_reload_that_changes_nothing_keeps_pool_and_admission(
    proxy: ProxyComponent,
) -> None:
    _, pool, admission = route_state(proxy)
    await proxy.reload(sections(BASE_ROUTE))
    _, pool_after, admission_after = route_state(proxy)
    assert pool_after is pool and admission_after is admission
    assert len(proxy.admissions.gates()) == 1


@pytest.mark.parametrize("path", sorted(CHANGES))
async def test_each_route_key_takes_effect_on_reload(proxy: ProxyComponent, path: str) -> None:
    feeds, value = CHANGES[path]
    state, pool, admission = route_state(proxy)
    await proxy.reload(sections(changed_route(path, value)))
    state_after, pool_after, admission_after = route_state(proxy)
    if feeds == "spec":
        assert state_after.spec != state.spec
    elif feeds == "pool":
        assert state_after.spec == state.spec
        assert pool_after is not pool
        assert pool_after.options != pool.options
    else:
        assert state_after.spec == state.spec and pool_after is pool
        assert admission_after is not admission
        # The old gate is forgotten (the status page and metrics show the new one only).
        assert proxy.admissions.gates() == [admission_after.gate]
