"""The registry API's socket: the hot requests answered from the parser, the rest handed to
aiohttp.

Registrations, heartbeats, deregistrations and lookups come thousands a second. Through aiohttp
each one costs a task, a request object, routing, middleware and a response object, which here
is more than the registry's own work. This protocol parses with httptools and answers those
routes itself, with the same handlers' logic (``RegistryApi``), tokens, metrics and error
bodies as the aiohttp application. Everything else (other paths and methods, query strings,
blocking queries, watches, chunked or large bodies, ``Expect``, upgrades, malformed requests)
goes to aiohttp: the connection is handed over at the first byte of that request, and aiohttp
serves it from then on.

Handing over needs the exact byte where a request starts. The requests this protocol answers
are framed by ``Content-Length`` alone and their heads end at the first CRLF CRLF (a head with
a bare LF is handed over instead), so the start of the next request is always known.

Limits hold before the parser sees a byte (``refusals.py``): the head guard
(``http1.limits``) refuses a head that grows past ``MAX_HEAD`` at once (httptools keeps a
partial line until it is whole: an endless header line would otherwise be held whole), and
more than ``MAX_HEADERS`` fields are refused as they are counted. A refusal is answered in
turn, after the requests before it, and closes the connection. The connection aiohttp gets
passes through ``handler.ApiHandler``, which holds aiohttp to the same limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import time
from collections import deque
from collections.abc import Callable

import httptools
from aiohttp import web

from interknit.http1.batch import WriteBatch
from interknit.http1.limits import HeadGuard
from interknit.http1.status import status_line
from interknit.registry.api import (
    RegistryApi,
    deregistered_body,
    error_body,
    registry_error_body,
)
from interknit.registry.handler import ApiHandler
from interknit.registry.http_metrics import HttpMetrics
from interknit.registry.refusals import (
    MAX_HEAD,
    MAX_HEADERS,
    SINGLE_FIELDS,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_HEADERS,
    Refusal,
    Refusals,
    head_refusal,
)
from interknit.registry.registry import Registry
from interknit.registry.schema import MAX_BODY, check_name
from interknit.registry.state import RegistryError
from interknit.registry.tokens import Tokens

log = logging.getLogger("interknit.registry")

MAX_QUEUED = 16  # parsed requests waiting for their turn before reading pauses
KEEPALIVE_TIMEOUT = 75.0  # as aiohttp's default: an idle kept-alive connection is closed
HEAD_TIMEOUT = 30.0  # a request head that takes longer is a slow client: closed
SWEEP_EVERY = 5.0

_PREFIX = b"/v1/services/"
_LOOKUP = "/v1/services/{service}"
_INSTANCE = "/v1/services/{service}/instances/{id}"
_HEARTBEAT = "/v1/services/{service}/instances/{id}/heartbeat"
_REFUSED = "refused"  # the endpoint a refused request is counted under
DEFAULT_MAX_CONNECTIONS = 10_000  # as the proxy's listeners
_CONNECTIONS_BODY = error_body(TOO_MANY_CONNECTIONS.message)
# What a connection's protocol holds once it lets its own parser go (it reads no more).
_SPENT = httptools.HttpRequestParser(object())


class _TooManyHeaders(Exception):
    pass


class _Request:
    __slots__ = (
        "authorization",
        "body",
        "endpoint",
        "handler",
        "keep_alive",
        "method",
        "names",
        "started",
        "url",
    )

    def __init__(
        self,
        endpoint: str,
        method: str,
        handler: Callable[[FastApi, ApiProtocol, _Request], None],
        names: tuple[str, ...],
        url: bytes,
        authorization: str,
        started: float,
    ) -> None:
        self.endpoint = endpoint
        self.url = url  # ASCII, with no query and no escapes, or it is not a fast request
        self.method = method
        self.handler = handler
        self.names = names
        self.authorization = authorization
        self.started = started
        self.body = b""
        self.keep_alive = True


def _refused_request(now: float) -> _Request:
    """What a refused request is counted as: no endpoint was found for it."""
    return _Request(_REFUSED, "-", FastApi.lookup, (), b"", "", now)


class _Date:
    """The Date header, formatted once a second."""

    __slots__ = ("line", "second")

    def __init__(self) -> None:
        self.second = -1
        self.line = b""

    def get(self) -> bytes:
        now = time.time()
        second = int(now)
        if second != self.second:
            self.second = second
            self.line = b"Date: %s\r\n" % email.utils.formatdate(now, usegmt=True).encode()
        return self.line


class FastApi:
    """What every connection shares: the API's logic, the aiohttp server to hand over to, and
    the open connections (for the idle sweep and a graceful stop)."""

    def __init__(
        self,
        api: RegistryApi,
        aiohttp_server: web.Server,
        tokens: Tokens,
        metrics: HttpMetrics,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.api = api
        self.max_connections = max_connections
        self.registry = api.registry
        # Writes take the fast path on the embedded store, whose writes can be answered from
        # a callback; on etcd they go through aiohttp.
        self.writes = isinstance(api.registry, Registry)
        self.aiohttp_server = aiohttp_server
        self.tokens = tokens
        self.metrics = metrics
        self.refusals = Refusals(lambda reason: metrics.refused.labels(reason).inc())
        # Connections handed to aiohttp, for the slow-head sweep.
        self.handed: set[ApiHandler] = set()
        self.date = _Date()
        # Answers of one loop turn go out together at its end, as the proxy's do: a client
        # woken once for many answers spends far less per answer (measured: about a quarter).
        self.batch: WriteBatch = None  # type: ignore[assignment]
        self.connections: set[ApiProtocol] = set()
        self.stopping = False
        self._sweeper: asyncio.Task[None] | None = None

    def __call__(self) -> ApiProtocol:
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self.batch = WriteBatch(loop)
            if isinstance(self.registry, Registry):
                # The answers to a commit's writes go out as soon as it is on the disk.
                self.registry.on_answered(self.batch.flush)
            self._sweeper = loop.create_task(self._sweep())
        return ApiProtocol(self)

    def handoff(self) -> ApiHandler:
        """The protocol a connection is handed to: aiohttp's, behind the API's limits."""
        handler = ApiHandler(
            self.aiohttp_server,
            refusals=self.refusals,
            on_lost=self.handed.discard,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
            access_log=None,
        )
        self.handed.add(handler)
        return handler

    async def _sweep(self) -> None:
        # One pass every few seconds instead of a timer per connection re-armed per request.
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            now = asyncio.get_running_loop().time()
            for conn in list(self.connections):
                conn.sweep(now)
            for handler in list(self.handed):
                handler.sweep(now, HEAD_TIMEOUT)

    async def stop(self, timeout: float) -> None:
        """Close idle connections now and the others once their request is answered."""
        self.stopping = True
        deadline = time.monotonic() + timeout
        while True:
            for conn in list(self.connections):
                if conn.idle():
                    conn.close()
            if not self.connections or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    # ------------------------------------------------------------------ handlers

    def register(self, conn: ApiProtocol, req: _Request) -> None:
        assert isinstance(self.registry, Registry)
        service, instance_id = req.names
        spec = self.api.registration(req.body)
        answer = _Answer(conn, req)
        (inst, revision), queued = self.registry.register_nowait(service, instance_id, spec, answer)
        conn.answer_after(queued, answer, self.api.instance_body(inst, revision))

    def heartbeat(self, conn: ApiProtocol, req: _Request) -> None:
        assert isinstance(self.registry, Registry)
        service, instance_id = req.names
        answer = _Answer(conn, req)
        (inst, revision), queued = self.registry.heartbeat_nowait(service, instance_id, answer)
        conn.answer_after(queued, answer, self.api.instance_body(inst, revision))

    def deregister(self, conn: ApiProtocol, req: _Request) -> None:
        assert isinstance(self.registry, Registry)
        service, instance_id = req.names
        answer = _Answer(conn, req)
        revision, queued = self.registry.deregister_nowait(service, instance_id, answer)
        conn.answer_after(queued, answer, deregistered_body(service, instance_id, revision))

    def lookup(self, conn: ApiProtocol, req: _Request) -> None:
        conn.respond(req, 200, self.api.lookup_body(req.names[0], False, None))


class _Answer:
    """A write's waiter: answers its request when the commit is on the disk (or failed)."""

    __slots__ = ("body", "conn", "req")

    def __init__(self, conn: ApiProtocol, req: _Request) -> None:
        self.conn = conn
        self.req = req
        self.body = b""  # the answer once the commit is on the disk (answer_after)

    def __call__(self, error: BaseException | None) -> None:
        self.conn.committed(self, error)


