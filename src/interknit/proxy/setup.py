"""From ``[[listeners]]`` sections to what the proxy's parts are given besides their specs:
each route's pool options and demand-control settings, keyed by the route's spec.

The sections and their specs are ``config.py``'s; the pools that follow the registry are
``pool_feed.py``'s.
"""

from __future__ import annotations

from collections.abc import Sequence

from interknit.demand.settings import DemandSettings
from interknit.proxy.config import ListenerSection
from interknit.proxy.pool_feed import PoolOptions
from interknit.proxy.spec import ListenerSpec, RouteSpec


def listener_spec(section: ListenerSection) -> ListenerSpec:
    """The listener's spec (``ListenerSection.to_spec``), under the name callers know."""
    return section.to_spec()


def pool_options(sections: Sequence[ListenerSection]) -> dict[RouteSpec, PoolOptions]:
    out: dict[RouteSpec, PoolOptions] = {}
    for listener in sections:
        for route in listener.routes:
            out[route.to_spec()] = PoolOptions(
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
                out[route.to_spec()] = DemandSettings.from_dict(route.demand.model_dump())
    return out
