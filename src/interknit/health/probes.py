"""The two active probes: an HTTP GET and a TCP connect, each bounded by its timeout.

A probe never raises (cancellation aside): every outcome is a ``ProbeResult`` of the check
status it implies, a one-line output for operators (at most ``MAX_OUTPUT`` characters) and the
latency in seconds. The HTTP probe is a small ``asyncio.Protocol`` with httptools parsing the
answer, because one node runs thousands of these a second and a full HTTP client per check
costs several times more. Both probes close with SO_LINGER 0 (a reset, as HAProxy does) when
they close first, so that a node checking thousands of instances does not pile up sockets in
TIME_WAIT and run out of ephemeral ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from typing import TYPE_CHECKING, Any, NamedTuple, cast
from urllib.parse import quote

import httptools

from interknit.http1.limits import HeadGuard
from interknit.registry.model import CheckStatus

if TYPE_CHECKING:
    from interknit.tls.client import ClientTls

MAX_OUTPUT = 4096  # characters of output kept, and bytes of a response body read
# An answer's status line and header fields: whoever registers an instance chooses where the
# node's checks go, and a server answering a head without end would be held until the timeout.
MAX_RESPONSE_HEAD = 16 * 1024
USER_AGENT = b"interknit-health"
_LINGER_RESET = struct.pack("ii", 1, 0)
_PATH_SAFE = "/:@!$&'()*+,;=?%~-._"


class ProbeResult(NamedTuple):
    status: CheckStatus
    output: str
    latency: float


def status_for_code(code: int) -> CheckStatus:
    """2xx passes; 429 (alive, asking for less work) warns; anything else fails."""
    if 200 <= code < 300:
        return "passing"
    if code == 429:
        return "warning"
    return "critical"


def host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def http_request(address: str, port: int, path: str) -> bytes:
    """The bytes of one check request; build it once per instance, not per check."""
    if not path.startswith("/"):
        path = "/" + path
    target = quote(path, safe=_PATH_SAFE)
    return (
        f"GET {target} HTTP/1.1\r\nHost: {host_port(address, port)}\r\n"
        "Connection: close\r\nUser-Agent: interknit-health\r\nAccept: */*\r\n\r\n"
    ).encode("ascii")


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_OUTPUT else text[: MAX_OUTPUT - 3] + "..."


def _close(transport: asyncio.BaseTransport) -> None:
    """Close a transport we close first with a reset, leaving no TIME_WAIT behind."""
    if transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.close()


def _describe_error(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS handshake failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


class _HttpProbeProtocol(asyncio.Protocol):
    """One check's connection: send the request, parse the answer, resolve ``done``."""

    def __init__(self, request: bytes, done: asyncio.Future[None]) -> None:
        self.request = request
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.parser: Any = httptools.HttpResponseParser(self)
        self.guard = HeadGuard(MAX_RESPONSE_HEAD)
        self.code: int | None = None
        self.reason = bytearray()
        self.body = bytearray()
        self.error: str | None = None

    # Protocol interface

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        if self.code is None and self.guard.check(data):
            self._finish(f"invalid HTTP response: a head larger than {MAX_RESPONSE_HEAD} bytes")
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._finish()
        except httptools.HttpParserError as exc:
            self._finish(f"invalid HTTP response: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        # A body delimited by the end of the connection ends here; so does a server that
        # closed without answering.
        if self.code is None:
            self._finish(_describe_error(exc, 0) if exc else "connection closed without a response")
        else:
            self._finish()

    # Parser callbacks

    def on_status(self, status: bytes) -> None:
        self.reason += status[: max(0, MAX_OUTPUT - len(self.reason))]

    def on_headers_complete(self) -> None:
        self.code = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        room = MAX_OUTPUT - len(self.body)
        if room > 0:
            self.body += body[:room]
        if len(self.body) >= MAX_OUTPUT:
            self._finish()  # the status is known and the output is full: stop reading

    def on_message_complete(self) -> None:
        self._finish()

    # Internals

    def _finish(self, error: str | None = None) -> None:
        if not self.done.done():
            self.error = error
            self.done.set_result(None)


async def http_probe(
    address: str,
    port: int,
    path: str,
    timeout: float,
    *,
    request: bytes | None = None,
    tls: ClientTls | None = None,
) -> ProbeResult:
    """GET ``path`` on ``address:port``; 2xx passing, 429 warning, anything else critical.
    Over https with ``tls`` (its CA, name and client certificate); a handshake that fails
    (a certificate that does not verify) is critical, with OpenSSL's reason."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    scheme = "http" if tls is None else "https"
    url = f"{scheme}://{host_port(address, port)}{path}"
    if request is None:
        request = http_request(address, port, path)
    done: asyncio.Future[None] = loop.create_future()
    proto = _HttpProbeProtocol(request, done)
    transport: asyncio.BaseTransport | None = None
    try:
        async with asyncio.timeout(timeout):
            if tls is None:
                transport, _ = await loop.create_connection(lambda: proto, address, port)
            else:
                transport, _ = await loop.create_connection(
                    lambda: proto,
                    address,
                    port,
                    ssl=tls.context,
                    server_hostname=tls.spec.server_hostname(address),
                    ssl_shutdown_timeout=1.0,
                )
            await done
    except Exception as exc:
        if proto.code is None or not isinstance(exc, TimeoutError):
            latency = time.perf_counter() - started
            return ProbeResult(
                "critical", f"HTTP GET {url}: {_describe_error(exc, timeout)}", latency
            )
        # The status arrived but the body did not finish in time: the status stands.
    finally:
        if transport is not None:
            _close(transport)
    latency = time.perf_counter() - started
    if proto.error is not None:
        return ProbeResult("critical", f"HTTP GET {url}: {proto.error}", latency)
    code = proto.code if proto.code is not None else 0
    reason = proto.reason.decode("latin-1")
    output = f"HTTP GET {url}: {code} {reason}".rstrip()
    if proto.body:
        output += " Output: " + proto.body.decode("utf-8", "replace")
    return ProbeResult(status_for_code(code), _truncate(output), latency)


async def tcp_probe(address: str, port: int, timeout: float) -> ProbeResult:
    """Connect to ``address:port``; a completed connection is passing."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    target = host_port(address, port)
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(asyncio.Protocol, address, port)
    except Exception as exc:
        latency = time.perf_counter() - started
        return ProbeResult(
            "critical", f"TCP connect {target}: {_describe_error(exc, timeout)}", latency
        )
    latency = time.perf_counter() - started
    _close(transport)
    return ProbeResult("passing", f"TCP connect {target}: Success", latency)
