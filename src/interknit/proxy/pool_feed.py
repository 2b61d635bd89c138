"""Registry-fed pools: the proxy's adapter between the registry's instances and events and the
sans-IO ``balance.Pool``, which knows nothing of the registry.

Pools are keyed by route. Registry events update every pool of the event's service in the
same callback that updates DNS, so a pool changes within one event. The proxy passes its
loop's monotonic time; pools and ejections live on the registry's wall-clock, so the adapter
reads ``time.time()`` itself.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import Any

from interknit.balance.base import Endpoint
from interknit.balance.pool import Pool, make_balancer
from interknit.balance.sticky import StickyCookie
from interknit.endpoints import endpoint_state, endpoint_states
from interknit.proxy.config import OutlierSection
from interknit.proxy.spec import RouteSpec
from interknit.registry.model import Event
from interknit.registry.state import RegistryState


@dataclass(frozen=True, slots=True)
class PoolOptions:
    """A route's pool settings that the proxy's RouteSpec does not carry."""

    slow_start: float = 0.0
    panic_threshold: float = 0.5
    outlier: OutlierSection | None = field(default_factory=OutlierSection)


# Reports a passive failure or success of an endpoint; returns nothing, may eject.
Reporter = Callable[["RoutePool", Endpoint, bool, float], None]


class WallClock:
    """Wall-clock time from the caller's monotonic ``now``, reading ``time.time()`` once a second.

    Per request, ``time.time()`` is a measurable share of the proxy's work; the offset between
    the two clocks drifts by far less than a second in a second. A ``now`` outside the window
    the offset was read for (another clock, or one that went back) reads the clock afresh.
    """

    __slots__ = ("offset", "since", "until")

    # How long (on the caller's clock) one reading of the offset serves.
    PERIOD = 1.0

    def __init__(self) -> None:
        self.offset = 0.0
        self.since = 0.0
        self.until = -1.0

    def __call__(self, now: float) -> float:
        if self.since <= now < self.until:
            return now + self.offset
        wall = time.time()
        self.offset = wall - now
        self.since = now
        self.until = now + self.PERIOD
        return wall


class RoutePool:
    """A route's ``balance.Pool`` as the proxy's ``PoolLike``, with its sticky cookie."""

    __slots__ = ("clock", "options", "pool", "reporter", "service", "sticky")

    def __init__(
        self,
        pool: Pool,
        service: str | None,
        sticky: StickyCookie | None,
        reporter: Reporter,
        options: PoolOptions,
        clock: WallClock | None = None,
    ) -> None:
        self.pool = pool
        self.service = service
        self.sticky = sticky
        self.reporter = reporter
        self.options = options
        self.clock = clock or WallClock()

    def pick(
        self, hash_key: bytes | None, now: float, exclude: Container[Endpoint] = ()
    ) -> Endpoint | None:
        return self.pool.pick(hash_key, self.clock(now), exclude)

    def report(self, endpoint: Endpoint, ok: bool, now: float) -> None:
        self.reporter(self, endpoint, ok, self.clock(now))

    def pick_sticky(
        self,
        cookie: str | None,
        hash_key: bytes | None,
        now: float,
        exclude: Container[Endpoint] = (),
    ) -> tuple[Endpoint | None, str | None]:
        if self.sticky is None:
            return self.pool.pick(hash_key, self.clock(now), exclude), None
        return self.sticky.choose(cookie, self.pool, hash_key, self.clock(now), exclude)


class RegistryPools:
    """Every route's pool; registry-backed ones follow events, static ones keep their list."""

    def __init__(
        self,
        state: Callable[[], RegistryState],
        secret: bytes,
        reporter: Reporter | None = None,
        rng: random.Random | None = None,
        options: dict[RouteSpec, PoolOptions] | None = None,
    ) -> None:
        self._state = state
        self._options = options or {}
        self._secret = secret
        self._reporter: Reporter = reporter or (lambda pool, ep, ok, now: None)
        self._rng = rng
        self._pools: dict[RouteSpec, RoutePool] = {}
        # The same pools by the identity of the spec asked with: a frozen spec hashes every
        # field each time, and the proxy asks with the same object for every request. The
        # spec is held with its pool, so that its id is not reused while cached.
        self._by_id: dict[int, tuple[RouteSpec, RoutePool]] = {}
        self._clock = WallClock()
        self._by_service: dict[str, list[RoutePool]] = {}

    def set_reporter(self, reporter: Reporter) -> None:
        self._reporter = reporter
        for route_pool in self._pools.values():
            route_pool.reporter = reporter

    def pool(self, route: RouteSpec) -> RoutePool | None:
        cached = self._by_id.get(id(route))
        if cached is not None and cached[0] is route:
            return cached[1]
        found = self._pools.get(route)
        if found is None:
            found = self._build(route)
        self._by_id[id(route)] = (route, found)
        return found

    def _build(self, route: RouteSpec) -> RoutePool:
        now = time.time()
        options = self._options.get(route, PoolOptions())
        balancer = make_balancer(route.balance, rng=self._rng, slow_start=options.slow_start)
        panic = options.panic_threshold
        if route.service is None:
            pool = Pool.for_servers(
                route.servers, balancer, now, name=route.label, panic_threshold=panic
            )
        else:
            pool = Pool(route.service, balancer, panic_threshold=panic)
            pool.update(endpoint_states(self._state().instances(route.service)), now)
        sticky = None
        if route.sticky_cookie is not None:
            sticky = StickyCookie(self._secret, route.sticky_cookie)
        found = RoutePool(pool, route.service, sticky, self._reporter, options, self._clock)
        self._pools[route] = found
        if route.service is not None:
            self._by_service.setdefault(route.service, []).append(found)
        return found

    def prepare(self, routes: Sequence[RouteSpec]) -> None:
        """Build pools up front so that the first request finds them, and drop old ones.

        A route whose pool options changed (``slow_start``, ``panic_threshold``, ``outlier``:
        the keys its spec does not carry) gets a new pool, as a changed spec does; a route that
        did not change keeps its pool, with its ejections, slow starts and counts."""
        wanted = set(routes)
        self._by_id.clear()
        for route in list(self._pools):
            if route not in wanted or self._pools[route].options != self._options.get(
                route, PoolOptions()
            ):
                old = self._pools.pop(route)
                if old.service is not None:
                    self._by_service[old.service].remove(old)
        for route in routes:
            self.pool(route)

    def apply(self, events: Sequence[Event]) -> None:
        now = time.time()
        for event in events:
            pools = self._by_service.get(event.instance.service)
            if not pools:
                continue
            if event.type == "delete":
                key = f"{event.instance.service}/{event.instance.id}"
                for route_pool in pools:
                    route_pool.pool.remove(key, now)
            else:
                state = endpoint_state(event.instance)
                for route_pool in pools:
                    route_pool.pool.put(state, now)

    def resync(self) -> None:
        now = time.time()
        state = self._state()
        for service, pools in self._by_service.items():
            states = endpoint_states(state.instances(service))
            for route_pool in pools:
                route_pool.pool.update(states, now)

    def refresh(self) -> None:
        """Let ejections run out and slow starts advance even when no event arrives."""
        now = time.time()
        for route_pool in self._pools.values():
            route_pool.pool.refresh(now)

    def pools(self) -> list[Pool]:
        """The pools in use now."""
        return [route_pool.pool for route_pool in self._pools.values()]

    def describe(self) -> list[dict[str, Any]]:
        """One row per route's pool. ``state`` says at a glance whether it can serve: ``ok``,
        ``panic`` (too few usable: balancing over every endpoint), ``down`` (endpoints, none
        usable: requests fail) or ``empty`` (no endpoint at all: 503)."""
        rows = []
        for route, route_pool in self._pools.items():
            pool = route_pool.pool
            if pool.total == 0:
                state = "empty"
            elif pool.usable_count == 0:
                state = "down"
            elif pool.panic:
                state = "panic"
            else:
                state = "ok"
            rows.append(
                {
                    "route": route.label,
                    "pool": route.service or "static",
                    "balance": route.balance,
                    "state": state,
                    "usable": pool.usable_count,
                    "total": pool.total,
                    "panic": pool.panic,
                    "inflight": sum(ep.inflight for ep in pool.endpoints),
                }
            )
        return rows


async def refresh_forever(
    pools: RegistryPools, tick: Callable[[float], None] | None = None, every: float = 1.0
) -> None:
    while True:
        await asyncio.sleep(every)
        if tick is not None:
            tick(time.time())
        pools.refresh()
