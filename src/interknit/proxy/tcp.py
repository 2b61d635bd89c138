"""The TCP (L4) data plane: each client connection is piped to one endpoint, bytes both ways.

Bytes arriving before the upstream connection is up are held (reading pauses beyond a small
buffer). Each side pauses the other's reading when its write buffer is full, and an EOF from
one side becomes a ``write_eof`` on the other (half-close), so protocols that finish sending
before they finish reading still work. The connection closes when both sides are done.

A connection that moves no byte either way for its route's ``idle_timeout`` is closed, as
HAProxy's ``timeout client`` and ``timeout server`` do in ``mode tcp``: a client that went away
without a FIN (or an upstream that hangs) must not hold a connection slot for ever. One timer
per connection, re-armed only when it fires early: each chunk just notes the time.
"""

from __future__ import annotations

import asyncio
import logging
from time import monotonic
from typing import TYPE_CHECKING

from interknit.balance.base import Endpoint
from interknit.balance.pool import HASHING_POLICIES

if TYPE_CHECKING:
    from interknit.proxy.listener import TcpListener

log = logging.getLogger(__name__)

BUFFER_HIGH = 64 * 1024


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
        self.started = 0.0
        self.began = 0.0  # for the access log's duration (the loop counts milliseconds)
        self.client = b""  # the client's address
        self.bytes_in = 0
        self.bytes_out = 0
        self.status = 0
        self.reason = ""
        self.retries = 0
        self.last_activity = 0.0  # when a byte last moved either way
        self.idle_timer: asyncio.TimerHandle | None = None
        self.idle_timer_at = 0.0

    # Protocol interface

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = transport  # type: ignore[assignment]
        peer = self.transport.get_extra_info("peername")
        self.client = str(peer[0]).encode() if peer else b""
        if not self.listener.connection_opened(self):
            self.rejected = True
            self.transport.abort()
            access = self.listener.access
            if access is not None:
                now = monotonic()
                label = self.listener.route_state.label
                access.tcp(now, now, label, self.client, 503, "", 0, 0, 0, "max-connections")
            return
        self.started = self.last_activity = self.loop.time()
        self.began = monotonic()
        self.arm_idle_timer(self.started + self.listener.route_state.spec.idle_timeout)
        self.task = self.loop.create_task(self.connect())

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

    async def connect(self) -> None:
        listener = self.listener
        state = listener.route_state
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
                try:
                    _, upstream = await asyncio.wait_for(
                        self.loop.create_connection(
                            lambda: TcpUpstream(self), endpoint.address, endpoint.port
                        ),
                        spec.connect_timeout,
                    )
                except (OSError, TimeoutError) as exc:
                    self.reason = (
                        "connect-timeout" if isinstance(exc, TimeoutError) else "connect-failed"
                    )
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
        spec = self.listener.route_state.spec
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
        # Bytes moved since it was armed: not yet idle for long enough. (The deadline is not
        # compared with the clock, which may read a hair before the time the handle was set for.)
        deadline = self.last_activity + self.listener.route_state.spec.idle_timeout
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
        state = listener.route_state
        now = self.loop.time()
        stats = state.stats
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
                state.label,
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
