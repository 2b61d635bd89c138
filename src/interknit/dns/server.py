"""The DNS server's IO shell: one UDP endpoint and one TCP listener on the same port.

Everything about answers is the zone's (``zone.py``); everything about rate limiting is the
limiter's (``rrl.py``). This file reads packets, asks them, writes replies and counts.

UDP is the hot path: ``datagram_received`` does the rate-limit check, one ``Zone.answer_cached``
call (a repeated question: a dict lookup and an id spliced in) or else one ``Zone.answer`` call,
and one ``sendto``, with nothing awaited. TCP serves the answers that did not fit in UDP (and
clients that prefer it): length-prefixed messages, several per connection, one at a time, with
an idle timeout, a cap on open connections and a smaller cap per client address: one client
holding every connection (300 of them) once shut everyone else out of TCP for the idle timeout.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

from prometheus_client import CollectorRegistry

from interknit.dns import wire
from interknit.dns.metrics import DnsMetrics
from interknit.dns.rrl import RateLimiter, RrlConfig, Verdict
from interknit.dns.zone import Reply, Zone
from interknit.registry.model import Event, Instance

log = logging.getLogger("interknit.dns")

_LENGTH = struct.Struct("!H")
_BIND_ATTEMPTS = 20


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        # The hot path's collaborators, bound once: each attribute hop costs on every packet.
        self._clock = server.clock
        self._limiter = server.limiter
        self._cached = server.zone.answer_cached
        self._observe = server.metrics.observe
        self._sendto: Callable[[bytes, Any], None] | None = None
        # Sources the rate limiter exempts (loopback by default), known without asking it.
        self._exempt: set[str] = set()

    # -- Protocol interface --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not every loop's UDP transport subclasses DatagramTransport (3.11's selector one does
        # not), but all of them have sendto.
        self.transport = cast(asyncio.DatagramTransport, transport)
        self._sendto = self.transport.sendto

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        now = self._clock()
        host: str = addr[0]
        limiter = self._limiter
        if limiter is not None and host not in self._exempt:
            if limiter.exempt(host):
                if len(self._exempt) < 1024:
                    self._exempt.add(host)
            else:
                verdict = limiter.check(host, now)
                if verdict is not Verdict.ALLOW:
                    self._limited(data, addr, now, verdict)
                    return
        hit = self._cached(data, host, now)
        sendto = self._sendto
        assert sendto is not None
        if hit is not None:
            sendto(hit[0], addr)
            self._observe(hit[1], "udp")
            return
        reply = self.server.answer(data, host, now, tcp=False, slip=False)
        if reply is None:
            self.server.metrics.dropped.inc()
            return
        sendto(reply.wire, addr)
        self._observe(reply, "udp")

    def _limited(self, data: bytes, addr: tuple[Any, ...], now: float, verdict: Verdict) -> None:
        """Over the client's rate: drop, or slip a bare truncated reply (see ``rrl.py``)."""
        server = self.server
        assert self._sendto is not None
        if verdict is Verdict.DROP:
            server.metrics.rate_limited.labels("drop").inc()
            return
        server.metrics.rate_limited.labels("slip").inc()
        reply = server.answer(data, addr[0], now, tcp=False, slip=True)
        if reply is None:
            server.metrics.dropped.inc()
            return
        self._sendto(reply.wire, addr)
        self._observe(reply, "udp")

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a client that went away: nothing to do.
        log.debug("dns udp error: %s", exc)


