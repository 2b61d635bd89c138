"""The HTTP/1.1 data plane: one protocol object per client connection, one exchange per request.

Theory of operation. ``HttpProxyProtocol`` parses requests with httptools. An ``Exchange``
(``exchange.py``) begins with each request head; once the head is whole it passes the head
rules (``request.read_head``), and once the read that completed it is parsed, the exchange
runs. The first one runs at once; later (pipelined) ones wait in a deque with reading paused,
so that responses leave in request order. Each exchange is a state machine
(``machine.py``) driven by callbacks: this protocol's parser callbacks feed its request side,
the upstream connection its response side, and the connection's timer its waits.

Two bounds hold before the parser sees a byte: the head guard (``http1.limits``) refuses a
head that grows past ``max_header_bytes`` at once, so that no partial line is buffered without
bound, and ``max_headers`` bounds the number of header fields.

A whole request head that arrives in one read, while the parser rests between kept-alive
messages, skips the parser in two cases. When its header fields are byte for byte those of the
connection's last head parsed whole (a client sends the same fields, cookies and all, with
every request), only its request line is read (``request.with_request_line``, which takes
only lines the parser would read the same way). Otherwise it is looked up by its bytes in the
listener's head cache (``http1.headcache``), which holds only what ``read_head`` returned for
the same bytes.
Both sides write through the loop's ``http1.batch.WriteBatch``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from time import monotonic
from typing import TYPE_CHECKING

import httptools

from interknit.http1.limits import HeadGuard
from interknit.proxy.exchange import Exchange
from interknit.proxy.flow import PEER_FULL, PIPELINE, WAITING, FlowControl
from interknit.proxy.machine import ADMITTING, CONNECTING, HEAD, MUST_CLOSE, RETRY_WAIT
from interknit.proxy.request import (
    Rejected,
    RequestHead,
    read_head,
    request_line,
    upstream_head,
    upstream_head_https,
    with_request_line,
)
from interknit.proxy.upgrade import UpgradeBody
from interknit.proxy.upstream import UpstreamConnection
from interknit.proxy.wire import body_size, error_response

if TYPE_CHECKING:
    from interknit.proxy.listener import HttpListener

log = logging.getLogger("interknit.proxy")

# What a closed connection holds instead of its parser: one that calls back to nobody.
SPENT_PARSER = httptools.HttpRequestParser(object())
# An exchange in these states has sent nothing upstream yet.
_NOT_SENT = frozenset({ADMITTING, CONNECTING, RETRY_WAIT})
# What a client connection's timer waits for: nothing, a request head, or a next request.
_WAIT_NONE = 0
_WAIT_HEAD = 1
_WAIT_IDLE = 2


class HttpProxyProtocol(asyncio.Protocol):
    # Slots: one per open connection, and read on every request; a dict of this many keys
    # would not share them, and would cost both memory and lookups.
    __slots__ = (
        "active",
        "at_rest",
        "batch",
        "block",
        "block_head",
        "broken",
        "client_ip",
        "client_key",
        "closed",
        "eof_from_client",
        "eof_from_upstream",
        "fields",
        "flow",
        "framing",
        "guard",
        "header_timeout",
        "heads",
        "heads_parsed",
        "in_head",
        "keepalive_timeout",
        "last_head",
        "listener",
        "loop",
        "max_headers",
        "opened_at",
        "parser",
        "parsing",
        "pending_error",
        "pipeline",
        "rejected",
        "starting",
        "timer",
        "timer_at",
        "transport",
        "tunnel",
        "upgrade_body",
        "upgrading",
        "upstream_head",
        "url",
        "wait",
        "wait_until",
        "write_paused",
    )

    def __init__(self, listener: HttpListener) -> None:
        # Global state
        self.listener = listener
        self.loop = listener.loop
        self.batch = listener.upstreams.batch
        self.heads = listener.heads
        self.max_headers = listener.spec.max_headers
        # The head sent upstream: X-Forwarded-Proto https or http, chosen once.
        self.upstream_head = upstream_head_https if listener.tls is not None else upstream_head
        # Made at the accept: over TLS, connection_made comes after the handshake, and the
        # handshake counts against header_timeout (the listener bounds it by the same).
        self.opened_at = listener.loop.time()

        # Per-connection state
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.flow: FlowControl = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.guard = HeadGuard(listener.spec.max_header_bytes)
        self.framing = 0  # bytes of a chunked body's framing since its last body byte
        self.client_ip = b""
        self.client_key = ""
        self.active: Exchange | None = None
        # The exchange whose head this read completed, begun once the read is parsed.
        self.starting: Exchange | None = None
        self.pipeline: deque[Exchange] = deque()
        # A refusal to send once the exchanges before it are answered: (status, reason, began).
        self.pending_error: tuple[int, str, float] | None = None
        # One timer handle bounds every wait of the connection: the head or the next request
        # (``wait``, until ``wait_until``) and the active exchange's (its machine says when).
        # It is re-armed only when a wait must end sooner than it fires: setting a handle per
        # request costs more than one that wakes up early now and then and re-arms.
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.wait = _WAIT_NONE
        self.wait_until = 0.0
        self.header_timeout = listener.spec.header_timeout
        self.keepalive_timeout = listener.spec.keepalive_timeout
        self.write_paused = False
        self.closed = False
        self.rejected = False
        # After a refusal nothing more is parsed; after an upgrade request, bytes wait for the
        # tunnel in the exchange.
        self.broken = False
        self.upgrading: Exchange | None = None
        self.upgrade_body: UpgradeBody | None = None  # the upgrade request's body, being read
        self.tunnel: UpstreamConnection | None = None
        self.eof_from_client = False
        self.eof_from_upstream = False
        # Between two messages after a kept-alive one (or none yet): a request head in one
        # read may come from the head cache (data_received).
        self.at_rest = True
        # The header fields (from the CRLF that ends the request line to the end of the head)
        # of the last head parsed whole in one read, and that head: a next head with the same
        # fields needs only its request line read (request.with_request_line).
        self.block = b""
        self.block_head: RequestHead | None = None

        # Per-request state (the request being parsed)
        self.last_head: RequestHead | None = None
        self.heads_parsed = 0  # in the read being parsed
        self.parsing: Exchange | None = None
        self.in_head = False
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []

    # Protocol interface

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = transport  # type: ignore[assignment]
        peer = self.transport.get_extra_info("peername")
        self.client_key = str(peer[0]) if peer else ""
        self.client_ip = self.client_key.encode()
        if not self.listener.connection_opened(self):
            self.rejected = True
            response = error_response(503, "max-connections", close=True, retry_after=1)
            self.transport.write(response)
            self.transport.close()
            now = monotonic()
            self.log_refusal(503, "max-connections", response, now, now)
            return
        self.flow = FlowControl(self.transport)
        self.wait_for(_WAIT_HEAD, self.opened_at + self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        # The parser and this protocol point at each other, and the parser may hold a partial
        # head: let it go now, or each closed connection waits for a full garbage collection
        # (rare in a node, see heap.py) with up to max_header_bytes held.
        self.parser = SPENT_PARSER
        if self.rejected:
            return
        self.closed = True
        self.listener.connection_closed(self)
        self.wait = _WAIT_NONE
        # Pending handles would keep this protocol alive until they fire.
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
        if self.upgrade_body is not None:
            self.upgrade_body.close()
            self.upgrade_body = None
        self.pipeline = deque()
        self.parsing = None
        if self.active is not None:
            self.active.client_lost()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self.broken:
            return
        if self.upgrading is not None:
            self.upgrade_data(data)
            return
        now = self.loop.time()
        active = self.active
        if active is not None:
            active.client_activity = now
        # A whole bodiless request head in one read, while the parser rests between two
        # kept-alive messages: the same bytes handled before give the same head (see
        # http1.headcache). Otherwise parse, and offer the result if it is such a head.
        remember = False
        if self.at_rest:
            block = self.block
            head = None
            if (
                block
                and len(block) < len(data) <= self.heads.max_bytes
                and data.endswith(block)
                and self.block_head is not None
            ):
                try:
                    head = with_request_line(self.block_head, data[: len(data) - len(block)])
                except Rejected as exc:  # the request line's rules refused it
                    self.reject(exc.status, exc.reason)
                    return
            if head is None:
                head = self.heads.get(data)
            if head is not None:
                self.request_from_cache(head, now)
                return
            remember = True
            self.last_head = None
            self.heads_parsed = 0
            self.guard.reset()  # a head begins with these bytes
        if remember or self.in_head:
            status = self.guard.check(data)
            if status:
                self.reject(status, "uri-too-long" if status == 414 else "headers-too-large")
                return
        parsing = self.parsing
        chunked = parsing is not None and not self.in_head and parsing.head.chunked
        body_before = parsing.bytes_in if chunked and parsing is not None else 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.on_request_upgrade(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, Rejected):
                self.reject(cause.status, cause.reason)
            elif cause is not None and not isinstance(cause, httptools.HttpParserError):
                log.error("proxy parser callback failed", exc_info=cause)
                self.reject(500, "internal-error")
            else:
                self.reject(400, "bad-request")
        else:
            # One message, whole, and the parser back at rest: these bytes were exactly one
            # request (and perhaps blank lines, which the parser skips).
            head = self.last_head
            if (
                remember
                and head is not None
                and head.cacheable
                and self.heads_parsed == 1
                and self.at_rest
            ):
                self.heads.offer(data, head)
                self.learn_fields(data, head)
        if chunked and parsing is not None and self.parsing is parsing:
            # A chunked body whose reads bring no body bytes: a trailer field or a chunk
            # extension that goes on and on, which llhttp (trailers) or nobody (extensions)
            # would hold without bound. Bounded as a head is.
            gap = len(data) - (parsing.bytes_in - body_before)
            self.framing = gap if parsing.bytes_in > body_before else self.framing + gap
            if self.framing > self.guard.limit:
                self.reject(431, "headers-too-large")
                return
        ex = self.starting
        if ex is not None:
            # After the parser has finished the read (even for a 404), so that a bodiless
            # request is complete (and its keep-alive known) by then.
            self.starting = None
            if ex.state == HEAD:
                ex.begin(now)

    def learn_fields(self, data: bytes, head: RequestHead) -> None:
        """``data`` was exactly ``head``, parsed: keep its fields for the next head."""
        if len(data) > self.heads.max_bytes:
            return
        line = request_line(head)
        if data.startswith(line) and data[len(line) : len(line) + 2] == b"\r\n":
            self.block = data[len(line) :]
            self.block_head = head

    def request_from_cache(self, head: RequestHead, now: float) -> None:
        """What the parser callbacks do for the bytes ``head`` was made from."""
        self.wait = _WAIT_NONE
        ex = Exchange(self, now)
        ex.head = head
        ex.keep_alive = True  # only kept-alive requests are cached
        ex.request_done = True  # request_complete(): nothing is sent yet
        if self.active is None:
            self.active = ex
            ex.begin(now)
        else:
            self.pipeline.append(ex)
            self.flow.pause_reading(PIPELINE)

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            self.eof_from_client = True
            tunnel_transport = self.tunnel.transport
            if self.eof_from_upstream:
                self.close()
            elif tunnel_transport is not None and tunnel_transport.can_write_eof():
                self.batch.flush()
                tunnel_transport.write_eof()
            return True
        active = self.active
        if active is not None and self.parsing is None and not self.in_head:
            if self.listener.spec.abort_on_close and active.state in _NOT_SENT:
                # Gone while its request waits for a place, a connection or a retry: nothing
                # has reached an upstream, so nothing is lost by giving up now (HAProxy's
                # "option abortonclose"); the place goes to someone still there.
                active.client_lost()
                return None
            # The client may half-close after its request; answer it, then close.
            active.must_close = True
            return True
        # A request cut short can never complete: give up on it (connection_lost follows).
        return None

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.tunnel is not None:
            self.tunnel.pause_reading()
        elif self.active is not None and self.active.conn is not None:
            self.active.conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.tunnel is not None:
            self.tunnel.resume_reading()
        elif self.active is not None and self.active.conn is not None:
            self.active.conn.resume_reading()

    # Parser callbacks

    def on_message_begin(self) -> None:
        self.at_rest = False
        self.in_head = True
        self.url = b""
        self.fields = []
        self.parsing = Exchange(self, self.loop.time())
        if self.wait != _WAIT_HEAD:
            self.wait_for(_WAIT_HEAD, self.parsing.started_at + self.header_timeout)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        fields = self.fields
        fields.append((name, value))
        if len(fields) > self.max_headers:
            raise Rejected(431, "too-many-headers")

    def on_headers_complete(self) -> None:
        ex = self.parsing
        if ex is None:
            return
        self.in_head = False
        # A pipelined head that begins later in this read is counted from the next read on.
        self.guard.reset()
        self.framing = 0
        parser = self.parser
        head = read_head(
            parser.get_method(),
            self.url,
            parser.get_http_version(),
            self.fields,
            bool(parser.should_keep_alive()),
        )
        self.wait = _WAIT_NONE
        ex.head = head
        ex.keep_alive = head.keep_alive
        self.last_head = head
        self.heads_parsed += 1
        if self.active is None:
            self.active = ex
            self.starting = ex
        else:
            self.pipeline.append(ex)
            self.flow.pause_reading(PIPELINE)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is not None:
            ex.request_body(body)

    def on_message_complete(self) -> None:
        ex = self.parsing
        if ex is None:
            return
        self.parsing = None
        # Read here: afterwards httptools reports False.
        head = ex.head
        ex.keep_alive = keep_alive = head.keep_alive and bool(self.parser.should_keep_alive())
        # After a message that ends the connection, llhttp refuses more: not a rest.
        self.at_rest = keep_alive
        if head.upgrade is not None and not head.bodiless:
            return  # httptools ends an upgrade request at its head: its body follows (upgrade_data)
        ex.request_complete()

    # Connection management

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.batch.write(self.transport, data)

    def close(self) -> None:
        if not self.closed:
            self.batch.flush()
            self.transport.close()

    def reject(self, status: int, reason: str) -> None:
        """The byte stream broke the rules: answer ``status`` in turn and close."""
        self.flow.pause_reading(PIPELINE)
        self.broken = True
        ex = self.parsing
        self.parsing = None
        if ex is not None and ex is self.active:
            ex.request_failed(status, reason)
            return
        began = monotonic() if ex is None else ex.began
        if ex is not None:
            with contextlib.suppress(ValueError):
                self.pipeline.remove(ex)
        if self.active is None:
            self.refuse(status, reason, began)
        else:
            self.pending_error = (status, reason, began)

    def refuse(self, status: int, reason: str, began: float) -> None:
        """Answer a request refused before routing, count it, and close."""
        response = error_response(status, reason, close=True)
        stats = self.listener.no_route_stats()
        if stats is not None:
            stats.count(status)
            stats.error(reason)
        self.write(response)
        self.close()
        self.log_refusal(status, reason, response, began, monotonic())

    def log_refusal(
        self, status: int, reason: str, response: bytes, began: float, now: float
    ) -> None:
        access = self.listener.access
        if access is not None:
            access.http(
                now,
                began,
                "",
                self.client_ip,
                b"",
                b"",
                status,
                "",
                0,
                body_size(response),
                0,
                reason,
                b"",
            )

    def exchange_finished(self, ex: Exchange, now: float) -> None:
        if ex is not self.active:
            return
        self.active = None
        if self.closed or self.tunnel is not None:
            return
        if ex.state == MUST_CLOSE:
            self.flow.resume_reading(PEER_FULL | WAITING)
            self.close()
            return
        if self.flow.reasons:
            self.flow.resume_reading(PEER_FULL | WAITING)
        if self.pipeline:
            nxt = self.pipeline.popleft()
            if not self.pipeline:
                self.flow.resume_reading(PIPELINE)
            self.active = nxt
            # The next request's turn comes after this answer's writes are queued.
            self.loop.call_soon(self.begin_next, nxt)
            return
        if self.pending_error is not None:
            self.refuse(*self.pending_error)
            return
        if self.in_head:
            if self.wait != _WAIT_HEAD:
                self.wait_for(_WAIT_HEAD, now + self.header_timeout)
        else:
            # The usual case: the handle set for the exchange fires first, and re-arms then.
            self.wait = _WAIT_IDLE
            self.wait_until = until = now + self.keepalive_timeout
            if self.timer is None:
                self.arm_at(until)

    def begin_next(self, ex: Exchange) -> None:
        if ex is self.active and ex.state == HEAD and not self.closed:
            ex.begin(self.loop.time())

    def wait_for(self, wait: int, until: float) -> None:
        """Bound the wait for a request head (header_timeout) or a next request (keep-alive)."""
        self.wait = wait
        self.wait_until = until
        if self.timer is None or self.timer_at > until:
            self.arm_at(until)

    def arm_at(self, when: float) -> None:
        """Have the timer fire at ``when``, or sooner: it re-checks every wait and re-arms."""
        timer = self.timer
        if timer is not None:
            if self.timer_at <= when:
                return
            timer.cancel()
        self.timer_at = when
        self.timer = self.loop.call_at(when, self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        fired_at = self.timer_at
        if self.closed:
            return
        active = self.active
        if active is not None:
            active.on_timer()  # the exchange re-arms for its next wait, if it has one
        wait = self.wait
        if wait == _WAIT_NONE or self.closed:
            return
        # Not compared with the clock, which may read a hair before the very time the handle
        # was set for: a handle armed for an earlier wait re-arms for this one.
        if fired_at < self.wait_until:
            self.arm_at(self.wait_until)
            return
        self.wait = _WAIT_NONE
        if wait == _WAIT_HEAD:
            self.on_head_timeout()
        else:
            self.on_idle_timeout()

    def on_request_upgrade(self, rest: bytes) -> None:
        ex = self.active if self.active is not None and self.active.head.upgrade else None
        if ex is None or self.pipeline:
            self.reject(400, "bad-upgrade")
            return
        # No more HTTP on this connection. The request's body, if it has one, is sent on as
        # any body (the upgrade takes effect after it, RFC 9110 7.8: ``curl --http2 -d`` and
        # Java's HttpClient send one with ``Upgrade: h2c``); what follows is held for the
        # tunnel until the upstream agrees (101), and nothing more is read until then.
        self.upgrading = ex
        if ex.request_done:
            self.flow.pause_reading(PIPELINE)
        else:
            head = ex.head
            length = int(head.content_length or b"0")
            self.upgrade_body = UpgradeBody(ex.request_body, head.chunked, length)
        self.upgrade_data(rest)

    def upgrade_data(self, data: bytes) -> None:
        """Bytes after an upgrade request's head: its body first, then the tunnel's."""
        ex = self.upgrading
        assert ex is not None
        body = self.upgrade_body
        if body is not None:
            try:
                used = body.feed(data)
            except httptools.HttpParserError:
                body.close()
                self.upgrade_body = self.upgrading = None
                self.broken = True
                self.flow.pause_reading(PIPELINE)
                ex.request_failed(400, "bad-request")
                return
            data = data[used:]
            if body.done:
                self.upgrade_body = None
                ex.request_complete()
                self.flow.pause_reading(PIPELINE)
        if data:
            ex.tunnel_prefix += data

    def start_tunnel(self, conn: UpstreamConnection) -> None:
        self.tunnel = conn
        self.upgrading = None
        if self.write_paused:
            conn.pause_reading()
        self.flow.resume_reading(PIPELINE | WAITING | PEER_FULL)

    def tunnel_eof_from_upstream(self) -> None:
        self.eof_from_upstream = True
        if self.eof_from_client:
            self.close()
            if self.tunnel is not None:
                self.tunnel.close()
        elif self.transport.can_write_eof():
            self.batch.flush()
            self.transport.write_eof()

    def on_head_timeout(self) -> None:
        if self.active is None and not self.closed:
            # The wait began header_timeout before it ended (at the head's first byte, or when
            # the connection opened or its last request ended), on the loop's clock: the
            # monotonic clock, to the millisecond.
            self.refuse(408, "header-timeout", self.wait_until - self.header_timeout)

    def on_idle_timeout(self) -> None:
        if self.active is None and not self.in_head:
            self.close()

    def shutdown(self) -> None:
        """Stop after the request in flight (listener draining)."""
        if self.tunnel is not None:
            return
        if self.active is None and not self.in_head:
            self.close()
