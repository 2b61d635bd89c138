"""The TCP (L4) data plane: each client connection is piped to one endpoint, bytes both ways.

Bytes arriving before the upstream connection is up are held (reading pauses beyond a small
buffer). Each side pauses the other's reading when its write buffer is full, and an EOF from
one side becomes a ``write_eof`` on the other (half-close), so protocols that finish sending
before they finish reading still work. The connection closes when both sides are done.

A connection that moves no byte either way for its route's ``idle_timeout`` is closed, as
HAProxy's ``timeout client`` and ``timeout server`` do in ``mode tcp``: a client that went away
without a FIN (or an upstream that hangs) must not hold a connection slot for ever. One timer
per connection, re-armed only when it fires early: each chunk just notes the time.

Routes may match the server name a TLS client asks for (``match = { sni = ... }``). Without
terminating, the relay holds the client's first bytes until they make a whole ClientHello
(``tls.clienthello``, within ``header_timeout``), picks the route by its name, and forwards
those very bytes; the upstream terminates. A listener with ``tls`` terminates itself and picks
by the name the handshake saw. Either way, a route may reach its endpoints over TLS
(``upstream_tls``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from time import monotonic
from typing import TYPE_CHECKING

from interknit.balance.base import Endpoint
from interknit.balance.pool import HASHING_POLICIES
from interknit.tls.clienthello import NotClientHello, read_client_hello
from interknit.tls.server import sni_of

if TYPE_CHECKING:
    from interknit.proxy.exchange import RouteState
    from interknit.proxy.listener import TcpListener

log = logging.getLogger(__name__)

BUFFER_HIGH = 64 * 1024
# How long a closed TLS connection waits for its peer's close_notify (uvloop's default: 30 s).
TLS_SHUTDOWN_TIMEOUT = 5.0


class TcpUpstream(asyncio.Protocol):
    def __init__(self, client: TcpProxyProtocol) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client
        client.bytes_out += len(data)
        client.last_activity = client.loop.time()
        client.transport.write(data)

    def eof_received(self) -> bool | None:
        self.client.upstream_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost()

    def pause_writing(self) -> None:
        self.client.pause_client_reading()

    def resume_writing(self) -> None:
        self.client.resume_client_reading()


class TcpProxyProtocol(asyncio.Protocol):
    def __init__(self, listener: TcpListener) -> None:
        # Global state
        self.listener = listener
        self.loop = listener.loop
        # Per-connection state
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.upstream: TcpUpstream | None = None
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.client_paused = False
        self.client_eof = False
        self.server_eof = False
        self.closed = False
        self.rejected = False
        self.endpoint: Endpoint | None = None
        self.task: asyncio.Task[None] | None = None
        self.client = b""  # the client's address
        self.bytes_in = 0
        self.bytes_out = 0
        self.status = 0
        self.reason = ""
        self.retries = 0
        self.last_activity = 0.0  # when a byte last moved either way
        self.idle_timer: asyncio.TimerHandle | None = None
        self.idle_timer_at = 0.0
        # The route, once known: at once, or when the ClientHello has told the name.
        self.route: RouteState | None = None
        self.sni: str | None = None
        # Made at the accept: over TLS, connection_made comes after the handshake.
        self.started = listener.loop.time()
        self.began = monotonic()  # for the access log's duration (the loop counts ms)

    # Protocol interface

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = transport  # type: ignore[assignment]
        peer = self.transport.get_extra_info("peername")
        self.client = str(peer[0]).encode() if peer else b""
        listener = self.listener
        if not listener.connection_opened(self):
            self.rejected = True
            self.transport.abort()
            access = self.listener.access
            if access is not None:
                now = monotonic()
                label = self.listener.route_state.label
                access.tcp(now, now, label, self.client, 503, "", 0, 0, 0, "max-connections")
            return
        self.last_activity = self.loop.time()
        if listener.tls is not None:
            self.sni = sni_of(self.transport.get_extra_info("ssl_object"))
        elif listener.routes_by_sni:
            # Wait for the ClientHello; the timer bounds the wait by header_timeout.
            self.arm_idle_timer(self.started + listener.spec.header_timeout)
            return
        self.route_to(listener.choose(self.sni))

    def route_to(self, route: RouteState | None) -> None:
        if route is None:
            self.fail(404, "no-route")
            return
        self.route = route
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.arm_idle_timer(self.last_activity + route.spec.idle_timeout)
        self.task = self.loop.create_task(self.connect(route))

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.last_activity = self.loop.time()
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.write(data)
            return
        self.buffer.append(data)
        self.buffered += len(data)
        if self.buffered > BUFFER_HIGH:
            self.pause_client_reading()
        if self.route is None and not self.closed:
            self.read_hello()

    def read_hello(self) -> None:
        """Route by the ClientHello's server name once it is whole (HAProxy's req.ssl_sni)."""
        listener = self.listener
        try:
            hello = read_client_hello(b"".join(self.buffer))
        except NotClientHello:
            # Not TLS: a route without match may still take it (a plaintext protocol on the
            # same port), as HAProxy's default_backend does.
            route = listener.choose(None)
            if route is None:
                self.fail(400, "not-tls")
                return
            self.route_to(route)
            return
        if hello is None:
            return
        self.sni = hello.sni
        self.route_to(listener.choose(hello.sni))

    def eof_received(self) -> bool | None:
        self.client_eof = True
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            if self.server_eof:
                self.close()
            elif upstream.transport.can_write_eof():
                upstream.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.rejected:
            return
        self.closed = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.close()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.finish()
        self.listener.connection_closed(self)

    def pause_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.resume_reading()

    # Upstream side

    async def connect(self, state: RouteState) -> None:
        listener = self.listener
        spec = state.spec
        pool = listener.pools.pool(spec)
        if pool is None:
            self.fail(503, "no-pool")
            return
        tried: list[Endpoint] = []
        budget = state.budget
        budget.request_started()
        try:
            while not self.closed:
                endpoint = pool.pick(self.client_key(), self.loop.time(), tried)
                if endpoint is None:
                    self.fail(
                        503 if not tried else 502, "no-endpoint" if not tried else self.reason
                    )
                    return
                self.endpoint = endpoint
                tls = state.tls
                try:
                    if tls is None:
                        connecting = self.loop.create_connection(
                            lambda: TcpUpstream(self), endpoint.address, endpoint.port
                        )
                    else:
                        connecting = self.loop.create_connection(
                            lambda: TcpUpstream(self),
                            endpoint.address,
                            endpoint.port,
                            ssl=tls.context,
                            server_hostname=tls.spec.server_hostname(endpoint.address),
                            ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
                        )
                    _, upstream = await asyncio.wait_for(connecting, spec.connect_timeout)
                except (OSError, TimeoutError) as exc:
                    if isinstance(exc, TimeoutError):
                        self.reason = "connect-timeout"
                    elif isinstance(exc, ssl.SSLError):
                        self.reason = "tls-failed"
                        log.warning("TLS to %s failed: %s", endpoint, exc)
                    else:
                        self.reason = "connect-failed"
                    pool.report(endpoint, False, self.loop.time())
                    tried.append(endpoint)
                    if self.retries < spec.attempts and budget.try_acquire():
                        budget.release()
                        self.retries += 1
                        continue
                    self.fail(502, self.reason)
                    return
                endpoint.started()
                pool.report(endpoint, True, self.loop.time())
                self.reason = ""
                if self.closed:
                    upstream.transport.close()
                    endpoint.finished()
                    return
                self.upstream = upstream
                self.status = 200
                transport = upstream.transport
                assert transport is not None
                if self.buffer:
                    transport.write(b"".join(self.buffer))
                    self.buffer = []
                self.resume_client_reading()
                if self.client_eof and transport.can_write_eof():
                    transport.write_eof()
                return
        finally:
            budget.request_finished()

    def client_key(self) -> bytes | None:
        assert self.route is not None
        spec = self.route.spec
        if spec.balance in HASHING_POLICIES:
            return self.client or None
        return None

    def upstream_eof(self) -> None:
        self.server_eof = True
        if self.client_eof:
            self.close()
        elif self.transport.can_write_eof():
            self.transport.write_eof()

    def upstream_lost(self) -> None:
        if self.endpoint is not None and self.upstream is not None:
            self.endpoint.finished()
        self.close()

    def pause_client_reading(self) -> None:
        if not self.client_paused:
            self.client_paused = True
            self.transport.pause_reading()

    def resume_client_reading(self) -> None:
        if self.client_paused:
            self.client_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def arm_idle_timer(self, when: float) -> None:
        self.idle_timer_at = when
        self.idle_timer = self.loop.call_at(when, self.on_idle_timer)

    def on_idle_timer(self) -> None:
        self.idle_timer = None
        if self.closed:
            return
        route = self.route
        if route is None:
            self.fail(408, "hello-timeout")
            return
        # Bytes moved since it was armed: not yet idle for long enough. (The deadline is not
        # compared with the clock, which may read a hair before the time the handle was set for.)
        deadline = self.last_activity + route.spec.idle_timeout
        if deadline > self.idle_timer_at:
            self.arm_idle_timer(deadline)
            return
        self.reason = "idle-timeout"
        self.close()

    def fail(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        self.close()

    def close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.close()

    def finish(self) -> None:
        listener = self.listener
        state = self.route
        now = self.loop.time()
        stats = state.stats if state is not None else listener.no_route_stats()
        if stats is not None:
            stats.count(self.status or 499)
            stats.duration.observe(now - self.started)
            if self.reason:
                stats.error(self.reason)
        access = listener.access
        if access is not None:
            ep = self.endpoint
            access.tcp(
                monotonic(),
                self.began,
                state.label if state is not None else "-",
                self.client,
                self.status or 499,  # as counted: the client left before a connection was made
                ep.key if ep is not None else "",
                self.bytes_in,
                self.bytes_out,
                self.retries,
                self.reason,
            )

    def shutdown(self) -> None:
        """TCP connections carry no request boundary: draining waits for them to end."""
