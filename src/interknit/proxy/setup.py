"""The node's side of the proxy: TOML listeners to specs, pool options and demand settings.

The pools that follow the registry are ``pool_feed.py``'s.
"""

from __future__ import annotations

from collections.abc import Sequence

from interknit.config import ListenerSection, RouteSection
from interknit.demand.settings import DemandSettings
from interknit.names import parse_hostport
from interknit.proxy.pool_feed import PoolOptions
from interknit.proxy.spec import ListenerSpec, MatchSpec, RouteSpec


def route_spec(section: RouteSection) -> RouteSpec:
    match = None
    if section.match is not None:
        m = section.match
        headers = tuple(
            (name, None if value is True else str(value)) for name, value in m.headers.items()
        )
        match = MatchSpec(
            host=m.host,
            path_exact=m.path,
            path_prefix=m.path_prefix,
            path_regex=m.path_regex,
            method=m.method,
            headers=headers,
        )
    return RouteSpec(
        match=match,
        service=section.service,
        servers=tuple(section.servers),
        name=section.name,
        balance=section.balance,
        hash_on=section.hash_on,
        sticky_cookie=None if section.sticky is None else section.sticky.cookie,
        attempts=section.retries.attempts,
        retry_budget=section.retries.budget,
        retry_min=section.retries.min,
        retry_backoff=section.retries.backoff,
        timeout=section.timeout,
        connect_timeout=section.connect_timeout,
        response_timeout=section.response_timeout,
        idle_timeout=section.idle_timeout,
    )


def listener_spec(section: ListenerSection) -> ListenerSpec:
    host, port = parse_hostport(section.listen, port_zero=True)
    return ListenerSpec(
        name=section.name,
        host=host,
        port=port,
        protocol=section.protocol,
        max_connections=section.max_connections,
        header_timeout=section.header_timeout,
        keepalive_timeout=section.keepalive_timeout,
        max_header_bytes=section.max_header_bytes,
        max_headers=section.max_headers,
        abort_on_close=section.abort_on_close,
        upstream_max_idle=section.upstream_max_idle,
        upstream_idle_timeout=section.upstream_idle_timeout,
        routes=tuple(route_spec(r) for r in section.routes),
    )


def pool_options(sections: Sequence[ListenerSection]) -> dict[RouteSpec, PoolOptions]:
    out: dict[RouteSpec, PoolOptions] = {}
    for listener in sections:
        for route in listener.routes:
            out[route_spec(route)] = PoolOptions(
                slow_start=route.slow_start or 0.0,
                panic_threshold=route.panic_threshold,
                outlier=route.outlier if route.outlier.enabled else None,
            )
    return out


def demand_settings(sections: Sequence[ListenerSection]) -> dict[RouteSpec, DemandSettings]:
    """Each route's demand-control settings, keyed the way the proxy asks for them."""
    out: dict[RouteSpec, DemandSettings] = {}
    for listener in sections:
        for route in listener.routes:
            if route.demand is not None:
                out[route_spec(route)] = DemandSettings.from_dict(route.demand.model_dump())
    return out
