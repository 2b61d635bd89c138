"""The HTTP/1.1 data plane: one protocol object per client connection, one exchange per request.

Theory of operation. ``HttpProxyProtocol`` parses requests with httptools. When a request head
is complete it becomes an ``Exchange``; the first one runs at once, later (pipelined) ones wait
in a deque with reading paused, so that responses leave in request order. An exchange picks a
route (first match wins), asks the route's pool for an endpoint, borrows a keep-alive
connection from the ``UpstreamPool`` and streams the request to it; the connection streams the
response back through the exchange's ``on_response_*`` callbacks. Bodies are never gathered:
each side pauses the other's reading when its write buffer is full (``FlowControl``), so a
large body passes in constant memory. A failed attempt is retried on another endpoint only when
it is safe (``retry.safe_to_retry``) and the route's ``RetryBudget`` has room.

The common case takes a fast path with no coroutine, task or future: a request of fixed
length (or none) on a route without demand control, with an idle kept-alive connection to
the picked endpoint, is sent from the client's parser callbacks (``Exchange.fast_start``) and
closed from the upstream's (``Exchange.fast_done``). Anything else, and a fast attempt that
fails before an answer (a retry may follow), runs the coroutine ``run()``, or its tail
``resume()``. Both sides write through the loop's ``corking.WriteBatch``. Two shortcuts skip
parsing where its result is already known: a whole bodiless request head that arrives in one
read, while the parser rests between kept-alive messages, is looked up by its bytes among the
heads parsed before (``CachedRequest``); and a whole simple response in one read (one
Content-Length, nothing unusual, see ``wire.simple_head``) goes to the exchange in one call
(``on_response_whole``). Anything else takes the parser, as does the first of each.

Framing is re-done on both sides: the proxy never forwards Content-Length, Transfer-Encoding
or any other hop-by-hop header as it came, so that the upstream and the client each see one
unambiguous framing (no request smuggling). httptools (llhttp) rejects conflicting or invalid
framing, obsolete line folding and bad header characters; the proxy adds the head size limit,
the Host rule and the version rule, and answers any rejection with an error and a close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from bisect import bisect_left
from collections import deque
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import httptools

from interknit.balance.base import Endpoint
from interknit.proxy.flow import PEER_FULL, PIPELINE, WAITING, FlowControl
from interknit.proxy.observe import EndpointStats, RouteStats, access_log
from interknit.proxy.pools import Admission, Permit, PoolLike
from interknit.proxy.retry import IDEMPOTENT_METHODS, RETRYABLE_STATUSES, RetryBudget
from interknit.proxy.routing import CompiledRoute, host_without_port, split_target
from interknit.proxy.spec import RouteSpec
from interknit.proxy.upstream import UpstreamConnection
from interknit.proxy.wire import (
    CONTINUE_100,
    CRLF,
    HOP_BY_HOP,
    LAST_CHUNK,
    NO_BODY_STATUSES,
    REQUEST_REWRITTEN,
    STATUS_LINES,
    SimpleHead,
    chunk,
    connection_tokens,
    error_response,
    status_line,
)

if TYPE_CHECKING:
    from interknit.proxy.listener import HttpListener

log = logging.getLogger(__name__)

# Request body kept for a retry; a bigger body streamed already cannot be sent again.
REPLAY_LIMIT = 64 * 1024
# Request body held while no upstream connection is ready, before the client is paused.
BUFFER_HIGH = 64 * 1024
# What a failed attempt allows: no retry, a retry if may_retry() agrees, or one already agreed.
_RETRY_NO = 0
_RETRY_MAYBE = 1
_RETRY_APPROVED = 2
# Balancers that take a hash key (see hash_key()).
_HASHED = frozenset({"ring_hash", "maglev", "source_ip"})
_SELF_HEADERS = frozenset({b"connection", b"keep-alive", b"upgrade", b"close"})
# What a client connection's timer waits for: nothing, a request head, or a next request.
_WAIT_NONE = 0
_WAIT_HEAD = 1
_WAIT_IDLE = 2

Outcome = tuple[int, str, int] | None  # (status, reason, retry) of a failed attempt


class Rejected(Exception):
    """Raised in a parser callback: the request is refused with ``status`` and a close."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class RouteState:
    """What a route keeps across requests on one listener: budget, metrics, admission."""

    __slots__ = (
        "admission",
        "budget",
        "label",
        "plain",
        "response_timeout",
        "route",
        "spec",
        "stats",
        "timeout",
    )

    def __init__(
        self,
        route: CompiledRoute,
        budget: RetryBudget,
        stats: RouteStats | None,
        admission: Admission | None,
    ) -> None:
        self.route = route
        self.spec: RouteSpec = route.spec
        self.label = route.label
        self.budget = budget
        self.stats = stats
        self.admission = admission
        spec = self.spec
        # Read once per request by the fast path (Exchange.fast_start): no demand control, no
        # sticky cookie and no hashing, so the pool picks with no key.
        self.plain = (
            admission is None and spec.sticky_cookie is None and spec.balance not in _HASHED
        )
        self.timeout = spec.timeout
        self.response_timeout = spec.response_timeout


