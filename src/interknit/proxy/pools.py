"""How the proxy reaches pools and demand control: small interfaces the node plugs into.

The proxy asks a ``PoolSource`` for the pool of a route once per request (a dict lookup in
practice) and asks that pool for an endpoint per attempt. Results go back through ``report``
so that the pool can do passive outlier detection. Registry-fed pools plug in by satisfying
``PoolLike``; ``StaticPoolSource`` serves routes that list ``servers``.

Demand control plugs in the same way: an ``AdmissionSource`` gives each route an optional
``Admission`` whose ``admit`` returns a ``Ticket``: admitted, refused (the proxy answers its
status with ``Retry-After``), or queued until a callback says which.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Protocol

from interknit.balance.base import Balancer, Endpoint
from interknit.names import parse_hostport
from interknit.proxy.spec import RouteSpec


class PoolLike(Protocol):
    """The endpoints of one service behind a balancer."""

    def pick(
        self, hash_key: bytes | None, now: float, exclude: Container[Endpoint] = ()
    ) -> Endpoint | None: ...

    def pick_sticky(
        self,
        cookie: str | None,
        hash_key: bytes | None,
        now: float,
        exclude: Container[Endpoint] = (),
    ) -> tuple[Endpoint | None, str | None]:
        """For a route with a sticky cookie: the endpoint its value ``cookie`` names if it can
        take the request, else a pick; and the ``Set-Cookie`` value to send, if any."""
        ...

    def report(self, endpoint: Endpoint, ok: bool, now: float) -> None: ...


class PoolSource(Protocol):
    def pool(self, route: RouteSpec) -> PoolLike | None:
        """The pool for ``route``; ``None`` when it has none (the proxy answers 503).

        The same route gets the same pool for as long as a listener routes by it: a listener
        asks once per route (and again while the answer is None), not per request."""
        ...


class Ticket(Protocol):
    """One request before demand control (``demand.route.Ticket`` is one)."""

    @property
    def admitted(self) -> bool: ...

    @property
    def refused(self) -> bool:
        """Refused: answer ``status`` with ``reason`` and ``Retry-After: retry_after``."""
        ...

    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str: ...

    @property
    def retry_after(self) -> int: ...

    def forward_timeout(self) -> str | None:
        """Admitted: the ``X-Request-Timeout`` to send upstream (the time left), or None."""
        ...

    def release(self, ok: bool, now: float) -> None:
        """Admitted: the exchange is over (``ok`` False: it failed or timed out upstream)."""
        ...

    def cancel(self) -> None:
        """Queued: the request is gone; give its place up."""
        ...


class Admission(Protocol):
    """A route's demand control (``demand.route.RouteAdmission`` is one)."""

    # The lower-case header whose value names the client for per-client limits; None: the
    # client's address does (as it does for a request without that header).
    client_header: bytes | None

    def admit(
        self,
        now: float,
        *,
        request_timeout: bytes | None = None,
        grpc_timeout: bytes | None = None,
        priority: bytes | None = None,
        client_key: str | None = None,
        on_decided: Callable[[], None],
    ) -> Ticket:
        """Admit, refuse, or queue; a queued ticket calls ``on_decided`` once it is admitted
        or refused, from a later turn of the loop, unless cancelled. The keyword values are
        the raw ``X-Request-Timeout``, ``grpc-timeout`` and ``X-Priority`` headers and the
        client's address."""
        ...


class AdmissionSource(Protocol):
    def admission(self, route: RouteSpec) -> Admission | None: ...


class BalancedPool:
    """A fixed endpoint list behind any ``Balancer``; reports are counted, nothing is ejected.

    Its sticky cookie names the endpoint's key in plain text (a test and static-route
    convenience); registry-fed pools use ``balance.sticky.StickyCookie``'s opaque tokens.
    """

    __slots__ = ("balancer", "cookie_name", "endpoints", "failures", "successes")

    def __init__(
        self,
        endpoints: list[Endpoint],
        balancer: Balancer,
        now: float = 0.0,
        cookie_name: str | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.balancer = balancer
        self.cookie_name = cookie_name
        self.successes = 0
        self.failures = 0
        balancer.set_endpoints(endpoints, now)

    def pick(
        self, hash_key: bytes | None, now: float, exclude: Container[Endpoint] = ()
    ) -> Endpoint | None:
        return self.balancer.pick(hash_key, now, exclude)

    def pick_sticky(
        self,
        cookie: str | None,
        hash_key: bytes | None,
        now: float,
        exclude: Container[Endpoint] = (),
    ) -> tuple[Endpoint | None, str | None]:
        key = cookie.encode() if cookie is not None else hash_key
        endpoint = self.balancer.pick(key, now, exclude)
        if endpoint is None or endpoint.key == cookie or self.cookie_name is None:
            return endpoint, None
        return endpoint, f"{self.cookie_name}={endpoint.key}; Path=/; HttpOnly"

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
                host, port = parse_hostport(server)
                endpoints.append(Endpoint(key=server, address=host, port=port))
            found = self._pools[route] = BalancedPool(
                endpoints, self._factory(route), cookie_name=route.sticky_cookie
            )
        return found
