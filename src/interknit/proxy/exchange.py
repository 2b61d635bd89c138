"""One request and its response, across however many attempts it takes: the IO shell over
``machine.ExchangeMachine``.

Every request takes the same path, driven by callbacks alone: no coroutine and no task per
request. The client's protocol (``http.py``) makes an exchange when a request head begins and
calls ``begin`` once the head is whole; from then on each step waits on a callback or a timer
and reports what came of it to the machine:

* demand control answers ``admit`` at once or calls ``on_admission`` later (``ADMITTING``);
* an attempt takes a kept-alive connection and sends at once, or starts a connect whose task
  calls ``on_connected`` (``CONNECTING``; the task is the IO, the exchange is not in it);
* the upstream connection calls the ``on_response_*`` and ``on_upstream_*`` methods
  (``SENDING``, ``STREAMING``, ``TUNNEL``);
* the connection's exchange timer calls ``on_timer`` when the machine's current wait may be
  over (timeouts, and the backoff of ``RETRY_WAIT``);
* the client's protocol calls ``request_body``, ``request_complete``, ``request_failed`` and
  ``client_lost``.

A client that leaves ends its exchange at once wherever it stands: its queue place is given
up, a connect in progress is cancelled (and its connection closed if it arrives anyway), an
attempt in flight is abandoned with its connection closed, not reused, and the metrics and the
access log say ``client-closed`` (status 499 if nothing was answered yet).

Bodies are never gathered: each side pauses the other's reading when its write buffer is full
(``FlowControl``), so a large body passes in constant memory. A failed attempt is tried again
on another endpoint only when that is safe (``retry.py``) and the route's ``RetryBudget`` has
room; a kept-alive connection the upstream closed just as it was reused is replaced on the same
endpoint, which is no fault of the endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from time import monotonic
from typing import TYPE_CHECKING

from interknit.balance import HASHING_POLICIES
from interknit.balance.base import Endpoint
from interknit.http1.status import STATUS_LINES, status_line
from interknit.proxy.flow import PEER_FULL, WAITING
from interknit.proxy.machine import (
    ADMITTING,
    CLOSE,
    CONNECT,
    CONNECTING,
    DONE,
    FINISH,
    NEVER,
    QUEUE,
    RESPOND,
    RETRY,
    RETRY_WAIT,
    SEND,
    SENDING,
    STREAMING,
    TUNNEL,
    UPGRADE,
    ExchangeMachine,
    Timeouts,
)
from interknit.proxy.observe import EndpointStats, RouteStats
from interknit.proxy.pools import PoolLike, Ticket
from interknit.proxy.request import Fields, RequestHead, cookie_value, host_field
from interknit.proxy.response import response_fields
from interknit.proxy.retry import IDEMPOTENT_METHODS, RETRYABLE_STATUSES, RetryBudget
from interknit.proxy.routing import CompiledRoute
from interknit.proxy.spec import RouteSpec
from interknit.proxy.upstream import UpstreamConnection, UpstreamPool
from interknit.proxy.wire import (
    CONTINUE_100,
    CRLF,
    LAST_CHUNK,
    NO_BODY_STATUSES,
    SimpleHead,
    body_size,
    chunk,
    error_response,
    redirect_response,
)

if TYPE_CHECKING:
    from interknit.proxy.http import HttpProxyProtocol
    from interknit.proxy.pools import Admission
    from interknit.tls.client import ClientTls

log = logging.getLogger("interknit.proxy")

# Request body kept for a retry; a bigger body streamed already cannot be sent again.
REPLAY_LIMIT = 64 * 1024
# Request body held while no upstream connection is ready, before the client is paused.
BUFFER_HIGH = 64 * 1024
# A kept-alive connection found closed as it is reused is replaced this many times at most.
STALE_RETRIES = 2
# What a failed attempt allows: no retry, a retry if may_retry() agrees, or one already agreed.
RETRY_NO = 0
RETRY_MAYBE = 1
RETRY_APPROVED = 2


class RouteState:
    """What a route keeps across requests on one listener: budget, metrics, admission."""

    __slots__ = (
        "added_head",
        "admission",
        "budget",
        "cookie",
        "hashed",
        "https_port",
        "label",
        "plain",
        "pool",
        "redirect",
        "route",
        "spec",
        "special",
        "stats",
        "timeouts",
        "tls",
        "upstreams",
    )

    def __init__(
        self,
        route: CompiledRoute,
        budget: RetryBudget,
        stats: RouteStats | None,
        admission: Admission | None,
        header_timeout: float,
        *,
        https: bool = False,
        upstream_tls: ClientTls | None = None,
        upstreams: UpstreamPool | None = None,
    ) -> None:
        self.route = route
        self.spec: RouteSpec = route.spec
        self.label = route.label
        self.budget = budget
        self.stats = stats
        self.admission = admission
        self.pool: PoolLike | None = None
        spec = self.spec
        self.hashed = spec.balance in HASHING_POLICIES
        self.cookie = None if spec.sticky_cookie is None else spec.sticky_cookie.encode()
        # No sticky cookie and no hashing: the pool picks with no key.
        self.plain = self.cookie is None and not self.hashed
        self.timeouts = Timeouts(
            header_timeout, spec.connect_timeout, spec.response_timeout, spec.idle_timeout
        )
        # TLS to the endpoints, or None; for HTTP, the pool of connections to them.
        self.tls = upstream_tls
        self.upstreams = upstreams
        # Answer with a 308 to https (on https_port) instead of sending anywhere.
        self.redirect = spec.redirect_https
        self.https_port = b"" if spec.https_port == 443 else b":%d" % spec.https_port
        # Header lines added to every response the upstream gives (HSTS over TLS), or None.
        self.added_head: bytes | None = None
        if https and spec.hsts:
            self.added_head = b"strict-transport-security: " + spec.hsts.encode() + CRLF
        # Either of the two: one test on the path of every request, not two.
        self.special = self.redirect or self.added_head is not None


def client_header_key(value: bytes | None, address: str) -> str:
    """The per-client rate-limit key of a request whose route keys clients by a header: its
    value (the first 256 bytes: keys are kept for 10,000 clients), or its address without it.
    Prefixed so that a header's value never shares an address's bucket."""
    if value is None:
        return address
    return "header:" + value[:256].decode("latin-1")


# The head of an exchange whose head is still being read (never routed or forwarded).
NO_HEAD = RequestHead(b"", b"/", Fields((), {}, False, False))


class Exchange(ExchangeMachine):
    """One request and its response, across however many attempts it takes."""

    __slots__ = (
        "attempt_failed",
        "attempt_stats",
        "began",
        "body_seen",
        "broken",
        "buffer",
        "buffered",
        "bytes_in",
        "bytes_out",
        "chunked_out",
        "conn",
        "connecting",
        "endpoint",
        "extra_head",
        "forward_timeout",
        "head",
        "keep_alive",
        "last_error",
        "must_close",
        "next_endpoint",
        "next_slot",
        "pending_head",
        "pool",
        "proto",
        "reason",
        "replay",
        "replayed",
        "request_id",
        "retries",
        "retry_slot",
        "reused",
        "route",
        "sent_head",
        "stale",
        "status",
        "ticket",
        "tried",
        "tunnel_prefix",
        "until_eof",
    )

    def __init__(self, proto: HttpProxyProtocol, now: float) -> None:
        ExchangeMachine.__init__(self, now)
        self.proto = proto
        # For the access log's duration: the loop's clock (uvloop's) counts milliseconds.
        self.began = monotonic()
        # The request
        self.head = NO_HEAD
        self.keep_alive = False
        self.broken = False  # its own bytes turned out bad mid-exchange
        self.body_seen = False
        self.bytes_in = 0
        # Body chunks held (buffer) and kept for a retry (replay, None once too big to keep):
        # an empty tuple until the first chunk, so that a bodiless request allocates no lists.
        self.buffer: list[bytes] | tuple[()] = ()
        self.buffered = 0
        self.replay: list[bytes] | tuple[()] | None = ()
        self.replayed = 0
        self.tunnel_prefix = b""
        self.request_id = b""
        self.forward_timeout: bytes | None = None
        self.sent_head: bytes | None = None
        # Routing and attempts
        self.route: RouteState | None = None
        self.pool: PoolLike | None = None
        self.ticket: Ticket | None = None
        self.endpoint: Endpoint | None = None
        self.next_endpoint: Endpoint | None = None
        # Endpoints tried already; a tuple, so that the usual single try allocates nothing.
        self.tried: tuple[Endpoint, ...] = ()
        self.retries = 0
        # A place in the route's retry budget: held by the attempt in flight (retry_slot), or
        # taken for the attempt to come (next_slot); each is given back when its attempt ends.
        self.retry_slot = False
        self.next_slot = False
        self.stale = 0
        self.last_error: tuple[int, str] = (502, "upstream-failed")
        self.attempt_failed = False
        self.attempt_stats: EndpointStats | None = None
        self.conn: UpstreamConnection | None = None
        self.reused = False
        self.connecting: asyncio.Task[UpstreamConnection] | None = None
        # Header lines added to the response: the route's (HSTS), a sticky cookie's.
        self.extra_head: bytes | None = None
        # The response
        self.status = 0
        self.bytes_out = 0
        self.pending_head: bytes | None = None
        self.chunked_out = False
        self.until_eof = False
        self.must_close = False
        self.reason = ""

    # Routing and admission

    def begin(self, now: float) -> None:
        """The head is whole (and the read that ended it parsed): route it and go."""
        proto = self.proto
        listener = proto.listener
        router, states = listener.routing
        if router.catch_all:
            route = states[0]
        else:
            head = self.head
            found = router.match(head.method, head.route_host, head.path, head.hdict)
            if found is None:
                self.answer(404, "no-route", now)
                return
            route = states[found.index]
        self.route = route
        if route.special:
            if route.redirect:
                self.redirect_https(route, now)
                return
            self.extra_head = route.added_head
        pool = route.pool
        if pool is None:
            # Asked once per route (a pool source keeps a route's pool while the route is
            # in use), and again while it has none.
            pool = route.pool = listener.pools.pool(route.spec)
        if pool is None:
            self.answer(503, "no-pool", now, retry_after=1)
            return
        self.pool = pool
        route.budget.requests += 1
        stats = route.stats
        if stats is not None:
            stats.inflight.value += 1
        timeout = route.spec.timeout
        if timeout is not None:
            self.deadline = now + timeout
        admission = route.admission
        if admission is not None:
            hdict = self.head.hdict
            client_key = proto.client_key
            if admission.client_header is not None:
                client_key = client_header_key(hdict.get(admission.client_header), client_key)
            ticket = self.ticket = admission.admit(
                now,
                request_timeout=hdict.get(b"x-request-timeout"),
                grpc_timeout=hdict.get(b"grpc-timeout"),
                priority=hdict.get(b"x-priority"),
                client_key=client_key,
                on_decided=self.on_admission,
            )
            if not ticket.admitted:
                if ticket.refused:
                    self.answer(ticket.status, ticket.reason, now, ticket.retry_after)
                else:
                    self.to(QUEUE, now)
                return
            self.admitted(ticket)
        self.attempt(now)

    def on_admission(self) -> None:
        """Demand control decided on a queued request."""
        ticket = self.ticket
        if self.state != ADMITTING or ticket is None:
            return
        now = self.proto.loop.time()
        if ticket.refused:
            self.answer(ticket.status, ticket.reason, now, ticket.retry_after)
            return
        self.admitted(ticket)
        self.attempt(now)

    def admitted(self, ticket: Ticket) -> None:
        value = ticket.forward_timeout()
        if value:
            self.forward_timeout = value.encode("latin-1")

    # Attempts

    def attempt(self, now: float) -> None:
        """Pick an endpoint and send to it, on a kept-alive connection or a new one."""
        if self.deadline <= now:
            self.answer(504, "timeout", now)
            return
        endpoint = self.next_endpoint
        if endpoint is None:
            route = self.route
            pool = self.pool
            assert route is not None and pool is not None
            endpoint = pool.pick(None, now, self.tried) if route.plain else self.pick(now)
            if endpoint is None:
                if self.tried:
                    self.answer(*self.last_error, now)
                else:
                    self.answer(503, "no-endpoint", now, retry_after=1)
                return
        else:
            self.next_endpoint = None
        self.endpoint = endpoint
        self.attempt_began = now
        self.attempt_failed = False
        self.retry_slot, self.next_slot = self.next_slot, False
        endpoint.started()
        stats = self.route.stats if self.route is not None else None
        self.attempt_stats = None if stats is None else stats.attempt(endpoint.key)
        self.connect(endpoint, now)

    def connect(self, endpoint: Endpoint, now: float) -> None:
        """The attempt's connection: a kept-alive one at once, else a new one (a task)."""
        # The route's pool: plaintext, or TLS with the route's settings.
        upstreams: UpstreamPool = self.route.upstreams  # type: ignore[union-attr,assignment]
        conn = upstreams.take(endpoint.address, endpoint.port)
        if conn is not None:
            self.send(conn, now)
            return
        self.to(CONNECT, now)
        task = self.proto.loop.create_task(upstreams.connect(endpoint.address, endpoint.port))
        task.add_done_callback(self.on_connected)
        self.connecting = task
        self.arm()

    def on_connected(self, task: asyncio.Task[UpstreamConnection]) -> None:
        if task is not self.connecting:
            # Abandoned (the client left, or the connect timed out): never used, never kept.
            if not task.cancelled() and task.exception() is None:
                task.result().close()
            return
        self.connecting = None
        now = self.proto.loop.time()
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            reason = "connect-failed"
            if isinstance(exc, ssl.SSLError):
                # A certificate that does not verify, a protocol the upstream refuses: say so,
                # an operator cannot guess it from "connect-failed".
                reason = "tls-failed"
                log.warning("TLS to %s failed: %s", self.endpoint, exc)
            elif not isinstance(exc, OSError):
                log.warning("connect to %s failed: %r", self.endpoint, exc)
            self.attempt_failed = True
            self.failed(502, reason, RETRY_MAYBE, now)
            return
        self.send(task.result(), now)

    def send(self, conn: UpstreamConnection, now: float) -> None:
        """Start the attempt on ``conn``: the request head and what body is there."""
        proto = self.proto
        head = self.head
        self.conn = conn
        self.reused = conn.reused
        conn.start(self, head.method == b"HEAD", now)
        if proto.write_paused:
            conn.pause_reading()
        if head.expect_continue and not self.body_seen and not self.request_done:
            proto.write(CONTINUE_100)
            self.body_seen = True  # the body may come now: a retry does not ask again
        data = self.sent_head
        if data is None or not head.host:
            if not self.request_id:
                ids = proto.listener.request_ids
                self.request_id = head.request_id or (ids.pop() if ids else ids.next())
            endpoint = self.endpoint
            data = self.sent_head = proto.upstream_head(
                head,
                proto.client_ip,
                self.request_id,
                timeout=self.forward_timeout,
                # The Host of a head without one (HTTP/1.0), which differs per endpoint.
                endpoint=b"" if head.host or endpoint is None else host_field(endpoint),
            )
        if self.buffer or self.replay or head.chunked:
            data = self.with_body(data)
        transport = conn.transport
        if transport is not None:
            proto.batch.write_next_turn(transport, data)
        self.client_activity = now
        if proto.flow.reasons & WAITING:
            proto.flow.resume_reading(WAITING)
        self.to(SEND, now)
        self.arm()

    def with_body(self, head: bytes) -> bytes:
        """``head`` and the body held so far (replayed for a retry), framed as it goes."""
        framed = self.head.chunked
        parts = [head]
        pending = [*self.replay, *self.buffer] if self.replay else self.buffer
        for data in pending:
            parts.append(chunk(data) if framed else data)
        if self.buffer:
            self.keep_for_replay(self.buffer)
            self.buffer = ()
            self.buffered = 0
        if self.request_done and framed:
            parts.append(LAST_CHUNK)
        return b"".join(parts)

    def keep_for_replay(self, chunks: list[bytes] | tuple[()]) -> None:
        replay = self.replay
        if replay is None:
            return
        if not isinstance(replay, list):
            replay = self.replay = []
        for data in chunks:
            self.replayed += len(data)
            if self.replayed > REPLAY_LIMIT:
                self.replay = None
                return
            replay.append(data)

    def pick(self, now: float) -> Endpoint | None:
        """An endpoint not tried yet, honouring the route's hashing and sticky cookie."""
        route = self.route
        pool = self.pool
        assert route is not None and pool is not None
        hash_key = self.hash_key(route.spec) if route.hashed else None
        if route.cookie is None:
            return pool.pick(hash_key, now, self.tried)
        raw = cookie_value(self.head.hdict.get(b"cookie"), route.cookie)
        endpoint, set_cookie = pool.pick_sticky(
            None if raw is None else raw.decode("latin-1"), hash_key, now, self.tried
        )
        if set_cookie is not None:
            line = b"set-cookie: " + set_cookie.encode("latin-1") + CRLF
            self.extra_head = (route.added_head or b"") + line
        else:
            self.extra_head = route.added_head
        return endpoint

    def hash_key(self, spec: RouteSpec) -> bytes | None:
        hash_on = spec.hash_on
        if spec.balance != "source_ip" and hash_on != "source":
            kind, _, name = hash_on.partition(":")
            hdict = self.head.hdict
            if kind == "header":
                value = hdict.get(name.lower().encode("latin-1"))
            else:
                value = cookie_value(hdict.get(b"cookie"), name.encode("latin-1"))
            if value:
                return value
        return self.proto.client_ip

    def end_attempt(self, now: float) -> None:
        """The attempt in flight is over (its outcome in ``attempt_failed``)."""
        endpoint = self.endpoint
        pool = self.pool
        if endpoint is None or pool is None:
            return
        endpoint.finished()
        failed = self.attempt_failed
        es = self.attempt_stats
        if es is not None:
            es.finished(now - self.attempt_began, failed)
        pool.report(endpoint, not failed, now)
        if self.retry_slot:
            self.retry_slot = False
            route = self.route
            assert route is not None
            route.budget.release()

    def failed(self, status: int, reason: str, retry: int, now: float) -> None:
        """The attempt failed before any answer was passed on: try again, or answer."""
        endpoint = self.endpoint
        if (
            reason == "upstream-reset"
            and self.reused
            and self.replay is not None
            and self.stale < STALE_RETRIES
            and endpoint is not None
        ):
            # A kept-alive connection the upstream closed just as we reused it: the same
            # attempt goes on on another connection to the same endpoint.
            self.stale += 1
            self.attempt_failed = False
            self.to(RETRY, now)
            self.connect(endpoint, now)
            return
        self.end_attempt(now)
        if endpoint is not None:
            self.tried = (*self.tried, endpoint)
        self.last_error = (status, reason)
        if retry == RETRY_APPROVED or (retry == RETRY_MAYBE and self.may_retry(now)):
            self.retries += 1
            self.to(RETRY, now)
            route = self.route
            assert route is not None
            self.backoff_until = now + route.spec.retry_backoff * (1 << (self.retries - 1))
            self.arm()
            return
        self.answer(status, reason, now)

    def may_retry(self, now: float) -> bool:
        """Room for one more attempt: count, replayable body, time and budget (takes a slot)."""
        route = self.route
        assert route is not None
        if self.retries >= route.spec.attempts or self.replay is None or self.broken:
            return False
        if now >= self.deadline:
            return False
        if not route.budget.try_acquire():
            self.reason = "retry-budget"
            return False
        self.next_slot = True
        if route.stats is not None:
            route.stats.retried()
        return True

    def retry_elsewhere(self, now: float) -> bool:
        """For a 502/503/504 answer: retry if allowed and another endpoint is there to try."""
        route = self.route
        pool = self.pool
        endpoint = self.endpoint
        if route is None or pool is None or endpoint is None:
            return False
        if self.retries >= route.spec.attempts or self.replay is None or not self.request_done:
            return False
        tried = self.tried
        self.tried = (*tried, endpoint)
        other = self.pick(now)
        self.tried = tried
        if other is None or not self.may_retry(now):
            return False
        self.next_endpoint = other
        self.attempt_failed = True
        return True

    # Timers

    def arm(self) -> None:
        """Make sure the connection's exchange timer wakes this exchange in time."""
        route = self.route
        if route is None:
            return
        conn = self.conn
        when = self.wake_at(route.timeouts, 0.0 if conn is None else conn.last_activity)
        proto = self.proto
        # The handle is shared and re-armed lazily: one that fires first re-checks then.
        if when < NEVER and (proto.timer is None or proto.timer_at > when):
            proto.arm_at(when)

    def on_timer(self) -> None:
        """The exchange timer fired (perhaps early: it is shared, and re-armed lazily)."""
        route = self.route
        if route is None or self.state >= DONE:
            return
        conn = self.conn
        now = self.proto.loop.time()
        reason = self.expired(now, route.timeouts, 0.0 if conn is None else conn.last_activity)
        if reason is None:
            self.arm()
            return
        state = self.state
        if state == RETRY_WAIT:
            if reason == "backoff":
                self.attempt(now)
            else:
                self.answer(504, reason, now)
            return
        if state == CONNECTING:
            task, self.connecting = self.connecting, None
            if task is not None:
                task.cancel()
            self.attempt_failed = True
            self.failed(504, reason, RETRY_MAYBE if reason == "connect-timeout" else RETRY_NO, now)
            return
        self.attempt_failed = True
        if conn is not None:
            self.conn = None
            conn.close()
        if state == SENDING:
            self.failed(504, reason, RETRY_NO, now)
            return
        # Streaming: the answer is cut short.
        self.reason = reason
        self.must_close = True
        self.flush_pending()
        self.end_attempt(now)
        self.finish(now)

    # Answers and the end

    def answer(self, status: int, reason: str, now: float, retry_after: int | None = None) -> None:
        """Answer from the proxy itself (unless the upstream's answer has begun), and end."""
        self.respond_error(status, reason, retry_after)
        self.finish(now)

    def redirect_https(self, route: RouteState, now: float) -> None:
        """308 to the same URL over https: a route that exists to move clients to TLS."""
        head = self.head
        host = head.route_host
        if not host:
            self.answer(400, "bad-host", now)
            return
        target = head.target if head.target.startswith(b"/") else b"/"
        location = b"https://" + host + route.https_port + target
        self.status = 308
        proto = self.proto
        close = self.must_close or not self.keep_alive or proto.listener.stopping
        proto.write(redirect_response(location, close))
        self.finish(now)

    def respond_error(self, status: int, reason: str, retry_after: int | None = None) -> None:
        self.reason = reason
        if self.answering:
            self.must_close = True
            return
        self.status = status
        if not self.request_done or self.broken or self.head.upgrade is not None:
            self.must_close = True
        proto = self.proto
        close = self.must_close or not self.keep_alive or proto.listener.stopping
        response = error_response(status, reason, close=close, retry_after=retry_after)
        self.bytes_out += body_size(response)
        proto.write(response)

    def finish(self, now: float) -> None:
        """Close the books: route, demand control, metrics, the access log, the connection."""
        if self.state >= DONE:
            return
        route = self.route
        proto = self.proto
        listener = proto.listener
        if self.pool is not None and route is not None:
            budget = route.budget
            budget.requests -= 1
            if self.retry_slot or self.next_slot:  # places in the retry budget, rarely held
                for _ in range(self.retry_slot + self.next_slot):
                    budget.release()
                self.retry_slot = self.next_slot = False
            ticket = self.ticket
            if ticket is not None and ticket.admitted:
                self.ticket = None
                ticket.release(not self.reason and self.status not in RETRYABLE_STATUSES, now)
            if route.stats is not None:
                route.stats.inflight.value -= 1
        stats = route.stats if route is not None else listener.no_route_stats()
        if stats is not None:
            stats.finished(self.status, now - self.started_at, self.reason)
        if (
            self.must_close
            or not self.keep_alive
            or not self.request_done
            or self.broken
            or listener.stopping
        ):
            self.to(CLOSE, now)
        else:
            self.to(FINISH, now)
        access = listener.access
        if access is not None:
            head = self.head
            ep = self.endpoint
            request_id = self.request_id
            access.http(
                monotonic(),
                self.began,
                route.label if route is not None else "",
                proto.client_ip,
                head.method,
                head.target,
                self.status,
                ep.key if ep is not None else "",
                self.bytes_in,
                self.bytes_out,
                self.retries,
                self.reason,
                request_id or head.request_id or b"",
                # The id is the proxy's own (hex) unless the client sent one.
                head.plain_target and head.request_id is None and bool(request_id),
            )
        proto.exchange_finished(self, now)

    def abandon(self, now: float) -> None:
        """Stop whatever the exchange waits for; its attempt (if any) ends."""
        state = self.state
        if state == ADMITTING:
            ticket, self.ticket = self.ticket, None
            if ticket is not None:
                ticket.cancel()
            return
        if state == CONNECTING:
            task, self.connecting = self.connecting, None
            if task is not None:
                task.cancel()
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.close()
        if state in (CONNECTING, SENDING, STREAMING):
            self.end_attempt(now)

    # Request side (called by the client's protocol)

    def request_body(self, data: bytes) -> None:
        self.body_seen = True
        self.bytes_in += len(data)
        conn = self.conn
        if conn is not None and (self.state == SENDING or self.state == STREAMING):
            conn.write(chunk(data) if self.head.chunked else data)
            replay = self.replay
            if replay is not None:
                self.replayed += len(data)
                if self.replayed > REPLAY_LIMIT:
                    self.replay = None
                elif isinstance(replay, list):
                    replay.append(data)
                else:
                    self.replay = [data]
            self.client_activity = self.proto.loop.time()
        else:
            buffer = self.buffer
            if isinstance(buffer, list):
                buffer.append(data)
            else:
                self.buffer = [data]
            self.buffered += len(data)
            if self.buffered > BUFFER_HIGH:
                self.proto.flow.pause_reading(WAITING)

    def request_complete(self) -> None:
        self.request_done = True
        conn = self.conn
        if conn is not None and (self.state == SENDING or self.state == STREAMING):
            if self.head.chunked:
                conn.write(LAST_CHUNK)
            self.client_activity = self.proto.loop.time()
            if self.state == SENDING:
                self.arm()

    def request_failed(self, status: int, reason: str) -> None:
        """The request's own bytes turned out bad (e.g. broken chunking) mid-exchange."""
        self.broken = True
        self.must_close = True
        if self.state >= DONE:
            return
        now = self.proto.loop.time()
        self.abandon(now)
        self.answer(status, reason, now)

    def client_lost(self) -> None:
        """The client's connection is gone: end here, wherever the exchange stands."""
        self.must_close = True
        if self.state >= DONE or self.state == TUNNEL:
            return
        now = self.proto.loop.time()
        self.abandon(now)
        if not self.reason:
            self.reason = "client-closed"
        if not self.answering:
            self.status = 499
        self.finish(now)

    # Response side (ResponseSink, called by the upstream connection)

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        conn = self.conn
        now = self.proto.loop.time() if conn is None else conn.last_activity
        head = self.head
        if (
            status in RETRYABLE_STATUSES
            and head.method in IDEMPOTENT_METHODS
            and self.retry_elsewhere(now)
        ):
            if conn is not None:
                self.conn = None
                conn.close()
            self.failed(status, f"upstream-{status}", RETRY_APPROVED, now)
            return
        if status in RETRYABLE_STATUSES:
            # A gateway error passed on to the client still counts against the endpoint, so
            # passive outlier detection sees it (Envoy's consecutive_gateway_failure).
            self.attempt_failed = True
        if status == 101 and head.upgrade is None:
            # Switching protocols nobody asked for: not something to pass to the client.
            self.on_upstream_failed("bad-response", True)
            return
        self.to(RESPOND, now)
        self.status = status
        forwarded, content_length, chunked, upgrade = response_fields(headers)
        out = [STATUS_LINES.get(status) or status_line(status), forwarded]
        if self.extra_head is not None:
            out.append(self.extra_head)
        if status == 101:
            out += (b"connection: upgrade\r\nupgrade: ", upgrade or head.upgrade or b"", CRLF)
            out.append(CRLF)
            self.pending_head = b"".join(out)
            return
        if head.method == b"HEAD" or status in NO_BODY_STATUSES:
            if content_length is not None:
                out += (b"content-length: ", content_length, CRLF)
        elif content_length is not None and not chunked:
            out += (b"content-length: ", content_length, CRLF)
        elif not head.http10:
            # The upstream's body ends with its connection unless it is chunked.
            self.until_eof = not chunked
            self.chunked_out = True
            out.append(b"transfer-encoding: chunked\r\n")
        else:
            self.until_eof = not chunked
            self.must_close = True
        if head.upgrade is not None or not self.request_done:
            self.must_close = True
        if self.must_close or not self.keep_alive or self.proto.listener.stopping:
            out.append(b"connection: close\r\n")
        elif head.http10:
            out.append(b"connection: keep-alive\r\n")
        out.append(CRLF)
        self.pending_head = b"".join(out)

    def on_response_whole(self, simple: SimpleHead, body: bytes) -> bool:
        """A whole simple response (``wire.SimpleHead``: 2xx-5xx but 204, 304 and 502-504,
        one Content-Length, upstream keep-alive): what ``on_response_head``, ``_body`` and
        ``_complete`` do for it, in one call. Declined (False) unless the request is over and
        plain, so that the general path keeps every unusual case."""
        conn = self.conn
        head = self.head
        if conn is None or self.state != SENDING or not self.request_done or head.upgrade:
            return False
        proto = self.proto
        self.status = simple.status
        self.bytes_out += len(body)
        listener = proto.listener
        if (
            self.extra_head is None
            and self.keep_alive
            and not self.must_close
            and not head.http10
            and not listener.stopping
        ):
            data = simple.whole + body
        else:
            out = [simple.prefix]
            if self.extra_head is not None:
                out.append(self.extra_head)
            out += (b"content-length: ", simple.length_bytes, CRLF)
            if self.must_close or not self.keep_alive or listener.stopping:
                out.append(b"connection: close\r\n")
            elif head.http10:
                out.append(b"connection: keep-alive\r\n")
            out += (CRLF, body)
            data = b"".join(out)
        if not proto.closed:
            proto.batch.write_next_turn(proto.transport, data)
        self.conn = None
        now = conn.last_activity  # this loop turn's time, read as the response came
        conn.pool.release(conn, now)
        self.end_attempt(now)
        self.finish(now)
        return True

    def on_response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.chunked_out:
            data = chunk(data)
        head = self.pending_head
        if head is not None:
            self.pending_head = None
            data = head + data
        self.proto.write(data)

    def on_response_flush(self) -> None:
        self.flush_pending()

    def flush_pending(self) -> None:
        head = self.pending_head
        if head is not None:
            self.pending_head = None
            self.proto.write(head)

    def on_response_complete(self, keep_alive: bool) -> None:
        head = self.pending_head or b""
        self.pending_head = None
        proto = self.proto
        if self.chunked_out:
            proto.write(head + LAST_CHUNK)
        elif head:
            proto.write(head)
        conn = self.conn
        self.conn = None
        now = proto.loop.time() if conn is None else conn.last_activity
        if conn is not None:
            if keep_alive and self.request_done and not self.broken:
                conn.pool.release(conn, now)
            else:
                conn.close()
        self.end_attempt(now)
        self.finish(now)

    def on_upstream_upgraded(self, rest: bytes) -> None:
        proto = self.proto
        conn = self.conn
        if conn is None or self.head.upgrade is None or proto.closed or self.state != STREAMING:
            self.on_upstream_failed("bad-upgrade", True)
            return
        now = conn.last_activity
        self.to(UPGRADE, now)
        self.must_close = True  # no more HTTP on this connection
        head = self.pending_head or b""
        self.pending_head = None
        proto.write(head + rest)
        self.bytes_out += len(rest)
        conn.tunnel = proto.transport
        proto.start_tunnel(conn)
        if self.tunnel_prefix:
            conn.write(self.tunnel_prefix)
            self.tunnel_prefix = b""
        self.end_attempt(now)
        self.finish(now)

    def on_upstream_failed(self, reason: str, received: bool) -> None:
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.close()
        state = self.state
        if state == TUNNEL or (self.state >= DONE and self.proto.tunnel is not None):
            self.proto.close()
            return
        if self.state >= DONE:
            return
        now = self.proto.loop.time()
        if state == SENDING:
            self.attempt_failed = True
            retry = RETRY_NO
            if not received and reason == "upstream-reset" and self.replay is not None:
                retry = RETRY_MAYBE
            self.failed(502, reason, retry, now)
            return
        if self.until_eof and reason == "upstream-reset":
            # The end of a body delimited by the upstream closing its connection.
            head = self.pending_head or b""
            self.pending_head = None
            tail = LAST_CHUNK if self.chunked_out else b""
            if head or tail:
                self.proto.write(head + tail)
        else:
            self.attempt_failed = True
            self.reason = reason
            self.must_close = True
            self.flush_pending()
        self.end_attempt(now)
        self.finish(now)

    def on_upstream_eof(self) -> None:
        self.proto.tunnel_eof_from_upstream()

    def upstream_pause_writing(self) -> None:
        self.proto.flow.pause_reading(PEER_FULL)

    def upstream_resume_writing(self) -> None:
        self.proto.flow.resume_reading(PEER_FULL)
