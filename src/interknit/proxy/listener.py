"""Listeners: an address, its routes, and the life of its connections.

The node builds one listener per ``ListenerSpec`` with ``build_listener`` and then calls
``await start()``, ``update(spec)`` when the config changes (routes swap for the next request;
open connections stay) and ``await stop(drain_timeout)``, which stops accepting, lets requests
in flight finish and closes what is left when the time is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import replace
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
from interknit.tls.client import ClientTls, ClientTlsSpec
from interknit.tls.files import TlsFileError
from interknit.tls.server import ServerTls, sni_matches
from interknit.tls.transport import TlsServerConnection

log = logging.getLogger("interknit.proxy")

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
        service_tls: Mapping[str, ClientTlsSpec] | None = None,
    ) -> None:
        spec.validate()
        self.service_tls = dict(service_tls or {})
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
        # TLS this listener terminates (its certificates reload in place), and the client
        # contexts of its routes' upstreams, one per distinct setting.
        self.tls: ServerTls | None = None if spec.tls is None else ServerTls(spec.tls)
        self.upstream_tls: dict[ClientTlsSpec, ClientTls] = {}
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
            self.protocol_factory if self.tls is None else self.tls_factory,
            self.spec.host,
            self.spec.port,
            reuse_address=True,
            reuse_port=self.spec.reuse_port or None,
            backlog=1024,
        )

    def tls_factory(self) -> asyncio.Protocol:
        """A TLS connection in front of the listener's protocol. Its handshake counts against
        header_timeout: the protocol's wait for the first head runs from the accept too (see
        HttpProxyProtocol)."""
        assert self.tls is not None
        return TlsServerConnection(
            self.protocol_factory(),
            self.tls.context,
            self.loop,
            self.spec.header_timeout,
            self.stats.handshake_failed,
        )

    def update(self, spec: ListenerSpec) -> None:
        """Swap routes, limits and certificates; the address, the protocol and whether it
        terminates TLS stay the same (TlsFileError: a certificate is unusable, nothing
        changed)."""
        spec.validate()
        if not self.same_socket(spec):
            raise ValueError("update() cannot change a listener's address, protocol or TLS")
        routing = self._compile(spec)  # new upstream certificates checked first
        if self.tls is not None and spec.tls is not None and spec.tls != self.spec.tls:
            self.tls.reload(spec.tls)
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
        self.routing = routing

    def same_socket(self, spec: ListenerSpec) -> bool:
        """Whether ``spec`` can be applied to this listener's server socket in place."""
        old = self.spec
        return (spec.host, spec.port, spec.protocol, spec.tls is None) == (
            old.host,
            old.port,
            old.protocol,
            old.tls is None,
        )

    def check_tls_files(self, force: bool = False) -> str | None:
        """Reload certificates and keys whose files changed (the node calls this every
        second), or all of them (``force``: SIGHUP). Returns what happened, for the log: None
        when nothing changed, the key at fault and why (``tls.cert: ...``) when refused."""
        changed: list[str] = []
        tls = self.tls
        if tls is not None and (force or tls.files_changed()):
            try:
                tls.reload(tls.spec)
            except TlsFileError as exc:
                tls.stamps = tls.current_stamps()  # said once per change, not every second
                return f"tls.{exc}"
            changed.append("certificates")
        for client in self.upstream_tls.values():
            try:
                if client.refresh(force):
                    changed.append("upstream_tls")
            except TlsFileError as exc:
                client.stamps = client.current_stamps()
                return f"upstream_tls.{exc}"
        return ", ".join(changed) or None

    def rotate_tickets(self) -> None:
        if self.tls is not None:
            self.tls.rotate_tickets()

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
        if self.tls is not None:  # a TLS connection opens once its handshake is done
            self.stats.handshake(conn.transport)
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
        self._compile_tls(spec)
        router = Router(spec.routes)
        budgets: dict[RouteSpec, RetryBudget] = {}
        states = []
        for route in router.routes:
            budget = self._budgets.get(route.spec) or budgets.get(route.spec)
            if budget is None:
                budget = RetryBudget(route.spec.retry_budget, route.spec.retry_min)
            budgets[route.spec] = budget
            states.append(self._state(spec, route, budget))
        self._budgets = budgets
        return router, tuple(states)

    def _compile_tls(self, spec: ListenerSpec) -> None:
        # Contexts are kept across updates for settings that stay: their connections too.
        clients: dict[ClientTlsSpec, ClientTls] = {}
        for route in spec.routes:
            found = self._upstream_spec(route)
            if found is not None and found not in clients:
                clients[found] = self.upstream_tls.get(found) or ClientTls(self._client(found))
        self.upstream_tls = clients

    def _client(self, spec: ClientTlsSpec) -> ClientTlsSpec:
        return spec

    def _upstream_spec(self, route: RouteSpec) -> ClientTlsSpec | None:
        """The route's upstream_tls, or its service's ([[services]] upstream_tls)."""
        if route.upstream_tls is not None or route.service is None:
            return route.upstream_tls
        return self.service_tls.get(route.service)

    def _state(self, spec: ListenerSpec, route: CompiledRoute, budget: RetryBudget) -> RouteState:
        admission = None if self.admission is None else self.admission.admission(route.spec)
        upstream = self._upstream_spec(route.spec)
        return RouteState(
            route,
            budget,
            self.stats.route(route.label),
            admission,
            spec.header_timeout,
            https=spec.tls is not None,
            upstream_tls=None if upstream is None else self.upstream_tls[upstream],
            upstreams=self._upstreams_for(
                None if upstream is None else self.upstream_tls[upstream]
            ),
        )

    def _upstreams_for(self, tls: ClientTls | None) -> UpstreamPool | None:
        """The connection pool of routes with these upstream TLS settings (HTTP only)."""
        return None


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
        service_tls: Mapping[str, ClientTlsSpec] | None = None,
    ) -> None:
        loop = loop or asyncio.get_running_loop()
        self._own_upstreams = upstreams is None
        self.upstreams = upstreams or UpstreamPool(
            loop, spec.upstream_max_idle, spec.upstream_idle_timeout
        )
        # Pools of connections made over TLS, one per setting (the routes' upstream_tls).
        self.tls_upstreams: dict[ClientTls, UpstreamPool] = {}
        super().__init__(
            spec, pools, admission=admission, metrics=metrics, loop=loop, service_tls=service_tls
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

    def _client(self, spec: ClientTlsSpec) -> ClientTlsSpec:
        # Upstreams that also speak h2 pick HTTP/1.1 by ALPN rather than by assumption.
        return replace(spec, alpn=("http/1.1",)) if not spec.alpn else spec

    def _upstreams_for(self, tls: ClientTls | None) -> UpstreamPool | None:
        if tls is None:
            return self.upstreams
        found = self.tls_upstreams.get(tls)
        if found is None:
            found = self.tls_upstreams[tls] = UpstreamPool(
                self.loop,
                self.upstreams.max_idle,
                self.upstreams.idle_timeout,
                tls=tls,
                batch=self.upstreams.batch,
            )
        return found

    def _compile(self, spec: ListenerSpec) -> tuple[Router, tuple[RouteState, ...]]:
        routing = super()._compile(spec)
        # Pools of TLS settings no route uses any more: their idle connections go.
        for tls in [t for t in self.tls_upstreams if t not in self.upstream_tls.values()]:
            self.tls_upstreams.pop(tls).close()
        return routing

    def _flush(self) -> None:
        self.upstreams.batch.flush()

    def _closed(self) -> None:
        if self._own_upstreams:
            self.upstreams.close()
        for pool in self.tls_upstreams.values():
            pool.close()


class TcpListener(Listener):
    """A TCP relay on one address: every connection goes to one endpoint of one route's pool,
    the route chosen by the TLS server name when routes match by ``sni``."""

    @property
    def route_state(self) -> RouteState:
        """The route taken without a server name (the last, when it has no match)."""
        return self.routing[1][-1]

    @property
    def routes_by_sni(self) -> bool:
        return any(state.spec.match is not None for state in self.routing[1])

    def choose(self, sni: str | None) -> RouteState | None:
        """The first route whose ``sni`` matches (exactly, or ``*.`` one label deep), else the
        route without match; None: no route takes it."""
        for state in self.routing[1]:
            match = state.spec.match
            if match is None:
                return state
            if sni is not None and match.sni is not None and sni_matches(match.sni, sni):
                return state
        return None

    def protocol_factory(self) -> asyncio.Protocol:
        return TcpProxyProtocol(self)


def build_listener(
    spec: ListenerSpec,
    pools: PoolSource,
    *,
    admission: AdmissionSource | None = None,
    metrics: ProxyMetrics | CollectorRegistry | None = None,
    upstreams: UpstreamPool | None = None,
    service_tls: Mapping[str, ClientTlsSpec] | None = None,
) -> HttpListener | TcpListener:
    """The listener for ``spec`` (call inside the running loop; then ``await start()``).
    ``service_tls``: how to reach each service's endpoints when a route does not say."""
    if spec.protocol == "tcp":
        return TcpListener(
            spec, pools, admission=admission, metrics=metrics, service_tls=service_tls
        )
    return HttpListener(
        spec,
        pools,
        admission=admission,
        metrics=metrics,
        upstreams=upstreams,
        service_tls=service_tls,
    )