class Exchange:
    """One request and its response, across however many attempts it takes."""

    __slots__ = (
        "attempt_began",
        "attempt_failed",
        "attempt_stats",
        "body_seen",
        "buffer",
        "buffered",
        "bytes_in",
        "bytes_out",
        "cached",
        "chunked_in",
        "chunked_out",
        "client_activity",
        "client_closed",
        "conn",
        "content_length",
        "coro",
        "deadline",
        "endpoint",
        "expect_continue",
        "fast",
        "finished",
        "forward_timeout",
        "fut",
        "hdict",
        "head",
        "headers",
        "host",
        "http10",
        "keep_alive",
        "last_error",
        "method",
        "must_close",
        "next_endpoint",
        "pending_head",
        "pool",
        "proto",
        "reason",
        "replay",
        "replayed",
        "request_broken",
        "request_done",
        "request_id",
        "response_started",
        "retries",
        "retry_slot",
        "sending",
        "set_cookie",
        "started_at",
        "state",
        "status",
        "target",
        "tried",
        "tunnel_prefix",
        "tunneling",
        "until_eof",
        "upgrade",
    )

    def __init__(
        self,
        proto: HttpProxyProtocol,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        hdict: dict[bytes, bytes],
        http10: bool,
        now: float,
    ) -> None:
        self.proto = proto
        self.method = method
        self.target = target
        self.headers = headers
        self.cached: CachedRequest | None = None
        self.hdict = hdict
        self.http10 = http10
        self.host = hdict.get(b"host", b"")
        # Request framing and state
        self.keep_alive = not http10
        self.request_done = False
        self.request_broken = False
        self.chunked_in = False
        self.content_length: bytes | None = None
        self.expect_continue = False
        self.upgrade: bytes | None = None
        self.tunnel_prefix = b""
        self.body_seen = False
        # Body chunks held (buffer) and kept for a retry (replay, None once too big to keep):
        # an empty tuple until the first chunk, so that a bodiless request allocates no lists.
        self.buffer: list[bytes] | tuple[()] = ()
        self.buffered = 0
        self.replay: list[bytes] | tuple[()] | None = ()
        self.replayed = 0
        self.bytes_in = 0
        self.client_activity = now
        self.head: bytes | None = None
        self.request_id = b""
        self.forward_timeout: bytes | None = None
        self.set_cookie: bytes | None = None
        # Routing and attempts
        self.state: RouteState | None = None
        self.pool: PoolLike | None = None
        self.endpoint: Endpoint | None = None
        self.next_endpoint: Endpoint | None = None
        # Endpoints tried already; a tuple, so that the usual single try allocates nothing.
        self.tried: tuple[Endpoint, ...] = ()
        self.retries = 0
        self.retry_slot = False
        self.last_error: tuple[int, str] = (502, "upstream-failed")
        self.attempt_failed = False
        self.conn: UpstreamConnection | None = None
        self.sending = False
        self.started_at = now
        self.fut: asyncio.Future[Outcome] | None = None
        # An attempt in flight without a coroutine (see fast_start): resolve() finishes it.
        self.fast = False
        self.attempt_stats: EndpointStats | None = None
        self.attempt_began = 0.0
        self.deadline: float | None = None
        self.coro: Coroutine[Any, Any, None] | None = None
        # Response state
        self.response_started = False
        self.pending_head: bytes | None = None
        self.status = 0
        self.bytes_out = 0
        self.chunked_out = False
        self.until_eof = False
        self.tunneling = False
        self.must_close = False
        self.client_closed = False
        self.finished = False
        self.reason = ""

    # Start and finish

    def start(self) -> None:
        # It runs after the parser has finished the current buffer (even for a 404), so a
        # bodiless request is complete (and its keep-alive known) by then.
        self.proto.loop.call_soon(self.go)

    def go(self, now: float | None = None) -> None:
        """Forward the request: by callbacks alone when it can, else with ``run()``.

        ``now``: the loop's time, when the caller read it this turn already."""
        if not self.fast_start(now):
            self.go_slow()

    def go_slow(self) -> None:
        self.coro = self.run()
        self.step(None)

    def step(self, _: object) -> None:
        """Run ``run()`` on to its next wait: a task's work, for an exchange.

        A task per request costs about a microsecond more (its creation, the loop's set of
        all tasks); everything ``run()`` awaits comes down to plain futures, so stepping the
        coroutine from their callbacks does the same.
        """
        coro = self.coro
        if coro is None:
            return
        error: BaseException | None = None
        while True:
            try:
                waiting = coro.send(None) if error is None else coro.throw(error)
            except (StopIteration, asyncio.CancelledError):
                self.coro = None
                return
            except BaseException:
                self.coro = None
                raise
            if waiting is None:  # a bare yield, as in asyncio.sleep(0)
                self.proto.loop.call_soon(self.step, None)
                return
            # What a future yields to the task awaiting it (asyncio.Task tests it the same way).
            if getattr(waiting, "_asyncio_future_blocking", None) is not None:
                waiting._asyncio_future_blocking = False
                waiting.add_done_callback(self.step)
                return
            error = RuntimeError(f"exchange awaited {waiting!r}, not a future")

    async def run(self) -> None:
        try:
            if self.state is None:
                state = self.route()
                if state is None:
                    self.respond_error(404, "no-route")
                    return
                self.state = state
            await self.forward()
        except Exception:
            log.exception("proxy exchange failed")
            self.respond_error(500, "internal-error")
            self.must_close = True
        finally:
            self.finish()

    def route(self) -> RouteState | None:
        """The state of the first route that takes the request."""
        router, states = self.proto.listener.routing
        if router.catch_all:
            return states[0]
        path, authority = split_target(self.target)
        host = authority if authority is not None else self.host
        route = router.match(self.method, host_without_port(host), path, self.hdict)
        return None if route is None else states[route.index]

    def finish(self, now: float | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        proto = self.proto
        listener = proto.listener
        duration = (proto.loop.time() if now is None else now) - self.started_at
        state = self.state
        stats = state.stats if state is not None else listener.no_route_stats()
        if stats is not None:
            index = self.status // 100 - 1  # stats.count(), inlined
            if 0 <= index < 5:
                stats.codes[index].value += 1
            histogram = stats.duration  # observe(), inlined; most take under a millisecond
            bounds = histogram.bounds
            histogram.counts[0 if duration <= bounds[0] else bisect_left(bounds, duration)] += 1
            histogram.sum += duration
            if self.reason:
                stats.error(self.reason)
        if access_log.isEnabledFor(logging.INFO):
            self.log_access(duration)
        proto.exchange_finished(self, now)

    def log_access(self, duration: float) -> None:
        state = self.state
        ep = self.endpoint
        access_log.info(
            "listener=%s route=%s method=%s target=%s status=%d endpoint=%s bytes_in=%d "
            "bytes_out=%d duration_ms=%.2f retries=%d reason=%s request_id=%s",
            self.proto.listener.spec.name,
            state.label if state is not None else "-",
            self.method.decode("latin-1"),
            self.target.decode("latin-1"),
            self.status,
            ep.key if ep is not None else "-",
            self.bytes_in,
            self.bytes_out,
            duration * 1000.0,
            self.retries,
            self.reason or "-",
            self.request_id.decode("latin-1") or "-",
        )

    def respond_error(self, status: int, reason: str, retry_after: int | None = None) -> None:
        """Answer from the proxy itself, unless the upstream's answer has begun already."""
        self.reason = reason
        if self.response_started:
            self.must_close = True
            return
        self.response_started = True
        self.status = status
        if not self.request_done or self.request_broken or self.upgrade is not None:
            self.must_close = True
        close = self.must_close or not self.keep_alive or self.proto.listener.stopping
        self.proto.write(error_response(status, reason, close=close, retry_after=retry_after))

    # Attempts

    async def forward(self) -> None:
        state = self.state
        assert state is not None
        spec = state.spec
        permit = None
        ok = False
        self.begin_forward(state)
        try:
            pool = self.proto.listener.pools.pool(spec)
            if pool is None:
                self.respond_error(503, "no-pool", retry_after=1)
                return
            self.pool = pool
            if state.admission is not None:
                permit = await self.admit(state.admission)
                if permit is None:
                    return
            if spec.timeout is not None:
                self.deadline = self.started_at + spec.timeout
            ok = await self.attempts(pool, None)
        finally:
            self.end_forward(state, ok, permit)

    def begin_forward(self, state: RouteState) -> None:
        if state.stats is not None:
            state.stats.inflight.inc()
        state.budget.request_started()

    def end_forward(self, state: RouteState, ok: bool, permit: Permit | None) -> None:
        budget = state.budget
        budget.request_finished()
        if self.retry_slot:
            budget.release()
            self.retry_slot = False
        if permit is not None:
            permit.release(ok, self.proto.loop.time())
        if state.stats is not None:
            state.stats.inflight.dec()

    async def attempts(self, pool: PoolLike, first: tuple[Endpoint, Outcome] | None) -> bool:
        """Attempt until one answers or no retry is left; ``first``: one already made.

        Returns whether demand control may count the request a success.
        """
        state = self.state
        assert state is not None
        budget = state.budget
        hash_key = self.hash_key(state.spec)
        while True:
            if first is not None:
                endpoint, outcome = first
                first = None
            else:
                if self.client_closed or self.request_broken:
                    return False
                picked = self.next_endpoint
                self.next_endpoint = None
                if picked is None:
                    picked = self.pick(pool, hash_key, self.tried)
                if picked is None:
                    if self.tried:
                        self.respond_error(*self.last_error)
                    else:
                        self.respond_error(503, "no-endpoint", retry_after=1)
                    return False
                endpoint = picked
                holds_slot, self.retry_slot = self.retry_slot, False
                try:
                    outcome = await self.attempt(pool, endpoint)
                finally:
                    if holds_slot:
                        budget.release()
            if outcome is None:
                # Demand control learns from upstream overload (502-504) as from failures.
                return not self.reason and self.status not in RETRYABLE_STATUSES
            status, reason, retry = outcome
            self.tried = (*self.tried, endpoint)
            self.last_error = (status, reason)
            if retry == _RETRY_APPROVED or (retry == _RETRY_MAYBE and self.may_retry()):
                self.retries += 1
                continue
            self.respond_error(status, reason)
            return False

    async def admit(self, admission: Admission) -> Permit | None:
        """Ask demand control; answer its refusal (status, reason, Retry-After) here."""
        hdict = self.hdict
        permit = await admission.acquire(
            self.proto.loop.time(),
            request_timeout=hdict.get(b"x-request-timeout"),
            grpc_timeout=hdict.get(b"grpc-timeout"),
            priority=hdict.get(b"x-priority"),
            client_key=self.proto.client_ip.decode("latin-1"),
        )
        if permit is None:
            refusal = getattr(admission, "last_rejection", None)
            self.respond_error(
                int(getattr(refusal, "status", 503)),
                str(getattr(refusal, "reason", "overloaded")),
                retry_after=int(getattr(refusal, "retry_header", 1)),
            )
            return None
        forward = getattr(permit, "forward_timeout", None)
        if forward is not None:
            value = forward()
            if value:
                self.forward_timeout = str(value).encode("latin-1")
        return permit

    def pick(
        self, pool: PoolLike, hash_key: bytes | None, exclude: Sequence[Endpoint]
    ) -> Endpoint | None:
        """An endpoint, honouring the route's sticky cookie; notes the Set-Cookie to send."""
        state = self.state
        assert state is not None
        now = self.proto.loop.time()
        name = state.spec.sticky_cookie
        if name is None:
            return pool.pick(hash_key, now, exclude)
        raw = cookie_value(self.hdict.get(b"cookie"), name.encode())
        chooser = getattr(pool, "pick_sticky", None)
        if chooser is not None:
            value = None if raw is None else raw.decode("latin-1")
            endpoint, set_cookie = chooser(value, hash_key, now, exclude)
            self.set_cookie = None if set_cookie is None else str(set_cookie).encode("latin-1")
            return endpoint  # type: ignore[no-any-return]
        endpoint = pool.pick(raw if raw is not None else hash_key, now, exclude)
        self.set_cookie = None
        if endpoint is not None:
            key = endpoint.key.encode()
            if raw != key:
                self.set_cookie = b"%s=%s; Path=/; HttpOnly" % (name.encode(), key)
        return endpoint

    def may_retry(self) -> bool:
        """Room for one more attempt: count, replayable body, time and budget (takes a slot)."""
        state = self.state
        assert state is not None
        if self.retries >= state.spec.attempts or self.replay is None or self.client_closed:
            return False
        if self.deadline is not None and self.proto.loop.time() >= self.deadline:
            return False
        if not state.budget.try_acquire():
            self.reason = "retry-budget"
            return False
        self.retry_slot = True
        if state.stats is not None:
            state.stats.retries.inc()
        return True

    async def attempt(self, pool: PoolLike, endpoint: Endpoint) -> Outcome:
        state = self.state
        assert state is not None
        self.begin_attempt(state, endpoint)
        try:
            outcome = await self.connect_and_exchange(state.spec, endpoint)
        finally:
            self.end_attempt(endpoint)
        self.report_attempt(pool, endpoint, outcome)
        return outcome

    def begin_attempt(self, state: RouteState, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.attempt_failed = False
        es: EndpointStats | None = None
        if state.stats is not None:
            es = state.stats.endpoint(endpoint.key)
            es.requests.inc()
            es.inflight.inc()
        self.attempt_stats = es
        endpoint.started()
        self.attempt_began = self.proto.loop.time()

    def end_attempt(self, endpoint: Endpoint) -> None:
        endpoint.finished()
        es = self.attempt_stats
        if es is not None:
            es.inflight.dec()
            es.duration.observe(self.proto.loop.time() - self.attempt_began)

    def report_attempt(self, pool: PoolLike, endpoint: Endpoint, outcome: Outcome) -> None:
        failed = outcome is not None or self.attempt_failed
        if failed and self.attempt_stats is not None:
            self.attempt_stats.errors.inc()
        pool.report(endpoint, not failed, self.proto.loop.time())

    # The fast path: an idle kept-alive connection, a plain request, callbacks only

    def fast_start(self, now: float | None = None) -> bool:
        """Begin the attempt without a coroutine, if nothing unusual is asked for.

        It takes a request of fixed length (or none) on a route without demand control to an
        idle kept-alive connection; the upstream's callbacks answer the client, and
        ``fast_done`` closes the books. Anything else (no route, no pool or endpoint, a
        connect, 100-continue, chunked upload, upgrade) returns False before any side effect
        but the endpoint pick, which ``run()`` then reuses (``next_endpoint``). What
        ``forward``, ``attempt`` and ``exchange`` do is inlined here: per request, each call
        saved counts.
        """
        if (
            self.chunked_in
            or self.expect_continue
            or self.upgrade is not None
            or self.client_closed
            or self.request_broken
        ):
            return False
        proto = self.proto
        listener = proto.listener
        router, states = listener.routing
        state = states[0] if router.catch_all else self.route()
        if state is None:
            return False
        plain = state.plain
        if not plain and state.admission is not None:
            return False
        self.state = state
        spec = state.spec
        pool = listener.pools.pool(spec)
        if pool is None:
            return False
        if now is None:
            now = proto.loop.time()
        deadline = None
        timeout = state.timeout
        if timeout is not None:
            deadline = self.started_at + timeout
            if deadline <= now:
                return False
        if plain:
            endpoint = pool.pick(None, now, self.tried)
        else:
            endpoint = self.pick(pool, self.hash_key(spec), self.tried)
        if endpoint is None:
            return False
        conn = listener.upstreams.take(endpoint.address, endpoint.port)
        if conn is None:
            self.next_endpoint = endpoint
            return False
        # begin_forward() and begin_attempt(), inlined
        stats = state.stats
        es: EndpointStats | None = None
        if stats is not None:
            stats.inflight.value += 1
            es = stats.endpoints.get(endpoint.key) or stats.endpoint(endpoint.key)
            es.requests.value += 1
            es.inflight.value += 1
        state.budget.requests += 1
        self.pool = pool
        self.deadline = deadline
        self.endpoint = endpoint
        self.attempt_stats = es  # (attempt_failed is still False: this is the first)
        endpoint.inflight += 1
        self.attempt_began = now
        self.fast = True
        if self.buffer or self.replay or proto.write_paused or self.forward_timeout is not None:
            self.send(conn, now)
            return True
        # send() and arm_timer(), inlined for a request whose body (if any) is still to come
        self.conn = conn
        conn.start(self, self.method == b"HEAD", now)
        head = self.head = self.build_head()
        transport = conn.transport
        if transport is not None:  # batch.write_next_turn(), inlined: twice a request
            batch = proto.batch
            queued = batch.pending
            if not queued:
                proto.loop.call_soon(batch.next_turn)
            queued.append((transport, head))
        self.sending = True
        self.client_activity = now
        if proto.flow.reasons & WAITING:
            proto.flow.resume_reading(WAITING)
        response_timeout = state.response_timeout
        if response_timeout is None or not self.request_done:
            self.arm_timer()
            return True
        when = now + response_timeout
        if deadline is not None and deadline < when:
            when = deadline
        if proto.exchange_timer is None or proto.exchange_timer_when > when:
            proto.exchange_timer_at(when)
        return True

    def fast_done(self, outcome: Outcome, now: float | None = None) -> None:
        """The fast attempt is over: what ``exchange()`` and its callers do after it."""
        self.sending = False
        self.conn = None
        if outcome is not None:
            # Failed before an answer: the coroutine takes over from here (retries).
            self.coro = self.resume(outcome)
            self.proto.loop.call_soon(self.step, None)
            return
        state = self.state
        pool = self.pool
        endpoint = self.endpoint
        assert state is not None and pool is not None and endpoint is not None
        if now is None:
            now = self.proto.loop.time()
        try:
            # end_attempt(), report_attempt() and end_forward(), inlined
            if endpoint.inflight > 0:
                endpoint.inflight -= 1
            failed = self.attempt_failed
            es = self.attempt_stats
            if es is not None:
                es.inflight.value -= 1
                took = now - self.attempt_began
                histogram = es.duration  # observe(), inlined; most take under a millisecond
                bounds = histogram.bounds
                histogram.counts[0 if took <= bounds[0] else bisect_left(bounds, took)] += 1
                histogram.sum += took
                if failed:
                    es.errors.value += 1
            pool.report(endpoint, not failed, now)
            budget = state.budget
            budget.requests -= 1
            if self.retry_slot:
                budget.release()
                self.retry_slot = False
            if state.stats is not None:
                state.stats.inflight.value -= 1
        except Exception:
            log.exception("proxy exchange failed")
            self.respond_error(500, "internal-error")
            self.must_close = True
        stats = state.stats
        if stats is None or self.reason or self.finished:
            self.finish(now)
            return
        # finish(), inlined for an answer passed on as it came
        self.finished = True
        index = self.status // 100 - 1  # stats.count(), inlined
        if 0 <= index < 5:
            stats.codes[index].value += 1
        duration = now - self.started_at
        histogram = stats.duration  # observe(), inlined; most take under a millisecond
        bounds = histogram.bounds
        histogram.counts[0 if duration <= bounds[0] else bisect_left(bounds, duration)] += 1
        histogram.sum += duration
        if access_log.isEnabledFor(logging.INFO):
            self.log_access(duration)
        self.proto.exchange_finished(self, now)

    async def resume(self, first: tuple[int, str, int]) -> None:
        """After a failed fast attempt: the rest of ``run()`` from where it stood."""
        state = self.state
        pool = self.pool
        endpoint = self.endpoint
        assert state is not None and pool is not None and endpoint is not None
        try:
            ok = False
            try:
                outcome: Outcome = first
                try:
                    # The fast attempt's connection was a reused one (connect_and_exchange).
                    if first[1] == "upstream-reset" and self.replay is not None:
                        outcome = await self.connect_and_exchange(state.spec, endpoint, 2)
                finally:
                    self.end_attempt(endpoint)
                self.report_attempt(pool, endpoint, outcome)
                ok = await self.attempts(pool, (endpoint, outcome))
            finally:
                self.end_forward(state, ok, None)
        except Exception:
            log.exception("proxy exchange failed")
            self.respond_error(500, "internal-error")
            self.must_close = True
        finally:
            self.finish()

    async def connect_and_exchange(
        self, spec: RouteSpec, endpoint: Endpoint, tries: int = 3
    ) -> Outcome:
        listener = self.proto.listener
        loop = self.proto.loop
        for _ in range(tries):
            self.attempt_failed = False
            timeout = spec.connect_timeout
            if self.deadline is not None:
                timeout = min(timeout, self.deadline - loop.time())
                if timeout <= 0:
                    return (504, "timeout", _RETRY_NO)
            # The usual case, a kept-alive connection, needs no task and no timer.
            conn = listener.upstreams.take(endpoint.address, endpoint.port)
            if conn is None:
                try:
                    conn = await asyncio.wait_for(
                        listener.upstreams.connect(endpoint.address, endpoint.port), timeout
                    )
                except TimeoutError:
                    return (504, "connect-timeout", _RETRY_MAYBE)
                except OSError:
                    return (502, "connect-failed", _RETRY_MAYBE)
            if self.client_closed or self.request_broken:
                listener.upstreams.release(conn)
                return None
            reused = conn.reused
            outcome = await self.exchange(conn)
            # A kept-alive connection the upstream closed just as we reused it: try a fresh
            # one on the same endpoint, which is no fault of the endpoint.
            if (
                reused
                and outcome is not None
                and outcome[1] == "upstream-reset"
                and self.replay is not None
            ):
                continue
            return outcome
        return (502, "upstream-reset", _RETRY_MAYBE)

    async def exchange(self, conn: UpstreamConnection) -> Outcome:
        fut: asyncio.Future[Outcome] = self.proto.loop.create_future()
        self.fut = fut
        self.send(conn)
        try:
            return await fut
        finally:
            self.fut = None
            self.cancel_timer()
            if not self.tunneling:
                self.sending = False
                self.conn = None

    def waiting(self) -> bool:
        """An attempt is in flight and not yet resolved."""
        return self.fast or (self.fut is not None and not self.fut.done())

    def send(self, conn: UpstreamConnection, now: float | None = None) -> None:
        """Start the exchange on ``conn``: the request head and what body is there."""
        proto = self.proto
        if now is None:
            now = proto.loop.time()
        self.conn = conn
        conn.start(self, self.method == b"HEAD", now)
        if proto.write_paused:
            conn.pause_reading()
        if self.expect_continue and not self.body_seen and not self.request_done:
            proto.write(CONTINUE_100)
            self.expect_continue = False
        head = self.head
        if head is None:
            head = self.head = self.build_head()
        framed = self.chunked_in
        if not self.buffer and not self.replay and not framed:
            data = head  # the usual case: a bodiless request, or its body still to come
        else:
            parts = [head]
            pending = [*self.replay, *self.buffer] if self.replay else self.buffer
            for data in pending:
                parts.append(chunk(data) if framed else data)
            if self.buffer:
                self.record_sent(self.buffer)
                self.buffer = ()
                self.buffered = 0
            if self.request_done and framed:
                parts.append(LAST_CHUNK)
            data = b"".join(parts)
        transport = conn.transport
        if transport is not None:
            proto.batch.write_next_turn(transport, data)
        self.sending = True
        self.client_activity = now
        if proto.flow.reasons & WAITING:
            proto.flow.resume_reading(WAITING)
        self.arm_timer()

    def mark_client_activity(self) -> None:
        self.client_activity = self.proto.loop.time()

    def record_sent(self, chunks: Sequence[bytes]) -> None:
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

    def resolve(self, outcome: Outcome) -> None:
        if self.fast:
            self.fast = False
            self.fast_done(outcome)
            return
        fut = self.fut
        if fut is not None and not fut.done():
            fut.set_result(outcome)

    def build_head(self) -> bytes:
        proto = self.proto
        cached = self.cached
        if cached is not None and self.forward_timeout is None:
            start = cached.start
            if start is None:
                start = cached.prepare()
        else:
            start = None
        if start:
            # The same head as below, from parts made once per cached request with a Host.
            assert cached is not None
            request_id = cached.request_id
            if request_id is None:
                ids = proto.listener.request_ids
                ready = ids.ready  # ids.next(), its usual case inlined
                self.request_id = request_id = ready.pop() if ready else ids.next()
            else:
                self.request_id = request_id
            # (join is the quickest way to put five pieces together; % formatting the slowest)
            return b"".join((start, proto.client_ip, cached.middle, request_id, b"\r\n\r\n"))
        out = [self.method, b" ", self.target, b" HTTP/1.1\r\n"]
        override = self.forward_timeout
        for name, value in self.headers:
            if override is not None and name.lower() == b"x-request-timeout":
                continue
            out += (name, b": ", value, CRLF)
        if override is not None:
            out += (b"x-request-timeout: ", override, CRLF)
        hdict = self.hdict
        forwarded = hdict.get(b"x-forwarded-for")
        client_ip = proto.client_ip
        if forwarded:
            out += (b"x-forwarded-for: ", forwarded, b", ", client_ip, CRLF)
        else:
            out += (b"x-forwarded-for: ", client_ip, CRLF)
        out.append(b"x-forwarded-proto: http\r\n")
        if self.host:
            out += (b"x-forwarded-host: ", self.host, CRLF)
        elif self.endpoint is not None:
            # HTTP/1.0 clients may omit Host; the upstream speaks 1.1 and needs one.
            out += (b"host: ", f"{self.endpoint.address}:{self.endpoint.port}".encode(), CRLF)
        request_id = hdict.get(b"x-request-id") or proto.listener.request_ids.next()
        self.request_id = request_id
        out += (b"x-request-id: ", request_id, CRLF)
        if self.chunked_in:
            out.append(b"transfer-encoding: chunked\r\n")
        elif self.content_length is not None:
            out += (b"content-length: ", self.content_length, CRLF)
        if self.upgrade is not None:
            out += (b"connection: upgrade\r\nupgrade: ", self.upgrade, CRLF)
        out.append(CRLF)
        return b"".join(out)

    def hash_key(self, spec: RouteSpec) -> bytes | None:
        if spec.balance not in ("ring_hash", "maglev", "source_ip"):
            return None
        hash_on = spec.hash_on
        if spec.balance != "source_ip" and hash_on != "source":
            kind, _, name = hash_on.partition(":")
            if kind == "header":
                value = self.hdict.get(name.lower().encode("latin-1"))
            else:
                value = cookie_value(self.hdict.get(b"cookie"), name.encode("latin-1"))
            if value:
                return value
        return self.proto.client_ip

    # Timers: response head, whole-request deadline and idle, on the connection's one handle

    def arm_timer(self) -> None:
        state = self.state
        assert state is not None
        spec = state.spec
        conn = self.conn
        if self.response_started or not self.request_done or spec.response_timeout is None:
            last = self.client_activity
            if conn is not None and conn.last_activity > last:
                last = conn.last_activity
            when = last + spec.idle_timeout
        else:
            when = self.client_activity + spec.response_timeout
        if self.deadline is not None and self.deadline < when:
            when = self.deadline
        proto = self.proto
        if proto.exchange_timer is None or proto.exchange_timer_when > when:
            proto.exchange_timer_at(when)

    def cancel_timer(self) -> None:
        """Nothing to undo: the handle may fire, finds no attempt waiting, and lets go."""

    def on_timer(self) -> None:
        """Called when the handle fires, perhaps early (it is shared): re-arms if so."""
        if not self.waiting():
            return
        state = self.state
        assert state is not None
        spec = state.spec
        now = self.proto.loop.time()
        conn = self.conn
        if self.deadline is not None and now >= self.deadline:
            reason = "timeout"
        elif self.response_started or not self.request_done or spec.response_timeout is None:
            last = self.client_activity
            if conn is not None and conn.last_activity > last:
                last = conn.last_activity
            if now - last < spec.idle_timeout:
                self.arm_timer()
                return
            reason = "idle-timeout"
        elif now - self.client_activity >= spec.response_timeout:
            reason = "response-timeout"
        else:
            self.arm_timer()
            return
        self.attempt_failed = True
        if conn is not None:
            self.conn = None
            conn.close()
        if self.response_started:
            self.reason = reason
            self.must_close = True
            self.flush_pending()
            self.resolve(None)
        else:
            self.resolve((504, reason, _RETRY_NO))

    # Request side (called by the client protocol)

    def request_body(self, data: bytes) -> None:
        self.body_seen = True
        self.bytes_in += len(data)
        conn = self.conn
        if self.sending and conn is not None:
            conn.write(chunk(data) if self.chunked_in else data)
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
        if self.sending and conn is not None:
            if self.chunked_in:
                conn.write(LAST_CHUNK)
            self.client_activity = self.proto.loop.time()
            if self.waiting() and not self.response_started:
                self.arm_timer()

    def request_failed(self, status: int, reason: str) -> None:
        """The request's own bytes turned out bad (e.g. broken chunking) mid-exchange."""
        self.request_broken = True
        self.must_close = True
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.close()
        self.respond_error(status, reason)
        self.resolve(None)

    def client_lost(self) -> None:
        self.client_closed = True
        self.must_close = True
        if not self.reason and not self.finished:
            self.reason = "client-closed"
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.close()
        self.resolve(None)

    # Response side (ResponseSink, called by the upstream connection)

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if (
            status in RETRYABLE_STATUSES
            and self.method in IDEMPOTENT_METHODS
            and self.retry_elsewhere()
        ):
            conn = self.conn
            if conn is not None:
                self.conn = None
                conn.close()
            self.resolve((status, f"upstream-{status}", _RETRY_APPROVED))
            return
        if status in RETRYABLE_STATUSES:
            # A gateway error passed on to the client still counts against the endpoint, so
            # passive outlier detection sees it (Envoy's consecutive_gateway_failure).
            self.attempt_failed = True
        if status == 101 and self.upgrade is None:
            # Switching protocols nobody asked for: not something to pass to the client.
            self.on_upstream_failed("bad-response", True)
            return
        self.response_started = True
        self.status = status
        key = tuple(headers)
        parsed = _RESPONSE_HEADERS.get(key)
        if parsed is None:
            parsed = response_headers(headers)
            if len(_RESPONSE_HEADERS) >= _RESPONSE_HEADERS_MAX:
                _RESPONSE_HEADERS.clear()
            _RESPONSE_HEADERS[key] = parsed
        forwarded, content_length, chunked, upgrade = parsed
        out = [STATUS_LINES.get(status) or status_line(status), forwarded]
        if self.set_cookie is not None:
            out += (b"set-cookie: ", self.set_cookie, CRLF)
        if status == 101:
            out += (b"connection: upgrade\r\nupgrade: ", upgrade or self.upgrade or b"", CRLF)
            out.append(CRLF)
            self.pending_head = b"".join(out)
            return
        if self.method == b"HEAD" or status in NO_BODY_STATUSES:
            if content_length is not None:
                out += (b"content-length: ", content_length, CRLF)
        elif content_length is not None and not chunked:
            out += (b"content-length: ", content_length, CRLF)
        elif not self.http10:
            # The upstream's body ends with its connection unless it is chunked.
            self.until_eof = not chunked
            self.chunked_out = True
            out.append(b"transfer-encoding: chunked\r\n")
        else:
            self.until_eof = not chunked
            self.must_close = True
        if self.upgrade is not None or not self.request_done:
            self.must_close = True
        if self.must_close or not self.keep_alive or self.proto.listener.stopping:
            out.append(b"connection: close\r\n")
        elif self.http10:
            out.append(b"connection: keep-alive\r\n")
        out.append(CRLF)
        self.pending_head = b"".join(out)

    def on_response_whole(self, head: SimpleHead, body: bytes) -> bool:
        """A whole simple response (``wire.SimpleHead``: 2xx-5xx but 204, 304 and 502-504,
        one Content-Length, upstream keep-alive): what ``on_response_head``, ``_body`` and
        ``_complete`` do for it, in one call. Declined (False) unless the request is over and
        plain, so that the general path keeps every unusual case."""
        conn = self.conn
        if (
            conn is None
            or not self.request_done
            or not self.sending
            or self.request_broken
            or self.upgrade is not None
            or self.response_started
        ):
            return False
        proto = self.proto
        self.response_started = True
        self.status = head.status
        self.bytes_out += len(body)
        if (
            self.set_cookie is None
            and self.keep_alive
            and not self.must_close
            and not self.http10
            and not proto.listener.stopping
        ):
            data = head.whole + body
        else:
            out = [head.prefix]
            if self.set_cookie is not None:
                out += (b"set-cookie: ", self.set_cookie, CRLF)
            out += (b"content-length: ", head.length_bytes, CRLF)
            if self.must_close or not self.keep_alive or proto.listener.stopping:
                out.append(b"connection: close\r\n")
            elif self.http10:
                out.append(b"connection: keep-alive\r\n")
            out += (CRLF, body)
            data = b"".join(out)
        if not proto.closed:  # batch.write_next_turn(), inlined: twice a request
            batch = proto.batch
            pending = batch.pending
            if not pending:
                proto.loop.call_soon(batch.next_turn)
            pending.append((proto.transport, data))
        self.conn = None
        now = conn.last_activity  # this loop turn's time, read as the response came
        proto.listener.upstreams.release(conn, now)
        if self.fast:  # resolve(None), inlined
            self.fast = False
            self.fast_done(None, now)
        else:
            self.resolve(None)
        return True

    def retry_elsewhere(self) -> bool:
        """For a 502/503/504 answer: retry if allowed and another endpoint is there to try."""
        state = self.state
        pool = self.pool
        endpoint = self.endpoint
        if state is None or pool is None or endpoint is None:
            return False
        if self.retries >= state.spec.attempts or self.replay is None or not self.request_done:
            return False
        other = self.pick(pool, self.hash_key(state.spec), [*self.tried, endpoint])
        if other is None or not self.may_retry():
            return False
        self.next_endpoint = other
        self.attempt_failed = True
        return True

    def on_response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.chunked_out:
            data = chunk(data)
        head = self.pending_head
        if head is not None:
            self.pending_head = None
            data = head + data
        proto = self.proto
        if not proto.closed:  # proto.write(), inlined
            proto.batch.write(proto.transport, data)

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
        if self.chunked_out:
            self.proto.write(head + LAST_CHUNK)
        elif head:
            self.proto.write(head)
        conn = self.conn
        self.conn = None
        if conn is not None:
            if keep_alive and self.request_done and self.sending and not self.request_broken:
                self.proto.listener.upstreams.release(conn)
            else:
                conn.close()
        if self.fast:  # resolve(None), inlined
            self.fast = False
            self.fast_done(None)
        else:
            self.resolve(None)

    def on_upstream_upgraded(self, rest: bytes) -> None:
        proto = self.proto
        conn = self.conn
        if conn is None or self.upgrade is None or proto.closed:
            self.on_upstream_failed("bad-upgrade", True)
            return
        self.tunneling = True
        head = self.pending_head or b""
        self.pending_head = None
        proto.write(head + rest)
        self.bytes_out += len(rest)
        conn.tunnel = proto.transport
        proto.start_tunnel(conn)
        if self.tunnel_prefix:
            conn.write(self.tunnel_prefix)
            self.tunnel_prefix = b""
        self.cancel_timer()
        self.resolve(None)

    def on_upstream_failed(self, reason: str, received: bool) -> None:
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.close()
        if self.tunneling:
            self.proto.close()
            return
        if not self.response_started:
            self.attempt_failed = True
            if not received and reason == "upstream-reset":
                retry = _RETRY_MAYBE if self.replay is not None else _RETRY_NO
                self.resolve((502, reason, retry))
            else:
                self.resolve((502, reason, _RETRY_NO))
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
        self.resolve(None)

    def on_upstream_eof(self) -> None:
        self.proto.tunnel_eof_from_upstream()

    def upstream_pause_writing(self) -> None:
        self.proto.flow.pause_reading(PEER_FULL)

    def upstream_resume_writing(self) -> None:
        self.proto.flow.resume_reading(PEER_FULL)


# An upstream answers with the same few header sets over and over (Date changes once a
# second): what response_headers() makes of one is kept, up to this many sets.
_RESPONSE_HEADERS_MAX = 512
_ResponseHeaders = tuple[bytes, bytes | None, bool, bytes | None]
_RESPONSE_HEADERS: dict[tuple[tuple[bytes, bytes], ...], _ResponseHeaders] = {}


def response_headers(headers: list[tuple[bytes, bytes]]) -> _ResponseHeaders:
    """The end-to-end headers of a response as bytes, its Content-Length, whether it is
    chunked, and its Upgrade; hop-by-hop headers and those its Connection lists dropped."""
    out: list[bytes] = []
    content_length: bytes | None = None
    upgrade: bytes | None = None
    chunked = False
    listed: set[bytes] | None = None
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"content-length":
                content_length = value
            elif lname == b"transfer-encoding":
                chunked = True
            elif lname == b"upgrade":
                upgrade = value
            elif lname == b"connection" and value.lower() not in _SELF_HEADERS:
                tokens = connection_tokens(value) - _SELF_HEADERS
                if tokens:
                    listed = tokens if listed is None else listed | tokens
            continue
        out += (name, b": ", value, CRLF)
    if listed:
        out = []
        for name, value in headers:
            lname = name.lower()
            if lname not in HOP_BY_HOP and lname not in listed:
                out += (name, b": ", value, CRLF)
    return b"".join(out), content_length, chunked, upgrade


def cookie_value(header: bytes | None, name: bytes) -> bytes | None:
    if not header:
        return None
    for part in header.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key == name:
            return value
    return None


# Requests by the bytes of their whole head (see HttpProxyProtocol.data_received): a client on
# a kept-alive connection tends to send the same head again and again.
_REQUEST_MAX_BYTES = 2048
_REQUESTS_MAX = 128


class CachedRequest:
    """What parsing one whole bodiless kept-alive request head gave, to be given again for the
    same bytes without parsing them.

    Why this is safe: llhttp is deterministic, and the bytes are only looked up when the
    parser is where it was when it parsed them (between two messages, the last kept alive,
    nothing else in the read), so the parser would produce the same callbacks, and the
    callbacks the same request: one that passed every check (size, Host, version, method,
    framing) and has no body, no Expect and no Upgrade. The header list and dictionary shared
    between the exchanges made from it are never changed by them (nor by the protocol, which
    starts new ones for its next request).
    """

    __slots__ = ("hdict", "headers", "http10", "method", "middle", "request_id", "start", "target")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        hdict: dict[bytes, bytes],
        http10: bool,
    ) -> None:
        # Made for every head parsed whole (most are never seen again): only references here,
        # the rest on its first use (prepare).
        self.method = method
        self.target = target
        self.headers = headers
        self.hdict = hdict
        self.http10 = http10
        # The upstream head around the client's address and the request id (build_head);
        # None until prepared, b"" for a head without Host (build_head then does it all).
        self.start: bytes | None = None
        self.middle = b""
        self.request_id: bytes | None = None

    def prepare(self) -> bytes:
        """Build ``start`` and ``middle``: what ``Exchange.build_head`` writes for this head
        with no timeout override and a Host."""
        hdict = self.hdict
        host = hdict.get(b"host")
        if not host:
            self.start = b""
            return b""
        out = [self.method, b" ", self.target, b" HTTP/1.1\r\n"]
        for name, value in self.headers:
            out += (name, b": ", value, CRLF)
        forwarded = hdict.get(b"x-forwarded-for")
        out.append(b"x-forwarded-for: ")
        if forwarded:
            out += (forwarded, b", ")
        self.middle = (
            b"\r\nx-forwarded-proto: http\r\nx-forwarded-host: %s\r\nx-request-id: " % host
        )
        self.request_id = hdict.get(b"x-request-id") or None
        self.start = start = b"".join(out)
        return start


_REQUESTS: dict[bytes, CachedRequest] = {}
# Heads parsed once (and fit to keep): a head is kept from its second parse on.
_SEEN: set[bytes] = set()
_SEEN_MAX = 256


class HttpProxyProtocol(asyncio.Protocol):
    # Slots: one per open connection, and read on every request; a dict of this many keys
    # would not share them, and would cost both memory and lookups.
    __slots__ = (
        "active",
        "at_rest",
        "batch",
        "broken",
        "cache_limit",
        "client_ip",
        "closed",
        "eof_from_client",
        "eof_from_upstream",
        "exchange_timer",
        "exchange_timer_when",
        "flow",
        "hdict",
        "head_bytes",
        "headers",
        "heads_parsed",
        "hosts",
        "in_head",
        "last_head",
        "listed",
        "listener",
        "loop",
        "max_header_bytes",
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
        "upgrading",
        "url",
        "wait",
        "wait_until",
        "write_paused",
    )

    def __init__(self, listener: HttpListener) -> None:
        # Global state
        self.listener = listener
        self.loop = listener.loop
        self.max_header_bytes = listener.spec.max_header_bytes
        self.batch = listener.upstreams.batch

        # Per-connection state
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.flow: FlowControl = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = b""
        self.active: Exchange | None = None
        # The exchange whose head this buffer completed, started once the buffer is parsed.
        self.starting: Exchange | None = None
        self.pipeline: deque[Exchange] = deque()
        self.pending_error: bytes | None = None
        # Two timer handles, each re-armed only when a wait must end sooner than the handle
        # fires: setting one per request costs more than a handle that wakes up early now and
        # then and finds the wait not over (or gone).
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.wait = _WAIT_NONE
        self.wait_until = 0.0
        self.exchange_timer: asyncio.TimerHandle | None = None
        self.exchange_timer_when = 0.0
        self.write_paused = False
        self.closed = False
        self.rejected = False
        # After a refusal nothing more is parsed; after an upgrade request, bytes wait for the
        # tunnel in the exchange.
        self.broken = False
        self.upgrading: Exchange | None = None
        self.tunnel: UpstreamConnection | None = None
        self.eof_from_client = False
        self.eof_from_upstream = False

        # Between two messages after a kept-alive one (or none yet): a request head in one
        # read may come from the cache of requests (data_received).
        self.at_rest = True
        # Heads no longer than this cannot break max_header_bytes, and are worth caching.
        self.cache_limit = min(self.max_header_bytes, _REQUEST_MAX_BYTES)

        # Per-request state (the request being parsed)
        self.last_head: Exchange | None = None
        self.heads_parsed = 0  # in the read being parsed
        self.parsing: Exchange | None = None
        self.in_head = False
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.hdict: dict[bytes, bytes] = {}
        self.head_bytes = 0
        self.hosts = 0
        self.listed: set[bytes] | None = None

    # Protocol interface

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = transport  # type: ignore[assignment]
        if not self.listener.connection_opened(self):
            self.rejected = True
            self.transport.write(error_response(503, "max-connections", close=True, retry_after=1))
            self.transport.close()
            return
        self.flow = FlowControl(self.transport)
        peer = self.transport.get_extra_info("peername")
        self.client_ip = str(peer[0]).encode() if peer else b""
        self.arm_timer(head=True)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.rejected:
            return
        self.closed = True
        self.listener.connection_closed(self)
        self.cancel_timer()
        # Pending handles would keep this protocol alive until they fire.
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.exchange_timer is not None:
            self.exchange_timer.cancel()
            self.exchange_timer = None
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
        pipeline, self.pipeline = self.pipeline, deque()
        if self.active is not None:
            self.active.client_lost()
        for ex in pipeline:
            ex.client_closed = True

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self.broken:
            return
        if self.upgrading is not None:
            self.upgrading.tunnel_prefix += data
            return
        active = self.active
        if active is not None and active.sending:
            active.client_activity = self.loop.time()
        # A whole bodiless request head in one read, while the parser rests between two
        # kept-alive messages: the same bytes parsed before give the same request (see
        # CachedRequest). Otherwise parse, and remember the result if it is such a request.
        remember = False
        if self.at_rest and len(data) <= self.cache_limit:
            entry = _REQUESTS.get(data)
            if entry is not None:
                self.request_from_cache(entry)
                return
            remember = True
            self.last_head = None
            self.heads_parsed = 0
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
            if remember and self.heads_parsed == 1 and self.at_rest:
                self.remember(data)
        ex = self.starting
        if ex is not None:
            # After the parser has finished the buffer (even for a 404), so that a bodiless
            # request is complete (and its keep-alive known) by then. Its head came in this
            # loop turn: the time it was taken at is still the time.
            self.starting = None
            ex.go(ex.started_at)

    def remember(self, data: bytes) -> None:
        """Keep what parsing ``data`` (one whole request, nothing after it) gave, if it is a
        plain bodiless kept-alive request, for the next time the same bytes come: from the
        second time they are parsed, so that heads never repeated cost only a set entry."""
        ex = self.last_head
        if (
            ex is None
            or not ex.request_done
            or not ex.keep_alive
            or ex.body_seen
            or ex.chunked_in
            or ex.content_length is not None
            or ex.expect_continue
            or ex.upgrade is not None
        ):
            return
        if data not in _SEEN:
            if len(_SEEN) >= _SEEN_MAX:
                _SEEN.clear()
            _SEEN.add(data)
            return
        if len(_REQUESTS) >= _REQUESTS_MAX:
            _REQUESTS.clear()
        _REQUESTS[data] = CachedRequest(ex.method, ex.target, ex.headers, ex.hdict, ex.http10)

    def request_from_cache(self, entry: CachedRequest) -> None:
        """What the parser callbacks do for the request ``entry`` was made from."""
        self.wait = _WAIT_NONE  # cancel_timer()
        ex = Exchange(
            self,
            entry.method,
            entry.target,
            entry.headers,
            entry.hdict,
            entry.http10,
            self.loop.time(),
        )
        ex.cached = entry
        ex.keep_alive = True  # only kept-alive requests are remembered
        ex.request_done = True  # request_complete(): nothing is sent yet
        if self.active is None:
            self.active = ex
            if not ex.fast_start(ex.started_at):  # ex.go(), inlined
                ex.go_slow()
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
        if self.active is not None and self.parsing is None and not self.in_head:
            # The client may half-close after its request; answer it, then close.
            self.active.must_close = True
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
        self.headers = []
        self.hdict = {}
        self.head_bytes = 0
        self.hosts = 0
        self.listed = None
        if self.wait != _WAIT_HEAD:
            self.arm_timer(head=True)

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)
        if self.head_bytes > self.max_header_bytes:
            raise Rejected(414, "uri-too-long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.max_header_bytes:
            raise Rejected(431, "headers-too-large")
        if not self.in_head:
            return  # a trailer: not forwarded
        lname = name.lower()
        hdict = self.hdict
        if lname in REQUEST_REWRITTEN:
            # The usual "keep-alive" or "close" lists no header to drop: no set to build.
            if lname == b"connection" and value.lower() not in _SELF_HEADERS:
                tokens = connection_tokens(value) - _SELF_HEADERS
                if tokens:
                    self.listed = tokens if self.listed is None else self.listed | tokens
            elif lname == b"x-forwarded-for" and lname in hdict:
                value = hdict[lname] + b", " + value
        else:
            self.headers.append((name, value))
            if lname == b"host":
                self.hosts += 1
        if lname == b"connection" and lname in hdict:
            value = hdict[lname] + b", " + value
        hdict[lname] = value

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.cancel_timer()
        parser = self.parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise Rejected(505, "unsupported-version")
        method = parser.get_method()
        if method == b"CONNECT":
            raise Rejected(405, "connect-not-supported")
        http10 = version == "1.0"
        if self.hosts > 1 or (self.hosts == 0 and not http10):
            raise Rejected(400, "bad-host")
        headers = self.headers
        if self.listed:
            listed = self.listed
            headers = [(n, v) for n, v in headers if n.lower() not in listed]
        hdict = self.hdict
        ex = Exchange(self, method, self.url, headers, hdict, http10, self.loop.time())
        ex.keep_alive = bool(parser.should_keep_alive())
        if b"transfer-encoding" in hdict:
            ex.chunked_in = True
        elif b"content-length" in hdict:
            ex.content_length = hdict[b"content-length"].strip()
        expect = hdict.get(b"expect")
        if expect is not None and not http10 and expect.lower() == b"100-continue":
            ex.expect_continue = True
        if b"upgrade" in hdict and b"upgrade" in connection_tokens(hdict.get(b"connection", b"")):
            ex.upgrade = hdict[b"upgrade"]
        self.parsing = ex
        self.last_head = ex
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
        ex.keep_alive = keep_alive = bool(self.parser.should_keep_alive())
        # After a message that ends the connection, llhttp refuses more: not a rest.
        self.at_rest = keep_alive
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
        if ex is not None:
            with contextlib.suppress(ValueError):
                self.pipeline.remove(ex)
        response = error_response(status, reason, close=True)
        if self.active is None:
            self.count_rejection(reason, status)
            self.write(response)
            self.close()
        else:
            self.pending_error = response

    def count_rejection(self, reason: str, status: int) -> None:
        stats = self.listener.no_route_stats()
        if stats is not None:
            stats.count(status)
            stats.error(reason)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "listener=%s route=- status=%d reason=%s client=%s",
                self.listener.spec.name,
                status,
                reason,
                self.client_ip.decode(),
            )

    def exchange_finished(self, ex: Exchange, now: float | None = None) -> None:
        if ex is not self.active:
            return
        self.active = None
        if self.closed or self.tunnel is not None:
            return
        if (
            not self.pipeline
            and self.pending_error is None
            and not (ex.must_close or not ex.request_done or not ex.keep_alive)
            and not self.listener.stopping
        ):
            # The usual case, in one go: what the general path below does for it.
            if self.flow.reasons:
                self.flow.resume_reading(PEER_FULL | WAITING | PIPELINE)
            if self.in_head:
                if self.wait != _WAIT_HEAD:
                    self.arm_timer(head=True)
            elif now is not None and self.timer is not None:
                # arm_timer(head=False), inlined for its usual case: the handle fires first
                self.wait = _WAIT_IDLE
                self.wait_until = until = now + self.listener.spec.keepalive_timeout
                if self.timer_at > until:
                    self.arm_timer(head=False, now=now)
            else:
                self.arm_timer(head=False, now=now)
            return
        self.flow.resume_reading(PEER_FULL | WAITING)
        if ex.must_close or not ex.request_done or not ex.keep_alive or self.listener.stopping:
            self.close()
            return
        if self.pipeline:
            nxt = self.pipeline.popleft()
            if not self.pipeline:
                self.flow.resume_reading(PIPELINE)
            self.active = nxt
            nxt.start()
            return
        if self.pending_error is not None:
            self.write(self.pending_error)
            self.close()
            return
        self.flow.resume_reading(PIPELINE)
        if self.in_head:
            if self.wait != _WAIT_HEAD:
                self.arm_timer(head=True)
        else:
            self.arm_timer(head=False)

    def arm_timer(self, head: bool, now: float | None = None) -> None:
        """Bound the wait for a request head (header_timeout) or for a next request."""
        spec = self.listener.spec
        if now is None:
            now = self.loop.time()
        if head:
            self.wait = _WAIT_HEAD
            self.wait_until = now + spec.header_timeout
        else:
            self.wait = _WAIT_IDLE
            self.wait_until = now + spec.keepalive_timeout
        timer = self.timer
        if timer is not None:
            if self.timer_at <= self.wait_until:
                return  # it fires first and re-arms for the rest
            timer.cancel()
        self.timer_at = self.wait_until
        self.timer = self.loop.call_at(self.wait_until, self.on_timer)

    def cancel_timer(self) -> None:
        self.wait = _WAIT_NONE

    def on_timer(self) -> None:
        self.timer = None
        wait = self.wait
        if wait == _WAIT_NONE or self.closed:
            return
        # Armed for an earlier wait: not yet this one's time. (Not compared with the clock,
        # which may read a hair before the very time the handle was set for.)
        if self.timer_at < self.wait_until:
            self.timer_at = self.wait_until
            self.timer = self.loop.call_at(self.wait_until, self.on_timer)
            return
        self.wait = _WAIT_NONE
        if wait == _WAIT_HEAD:
            self.on_head_timeout()
        else:
            self.on_idle_timeout()

    def exchange_timer_at(self, when: float) -> None:
        """Wake the active exchange at ``when`` (or sooner: it re-checks and re-arms)."""
        timer = self.exchange_timer
        if timer is not None:
            if self.exchange_timer_when <= when:
                return
            timer.cancel()
        self.exchange_timer_when = when
        self.exchange_timer = self.loop.call_at(when, self.on_exchange_timer)

    def on_exchange_timer(self) -> None:
        self.exchange_timer = None
        active = self.active
        if active is not None:
            active.on_timer()

    def on_request_upgrade(self, rest: bytes) -> None:
        ex = self.active if self.active is not None and self.active.upgrade else None
        if ex is None or self.pipeline:
            self.reject(400, "bad-upgrade")
            return
        # No more HTTP on this connection: hold the bytes for the tunnel until the upstream
        # agrees (101), and read nothing more until then.
        ex.tunnel_prefix += rest
        self.upgrading = ex
        self.flow.pause_reading(PIPELINE)

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
            self.count_rejection("header-timeout", 408)
            self.write(error_response(408, "header-timeout", close=True))
            self.close()

    def on_idle_timeout(self) -> None:
        if self.active is None and not self.in_head:
            self.close()

    def shutdown(self) -> None:
        """Stop after the request in flight (listener draining)."""
        if self.tunnel is not None:
            return
        if self.active is None and not self.in_head:
            self.close()
