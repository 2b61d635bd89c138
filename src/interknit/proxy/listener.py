"""Listeners: an address, its routes, and the life of its connections.

The node builds one listener per ``ListenerSpec`` with ``build_listener`` and then calls
``await start()``, ``update(spec)`` when the config changes (routes swap for the next request;
open connections stay) and ``await stop(drain_timeout)``, which stops accepting, lets requests
in flight finish and closes what is left when the time is up.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from prometheus_client import CollectorRegistry

from interknit.http1 import headcache
from interknit.http1.headcache import HeadCache
from interknit.proxy.accesslog import AccessLog
from interknit.proxy.exchange import RouteState
from interknit.proxy.http import HttpProxyProtocol
from interknit.proxy.observe import ListenerStats, ProxyMetrics, RouteStats
from interknit.proxy.pools import AdmissionSource, PoolSource
from interknit.proxy.request import RequestHead
from interknit.proxy.retry import RetryBudget
from interknit.proxy.routing import CompiledRoute, Router
from interknit.proxy.spec import ListenerSpec, RouteSpec
from interknit.proxy.tcp import TcpProxyProtocol
from interknit.proxy.upstream import UpstreamPool
from interknit.proxy.wire import RequestIds

_NO_ROUTE = "-"


class Listener:
    """What HTTP and TCP listeners share: the server socket, connection count and draining."""

    def __init__(
        self,
        spec: ListenerSpec,
        pools: PoolSource,
        *,
        admission: AdmissionSource | None = None,
        metrics: ProxyMetrics | CollectorRegistry | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        spec.validate()
        self.spec = spec
        self.pools = pools
        self.admission = admission
        self.loop = loop or asyncio.get_running_loop()
        if isinstance(metrics, CollectorRegistry):
            metrics = ProxyMetrics.for_registry(metrics)
        self.stats = ListenerStats(metrics, spec.name)
        self.server: asyncio.Server | None = None
        self.connections: set[Any] = set()
        self.stopping = False
        self._drained: asyncio.Event | None = None
        self._budgets: dict[RouteSpec, RetryBudget] = {}
        self.routing: tuple[Router, tuple[RouteState, ...]] = self._compile(spec)
        # Opened by start(); None when the spec says "off".
        self.access: AccessLog | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with ``port = 0``)."""
        if self.server is not None and self.server.sockets:
            return int(self.server.sockets[0].getsockname()[1])
        return self.spec.port

    @property
    def address(self) -> tuple[str, int]:
        return (self.spec.host, self.port)

    def protocol_factory(self) -> asyncio.Protocol:
        raise NotImplementedError

    def _access_log(self, spec: ListenerSpec) -> AccessLog | None:
        """The access log ``spec`` asks for, opened (raises OSError), or None."""
        if spec.access_log == "off":
            return None
        access = AccessLog(
            spec.access_log, spec.name, json_lines=spec.access_log_json, loop=self.loop
        )
        access.open()
        return access

    async def start(self) -> None:
        """Open the access log (OSError if it cannot be), then accept."""
        self.access = self._access_log(self.spec)
        self.server = await self.loop.create_server(
            self.protocol_factory,
            self.spec.host,
            self.spec.port,
            reuse_address=True,
            reuse_port=self.spec.reuse_port or None,
            backlog=1024,
        )

    def update(self, spec: ListenerSpec) -> None:
        """Swap routes and limits; the address and protocol must stay the same."""
        spec.validate()
        if (spec.host, spec.port, spec.protocol) != (
            self.spec.host,
            self.spec.port,
            self.spec.protocol,
        ):
            raise ValueError("update() cannot change a listener's address or protocol")
        old = self.spec
        if (spec.access_log, spec.access_log_json, spec.name) != (
            old.access_log,
            old.access_log_json,
            old.name,
        ):
            # Opened first: a path that cannot be opened changes nothing (OSError).
            access = self._access_log(spec)
            if self.access is not None:
                self.access.close()
            self.access = access
        self.spec = spec
        self.routing = self._compile(spec)

    def reopen_access_log(self) -> None:
        """Open the access log's file anew (SIGUSR1, after logrotate renamed it)."""
        if self.access is not None:
            self.access.reopen()

    def flush_access_log(self) -> None:
        if self.access is not None:
            self.access.flush()

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop accepting; wait up to ``drain_timeout`` for requests in flight, then close."""
        self.stopping = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_timeout):
                    await self._drained.wait()
        self._flush()
        for conn in list(self.connections):
            conn.transport.abort()
        self._closed()
        await asyncio.sleep(0)
        # After the aborted connections' last lines (their connection_lost ran in that turn).
        if self.access is not None:
            self.access.close()

    def _flush(self) -> None:
        """Send what is queued for the connections, before they are cut."""

    def _closed(self) -> None:
        """Release what the listener itself owns, after its connections are gone."""

    # Connection accounting (called by the protocols)

    def connection_opened(self, conn: Any) -> bool:
        if len(self.connections) >= self.spec.max_connections or self.stopping:
            if self.stats.rejected is not None:
                self.stats.rejected.inc()
            return False
        self.connections.add(conn)
        if self.stats.connections is not None:
            self.stats.connections.inc()
        return True

    def connection_closed(self, conn: Any) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            if self.stats.connections is not None:
                self.stats.connections.dec()
        if not self.connections and self._drained is not None:
            self._drained.set()

    def no_route_stats(self) -> RouteStats | None:
        return self.stats.route(_NO_ROUTE)

    def _compile(self, spec: ListenerSpec) -> tuple[Router, tuple[RouteState, ...]]:
        router = Router(spec.routes)
        budgets: dict[RouteSpec, RetryBudget] = {}
        states = []
        for route in router.routes:
            budget = self._budgets.get(route.spec) or budgets.get(route.spec)
            if budget is None:
                budget = RetryBudget(route.spec.retry_budget, route.spec.retry_min)
            budgets[route.spec] = budget
            states.append(self._state(route, budget))
        self._budgets = budgets
        return router, tuple(states)

    def _state(self, route: CompiledRoute, budget: RetryBudget) -> RouteState:
        admission = None if self.admission is None else self.admission.admission(route.spec)
        return RouteState(
            route, budget, self.stats.route(route.label), admission, self.spec.header_timeout
        )


class HttpListener(Listener):
    """An HTTP/1.1 reverse proxy on one address."""

    def __init__(
        self,
        spec: ListenerSpec,
        pools: PoolSource,
        *,
        admission: AdmissionSource | None = None,
        metrics: ProxyMetrics | CollectorRegistry | None = None,
        upstreams: UpstreamPool | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(spec, pools, admission=admission, metrics=metrics, loop=loop)
        self._own_upstreams = upstreams is None
        self.upstreams = upstreams or UpstreamPool(
            self.loop, spec.upstream_max_idle, spec.upstream_idle_timeout
        )
        self.request_ids = RequestIds()
        # Request heads by their bytes; emptied when the spec changes (limits may have).
        self.heads: HeadCache[RequestHead] = HeadCache(
            min(spec.max_header_bytes, headcache.MAX_BYTES)
        )

    def update(self, spec: ListenerSpec) -> None:
        super().update(spec)
        self.heads.clear()

    def protocol_factory(self) -> asyncio.Protocol:
        return HttpProxyProtocol(self)

    def _flush(self) -> None:
        self.upstreams.batch.flush()

    def _closed(self) -> None:
        if self._own_upstreams:
            self.upstreams.close()


class TcpListener(Listener):
    """A TCP relay on one address: every connection goes to one endpoint of one pool."""

    @property
    def route_state(self) -> RouteState:
        return self.routing[1][0]

    def protocol_factory(self) -> asyncio.Protocol:
        return TcpProxyProtocol(self)


def build_listener(
    spec: ListenerSpec,
    pools: PoolSource,
    *,
    admission: AdmissionSource | None = None,
    metrics: ProxyMetrics | CollectorRegistry | None = None,
    upstreams: UpstreamPool | None = None,
) -> HttpListener | TcpListener:
    """The listener for ``spec`` (call inside the running loop; then ``await start()``)."""
    if spec.protocol == "tcp":
        return TcpListener(spec, pools, admission=admission, metrics=metrics)
    return HttpListener(spec, pools, admission=admission, metrics=metrics, upstreams=upstreams)
