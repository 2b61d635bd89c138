"""Connections to endpoints: one HTTP/1.1 exchange at a time, kept alive in per-endpoint pools.

An ``UpstreamConnection`` parses responses with httptools and hands every event to its
current ``ResponseSink`` (the client-side exchange), which decides what reaches the client.
Between exchanges a connection waits in its ``UpstreamPool`` with an idle timer; any byte or
EOF while idle means the upstream gave up on it, so it is dropped. The idle timer is not set
per request: a connection keeps one handle, which, when it fires, closes the connection if it
has been idle long enough and otherwise re-arms for the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import TYPE_CHECKING, Protocol

import httptools

from interknit.http1.batch import WriteBatch
from interknit.proxy.spec import UPSTREAM_MAX_IDLE
from interknit.proxy.wire import SIMPLE_HEAD_MAX, SIMPLE_HEADS, SimpleHead

if TYPE_CHECKING:
    from interknit.tls.client import ClientTls

PoolKey = tuple[str, int]

# What a closed connection holds instead of its parser: one that calls back to nobody.
_SPENT_PARSER = httptools.HttpResponseParser(object())
DEFAULT_IDLE_TIMEOUT = 60.0
# An upstream TLS connection closed by the proxy waits this long at most for the upstream's
# close_notify (uvloop's default is 30 s).
TLS_SHUTDOWN_TIMEOUT = 5.0


class ResponseSink(Protocol):
    """What an exchange offers to the connection that answers it."""

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...

    def on_response_body(self, data: bytes) -> None: ...

    def on_response_whole(self, head: SimpleHead, body: bytes) -> bool:
        """A whole simple response at once; False (before doing anything): parse it instead."""
        ...

    def on_response_complete(self, keep_alive: bool) -> None: ...

    def on_response_flush(self) -> None: ...

    def on_upstream_upgraded(self, rest: bytes) -> None: ...

    def on_upstream_failed(self, reason: str, received: bool) -> None: ...

    def on_upstream_eof(self) -> None: ...

    def upstream_pause_writing(self) -> None: ...

    def upstream_resume_writing(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "at_boundary",
        "closed",
        "head_only",
        "headers",
        "idle",
        "idle_handle",
        "idle_handle_at",
        "idle_since",
        "key",
        "last_activity",
        "loop",
        "parser",
        "pool",
        "read_paused",
        "received",
        "reused",
        "sink",
        "status",
        "transport",
        "tunnel",
    )

    def __init__(self, pool: UpstreamPool, key: PoolKey) -> None:
        # Global state
        self.pool = pool
        self.loop = pool.loop
        self.key = key
        # Per-connection state
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        # The parser is between two messages (has no part of one): the fast path may run.
        self.at_boundary = True
        self.closed = False
        self.idle_handle: asyncio.TimerHandle | None = None
        self.idle_handle_at = 0.0
        self.idle = False
        self.idle_since = 0.0
        self.reused = False
        self.read_paused = False
        # Set after a 101: raw bytes go to the client's transport from then on.
        self.tunnel: asyncio.Transport | None = None
        # Per-exchange state
        self.sink: ResponseSink | None = None
        self.head_only = False
        self.received = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.last_activity = 0.0

    # Protocol interface

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.parser = _SPENT_PARSER  # it and this protocol point at each other (see http.py)
        self.pool.forget(self)
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.on_upstream_failed("upstream-reset", self.received)
        elif self.tunnel is not None:
            self.pool.batch.flush()  # what the upstream sent last goes out before the close
            self.tunnel.close()

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            sink = self.sink
            if sink is not None:
                sink.on_upstream_eof()
            return True
        return None

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            self.pool.batch.write(tunnel, data)
            return
        sink = self.sink
        if sink is None:
            # Bytes on an idle connection: the upstream is confused or closing. Drop it.
            self.close()
            return
        self.received = True
        self.last_activity = self.loop.time()
        if self.at_boundary and not self.head_only:
            # The fast path: one whole simple response in this read (see wire.SIMPLE_HEADS)
            # goes to the exchange in one call; the parser never sees it and stays where it
            # was, between two messages. The exchange may decline (it then wants the usual
            # events), and so does anything short, long or unusual: the parser takes those.
            end = data.find(b"\r\n\r\n")
            if 0 < end < SIMPLE_HEAD_MAX:
                head = SIMPLE_HEADS[data[:end]]
                if (
                    head is not None
                    and len(data) - end - 4 == head.length
                    and sink.on_response_whole(head, data[end + 4 :])
                ):
                    return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self.status == 101 and self.sink is not None:
                self.sink.on_upstream_upgraded(data[exc.args[0] :])
            else:
                self._fail("bad-response")
            return
        except httptools.HttpParserError:
            self._fail("bad-response")
            return
        if self.sink is not None:
            self.sink.on_response_flush()

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_resume_writing()

    # Parser callbacks

    def on_message_begin(self) -> None:
        self.at_boundary = False
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self.status = status
        if status < 200 and status != 101:
            return  # informational (100, 103): the final response is still to come
        sink = self.sink
        if sink is None:
            return
        sink.on_response_head(status, self.headers)
        if self.head_only and self.sink is sink and status != 101:
            # httptools cannot be told that a HEAD response has no body; finish it here and
            # give the next exchange a fresh parser.
            keep_alive = self.parser.should_keep_alive()
            self.parser = httptools.HttpResponseParser(self)
            self.at_boundary = True
            self._complete(sink, keep_alive)

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink.on_response_body(body)

    def on_message_complete(self) -> None:
        self.at_boundary = True
        if self.status < 200:
            return  # informational, or a 101 that data_received turns into a tunnel
        sink = self.sink
        if sink is not None:
            # Read here: after the callback returns the parser reports False.
            self._complete(sink, self.parser.should_keep_alive())

    # Exchange interface

    def start(self, sink: ResponseSink, head_only: bool, now: float) -> None:
        self.sink = sink
        self.head_only = head_only
        self.received = False
        self.status = 0
        self.last_activity = now
        if self.read_paused:
            self.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.pool.batch.write(self.transport, data)

    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()

    def detach(self) -> None:
        """The exchange is done with this connection without returning it to the pool."""
        self.sink = None

    def close(self) -> None:
        self.sink = None
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            if self.transport is not None:
                self.pool.batch.flush()
                self.transport.abort()

    def on_idle_timer(self) -> None:
        self.idle_handle = None
        if self.closed or not self.idle:
            return
        expires = self.idle_since + self.pool.idle_timeout
        if self.idle_handle_at >= expires:
            self.close()
        else:
            self.idle_handle_at = expires
            self.idle_handle = self.pool.loop.call_at(expires, self.on_idle_timer)

    def _complete(self, sink: ResponseSink, keep_alive: bool) -> None:
        self.sink = None
        sink.on_response_complete(keep_alive)

    def _fail(self, reason: str) -> None:
        sink, self.sink = self.sink, None
        self.close()
        if sink is not None:
            sink.on_upstream_failed(reason, self.received)


class UpstreamPool:
    """Idle keep-alive connections per endpoint address, newest first.

    A pool speaks plaintext, or TLS with one ``ClientTls``: routes that reach endpoints over
    TLS have a pool per TLS setting (two routes may reach one endpoint with different
    certificates), sharing the listener's write batch. An exchange takes its route's pool, so
    the plaintext path has no TLS test on it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_idle: int = UPSTREAM_MAX_IDLE,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        *,
        tls: ClientTls | None = None,
        batch: WriteBatch | None = None,
    ) -> None:
        self.loop = loop
        self.tls = tls
        # Every write of the proxy's HTTP connections on this loop, client side included.
        self.batch = batch or WriteBatch(loop)
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._idle: dict[PoolKey, deque[UpstreamConnection]] = {}

    def take(self, address: str, port: int) -> UpstreamConnection | None:
        """An idle kept-alive connection to ``address:port``, if there is one."""
        idle = self._idle.get((address, port))
        while idle:
            conn = idle.pop()
            # Its idle timer stays set; when it fires the connection is busy and it lets go.
            conn.idle = False
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    async def connect(self, address: str, port: int) -> UpstreamConnection:
        """A new connection (raises OSError on failure; over TLS, ssl.SSLError when the
        handshake fails: a certificate that does not verify, say)."""
        key = (address, port)
        tls = self.tls
        if tls is None:
            _, conn = await self.loop.create_connection(
                lambda: UpstreamConnection(self, key), address, port
            )
            return conn
        _, conn = await self.loop.create_connection(
            lambda: UpstreamConnection(self, key),
            address,
            port,
            ssl=tls.context,
            server_hostname=tls.spec.server_hostname(address),
            ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
        )
        return conn

    async def acquire(self, address: str, port: int) -> UpstreamConnection:
        """An idle connection to ``address:port``, or a new one."""
        conn = self.take(address, port)
        if conn is None:
            conn = await self.connect(address, port)
        return conn

    def release(self, conn: UpstreamConnection, now: float | None = None) -> None:
        """Keep ``conn`` for the next request to the same endpoint, or close it."""
        conn.sink = None
        if conn.closed or conn.tunnel is not None:
            return
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = deque()
        if len(idle) >= self.max_idle:
            conn.close()
            return
        if conn.read_paused:
            conn.resume_reading()  # so that an EOF while idle is noticed
        idle.append(conn)
        conn.idle = True
        if now is None:
            now = self.loop.time()
        conn.idle_since = now
        if conn.idle_handle is None:
            conn.idle_handle_at = now + self.idle_timeout
            conn.idle_handle = self.loop.call_at(conn.idle_handle_at, conn.on_idle_timer)

    def forget(self, conn: UpstreamConnection) -> None:
        conn.idle = False
        if conn.idle_handle is not None:
            conn.idle_handle.cancel()
            conn.idle_handle = None
        idle = self._idle.get(conn.key)
        if idle:
            with contextlib.suppress(ValueError):
                idle.remove(conn)

    def idle_count(self, address: str, port: int) -> int:
        return len(self._idle.get((address, port), ()))

    def close(self) -> None:
        for idle in list(self._idle.values()):
            for conn in list(idle):
                conn.close()
        self._idle.clear()