class ApiProtocol(asyncio.Protocol):
    def __init__(self, server: FastApi) -> None:
        # Global state
        self.server = server
        self.loop = asyncio.get_running_loop()

        # Per-connection state
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        # Every byte from the start of the oldest request not yet answered here; ``start`` is
        # where the request being parsed begins in it.
        self.raw = bytearray()
        self.start = 0
        self.queue: deque[_Request] = deque()
        self.busy = False  # a request's answer waits for its commit
        self.head_end = 0  # where the head of the request being parsed ends in ``raw``
        self.handoff_at: int | None = None
        self.refused: Refusal | None = None  # answered once the requests before it are
        self.eof = False  # the client has closed its side
        self.closing = False
        self.paused = False
        self.last_activity = self.loop.time()
        self.guard = HeadGuard(MAX_HEAD)
        self.at_rest = True  # between requests: the next byte (but CR or LF) starts one

        # Per-request state (the request being parsed)
        self.parsing: _Request | None = None
        self.in_head = False
        self.head_started = 0.0
        self.url = b""
        self.fields = 0
        self.single: set[bytes] = set()  # the single fields (refusals.SINGLE_FIELDS) seen
        self.authorization: str | None = None
        self.length_seen = False
        self.framing_ok = True  # no Transfer-Encoding, Expect or Upgrade
        self.body: list[bytes] = []

    # Protocol interface

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        if len(server.connections) + len(server.handed) >= server.max_connections:
            # Refused before a byte is read: every connection holds a file descriptor and a
            # little memory, and a client opening them without end would take the node's.
            self.refused = TOO_MANY_CONNECTIONS
            self.closing = True
            peer = transport.get_extra_info("peername")
            server.refusals.refused(TOO_MANY_CONNECTIONS, str(peer[0]) if peer else "-")
            self.transport.write(
                b"%sContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Retry-After: 1\r\nConnection: close\r\n\r\n%s"
                % (status_line(503), len(_CONNECTIONS_BODY), _CONNECTIONS_BODY)
            )
            self.transport.close()
            return
        server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.closing = True
        self.queue.clear()
        self._release()

    def _release(self) -> None:
        """Break the protocol <-> parser cycle (the parser holds this protocol's callbacks), so
        that a connection is freed when it ends, not at the collector's next full pass: the
        node runs that pass rarely (heap.py), and 28,553 refused connections in 10 s piled up
        to 86 MiB before it did."""
        self.parser = _SPENT
        self.raw = bytearray()

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        if self.refused is not None:
            return
        if self.handoff_at is not None:
            # Waits, unparsed, for the answers before it; one read of it is enough to hold.
            self.raw += data
            self._pause()
            return
        if self.at_rest or self.in_head:
            status = self.guard.check(data)
            if status:
                self._refuse(head_refusal(status))
                return
        self.raw += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An upgrade's head is whole (_route handed it over at its end).
            pass
        except httptools.HttpParserError as exc:
            if self.handoff_at is None:
                if isinstance(exc.__context__, _TooManyHeaders):
                    self._refuse(TOO_MANY_HEADERS)
                    return
                # Malformed: aiohttp's side reads that request again from its first byte
                # and answers it as it answers any other.
                self.handoff_at = self._message_start()
        if self.handoff_at is not None and not self.queue and not self.busy:
            self._hand_over()
        elif self.queue and not self.busy:
            self._next()

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def _refuse(self, refusal: Refusal) -> None:
        """The request being read broke a limit: nothing more is read; it is answered after
        the requests before it, and the connection closes."""
        self.refused = refusal
        self._pause()
        if self.in_head or not self.at_rest:
            del self.raw[self._message_start() :]
        if not self.queue and not self.busy:
            self._settled()

    def eof_received(self) -> bool | None:
        self.server.batch.flush()  # answers queued this turn go out before any close
        self.eof = True
        if self.busy or self.queue or self.handoff_at is not None:
            return True  # answer what was asked (in order, all of it), then close
        return None

    # Parser callbacks

    def on_message_begin(self) -> None:
        self.at_rest = False
        self.in_head = True
        self.head_started = self.loop.time()
        self.url = b""
        self.fields = 0
        self.single = set()
        self.authorization = None
        self.length_seen = False
        self.framing_ok = True
        self.body = []
        self.parsing = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields += 1
        if self.fields > MAX_HEADERS and self.handoff_at is None:
            raise _TooManyHeaders  # (once handed over, aiohttp's side counts)
        lname = name.lower()
        if lname in SINGLE_FIELDS:
            if lname in self.single:
                self.framing_ok = False  # twice: aiohttp's side refuses it
            self.single.add(lname)
        if lname == b"authorization":
            if self.authorization is None:  # the first, as aiohttp's headers.get
                self.authorization = value.decode("latin-1")
        elif lname == b"content-length":
            # Larger than a body may be, or said twice: aiohttp answers it.
            if self.length_seen or not value.isdigit() or int(value) > MAX_BODY:
                self.framing_ok = False
            self.length_seen = True
        elif lname in (b"transfer-encoding", b"expect", b"upgrade"):
            self.framing_ok = False

    def on_headers_complete(self) -> None:
        self.in_head = False
        # A pipelined head that begins later in this read is counted from the next read on.
        self.guard.reset()
        if self.handoff_at is not None:
            return
        req = self._route()
        if req is None:
            self.handoff_at = self._message_start()
            return
        self.parsing = req

    def on_body(self, body: bytes) -> None:
        if self.parsing is not None:
            self.body.append(body)

    def on_message_complete(self) -> None:
        self.at_rest = True
        self.guard.reset()
        req = self.parsing
        if req is None or self.handoff_at is not None:
            return
        self.parsing = None
        body = b"".join(self.body) if self.body else b""
        req.body = body
        # Read here: after this callback httptools no longer knows it.
        req.keep_alive = self.parser.should_keep_alive()
        # Where this request ends: its head (which _route found) and its Content-Length body.
        self.start = self.head_end + len(body)
        self.queue.append(req)
        if len(self.queue) > MAX_QUEUED and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    # Routing

    def _message_start(self) -> int:
        # The parser skips empty lines between requests; so does the count of bytes.
        raw, start = self.raw, self.start
        while start < len(raw) and raw[start] in b"\r\n":
            start += 1
        return start

    def _route(self) -> _Request | None:
        """The fast request this head asks for, or None to hand the connection to aiohttp."""
        parser = self.parser
        url = self.url
        if (
            not self.framing_ok
            or not url.startswith(_PREFIX)
            or b"?" in url
            or b"%" in url
            or parser.get_http_version() not in ("1.1", "1.0")
        ):
            return None
        start = self._message_start()
        head_end = self.raw.find(b"\r\n\r\n", start)
        if head_end < 0:
            return None
        head_end += 4
        # A bare LF inside the head would make the byte count disagree with the parser.
        if self.raw.count(b"\n", start, head_end) != self.raw.count(b"\r\n", start, head_end):
            return None
        try:
            parts = url[len(_PREFIX) :].decode("ascii").split("/")
        except UnicodeDecodeError:
            return None
        if not all(parts):
            return None  # an empty segment matches no route: aiohttp's 404
        method = parser.get_method()
        server = self.server
        count = len(parts)
        handler: Callable[[FastApi, ApiProtocol, _Request], None]
        if count == 1 and method == b"GET":
            endpoint, handler = _LOOKUP, FastApi.lookup
            names: tuple[str, ...] = (parts[0],)
        elif count == 3 and parts[1] == "instances" and server.writes:
            if method == b"PUT":
                endpoint, handler = _INSTANCE, FastApi.register
            elif method == b"DELETE":
                endpoint, handler = _INSTANCE, FastApi.deregister
            else:
                return None
            names = (parts[0], parts[2])
        elif (
            count == 4
            and parts[1] == "instances"
            and parts[3] == "heartbeat"
            and method == b"PUT"
            and server.writes
        ):
            endpoint, handler = _HEARTBEAT, FastApi.heartbeat
            names = (parts[0], parts[2])
        else:
            return None
        self.head_end = head_end
        return _Request(
            endpoint,
            method.decode(),
            handler,
            names,
            url,
            self.authorization or "",
            self.loop.time(),
        )

    # Answering

    def _next(self) -> None:
        """Answer queued requests in order until one has to wait for its commit."""
        server = self.server
        while self.queue and not self.busy and not self.closing:
            req = self.queue.popleft()
            denied = None
            if server.tokens.enabled:
                path = req.url.decode("ascii")
                denied = server.tokens.deny(path, req.method, req.authorization)
            if denied is not None:
                self.respond(req, denied[0], error_body(denied[1]))
                continue
            try:
                if req.endpoint != _LOOKUP:
                    for field, name in zip(("service", "id"), req.names, strict=False):
                        check_name(field, name)
                else:
                    check_name("service", req.names[0])
                req.handler(server, self, req)
            except RegistryError as exc:
                self.respond(req, exc.status, registry_error_body(exc))
            except Exception as exc:  # a bug: logged with its traceback, throttled
                peer = self.transport.get_extra_info("peername")
                server.refusals.failed(str(peer[0]) if peer else "-", exc)
                self.respond(req, 500, error_body("internal error"))
        if self.paused and len(self.queue) <= MAX_QUEUED // 2 and not self.closing:
            self.paused = False
            self.transport.resume_reading()
        if not self.queue and not self.busy:
            self._settled()

    def _settled(self) -> None:
        """Nothing is waiting to be answered: drop answered bytes, answer a refusal, hand over,
        or close."""
        refused = self.refused
        if refused is not None:
            if not self.closing:
                peer = self.transport.get_extra_info("peername")
                self.server.refusals.refused(refused, str(peer[0]) if peer else "-")
                self.respond(
                    _refused_request(self.loop.time()),
                    refused.status,
                    error_body(refused.message),
                    close=True,
                )
                self.close()
            return
        if self.handoff_at is not None:
            self._hand_over()
            return
        if self.start and self.parsing is None and not self.in_head:
            del self.raw[: self.start]
            self.start = 0
        if self.closing or self.eof or (self.server.stopping and not self.in_head):
            self.close()

    def answer_after(self, queued: bool, answer: _Answer, body: bytes) -> None:
        """Answer a write with ``body`` now, or (``queued``) once ``answer`` hears from its
        commit (which is always a later callback of the loop)."""
        if queued:
            answer.body = body
            self.busy = True
        else:
            self.respond(answer.req, 200, body)

    def committed(self, answer: _Answer, error: BaseException | None) -> None:
        self.busy = False
        req = answer.req
        if error is None:
            self.respond(req, 200, answer.body)
        elif isinstance(error, RegistryError):
            self.respond(req, error.status, registry_error_body(error))
        else:
            self.respond(req, 500, error_body("internal error"))
        self._next()

    def respond(self, req: _Request, status: int, body: bytes, close: bool = False) -> None:
        server = self.server
        registry = server.registry
        close = close or not req.keep_alive or self.closing or server.stopping
        head = status_line(status)
        extra = b"X-Interknit-Revision: %d\r\n" % registry.state.revision if status == 200 else b""
        if registry.stale and status == 200:
            extra += b"X-Interknit-Stale: 1\r\n"
        if close:
            extra += b"Connection: close\r\n"
        server.batch.write(
            self.transport,
            b"%sContent-Type: application/json\r\nContent-Length: %d\r\n%s%s"
            b"\r\n%s" % (head, len(body), server.date.get(), extra, body),
        )
        if req.endpoint is not _REFUSED:  # refusals have a counter of their own
            server.metrics.observe(req.endpoint, req.method, status, self.loop.time() - req.started)
        if close:
            self.closing = True
            self.queue.clear()

    # Handing over and closing

    def _hand_over(self) -> None:
        assert self.handoff_at is not None
        rest = bytes(self.raw[self.handoff_at :])
        self.raw = bytearray()
        self.server.batch.flush()  # aiohttp writes straight to the transport from now on
        self.server.connections.discard(self)
        transport = self.transport
        protocol = self.server.handoff()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.paused:
            transport.resume_reading()
        self._release()
        if rest:
            protocol.data_received(rest)
        if self.eof and not protocol.eof_received():
            transport.close()  # the client had closed its side, and nothing is owed

    def idle(self) -> bool:
        return not self.busy and not self.queue and not self.in_head and self.refused is None

    def sweep(self, now: float) -> None:
        # A head trickling in byte by byte is timed from its start, not from its last byte.
        slow = self.in_head and now - self.head_started > HEAD_TIMEOUT
        if slow or (self.idle() and now - self.last_activity > KEEPALIVE_TIMEOUT):
            self.close()

    def close(self) -> None:
        self.closing = True
        self.queue.clear()
        self.server.connections.discard(self)
        self.server.batch.flush()
        self.transport.close()
