"""Random request bytes never crash a listener, and what reaches the upstream is what an
independent parser says the client sent.

The oracle is h11, a parser with no code in common with httptools (llhttp), which the proxy
uses. For each input, h11 reads the client's bytes as a server would: the requests it finds,
in order, until it finds the bytes invalid. The upstream parses what the proxy sends it with
h11 too, and records each request. The proxy may refuse more than h11 does (it is stricter on
purpose: Host, transfer codings, limits), so the requests it forwards must be a prefix of h11's,
each with the same method, target, Host and body. A request h11 would not find, or a body of
other bytes, is a request smuggled past one of the two parsers: the test fails on it.

The proxy runs on its own uvloop thread; the client is a plain blocking socket.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interknit.proxy import ListenerSpec, RouteSpec, StaticPoolSource
from interknit.proxy.listener import HttpListener
from tests.proxy.conftest import round_robin

EXAMPLES = int(os.environ.get("INTERKNIT_FUZZ_EXAMPLES", "300"))


@dataclass(frozen=True)
class Seen:
    method: bytes
    target: bytes
    host: bytes
    body: bytes


def origin_form(target: bytes) -> bytes:
    """The target as the proxy forwards it: absolute-form becomes origin-form."""
    scheme = target.find(b"://")
    if target[:1] != b"/" and scheme > 0:
        slash = target.find(b"/", scheme + 3)
        return b"/" if slash < 0 else target[slash:]
    return target


def authority(target: bytes) -> bytes | None:
    scheme = target.find(b"://")
    if target[:1] != b"/" and scheme > 0:
        rest = target[scheme + 3 :]
        slash = rest.find(b"/")
        return (rest if slash < 0 else rest[:slash]).lower()
    return None


def h11_requests(data: bytes) -> tuple[list[Seen], bool]:
    """The requests h11 finds in a client's bytes, and whether it found the bytes invalid.

    As RFC 9112 2.2 asks of a server, empty lines before a request line are skipped (CR and LF
    bytes there, as llhttp and HAProxy skip them: between two messages they frame nothing);
    h11 does not skip them itself, so each request is read by a fresh h11 connection from what
    the last one left."""
    found: list[Seen] = []
    rest = data
    while True:
        rest = rest.lstrip(b"\r\n")
        if not rest:
            return found, False
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        conn.receive_data(rest)
        conn.receive_data(b"")  # the client closes its side after sending
        current: dict[str, Any] = {}
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                    return found, False
                if isinstance(event, h11.Request):
                    headers = dict(event.headers)
                    current = {
                        "method": event.method,
                        "target": event.target,
                        "host": authority(event.target) or headers.get(b"host", b"").lower(),
                        "body": b"",
                        "switch": event.method == b"CONNECT"
                        or b"upgrade" in headers.get(b"connection", b"").lower(),
                        "keep_alive_10": event.http_version == b"1.0"
                        and headers.get(b"connection", b"").lower() == b"keep-alive",
                    }
                elif isinstance(event, h11.Data):
                    current["body"] += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
        except h11.RemoteProtocolError:
            return found, True
        found.append(
            Seen(
                current["method"], origin_form(current["target"]), current["host"], current["body"]
            )
        )
        if conn.their_state is h11.MUST_CLOSE and not current["keep_alive_10"]:
            return found, False  # nothing more comes
        # (h11 closes after every HTTP/1.0 request; "Connection: keep-alive" keeps one open,
        # as llhttp, HAProxy and nginx have it.)
        if conn.their_state is h11.MIGHT_SWITCH_PROTOCOL and current["switch"]:
            return found, False  # what follows is not HTTP
        # (h11 also stops at an Upgrade field that Connection does not name; RFC 9110 7.8 has
        # such a field ignored, as llhttp does, and the proxy drops it: HTTP goes on.)
        rest, _ = conn.trailing_data


class H11Upstream(asyncio.Protocol):
    """Parses what the proxy sends with h11; records each request, or the violation."""

    def __init__(self, owner: ProxyThread) -> None:
        self.owner = owner
        self.conn = h11.Connection(h11.SERVER)
        self.transport: Any = None
        self.current: dict[str, Any] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        try:
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    return
                if isinstance(event, h11.Request):
                    headers = dict(event.headers)
                    self.current = {
                        "method": event.method,
                        "target": event.target,
                        "host": headers.get(b"host", b"").lower(),
                        "body": b"",
                    }
                elif isinstance(event, h11.Data):
                    self.current["body"] += event.data
                elif isinstance(event, h11.EndOfMessage):
                    c = self.current
                    self.owner.forwarded.append(
                        Seen(c["method"], c["target"], c["host"], c["body"])
                    )
                    reply = self.conn.send(
                        h11.Response(status_code=200, headers=[("content-length", "2")])
                    )
                    if c["method"] != b"HEAD":
                        reply = (reply or b"") + (self.conn.send(h11.Data(data=b"ok")) or b"")
                    reply = (reply or b"") + (self.conn.send(h11.EndOfMessage()) or b"")
                    self.transport.write(reply)
                    self.conn.start_next_cycle()
        except h11.ProtocolError as exc:
            self.owner.violations.append((repr(exc), data))
            self.transport.close()


@dataclass
class ProxyThread:
    loop: asyncio.AbstractEventLoop = field(default_factory=uvloop.new_event_loop)
    violations: list[tuple[str, bytes]] = field(default_factory=list)
    forwarded: list[Seen] = field(default_factory=list)
    port: int = 0
    ready: threading.Event = field(default_factory=threading.Event)
    tried: dict[str, int] = field(default_factory=dict)
    upstream: bytes = b""

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.setup())
        self.ready.set()
        self.loop.run_forever()

    async def setup(self) -> None:
        server = await self.loop.create_server(lambda: H11Upstream(self), "127.0.0.1", 0)
        upstream = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        self.upstream = upstream.encode()
        # The client half-closes after its bytes (so that the proxy closes once it has
        # answered): such a client is kept, not taken for gone (abort_on_close off).
        spec = ListenerSpec(
            name="fuzz",
            routes=(RouteSpec(servers=(upstream,)),),
            header_timeout=0.5,
            abort_on_close=False,
        )
        self.listener = HttpListener(spec, StaticPoolSource(round_robin), loop=self.loop)
        await self.listener.start()
        self.port = self.listener.port

    def count(self, what: str) -> None:
        self.tried[what] = self.tried.get(what, 0) + 1


@pytest.fixture(scope="module")
def proxy_thread() -> Iterator[ProxyThread]:
    pt = ProxyThread()
    pt.start()
    assert pt.ready.wait(5)
    yield pt
    # The counts of inputs tried, by what h11 made of them (shown with -s or on failure).
    print(f"\nproxy fuzz: {sum(pt.tried.values())} inputs: {pt.tried}")
    pt.loop.call_soon_threadsafe(pt.loop.stop)
    pt.thread.join(5)


def exchange(port: int, data: bytes, timeout: float = 3.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
        return b"".join(chunks)


LINES = [
    b"GET / HTTP/1.1\r\n",
    b"POST /p HTTP/1.1\r\n",
    b"PUT /p?x=1 HTTP/1.1\r\n",
    b"GET /x HTTP/1.0\r\n",
    b"HEAD / HTTP/1.1\r\n",
    b"GET http://a/abs HTTP/1.1\r\n",
    b"GET http://h/abs?q HTTP/1.1\r\n",
    b"OPTIONS * HTTP/1.1\r\n",
    b"GET / HTTP/2.0\r\n",
    b"CONNECT a:443 HTTP/1.1\r\n",
]
# Fields h11 and llhttp both take, then the hostile ones.
HEADERS = [
    b"Connection: close\r\n",
    b"Connection: keep-alive\r\n",
    b"X-A: b\r\n",
    b"Accept: */*\r\n",
    b"Expect: 100-continue\r\n",
]
HOSTILE = [
    b"Host: a\r\n",
    b"Host: b\r\n",
    b"Host: A:80\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 3, 3\r\n",
    b"Content-Length: +5\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: identity, chunked\r\n",
    b"Transfer-Encoding: chunked, chunked\r\n",
    b"Transfer-Encoding:chunked\r\n",
    b"Connection: close, Host\r\n",
    b"Connection: Content-Length\r\n",
    b"Connection: Upgrade\r\n",
    b"Upgrade: websocket\r\n",
    b"X-Forwarded-For: 1.2.3.4\r\n",
    b" folded\r\n",
    b"X: \x00\r\n",
    b"X:\tv \r\n",
    b"Bad Name: x\r\n",
    b"X-Lf: v\n",
]
# A framing field and a body that fits it, mostly; then bodies that do not.
FRAMINGS = [
    (b"", b""),
    (b"Content-Length: 0\r\n", b""),
    (b"Content-Length: 5\r\n", b"hello"),
    (b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
    (b"Transfer-Encoding: chunked\r\n", b"5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n"),
    (b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
]
BODIES = [b"hello", b"5\r\nhel", b"0\r\n\r\n", b"ffffffffffffffffffff\r\n", b"\r\n"]
garbage = st.binary(max_size=6)
a_field = st.one_of(
    *[st.sampled_from(HEADERS)] * 3,
    st.sampled_from(HOSTILE),
    garbage.map(lambda b: b + b"\r\n"),
)
a_request = st.tuples(
    st.sampled_from(LINES),
    st.sampled_from([b"Host: a\r\n"] * 6 + [b""]),
    st.lists(a_field, max_size=3),
    st.sampled_from(FRAMINGS),
    st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r\r\n"]),
    st.one_of(*[st.just(b"")] * 4, st.sampled_from(BODIES)),
).map(lambda r: r[0] + r[1] + b"".join(r[2]) + r[3][0] + r[4] + r[3][1] + r[5])
# One to three requests in a row, now and then with random bytes between or after them.
requests_bytes = st.lists(st.one_of(*[a_request] * 6, garbage), min_size=1, max_size=3).map(
    b"".join
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=requests_bytes)
def test_forwarded_requests_are_what_h11_finds(proxy_thread: ProxyThread, data: bytes) -> None:
    expected, invalid = h11_requests(data)
    # A request without Host (HTTP/1.0) goes upstream with the endpoint's address as Host.
    expected = [Seen(s.method, s.target, s.host or proxy_thread.upstream, s.body) for s in expected]
    proxy_thread.count(f"{len(expected)} requests{', then invalid' if invalid else ''}")
    proxy_thread.forwarded.clear()
    answer = exchange(proxy_thread.port, data)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:100]
    assert proxy_thread.violations == []
    forwarded = list(proxy_thread.forwarded)
    assert forwarded == expected[: len(forwarded)], (data, forwarded, expected)
    # The listener is still healthy.
    ok = exchange(proxy_thread.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200"), ok[:200]
    assert proxy_thread.thread.is_alive()


def test_the_oracle_tells_a_smuggled_request(proxy_thread: ProxyThread) -> None:
    """Both framings at once: h11 takes Transfer-Encoding (RFC 9112 6.3) and finds a second
    request; a parser that took Content-Length would forward ``0\\r\\n\\r`` as a body, which
    the oracle would not match. The proxy refuses the request outright: nothing forwarded."""
    smuggle = (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    found, _ = h11_requests(smuggle)
    assert found == [Seen(b"POST", b"/", b"a", b""), Seen(b"GET", b"/admin", b"a", b"")]
    assert [Seen(b"POST", b"/", b"a", b"0\r\n\r")] != found[:1]
    proxy_thread.forwarded.clear()
    answer = exchange(proxy_thread.port, smuggle)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert proxy_thread.forwarded == []


def test_upstream_sees_a_chunked_request_once(proxy_thread: ProxyThread) -> None:
    proxy_thread.forwarded.clear()
    answer = exchange(
        proxy_thread.port,
        b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200")
    assert proxy_thread.forwarded == [Seen(b"POST", b"/p", b"a", b"hello")]
    assert proxy_thread.violations == []