class DnsServer:
    """Serve ``zone`` on ``host:port`` over UDP and TCP; ``port=0`` picks a free port."""

    def __init__(
        self,
        zone: Zone,
        host: str = "127.0.0.1",
        port: int = 7453,
        registry: CollectorRegistry | None = None,
        *,
        rrl: RrlConfig | None = None,
        rate_limit: bool = True,
        clock: Callable[[], float] = time.monotonic,
        tcp_idle_timeout: float = 10.0,
        max_tcp_connections: int = 256,
        max_tcp_per_client: int = 16,
    ) -> None:
        self.zone = zone
        self.host = host
        self.requested_port = port
        self.clock = clock
        self.metrics = DnsMetrics(registry if registry is not None else CollectorRegistry())
        self.limiter = RateLimiter(rrl) if rate_limit else None
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_tcp_connections = max_tcp_connections
        self.max_tcp_per_client = max_tcp_per_client
        self._tcp_clients: dict[str, int] = {}  # open connections by client address
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_writers: set[asyncio.StreamWriter] = set()
        self._port = 0

    # -- feeding the zone with this server's clock --

    def sync(self, instances: Iterable[Instance], revision: int, *, initial: bool = False) -> None:
        """Full resync; ``initial`` (the first load) marks no service as just changed."""
        self.zone.sync(instances, revision, -math.inf if initial else self.clock())

    def apply(self, event: Event) -> None:
        self.zone.apply(event, self.clock())

    def apply_all(self, events: Sequence[Event]) -> None:
        self.zone.apply_all(events, self.clock())

    # -- lifecycle --

    @property
    def port(self) -> int:
        """The bound port, the same for UDP and TCP (0 before ``start``)."""
        return self._port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _attempt in range(_BIND_ATTEMPTS):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(self.host, self.requested_port)
            )
            port = int(transport.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(
                    self._serve_tcp, self.host, port, reuse_address=True
                )
            except OSError as exc:
                transport.close()
                # An ephemeral UDP port whose TCP twin is taken: try another one.
                if self.requested_port == 0 and exc.errno == errno.EADDRINUSE:
                    continue
                raise
            self._udp = transport
            self._port = port
            log.info("dns serving %s on %s:%d (udp+tcp)", self.zone.config.zone, self.host, port)
            return
        raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._tcp_writers):
                writer.close()
            await self._tcp.wait_closed()
            self._tcp = None

    async def __aenter__(self) -> DnsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- answering --

    def answer(self, data: bytes, host: str, now: float, *, tcp: bool, slip: bool) -> Reply | None:
        try:
            return self.zone.answer(data, host, now, tcp=tcp, slip=slip)
        except Exception:
            # A bug must cost one query, not the server.
            log.exception("dns: failed to answer a query from %s", host)
            header = wire.header_of(data)
            if header is None:
                return None
            packet = wire.error_reply(header[0], header[1], wire.SERVFAIL)
            return Reply(packet, 0, wire.SERVFAIL, None, False)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if peer else ""
        held = self._tcp_clients.get(host, 0)
        if held >= self.max_tcp_per_client:
            self.metrics.tcp_refused.labels("per-client").inc()
            writer.close()
            return
        if len(self._tcp_writers) >= self.max_tcp_connections:
            self.metrics.tcp_refused.labels("total").inc()
            writer.close()
            return
        self._tcp_writers.add(writer)
        self._tcp_clients[host] = held + 1
        try:
            while True:
                try:
                    async with asyncio.timeout(self.tcp_idle_timeout):
                        (size,) = _LENGTH.unpack(await reader.readexactly(2))
                        data = await reader.readexactly(size)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                reply = self.answer(data, host, self.clock(), tcp=True, slip=False)
                if reply is None:
                    self.metrics.dropped.inc()
                    return
                packet = reply.wire
                if len(packet) > 0xFFFF:
                    # Only huge TXT meta could get here; a TCP message cannot say its length.
                    header = wire.header_of(data)
                    assert header is not None
                    packet = wire.error_reply(header[0], header[1], wire.SERVFAIL)
                    reply = Reply(packet, reply.qtype, wire.SERVFAIL, None, False)
                writer.write(_LENGTH.pack(len(packet)) + packet)
                self.metrics.observe(reply, "tcp")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._tcp_writers.discard(writer)
            left = self._tcp_clients.get(host, 1) - 1
            if left > 0:
                self._tcp_clients[host] = left
            else:
                self._tcp_clients.pop(host, None)
            writer.close()
