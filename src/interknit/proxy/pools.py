"""How the proxy reaches pools and demand control: two small interfaces the node plugs into.

The proxy asks a ``PoolSource`` for the pool of a route once per request (a dict lookup in
practice) and asks that pool for an endpoint per attempt. Results go back through ``report``
so that the pool can do passive outlier detection. Registry-fed pools (``balance/pool.py``)
plug in by satisfying ``PoolLike``; ``StaticPoolSource`` serves routes that list ``servers``.

Demand control plugs in the same way: an ``AdmissionSource`` gives each route an optional
``Admission`` whose ``acquire`` returns a ``Permit`` (go ahead) or ``None`` (answer 503).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Container
from typing import Protocol

from interknit.balance.base import Balancer, Endpoint
from interknit.proxy.spec import RouteSpec


class PoolLike(Protocol):
    """The endpoints of one service behind a balancer.

    A pool may also offer ``pick_sticky(cookie, hash_key, now, exclude) -> (Endpoint | None,
    set_cookie | None)`` (``balance.sticky.StickyCookie.choose`` has that shape): routes with a
    ``sticky_cookie`` then use it, and send its ``Set-Cookie`` value. Without it the proxy
    passes the cookie's value as ``hash_key`` and sets the cookie to the endpoint's key.
    """

    def pick(
        self, hash_key: bytes | None, now: float, exclude: Container[Endpoint] = ()
    ) -> Endpoint | None: ...

    def report(self, endpoint: Endpoint, ok: bool, now: float) -> None: ...


class PoolSource(Protocol):
    def pool(self, route: RouteSpec) -> PoolLike | None:
        """The pool for ``route``; ``None`` when it has none (the proxy answers 503)."""
        ...


class Permit(Protocol):
    def release(self, ok: bool, now: float) -> None: ...


class Admission(Protocol):
    """A route's demand control (``demand.route.RouteAdmission`` has this shape).

    After ``acquire`` returns ``None`` the proxy reads the optional ``last_rejection``
    (``status``, ``reason``, ``retry_header``) for its answer, else 503 ``overloaded``; a
    permit's optional ``forward_timeout()`` becomes the ``X-Request-Timeout`` sent upstream.
    """

    def acquire(
        self,
        now: float,
        *,
        request_timeout: bytes | None = None,
        grpc_timeout: bytes | None = None,
        priority: bytes | None = None,
        client_key: str | None = None,
    ) -> Awaitable[Permit | None]:
        """Wait (perhaps in a queue) for room; ``None`` means rejected. The keyword values
        are the raw ``X-Request-Timeout``, ``grpc-timeout`` and ``X-Priority`` headers and
        the client's address."""
        ...


class AdmissionSource(Protocol):
    def admission(self, route: RouteSpec) -> Admission | None: ...


def parse_server(server: str) -> tuple[str, int]:
    host, _, port = server.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class BalancedPool:
    """A fixed endpoint list behind any ``Balancer``; reports are counted, nothing is ejected."""

    __slots__ = ("balancer", "endpoints", "failures", "successes")

    def __init__(self, endpoints: list[Endpoint], balancer: Balancer, now: float = 0.0) -> None:
        self.endpoints = endpoints
        self.balancer = balancer
        self.successes = 0
        self.failures = 0
        balancer.set_endpoints(endpoints, now)

    def pick(
        self, hash_key: bytes | None, now: float, exclude: Container[Endpoint] = ()
    ) -> Endpoint | None:
        return self.balancer.pick(hash_key, now, exclude)

    def report(self, endpoint: Endpoint, ok: bool, now: float) -> None:
        if ok:
            self.successes += 1
        else:
            self.failures += 1


class StaticPoolSource:
    """Pools for routes that list ``servers``; routes naming a ``service`` go to ``fallback``."""

    def __init__(
        self,
        balancer_factory: Callable[[RouteSpec], Balancer],
        fallback: PoolSource | None = None,
    ) -> None:
        self._factory = balancer_factory
        self._fallback = fallback
        self._pools: dict[RouteSpec, BalancedPool] = {}

    def pool(self, route: RouteSpec) -> PoolLike | None:
        if not route.servers:
            return self._fallback.pool(route) if self._fallback is not None else None
        found = self._pools.get(route)
        if found is None:
            endpoints = []
            for server in route.servers:
                host, port = parse_server(server)
                endpoints.append(Endpoint(key=server, address=host, port=port))
            found = self._pools[route] = BalancedPool(endpoints, self._factory(route))
        return found
