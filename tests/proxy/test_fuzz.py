"""Random request bytes never crash a listener and never reach an upstream as an invalid request.

The proxy runs on its own uvloop thread; the upstream re-parses everything it receives with
httptools in strict mode and records anything it cannot parse.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httptools
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interknit.proxy import ListenerSpec, RouteSpec, StaticPoolSource
from interknit.proxy.listener import HttpListener
from tests.proxy.conftest import round_robin


class StrictUpstream(asyncio.Protocol):
    def __init__(self, violations: list[bytes], requests: list[int]) -> None:
        self.violations = violations
        self.requests = requests
        self.parser = httptools.HttpRequestParser(self)
        self.data = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.violations.append(self.data)
            self.transport.close()

    def on_message_complete(self) -> None:
        self.requests[0] += 1
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


class ProxyThread:
    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.violations: list[bytes] = []
        self.requests = [0]
        self.port = 0
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.setup())
        self.ready.set()
        self.loop.run_forever()

    async def setup(self) -> None:
        server = await self.loop.create_server(
            lambda: StrictUpstream(self.violations, self.requests), "127.0.0.1", 0
        )
        upstream = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        spec = ListenerSpec(
            name="fuzz", routes=(RouteSpec(servers=(upstream,)),), header_timeout=0.5
        )
        self.listener = HttpListener(spec, StaticPoolSource(round_robin), loop=self.loop)
        await self.listener.start()
        self.port = self.listener.port


@pytest.fixture(scope="module")
def proxy_thread() -> Iterator[ProxyThread]:
    pt = ProxyThread()
    pt.thread.start()
    assert pt.ready.wait(5)
    yield pt
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


FRAGMENTS = [
    b"GET / HTTP/1.1\r\n",
    b"POST /p HTTP/1.1\r\n",
    b"GET /x HTTP/1.0\r\n",
    b"HEAD / HTTP/1.1\r\n",
    b"GET http://h/abs HTTP/1.1\r\n",
    b"Host: a\r\n",
    b"Host: b\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 0\r\n",
    b"Content-Length: 3, 3\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip\r\n",
    b"Transfer-Encoding:chunked\r\n",
    b"Connection: close\r\n",
    b"Connection: Upgrade\r\n",
    b"Upgrade: websocket\r\n",
    b"Expect: 100-continue\r\n",
    b"X-Forwarded-For: 1.2.3.4\r\n",
    b" folded\r\n",
    b"X: \x00\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b"5\r\nhello\r\n",
    b"0\r\n\r\n",
    b"hello",
    b"ffffffffffffffffffff\r\n",
]

requests_bytes = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=12)), max_size=14
).map(b"".join)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=requests_bytes)
def test_random_bytes_never_crash_nor_forward_invalid(proxy_thread: ProxyThread, data: bytes):
    answer = exchange(proxy_thread.port, data)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:100]
    assert proxy_thread.violations == []
    # The listener is still healthy.
    ok = exchange(proxy_thread.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200"), ok[:200]
    assert proxy_thread.thread.is_alive()


def test_fuzz_upstream_sees_valid_requests(proxy_thread: ProxyThread) -> None:
    before = proxy_thread.requests[0]
    answer = exchange(
        proxy_thread.port,
        b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200")
    assert proxy_thread.requests[0] == before + 1
    assert proxy_thread.violations == []
